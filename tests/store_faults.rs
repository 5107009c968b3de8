//! The embedded database misbehaving under traffic: a SQLite file locked by another process.
//! (PostgreSQL stopping under traffic is in tests/replicas.rs.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mock::{MockResponse, MockUpstream};
use common::server::{skip_on_postgres, Tollgate};
use serde_json::{json, Value};
use sqlx::Connection;

async fn readyz(client: &reqwest::Client, tg: &Tollgate) -> (u16, Value) {
    let resp = client
        .get(format!("{}/readyz", tg.admin))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_sqlite_file_holds_records_reports_not_ready_and_loses_nothing() {
    if skip_on_postgres("locks the SQLite file itself") {
        return;
    }
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .extra("[limits]\nrequests_per_minute = 0")
        .start()
        .await;
    let key = tg.user_key("writer");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    assert_eq!(readyz(&client, &tg).await.0, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let other = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (client, url, key) = (
            client.clone(),
            format!("{}/openai/v1/chat/completions", tg.gateway),
            key.clone(),
        );
        let (stop, ok, other) = (stop.clone(), ok.clone(), other.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let status = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    other.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Another process takes the write lock and keeps it (as a backup tool or a stuck
    // migration would): Tollgate's writes wait out busy_timeout (5 s) and fail.
    let url = format!("sqlite://{}", tg.db_path.display());
    let mut locker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    let locked = Instant::now();
    let mut reported = None;
    while locked.elapsed() < Duration::from_secs(8) {
        let (status, body) = readyz(&client, &tg).await;
        if status == 503 && reported.is_none() {
            reported = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served_while_locked = ok.load(Ordering::Relaxed);
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    locker.close().await.unwrap();
    let reported = reported.expect("/readyz reported the failing writes while the file was locked");
    let why = reported["recorder"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("cannot write interceptions"), "{reported}");
    assert!(why.contains("locked"), "{reported}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let served = ok.load(Ordering::Relaxed);
    assert_eq!(other.load(Ordering::Relaxed), 0, "traffic was unaffected");
    assert!(
        served_while_locked > 50,
        "served {served_while_locked} while locked"
    );
    // Nothing lost, nothing twice; and readiness comes back.
    tg.wait_for_interceptions(served as i64).await;
    let n: i64 = tg.scalar("SELECT COUNT(*) FROM interceptions", &[]).await;
    assert_eq!(n as usize, served);
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz(&client, &tg).await.0 != 200 {
        assert!(Instant::now() < deadline, "/readyz never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("locked for 8 s: {served} served, all recorded; /readyz said: {why}");
}
