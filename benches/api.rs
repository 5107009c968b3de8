//! Management API queries at scale: the session and interception lists (and friends) against a
//! SQLite store seeded with 100k interceptions across 200 users and ~20k sessions.
//!
//! Prints the p50/p95 of each query over repeated runs (the figures the API's "well under 50 ms"
//! target is about) and the query plan of the session walk, then runs the criterion benchmarks.
//! Run with `cargo bench --bench api`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::runtime::Runtime;
use tollgate::governance::pricing::ModelPrice;
use tollgate::money::NanoUsd;
use tollgate::providers::{Thought, ThoughtSource, TokenUsage, ToolCall};
use tollgate::store::{
    CredentialKind, InterceptionFilter, InterceptionRecord, InterceptionStatus, SessionCursor,
    Store, UsageFilter, UsageGroupBy,
};
use uuid::Uuid;

const INTERCEPTIONS: usize = 100_000;
const USERS: usize = 200;
const SESSIONS: usize = 20_000;
const DAYS: i64 = 30;

struct Seeded {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    store: Store,
    users: Vec<Uuid>,
}

fn uuid_v7_at(at: DateTime<Utc>, rng: &mut StdRng) -> Uuid {
    let mut random = [0u8; 10];
    rng.fill_bytes(&mut random);
    uuid::Builder::from_unix_timestamp_millis(at.timestamp_millis() as u64, &random).into_uuid()
}

/// 20k sessions of varying length (client sessions, tool-call threads, lone calls) spread over
/// 30 days; users drawn with a skew so some are heavy users, as in real fleets.
async fn seed() -> Seeded {
    let mut dir = tempfile::tempdir().expect("temp dir");
    // TOLLGATE_BENCH_KEEP_DB=1 leaves the seeded database behind for poking at with sqlite3.
    if std::env::var_os("TOLLGATE_BENCH_KEEP_DB").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping the seeded database in {}", dir.path().display());
    }
    let path = dir.path().join("bench.db");
    let store = Store::connect(&format!("sqlite://{}", path.display()), 4)
        .await
        .expect("open store");
    store.migrate().await.expect("migrate");
    let mut users = Vec::with_capacity(USERS);
    for n in 0..USERS {
        users.push(
            store
                .create_user(&format!("user{n}"), false, &[format!("team{}", n % 10)])
                .await
                .expect("user")
                .id,
        );
    }
    let mut rng = StdRng::seed_from_u64(7);
    let now = Utc::now();
    let start = now - chrono::Duration::days(DAYS);
    let span_ms = (now - start).num_milliseconds();
    let models = [
        ("openai", "gpt-4o-2024-08-06"),
        ("openai", "gpt-5-2025-08-07"),
        ("anthropic", "claude-sonnet-4-5-20250929"),
        ("anthropic", "claude-haiku-4-5"),
    ];
    let clients = ["Claude Code", "Codex", "Cursor", "Unknown"];
    let price = ModelPrice {
        input: NanoUsd(3_000_000_000),
        output: NanoUsd(15_000_000_000),
        cache_read: NanoUsd(300_000_000),
        cache_write: NanoUsd(3_750_000_000),
        output_limit: None,
    };

    let mut batch: Vec<InterceptionRecord> = Vec::with_capacity(1000);
    let mut made = 0usize;
    for s in 0..SESSIONS {
        // kind 0..4: a client session; 4..8: a tool-call thread; 8..10: a lone call. Sessions
        // average 5 calls, so 20k sessions hold 100k interceptions.
        let kind = rng.gen_range(0..10);
        let remaining_sessions = SESSIONS - s;
        let remaining = INTERCEPTIONS - made;
        let len = if remaining_sessions == 1 {
            remaining
        } else if kind >= 8 {
            1
        } else {
            rng.gen_range(1..=11)
                .min(remaining - (remaining_sessions - 1))
        }
        .max(1);
        // Skewed user choice: the square of a uniform favours low indexes.
        let u: f64 = rng.gen();
        let user = users[((u * u) * USERS as f64) as usize % USERS];
        let (provider, model) = models[rng.gen_range(0..models.len())];
        let client = clients[rng.gen_range(0..clients.len())];
        let client_session = (kind < 4).then(|| format!("sess-{s}-{}", rng.gen::<u32>()));
        let mut at = start + chrono::Duration::milliseconds(rng.gen_range(0..span_ms));
        let mut root: Option<Uuid> = None;
        let mut parent: Option<Uuid> = None;
        for n in 0..len {
            let id = uuid_v7_at(at, &mut rng);
            let ended = at + chrono::Duration::milliseconds(rng.gen_range(300..20_000));
            let threaded = (4..8).contains(&kind) && n > 0;
            let thread_root_id = if threaded { root } else { None };
            let session_key = match (&client_session, threaded) {
                (Some(cs), _) => cs.clone(),
                (None, true) => root.map(|r| r.to_string()).unwrap_or_default(),
                (None, false) => id.to_string(),
            };
            let usage = TokenUsage {
                input: rng.gen_range(10..5_000),
                output: rng.gen_range(10..2_000),
                cache_read: rng.gen_range(0..20_000),
                cache_write: rng.gen_range(0..2_000),
                reasoning: 0,
            };
            batch.push(InterceptionRecord {
                id,
                user_id: user,
                api_key_id: None,
                provider: provider.to_string(),
                provider_kind: provider_kind(provider),
                endpoint: "messages",
                model: model.to_string(),
                response_model: None,
                client,
                client_session_id: client_session.clone(),
                session_key,
                thread_parent_id: if threaded { parent } else { None },
                thread_root_id,
                credential_kind: CredentialKind::Central,
                credential_hint: Some("sk-…abcd".into()),
                status: InterceptionStatus::Completed,
                upstream_status: Some(200),
                error: None,
                streaming: rng.gen(),
                started_at: at,
                ended_at: ended,
                ttfb_ms: Some(rng.gen_range(100..2_000)),
                response_id: Some(format!("msg_{id}")),
                usage,
                usage_source: Default::default(),
                prompt: (!threaded).then(|| format!("Please look at issue {s}/{n} and fix it.")),
                tool_calls: if rng.gen_range(0..3) == 0 {
                    vec![ToolCall {
                        id: format!("toolu_{s}_{n}"),
                        name: "read_file".into(),
                        input: r#"{"path":"src/lib.rs"}"#.into(),
                    }]
                } else {
                    Vec::new()
                },
                thoughts: if rng.gen_range(0..5) == 0 {
                    vec![Thought {
                        content: "Let me read the file first.".into(),
                        source: ThoughtSource::Thinking,
                    }]
                } else {
                    Vec::new()
                },
                cost: tollgate::governance::pricing::cost(&usage, &price),
                price: Some(price),
                spend_period_start: chrono::Utc::now(),
                shared_reservation: None,
            });
            if root.is_none() {
                root = Some(id);
            }
            parent = Some(id);
            made += 1;
            at = ended + chrono::Duration::milliseconds(rng.gen_range(100..60_000));
            if batch.len() == 1000 {
                store.insert_interceptions(&batch).await.expect("insert");
                batch.clear();
            }
        }
    }
    store.insert_interceptions(&batch).await.expect("insert");
    Seeded {
        _dir: dir,
        path,
        store,
        users,
    }
}

