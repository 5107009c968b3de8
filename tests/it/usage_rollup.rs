//! The hourly usage rollup against the truth: interceptions spread over three days (streams that
//! run across hour boundaries, several users, groups, models and clients) are written through
//! the store, and every usage report (each grouping, aligned and unaligned ranges, open ends,
//! sub-hour ranges, user and model filters) must equal the sums computed here from the records
//! themselves: after the writes, after a batch written twice, and after retention purged the
//! oldest. Runs on SQLite, and on PostgreSQL when `TOLLGATE_TEST_DATABASE_URL` is set.

use crate::common;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::server::{fresh_postgres_database, postgres_url};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tollgate::money::NanoUsd;
use tollgate::providers::TokenUsage;
use tollgate::store::{
    purge_once, CredentialKind, InterceptionRecord, InterceptionStatus, Store, UsageFilter,
    UsageGroupBy,
};
use uuid::Uuid;

struct User {
    id: Uuid,
    groups: Vec<&'static str>,
}

fn record(rng: &mut StdRng, users: &[User], start: DateTime<Utc>) -> InterceptionRecord {
    let user = &users[rng.gen_range(0..users.len())];
    let (provider, model) = [
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5"),
    ][rng.gen_range(0..3)];
    let started = start + Duration::milliseconds(rng.gen_range(0..3 * 86_400_000));
    // Some calls run for up to two hours, so start and end fall in different hours.
    let ended = started + Duration::milliseconds(rng.gen_range(10..7_200_000));
    InterceptionRecord {
        id: Uuid::now_v7(),
        user_id: user.id,
        api_key_id: None,
        provider: provider.into(),
        provider_kind: provider,
        endpoint: "chat",
        model: model.into(),
        response_model: None,
        client: ["Claude Code", "curl", "Cursor"][rng.gen_range(0..3)],
        client_session_id: None,
        session_key: format!("s{}", rng.gen_range(0..50)),
        thread_parent_id: None,
        thread_root_id: None,
        credential_kind: CredentialKind::Central,
        credential_hint: None,
        status: InterceptionStatus::Completed,
        upstream_status: Some(200),
        error: None,
        streaming: rng.gen(),
        started_at: started,
        ended_at: ended,
        ttfb_ms: None,
        response_id: None,
        usage: TokenUsage {
            input: rng.gen_range(0..10_000),
            output: rng.gen_range(0..3_000),
            cache_read: rng.gen_range(0..50_000),
            cache_write: rng.gen_range(0..100),
            reasoning: rng.gen_range(0..500),
        },
        usage_source: Default::default(),
        prompt: None,
        tool_calls: Vec::new(),
        thoughts: Vec::new(),
        cost: NanoUsd(rng.gen_range(0..90_000_000)),
        price: None,
        spend_period_start: started,
        shared_reservation: None,
    }
}

/// (tokens ×5, cost, count) per key, as the report should have them.
type Sums = [i64; 7];

fn expected(
    records: &[InterceptionRecord],
    users: &[User],
    group_by: UsageGroupBy,
    filter: &UsageFilter,
) -> BTreeMap<String, Sums> {
    let mut out: BTreeMap<String, Sums> = BTreeMap::new();
    for r in records {
        if filter.from.is_some_and(|f| r.started_at < f)
            || filter.to.is_some_and(|t| r.started_at >= t)
            || filter.user_id.is_some_and(|u| r.user_id != u)
            || filter.model.as_ref().is_some_and(|m| &r.model != m)
        {
            continue;
        }
        let keys: Vec<String> = match group_by {
            UsageGroupBy::User => vec![r.user_id.to_string()],
            UsageGroupBy::Group => users
                .iter()
                .find(|u| u.id == r.user_id)
                .unwrap()
                .groups
                .iter()
                .map(|g| g.to_string())
                .collect(),
            UsageGroupBy::Model => vec![r.model.clone()],
            UsageGroupBy::Provider => vec![r.provider.clone()],
            UsageGroupBy::Client => vec![r.client.to_string()],
            UsageGroupBy::Day => vec![r.started_at.format("%Y-%m-%d").to_string()],
        };
        let u = &r.usage;
        let add = [
            u.input,
            u.output,
            u.cache_read,
            u.cache_write,
            u.reasoning,
            r.cost.0 as u64,
            1,
        ];
        for k in keys {
            let e = out.entry(k).or_default();
            for (acc, v) in e.iter_mut().zip(add) {
                *acc += v as i64;
            }
        }
    }
    out
}

