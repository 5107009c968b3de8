//! Governance seen from outside: budgets under concurrency, precedence, unpriced models, rate
//! and concurrency limits, budget headers, key policy with stored keys, seats.

mod common;

use std::time::{Duration, Instant};

use common::mock::{MockResponse, MockUpstream};
use common::server::{Tollgate, ANTHROPIC_CENTRAL_KEY};
use serde_json::{json, Value};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap()
}

fn messages_request() -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Fix the flaky test."}]
    })
}

/// One blocking Anthropic fixture call costs 14_205_000 nano-USD (see tests/gateway.rs).
const CALL_COST: i64 = 14_205_000;

async fn user_id(tg: &Tollgate, name: &str) -> String {
    tg.scalar(
        "SELECT CAST(id AS TEXT) FROM users WHERE username = ?",
        &[name],
    )
    .await
}

async fn total_spend(tg: &Tollgate) -> i64 {
    tg.scalar(
        "SELECT CAST(COALESCE(SUM(cost_nano_usd), 0) AS BIGINT) FROM interceptions",
        &[],
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_200_requests_cannot_spend_past_the_cap() {
    let upstream = MockUpstream::always(
        MockResponse::fixture("anthropic-messages.json")
            .first_byte_delay(Duration::from_millis(30)),
    )
    .await;
    // $0.15 covers 10 calls (10 × $0.014205 = $0.14205); the 11th would pass the cap.
    let cap: i64 = 150_000_000;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[budgets]\ndefault_limit_usd = \"0.15\"\n[limits]\nrequests_per_minute = 0")
        .start()
        .await;
    let key = tg.user_key("burst");
    let client = http();
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(&url)
                .header("x-api-key", &key)
                .json(&messages_request())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let reset = resp
                .headers()
                .get("x-tollgate-budget-reset")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = resp.json().await.unwrap();
            (status, reset, body)
        }));
    }
    let mut served = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, reset, body) = t.await.unwrap();
        match status {
            200 => served += 1,
            402 => {
                refused += 1;
                assert_eq!(body["type"], "error", "{body}");
                assert_eq!(body["error"]["type"], "billing_error", "{body}");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(
                    message.contains("default limit") && message.contains("resets at"),
                    "{message}"
                );
                let reset = reset.expect("402 carries x-tollgate-budget-reset");
                assert!(
                    chrono::DateTime::parse_from_rfc3339(&reset).is_ok(),
                    "{reset}"
                );
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(served + refused, 200);
    assert_eq!(
        upstream.request_count(),
        served,
        "refused requests never reached the upstream"
    );
    // In a burst, requests are admitted while their estimates fit: the estimate here is about
    // $0.0155 (1024 output tokens at $15/M plus the prompt), so 9 fit under $0.15.
    assert!(served >= 9, "only {served} served");
    // Afterwards, one at a time, the rest of the budget is used until the cap is reached.
    let mut later = 0;
    loop {
        let resp = client
            .post(&url)
            .header("x-api-key", &key)
            .json(&messages_request())
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => later += 1,
            402 => break,
            other => panic!("unexpected {other}"),
        }
        assert!(later < 10, "the cap never stopped sequential requests");
    }
    tg.wait_until_recorded((served + later) as i64).await;
    let spent = total_spend(&tg).await;
    assert_eq!(spent, (served + later) as i64 * CALL_COST);
    // The documented bound: at most one request's cost beyond the cap, and the cap is used up.
    assert!(
        spent <= cap + CALL_COST,
        "spent {spent} > cap {cap} + one call"
    );
    assert!(spent >= cap, "spent {spent} stopped short of the cap {cap}");
}

