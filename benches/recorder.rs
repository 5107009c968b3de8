//! Recorder throughput: interceptions per second from `Recorder::submit` to committed rows, on
//! SQLite and (when `TOLLGATE_BENCH_DATABASE_URL` names a PostgreSQL maintenance database, e.g.
//! the one `scripts/test-postgres start` prints) on PostgreSQL in a fresh database that is
//! dropped afterwards.
//!
//! Each run queues `TOLLGATE_BENCH_RECORDS` (default 50,000) realistic records (prompt on most,
//! a tool call on a third, a thought on a fifth) with the default recorder settings (queue
//! 65,536, batch 512), drains, and checks that every record landed. The figure includes the
//! queue, batching, the multi-row inserts of interceptions and child rows, and the commits.
//! Run with `cargo bench --bench recorder`.
//!
//! On PostgreSQL it also times what sharing a budget between replicas costs a capped request:
//! the reservation at admission (`tollgate_reserve`) and the settle before the last byte, each
//! one round trip, sequentially for 2,000 requests of 50 users; it reports p50/p99 per request.

use std::time::Instant;

use chrono::Utc;
use tollgate::config::RecorderConfig;
use tollgate::governance::pricing::ModelPrice;
use tollgate::money::NanoUsd;
use tollgate::providers::{Thought, ThoughtSource, TokenUsage, ToolCall};
use tollgate::store::{CredentialKind, InterceptionRecord, InterceptionStatus, Recorder, Store};
use uuid::Uuid;

fn records(n: usize, users: &[Uuid]) -> Vec<InterceptionRecord> {
    let price = ModelPrice {
        input: NanoUsd(3_000_000_000),
        output: NanoUsd(15_000_000_000),
        cache_read: NanoUsd(300_000_000),
        cache_write: NanoUsd(3_750_000_000),
        output_limit: None,
    };
    let now = Utc::now();
    (0..n)
        .map(|i| {
            let id = Uuid::now_v7();
            let usage = TokenUsage {
                input: 1_000 + (i as u64 % 500),
                output: 200 + (i as u64 % 300),
                cache_read: 4_096,
                cache_write: 0,
                reasoning: 0,
            };
            InterceptionRecord {
                id,
                user_id: users[i % users.len()],
                api_key_id: None,
                provider: "anthropic".into(),
                provider_kind: "anthropic",
                endpoint: "messages",
                model: "claude-sonnet-4-5".into(),
                response_model: Some("claude-sonnet-4-5-20250929".into()),
                client: "Claude Code",
                client_session_id: Some(format!("sess-{}", i / 8)),
                session_key: format!("sess-{}", i / 8),
                thread_parent_id: None,
                thread_root_id: None,
                credential_kind: CredentialKind::Central,
                credential_hint: Some("sk-…abcd".into()),
                status: InterceptionStatus::Completed,
                upstream_status: Some(200),
                error: None,
                streaming: i % 2 == 0,
                started_at: now,
                ended_at: now + chrono::Duration::milliseconds(1_500),
                ttfb_ms: Some(350),
                response_id: Some(format!("msg_{id}")),
                usage,
                usage_source: Default::default(),
                prompt: (i % 4 != 0).then(|| format!("Please fix issue {i} in src/lib.rs.")),
                tool_calls: if i % 3 == 0 {
                    vec![ToolCall {
                        id: format!("toolu_{i}"),
                        name: "read_file".into(),
                        input: r#"{"path":"src/lib.rs"}"#.into(),
                    }]
                } else {
                    Vec::new()
                },
                thoughts: if i % 5 == 0 {
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
            }
        })
        .collect()
}

/// Queues every record, drains, and returns records per second.
async fn run(name: &str, store: Store, n: usize) -> f64 {
    store.migrate().await.expect("migrate");
    let mut users = Vec::new();
    for u in 0..50 {
        users.push(
            store
                .create_user(&format!("bench{u}"), false, &[])
                .await
                .expect("user")
                .id,
        );
    }
    let batch = records(n, &users);
    let before = store.count_interceptions().await.expect("count");
    let config = RecorderConfig {
        queue_capacity: 65_536,
        batch_size: 512,
        spill_dir: std::env::temp_dir().join("tollgate-bench-spill"),
        spill_max_bytes: 0,
        spill_after: std::time::Duration::from_secs(2),
        journal_dir: None,
        journal_sync: std::time::Duration::from_millis(10),
    };
    let started = Instant::now();
    let (recorder, handle) = Recorder::start(store.clone(), config);
    for r in batch {
        // The queue is sized above n; a refusal would be a bench bug, not backpressure.
        assert!(recorder.submit(r), "queue full");
    }
    drop(recorder);
    handle.drain().await;
    let elapsed = started.elapsed();
    let after = store.count_interceptions().await.expect("count");
    assert_eq!((after - before) as usize, n, "{name}: every record written");
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "recorder/{name}: {n} interceptions in {:.2} s = {:.0} interceptions/s",
        elapsed.as_secs_f64(),
        rate
    );
    rate
}