async fn reported(
    store: &Store,
    group_by: UsageGroupBy,
    filter: &UsageFilter,
) -> BTreeMap<String, Sums> {
    let rows = store
        .queries()
        .usage(group_by, filter)
        .await
        .expect("usage report");
    let keys: Vec<&String> = rows.iter().map(|r| &r.key).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "rows ordered by key, one per key");
    rows.into_iter()
        .map(|r| {
            // The group report is keyed by group id; compare by the group's name.
            let key = match group_by {
                UsageGroupBy::Group => r.label.clone().expect("group name"),
                _ => r.key.clone(),
            };
            let u = r.usage;
            let sums = [
                u.input as i64,
                u.output as i64,
                u.cache_read as i64,
                u.cache_write as i64,
                u.reasoning as i64,
                r.cost.0,
                r.interception_count,
            ];
            (key, sums)
        })
        .collect()
}

const GROUPINGS: [UsageGroupBy; 6] = [
    UsageGroupBy::User,
    UsageGroupBy::Group,
    UsageGroupBy::Model,
    UsageGroupBy::Provider,
    UsageGroupBy::Client,
    UsageGroupBy::Day,
];

/// `[from, to)`, either end open.
type Range = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Every grouping over a spread of ranges and filters; returns how many reports were compared.
async fn check_all(
    store: &Store,
    records: &[InterceptionRecord],
    users: &[User],
    start: DateTime<Utc>,
    rng: &mut StdRng,
) -> usize {
    let hour = Duration::hours(1);
    let mut ranges: Vec<Range> = vec![
        (None, None),
        (Some(start + hour * 5), Some(start + hour * 30)),
        (Some(start + Duration::minutes(317)), None),
        (None, Some(start + Duration::minutes(2_000))),
        // Inside one hour, and across one hour boundary only.
        (
            Some(start + Duration::minutes(61)),
            Some(start + Duration::minutes(118)),
        ),
        (
            Some(start + Duration::minutes(100)),
            Some(start + Duration::minutes(130)),
        ),
        // Empty and inverted.
        (Some(start + hour * 9), Some(start + hour * 9)),
        (Some(start + hour * 9), Some(start + hour * 8)),
    ];
    for _ in 0..12 {
        let a = start + Duration::milliseconds(rng.gen_range(-3_600_000..4 * 86_400_000));
        let b = a + Duration::milliseconds(rng.gen_range(1..2 * 86_400_000));
        ranges.push((Some(a), Some(b)));
    }
    let mut compared = 0;
    for (n, (from, to)) in ranges.into_iter().enumerate() {
        for group_by in GROUPINGS {
            let filter = UsageFilter {
                from,
                to,
                user_id: (n % 3 == 1).then(|| users[n % users.len()].id),
                model: (n % 4 == 2).then(|| "gpt-4o".to_string()),
            };
            assert_eq!(
                reported(store, group_by, &filter).await,
                expected(records, users, group_by, &filter),
                "{group_by:?} over {from:?}..{to:?}, user {:?}, model {:?}",
                filter.user_id,
                filter.model
            );
            compared += 1;
        }
    }
    compared
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_reports_from_the_hourly_rollup_equal_the_interceptions_they_sum() {
    let dir = tempfile::tempdir().unwrap();
    let url = match postgres_url() {
        Some(base) => fresh_postgres_database(&base).await,
        None => format!("sqlite://{}", dir.path().join("t.db").display()),
    };
    let store = Store::connect(&url, 4).await.expect("open store");
    store.migrate().await.expect("migrate");
    let group_sets: [&[&'static str]; 4] = [&["eng", "ops"], &["eng"], &[], &["ops"]];
    let mut users = Vec::new();
    for (n, groups) in group_sets.iter().enumerate() {
        let names: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let id = store
            .create_user(&format!("user{n}"), false, &names)
            .await
            .unwrap()
            .id;
        users.push(User {
            id,
            groups: groups.to_vec(),
        });
    }
    let mut rng = StdRng::seed_from_u64(42);
    // Ten days ago, at an odd minute: far enough back for retention to cut through it.
    let start = Utc.timestamp_millis_opt(
        (Utc::now() - Duration::days(10)).timestamp_millis() / 3_600_000 * 3_600_000 + 1_234_567,
    );
    let start = start.single().unwrap();
    let mut records: Vec<InterceptionRecord> = (0..1_500)
        .map(|_| record(&mut rng, &users, start))
        .collect();
    for batch in records.chunks(250) {
        store.insert_interceptions(batch).await.unwrap();
    }
    // A batch written again (a retried or replayed batch) adds nothing.
    store
        .insert_interceptions(&records[250..500])
        .await
        .unwrap();
    let compared = check_all(&store, &records, &users, start, &mut rng).await;
    assert!(compared >= 100);
    // The overview's interceptions-per-hour chart, everyone's and one user's.
    let from = start + Duration::hours(20) - Duration::milliseconds(1_234_567);
    for user in [None, Some(users[1].id)] {
        let mut want: BTreeMap<DateTime<Utc>, i64> = BTreeMap::new();
        for r in records.iter().filter(|r| r.started_at >= from) {
            if user.is_none_or(|u| u == r.user_id) {
                let ms = r.started_at.timestamp_millis() / 3_600_000 * 3_600_000;
                *want
                    .entry(Utc.timestamp_millis_opt(ms).unwrap())
                    .or_default() += 1;
            }
        }
        let got = store
            .queries()
            .interceptions_per_hour(from, user)
            .await
            .unwrap();
        assert_eq!(got, want.into_iter().collect::<Vec<_>>());
    }

    // Retention purges everything that ended before a cutoff in the middle of the second day;
    // the reports then sum what is left.
    let cutoff = start + Duration::hours(37) + Duration::minutes(13);
    let purged = purge_once(&store, 1, cutoff + Duration::days(1))
        .await
        .unwrap();
    let before = records.len();
    records.retain(|r| r.ended_at >= cutoff);
    assert_eq!(before - records.len(), purged as usize);
    assert!(purged > 0 && !records.is_empty());
    check_all(&store, &records, &users, start, &mut rng).await;
}

/// Runs `statements` on the database at `url` with a connection of its own.
async fn raw(url: &str, statements: &[&str]) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        for s in statements {
            sqlx::query(s).execute(&pool).await.unwrap();
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        for s in statements {
            sqlx::query(s).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrading_fills_the_rollup_from_the_interceptions_already_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (url, version) = match postgres_url() {
        Some(base) => (fresh_postgres_database(&base).await, 3),
        None => (format!("sqlite://{}", dir.path().join("t.db").display()), 4),
    };
    let store = Store::connect(&url, 2).await.expect("open store");
    store.migrate().await.expect("migrate");
    let id = store.create_user("ada", false, &[]).await.unwrap().id;
    let users = [User {
        id,
        groups: Vec::new(),
    }];
    let mut rng = StdRng::seed_from_u64(9);
    let start = Utc::now() - Duration::days(4);
    let records: Vec<InterceptionRecord> =
        (0..300).map(|_| record(&mut rng, &users, start)).collect();
    store.insert_interceptions(&records).await.unwrap();
    // Back to the schema before the rollup existed, with the interceptions still there, then
    // upgrade again as a deployment would.
    let forget = format!("DELETE FROM _sqlx_migrations WHERE version = {version}");
    raw(&url, &["DROP TABLE usage_hourly", &forget]).await;
    store.migrate().await.expect("upgrade");
    for group_by in GROUPINGS {
        let filter = UsageFilter {
            from: Some(start + Duration::minutes(90)),
            ..UsageFilter::default()
        };
        assert_eq!(
            reported(&store, group_by, &filter).await,
            expected(&records, &users, group_by, &filter),
            "{group_by:?}"
        );
    }
}
