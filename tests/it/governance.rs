//! Governance seen from outside: budgets under concurrency, precedence, unpriced models, rate
//! and concurrency limits, budget headers, key policy with stored keys, seats; and the
//! attacks of a member who wants to spend past their cap (issue 14), each proving the bound
//! SECURITY.md states.

use crate::common;

use std::time::{Duration, Instant};

use common::client::http_untimed as http;
use common::client::messages_request;
use common::client::user_id;
use common::mock::{fixture_bytes, Chunking, MockResponse, MockUpstream};
use common::server::{Tollgate, ANTHROPIC_CENTRAL_KEY};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// One blocking Anthropic fixture call costs 14_205_000 nano-USD (see tests/it/gateway.rs).
pub(crate) const CALL_COST: i64 = 14_205_000;

/// The burst tests' cap, $0.15: it covers 10 fixture calls (10 × $0.014205 = $0.14205) and the
/// 11th would pass it. No rate limit, so only the cap refuses.
pub(crate) const TEN_CALL_CAP: &str =
    "[budgets]\ndefault_limit_usd = \"0.15\"\n[limits]\nrequests_per_minute = 0";
/// [`TEN_CALL_CAP`] in nano-USD.
pub(crate) const TEN_CALL_CAP_NANO: i64 = 150_000_000;

/// An Anthropic mock answering the fixture after 30 ms, behind a Tollgate capped at
/// [`TEN_CALL_CAP`].
async fn ten_call_capped_anthropic() -> (MockUpstream, Tollgate) {
    let upstream = MockUpstream::always(
        MockResponse::fixture("anthropic-messages.json")
            .first_byte_delay(Duration::from_millis(30)),
    )
    .await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra(TEN_CALL_CAP)
        .start()
        .await;
    (upstream, tg)
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
    let (upstream, tg) = ten_call_capped_anthropic().await;
    let cap = TEN_CALL_CAP_NANO;
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
    // In a burst, requests are admitted while their reservations fit. A reservation is the
    // most the request can cost: 1024 output tokens at $15/M plus every body byte and 512
    // tokens of overhead at the dearest input rate ($3.75/M), about $0.0178, so 8 fit under
    // $0.15.
    assert!(served >= 8, "only {served} served");
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

/// What a burst of `n` concurrent calls got: how many were served (200) and how many refused
/// with 402; any other answer fails the test.
async fn burst(n: usize, send: impl Fn() -> reqwest::RequestBuilder) -> (usize, usize) {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(send().send())).collect();
    let (mut served, mut refused) = (0, 0);
    for task in tasks {
        let resp = task.await.unwrap().unwrap();
        match resp.status().as_u16() {
            200 => served += 1,
            402 => refused += 1,
            other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
        }
    }
    (served, refused)
}

/// Recorded spend, and the dearest single interception, in nano-USD.
async fn spend_and_dearest(tg: &Tollgate) -> (i64, i64) {
    let dearest: i64 = tg
        .scalar(
            "SELECT CAST(COALESCE(MAX(cost_nano_usd), 0) AS BIGINT) FROM interceptions",
            &[],
        )
        .await;
    (total_spend(tg).await, dearest)
}

