//! The shipped Grafana dashboard (`config/grafana/tollgate.json`) against the real binary: every
//! metric its PromQL queries name must be exported by `/metrics` once traffic has flowed, so a
//! renamed metric cannot leave a panel silently empty.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::client::http;
use common::mock::{MockResponse, MockUpstream};
use common::server::Tollgate;
use serde_json::{json, Value};

const KEY_A: &str = "sk-pool-aaaaaaaaaaaaaaaa-key1";
const KEY_B: &str = "sk-pool-bbbbbbbbbbbbbbbb-key2";

/// Every `expr` string anywhere in the dashboard (panels nest inside rows).
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
        _ => {}
    }
}

/// The `tollgate_…` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("tollgate_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.insert(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Metric names with at least one sample in Prometheus text; a histogram's samples are its
/// `_bucket`, `_sum` and `_count` series, which is also how PromQL names them.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(String::from))
        .collect()
}

#[test]
fn metric_names_are_parsed_out_of_promql() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(tollgate_overhead_seconds_bucket[5m]))) / max(tollgate_seats_limit)",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["tollgate_overhead_seconds_bucket", "tollgate_seats_limit"]
    );
    assert!(metric_names("sum(rate(not_tollgate_x[1m]))").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/grafana/tollgate.json"
        ))
        .expect("config/grafana/tollgate.json"),
    )
    .expect("the dashboard is JSON");
    let mut all = Vec::new();
    exprs(&dashboard["panels"], &mut all);
    assert!(
        all.len() >= 20,
        "the dashboard has too few queries: {all:?}"
    );
    let wanted: BTreeSet<String> = all.iter().flat_map(|e| metric_names(e)).collect();

    // One mock plays every upstream: key A of the pool is rate limited (a failover), Anthropic
    // is overloaded (the breaker trips), and `/slow` answers too late (a first-byte timeout).
    let upstream = MockUpstream::start(|r| {
        let auth = r.header("authorization").unwrap_or_default();
        match r.path_without_query() {
            p if p.starts_with("/slow") => {
                MockResponse::fixture("openai-chat.json").first_byte_delay(Duration::from_secs(2))
            }
            "/v1/chat/completions" if auth.contains(KEY_A) => {
                MockResponse::fixture("openai-error-ratelimit.json")
                    .status(429)
                    .header("retry-after", "60")
            }
            "/v1/chat/completions" => MockResponse::fixture("openai-chat.json"),
            "/v1/models" => MockResponse::json(200, json!({"object": "list", "data": []})),
            "/v1/messages" => MockResponse::fixture("anthropic-error-overloaded.json").status(529),
            other => MockResponse::json(500, json!({"unexpected": other})),
        }
    })
    .await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        .provider("slow", "openai", &format!("{}/slow", upstream.base_url()))
        .provider_extra("openai", "api_key_envs = [\"POOL_B\"]")
        .provider_extra("slow", "first_byte_timeout_ms = 200")
        .provider_extra(
            "anthropic",
            "[providers.anthropic.breaker]\nenabled = true\nfailure_threshold = 1\nopen_ms = 60000",
        )
        .env("TEST_OPENAI_KEY", KEY_A)
        .env("POOL_B", KEY_B)
        .extra("[seats]\nlimit = 10")
        .start()
        .await;
    let key = tg.user_key("alice");
    let client = http();
    let post = |path: &str, key: &str, body: Value| {
        client
            .post(format!("{}{path}", tg.gateway))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let messages = json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}]});

    assert_eq!(
        post("/openai/v1/chat/completions", &key, chat.clone())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("/openai/v1/chat/completions", &key, chat.clone())
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("/anthropic/v1/messages", &key, messages.clone())
            .await
            .unwrap()
            .status(),
        529
    );
    assert_eq!(
        post("/anthropic/v1/messages", &key, messages)
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        post("/slow/v1/chat/completions", &key, chat.clone())
            .await
            .unwrap()
            .status(),
        504
    );
    assert_eq!(
        post("/openai/v1/chat/completions", "tg_not_a_key", chat)
            .await
            .unwrap()
            .status(),
        401
    );
    let models = client
        .get(format!("{}/openai/v1/models", tg.gateway))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    tg.wait_until_recorded(4).await;

    // The seat gauges come from a refresh every 2 s; wait for everything rather than sleep.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = common::server::metrics(&tg).await;
        let have = exported(&text);
        let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard queries metrics /metrics does not export: {missing:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The check above is only as good as its list: the dashboard covers each area it promises.
    for area in [
        "tollgate_interceptions_total",
        "tollgate_overhead_seconds_bucket",
        "tollgate_tokens_total",
        "tollgate_cost_nano_usd_total",
        "tollgate_refusals_total",
        "tollgate_proxy_connects_total",
        "tollgate_recorder_queue_depth",
        "tollgate_recorder_dropped_total",
        "tollgate_breaker_state",
        "tollgate_provider_key_failovers_total",
    ] {
        assert!(wanted.contains(area), "the dashboard does not query {area}");
    }
}
