//! The gateway seen from outside: the real binary on port 0, real HTTP, a real SQLite file, and
//! the mock upstream replaying the provider fixtures.

use crate::common;

use std::time::{Duration, Instant};

use common::client::http_untimed as http;
use common::client::interception_id;
use common::mock::{
    fixture_bytes, fixture_manifest, Chunking, MockResponse, MockUpstream, Transfer,
};
use common::server::{Tollgate, ANTHROPIC_CENTRAL_KEY, OPENAI_CENTRAL_KEY};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sqlx::{Row, SqlitePool};

/// A mock that answers each API path with the given fixture, and a Tollgate in front of it.
async fn gateway_with(upstream: &MockUpstream) -> (Tollgate, String) {
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        .start()
        .await;
    let key = tg.user_key("alice");
    (tg, key)
}

fn chat_request(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o-2024-08-06",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Why does the build fail?"}
        ],
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn responses_request(stream: bool) -> Value {
    json!({"model": "gpt-5-2025-08-07", "input": "Run the tests.", "stream": stream})
}

fn messages_request(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Fix the flaky test."}]}]
    })
}

/// Builds the comparison JSON from an interceptions row and its children, whichever the
/// backend's row type (the SQL below hands both the same column types).
macro_rules! interception_json {
    ($r:expr, $tools:expr, $thoughts:expr, $prompts:expr, $usage_rows:expr) => {{
        let (r, tools, thoughts) = (&$r, &$tools, &$thoughts);
        json!({
            "provider": r.get::<String, _>("provider"),
            "model": r.get::<String, _>("model"),
            "status": r.get::<String, _>("status"),
            "upstream_status": r.get::<Option<i64>, _>("upstream_status"),
            "streaming": r.get::<bool, _>("streaming"),
            "client": r.get::<String, _>("client"),
            "session_key": r.get::<String, _>("session_key"),
            "client_session_id": r.get::<Option<String>, _>("client_session_id"),
            "thread_parent_id": r.get::<Option<String>, _>("thread_parent_id"),
            "thread_root_id": r.get::<Option<String>, _>("thread_root_id"),
            "credential_kind": r.get::<String, _>("credential_kind"),
            "credential_hint": r.get::<Option<String>, _>("credential_hint"),
            "response_id": r.get::<Option<String>, _>("response_id"),
            "input": r.get::<i64, _>("input_tokens"),
            "output": r.get::<i64, _>("output_tokens"),
            "cache_read": r.get::<i64, _>("cache_read_input_tokens"),
            "cache_write": r.get::<i64, _>("cache_write_input_tokens"),
            "reasoning": r.get::<i64, _>("reasoning_tokens"),
            "cost_nano_usd": r.get::<i64, _>("cost_nano_usd"),
            "priced": r.get::<bool, _>("priced"),
            "usage_source": r.get::<String, _>("usage_source"),
            "user_id": r.get::<String, _>("user_id"),
            "api_key_id": r.get::<Option<String>, _>("api_key_id"),
            "started_at": r.get::<i64, _>("started_at"),
            "ended_at": r.get::<i64, _>("ended_at"),
            "error": r.get::<Option<String>, _>("error"),
            "prompts": $prompts,
            "usage_rows": $usage_rows,
            "tools": tools.iter().map(|t| json!({
                "id": t.get::<String, _>(0),
                "name": t.get::<String, _>(1),
                "arguments": serde_json::from_str::<Value>(&t.get::<String, _>(2)).unwrap_or(Value::Null),
            })).collect::<Vec<_>>(),
            "thoughts": thoughts.iter().map(|t| t.get::<String, _>(0)).collect::<Vec<_>>(),
            "thought_sources": thoughts.iter().map(|t| t.get::<String, _>(1)).collect::<Vec<_>>(),
        })
    }};
}

/// The interception row (and its children) for one id, as JSON for easy comparison; reads
/// SQLite or PostgreSQL, whichever the instance runs on.
async fn interception(tg: &Tollgate, id: &str) -> Value {
    if !common::server::on_postgres() {
        return interception_sqlite(&tg.db().await, id).await;
    }
    // Native uuid/timestamptz/integer columns cast to what the SQLite file holds (text ids,
    // epoch milliseconds, i64), so one assertion set serves both backends.
    let db = sqlx::PgPool::connect(&tg.db_url).await.unwrap();
    let r = sqlx::query(
        "SELECT provider, model, status, upstream_status::bigint AS upstream_status, streaming, client, \
         session_key, client_session_id, thread_parent_id::text AS thread_parent_id, \
         thread_root_id::text AS thread_root_id, credential_kind, credential_hint, response_id, \
         input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, \
         reasoning_tokens, cost_nano_usd, priced, usage_source, user_id::text AS user_id, \
         api_key_id::text AS api_key_id, \
         (extract(epoch FROM started_at) * 1000)::bigint AS started_at, \
         (extract(epoch FROM ended_at) * 1000)::bigint AS ended_at, error \
         FROM interceptions WHERE id = $1::uuid",
    )
    .bind(id)
    .fetch_one(&db)
    .await
    .unwrap();
    let tools = sqlx::query(
        "SELECT tool_call_id, tool, input FROM tool_usages WHERE interception_id = $1::uuid ORDER BY id",
    )
    .bind(id)
    .fetch_all(&db)
    .await
    .unwrap();
    let thoughts = sqlx::query(
        "SELECT content, source FROM model_thoughts WHERE interception_id = $1::uuid ORDER BY id",
    )
    .bind(id)
    .fetch_all(&db)
    .await
    .unwrap();
    let prompts: Vec<String> =
        sqlx::query_scalar("SELECT prompt FROM user_prompts WHERE interception_id = $1::uuid")
            .bind(id)
            .fetch_all(&db)
            .await
            .unwrap();
    let usage_rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM token_usages WHERE interception_id = $1::uuid")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    db.close().await;
    interception_json!(r, tools, thoughts, prompts, usage_rows)
}