/// Writes `n` records in batches of uneven sizes (1 to 300, as the recorder's 20 ms linger
/// makes them under live traffic) straight through the store, and returns records per second.
/// Unlike [`run`], whose batches are all full, this shows what preparing statements of many
/// shapes costs.
async fn run_uneven(name: &str, store: &Store, n: usize) -> f64 {
    let mut users: Vec<Uuid> = vec![Uuid::nil(); 50];
    for (u, slot) in users.iter_mut().enumerate() {
        *slot = store
            .create_user(&format!("uneven{u}"), false, &[])
            .await
            .expect("user")
            .id;
    }
    let all = records(n, &users);
    let before = store.count_interceptions().await.expect("count");
    // A fixed pseudo-random sequence of sizes, the same on every run.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let started = Instant::now();
    let mut rest = all.as_slice();
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (1 + (state % 300) as usize).min(rest.len());
        let (batch, tail) = rest.split_at(take);
        store.insert_interceptions(batch).await.expect("insert");
        rest = tail;
    }
    let elapsed = started.elapsed();
    let after = store.count_interceptions().await.expect("count");
    assert_eq!((after - before) as usize, n, "{name}: every record written");
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "recorder/{name}-uneven-batches: {n} interceptions in {:.2} s = {:.0} interceptions/s ({:.1} µs each)",
        elapsed.as_secs_f64(),
        rate,
        elapsed.as_secs_f64() * 1e6 / n as f64
    );
    rate
}

/// Reserve + settle round trips, as a capped request on PostgreSQL makes them.
async fn shared_admission(store: &Store) {
    let users: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let replica = Uuid::new_v4();
    let period = Utc::now();
    let mut reserve = Vec::with_capacity(2_000);
    let mut settle = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let id = Uuid::now_v7();
        let t = Instant::now();
        let r = store
            .reserve_shared(
                id,
                users[i % users.len()],
                period,
                NanoUsd(1_000_000_000_000),
                NanoUsd(15_000_000),
                false,
                replica,
                std::time::Duration::from_secs(30),
            )
            .await
            .expect("reserve")
            .expect("postgres");
        assert!(r.admitted);
        reserve.push(t.elapsed());
        let t = Instant::now();
        store
            .settle_shared(id, NanoUsd(14_205_000))
            .await
            .expect("settle");
        settle.push(t.elapsed());
    }
    for (what, mut v) in [("reserve", reserve), ("settle", settle)] {
        v.sort();
        println!(
            "shared_admission/{what}: p50 {:.0} µs, p99 {:.0} µs ({} capped requests, loopback PostgreSQL)",
            v[v.len() / 2].as_secs_f64() * 1e6,
            v[v.len() * 99 / 100].as_secs_f64() * 1e6,
            v.len()
        );
    }
}

fn main() {
    let n: usize = std::env::var("TOLLGATE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/bench.db", dir.path().display());
        let store = Store::connect(&url, 4).await.expect("open sqlite");
        run("sqlite", store.clone(), n).await;
        run_uneven("sqlite", &store, n).await;

        match std::env::var("TOLLGATE_BENCH_DATABASE_URL") {
            Ok(base) if !base.is_empty() => {
                use sqlx::Connection;
                let name = format!("tg_bench_{}", Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&base)
                    .await
                    .expect("connect to TOLLGATE_BENCH_DATABASE_URL");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .expect("create bench database");
                let root = base
                    .split_once('?')
                    .map(|(u, _)| u)
                    .unwrap_or(&base)
                    .rsplit_once('/')
                    .map(|(r, _)| r.to_string())
                    .expect("postgres://…/db");
                let store = Store::connect(&format!("{root}/{name}"), 8)
                    .await
                    .expect("open postgres");
                run("postgres", store.clone(), n).await;
                run_uneven("postgres", &store, n).await;
                shared_admission(&store).await;
                drop(store);
                // Give the pool a moment to close before dropping its database.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let _ = sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
            _ => println!(
                "recorder/postgres: skipped (set TOLLGATE_BENCH_DATABASE_URL to a PostgreSQL maintenance URL)"
            ),
        }
    });
}
