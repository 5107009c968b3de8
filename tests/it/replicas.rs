//! Several replicas on one PostgreSQL, and a PostgreSQL that goes away under traffic.
//!
//! These tests need the PostgreSQL half of the suite (`TOLLGATE_TEST_DATABASE_URL`, as `.ci/run`
//! sets it); on SQLite alone there is nothing to share and they say so and return. The restart
//! test starts its own private PostgreSQL (scripts/test-postgres on another port), since
//! stopping the shared one would break every other test running at the same time.

use crate::common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::http;
use common::client::messages_request;
use common::mock::{MockResponse, MockUpstream};
use common::server::{fresh_postgres_database, on_postgres, Tollgate};
use serde_json::{json, Value};

use crate::governance::{CALL_COST, TEN_CALL_CAP, TEN_CALL_CAP_NANO};

fn skip_without_postgres(test: &str) -> bool {
    if on_postgres() {
        return false;
    }
    eprintln!("{test}: skipped: needs TOLLGATE_TEST_DATABASE_URL (the PostgreSQL half of .ci/run)");
    true
}

async fn send(client: &reqwest::Client, gateway: &str, key: &str) -> u16 {
    client
        .post(format!("{gateway}/anthropic/v1/messages"))
        .header("x-api-key", key)
        .json(&messages_request())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Three gateways on one database, started after the first one created it.
async fn three_replicas(upstream: &MockUpstream, extra: &str) -> Vec<Tollgate> {
    let a = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra(extra)
        .start()
        .await;
    let mut replicas = vec![];
    for _ in 0..2 {
        replicas.push(
            Tollgate::builder()
                .provider("anthropic", "anthropic", &upstream.base_url())
                .database_url(&a.db_url)
                .extra(extra)
                .start()
                .await,
        );
    }
    replicas.insert(0, a);
    replicas
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_spend_one_budget_no_further_than_one_alone() {
    if skip_without_postgres("three_replicas_spend_one_budget") {
        return;
    }
    let upstream = MockUpstream::always(
        MockResponse::fixture("anthropic-messages.json")
            .first_byte_delay(Duration::from_millis(40)),
    )
    .await;
    let cap = TEN_CALL_CAP_NANO;
    let replicas = three_replicas(&upstream, TEN_CALL_CAP).await;
    let key = replicas[0].user_key("burst");
    let client = http();

    // A burst of 150 requests spread over the three replicas at once.
    let mut tasks = Vec::new();
    for i in 0..150 {
        let (client, gw, key) = (client.clone(), replicas[i % 3].gateway.clone(), key.clone());
        tasks.push(tokio::spawn(async move { send(&client, &gw, &key).await }));
    }
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => served += 1,
            402 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(
        upstream.request_count(),
        served,
        "refused requests never reached the upstream"
    );
    // One replica alone admits 8 of such a burst at once (reservations of ~$0.0178 fit 8 times),
    // more as earlier calls settle at their real cost: 10 fit under the cap, and an 11th is
    // admitted alone once the first 10 have settled ($0.142 spent, under the cap), which the
    // bound allows (one call past the cap). Three independent ledgers would admit 24 at once.
    assert!((1..=11).contains(&served), "{served} served in the burst");

    // Then one at a time, round robin, until every replica refuses.
    let mut later = 0;
    let mut refusals_in_a_row = 0;
    let mut i = 0;
    while refusals_in_a_row < 3 {
        match send(&client, &replicas[i % 3].gateway, &key).await {
            200 => {
                later += 1;
                refusals_in_a_row = 0;
            }
            402 => refusals_in_a_row += 1,
            other => panic!("unexpected {other}"),
        }
        i += 1;
        assert!(
            served + later <= 12,
            "the cap never stopped sequential requests"
        );
    }
    eprintln!("three replicas: {served} admitted in the burst of 150, then {later} one at a time");
    replicas[0]
        .wait_until_recorded((served + later) as i64)
        .await;
    let spent: i64 = replicas[0]
        .scalar(
            "SELECT CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) FROM interceptions",
            &[],
        )
        .await;
    assert_eq!(spent, (served + later) as i64 * CALL_COST);
    // The documented bound (docs/replicas.md): with the database up, N replicas overshoot no
    // more than one alone: at most one request's cost past the cap; and the cap is used up.
    assert!(
        spent <= cap + CALL_COST,
        "spent {spent} > cap {cap} + one call"
    );
    assert!(spent >= cap, "spent {spent} stopped short of the cap {cap}");
    // The shared total the replicas admit against agrees with the interceptions, and no
    // reservation is left behind.
    let total: i64 = replicas[0]
        .scalar(
            "SELECT CAST(COALESCE(SUM(spent_nano_usd), 0) AS BIGINT) FROM spend_totals",
            &[],
        )
        .await;
    assert_eq!(total, spent);
    let open: i64 = replicas[0]
        .scalar("SELECT COUNT(*) FROM spend_reservations", &[])
        .await;
    assert_eq!(open, 0, "reservations released when recorded");
    // Every replica reports the same spend to the user within a refresh.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for tg in &replicas {
        let me: Value = client
            .get(format!("{}/api/v2/users/me/budget", tg.admin))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(me["spent_nano_usd"], json!(spent), "{me}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_made_through_one_replica_reach_the_others_within_5_s() {
    if skip_without_postgres("changes_made_through_one_replica_reach_the_others") {
        return;
    }
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    // The harness sets auth.key_cache_ttl_ms = 1000; the contract allows up to 5 s.
    let replicas = three_replicas(&upstream, "").await;
    let (a, c) = (&replicas[0], &replicas[2]);
    let admin = a.admin_key("root");
    let key = a.user_key("ann");
    let client = http();
    for tg in &replicas {
        assert_eq!(send(&client, &tg.gateway, &key).await, 200);
    }
    let ann = users_id(&client, a, &admin, "ann").await;

    // A cap of zero set through A: C refuses the user's next requests within 5 s.
    let resp = client
        .post(format!("{}/api/v2/budgets", a.admin))
        .bearer_auth(&admin)
        .json(&json!({"scope": "user", "scope_id": ann, "limit_usd": "0"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let set = Instant::now();
    while send(&client, &c.gateway, &key).await != 402 {
        assert!(
            set.elapsed() < Duration::from_secs(5),
            "C still admits after {:?}",
            set.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resp = client
        .delete(format!("{}/api/v2/budgets/user/{ann}", a.admin))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let lifted = Instant::now();
    while send(&client, &c.gateway, &key).await != 200 {
        assert!(lifted.elapsed() < Duration::from_secs(5), "C still refuses");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A price set through A: C charges it within 5 s (free, so the cost says which price).
    let resp = client
        .put(format!(
            "{}/api/v2/pricing/claude-sonnet-4-5-20250929",
            a.admin
        ))
        .bearer_auth(&admin)
        .json(&json!({"input": "0", "output": "0", "cache_read": "0", "cache_write": "0"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let priced = Instant::now();
    loop {
        let resp = client
            .post(format!("{}/anthropic/v1/messages", c.gateway))
            .header("x-api-key", &key)
            .json(&messages_request())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let id = resp.headers()["x-tollgate-interception-id"]
            .to_str()
            .unwrap()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        let cost: i64 = loop {
            let found: Vec<i64> = a
                .column(
                    "SELECT cost_nano_usd FROM interceptions WHERE CAST(id AS TEXT) = ?",
                    &[&id],
                )
                .await;
            if let Some(c) = found.first() {
                break *c;
            }
            assert!(
                Instant::now() < deadline,
                "interception {id} never recorded"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        if cost == 0 {
            break;
        }
        assert_eq!(cost, CALL_COST);
        assert!(
            priced.elapsed() < Duration::from_secs(5),
            "C still charges the old price"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An admin demoted through A loses admin rights on C within 5 s.
    let root = client
        .get(format!("{}/api/v2/users/me/budget", c.admin))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(root.status(), 200);
    let other_admin = a.admin_key("deputy");
    let deputy = users_id(&client, a, &admin, "deputy").await;
    assert_eq!(admin_list_status(&client, c, &other_admin).await, 200);
    let resp = client
        .patch(format!("{}/api/v2/users/{deputy}", a.admin))
        .bearer_auth(&admin)
        .json(&json!({"is_admin": false}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let demoted = Instant::now();
    while admin_list_status(&client, c, &other_admin).await != 403 {
        assert!(
            demoted.elapsed() < Duration::from_secs(5),
            "C still treats deputy as admin"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The key revoked through A's API: C refuses it within 5 s.
    let keys: Value = client
        .get(format!("{}/api/v2/users/{ann}/keys", a.admin))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = keys["keys"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{keys}"))
        .to_string();
    let resp = client
        .delete(format!("{}/api/v2/users/{ann}/keys/{key_id}", a.admin))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    let revoked = Instant::now();
    loop {
        let status = send(&client, &c.gateway, &key).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "C still accepts the revoked key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "revocation through A refused by C after {:?}",
        revoked.elapsed()
    );
    for tg in &replicas {
        assert_eq!(send(&client, &tg.gateway, &key).await, 401);
    }
}

async fn users_id(client: &reqwest::Client, tg: &Tollgate, admin: &str, name: &str) -> String {
    let users: Value = client
        .get(format!("{}/api/v2/users", tg.admin))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == name)
        .unwrap_or_else(|| panic!("{name} in {users}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn admin_list_status(client: &reqwest::Client, tg: &Tollgate, key: &str) -> u16 {
    client
        .get(format!("{}/api/v2/users", tg.admin))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A private PostgreSQL on its own port and directory, stopped and deleted on drop.
struct PrivatePostgres {
    port: u16,
    dir: String,
}

impl PrivatePostgres {
    fn script(&self, action: &str) -> std::process::Output {
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/test-postgres"
        ))
        .arg(action)
        .env("TOLLGATE_PG_PORT", self.port.to_string())
        .env("TOLLGATE_PG_DIR", &self.dir)
        .output()
        .expect("run scripts/test-postgres")
    }

    fn start() -> PrivatePostgres {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePostgres {
            port,
            dir: format!("/tmp/tollgate-pg-restart-{port}"),
        };
        pg.up();
        pg
    }

    fn up(&self) {
        let out = self.script("start");
        assert!(out.status.success(), "private PostgreSQL start: {out:?}");
    }

    fn down(&self) {
        let out = self.script("stop");
        assert!(out.status.success(), "private PostgreSQL stop: {out:?}");
    }

    fn url(&self) -> String {
        format!(
            "postgres://tollgate:tollgate@127.0.0.1:{}/postgres",
            self.port
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.script("clean");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn interceptions_made_while_postgres_is_down_are_all_recorded_when_it_returns() {
    if skip_without_postgres("interceptions_made_while_postgres_is_down") {
        return;
    }
    let pg = PrivatePostgres::start();
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .database_url(&fresh_postgres_database(&pg.url()).await)
        .extra("[recorder]\nspill_after_ms = 500\n[limits]\nrequests_per_minute = 0")
        .start()
        .await;
    let key = tg.user_key("steady");
    let client = http();
    assert_eq!(tg.readyz().await.0, 200);

    // Steady traffic: 4 clients, one request every 20 ms each, for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (client, gw, key) = (client.clone(), tg.gateway.clone(), key.clone());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match send(&client, &gw, &key).await {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_outage = ok.load(Ordering::Relaxed);
    pg.down();
    // Readiness says so while it is down.
    tg.wait_for_readyz(503, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during_outage = ok.load(Ordering::Relaxed) - before_outage;
    pg.up();
    tg.wait_for_readyz(200, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let served = ok.load(Ordering::Relaxed);
    // The gateway kept serving through the outage (cached keys, spilled records).
    assert!(
        during_outage > 20,
        "only {during_outage} served while the database was down"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "every request was served"
    );
    assert_eq!(upstream.request_count(), served);

    // Every interception the clients received is in the database, exactly once.
    let pool = sqlx::PgPool::connect(&tg.db_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM interceptions")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n as usize == served {
            break;
        }
        assert!(
            n as usize <= served,
            "{n} recorded for {served} served: duplicates"
        );
        assert!(
            Instant::now() < deadline,
            "{n} of {served} interceptions recorded:\n{}",
            tg.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let usages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM token_usages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(usages as usize, served, "children written once each");
    let spent: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(spent_nano_usd), 0)::bigint FROM spend_totals")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        spent,
        served as i64 * CALL_COST,
        "the shared spend counts every call once"
    );
    let spill: String = tg
        .logs()
        .into_iter()
        .filter(|l| l.contains("spilled"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        spill.contains("spilled to disk"),
        "records went through the spill:\n{spill}"
    );
    pool.close().await;
    eprintln!(
        "served {served} ({during_outage} while PostgreSQL was down); all recorded after it returned"
    );
}

/// The two ways around a reservation a member controls, across three replicas sharing one
/// budget (issue 14): a model alias the price book lacks (reserved at the provider's dearest
/// prices, charged as the model that answered), and input the gateway cannot see (a document
/// the provider fetches: admitted only while nothing else of the user's runs on any replica).
/// Each burst of 200 ends at most one call past the cap.
#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_hold_the_cap_against_aliases_and_unseen_input() {
    if skip_without_postgres("three_replicas_hold_the_cap_against_aliases_and_unseen_input") {
        return;
    }
    // Answers a document request with the usage of a long document (100,000 input tokens:
    // $0.30 more than the fixture), anything else with the fixture.
    let fixture: Value =
        serde_json::from_slice(&common::mock::fixture_bytes("anthropic-messages.json")).unwrap();
    let upstream = MockUpstream::start(move |req| {
        let mut answer = fixture.clone();
        if req.text().contains("\"document\"") {
            answer["usage"]["input_tokens"] = json!(100_420);
        }
        MockResponse::json(200, answer).first_byte_delay(Duration::from_millis(40))
    })
    .await;
    let cap = TEN_CALL_CAP_NANO;
    let replicas = three_replicas(&upstream, TEN_CALL_CAP).await;
    let client = http();
    let mut alias = messages_request();
    alias["model"] = json!("claude-sonnet-latest-alias");
    let mut unseen = messages_request();
    unseen["messages"][0]["content"] = json!([
        {"type": "document", "source": {"type": "url", "url": "https://example.com/spec.pdf"}},
        {"type": "text", "text": "Summarise."}
    ]);
    let mut recorded = 0;
    for (user, body) in [("aliaser", alias), ("reader", unseen)] {
        let key = replicas[0].user_key(user);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let request = client
                    .post(format!("{}/anthropic/v1/messages", replicas[i % 3].gateway))
                    .header("x-api-key", &key)
                    .json(&body);
                tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
            })
            .collect();
        let mut served: i64 = 0;
        for t in tasks {
            match t.await.unwrap() {
                200 => served += 1,
                402 => {}
                other => panic!("{user}: unexpected status {other}"),
            }
        }
        // Then one at a time until every replica refuses.
        let mut refusals_in_a_row = 0;
        let mut i = 0;
        while refusals_in_a_row < 3 {
            let status = client
                .post(format!("{}/anthropic/v1/messages", replicas[i % 3].gateway))
                .header("x-api-key", &key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            match status {
                200 => {
                    served += 1;
                    refusals_in_a_row = 0;
                }
                402 => refusals_in_a_row += 1,
                other => panic!("{user}: unexpected {other}"),
            }
            i += 1;
            assert!(served <= 40, "{user}: the cap never stopped the requests");
        }
        recorded += served;
        replicas[0].wait_until_recorded(recorded).await;
        let (spent, dearest): (i64, i64) = (
            replicas[0]
                .scalar(
                    "SELECT CAST(COALESCE(SUM(i.cost_nano_usd), 0) AS BIGINT) FROM interceptions i JOIN users u ON u.id = i.user_id WHERE u.username = ?",
                    &[user],
                )
                .await,
            replicas[0]
                .scalar(
                    "SELECT CAST(COALESCE(MAX(i.cost_nano_usd), 0) AS BIGINT) FROM interceptions i JOIN users u ON u.id = i.user_id WHERE u.username = ?",
                    &[user],
                )
                .await,
        );
        eprintln!("{user}: {served} served over three replicas, {spent} spent");
        assert!(
            spent >= cap,
            "{user}: spent {spent} stopped short of the cap"
        );
        assert!(
            spent <= cap + dearest,
            "{user}: spent {spent} > cap + one call"
        );
    }
}