#[tokio::test(flavor = "multi_thread")]
async fn hanging_up_before_the_usage_event_is_charged_an_estimate() {
    // One event per write, 100 ms apart: the client takes the first and hangs up; the gateway
    // notices on its next writes, long before the usage chunk (the ninth of ten events).
    let upstream = MockUpstream::always(
        MockResponse::fixture("openai-chat-stream.sse")
            .chunking(Chunking::PerEvent)
            .delay(Duration::from_millis(100)),
    )
    .await;
    // A cap a few aborted calls exhaust: each is ~6,000 prompt tokens of gpt-4o (~$0.015).
    let cap: i64 = 50_000_000;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .extra("[budgets]\ndefault_limit_usd = \"0.05\"\n[limits]\nrequests_per_minute = 0")
        .start()
        .await;
    let key = tg.user_key("quitter");
    let prompt = "word ".repeat(6000);
    let body = json!({
        "model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": prompt}]
    });
    let (mut admitted, mut refused) = (0, 0);
    for _ in 0..10 {
        let resp = http()
            .post(format!("{}/openai/v1/chat/completions", tg.gateway))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => {
                admitted += 1;
                let mut stream = resp.bytes_stream();
                let first = stream.next().await.unwrap().unwrap();
                assert!(String::from_utf8_lossy(&first).contains("\"delta\""));
                drop(stream); // the answer started: the client hangs up before the usage
                tg.wait_until_recorded(admitted).await;
            }
            402 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    // Before: 10 of 10 delivered content and spend stayed 0.
    assert!(
        admitted < 10,
        "{admitted} admitted: aborting kept the budget"
    );
    assert_eq!(admitted + refused, 10);
    let rows: Vec<String> = tg
        .column(
            "SELECT status || ' ' || usage_source FROM interceptions",
            &[],
        )
        .await;
    assert!(
        rows.iter().all(|r| r == "client_aborted estimated"),
        "{rows:?}"
    );
    let (spent, dearest) = spend_and_dearest(&tg).await;
    let cheapest: i64 = tg
        .scalar(
            "SELECT CAST(MIN(cost_nano_usd) AS BIGINT) FROM interceptions",
            &[],
        )
        .await;
    assert!(
        cheapest > 0,
        "an aborted call that got content is never free"
    );
    assert!(spent >= cap, "spent {spent}: the cap was never reached");
    assert!(
        spent <= cap + dearest,
        "spent {spent} > cap {cap} + one call"
    );
    let estimated = metric_value(&tg, "tollgate_usage_source_total{source=\"estimated\"}").await;
    assert_eq!(estimated, admitted as f64);
    // The API and the dashboard say so too.
    let root = tg.admin_key("root");
    let listed: Value = http()
        .get(format!("{}/api/v2/aibridge/interceptions", tg.admin))
        .bearer_auth(&root)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        listed["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["usage_source"] == "estimated"),
        "{listed}"
    );
}