fn provider_kind(provider: &str) -> &'static str {
    if provider == "openai" {
        "openai"
    } else {
        "anthropic"
    }
}

/// Runs `f` `runs` times and returns (p50, p95).
fn percentiles(runs: usize, mut f: impl FnMut() -> Duration) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    (times[runs / 2], times[runs * 95 / 100])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn api_queries(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let started = Instant::now();
    let seeded = rt.block_on(seed());
    let total = rt
        .block_on(seeded.store.count_interceptions())
        .expect("count");
    let sessions = rt
        .block_on(
            seeded
                .store
                .queries()
                .list_sessions(&InterceptionFilter::default(), None, 1),
        )
        .expect("sessions")
        .count;
    eprintln!(
        "seeded {total} interceptions, {USERS} users, {sessions} sessions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let store = seeded.store.clone();
    let all = InterceptionFilter::default();
    let heavy_user = InterceptionFilter {
        user_id: Some(seeded.users[0]),
        ..InterceptionFilter::default()
    };
    let typical_user = InterceptionFilter {
        user_id: Some(seeded.users[USERS / 2]),
        ..InterceptionFilter::default()
    };
    let by_model = InterceptionFilter {
        model: Some("claude-haiku-4-5".into()),
        ..InterceptionFilter::default()
    };
    // A cursor 50 pages deep.
    let deep: SessionCursor = rt.block_on(async {
        let mut cursor: Option<SessionCursor> = None;
        for _ in 0..50 {
            let page = store
                .queries()
                .list_sessions(&all, cursor.as_ref(), 100)
                .await
                .expect("page");
            let last = page.sessions.last().expect("a full page");
            cursor = store
                .queries()
                .session_cursor(&all, &last.key)
                .await
                .expect("cursor");
        }
        cursor.expect("cursor")
    });
    let some_session = rt
        .block_on(store.queries().list_sessions(&all, None, 1))
        .expect("session")
        .sessions[0]
        .key
        .clone();

    // The session walk must use the (ended_at, session_key) index, not scan and sort.
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", seeded.path.display()))
            .await
            .expect("pool");
        for (label, sql) in [
            ("sessions walk", "EXPLAIN QUERY PLAN SELECT i.ended_at, i.session_key FROM interceptions i WHERE 1=1 ORDER BY i.ended_at DESC, i.session_key DESC LIMIT 400"),
            ("sessions walk, one user", "EXPLAIN QUERY PLAN SELECT i.ended_at, i.session_key FROM interceptions i WHERE 1=1 AND i.user_id = 'x' ORDER BY i.ended_at DESC, i.session_key DESC LIMIT 400"),
            ("interceptions page", "EXPLAIN QUERY PLAN SELECT i.id FROM interceptions i WHERE 1=1 AND i.id < 'z' ORDER BY i.id DESC LIMIT 100"),
        ] {
            let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(sql).fetch_all(&pool).await.expect("plan");
            let plan: Vec<String> = rows.into_iter().map(|r| r.3).collect();
            eprintln!("plan, {label}: {}", plan.join(" | "));
        }
    });

    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let q = store.queries();
    let cases: Vec<Case> = vec![
        (
            "sessions list, admin, first page (100)",
            Box::new(|| {
                black_box(rt.block_on(q.list_sessions(&all, None, 100)).expect("q"));
            }),
        ),
        (
            "sessions list, admin, limit 1 (mostly the count)",
            Box::new(|| {
                black_box(rt.block_on(q.list_sessions(&all, None, 1)).expect("q"));
            }),
        ),
        (
            "sessions list, admin, page 51",
            Box::new(|| {
                black_box(
                    rt.block_on(q.list_sessions(&all, Some(&deep), 100))
                        .expect("q"),
                );
            }),
        ),
        (
            "sessions list, heaviest user",
            Box::new(|| {
                black_box(
                    rt.block_on(q.list_sessions(&heavy_user, None, 100))
                        .expect("q"),
                );
            }),
        ),
        (
            "sessions list, typical user",
            Box::new(|| {
                black_box(
                    rt.block_on(q.list_sessions(&typical_user, None, 100))
                        .expect("q"),
                );
            }),
        ),
        (
            "sessions list, model filter",
            Box::new(|| {
                black_box(
                    rt.block_on(q.list_sessions(&by_model, None, 100))
                        .expect("q"),
                );
            }),
        ),
        (
            "session detail",
            Box::new(|| {
                black_box(
                    rt.block_on(q.session_interceptions(&some_session))
                        .expect("q"),
                );
            }),
        ),
        (
            "interceptions list, admin (100)",
            Box::new(|| {
                black_box(
                    rt.block_on(q.list_interceptions(&all, None, 100))
                        .expect("q"),
                );
            }),
        ),
        (
            "interceptions list, heaviest user",
            Box::new(|| {
                black_box(
                    rt.block_on(q.list_interceptions(&heavy_user, None, 100))
                        .expect("q"),
                );
            }),
        ),
        (
            "interceptions list, model filter",
            Box::new(|| {
                black_box(
                    rt.block_on(q.list_interceptions(&by_model, None, 100))
                        .expect("q"),
                );
            }),
        ),
        (
            "usage by model, all time",
            Box::new(|| {
                black_box(
                    rt.block_on(q.usage(UsageGroupBy::Model, &UsageFilter::default()))
                        .expect("q"),
                );
            }),
        ),
    ];

    for (name, f) in &cases {
        let (p50, p95) = percentiles(60, || {
            let t = Instant::now();
            f();
            t.elapsed()
        });
        eprintln!("{name}: p50 {} p95 {}", ms(p50), ms(p95));
    }

    let mut group = c.benchmark_group("api_100k");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_millis(500));
    for (name, f) in &cases {
        group.bench_function(*name, |b| b.iter(f));
    }
    group.finish();
}

criterion_group!(benches, api_queries);
criterion_main!(benches);
