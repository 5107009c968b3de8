//! The management API seen from outside: the real binary, real HTTP on the admin listener, and
//! interceptions produced by real requests through the gateway to the mock upstream. Retention is
//! tested as a library call against a SQLite file written directly (and, with
//! `TOLLGATE_TEST_DATABASE_URL` set, against a fresh PostgreSQL database).

use crate::common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::client::http;
use common::client::user_id;
use common::mock::{MockResponse, MockUpstream};
use common::server::{Tollgate, ANTHROPIC_CENTRAL_KEY, OPENAI_CENTRAL_KEY};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::{Row, SqlitePool};

/// A mock answering each provider path with its blocking fixture.
async fn upstream() -> MockUpstream {
    MockUpstream::start(|req| match req.path_without_query() {
        "/v1/chat/completions" => MockResponse::fixture("openai-chat.json"),
        "/v1/responses" => MockResponse::fixture("openai-responses.json"),
        "/v1/messages" => MockResponse::fixture("anthropic-messages.json"),
        other => MockResponse::json(500, json!({"unexpected": other})),
    })
    .await
}

async fn start(upstream: &MockUpstream, extra: &str) -> Tollgate {
    Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra(extra)
        .start()
        .await
}

/// Everything a test needs to know about one API response.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: String,
    text: String,
    json: Value,
}

/// Sends `method path` to the admin listener with an optional key and raw body.
async fn call(
    tg: &Tollgate,
    method: Method,
    key: Option<&str>,
    path: &str,
    body: Option<String>,
) -> Reply {
    let mut req = http().request(method, format!("{}{path}", tg.admin));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        text,
        json,
    }
}

async fn get(tg: &Tollgate, key: &str, path: &str) -> Reply {
    call(tg, Method::GET, Some(key), path, None).await
}

async fn get_ok(tg: &Tollgate, key: &str, path: &str) -> Value {
    let r = get(tg, key, path).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text);
    r.json
}

async fn send_json(tg: &Tollgate, method: Method, key: &str, path: &str, body: Value) -> Reply {
    call(tg, method, Some(key), path, Some(body.to_string())).await
}

/// Percent-encodes a query value (enough for the characters these tests use).
fn enc(v: &str) -> String {
    v.replace('%', "%25")
        .replace(' ', "%20")
        .replace('+', "%2B")
        .replace(':', "%3A")
        .replace('"', "%22")
        .replace('&', "%26")
}

/// Sends one provider call through the gateway and returns its interception id.
async fn gateway_call(
    tg: &Tollgate,
    key: &str,
    path: &str,
    body: Value,
    session: Option<&str>,
) -> String {
    let mut req = http()
        .post(format!("{}{path}", tg.gateway))
        .bearer_auth(key)
        .json(&body);
    if let Some(s) = session {
        req = req.header("x-tollgate-session", s);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    let id = resp.headers()["x-tollgate-interception-id"]
        .to_str()
        .unwrap()
        .to_string();
    resp.bytes().await.unwrap();
    id
}

async fn chat(
    tg: &Tollgate,
    key: &str,
    model: &str,
    prompt: &str,
    session: Option<&str>,
) -> String {
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}]});
    gateway_call(tg, key, "/openai/v1/chat/completions", body, session).await
}

async fn responses(tg: &Tollgate, key: &str, session: Option<&str>) -> String {
    let body = json!({"model": "gpt-5-2025-08-07", "input": "Run the tests."});
    gateway_call(tg, key, "/openai/v1/responses", body, session).await
}

/// Anthropic call; the fixture answers with tool call `toolu_01TGreadfile`.
async fn messages(tg: &Tollgate, key: &str, prompt: &str) -> String {
    let body = json!({
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 1024,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    });
    gateway_call(tg, key, "/anthropic/v1/messages", body, None).await
}

/// The follow-up that answers `toolu_01TGreadfile`: joins the thread of the call that made it.
async fn tool_result_followup(tg: &Tollgate, key: &str) -> String {
    let body = json!({
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 1024,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Fix the flaky test."}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01TGreadfile", "name": "read_file", "input": {"path": "src/lib.rs"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01TGreadfile", "content": "fn main() {}"}]}
        ]
    });
    gateway_call(tg, key, "/anthropic/v1/messages", body, None).await
}