/// One Prometheus sample's value (0 when absent).
async fn metric_value(tg: &Tollgate, series: &str) -> f64 {
    common::server::metric_value(&common::server::metrics(tg).await, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_stream_a_broken_body_and_an_oversized_body_are_charged_too() {
    let stream = fixture_bytes("anthropic-messages-stream.sse");
    let mut oversized = fixture_bytes("anthropic-messages.json");
    // Past the 32 MiB a blocking body is parsed up to: whitespace is still valid JSON.
    let close = oversized.iter().rposition(|b| *b == b'}').unwrap();
    oversized.splice(close..close, std::iter::repeat_n(b' ', 33 << 20));
    let upstream = MockUpstream::sequence(vec![
        MockResponse::sse(stream.clone()).reset_after(stream.len() * 2 / 3),
        MockResponse::bytes(
            200,
            "application/json",
            b"{\"id\": \"msg_1\", \"content\": [".to_vec(),
        ),
        MockResponse::bytes(200, "application/json", oversized),
    ])
    .await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .start()
        .await;
    let key = tg.user_key("dana");
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let mut streamed = messages_request();
    streamed["stream"] = json!(true);
    for body in [streamed, messages_request(), messages_request()] {
        let resp = http()
            .post(&url)
            .header("x-api-key", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await;
    }
    tg.wait_until_recorded(3).await;
    let rows: Vec<String> = tg
        .column(
            "SELECT status || ' ' || usage_source || ' ' || CAST(cost_nano_usd > 0 AS TEXT) FROM interceptions ORDER BY id",
            &[],
        )
        .await;
    let yes = if common::server::on_postgres() {
        "true"
    } else {
        "1"
    };
    assert_eq!(
        rows,
        [
            format!("upstream_aborted estimated {yes}"),
            format!("completed estimated {yes}"),
            format!("completed estimated {yes}"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_alias_is_reserved_at_the_dearest_price_and_charged_as_the_model_that_answered() {
    // The upstream answers an alias the book lacks with a priced model (the fixture's).
    let (_upstream, tg) = ten_call_capped_anthropic().await;
    let cap = TEN_CALL_CAP_NANO;
    let key = tg.user_key("aliaser");
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let mut body = messages_request();
    body["model"] = json!("claude-sonnet-latest-alias");
    let client = http();
    let (served, refused) = burst(200, || {
        client.post(&url).header("x-api-key", &key).json(&body)
    })
    .await;
    // Before: reserved at $0, all 200 admitted (20x the cap).
    assert_eq!(served + refused, 200);
    let mut later = 0;
    loop {
        let resp = client
            .post(&url)
            .header("x-api-key", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => later += 1,
            402 => break,
            other => panic!("unexpected {other}"),
        }
        assert!(later <= 12, "the cap never stopped the alias");
    }
    tg.wait_until_recorded((served + later) as i64).await;
    let (spent, _) = spend_and_dearest(&tg).await;
    assert_eq!(
        spent,
        (served + later) as i64 * CALL_COST,
        "each call charged as the model that answered"
    );
    assert!(spent <= cap + CALL_COST, "spent {spent} > cap + one call");
    assert!(spent >= cap, "spent {spent} stopped short of the cap");
    let response_models: Vec<String> = tg
        .column("SELECT DISTINCT response_model FROM interceptions", &[])
        .await;
    assert_eq!(response_models, ["claude-sonnet-4-5-20250929"]);
}

/// A Responses answer whose usage is far larger than the request's body suggests (a long
/// conversation held by the provider): 400,000 input tokens of gpt-5, $0.50.
fn server_state_answer() -> Value {
    let mut answer: Value =
        serde_json::from_slice(&fixture_bytes("openai-responses.json")).unwrap();
    answer["usage"]["input_tokens"] = json!(400_000);
    answer["usage"]["input_tokens_details"]["cached_tokens"] = json!(0);
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tiny_body_with_server_side_context_runs_alone_under_a_cap() {
    let upstream = MockUpstream::always(
        MockResponse::json(200, server_state_answer()).first_byte_delay(Duration::from_millis(50)),
    )
    .await;
    // Each call costs $0.50: the cap is crossed by the second, and the third is refused.
    let cap: i64 = 800_000_000;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .extra("[budgets]\ndefault_limit_usd = \"0.80\"\n[limits]\nrequests_per_minute = 0")
        .start()
        .await;
    let key = tg.user_key("continuer");
    let url = format!("{}/openai/v1/responses", tg.gateway);
    let body = json!({
        "model": "gpt-5", "input": "continue", "max_output_tokens": 16,
        "previous_response_id": "resp_earlier_and_very_long"
    });
    let client = http();
    let (served, refused) = burst(200, || client.post(&url).bearer_auth(&key).json(&body)).await;
    // Before: its bytes promised ~$0.0002, so all 200 ran ($100 against a $0.80 cap). Now one
    // runs at a time, and only while spend is under the cap: two in all.
    assert!(served <= 2, "{served} unbounded requests ran");
    assert_eq!(served + refused, 200);
    let mut later = 0;
    loop {
        let resp = client
            .post(&url)
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => later += 1,
            402 => {
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
                break;
            }
            other => panic!("unexpected {other}"),
        }
        assert!(
            served + later <= 2,
            "the cap never stopped the unbounded requests"
        );
    }
    tg.wait_until_recorded((served + later) as i64).await;
    let (spent, dearest) = spend_and_dearest(&tg).await;
    assert!(spent >= cap, "spent {spent} stopped short of the cap");
    assert!(
        spent <= cap + dearest,
        "spent {spent} > cap {cap} + one call"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unbounded_request_waits_for_the_users_others_and_says_why() {
    let upstream = MockUpstream::always(
        MockResponse::json(200, server_state_answer()).first_byte_delay(Duration::from_millis(600)),
    )
    .await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .extra("[budgets]\ndefault_limit_usd = \"100.00\"")
        .start()
        .await;
    let key = tg.user_key("patient");
    let url = format!("{}/openai/v1/responses", tg.gateway);
    let bounded = json!({"model": "gpt-5", "input": "hello", "max_output_tokens": 16});
    let unbounded = json!({"model": "gpt-5", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]});
    let client = http();
    let running = tokio::spawn(client.post(&url).bearer_auth(&key).json(&bounded).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = client
        .post(&url)
        .bearer_auth(&key)
        .json(&unbounded)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 402);
    let body: Value = resp.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no bound") && message.contains("image the provider fetches itself"),
        "{message}"
    );
    assert_eq!(running.await.unwrap().unwrap().status(), 200);
    // Alone, it runs.
    let resp = client
        .post(&url)
        .bearer_auth(&key)
        .json(&unbounded)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn background_responses_and_repeated_keys_are_refused_before_the_upstream() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .start()
        .await;
    let key = tg.user_key("tricky");
    let send = |path: &str, body: &'static str| {
        http()
            .post(format!("{}/openai/v1/{path}", tg.gateway))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = send(
        "responses",
        r#"{"model":"gpt-5","input":"hi","background":true}"#,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("background responses"),
        "{body}"
    );
    // Priced as the cheap model, served as the dear one by a parser that keeps the first key.
    for duplicated in [
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}"#,
        r#"{"model":"gpt-4o","max_tokens":1,"messages":[],"max_tokens":100000}"#,
    ] {
        let resp = send("chat/completions", duplicated).await.unwrap();
        assert_eq!(resp.status(), 400, "{duplicated}");
        let body: Value = resp.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("more than once"),
            "{body}"
        );
    }
    assert_eq!(upstream.request_count(), 0, "nothing reached the provider");
    // The same request without the trick goes through.
    let resp = send(
        "responses",
        r#"{"model":"gpt-5","input":"hi","background":false}"#,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
}

/// SIGKILL under load (32 clients, blocking and streamed calls): every call a client received
/// whole is recorded after the restart, and so is its spend. The spend journal is written
/// before a response's final event goes out; the documented bound is "nothing served is lost
/// to a kill" (before: 122 of 14,939 blocking and 71 of 9,644 streamed calls were lost).
#[tokio::test(flavor = "multi_thread")]
async fn a_hard_kill_under_load_loses_no_served_spend() {
    let upstream = MockUpstream::start(|req| {
        if req.json()["stream"].as_bool().unwrap_or(false) {
            MockResponse::fixture("anthropic-messages-stream.sse")
        } else {
            MockResponse::fixture("anthropic-messages.json")
        }
    })
    .await;
    let keep = tempfile::tempdir().unwrap();
    let config = format!(
        "[recorder]\njournal_dir = \"{}\"\n[limits]\nrequests_per_minute = 0",
        keep.path().join("journal").display()
    );
    let db = keep.path().join("state.db");
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .database(&db)
        .extra(&config)
        .start()
        .await;
    let key = tg.user_key("kate");
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..32)
        .map(|worker| {
            let (url, key, served) = (url.clone(), key.clone(), served.clone());
            tokio::spawn(async move {
                let client = http();
                for n in 0.. {
                    let mut body = messages_request();
                    body["stream"] = json!((worker + n) % 2 == 0);
                    let Ok(resp) = client
                        .post(&url)
                        .header("x-api-key", &key)
                        .json(&body)
                        .send()
                        .await
                    else {
                        return;
                    };
                    assert_eq!(resp.status(), 200);
                    let id = resp.headers()["x-tollgate-interception-id"]
                        .to_str()
                        .unwrap()
                        .to_string();
                    // Served: the client has the whole response, its end included.
                    if resp.bytes().await.is_err() {
                        return;
                    }
                    served.lock().unwrap().push(id);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(std::process::Command::new("kill")
        .args(["-9", &tg.pid().to_string()])
        .status()
        .unwrap()
        .success());
    for worker in workers {
        worker.await.unwrap();
    }
    let served = served.lock().unwrap().clone();
    assert!(served.len() > 100, "only {} calls served", served.len());

    let restarted = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .database(&db)
        .database_url(&tg.db_url)
        .extra(&config)
        .start()
        .await;
    restarted.wait_until_recorded(served.len() as i64).await;
    let ids = served
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    let found: i64 = restarted
        .scalar(
            &format!("SELECT COUNT(*) FROM interceptions WHERE CAST(id AS TEXT) IN ({ids})"),
            &[],
        )
        .await;
    let recovered: i64 = restarted
        .scalar(
            "SELECT COUNT(*) FROM interceptions WHERE error = ?",
            &[tollgate::store::RECOVERED],
        )
        .await;
    eprintln!(
        "served {} calls; {recovered} restored from the journal after the kill",
        served.len()
    );
    assert_eq!(
        found,
        served.len() as i64,
        "served calls missing after the kill"
    );
    let spent: i64 = restarted
        .scalar(
            &format!("SELECT CAST(SUM(cost_nano_usd) AS BIGINT) FROM interceptions WHERE CAST(id AS TEXT) IN ({ids})"),
            &[],
        )
        .await;
    assert_eq!(spent, served.len() as i64 * CALL_COST, "served spend");
    // The budget counts it too.
    let me: Value = http()
        .get(format!("{}/api/v2/users/me/budget", restarted.admin))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(me["spent_nano_usd"].as_i64().unwrap() >= spent, "{me}");
}