#[tokio::test(flavor = "multi_thread")]
async fn caps_follow_precedence_and_changes_apply_within_seconds() {
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[budgets]\ndefault_limit_usd = \"100.00\"\ngroup_policy = \"highest\"")
        .start()
        .await;
    let out = tg.cli(&[
        "users", "create", "gina", "--group", "eng", "--group", "ops",
    ]);
    assert!(out.status.success(), "{out:?}");
    let key = String::from_utf8(tg.cli(&["keys", "create", "--user", "gina"]).stdout)
        .unwrap()
        .trim()
        .to_string();
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let client = http();
    let headers = |resp: &reqwest::Response| {
        let h = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        (h("x-tollgate-budget-scope"), h("x-tollgate-budget-limit"))
    };
    let call = || {
        client
            .post(&url)
            .header("x-api-key", &key)
            .json(&messages_request())
            .send()
    };

    let resp = call().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(headers(&resp), ("default".into(), "100.00".into()));
    assert!(resp.headers().contains_key("x-tollgate-budget-remaining"));
    assert!(resp.headers().contains_key("x-tollgate-budget-spent"));

    // Two group caps: the highest wins; then a user override beats both. Written straight
    // into the table, as another replica or an operator's SQL would.
    let gina = user_id(&tg, "gina").await;
    let epoch = if common::server::on_postgres() {
        "to_timestamp(0)"
    } else {
        "0"
    };
    for (group, limit) in [("eng", 5_000_000_000i64), ("ops", 7_000_000_000)] {
        tg.execute(
            &format!("INSERT INTO spend_limits (scope, scope_id, limit_nano_usd, updated_at) SELECT 'group', CAST(id AS TEXT), {limit}, {epoch} FROM groups WHERE name = ?"),
            &[group],
        )
        .await;
    }
    let wait_for = |scope: &'static str, limit: &'static str| {
        let call = &call;
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let resp = call().await.unwrap();
                let got = headers(&resp);
                if got == (scope.to_string(), limit.to_string()) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "still {got:?}, want {scope} {limit}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_for("group", "7.00").await;
    tg.execute(
        &format!("INSERT INTO spend_limits (scope, scope_id, limit_nano_usd, updated_at) VALUES ('user', ?, 1000000000, {epoch})"),
        &[gina.as_str()],
    )
    .await;
    wait_for("user", "1.00").await;
    // A user override of zero refuses at once.
    tg.execute(
        "UPDATE spend_limits SET limit_nano_usd = 0 WHERE scope = 'user'",
        &[],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = call().await.unwrap();
        if resp.status() == 402 {
            assert_eq!(resp.headers()["x-tollgate-budget-scope"], "user");
            break;
        }
        assert!(Instant::now() < deadline, "a zero cap was not applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unpriced_models_are_flagged_or_refused() {
    // The upstream answers with the same unknown model name (a priced response model would be
    // used to price an alias).
    let mut answer: Value =
        serde_json::from_slice(&common::mock::fixture_bytes("openai-chat.json")).unwrap();
    answer["model"] = json!("in-house-model-7");
    let upstream = MockUpstream::always(MockResponse::json(200, answer)).await;
    let body =
        json!({"model": "in-house-model-7", "messages": [{"role": "user", "content": "hi"}]});

    let allow = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .start()
        .await;
    let key = allow.user_key("ursula");
    let resp = http()
        .post(format!("{}/openai/v1/chat/completions", allow.gateway))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    allow.wait_until_recorded(1).await;
    let priced: bool = allow.scalar("SELECT priced FROM interceptions", &[]).await;
    let cost: i64 = allow
        .scalar("SELECT cost_nano_usd FROM interceptions", &[])
        .await;
    assert_eq!(
        (priced, cost),
        (false, 0),
        "recorded, flagged as unpriced, no cost"
    );
    let metrics = common::server::metrics(&allow).await;
    assert!(
        metrics.contains(
            "tollgate_unpriced_interceptions_total{provider=\"openai\",model=\"unpriced\"} 1"
        ),
        "{metrics}"
    );

    let deny = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .extra("[budgets]\nunpriced = \"deny\"")
        .start()
        .await;
    let key = deny.user_key("victor");
    let before = upstream.request_count();
    let resp = http()
        .post(format!("{}/openai/v1/chat/completions", deny.gateway))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(v["error"]["code"], "model_not_priced");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("in-house-model-7"));
    assert_eq!(upstream.request_count(), before);
    // A priced model still goes through under deny.
    let ok = json!({"model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": "hi"}]});
    let resp = http()
        .post(format!("{}/openai/v1/chat/completions", deny.gateway))
        .bearer_auth(&key)
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_prices_from_config_override_the_book() {
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra(
            "[[pricing.models]]\nmodel = \"claude-sonnet-4-5-20250929\"\ninput = \"1.00\"\noutput = \"2.00\"\ncache_read = \"0.10\"\ncache_write = \"1.00\"",
        )
        .start()
        .await;
    let key = tg.user_key("olga");
    let resp = http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .header("x-api-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tg.wait_until_recorded(1).await;
    let cost: i64 = tg
        .scalar("SELECT cost_nano_usd FROM interceptions", &[])
        .await;
    let input: i64 = tg
        .scalar("SELECT price_input FROM interceptions", &[])
        .await;
    let output: i64 = tg
        .scalar("SELECT price_output FROM interceptions", &[])
        .await;
    // 420×1 + 233×2 + 9000×0.10 + 1800×1 = 3586 USD per million tokens → 3_586_000 nano-USD
    assert_eq!(cost, 3_586_000);
    assert_eq!(
        (input, output),
        (1_000_000_000, 2_000_000_000),
        "the prices used are stored with the record"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_and_concurrency_limits_answer_429_with_retry_after() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .extra("[limits]\nrequests_per_minute = 3")
        .start()
        .await;
    let key = tg.user_key("rita");
    let other = tg.user_key("sam");
    let url = format!("{}/openai/v1/chat/completions", tg.gateway);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        assert_eq!(
            http()
                .post(&url)
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let resp = http()
        .post(&url)
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(upstream.request_count(), 3);
    // Limits are per user.
    assert_eq!(
        http()
            .post(&url)
            .bearer_auth(&other)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let slow = MockUpstream::always(
        MockResponse::fixture("anthropic-messages.json")
            .first_byte_delay(Duration::from_millis(800)),
    )
    .await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &slow.base_url())
        .extra("[limits]\nmax_concurrent = 1")
        .start()
        .await;
    let key = tg.user_key("tina");
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let first = {
        let (url, key) = (url.clone(), key.clone());
        tokio::spawn(async move {
            http()
                .post(&url)
                .header("x-api-key", &key)
                .json(&messages_request())
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = http()
        .post(&url)
        .header("x-api-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(first.await.unwrap(), 200);
    // The slot is free again once the first request ended.
    assert_eq!(
        http()
            .post(&url)
            .header("x-api-key", &key)
            .json(&messages_request())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn central_key_fallback_and_seat_gauges() {
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[keys]\ncentral_api_key_enabled = true\nallow_user_api_key = true\nallow_central_api_key_fallback = true\n[seats]\nlimit = 10")
        .start()
        .await;
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    // C=1 U=1 F=1: with a user key it is used, without one the central key is.
    let key = tg.user_key("walt");
    let resp = http()
        .post(&url)
        .header("x-tollgate-key", &key)
        .header("x-api-key", "sk-ant-walt-own-5555")
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream.last_request().header("x-api-key"),
        Some("sk-ant-walt-own-5555")
    );
    let resp = http()
        .post(&url)
        .header("x-tollgate-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream.last_request().header("x-api-key"),
        Some(ANTHROPIC_CENTRAL_KEY)
    );
    let key2 = tg.user_key("xena");
    assert_eq!(
        http()
            .post(&url)
            .header("x-api-key", &key2)
            .json(&messages_request())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tg.wait_until_recorded(3).await;
    let kinds: Vec<String> = tg
        .column("SELECT credential_kind FROM interceptions ORDER BY id", &[])
        .await;
    assert_eq!(kinds, ["byok", "central", "central"]);
    // Two users have used AI: two seats of ten.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let metrics = common::server::metrics(&tg).await;
        if metrics.contains("tollgate_seats_used 2") && metrics.contains("tollgate_seats_limit 10")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seat gauges not updated:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_personal_keys_are_encrypted_and_used_by_the_policy() {
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[keys]\ncentral_api_key_enabled = false\nallow_user_api_key = true\nallow_central_api_key_fallback = false")
        .env("TOLLGATE_SECRET_KEY", &"5a".repeat(32))
        .start()
        .await;
    let key = tg.user_key("yuri");
    let api = |path: &str| format!("{}/api/v2/users/me/{path}", tg.admin);
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let own = "sk-ant-yuri-stored-key-7777";

    // No key yet: C=0 U=1 → 403 user_api_key_required, nothing sent upstream.
    let resp = http()
        .post(&url)
        .header("x-api-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(upstream.request_count(), 0);

    // Store one (write-only: the answer and the list show a hint only).
    let resp = http()
        .put(api("provider-keys/anthropic"))
        .bearer_auth(&key)
        .json(&json!({"api_key": own}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(own) && text.contains("sk-…7777"), "{text}");
    let list: Value = http()
        .get(api("provider-keys"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["keys"][0]["provider"], "anthropic");
    assert_eq!(list["keys"][0]["hint"], "sk-…7777");
    assert!(!list.to_string().contains(own));
    assert_eq!(
        http()
            .put(api("provider-keys/nope"))
            .bearer_auth(&key)
            .json(&json!({"api_key": own}))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        http()
            .put(api("provider-keys/anthropic"))
            .bearer_auth(&key)
            .body("not json")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );

    // The stored key is now the credential; one sent with the request wins over it.
    let resp = http()
        .post(&url)
        .header("x-api-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last_request().header("x-api-key"), Some(own));
    let resp = http()
        .post(&url)
        .header("x-tollgate-key", &key)
        .header("x-api-key", "sk-ant-sent-8888")
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream.last_request().header("x-api-key"),
        Some("sk-ant-sent-8888")
    );

    // Encrypted at rest: the plaintext is nowhere in the database file.
    tg.wait_until_recorded(2).await;
    let kinds: Vec<String> = tg
        .column("SELECT credential_kind FROM interceptions ORDER BY id", &[])
        .await;
    let hint_texts: Vec<String> = tg
        .column("SELECT credential_hint FROM interceptions ORDER BY id", &[])
        .await;
    let hints: Vec<(String, String)> = kinds.into_iter().zip(hint_texts).collect();
    assert_eq!(
        hints,
        [
            ("byok".to_string(), "sk-…7777".to_string()),
            ("byok".to_string(), "sk-…8888".to_string())
        ]
    );
    let ciphertext: Vec<u8> = tg.scalar("SELECT ciphertext FROM provider_keys", &[]).await;
    assert!(!ciphertext.windows(own.len()).any(|w| w == own.as_bytes()));
    // The file scan is SQLite's; under PostgreSQL the column check above is what we can see.
    if !common::server::on_postgres() {
        let mut raw = std::fs::read(&tg.db_path).unwrap();
        raw.extend(std::fs::read(tg.db_path.with_extension("db-wal")).unwrap_or_default());
        assert!(
            !raw.windows(own.len()).any(|w| w == own.as_bytes()),
            "plaintext key found in the database files"
        );
    }

    // Deleted: back to 403.
    assert_eq!(
        http()
            .delete(api("provider-keys/anthropic"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        http()
            .delete(api("provider-keys/anthropic"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let resp = http()
        .post(&url)
        .header("x-api-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let (_, logs) = tg.stop().await;
    assert!(
        !logs.join("\n").contains(own),
        "a stored key appeared in the logs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn my_budget_reports_cap_spend_scope_and_reset() {
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[budgets]\nperiod = \"day\"\ndefault_limit_usd = \"1.00\"")
        .start()
        .await;
    let key = tg.user_key("zoe");
    let me = || {
        http()
            .get(format!("{}/api/v2/users/me/budget", tg.admin))
            .bearer_auth(&key)
            .send()
    };
    let v: Value = me().await.unwrap().json().await.unwrap();
    assert_eq!(
        (
            v["limit_usd"].as_str(),
            v["spent_nano_usd"].as_i64(),
            v["scope"].as_str()
        ),
        (Some("1.00"), Some(0), Some("default"))
    );
    assert_eq!(v["period"], "day");
    let resp = http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .header("x-api-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The response headers and the API agree.
    assert_eq!(resp.headers()["x-tollgate-budget-limit"], "1.00");
    let v: Value = me().await.unwrap().json().await.unwrap();
    assert_eq!(v["spent_nano_usd"], CALL_COST);
    assert_eq!(v["remaining_nano_usd"], 1_000_000_000 - CALL_COST);
    assert_eq!(v["remaining_usd"], "0.985795");
    let reset = chrono::DateTime::parse_from_rfc3339(v["reset_at"].as_str().unwrap()).unwrap();
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    assert_eq!(
        reset, tomorrow,
        "a daily budget resets at the next UTC midnight"
    );
    assert_eq!(
        http()
            .get(format!("{}/api/v2/users/me/budget", tg.admin))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // An admin lowers zoe's cap through the API: the very next request is refused.
    let admin = tg.admin_key("root");
    let zoe = user_id(&tg, "zoe").await;
    let resp = http()
        .put(format!("{}/api/v2/budgets", tg.admin))
        .bearer_auth(&admin)
        .json(&json!({"scope": "user", "scope_id": zoe, "limit_usd": "0.01"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let resp = http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .header("x-api-key", &key)
        .json(&messages_request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 402);
    assert_eq!(resp.headers()["x-tollgate-budget-scope"], "user");
    let v: Value = me().await.unwrap().json().await.unwrap();
    assert_eq!(
        (
            v["scope"].as_str(),
            v["limit_usd"].as_str(),
            v["remaining_nano_usd"].as_i64()
        ),
        (Some("user"), Some("0.01"), Some(0))
    );
    // Without a user-key policy, storing a key is refused with a reason.
    let resp = http()
        .put(format!(
            "{}/api/v2/users/me/provider-keys/anthropic",
            tg.admin
        ))
        .bearer_auth(&key)
        .json(&json!({"api_key": "sk-ant-x-1234"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
}

#[tokio::test(flavor = "multi_thread")]
async fn spend_survives_a_restart() {
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let keep = tempfile::tempdir().unwrap();
    let db = keep.path().join("state.db");
    let config = "[budgets]\ndefault_limit_usd = \"0.02\"";
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .database(&db)
        .extra(config)
        .start()
        .await;
    let key = tg.user_key("ava");
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    assert_eq!(
        http()
            .post(&url)
            .header("x-api-key", &key)
            .json(&messages_request())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tg.wait_until_recorded(1).await;
    let db_url = tg.db_url.clone();
    let (clean, _) = tg.stop().await;
    assert!(clean);
    // A new process on the same database knows ava already spent $0.014205 of her $0.02.
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .database_url(&db_url)
        .extra(config)
        .start()
        .await;
    let me: Value = http()
        .get(format!("{}/api/v2/users/me/budget", tg.admin))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["spent_nano_usd"], CALL_COST);
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    // One more request is admitted (she is under the cap), which takes her past it; then 402.
    assert_eq!(
        http()
            .post(&url)
            .header("x-api-key", &key)
            .json(&messages_request())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http()
            .post(&url)
            .header("x-api-key", &key)
            .json(&messages_request())
            .send()
            .await
            .unwrap()
            .status(),
        402
    );
}