fn ids(list: &Value) -> Vec<String> {
    list["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn session_ids(list: &Value) -> Vec<String> {
    list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn assert_error(r: &Reply, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text);
    assert!(
        r.json["error"]["message"].is_string() && r.json["error"]["code"].is_string(),
        "{what}: error body {}",
        r.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn members_see_only_their_own_and_every_filter_works() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let root = tg.admin_key("root");
    let alice = tg.user_key("alice");
    let bob = tg.user_key("bob");

    let a_chat = chat(&tg, &alice, "gpt-4o-2024-08-06", "Why?", None).await;
    let a_mini = chat(&tg, &alice, "gpt-4o-mini", "How?", Some("alice-s1")).await;
    let a_claude = messages(&tg, &alice, "Fix the flaky test.").await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let between = Utc::now();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let b_resp = responses(&tg, &bob, Some("bob-s1")).await;
    tg.wait_until_recorded(4).await;
    let alice_id = user_id(&tg, "alice").await;
    let bob_id = user_id(&tg, "bob").await;
    let mut bodies = Vec::new();

    // No key, a bad key: 401 with the JSON error body.
    let r = call(
        &tg,
        Method::GET,
        None,
        "/api/v2/aibridge/interceptions",
        None,
    )
    .await;
    assert_error(&r, 401, "no key");
    assert_eq!(r.json["error"]["code"], "unauthorized");
    let r = get(
        &tg,
        "tg_000000000000000000000000000000000000000000000000",
        "/api/v2/usage",
    )
    .await;
    assert_error(&r, 401, "bad key");

    // The admin sees everything, newest first, in the contract's shape.
    let all = get_ok(&tg, &root, "/api/v2/aibridge/interceptions").await;
    assert_eq!(all["count"], 4);
    assert_eq!(
        ids(&all),
        vec![
            b_resp.clone(),
            a_claude.clone(),
            a_mini.clone(),
            a_chat.clone()
        ]
    );
    let claude = &all["results"][1];
    for field in [
        "id",
        "api_key_id",
        "initiator",
        "provider",
        "model",
        "client",
        "session_id",
        "thread_root_id",
        "credential_kind",
        "status",
        "started_at",
        "ended_at",
        "token_usage",
        "cost_usd",
        "cost_nano_usd",
        "user_prompts",
        "tool_usages",
    ] {
        assert!(claude.get(field).is_some(), "missing {field}: {claude}");
    }
    assert!(
        claude.get("model_thoughts").is_none(),
        "thoughts only on the single view"
    );
    assert_eq!(
        claude["initiator"],
        json!({"id": alice_id, "username": "alice"})
    );
    assert_eq!(claude["provider"], "anthropic");
    assert_eq!(claude["session_id"], a_claude.as_str());
    assert_eq!(claude["status"], "completed");
    assert_eq!(claude["credential_kind"], "central");
    assert_eq!(claude["credential_hint"], "sk-…cdef");
    assert_eq!(
        claude["token_usage"],
        json!({"input_tokens": 420, "output_tokens": 233, "cache_read_input_tokens": 9000,
               "cache_write_input_tokens": 1800, "reasoning_tokens": 0})
    );
    assert_eq!(claude["cost_usd"], "0.014205");
    assert_eq!(claude["usage_source"], "reported");
    assert_eq!(claude["cost_nano_usd"], 14_205_000);
    assert_eq!(claude["user_prompts"][0]["prompt"], "Fix the flaky test.");
    assert_eq!(
        claude["tool_usages"][0]["tool_call_id"],
        "toolu_01TGreadfile"
    );
    assert_eq!(claude["tool_usages"][0]["tool"], "read_file");
    assert_eq!(claude["tool_usages"][0]["injected"], false);
    let one = get_ok(
        &tg,
        &root,
        &format!("/api/v2/aibridge/interceptions/{a_claude}"),
    )
    .await;
    assert_eq!(one["model_thoughts"].as_array().unwrap().len(), 1);
    assert_eq!(one["model_thoughts"][0]["source"], "thinking");
    assert_eq!(one["tool_usages"], claude["tool_usages"]);
    bodies.push(all.to_string());

    // A member sees only their own, whatever they ask for.
    let mine = get_ok(&tg, &alice, "/api/v2/aibridge/interceptions").await;
    assert_eq!(mine["count"], 3);
    assert_eq!(
        ids(&mine),
        vec![a_claude.clone(), a_mini.clone(), a_chat.clone()]
    );
    for q in [
        "initiator:me",
        "initiator:alice",
        &format!("initiator:{alice_id}"),
    ] {
        let r = get_ok(
            &tg,
            &alice,
            &format!("/api/v2/aibridge/interceptions?q={}", enc(q)),
        )
        .await;
        assert_eq!(r["count"], 3, "{q}");
    }
    for q in [
        "initiator:bob",
        &format!("initiator:{bob_id}"),
        "initiator:nobody",
    ] {
        let r = get(
            &tg,
            &alice,
            &format!("/api/v2/aibridge/interceptions?q={}", enc(q)),
        )
        .await;
        assert_error(&r, 403, q);
        let r = get(
            &tg,
            &alice,
            &format!("/api/v2/aibridge/sessions?q={}", enc(q)),
        )
        .await;
        assert_error(&r, 403, q);
    }
    let r = get(
        &tg,
        &alice,
        &format!("/api/v2/aibridge/interceptions/{b_resp}"),
    )
    .await;
    assert_error(&r, 403, "another user's interception");
    let r = get(
        &tg,
        &alice,
        &format!("/api/v2/aibridge/sessions/{bob_id}:bob-s1"),
    )
    .await;
    assert_error(&r, 403, "another user's session");
    // The client's session id alone names no session: sessions are per user (issue 14).
    let r = get(&tg, &alice, "/api/v2/aibridge/sessions/bob-s1").await;
    assert_error(&r, 404, "a bare client session id");
    let own = get_ok(
        &tg,
        &alice,
        &format!("/api/v2/aibridge/interceptions/{a_mini}"),
    )
    .await;
    assert_eq!(own["session_id"], format!("{alice_id}:alice-s1"));
    assert_eq!(own["client_session_id"], "alice-s1");
    let sessions = get_ok(&tg, &alice, "/api/v2/aibridge/sessions").await;
    assert_eq!(sessions["count"], 3);
    assert_eq!(
        get_ok(&tg, &root, "/api/v2/aibridge/sessions").await["count"],
        4
    );
    let usage = get_ok(&tg, &alice, "/api/v2/usage?group_by=user").await;
    assert_eq!(usage["results"].as_array().unwrap().len(), 1);
    assert_eq!(usage["results"][0]["key"], alice_id.as_str());
    assert_eq!(usage["results"][0]["interception_count"], 3);
    let r = get(&tg, &alice, "/api/v2/usage?user=bob").await;
    assert_error(&r, 403, "member asking for another user's usage");
    assert_eq!(
        get_ok(&tg, &root, "/api/v2/usage?group_by=user").await["results"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    bodies.push(mine.to_string());
    bodies.push(sessions.to_string());

    // Every q filter, alone and combined (as the admin).
    let between_q = between.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let cases: Vec<(String, Vec<&String>)> = vec![
        ("initiator:bob".into(), vec![&b_resp]),
        (format!("initiator:{bob_id}"), vec![&b_resp]),
        ("initiator:me".into(), vec![]),
        ("initiator:nobody".into(), vec![]),
        ("provider:anthropic".into(), vec![&a_claude]),
        ("provider:openai".into(), vec![&b_resp, &a_mini, &a_chat]),
        ("model:gpt-4o-mini".into(), vec![&a_mini]),
        ("model:gpt-5-2025-08-07".into(), vec![&b_resp]),
        (
            "client:Unknown".into(),
            vec![&b_resp, &a_claude, &a_mini, &a_chat],
        ),
        ("client:\"Claude Code\"".into(), vec![]),
        (format!("session_id:{alice_id}:alice-s1"), vec![&a_mini]),
        (format!("session_id:{a_chat}"), vec![&a_chat]),
        (format!("started_after:{between_q}"), vec![&b_resp]),
        (
            format!("started_before:{between_q}"),
            vec![&a_claude, &a_mini, &a_chat],
        ),
        (
            "provider:openai initiator:alice".into(),
            vec![&a_mini, &a_chat],
        ),
        (
            format!("started_before:{between_q} model:gpt-4o-2024-08-06"),
            vec![&a_chat],
        ),
    ];
    for (q, expected) in cases {
        let r = get_ok(
            &tg,
            &root,
            &format!("/api/v2/aibridge/interceptions?q={}", enc(&q)),
        )
        .await;
        let expected: Vec<String> = expected.into_iter().cloned().collect();
        assert_eq!(ids(&r), expected, "q={q}");
        assert_eq!(r["count"], expected.len(), "q={q}");
        let s = get_ok(
            &tg,
            &root,
            &format!("/api/v2/aibridge/sessions?q={}", enc(&q)),
        )
        .await;
        let interceptions: i64 = s["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["interception_count"].as_i64().unwrap())
            .sum();
        assert_eq!(interceptions, expected.len() as i64, "sessions q={q}");
    }

    // Members are refused every admin route.
    let admin_routes = [
        (Method::GET, "/api/v2/users".to_string(), None),
        (
            Method::POST,
            "/api/v2/users".into(),
            Some(json!({"username": "mallory", "is_admin": true})),
        ),
        (Method::GET, format!("/api/v2/users/{alice_id}"), None),
        (
            Method::PATCH,
            format!("/api/v2/users/{alice_id}"),
            Some(json!({"is_admin": true})),
        ),
        (Method::DELETE, format!("/api/v2/users/{bob_id}"), None),
        (Method::GET, format!("/api/v2/users/{alice_id}/keys"), None),
        (
            Method::POST,
            format!("/api/v2/users/{alice_id}/keys"),
            Some(json!({"name": "x"})),
        ),
        (Method::GET, "/api/v2/groups".into(), None),
        (
            Method::POST,
            "/api/v2/groups".into(),
            Some(json!({"name": "g"})),
        ),
        (Method::GET, "/api/v2/budgets".into(), None),
        (
            Method::PUT,
            "/api/v2/budgets".into(),
            Some(json!({"scope": "default", "limit_usd": "1"})),
        ),
        (Method::DELETE, "/api/v2/budgets/default".into(), None),
        (Method::GET, "/api/v2/pricing".into(), None),
        (
            Method::PUT,
            "/api/v2/pricing/gpt-4o".into(),
            Some(json!({"input": "0", "output": "0", "cache_read": "0", "cache_write": "0"})),
        ),
        (Method::GET, "/api/v2/seats".into(), None),
    ];
    for (method, path, body) in admin_routes {
        let r = call(
            &tg,
            method.clone(),
            Some(&alice),
            &path,
            body.map(|b| b.to_string()),
        )
        .await;
        assert_error(&r, 403, &format!("member {method} {path}"));
    }
    // ... and nothing changed.
    let users: i64 = tg.scalar("SELECT COUNT(*) FROM users", &[]).await;
    assert_eq!(users, 3);
    let admin: bool = tg
        .scalar("SELECT is_admin FROM users WHERE username = 'alice'", &[])
        .await;
    assert!(!admin);

    // No secret anywhere in what the API returned.
    for body in &bodies {
        for secret in [&root, &alice, &bob] {
            assert!(!body.contains(&secret[3..]), "a Tollgate key leaked");
        }
        assert!(!body.contains(OPENAI_CENTRAL_KEY) && !body.contains(ANTHROPIC_CENTRAL_KEY));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_have_no_duplicates_or_gaps_while_new_interceptions_arrive() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let root = tg.admin_key("root");
    let alice = tg.user_key("alice");
    let mut original = Vec::new();
    for n in 0..12 {
        original.push(chat(&tg, &alice, "gpt-4o-mini", &format!("prompt {n}"), None).await);
    }
    tg.wait_until_recorded(12).await;

    // Interceptions: pages of 5, with new calls landing between page fetches.
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    let mut total = 12;
    loop {
        let path = match &after {
            None => "/api/v2/aibridge/interceptions?limit=5".to_string(),
            Some(a) => format!("/api/v2/aibridge/interceptions?limit=5&after_id={a}"),
        };
        let page = get_ok(&tg, &alice, &path).await;
        assert_eq!(
            page["count"], total,
            "count is the whole filter, not the page"
        );
        let page_ids = ids(&page);
        assert!(page_ids.len() <= 5);
        if page_ids.is_empty() {
            break;
        }
        seen.extend(page_ids.iter().cloned());
        after = page_ids.last().cloned();
        chat(&tg, &alice, "gpt-4o-mini", "meanwhile", None).await;
        total += 1;
        tg.wait_until_recorded(total).await;
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates");
    let mut expected = original.clone();
    expected.reverse();
    assert_eq!(
        seen, expected,
        "exactly the original interceptions, newest first"
    );

    // The admin's full listing is strictly ordered by id.
    let all = ids(&get_ok(&tg, &root, "/api/v2/aibridge/interceptions?limit=1000").await);
    assert_eq!(all.len() as i64, total);
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first");

    // Sessions (each call here is its own session): pages of 4 while new ones arrive.
    let before: BTreeSet<String> = all.iter().cloned().collect();
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            None => "/api/v2/aibridge/sessions?limit=4".to_string(),
            Some(a) => format!("/api/v2/aibridge/sessions?limit=4&after_id={a}"),
        };
        let page = get_ok(&tg, &alice, &path).await;
        let page_ids = session_ids(&page);
        if page_ids.is_empty() {
            break;
        }
        // Compared as times: RFC 3339 strings of a whole second ("…:12Z") and of a fraction
        // ("…:12.345Z") do not sort as text.
        let times: Vec<chrono::DateTime<chrono::FixedOffset>> = page["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                chrono::DateTime::parse_from_rfc3339(s["last_active_at"].as_str().unwrap()).unwrap()
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "by last activity");
        seen.extend(page_ids.iter().cloned());
        after = page_ids.last().cloned();
        chat(&tg, &alice, "gpt-4o-mini", "meanwhile", None).await;
        total += 1;
        tg.wait_until_recorded(total).await;
    }
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicate sessions");
    assert_eq!(unique, before, "every session that existed, once");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_group_client_sessions_tool_threads_and_lone_calls() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let alice = tg.user_key("alice");
    // Pauses keep the end times (millisecond resolution) distinct, so the order is certain.
    let pause = || tokio::time::sleep(Duration::from_millis(5));
    let w1 = chat(&tg, &alice, "gpt-4o-2024-08-06", "first", Some("work-1")).await;
    pause().await;
    let w2 = chat(&tg, &alice, "gpt-4o-mini", "second", Some("work-1")).await;
    pause().await;
    let root_call = messages(&tg, &alice, "Fix the flaky test.").await;
    pause().await;
    let followup = tool_result_followup(&tg, &alice).await;
    pause().await;
    let lone = chat(&tg, &alice, "gpt-4o-2024-08-06", "alone", None).await;
    tg.wait_until_recorded(5).await;
    // A client's session id names a session of that user (issue 14).
    let work_1 = format!("{}:work-1", user_id(&tg, "alice").await);

    let list = get_ok(&tg, &alice, "/api/v2/aibridge/sessions").await;
    assert_eq!(list["count"], 3);
    assert_eq!(
        session_ids(&list),
        vec![lone.clone(), root_call.clone(), work_1.clone()],
        "newest activity first"
    );
    let by_id = |id: &str| -> Value {
        list["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap()
    };

    // A client session id groups calls that are not otherwise related.
    let work = by_id(&work_1);
    assert_eq!(work["interception_count"], 2);
    assert_eq!(work["threads"], 2);
    assert_eq!(work["models"], json!(["gpt-4o-2024-08-06", "gpt-4o-mini"]));
    assert_eq!(work["providers"], json!(["openai"]));
    assert_eq!(work["client"], "Unknown");
    assert_eq!(work["initiator"]["username"], "alice");
    assert_eq!(work["last_prompt"], "second");
    assert_eq!(work["token_usage_summary"]["input_tokens"], 452);
    assert_eq!(work["token_usage_summary"]["cache_read_input_tokens"], 2048);
    let cost: i64 = tg
        .scalar(
            "SELECT CAST(SUM(cost_nano_usd) AS BIGINT) FROM interceptions WHERE session_key = ?",
            &[&work_1],
        )
        .await;
    assert_eq!(work["cost_nano_usd"], cost);
    assert_eq!(
        work["cost_usd"],
        tollgate::money::NanoUsd(cost).to_usd_string()
    );
    let time = |k: &str| chrono::DateTime::parse_from_rfc3339(work[k].as_str().unwrap()).unwrap();
    assert!(time("started_at") <= time("ended_at"));
    assert_eq!(work["ended_at"], work["last_active_at"]);

    // A tool result joins the thread of the call that made the tool call.
    let thread = by_id(&root_call);
    assert_eq!(thread["interception_count"], 2);
    assert_eq!(thread["threads"], 1);
    assert_eq!(thread["providers"], json!(["anthropic"]));
    assert_eq!(
        thread["last_prompt"], "Fix the flaky test.",
        "the follow-up has no prompt"
    );
    assert_eq!(thread["cost_nano_usd"], 2 * 14_205_000);
    let detail = get_ok(
        &tg,
        &alice,
        &format!("/api/v2/aibridge/sessions/{root_call}"),
    )
    .await;
    assert_eq!(detail["id"], root_call.as_str());
    assert_eq!(detail["interception_count"], 2);
    let threads = detail["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 1);
    assert_eq!(threads[0]["id"], root_call.as_str());
    assert_eq!(threads[0]["interception_count"], 2);
    let calls = threads[0]["interceptions"].as_array().unwrap();
    assert_eq!(calls[0]["id"], root_call.as_str(), "oldest first");
    assert_eq!(calls[1]["id"], followup.as_str());
    assert_eq!(calls[1]["thread_parent_id"], root_call.as_str());
    assert_eq!(calls[1]["thread_root_id"], root_call.as_str());
    assert_eq!(
        calls[0]["tool_usages"][0]["tool_call_id"],
        "toolu_01TGreadfile"
    );
    assert_eq!(calls[0]["model_thoughts"][0]["source"], "thinking");
    assert_eq!(threads[0]["cost_nano_usd"], 2 * 14_205_000);
    assert_eq!(threads[0]["token_usage"]["cache_write_input_tokens"], 3600);

    // The client session's detail: two threads of one call each, oldest first.
    let detail = get_ok(&tg, &alice, &format!("/api/v2/aibridge/sessions/{work_1}")).await;
    let threads = detail["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2);
    assert_eq!(threads[0]["interceptions"][0]["id"], w1.as_str());
    assert_eq!(threads[1]["interceptions"][0]["id"], w2.as_str());
    assert_eq!(detail["token_usage_summary"], work["token_usage_summary"]);

    // A lone call is a session of its own.
    let alone = by_id(&lone);
    assert_eq!(
        (
            alone["interception_count"].clone(),
            alone["threads"].clone()
        ),
        (json!(1), json!(1))
    );
    assert_eq!(alone["last_prompt"], "alone");

    // Filters apply before grouping.
    let r = get_ok(
        &tg,
        &alice,
        "/api/v2/aibridge/sessions?q=model%3Agpt-4o-mini",
    )
    .await;
    assert_eq!(session_ids(&r), vec![work_1.clone()]);
    assert_eq!(r["sessions"][0]["interception_count"], 1);
    assert_eq!(r["sessions"][0]["last_prompt"], "second");
    let r = get_ok(
        &tg,
        &alice,
        "/api/v2/aibridge/sessions?q=provider%3Aanthropic",
    )
    .await;
    assert_eq!(session_ids(&r), vec![root_call.clone()]);

    // Stored session keys agree with what the API grouped.
    let keys: Vec<String> = tg
        .column(
            "SELECT DISTINCT session_key FROM interceptions ORDER BY session_key",
            &[],
        )
        .await;
    let mut expected = vec![lone, root_call, work_1];
    expected.sort();
    assert_eq!(keys, expected);
    let r = get(&tg, &alice, "/api/v2/aibridge/sessions/no-such-session").await;
    assert_error(&r, 404, "unknown session");
}

/// (key, count, input, output, cache read, cache write, reasoning, cost) per group from SQL,
/// on either backend. `key` and `from` are written for SQLite; under PostgreSQL the few
/// expressions that differ (ids as text, the UTC day) are swapped for their equivalents.
async fn sql_rollup(tg: &Tollgate, key: &str, from: &str) -> Vec<(String, i64, [i64; 6])> {
    let sums = "COUNT(*), CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(output_tokens) AS BIGINT), \
         CAST(SUM(cache_read_input_tokens) AS BIGINT), CAST(SUM(cache_write_input_tokens) AS BIGINT), \
         CAST(SUM(reasoning_tokens) AS BIGINT), CAST(SUM(cost_nano_usd) AS BIGINT)";
    if !common::server::on_postgres() {
        let db = tg.db().await;
        let rows = sqlx::query(&format!(
            "SELECT {key} AS k, {sums} FROM {from} GROUP BY k ORDER BY k"
        ))
        .fetch_all(&db)
        .await
        .unwrap();
        return rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    r.get::<i64, _>(1),
                    [r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7)],
                )
            })
            .collect();
    }
    let key = match key {
        "user_id" | "g.id" => format!("CAST({key} AS TEXT)"),
        k if k.starts_with("strftime(") => {
            "to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')".to_string()
        }
        k => k.to_string(),
    };
    let db = sqlx::PgPool::connect(&tg.db_url).await.unwrap();
    let rows = sqlx::query(&format!(
        "SELECT {key} AS k, {sums} FROM {from} GROUP BY k ORDER BY k"
    ))
    .fetch_all(&db)
    .await
    .unwrap();
    db.close().await;
    rows.iter()
        .map(|r| {
            (
                r.get::<String, _>(0),
                r.get::<i64, _>(1),
                [r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7)],
            )
        })
        .collect()
}

fn api_rollup(report: &Value) -> Vec<(String, i64, [i64; 6])> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let u = &r["token_usage"];
            assert_eq!(
                r["cost_usd"].as_str().unwrap(),
                tollgate::money::NanoUsd(r["cost_nano_usd"].as_i64().unwrap()).to_usd_string()
            );
            (
                r["key"].as_str().unwrap().to_string(),
                r["interception_count"].as_i64().unwrap(),
                [
                    u["input_tokens"].as_i64().unwrap(),
                    u["output_tokens"].as_i64().unwrap(),
                    u["cache_read_input_tokens"].as_i64().unwrap(),
                    u["cache_write_input_tokens"].as_i64().unwrap(),
                    u["reasoning_tokens"].as_i64().unwrap(),
                    r["cost_nano_usd"].as_i64().unwrap(),
                ],
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_rollups_equal_the_sums_of_recorded_interceptions() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let root = tg.admin_key("root");
    for (name, groups) in [
        ("alice", vec!["eng", "ops"]),
        ("bob", vec!["eng"]),
        ("carol", vec![]),
    ] {
        let mut args = vec!["users", "create", name];
        for g in &groups {
            args.extend(["--group", g]);
        }
        assert!(tg.cli(&args).status.success());
    }
    let alice = tg.user_key("alice");
    let bob = tg.user_key("bob");
    let carol = tg.user_key("carol");
    chat(&tg, &alice, "gpt-4o-2024-08-06", "a", None).await;
    chat(&tg, &alice, "gpt-4o-mini", "b", None).await;
    messages(&tg, &alice, "c").await;
    responses(&tg, &bob, None).await;
    chat(&tg, &bob, "gpt-4o-mini", "d", None).await;
    messages(&tg, &carol, "e").await;
    tg.wait_until_recorded(6).await;

    for (group_by, key) in [
        ("user", "user_id"),
        ("model", "model"),
        ("provider", "provider"),
        ("client", "client"),
        (
            "day",
            "strftime('%Y-%m-%d', started_at / 1000, 'unixepoch')",
        ),
    ] {
        let report = get_ok(&tg, &root, &format!("/api/v2/usage?group_by={group_by}")).await;
        assert_eq!(report["group_by"], group_by);
        assert_eq!(
            api_rollup(&report),
            sql_rollup(&tg, key, "interceptions").await,
            "group_by={group_by}"
        );
    }
    // Groups go through group_members: alice counts in eng and ops, carol in neither.
    let report = get_ok(&tg, &root, "/api/v2/usage?group_by=group").await;
    let expected = sql_rollup(
        &tg,
        "g.id",
        "interceptions i JOIN group_members gm ON gm.user_id = i.user_id JOIN groups g ON g.id = gm.group_id",
    )
    .await;
    assert_eq!(api_rollup(&report), expected);
    let names: Vec<&str> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["group"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    let eng = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"]["name"] == "eng")
        .unwrap();
    assert_eq!(eng["interception_count"], 5);

    // Filters: user, model, dates.
    let alice_id = user_id(&tg, "alice").await;
    let r = get_ok(&tg, &root, "/api/v2/usage?group_by=model&user=alice").await;
    assert_eq!(
        api_rollup(&r),
        sql_rollup(
            &tg,
            "model",
            &format!("interceptions WHERE user_id = '{alice_id}'")
        )
        .await
    );
    let r = get_ok(&tg, &root, "/api/v2/usage?group_by=user&model=gpt-4o-mini").await;
    assert_eq!(
        api_rollup(&r),
        sql_rollup(&tg, "user_id", "interceptions WHERE model = 'gpt-4o-mini'").await
    );
    let today = Utc::now().date_naive();
    let yesterday = today.pred_opt().unwrap();
    let r = get_ok(
        &tg,
        &root,
        &format!("/api/v2/usage?group_by=day&to={yesterday}"),
    )
    .await;
    assert_eq!(r["count"], 0);
    let r = get_ok(
        &tg,
        &root,
        &format!("/api/v2/usage?group_by=day&from={today}&to={today}"),
    )
    .await;
    assert_eq!(
        api_rollup(&r),
        sql_rollup(
            &tg,
            "strftime('%Y-%m-%d', started_at / 1000, 'unixepoch')",
            "interceptions"
        )
        .await
    );
    let r = get_ok(
        &tg,
        &root,
        "/api/v2/usage?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z",
    )
    .await;
    assert_eq!(r["count"], 0);
    // A member's usage is their own, whatever they group by.
    let r = get_ok(&tg, &carol, "/api/v2/usage?group_by=provider").await;
    assert_eq!(r["results"][0]["interception_count"], 1);
    assert_eq!(r["results"][0]["key"], "anthropic");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_a_4xx_with_a_message_never_a_500() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let root = tg.admin_key("root");
    let alice = tg.user_key("alice");
    chat(&tg, &alice, "gpt-4o-mini", "hi", None).await;
    tg.wait_until_recorded(1).await;
    let alice_id = user_id(&tg, "alice").await;
    let group = send_json(
        &tg,
        Method::POST,
        &root,
        "/api/v2/groups",
        json!({"name": "eng"}),
    )
    .await;
    assert_eq!(group.status, 201, "{}", group.text);
    let group_id = group.json["id"].as_str().unwrap().to_string();
    let random = uuid::Uuid::new_v4();
    let price = json!({"input": "1", "output": "1", "cache_read": "1", "cache_write": "1"});

    let cases: Vec<(Method, String, Option<String>, u16, &str)> = vec![
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?q=color%3Ared".into(),
            None,
            400,
            "color:red",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?q=started_after%3Ayesterday".into(),
            None,
            400,
            "started_after:yesterday",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?q=started_before%3A2025-13-01".into(),
            None,
            400,
            "started_before",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?q=model".into(),
            None,
            400,
            "model",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?q=model%3A".into(),
            None,
            400,
            "no value",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?q=client%3A%22open".into(),
            None,
            400,
            "quote",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?limit=0".into(),
            None,
            400,
            "limit",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?limit=5000".into(),
            None,
            400,
            "limit",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?limit=ten".into(),
            None,
            400,
            "limit",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?limit=-1".into(),
            None,
            400,
            "limit",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?after_id=not-a-cursor".into(),
            None,
            400,
            "after_id",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?colour=red".into(),
            None,
            400,
            "colour",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions?limit=1&limit=2".into(),
            None,
            400,
            "more than once",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/interceptions/not-an-id".into(),
            None,
            400,
            "not-an-id",
        ),
        (
            Method::GET,
            format!("/api/v2/aibridge/interceptions/{random}"),
            None,
            404,
            "not found",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/sessions?after_id=no-such-session".into(),
            None,
            400,
            "after_id",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/sessions?limit=0".into(),
            None,
            400,
            "limit",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/sessions?limit=5000".into(),
            None,
            400,
            "limit",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/sessions?q=bad%3Aterm".into(),
            None,
            400,
            "bad:term",
        ),
        (
            Method::GET,
            "/api/v2/aibridge/sessions/no-such-session".into(),
            None,
            404,
            "not found",
        ),
        (
            Method::GET,
            "/api/v2/usage?group_by=planet".into(),
            None,
            400,
            "planet",
        ),
        (
            Method::GET,
            "/api/v2/usage?from=soon".into(),
            None,
            400,
            "from",
        ),
        (
            Method::GET,
            "/api/v2/usage?from=2025-02-01&to=2025-01-01".into(),
            None,
            400,
            "earlier",
        ),
        (
            Method::GET,
            "/api/v2/users?limit=0".into(),
            None,
            400,
            "limit",
        ),
        (
            Method::GET,
            "/api/v2/users?after_id=nope".into(),
            None,
            400,
            "after_id",
        ),
        (
            Method::GET,
            format!("/api/v2/users?after_id={random}"),
            None,
            400,
            "after_id",
        ),
        (
            Method::GET,
            "/api/v2/users/not-an-id".into(),
            None,
            400,
            "not-an-id",
        ),
        (
            Method::GET,
            format!("/api/v2/users/{random}"),
            None,
            404,
            "not found",
        ),
        (
            Method::POST,
            "/api/v2/users".into(),
            Some("this is not json".into()),
            400,
            "JSON",
        ),
        (
            Method::POST,
            "/api/v2/users".into(),
            Some(String::new()),
            400,
            "JSON",
        ),
        (
            Method::POST,
            "/api/v2/users".into(),
            Some(r#"{"username": 5}"#.into()),
            422,
            "invalid type",
        ),
        (
            Method::POST,
            "/api/v2/users".into(),
            Some(r#"{"name": "x"}"#.into()),
            422,
            "name",
        ),
        (
            Method::POST,
            "/api/v2/users".into(),
            Some(r#"{"username": "bad name"}"#.into()),
            422,
            "username",
        ),
        (
            Method::POST,
            "/api/v2/users".into(),
            Some(r#"{"username": "alice"}"#.into()),
            409,
            "already exists",
        ),
        (
            Method::PATCH,
            format!("/api/v2/users/{random}"),
            Some(r#"{"is_admin": true}"#.into()),
            404,
            "not found",
        ),
        (
            Method::PATCH,
            format!("/api/v2/users/{alice_id}"),
            Some("{".into()),
            400,
            "JSON",
        ),
        (
            Method::PATCH,
            format!("/api/v2/users/{alice_id}"),
            Some(r#"{"is_admin": "yes"}"#.into()),
            422,
            "boolean",
        ),
        (
            Method::DELETE,
            format!("/api/v2/users/{random}"),
            None,
            404,
            "not found",
        ),
        (
            Method::GET,
            format!("/api/v2/users/{random}/keys"),
            None,
            404,
            "not found",
        ),
        (
            Method::POST,
            format!("/api/v2/users/{random}/keys"),
            Some(r#"{"name": "x"}"#.into()),
            404,
            "not found",
        ),
        (
            Method::POST,
            format!("/api/v2/users/{alice_id}/keys"),
            Some(format!(r#"{{"name": "{}"}}"#, "x".repeat(65))),
            422,
            "name",
        ),
        (
            Method::DELETE,
            format!("/api/v2/users/{alice_id}/keys/{random}"),
            None,
            404,
            "no key",
        ),
        (
            Method::DELETE,
            format!("/api/v2/users/{alice_id}/keys/xyz"),
            None,
            400,
            "xyz",
        ),
        (
            Method::POST,
            "/api/v2/groups".into(),
            Some(r#"{"name": "eng"}"#.into()),
            409,
            "already exists",
        ),
        (
            Method::POST,
            "/api/v2/groups".into(),
            Some(r#"{"name": ""}"#.into()),
            422,
            "group",
        ),
        (
            Method::GET,
            format!("/api/v2/groups/{random}"),
            None,
            404,
            "not found",
        ),
        (
            Method::DELETE,
            format!("/api/v2/groups/{random}"),
            None,
            404,
            "not found",
        ),
        (
            Method::POST,
            format!("/api/v2/groups/{random}/members"),
            Some(format!(r#"{{"user_id": "{alice_id}"}}"#)),
            404,
            "group",
        ),
        (
            Method::POST,
            format!("/api/v2/groups/{group_id}/members"),
            Some(format!(r#"{{"user_id": "{random}"}}"#)),
            404,
            "user",
        ),
        (
            Method::POST,
            format!("/api/v2/groups/{group_id}/members"),
            Some(r#"{"user_id": "alice"}"#.into()),
            422,
            "request body",
        ),
        (
            Method::DELETE,
            format!("/api/v2/groups/{group_id}/members/{alice_id}"),
            None,
            404,
            "not a member",
        ),
        (
            Method::PUT,
            "/api/v2/budgets".into(),
            Some("[1,2".into()),
            400,
            "JSON",
        ),
        (
            Method::PUT,
            "/api/v2/budgets".into(),
            Some(r#"{"scope": "planet", "limit_usd": "1"}"#.into()),
            422,
            "planet",
        ),
        (
            Method::PUT,
            "/api/v2/budgets".into(),
            Some(r#"{"scope": "default", "limit_usd": "-5"}"#.into()),
            422,
            "negative",
        ),
        (
            Method::PUT,
            "/api/v2/budgets".into(),
            Some(r#"{"scope": "default", "limit_usd": "lots"}"#.into()),
            422,
            "limit_usd",
        ),
        (
            Method::PUT,
            "/api/v2/budgets".into(),
            Some(r#"{"scope": "default", "limit_usd": 5}"#.into()),
            422,
            "invalid type",
        ),
        (
            Method::PUT,
            "/api/v2/budgets".into(),
            Some(r#"{"scope": "user", "limit_usd": "5"}"#.into()),
            422,
            "scope_id",
        ),
        (
            Method::POST,
            "/api/v2/budgets".into(),
            Some(format!(
                r#"{{"scope": "user", "scope_id": "{random}", "limit_usd": "5"}}"#
            )),
            404,
            "not found",
        ),
        (
            Method::DELETE,
            "/api/v2/budgets/default".into(),
            None,
            404,
            "no such",
        ),
        (
            Method::DELETE,
            "/api/v2/budgets/user".into(),
            None,
            400,
            "scope_id",
        ),
        (
            Method::DELETE,
            format!("/api/v2/budgets/planet/{random}"),
            None,
            400,
            "planet",
        ),
        (
            Method::DELETE,
            "/api/v2/budgets/user/xyz".into(),
            None,
            400,
            "xyz",
        ),
        (
            Method::PUT,
            "/api/v2/pricing/my-model".into(),
            Some(r#"{"input": "1"}"#.into()),
            422,
            "output",
        ),
        (
            Method::PUT,
            "/api/v2/pricing/my-model".into(),
            Some(
                json!({"input": "x", "output": "1", "cache_read": "1", "cache_write": "1"})
                    .to_string(),
            ),
            422,
            "input",
        ),
        (
            Method::PUT,
            "/api/v2/pricing/my-model".into(),
            Some(
                json!({"input": "-1", "output": "1", "cache_read": "1", "cache_write": "1"})
                    .to_string(),
            ),
            422,
            "negative",
        ),
        (
            Method::PUT,
            "/api/v2/pricing/my-model".into(),
            Some("nope".into()),
            400,
            "JSON",
        ),
        (
            Method::DELETE,
            "/api/v2/pricing/no-such-model".into(),
            None,
            404,
            "no price override",
        ),
        (
            Method::GET,
            "/api/v2/pricing?model=x".into(),
            None,
            400,
            "model",
        ),
        (
            Method::GET,
            "/api/v2/no-such-route".into(),
            None,
            404,
            "no API route",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let r = call(&tg, method.clone(), Some(&root), &path, body.clone()).await;
        let what = format!("{method} {path} {body:?}");
        assert_error(&r, status, &what);
        assert!(r.content_type.starts_with("application/json"), "{what}");
        let message = r.json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{what}: {message:?} should mention {needle:?}"
        );
    }
    // A valid price still works after all that, and deleting yourself is refused.
    let r = send_json(&tg, Method::PUT, &root, "/api/v2/pricing/my-model", price).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let root_id = user_id(&tg, "root").await;
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        &format!("/api/v2/users/{root_id}"),
        None,
    )
    .await;
    assert_error(&r, 409, "delete yourself");
    let r = send_json(
        &tg,
        Method::PATCH,
        &root,
        &format!("/api/v2/users/{root_id}"),
        json!({"is_admin": false}),
    )
    .await;
    assert_error(&r, 409, "demote yourself");
}

/// Every (method, path) this API serves. `/api/v2/users/me/*` belongs to the budgets work and is
/// checked for being served, not listed here.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v2/aibridge/interceptions"),
    ("get", "/api/v2/aibridge/interceptions/{id}"),
    ("get", "/api/v2/aibridge/sessions"),
    ("get", "/api/v2/aibridge/sessions/{id}"),
    ("get", "/api/v2/aibridge/proxy/ca-cert.pem"),
    ("get", "/api/v2/usage"),
    ("get", "/api/v2/seats"),
    ("get", "/api/v2/users"),
    ("post", "/api/v2/users"),
    ("get", "/api/v2/users/{id}"),
    ("patch", "/api/v2/users/{id}"),
    ("delete", "/api/v2/users/{id}"),
    ("get", "/api/v2/users/{id}/keys"),
    ("post", "/api/v2/users/{id}/keys"),
    ("delete", "/api/v2/users/{id}/keys/{key_id}"),
    ("get", "/api/v2/groups"),
    ("post", "/api/v2/groups"),
    ("get", "/api/v2/groups/{id}"),
    ("delete", "/api/v2/groups/{id}"),
    ("post", "/api/v2/groups/{id}/members"),
    ("delete", "/api/v2/groups/{id}/members/{user_id}"),
    ("get", "/api/v2/budgets"),
    ("put", "/api/v2/budgets"),
    ("post", "/api/v2/budgets"),
    ("delete", "/api/v2/budgets/{scope}"),
    ("delete", "/api/v2/budgets/{scope}/{scope_id}"),
    ("get", "/api/v2/pricing"),
    ("put", "/api/v2/pricing/{model}"),
    ("delete", "/api/v2/pricing/{model}"),
    ("get", "/api/v2/openapi.json"),
    ("get", "/metrics"),
    ("get", "/healthz"),
    ("get", "/readyz"),
];

/// Follows a local `$ref` (`#/components/schemas/X`) in `doc`.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    let path = reference.strip_prefix("#/")?;
    path.split('/').try_fold(doc, |node, part| node.get(part))
}

fn check_refs(doc: &Value, node: &Value, problems: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                if resolve(doc, r).is_none() {
                    problems.push(format!("dangling $ref {r}"));
                }
            }
            for v in map.values() {
                check_refs(doc, v, problems);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| check_refs(doc, v, problems)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_is_valid_and_matches_the_served_routes() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let root = tg.admin_key("root");
    let r = call(&tg, Method::GET, None, "/api/v2/openapi.json", None).await;
    assert_error(&r, 401, "openapi without a key");
    let r = get(&tg, &root, "/api/v2/openapi.json").await;
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("application/json"));
    let doc = r.json;

    // Well-formed OpenAPI 3.
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    assert!(doc["components"]["securitySchemes"]["tollgate_key"]["scheme"] == "bearer");
    let methods = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    let mut documented = BTreeSet::new();
    let mut operation_ids = HashSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        assert!(path.starts_with('/'), "{path}");
        for (method, op) in item.as_object().unwrap() {
            if !methods.contains(&method.as_str()) {
                continue;
            }
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {path}: no responses"));
            assert!(!responses.is_empty(), "{method} {path}: no responses");
            for code in responses.keys() {
                assert!(
                    code == "default" || code.parse::<u16>().is_ok(),
                    "{method} {path}: response {code}"
                );
            }
            let op_id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(
                operation_ids.insert(op_id.to_string()),
                "duplicate operationId {op_id}"
            );
            // Every path parameter is declared.
            for name in path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            {
                let declared = op["parameters"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["in"] == "path"));
                assert!(
                    declared,
                    "{method} {path}: path parameter {name} undeclared"
                );
            }
            documented.insert((method.clone(), path.clone()));
        }
    }
    let mut problems = Vec::new();
    check_refs(&doc, &doc, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");

    // The document lists exactly the routes served (besides /users/me/*, owned elsewhere) ...
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let listed: BTreeSet<(String, String)> = documented
        .iter()
        .filter(|(_, p)| !p.starts_with("/api/v2/users/me/"))
        .cloned()
        .collect();
    assert_eq!(listed, expected);

    // ... and the server answers every documented operation (never the no-route 404 or a 405).
    for (method, path) in &documented {
        let concrete: String = path
            .split('/')
            .map(|seg| match seg {
                "{scope}" => "default".to_string(),
                s if s.starts_with('{') => uuid::Uuid::new_v4().to_string(),
                s => s.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = matches!(method.as_str(), "post" | "put" | "patch").then(|| "{}".to_string());
        let r = call(&tg, m, Some(&root), &concrete, body).await;
        assert!(
            r.status != 405 && r.json["error"]["code"] != "no_route",
            "{method} {concrete}: {} {}",
            r.status,
            r.text
        );
        assert!(
            r.status < 500 || concrete == "/readyz",
            "{method} {concrete}: {}",
            r.text
        );
        for secret in [&root[3..], OPENAI_CENTRAL_KEY, ANTHROPIC_CENTRAL_KEY] {
            assert!(
                !r.text.contains(secret),
                "{method} {concrete} leaked a secret"
            );
        }
    }
    // An undocumented path is not served.
    let r = get(&tg, &root, "/api/v2/aibridge/interceptions/x/y").await;
    assert_eq!(r.json["error"]["code"], "no_route");
}

#[tokio::test(flavor = "multi_thread")]
async fn admins_manage_users_groups_keys_budgets_pricing_and_seats() {
    let upstream = upstream().await;
    let tg = start(&upstream, "[seats]\nlimit = 2\n").await;
    let root = tg.admin_key("root");
    let mut bodies: Vec<String> = Vec::new();

    // Users.
    let r = send_json(
        &tg,
        Method::POST,
        &root,
        "/api/v2/users",
        json!({"username": "dave", "groups": ["eng"]}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["username"], "dave");
    assert_eq!(r.json["is_admin"], false);
    assert_eq!(r.json["groups"][0]["name"], "eng");
    let dave = r.json["id"].as_str().unwrap().to_string();
    for n in 0..3 {
        let r = send_json(
            &tg,
            Method::POST,
            &root,
            "/api/v2/users",
            json!({"username": format!("u{n}")}),
        )
        .await;
        assert_eq!(r.status, 201);
    }
    let r = send_json(
        &tg,
        Method::PATCH,
        &root,
        &format!("/api/v2/users/{dave}"),
        json!({"is_admin": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["is_admin"], true);
    assert_eq!(
        get_ok(&tg, &root, &format!("/api/v2/users/{dave}")).await["is_admin"],
        true
    );
    // Paging through users one at a time visits each once.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            None => "/api/v2/users?limit=1".to_string(),
            Some(a) => format!("/api/v2/users?limit=1&after_id={a}"),
        };
        let page = get_ok(&tg, &root, &path).await;
        assert_eq!(page["count"], 5);
        let Some(u) = page["users"].as_array().unwrap().first() else {
            break;
        };
        seen.push(u["username"].as_str().unwrap().to_string());
        after = Some(u["id"].as_str().unwrap().to_string());
        assert!(seen.len() <= 5);
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 5, "{seen:?}");

    // Keys: the secret once, then only hints; it works on the gateway until revoked.
    let r = send_json(
        &tg,
        Method::POST,
        &root,
        &format!("/api/v2/users/{dave}/keys"),
        json!({"name": "laptop"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let secret = r.json["secret"].as_str().unwrap().to_string();
    let key_id = r.json["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tg_"));
    assert_eq!(
        r.json["hint"],
        format!("tg_…{}", &secret[secret.len() - 4..])
    );
    let keys = get(&tg, &root, &format!("/api/v2/users/{dave}/keys")).await;
    assert_eq!(keys.json["count"], 1);
    assert_eq!(keys.json["keys"][0]["name"], "laptop");
    assert!(keys.json["keys"][0].get("secret").is_none());
    bodies.push(keys.text.clone());
    chat(&tg, &secret, "gpt-4o-mini", "with the new key", None).await;
    chat(&tg, &root, "gpt-4o-mini", "root too", None).await;
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        &format!("/api/v2/users/{dave}/keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let refused = http()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .bearer_auth(&secret)
        .json(&json!({"model": "gpt-4o-mini", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "revoked at once on this replica");
    let keys = get_ok(&tg, &root, &format!("/api/v2/users/{dave}/keys")).await;
    assert!(keys["keys"][0]["revoked_at"].is_string());

    // Seats: two users have used AI of a limit of two.
    tg.wait_until_recorded(2).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let seats = loop {
        let s = get_ok(&tg, &root, "/api/v2/seats").await;
        if s["actual"] == 2 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seats["limit"], 2);
    assert_eq!(seats["actual"], 2);
    assert_eq!(seats["percent"], 100);
    assert_eq!(seats["state"], "warning");
    assert_eq!(seats["message"], "You have used 100% of your AI seats.");
    let holders: BTreeSet<&str> = seats["holders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["user"]["username"].as_str().unwrap())
        .collect();
    assert_eq!(holders, BTreeSet::from(["dave", "root"]));
    assert!(seats["holders"][0]["first_used_at"].is_string());

    // Groups and membership.
    let r = send_json(
        &tg,
        Method::POST,
        &root,
        "/api/v2/groups",
        json!({"name": "ops"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let ops = r.json["id"].as_str().unwrap().to_string();
    let r = send_json(
        &tg,
        Method::POST,
        &root,
        &format!("/api/v2/groups/{ops}/members"),
        json!({"user_id": dave}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["members"], json!([{"id": dave, "username": "dave"}]));
    let r = send_json(
        &tg,
        Method::POST,
        &root,
        &format!("/api/v2/groups/{ops}/members"),
        json!({"user_id": dave}),
    )
    .await;
    assert_eq!(r.status, 200, "adding twice is harmless");
    let groups = get_ok(&tg, &root, "/api/v2/groups").await;
    assert_eq!(groups["count"], 2);
    let ops_listed = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "ops")
        .unwrap();
    assert_eq!(ops_listed["member_count"], 1);
    let user = get_ok(&tg, &root, &format!("/api/v2/users/{dave}")).await;
    let names: Vec<&str> = user["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["eng", "ops"]);
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        &format!("/api/v2/groups/{ops}/members/{dave}"),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        get_ok(&tg, &root, &format!("/api/v2/groups/{ops}")).await["members"],
        json!([])
    );

    // Budgets: stored in nano-USD, shown as decimal strings.
    let eng: String = tg
        .scalar(
            "SELECT CAST(id AS TEXT) FROM groups WHERE name = 'eng'",
            &[],
        )
        .await;
    for (method, body) in [
        (Method::PUT, json!({"scope": "default", "limit_usd": "100"})),
        (
            Method::POST,
            json!({"scope": "group", "scope_id": eng, "limit_usd": "250.5"}),
        ),
        (
            Method::PUT,
            json!({"scope": "user", "scope_id": dave, "limit_usd": "0.000000001"}),
        ),
        (
            Method::PUT,
            json!({"scope": "default", "limit_usd": "100.00"}),
        ),
    ] {
        let r = send_json(&tg, method, &root, "/api/v2/budgets", body.clone()).await;
        assert_eq!(r.status, 200, "{body}: {}", r.text);
    }
    let budgets = get_ok(&tg, &root, "/api/v2/budgets").await;
    assert_eq!(budgets["count"], 3);
    let shown: Vec<(String, String, i64)> = budgets["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["scope"].as_str().unwrap().to_string(),
                b["limit_usd"].as_str().unwrap().to_string(),
                b["limit_nano_usd"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            ("default".into(), "100.00".into(), 100_000_000_000),
            ("group".into(), "250.50".into(), 250_500_000_000),
            ("user".into(), "0.000000001".into(), 1),
        ]
    );
    assert_eq!(budgets["budgets"][1]["scope_name"], "eng");
    assert_eq!(budgets["budgets"][2]["scope_id"], dave.as_str());
    let stored: i64 = tg
        .scalar(
            "SELECT limit_nano_usd FROM spend_limits WHERE scope = 'group'",
            &[],
        )
        .await;
    assert_eq!(stored, 250_500_000_000);
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        &format!("/api/v2/budgets/user/{dave}"),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        "/api/v2/budgets/default",
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(get_ok(&tg, &root, "/api/v2/budgets").await["count"], 1);

    // Pricing: the shipped book, overridden per model, and back.
    let prices = get_ok(&tg, &root, "/api/v2/pricing").await;
    let find = |prices: &Value, model: &str| -> Option<Value> {
        prices["prices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["model"] == model)
            .cloned()
    };
    let builtin = find(&prices, "gpt-4o").expect("gpt-4o in the shipped book");
    assert_eq!(builtin["source"], "builtin");
    assert_eq!(builtin["input"], "2.50");
    assert_eq!(prices["count"], prices["prices"].as_array().unwrap().len());
    let r = send_json(
        &tg,
        Method::PUT,
        &root,
        "/api/v2/pricing/gpt-4o",
        json!({"input": "1", "output": "2.000", "cache_read": "0.125", "cache_write": "0"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["source"], "override");
    assert_eq!(r.json["provider"], builtin["provider"]);
    let r = send_json(&tg, Method::PUT, &root, "/api/v2/pricing/house-model",
        json!({"provider": "openai", "input": "0.1", "output": "0.2", "cache_read": "0.1", "cache_write": "0.1", "output_limit": 4096})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let prices = get_ok(&tg, &root, "/api/v2/pricing").await;
    let o = find(&prices, "gpt-4o").unwrap();
    assert_eq!(
        (
            o["source"].as_str(),
            o["input"].as_str(),
            o["cache_read"].as_str()
        ),
        (Some("override"), Some("1.00"), Some("0.125"))
    );
    assert_eq!(find(&prices, "house-model").unwrap()["output_limit"], 4096);
    let nano: i64 = tg
        .scalar(
            "SELECT cache_read_nano FROM pricing WHERE model = 'gpt-4o'",
            &[],
        )
        .await;
    assert_eq!(nano, 125_000_000);
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        "/api/v2/pricing/gpt-4o",
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        find(&get_ok(&tg, &root, "/api/v2/pricing").await, "gpt-4o").unwrap(),
        builtin
    );

    // Deleting: a group takes its limit with it; a user takes their keys and memberships.
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        &format!("/api/v2/groups/{eng}"),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(get_ok(&tg, &root, "/api/v2/budgets").await["count"], 0);
    let r = call(
        &tg,
        Method::DELETE,
        Some(&root),
        &format!("/api/v2/users/{dave}"),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        get(&tg, &root, &format!("/api/v2/users/{dave}"))
            .await
            .status,
        404
    );
    let left: i64 = tg
        .scalar(
            "SELECT COUNT(*) FROM api_keys WHERE CAST(user_id AS TEXT) = ?",
            &[dave.as_str()],
        )
        .await;
    assert_eq!(left, 0);
    // Their history stays, attributed to the (now unnamed) id.
    let all = get_ok(&tg, &root, "/api/v2/aibridge/interceptions").await;
    assert_eq!(all["count"], 2);

    for body in &bodies {
        assert!(!body.contains(&secret[3..]) && !body.contains(&root[3..]));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_ca_certificate_is_served_only_when_the_proxy_is_on() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let r = call(
        &tg,
        Method::GET,
        None,
        "/api/v2/aibridge/proxy/ca-cert.pem",
        None,
    )
    .await;
    assert_error(&r, 404, "proxy off");
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not enabled"));
    // /metrics names the retention counter (the purge ran once at start).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = call(&tg, Method::GET, None, "/metrics", None).await;
        assert_eq!(metrics.status, 200);
        if metrics.text.contains("tollgate_retention_purged_total") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", metrics.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tg);

    // With the proxy on (its CA made by `tollgate ca init`), the certificate is served as is.
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .proxy("")
        .start()
        .await;
    let r = call(
        &tg,
        Method::GET,
        None,
        "/api/v2/aibridge/proxy/ca-cert.pem",
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.content_type, "application/x-pem-file");
    assert_eq!(r.text, tg.proxy_ca_pem());
    assert!(r.text.starts_with("-----BEGIN CERTIFICATE-----"));
}

// ---- retention (library) -----------------------------------------------------------------------

/// Writes one interception with a row in every child table, ended `age` ago.
async fn insert_old_row(
    db: &mut sqlx::SqliteConnection,
    now: chrono::DateTime<Utc>,
    age: chrono::Duration,
) -> String {
    let id = uuid::Uuid::now_v7().to_string();
    let ended = (now - age).timestamp_millis();
    sqlx::query(
        "INSERT INTO interceptions (id, user_id, provider, provider_kind, endpoint, model, client, session_key, \
         credential_kind, status, streaming, started_at, ended_at, priced) \
         VALUES (?, '00000000-0000-7000-8000-000000000001', 'openai', 'openai', 'chat', 'gpt-4o', 'Unknown', ?, 'central', 'completed', 0, ?, ?, 1)",
    )
    .bind(&id)
    .bind(&id)
    .bind(ended - 1000)
    .bind(ended)
    .execute(&mut *db)
    .await
    .unwrap();
    for sql in [
        "INSERT INTO token_usages (interception_id, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_tokens, created_at) VALUES (?, 1, 1, 0, 0, 0, 0)",
        "INSERT INTO user_prompts (interception_id, prompt, created_at) VALUES (?, 'p', 0)",
        "INSERT INTO tool_usages (interception_id, tool_call_id, tool, input, created_at) VALUES (?, 'c', 't', '{}', 0)",
        "INSERT INTO model_thoughts (interception_id, content, source, created_at) VALUES (?, 'x', 'thinking', 0)",
    ] {
        sqlx::query(sql).bind(&id).execute(&mut *db).await.unwrap();
    }
    id
}

async fn count(db: &SqlitePool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_exactly_the_old_interceptions_and_their_children() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = tollgate::store::Store::connect(&format!("sqlite://{}", path.display()), 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let db = SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .foreign_keys(true),
    )
    .await
    .unwrap();

    let now = Utc::now();
    let days = chrono::Duration::days;
    let mut old = BTreeSet::new();
    let mut kept = BTreeSet::new();
    let mut tx = db.begin().await.unwrap();
    for _ in 0..2503 {
        old.insert(insert_old_row(&mut tx, now, days(61)).await);
    }
    old.insert(insert_old_row(&mut tx, now, days(60) + chrono::Duration::milliseconds(1)).await);
    kept.insert(insert_old_row(&mut tx, now, days(60) - chrono::Duration::minutes(1)).await);
    kept.insert(insert_old_row(&mut tx, now, days(1)).await);
    kept.insert(insert_old_row(&mut tx, now, chrono::Duration::zero()).await);
    tx.commit().await.unwrap();

    // 0 keeps everything.
    assert_eq!(
        tollgate::store::purge_once(&store, 0, now).await.unwrap(),
        0
    );
    assert_eq!(
        count(&db, "interceptions").await,
        (old.len() + kept.len()) as i64
    );

    let started = Instant::now();
    let purged = tollgate::store::purge_once(&store, 60, now).await.unwrap();
    assert_eq!(purged, old.len() as u64, "several batches, every old row");
    assert!(started.elapsed() < Duration::from_secs(20));
    let left: BTreeSet<String> = sqlx::query_scalar("SELECT id FROM interceptions")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(left, kept);
    // Children went with their interceptions (foreign keys cascade) and stayed for the rest.
    for table in [
        "token_usages",
        "user_prompts",
        "tool_usages",
        "model_thoughts",
    ] {
        let owners: BTreeSet<String> =
            sqlx::query_scalar(&format!("SELECT interception_id FROM {table}"))
                .fetch_all(&db)
                .await
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(owners, kept, "{table}");
        assert_eq!(count(&db, table).await, kept.len() as i64, "{table}");
    }
    // Nothing more to do on the next run.
    assert_eq!(
        tollgate::store::purge_once(&store, 60, now).await.unwrap(),
        0
    );
}

/// The same purge on PostgreSQL (native timestamptz, `$n` placeholders, cascades), through the
/// store as the server runs it. Runs only with `TOLLGATE_TEST_DATABASE_URL` set; the SQLite
/// flavour is the test above.
#[tokio::test(flavor = "multi_thread")]
async fn retention_on_postgres_deletes_the_old_interceptions_and_their_children() {
    let Some(base) = common::server::postgres_url() else {
        eprintln!("PostgreSQL only: set TOLLGATE_TEST_DATABASE_URL to run it");
        return;
    };
    let url = common::server::fresh_postgres_database(&base).await;
    let store = tollgate::store::Store::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let db = sqlx::PgPool::connect(&url).await.unwrap();
    let now = Utc::now();
    let days = chrono::Duration::days;
    let mut kept = BTreeSet::new();
    let mut old = 0u64;
    // More than one purge batch (1000) of old rows, and rows on both sides of the cutoff.
    let ages = (0..1003).map(|_| (days(61), false)).chain([
        (days(60) + chrono::Duration::milliseconds(1), false),
        (days(60) - chrono::Duration::minutes(1), true),
        (days(1), true),
    ]);
    for (age, keep) in ages {
        let id = uuid::Uuid::now_v7();
        let ended = now - age;
        sqlx::query(
            "INSERT INTO interceptions (id, user_id, provider, provider_kind, endpoint, model, client, session_key, \
             credential_kind, status, streaming, started_at, ended_at, priced) \
             VALUES ($1, $1, 'openai', 'openai', 'chat', 'gpt-4o', 'Unknown', $2, 'central', 'completed', false, $3, $3, true)",
        )
        .bind(id)
        .bind(id.to_string())
        .bind(ended)
        .execute(&db)
        .await
        .unwrap();
        for sql in [
            "INSERT INTO token_usages (interception_id, input_tokens, output_tokens, cache_read_input_tokens, cache_write_input_tokens, reasoning_tokens, created_at) VALUES ($1, 1, 1, 0, 0, 0, now())",
            "INSERT INTO user_prompts (interception_id, prompt, created_at) VALUES ($1, 'p', now())",
            "INSERT INTO tool_usages (interception_id, tool_call_id, tool, input, created_at) VALUES ($1, 'c', 't', '{}', now())",
            "INSERT INTO model_thoughts (interception_id, content, source, created_at) VALUES ($1, 'x', 'thinking', now())",
        ] {
            sqlx::query(sql).bind(id).execute(&db).await.unwrap();
        }
        if keep {
            kept.insert(id);
        } else {
            old += 1;
        }
    }
    assert_eq!(
        tollgate::store::purge_once(&store, 0, now).await.unwrap(),
        0
    );
    assert_eq!(
        tollgate::store::purge_once(&store, 60, now).await.unwrap(),
        old
    );
    let left: BTreeSet<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM interceptions")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(left, kept);
    for table in [
        "token_usages",
        "user_prompts",
        "tool_usages",
        "model_thoughts",
    ] {
        let owners: BTreeSet<uuid::Uuid> =
            sqlx::query_scalar(&format!("SELECT interception_id FROM {table}"))
                .fetch_all(&db)
                .await
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(owners, kept, "{table}");
    }
    assert_eq!(
        tollgate::store::purge_once(&store, 60, now).await.unwrap(),
        0
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn another_users_session_id_or_tool_call_id_joins_nothing_of_theirs() {
    let upstream = upstream().await;
    let tg = start(&upstream, "").await;
    let root = tg.admin_key("root");
    let alice = tg.user_key("alice");
    let bob = tg.user_key("bob");
    // Bob works in his session and makes a tool call.
    chat(
        &tg,
        &bob,
        "gpt-4o-mini",
        "bob's real question",
        Some("bob-work"),
    )
    .await;
    let bob_call = messages(&tg, &bob, "bob fixes a test").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Alice reuses his session id and answers his tool-call id.
    let alice_chat = chat(
        &tg,
        &alice,
        "gpt-4o-mini",
        "alice was here",
        Some("bob-work"),
    )
    .await;
    let alice_followup = tool_result_followup(&tg, &alice).await;
    tg.wait_until_recorded(4).await;
    let (alice_id, bob_id) = (user_id(&tg, "alice").await, user_id(&tg, "bob").await);

    // Her tool result does not join bob's thread (before: it did, as his thread's child).
    let followup = get_ok(
        &tg,
        &root,
        &format!("/api/v2/aibridge/interceptions/{alice_followup}"),
    )
    .await;
    assert!(followup["thread_parent_id"].is_null(), "{followup}");
    assert!(followup["thread_root_id"].is_null(), "{followup}");
    // Bob's sessions, as an admin lists them: bob is their only initiator and his prompt is
    // the last (before: his "bob-work" showed alice's prompt).
    let listed = get_ok(&tg, &root, "/api/v2/aibridge/sessions?q=initiator%3Abob").await;
    for session in listed["sessions"].as_array().unwrap() {
        assert_eq!(session["initiator"]["username"], "bob", "{session}");
        assert_ne!(session["last_prompt"], "alice was here", "{session}");
        assert_eq!(session["interception_count"], 1, "{session}");
    }

    // Bob's session, as an admin sees it: bob's call only, his prompt last.
    let bobs = get_ok(
        &tg,
        &root,
        &format!("/api/v2/aibridge/sessions/{bob_id}:bob-work"),
    )
    .await;
    assert_eq!(bobs["interception_count"], 1, "{bobs}");
    assert_eq!(bobs["initiator"]["username"], "bob");
    assert_eq!(bobs["last_prompt"], "bob's real question");
    // Alice's reuse is a session of hers.
    let hers = get_ok(
        &tg,
        &root,
        &format!("/api/v2/aibridge/sessions/{alice_id}:bob-work"),
    )
    .await;
    assert_eq!(hers["initiator"]["username"], "alice");
    assert_eq!(
        hers["threads"][0]["interceptions"][0]["id"],
        alice_chat.as_str()
    );
    let bobs_thread = get_ok(&tg, &root, &format!("/api/v2/aibridge/sessions/{bob_call}")).await;
    assert_eq!(bobs_thread["interception_count"], 1, "{bobs_thread}");
    // And bob sees nothing of hers in his list.
    let list = get_ok(&tg, &bob, "/api/v2/aibridge/sessions").await;
    assert!(!list.to_string().contains("alice was here"), "{list}");
}