async fn interception_sqlite(db: &SqlitePool, id: &str) -> Value {
    let r = sqlx::query("SELECT * FROM interceptions WHERE id = ?")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap();
    let tools = sqlx::query(
        "SELECT tool_call_id, tool, input FROM tool_usages WHERE interception_id = ? ORDER BY id",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap();
    let thoughts = sqlx::query(
        "SELECT content, source FROM model_thoughts WHERE interception_id = ? ORDER BY id",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .unwrap();
    let prompts: Vec<String> =
        sqlx::query_scalar("SELECT prompt FROM user_prompts WHERE interception_id = ?")
            .bind(id)
            .fetch_all(db)
            .await
            .unwrap();
    let usage_rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM token_usages WHERE interception_id = ?")
            .bind(id)
            .fetch_one(db)
            .await
            .unwrap();
    interception_json!(r, tools, thoughts, prompts, usage_rows)
}

/// Checks a recorded interception against the fixture manifest's expected values.
fn assert_matches_manifest(row: &Value, fixture: &str) {
    let m = &fixture_manifest()[fixture];
    for field in ["input", "output", "cache_read", "cache_write", "reasoning"] {
        assert_eq!(row[field], m[field], "{fixture}: {field}");
    }
    assert_eq!(
        row["response_id"], m["response_id"],
        "{fixture}: response id"
    );
    let expected_tools: Vec<Value> = m["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!({"id": t["id"], "name": t["name"], "arguments": t["arguments"]}))
        .collect();
    assert_eq!(row["tools"], json!(expected_tools), "{fixture}: tool calls");
    assert_eq!(row["thoughts"], m["thoughts"], "{fixture}: thoughts");
    assert_eq!(row["usage_rows"], 1, "{fixture}: one token_usages row");
}

/// Costs computed by hand from config/prices.toml (per-million prices, rounded up to the nano-USD):
/// gpt-4o-2024-08-06 $2.50/$10.00/cache-read $1.25; gpt-5 $1.25/$10.00/$0.125;
/// claude-sonnet-4-5 $3.00/$15.00/cache-read $0.30/cache-write $3.75.
fn expected_cost(fixture: &str) -> i64 {
    match fixture {
        // 226×2.5 + 96×10 + 1024×1.25 = 2805 (USD per million tokens) → 2_805_000 nano-USD
        "openai-chat.json" | "openai-chat-stream.sse" => 2_805_000,
        // 812×2.5 + 58×10 = 2610
        "openai-chat-tools-stream.sse" => 2_610_000,
        // 512×1.25 + 180×10 + 1536×0.125 = 2632
        "openai-responses.json" | "openai-responses-stream.sse" => 2_632_000,
        // 420×3 + 233×15 + 9000×0.30 + 1800×3.75 = 14205
        "anthropic-messages.json" | "anthropic-messages-stream.sse" => 14_205_000,
        other => panic!("no expected cost for {other}"),
    }
}

async fn post(url: &str, key: &str, body: &Value) -> reqwest::Response {
    http()
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fixture_is_relayed_unchanged_and_recorded_field_by_field() {
    let upstream = MockUpstream::start(|req| {
        let stream = req.json()["stream"].as_bool().unwrap_or(false);
        let name = match (req.path_without_query(), stream) {
            ("/v1/chat/completions", false) => "openai-chat.json",
            ("/v1/chat/completions", true) => "openai-chat-stream.sse",
            ("/v1/responses", false) => "openai-responses.json",
            ("/v1/responses", true) => "openai-responses-stream.sse",
            ("/v1/messages", false) => "anthropic-messages.json",
            ("/v1/messages", true) => "anthropic-messages-stream.sse",
            _ => return MockResponse::json(500, json!({"unexpected": req.path})),
        };
        MockResponse::fixture(name)
    })
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let cases = [
        (
            "/api/v2/aibridge/openai/v1/chat/completions",
            chat_request(false, false),
            "openai-chat.json",
        ),
        (
            "/openai/v1/chat/completions",
            chat_request(true, true),
            "openai-chat-stream.sse",
        ),
        (
            "/api/v2/aibridge/openai/v1/responses",
            responses_request(false),
            "openai-responses.json",
        ),
        (
            "/openai/v1/responses",
            responses_request(true),
            "openai-responses-stream.sse",
        ),
        (
            "/api/v2/aibridge/anthropic/v1/messages",
            messages_request(false),
            "anthropic-messages.json",
        ),
        (
            "/anthropic/v1/messages",
            messages_request(true),
            "anthropic-messages-stream.sse",
        ),
    ];
    let mut ids = Vec::new();
    for (path, body, fixture) in &cases {
        let resp = post(&format!("{}{path}", tg.gateway), &key, body).await;
        assert_eq!(resp.status(), 200, "{path}");
        let id = interception_id(&resp);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(
            ct.starts_with("text/event-stream"),
            fixture.ends_with(".sse"),
            "{fixture}"
        );
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(
            bytes.as_ref(),
            fixture_bytes(fixture).as_slice(),
            "{fixture}: relayed byte for byte"
        );
        ids.push(id);
    }
    // What the provider saw: the central key, never the Tollgate key, and no compression.
    for req in upstream.requests() {
        let sent_key = req
            .header("authorization")
            .or(req.header("x-api-key"))
            .unwrap()
            .to_string();
        assert!(
            sent_key == format!("Bearer {OPENAI_CENTRAL_KEY}") || sent_key == ANTHROPIC_CENTRAL_KEY,
            "{sent_key}"
        );
        assert!(!req.text().contains(&key) && req.headers.iter().all(|(_, v)| !v.contains(&key)));
        assert!(req.header("accept-encoding").is_none());
    }
    assert_eq!(
        upstream.requests()[0].header("host"),
        Some(upstream.addr().to_string().as_str())
    );

    tg.wait_until_recorded(cases.len() as i64).await;
    let alice: String = tg
        .scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = 'alice'",
            &[],
        )
        .await;
    let mut rows = Vec::new();
    for ((path, body, fixture), id) in cases.iter().zip(&ids) {
        let row = interception(&tg, id).await;
        assert_matches_manifest(&row, fixture);
        let provider = if path.contains("anthropic") {
            "anthropic"
        } else {
            "openai"
        };
        assert_eq!(row["provider"], provider);
        assert_eq!(row["model"], body["model"]);
        assert_eq!(row["status"], "completed");
        assert_eq!(row["upstream_status"], 200);
        assert_eq!(row["streaming"], fixture.ends_with(".sse"));
        assert_eq!(row["client"], "Unknown");
        assert_eq!(
            row["session_key"],
            id.as_str(),
            "a lone interception is its own session"
        );
        assert_eq!(row["credential_kind"], "central");
        assert_eq!(row["credential_hint"], "sk-…cdef", "masked central key");
        assert_eq!(row["user_id"], alice.as_str());
        assert!(row["api_key_id"].is_string());
        assert!(row["priced"].as_bool().unwrap(), "{fixture} is priced");
        assert_eq!(
            row["cost_nano_usd"],
            expected_cost(fixture),
            "{fixture}: cost"
        );
        assert!(row["ended_at"].as_i64() >= row["started_at"].as_i64());
        assert_eq!(row["error"], Value::Null);
        rows.push(row);
    }
    assert_eq!(rows[0]["prompts"], json!(["Why does the build fail?"]));
    assert_eq!(rows[2]["prompts"], json!(["Run the tests."]));
    assert_eq!(rows[4]["prompts"], json!(["Fix the flaky test."]));
    assert_eq!(rows[2]["thought_sources"], json!(["reasoning_summary"]));
    assert_eq!(rows[4]["thought_sources"], json!(["thinking"]));
    // A stream is recorded exactly like its blocking twin: tokens, tool calls, thoughts, cost.
    for pair in rows.chunks(2) {
        for field in [
            "input",
            "output",
            "cache_read",
            "cache_write",
            "reasoning",
            "tools",
            "thoughts",
            "cost_nano_usd",
            "response_id",
        ] {
            assert_eq!(pair[0][field], pair[1][field], "twin mismatch on {field}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_streams_get_usage_injected_and_the_extra_chunk_stripped() {
    let upstream = MockUpstream::always(
        MockResponse::fixture("openai-chat-tools-stream.sse").chunking(Chunking::EveryNBytes(7)),
    )
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let resp = post(
        &format!("{}/openai/v1/chat/completions", tg.gateway),
        &key,
        &chat_request(true, false),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    let body = String::from_utf8(resp.bytes().await.unwrap().to_vec()).unwrap();
    let sent = upstream.last_request().json();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "usage requested upstream"
    );
    // The client did not ask for usage: the usage-only chunk is gone, everything else is intact.
    let fixture = String::from_utf8(fixture_bytes("openai-chat-tools-stream.sse")).unwrap();
    let usage_event = fixture
        .split("\n\n")
        .find(|e| e.contains("\"choices\":[]"))
        .expect("fixture has a usage chunk");
    assert!(!body.contains("\"prompt_tokens\""));
    assert_eq!(body, fixture.replacen(&format!("{usage_event}\n\n"), "", 1));
    tg.wait_until_recorded(1).await;
    let row = interception(&tg, &id).await;
    assert_matches_manifest(&row, "openai-chat-tools-stream.sse");
    assert_eq!(
        row["cost_nano_usd"],
        expected_cost("openai-chat-tools-stream.sse")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn awkward_chunk_boundaries_change_nothing() {
    // Cut everywhere: one byte at a time, inside "data:", inside multi-byte UTF-8 characters.
    let utf8_stream = String::from_utf8(fixture_bytes("anthropic-messages-stream.sse"))
        .unwrap()
        .replace("Let me r", "Lét mé ⚙ r");
    let split_points: Vec<usize> = utf8_stream
        .char_indices()
        .filter(|(_, c)| c.len_utf8() > 1)
        .map(|(i, _)| i + 1)
        .chain(utf8_stream.match_indices("data:").map(|(i, _)| i + 2))
        .collect();
    let cases = vec![
        (
            "/anthropic/v1/messages",
            messages_request(true),
            MockResponse::fixture("anthropic-messages-stream.sse").chunking(Chunking::ByteByByte),
            "anthropic-messages-stream.sse",
        ),
        (
            "/anthropic/v1/messages",
            messages_request(true),
            MockResponse::sse(utf8_stream.clone().into_bytes())
                .chunking(Chunking::At(split_points)),
            "anthropic-messages-stream.sse",
        ),
        (
            "/openai/v1/responses",
            responses_request(true),
            MockResponse::fixture("openai-responses-stream.sse").chunking(Chunking::EveryNBytes(3)),
            "openai-responses-stream.sse",
        ),
        (
            "/openai/v1/chat/completions",
            chat_request(true, true),
            MockResponse::fixture("openai-chat-stream.sse")
                .chunking(Chunking::ByteByByte)
                .transfer(Transfer::CloseDelimited),
            "openai-chat-stream.sse",
        ),
        (
            "/openai/v1/chat/completions",
            chat_request(false, false),
            MockResponse::fixture("openai-chat.json").chunking(Chunking::ByteByByte),
            "openai-chat.json",
        ),
    ];
    let responses: Vec<MockResponse> = cases.iter().map(|c| c.2.clone()).collect();
    let upstream = MockUpstream::sequence(responses).await;
    let (tg, key) = gateway_with(&upstream).await;
    let mut ids = Vec::new();
    for (path, body, _, fixture) in &cases {
        let resp = post(&format!("{}{path}", tg.gateway), &key, body).await;
        assert_eq!(resp.status(), 200, "{fixture}");
        ids.push(interception_id(&resp));
        let got = resp.bytes().await.unwrap();
        assert!(!got.is_empty());
    }
    tg.wait_until_recorded(cases.len() as i64).await;
    for ((_, _, _, fixture), id) in cases.iter().zip(&ids) {
        assert_matches_manifest(&interception(&tg, id).await, fixture);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_is_not_buffered() {
    let drip = Duration::from_millis(300);
    let upstream = MockUpstream::always(
        MockResponse::fixture("anthropic-messages-stream.sse")
            .chunking(Chunking::PerEvent)
            .delay(drip),
    )
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let started = Instant::now();
    let resp = post(
        &format!("{}/anthropic/v1/messages", tg.gateway),
        &key,
        &messages_request(true),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
        // Count an arrival for each complete event seen so far.
        while arrivals.len() < text.matches("\n\n").count() {
            arrivals.push(started.elapsed());
        }
    }
    let events = fixture_bytes("anthropic-messages-stream.sse")
        .windows(2)
        .filter(|w| w == b"\n\n")
        .count();
    assert_eq!(arrivals.len(), events);
    // Each event reaches the client before the upstream sends the next one (300 ms later).
    for (i, pair) in arrivals.windows(2).enumerate() {
        let gap = pair[1].saturating_sub(pair[0]);
        assert!(
            gap > drip / 2,
            "events {i} and {} arrived together ({gap:?}): buffered",
            i + 1
        );
    }
    assert!(arrivals[0] < drip, "first event took {:?}", arrivals[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_abort_mid_stream_is_recorded_with_partial_usage() {
    let upstream = MockUpstream::always(
        MockResponse::fixture("anthropic-messages-stream.sse")
            .chunking(Chunking::PerEvent)
            .delay(Duration::from_millis(150)),
    )
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let resp = post(
        &format!("{}/anthropic/v1/messages", tg.gateway),
        &key,
        &messages_request(true),
    )
    .await;
    let id = interception_id(&resp);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("message_start"));
    drop(stream); // the client goes away after the first event
    tg.wait_until_recorded(1).await;
    let row = interception(&tg, &id).await;
    assert_eq!(row["status"], "client_aborted");
    assert_eq!(row["input"], 420, "usage seen before the abort is kept");
    assert_eq!(row["cache_read"], 9000);
    assert_eq!(row["cache_write"], 1800);
    assert!(row["output"].as_i64().unwrap() < 233);
    assert!(row["cost_nano_usd"].as_i64().unwrap() > 0);
    // The input counts were reported; the output (never reported) is estimated.
    assert_eq!(row["usage_source"], "estimated");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_reset_mid_stream_is_recorded_and_the_client_sees_the_break() {
    let fixture_len = fixture_bytes("openai-responses-stream.sse").len();
    let upstream = MockUpstream::always(
        MockResponse::fixture("openai-responses-stream.sse")
            .chunking(Chunking::EveryNBytes(400))
            .reset_after(fixture_len / 2),
    )
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let resp = post(
        &format!("{}/openai/v1/responses", tg.gateway),
        &key,
        &responses_request(true),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    let got = resp.bytes().await;
    assert!(got.is_err(), "a cut stream must not look complete");
    tg.wait_until_recorded(1).await;
    let row = interception(&tg, &id).await;
    assert_eq!(row["status"], "upstream_aborted");
    assert!(row["error"].as_str().unwrap().contains("mid-response"));
    assert_eq!(
        row["thoughts"],
        json!(["Checking the failing test first, then the Cargo features."])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_errors_are_relayed_as_they_came() {
    let upstream = MockUpstream::sequence(vec![
        MockResponse::fixture("openai-error-ratelimit.json")
            .status(429)
            .header("retry-after", "2"),
        MockResponse::fixture("anthropic-error-overloaded.json").status(529),
    ])
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let resp = post(
        &format!("{}/openai/v1/chat/completions", tg.gateway),
        &key,
        &chat_request(false, false),
    )
    .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "2");
    let id1 = interception_id(&resp);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        fixture_bytes("openai-error-ratelimit.json").as_slice()
    );
    let resp = http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .header("x-api-key", &key)
        .json(&messages_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 529);
    let id2 = interception_id(&resp);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        fixture_bytes("anthropic-error-overloaded.json").as_slice()
    );
    tg.wait_until_recorded(2).await;
    let (r1, r2) = (interception(&tg, &id1).await, interception(&tg, &id2).await);
    assert_eq!(
        (r1["status"].as_str(), r1["upstream_status"].as_i64()),
        (Some("upstream_error"), Some(429))
    );
    assert_eq!(
        (r2["status"].as_str(), r2["upstream_status"].as_i64()),
        (Some("upstream_error"), Some(529))
    );
    assert!(r2["error"].as_str().unwrap().contains("overloaded_error"));
    assert_eq!(r1["cost_nano_usd"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_use_the_provider_format_and_never_reach_the_upstream() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[limits]\nmax_body_bytes = 2048")
        .start()
        .await;
    let key = tg.user_key("bob");
    let gw = &tg.gateway;
    let c = http();
    let check = |resp: reqwest::Response,
                 status: u16,
                 anthropic_type: Option<&'static str>,
                 openai: Option<(&'static str, &'static str)>| async move {
        assert_eq!(resp.status(), status);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: Value = resp.json().await.unwrap();
        if let Some(t) = anthropic_type {
            assert_eq!(v["type"], "error", "{v}");
            assert_eq!(v["error"]["type"], t, "{v}");
            assert!(v["error"]["message"].as_str().unwrap().len() > 5);
        }
        if let Some((t, code)) = openai {
            assert_eq!(v["error"]["type"], t, "{v}");
            assert_eq!(v["error"]["code"], code, "{v}");
            assert!(v["error"]["message"].as_str().unwrap().len() > 5);
        }
    };
    // 401: missing, unknown, and malformed keys, in each provider's format.
    check(
        c.post(format!("{gw}/openai/v1/chat/completions"))
            .json(&chat_request(false, false))
            .send()
            .await
            .unwrap(),
        401,
        None,
        Some(("invalid_request_error", "invalid_api_key")),
    )
    .await;
    check(
        c.post(format!("{gw}/openai/v1/chat/completions"))
            .bearer_auth("tg_0000")
            .json(&chat_request(false, false))
            .send()
            .await
            .unwrap(),
        401,
        None,
        Some(("invalid_request_error", "invalid_api_key")),
    )
    .await;
    check(
        c.post(format!("{gw}/anthropic/v1/messages"))
            .header("x-api-key", "sk-ant-not-a-tollgate-key")
            .json(&messages_request(false))
            .send()
            .await
            .unwrap(),
        401,
        Some("authentication_error"),
        None,
    )
    .await;
    // 404: unknown routes and providers (never an open relay).
    check(
        c.post(format!("{gw}/openai/v1/embeddings"))
            .bearer_auth(&key)
            .json(&json!({"model": "x"}))
            .send()
            .await
            .unwrap(),
        404,
        None,
        Some(("invalid_request_error", "unknown_url")),
    )
    .await;
    check(
        c.post(format!("{gw}/anthropic/v1/complete"))
            .bearer_auth(&key)
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
        404,
        Some("not_found_error"),
        None,
    )
    .await;
    check(
        c.get(format!("{gw}/nope/v1/models"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        404,
        None,
        Some(("invalid_request_error", "unknown_url")),
    )
    .await;
    check(
        c.get(format!("{gw}/")).send().await.unwrap(),
        404,
        None,
        None,
    )
    .await;
    check(
        c.get(format!("{gw}/api/v2/aibridge/openai/v1/chat/completions"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
        404,
        None,
        None,
    )
    .await;
    // 400: not JSON, no model.
    check(
        c.post(format!("{gw}/openai/v1/chat/completions"))
            .bearer_auth(&key)
            .body("{not json")
            .send()
            .await
            .unwrap(),
        400,
        None,
        Some(("invalid_request_error", "invalid_request")),
    )
    .await;
    check(
        c.post(format!("{gw}/anthropic/v1/messages"))
            .bearer_auth(&key)
            .json(&json!({"messages": []}))
            .send()
            .await
            .unwrap(),
        400,
        Some("invalid_request_error"),
        None,
    )
    .await;
    // 413: over max_body_bytes, declared or chunked.
    let big =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    check(
        c.post(format!("{gw}/openai/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&big)
            .send()
            .await
            .unwrap(),
        413,
        None,
        Some(("invalid_request_error", "request_too_large")),
    )
    .await;
    let chunked = reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; 512])),
    ));
    check(
        c.post(format!("{gw}/openai/v1/chat/completions"))
            .bearer_auth(&key)
            .body(chunked)
            .send()
            .await
            .unwrap(),
        413,
        None,
        None,
    )
    .await;
    assert_eq!(
        upstream.request_count(),
        0,
        "refusals never contact the upstream"
    );
    // Refusals are not interceptions, but they are counted.
    let metrics = common::server::metrics(&tg).await;
    assert!(
        metrics.contains("tollgate_refusals_total{reason=\"unauthenticated\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("tollgate_refusals_total{reason=\"not_found\"}"));
    let n: i64 = tg.scalar("SELECT COUNT(*) FROM interceptions", &[]).await;
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_gets_502_and_a_record() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &dead)
        .start()
        .await;
    let key = tg.user_key("carol");
    let resp = post(
        &format!("{}/anthropic/v1/messages", tg.gateway),
        &key,
        &messages_request(false),
    )
    .await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    tg.wait_until_recorded(1).await;
    let status: String = tg.scalar("SELECT status FROM interceptions", &[]).await;
    assert_eq!(status, "upstream_aborted");
}

#[tokio::test(flavor = "multi_thread")]
async fn passthrough_routes_are_forwarded_but_not_recorded() {
    let upstream = MockUpstream::always(MockResponse::json(
        200,
        json!({"object": "list", "data": [{"id": "gpt-4o"}]}),
    ))
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let resp = http()
        .get(format!(
            "{}/api/v2/aibridge/openai/v1/models?limit=5",
            tg.gateway
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-tollgate-interception-id").is_none());
    assert_eq!(
        resp.json::<Value>().await.unwrap()["data"][0]["id"],
        "gpt-4o"
    );
    let seen = upstream.last_request();
    assert_eq!(seen.path, "/v1/models?limit=5");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {OPENAI_CENTRAL_KEY}").as_str())
    );
    let resp = http()
        .post(format!("{}/anthropic/v1/messages/count_tokens", tg.gateway))
        .header("x-api-key", &key)
        .json(&json!({"model": "claude-sonnet-4-5", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream.last_request().header("x-api-key"),
        Some(ANTHROPIC_CENTRAL_KEY)
    );
    let metrics = common::server::metrics(&tg).await;
    assert!(
        metrics.contains("tollgate_passthrough_total{provider=\"openai\"} 1"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n: i64 = tg.scalar("SELECT COUNT(*) FROM interceptions", &[]).await;
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_and_threads_are_recognised() {
    let upstream = MockUpstream::sequence(vec![
        MockResponse::fixture("anthropic-messages.json"),
        MockResponse::fixture("anthropic-messages.json"),
        MockResponse::fixture("openai-chat.json"),
    ])
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    // 1: a tool call (toolu_01TGreadfile) from Claude Code without a session id.
    let resp = http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .header("authorization", format!("Bearer {key}"))
        .header("user-agent", "claude-cli/2.0.14 (external, cli)")
        .json(&messages_request(false))
        .send()
        .await
        .unwrap();
    let first = interception_id(&resp);
    // 2: the tool result for that call: same thread.
    let follow_up = json!({
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "Fix the flaky test."},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01TGreadfile", "name": "read_file", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01TGreadfile", "content": "fn main() {}"}]}
        ]
    });
    let resp = post(
        &format!("{}/anthropic/v1/messages", tg.gateway),
        &key,
        &follow_up,
    )
    .await;
    let second = interception_id(&resp);
    // 3: a client that names its session.
    let resp = http()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .bearer_auth(&key)
        .header("x-tollgate-session", "sess-42")
        .json(&chat_request(false, false))
        .send()
        .await
        .unwrap();
    let third = interception_id(&resp);
    tg.wait_until_recorded(3).await;
    let (a, b, c) = (
        interception(&tg, &first).await,
        interception(&tg, &second).await,
        interception(&tg, &third).await,
    );
    assert_eq!(a["client"], "Claude Code");
    assert_eq!(a["session_key"], first.as_str());
    assert_eq!(b["thread_parent_id"], first.as_str());
    assert_eq!(b["thread_root_id"], first.as_str());
    assert_eq!(
        b["session_key"],
        first.as_str(),
        "a tool-call thread is keyed by its root"
    );
    assert_eq!(
        b["prompts"],
        json!([]),
        "a tool-result turn has no user prompt"
    );
    assert_eq!(c["client_session_id"], "sess-42");
    // A client's session id names a session of that user only (issue 14).
    assert_eq!(
        c["session_key"],
        format!("{}:sess-42", c["user_id"].as_str().unwrap())
    );
    assert!(upstream
        .requests()
        .iter()
        .all(|r| r.header("x-tollgate-session").is_none()));
}

#[tokio::test(flavor = "multi_thread")]
async fn user_keys_are_ignored_under_the_default_policy() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let (tg, key) = gateway_with(&upstream).await;
    let resp = http()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .header("x-tollgate-key", &key)
        .bearer_auth("sk-user-own-key-9876")
        .json(&chat_request(false, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some(format!("Bearer {OPENAI_CENTRAL_KEY}").as_str())
    );
    assert!(upstream.last_request().header("x-tollgate-key").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn user_keys_are_used_when_the_policy_allows_them() {
    let upstream = MockUpstream::always(MockResponse::fixture("anthropic-messages.json")).await;
    let tg = Tollgate::builder()
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[keys]\ncentral_api_key_enabled = true\nallow_user_api_key = true\nallow_central_api_key_fallback = false")
        .start()
        .await;
    let key = tg.user_key("dana");
    let url = format!("{}/anthropic/v1/messages", tg.gateway);
    let resp = http()
        .post(&url)
        .header("x-tollgate-key", &key)
        .header("x-api-key", "sk-ant-dana-personal-4321")
        .json(&messages_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    assert_eq!(
        upstream.last_request().header("x-api-key"),
        Some("sk-ant-dana-personal-4321")
    );
    // Without a user key the policy (C=1, U=1, F=0) refuses: the central key is never used.
    let resp = http()
        .post(&url)
        .header("x-tollgate-key", &key)
        .json(&messages_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "permission_error");
    assert_eq!(upstream.request_count(), 1);
    tg.wait_until_recorded(1).await;
    let row = interception(&tg, &id).await;
    assert_eq!(row["credential_kind"], "byok");
    assert_eq!(row["credential_hint"], "sk-…4321");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_keys_stop_working_within_five_seconds() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let (tg, key) = gateway_with(&upstream).await;
    let url = format!("{}/openai/v1/chat/completions", tg.gateway);
    assert_eq!(
        post(&url, &key, &chat_request(false, false)).await.status(),
        200
    );
    let key_id: String = tg
        .scalar("SELECT CAST(id AS TEXT) FROM api_keys", &[])
        .await;
    let out = tg.cli(&["keys", "revoke", &key_id]);
    assert!(out.status.success(), "{out:?}");
    let revoked = Instant::now();
    loop {
        let status = post(&url, &key, &chat_request(false, false)).await.status();
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "revoked key still accepted after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second revoke of the same key is an error (exit 1), not a silent success.
    assert_eq!(tg.cli(&["keys", "revoke", &key_id]).status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_health_metrics_and_no_secret_in_any_log_line() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat-stream.sse")).await;
    let (tg, key) = gateway_with(&upstream).await;
    let c = http();
    let url = format!("{}/openai/v1/chat/completions", tg.gateway);
    for _ in 0..10 {
        let resp = c
            .post(&url)
            .bearer_auth(&key)
            .json(&chat_request(true, true))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    // Sequential requests share pooled upstream connections. pingora's pool can lose a race
    // with its own idle-watch task under heavy load and open a fresh one now and then, so this
    // checks reuse (far fewer connections than requests), not an exact count.
    let opened = upstream.connections_accepted();
    assert!(
        opened <= 3,
        "10 sequential requests opened {opened} upstream connections"
    );
    let bad = c
        .post(&url)
        .bearer_auth("tg_ffffffffffffffffffffffffffffffffffffffffffffffff")
        .json(&chat_request(false, false))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert_eq!(
        c.get(format!("{}/healthz", tg.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = c.get(format!("{}/readyz", tg.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    tg.wait_until_recorded(10).await;
    let metrics = common::server::metrics(&tg).await;
    for name in [
        "tollgate_interceptions_total{provider=\"openai\",model=\"gpt-4o-2024-08-06\",status=\"completed\"} 10",
        "tollgate_tokens_total{provider=\"openai\",model=\"gpt-4o-2024-08-06\",type=\"input\"} 2260",
        "tollgate_cost_nano_usd_total",
        "tollgate_upstream_ttfb_seconds",
        "tollgate_overhead_seconds",
        "tollgate_interception_duration_seconds",
        "tollgate_recorder_queue_depth",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    let (clean_exit, logs) = tg.stop().await;
    assert!(clean_exit, "SIGTERM ends the process cleanly");
    let records: Vec<Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for record_type in [
        "interception_start",
        "prompt_usage",
        "token_usage",
        "interception_end",
    ] {
        assert_eq!(
            records
                .iter()
                .filter(|r| r["message"] == "interception log" && r["record_type"] == record_type)
                .count(),
            10,
            "{record_type}"
        );
    }
    let joined = logs.join("\n");
    for secret in [
        key.as_str(),
        &key[3..],
        OPENAI_CENTRAL_KEY,
        ANTHROPIC_CENTRAL_KEY,
        "tg_ffffffffffffffff",
    ] {
        assert!(!joined.contains(secret), "a secret appears in the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_listener_can_serve_https() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("gw.pem"), dir.path().join("gw.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .server_extra(&format!(
            "gateway_tls_cert = \"{}\"\ngateway_tls_key = \"{}\"",
            cert_path.display(),
            key_path.display()
        ))
        .start()
        .await;
    assert!(tg.gateway.starts_with("https://"), "{}", tg.gateway);
    let key = tg.user_key("tess");
    let client = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve(
            "localhost",
            tg.gateway.trim_start_matches("https://").parse().unwrap(),
        )
        .build()
        .unwrap();
    let port = tg.gateway.rsplit(':').next().unwrap();
    let resp = client
        .post(format!(
            "https://localhost:{port}/openai/v1/chat/completions"
        ))
        .bearer_auth(&key)
        .json(&chat_request(false, false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        fixture_bytes("openai-chat.json").as_slice()
    );
    tg.wait_until_recorded(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_log_record_type_carries_its_contract_fields() {
    let upstream =
        MockUpstream::always(MockResponse::fixture("anthropic-messages-stream.sse")).await;
    let (tg, key) = gateway_with(&upstream).await;
    let resp = http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .header("x-api-key", &key)
        .header("x-claude-code-session-id", "cc-session-1")
        .header("user-agent", "claude-cli/2.0.14 (external, cli)")
        .json(&messages_request(true))
        .send()
        .await
        .unwrap();
    let id = interception_id(&resp);
    resp.bytes().await.unwrap();
    tg.wait_until_recorded(1).await;
    let (_, logs) = tg.stop().await;
    let records: Vec<Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["message"] == "interception log" && r["interception_id"] == id.as_str())
        .collect();
    let of = |t: &str| {
        records
            .iter()
            .find(|r| r["record_type"] == t)
            .unwrap_or_else(|| panic!("no {t} record"))
            .clone()
    };
    let start = of("interception_start");
    for f in [
        "initiator_id",
        "api_key_id",
        "provider",
        "model",
        "client",
        "client_session_id",
        "started_at",
        "thread_parent_id",
        "thread_root_id",
    ] {
        assert!(
            start.get(f).is_some(),
            "interception_start lacks {f}: {start}"
        );
    }
    assert_eq!(start["client"], "Claude Code");
    assert_eq!(start["client_session_id"], "cc-session-1");
    let end = of("interception_end");
    assert_eq!(end["status"], "completed");
    assert_eq!(end["cost_nano_usd"], 14_205_000);
    assert!(end["ended_at"].is_string());
    let usage = of("token_usage");
    assert_eq!(
        (
            usage["input_tokens"].as_i64(),
            usage["output_tokens"].as_i64()
        ),
        (Some(420), Some(233))
    );
    assert_eq!(
        (
            usage["cache_read_input_tokens"].as_i64(),
            usage["cache_write_input_tokens"].as_i64()
        ),
        (Some(9000), Some(1800))
    );
    assert_eq!(usage["msg_id"], "msg_01TGfixture0001");
    assert_eq!(of("prompt_usage")["prompt"], "Fix the flaky test.");
    let tool = of("tool_usage");
    assert_eq!(
        (tool["tool"].as_str(), tool["tool_call_id"].as_str()),
        (Some("read_file"), Some("toolu_01TGreadfile"))
    );
    assert_eq!(
        serde_json::from_str::<Value>(tool["input"].as_str().unwrap()).unwrap(),
        json!({"path": "tests/retry.rs", "max_lines": 200})
    );
    assert_eq!(tool["injected"], false);
    assert_eq!(
        of("model_thought")["content"],
        "The user wants the flaky test fixed. Look at the retry loop first."
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_before_the_first_byte_cancels_the_upstream_call() {
    let upstream = MockUpstream::always(
        // Far apart from the bound below, so a loaded machine cannot blur the two.
        MockResponse::fixture("openai-chat.json").first_byte_delay(Duration::from_secs(20)),
    )
    .await;
    let (tg, key) = gateway_with(&upstream).await;
    let url = format!("{}/openai/v1/chat/completions", tg.gateway);
    let attempt = http()
        .post(&url)
        .bearer_auth(&key)
        .json(&chat_request(false, false))
        .timeout(Duration::from_millis(400))
        .send()
        .await;
    assert!(attempt.is_err(), "the client gave up first");
    let started = Instant::now();
    tg.wait_until_recorded(1).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "recorded as soon as the client left, not when the upstream answered"
    );
    let status: String = tg.scalar("SELECT status FROM interceptions", &[]).await;
    let error: String = tg.scalar("SELECT error FROM interceptions", &[]).await;
    assert_eq!(status, "client_aborted");
    assert!(error.contains("before the response"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn interception_log_records_are_written_together_in_order_and_none_lost_at_shutdown() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let (tg, key) = gateway_with(&upstream).await;
    let url = format!("{}/openai/v1/chat/completions", tg.gateway);
    // A burst, then SIGTERM at once: the last blocks are still waiting for the log flusher.
    let body = chat_request(false, false);
    let calls = (0..40).map(|_| post(&url, &key, &body));
    let ids: Vec<String> = futures_util::future::join_all(calls)
        .await
        .iter()
        .map(|r| {
            assert_eq!(r.status(), 200);
            interception_id(r)
        })
        .collect();
    let (clean_exit, logs) = tg.stop().await;
    assert!(clean_exit);
    let records: Vec<Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for id in &ids {
        // Each interception's records arrive whole and in the contract's order.
        let mine: Vec<&str> = records
            .iter()
            .filter(|r| r["interception_id"] == id.as_str())
            .map(|r| r["record_type"].as_str().unwrap())
            .collect();
        assert_eq!(
            mine,
            [
                "interception_start",
                "prompt_usage",
                "token_usage",
                "interception_end"
            ],
            "{id}"
        );
        let first = records
            .iter()
            .position(|r| r["interception_id"] == id.as_str())
            .unwrap();
        assert!(
            records[first..first + 4]
                .iter()
                .all(|r| r["interception_id"] == id.as_str()),
            "{id}'s records are contiguous"
        );
    }
    // Lines logged outside an interception never overtake queued blocks: "stopped" is last.
    assert_eq!(
        records.last().unwrap()["message"],
        "stopped",
        "{:?}",
        &logs[logs.len().saturating_sub(3)..]
    );
}

/// The gateway listener's own request loop (issue 9): one client connection carries request
/// after request; a refusal, a malformed head or `Connection: close` ends it after the answer;
/// and a graceful stop closes idle kept-alive connections at once.
#[tokio::test(flavor = "multi_thread")]
async fn one_connection_carries_many_requests_and_a_stop_closes_idle_ones_at_once() {
    use common::tunnel::{raw_exchange, read_h1_response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .server_extra("grace_period_seconds = 3")
        .start()
        .await;
    let key = tg.user_key("alice");
    let addr = tg.gateway.trim_start_matches("http://").to_string();
    let body = chat_request(false, false).to_string();
    let request = |key: &str, extra: &str| {
        format!(
            "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
    };
    let expected = fixture_bytes("openai-chat.json");

    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    for i in 0..3 {
        conn.write_all(request(&key, "").as_bytes()).await.unwrap();
        let (status, got) = read_h1_response(&mut conn).await;
        assert_eq!(status, 200, "request {i}");
        assert_eq!(got, expected, "request {i}");
    }
    tg.wait_until_recorded(3).await;
    assert_eq!(upstream.request_count(), 3);

    // A refusal is answered before the body is read (no unauthenticated upload is taken in),
    // so pingora ends that connection after the answer rather than parse the unread body.
    let wrong_key = "tg_ffffffffffffffffffffffffffffffffffffffffffffffff";
    let refused = answer_then_close(&addr, &request(wrong_key, "")).await;
    assert_eq!(refused, (401, true), "refused, then closed");

    // `Connection: close` is honoured after the response.
    let closing = answer_then_close(&addr, &request(&key, "Connection: close\r\n")).await;
    assert_eq!(closing, (200, true), "answered, then closed");

    // A malformed head gets 400 and the connection ends; nothing reaches the provider.
    let answer = raw_exchange(
        &addr,
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nBad Header Line\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(
        upstream.request_count(),
        4,
        "only the closing request added"
    );

    // `conn` is idle between requests. A stop lets requests in flight finish for the grace
    // period (3 s here) but closes idle connections at once, so their clients go elsewhere.
    let pid = tg.pid().to_string();
    let stopping = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the idle connection was closed: {read:?}"
    );
    assert!(
        stopping.elapsed() < Duration::from_millis(1500),
        "idle connection closed only after {:?} (grace period 3 s)",
        stopping.elapsed()
    );
    let (clean_exit, _) = tg.stop().await;
    assert!(clean_exit, "SIGTERM ends the process cleanly");
}

/// Sends `request` on a fresh connection: the answer's status, and whether the server closed
/// the connection after it (within 5 s).
async fn answer_then_close(addr: &str, request: &str) -> (u16, bool) {
    use common::tunnel::read_h1_response;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let (status, _) = read_h1_response(&mut conn).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    (status, matches!(read, Ok(Ok(0))))
}
