//! The per-request governance decision, as the gateway makes it: Tollgate key cache hit
//! (SHA-256 of the key + map lookup), request-rate and concurrency limits, price lookup, budget
//! reservation, then settlement.
//!
//! Run with `cargo bench --bench governance`. Target (issue 3): at most 10 µs median.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::auth::KeyCache;
use tollgate::config::Config;
use tollgate::governance::{CostRequest, Governance};
use tollgate::providers::{InputShape, TokenUsage};
use tollgate::store::{hash_key, Principal};
use uuid::Uuid;

fn decision(c: &mut Criterion) {
    let config = Config::from_parts(
        "bench",
        Some("[budgets]\ndefault_limit_usd = \"1000000.00\"\n[limits]\nrequests_per_minute = 1000000\nmax_concurrent = 64\n"),
        &[],
    )
    .expect("bench config");
    let governance = Governance::new(&config);
    let keys = KeyCache::new(Duration::from_secs(3600));
    // Many users, as in production: each one's request rate stays far below its limit even at
    // benchmark speed, so every iteration takes the admit path.
    let secrets: Vec<String> = (0..10_000).map(|i| format!("tg_{i:048x}")).collect();
    for secret in &secrets {
        let principal = Arc::new(Principal {
            user_id: Uuid::new_v4(),
            username: "bench".into(),
            is_admin: false,
            group_ids: vec![Uuid::new_v4(), Uuid::new_v4()],
            api_key_id: Uuid::new_v4(),
        });
        keys.insert(hash_key(secret), Some(principal));
    }
    let mut next = 0usize;
    let input = InputShape::default();
    // The Anthropic fixture's usage (14_205_000 nano-USD).
    let usage = TokenUsage {
        input: 420,
        output: 233,
        cache_read: 9000,
        cache_write: 1800,
        reasoning: 0,
    };

    c.bench_function("governance_decision", |b| {
        b.iter(|| {
            next = (next + 1) % secrets.len();
            let secret = secrets[next].as_str();
            let p = keys
                .cached(&hash_key(black_box(secret)))
                .flatten()
                .expect("cache hit");
            let permit = governance
                .check_rate(p.user_id)
                .expect("under the rate limit");
            let request = CostRequest {
                model: black_box("claude-sonnet-4-5-20250929"),
                price_family: Some("anthropic"),
                body_bytes: 4_000,
                max_output_tokens: Some(1024),
                choices: None,
                input: &input,
            };
            let admission = governance
                .admit(&p, &request, Utc::now())
                .expect("within budget");
            governance.settle(admission, &usage, None);
            drop(black_box(permit));
        })
    });
}

criterion_group!(benches, decision);
criterion_main!(benches);
