//! Security properties seen from outside, each against the real binary on loopback: Tollgate is
//! no open relay (gateway and proxy), tunnels cannot reach private or reserved addresses or
//! other ports unless an operator opens them, members cannot read or change other users' data
//! through any documented route, secrets never come back out (logs, error bodies, API responses,
//! metrics), secret files and the database readable by others stop the server at start and
//! Tollgate's own files are the owner's alone, dashboard sessions end when they should (the
//! cookie is never the key), and the usage CSV cannot start a spreadsheet formula.
//!
//! A "decoy" mock on 127.0.0.1 stands for whatever sits next to Tollgate (an internal service,
//! the metadata endpoint): every relay test ends by checking that it saw no connection at all.

use crate::common;

use std::time::Duration;

use common::client::http;
use common::dashboard::{cookie_of, csrf_of, dashboard_get, dashboard_post, sign_in_response};
use common::mock::{MockResponse, MockUpstream};
use common::server::{Tollgate, ANTHROPIC_CENTRAL_KEY, OPENAI_CENTRAL_KEY};
use common::tunnel::{connect_tunnel_within, der_of, raw_exchange, read_h1_response, tls_client};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A mock answering the provider APIs the tests call, with their blocking fixtures.
async fn provider_upstream() -> MockUpstream {
    MockUpstream::start(|req| match req.path_without_query() {
        "/v1/chat/completions" => MockResponse::fixture("openai-chat.json"),
        "/v1/messages" => MockResponse::fixture("anthropic-messages.json"),
        "/v1/models" => MockResponse::json(200, json!({"object": "list", "data": []})),
        other => MockResponse::json(500, json!({"unexpected": other})),
    })
    .await
}

/// Stands for a service next to Tollgate that nobody outside may reach through it.
async fn decoy() -> MockUpstream {
    MockUpstream::always(MockResponse::json(200, json!({"decoy": "reached"}))).await
}

fn basic(key: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("tollgate:{key}"))
}

/// Sends `CONNECT target` (with the key as proxy password when given) and returns the socket
/// and the response head.
async fn connect(addr: &str, target: &str, key: Option<&str>) -> (TcpStream, String) {
    connect_tunnel_within(addr, target, key, Duration::from_secs(15)).await
}

fn status_of(response: &str) -> u16 {
    response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_forwards_only_provider_routes_and_only_to_their_base_url() {
    let upstream = provider_upstream().await;
    let decoy = decoy().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        .start()
        .await;
    let key = tg.user_key("mallory");
    let gateway = tg.gateway.trim_start_matches("http://").to_string();
    let d = decoy.addr();
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

    // Request lines a relay abuser would try, each with a valid key; every one must be refused
    // by the gateway itself, never forwarded anywhere.
    let refused: Vec<(String, &str)> = vec![
        (
            "POST /evil/v1/chat/completions HTTP/1.1".to_string(),
            "unknown provider",
        ),
        (
            "POST /api/v2/aibridge/evil/v1/chat/completions HTTP/1.1".to_string(),
            "unknown provider, canonical prefix",
        ),
        (
            "POST /openai/v1/files HTTP/1.1".to_string(),
            "unknown route",
        ),
        (
            "GET /openai/v1/organization/usage HTTP/1.1".to_string(),
            "unknown route",
        ),
        (
            "POST /openai/v1/chat/completions/../../../v1/files HTTP/1.1".to_string(),
            "dot segments",
        ),
        (
            "GET /openai/v1/models/.. HTTP/1.1".to_string(),
            "dot segment as a model id",
        ),
        (
            "GET /openai/v1/models/%2e%2e HTTP/1.1".to_string(),
            "encoded dot segment",
        ),
        (
            "GET /openai/v1/responses/..%2F..%2Fv1%2Ffiles HTTP/1.1".to_string(),
            "encoded slashes",
        ),
        (
            "GET /anthropic/v1/models/..%5C..%5Cadmin HTTP/1.1".to_string(),
            "encoded backslashes",
        ),
        (
            "GET /anthropic/v1/models/. HTTP/1.1".to_string(),
            "single dot",
        ),
        (
            format!("GET http://{d}/v1/models HTTP/1.1"),
            "absolute form to another host",
        ),
        (format!("POST http://{d}/ HTTP/1.1"), "absolute form, root"),
        ("GET / HTTP/1.1".to_string(), "root"),
        (
            format!("CONNECT {d} HTTP/1.1"),
            "CONNECT on the gateway port",
        ),
    ];
    for (line, why) in &refused {
        let request = format!(
            "{line}\r\nHost: {d}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let out = raw_exchange(&gateway, request.as_bytes(), Duration::from_secs(10)).await;
        let status = status_of(&out);
        assert!(
            (400..500).contains(&status),
            "{why}: `{line}` got {status}:\n{out}"
        );
    }
    assert_eq!(
        upstream.request_count(),
        0,
        "refused requests reached the provider: {:?}",
        upstream.requests()
    );

    // A valid route goes to the provider's base_url whatever Host or absolute-form authority
    // the client claims.
    for line in [
        "POST /openai/v1/chat/completions HTTP/1.1".to_string(),
        format!("POST http://{d}/openai/v1/chat/completions HTTP/1.1"),
    ] {
        let request = format!(
            "{line}\r\nHost: {d}\r\nX-Forwarded-Host: {d}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let out = raw_exchange(&gateway, request.as_bytes(), Duration::from_secs(10)).await;
        assert_eq!(status_of(&out), 200, "`{line}`:\n{out}");
        let seen = upstream.last_request();
        assert_eq!(seen.path, "/v1/chat/completions");
        assert_eq!(
            seen.header("host"),
            Some(upstream.addr().to_string().as_str())
        );
    }
    assert_eq!(upstream.request_count(), 2);

    // Without a key, unknown routes are 404 and known ones 401: no upstream either way.
    let c = http();
    let r = c
        .post(format!("{}/evil/v1/chat/completions", tg.gateway))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(upstream.request_count(), 2);
    assert_eq!(decoy.connections_accepted(), 0, "the decoy was reached");
}

/// Tollgate with the proxy front door on (`proxy_extra` adds `[proxy]` keys) and a mallory key.
async fn with_proxy(upstream: &MockUpstream, proxy_extra: &str) -> (Tollgate, String) {
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .proxy(proxy_extra)
        .start()
        .await;
    let key = tg.user_key("mallory");
    (tg, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_never_relays_plain_http_and_tunnels_only_to_public_addresses() {
    let upstream = provider_upstream().await;
    let decoy = decoy().await;
    let (tg, key) = with_proxy(&upstream, "").await;
    let proxy = tg.proxy_addr();
    let d = decoy.addr();
    let port = d.port();

    // Absolute-form plain HTTP, as a client with HTTP_PROXY set sends it: never fetched.
    for line in [
        format!("GET http://{d}/ HTTP/1.1"),
        format!("GET http://{d}/latest/meta-data/ HTTP/1.1"),
        format!("GET http://localhost:{port}/ HTTP/1.1"),
        "GET http://169.254.169.254/latest/meta-data/iam/ HTTP/1.1".to_string(),
        "GET http://example.com/ HTTP/1.1".to_string(),
    ] {
        let request = format!(
            "{line}\r\nHost: {d}\r\nProxy-Authorization: Basic {}\r\nConnection: close\r\n\r\n",
            basic(&key)
        );
        let out = raw_exchange(&proxy, request.as_bytes(), Duration::from_secs(10)).await;
        let status = status_of(&out);
        assert!(
            (400..500).contains(&status),
            "`{line}` got {status}:\n{out}"
        );
        assert!(!out.contains("reached"), "`{line}` was relayed:\n{out}");
    }

    // CONNECT to the decoy however its address is spelled: the port is not allowed, and on an
    // allowed port the resolved address is reserved. Both are refused with 403 before any
    // connection, key or no key.
    let spellings = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "127.0.0.1:443".to_string(),
        "127.0.0.1:80".to_string(),
        "127.1:443".to_string(),
        "2130706433:443".to_string(),
        "0x7f000001:443".to_string(),
        "localhost.:443".to_string(),
        "LOCALHOST:443".to_string(),
        "[::1]:443".to_string(),
        "[::]:443".to_string(),
        "0.0.0.0:443".to_string(),
        "[::ffff:127.0.0.1]:443".to_string(),
        "[::ffff:7f00:1]:80".to_string(),
        "[64:ff9b::7f00:1]:443".to_string(),
        "[2002:7f00:1::]:443".to_string(),
        "169.254.169.254:80".to_string(),
        "169.254.169.254:443".to_string(),
        "[::ffff:169.254.169.254]:80".to_string(),
        "[fe80::1]:443".to_string(),
        "[fd00:ec2::254]:80".to_string(),
        "100.100.100.200:80".to_string(),
        "10.0.0.1:443".to_string(),
        "172.16.0.1:443".to_string(),
        "192.168.1.1:443".to_string(),
        "224.0.0.1:443".to_string(),
        "255.255.255.255:443".to_string(),
    ];
    for target in &spellings {
        for auth in [None, Some(key.as_str())] {
            let (_, head) = connect(&proxy, target, auth).await;
            assert!(
                head.starts_with("HTTP/1.1 403 Forbidden"),
                "CONNECT {target} (key: {}) got:\n{head}",
                auth.is_some()
            );
        }
    }
    // Disallowed ports, on public and intercepted hosts alike.
    for target in [
        "example.com:22",
        "8.8.8.8:25",
        "api.openai.com:8443",
        "1.1.1.1:0",
    ] {
        let (_, head) = connect(&proxy, target, Some(&key)).await;
        let status = status_of(&head);
        assert!(
            status == 403 || status == 400,
            "CONNECT {target} got:\n{head}"
        );
    }
    assert_eq!(decoy.connections_accepted(), 0, "the decoy was reached");
    assert_eq!(upstream.request_count(), 0);

    // With tunnels denied, nothing but the intercepted hosts is reachable at all.
    let (denying, key) = with_proxy(&upstream, "tunnel = \"deny\"").await;
    for target in ["example.com:443", "1.1.1.1:443", "169.254.169.254:80"] {
        let (_, head) = connect(&denying.proxy_addr(), target, Some(&key)).await;
        assert!(
            head.starts_with("HTTP/1.1 403 Forbidden"),
            "{target}: {head}"
        );
    }
    let (_, head) = connect(&denying.proxy_addr(), "api.openai.com:443", Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_destination_opens_only_when_its_range_and_port_are_configured() {
    let upstream = provider_upstream().await;
    let decoy = decoy().await;
    let port = decoy.addr().port();

    // The port alone is not enough: 127.0.0.1 is still reserved.
    let (tg, key) = with_proxy(&upstream, &format!("allowed_ports = [443, {port}]")).await;
    let (_, head) = connect(&tg.proxy_addr(), &format!("127.0.0.1:{port}"), Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 403 Forbidden"), "{head}");
    let out = raw_exchange(
        &tg.proxy_addr(),
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.contains("allowed_private_cidrs"), "{out}");
    drop(tg);
    // The range alone is not enough either: the port is not allowed.
    let (tg, key) = with_proxy(&upstream, "allowed_private_cidrs = [\"127.0.0.1/32\"]").await;
    let out = raw_exchange(
        &tg.proxy_addr(),
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out}");
    assert!(out.contains("allowed_ports"), "{out}");
    drop((tg, key));
    assert_eq!(decoy.connections_accepted(), 0);

    // Both: exactly that address and port tunnel; its neighbours stay closed.
    let (tg, key) = with_proxy(
        &upstream,
        &format!("allowed_ports = [443, {port}]\nallowed_private_cidrs = [\"127.0.0.1/32\"]"),
    )
    .await;
    let proxy = tg.proxy_addr();
    let (mut tunnel, head) = connect(&proxy, &format!("127.0.0.1:{port}"), None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tunnel
        .write_all(b"GET /through HTTP/1.1\r\nHost: decoy\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("reached"), "{out}");
    assert_eq!(decoy.last_request().path, "/through");
    for target in [
        format!("127.0.0.2:{port}"),
        format!("[::1]:{port}"),
        "169.254.169.254:443".to_string(),
        "10.0.0.1:443".to_string(),
    ] {
        let (_, head) = connect(&proxy, &target, Some(&key)).await;
        assert!(
            head.starts_with("HTTP/1.1 403 Forbidden"),
            "{target}: {head}"
        );
    }
    assert_eq!(decoy.connections_accepted(), 1);
}

/// Sends `method path` to the admin listener with `key` and an optional JSON body.
async fn api(
    tg: &Tollgate,
    method: Method,
    key: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let mut req = http()
        .request(method, format!("{}{path}", tg.admin))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn api_ok(
    tg: &Tollgate,
    method: Method,
    key: &str,
    path: &str,
    body: Option<&Value>,
) -> Value {
    let (status, text) = api(tg, method.clone(), key, path, body).await;
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// Everything about alice that only an admin or alice herself may see.
struct Victim {
    key: String,
    user_id: String,
    key_id: String,
    group_id: String,
    interception_id: String,
    session_id: String,
    /// Strings that exist only in alice's records: none may appear in a response to bob.
    private: Vec<String>,
}

async fn seed_victim(tg: &Tollgate, root: &str) -> Victim {
    let key = tg.user_key("alice-victim");
    let prompt = "alice-private-prompt-7f3a";
    let session_id = "alice-private-session-91c2";
    let resp = http()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .bearer_auth(&key)
        .header("x-tollgate-session", session_id)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let interception_id = resp.headers()["x-tollgate-interception-id"]
        .to_str()
        .unwrap()
        .to_string();
    resp.bytes().await.unwrap();
    let messages = http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .header("x-api-key", &key)
        .json(
            &json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 200);
    messages.bytes().await.unwrap();
    tg.wait_until_recorded(2).await;

    let users = api_ok(tg, Method::GET, root, "/api/v2/users", None).await;
    let user_id = users
        .as_array()
        .or_else(|| users["users"].as_array())
        .or_else(|| users["results"].as_array())
        .expect("user list")
        .iter()
        .find(|u| u["username"] == "alice-victim")
        .expect("alice listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let created = api_ok(
        tg,
        Method::POST,
        root,
        &format!("/api/v2/users/{user_id}/keys"),
        Some(&json!({"name": "alice-private-keyname"})),
    )
    .await;
    let key_id = created["id"].as_str().expect("key id").to_string();
    let group = api_ok(
        tg,
        Method::POST,
        root,
        "/api/v2/groups",
        Some(&json!({"name": "alice-private-group"})),
    )
    .await;
    let group_id = group["id"].as_str().expect("group id").to_string();
    api_ok(
        tg,
        Method::POST,
        root,
        &format!("/api/v2/groups/{group_id}/members"),
        Some(&json!({"user_id": user_id})),
    )
    .await;
    api_ok(
        tg,
        Method::PUT,
        root,
        "/api/v2/budgets",
        Some(&json!({"scope": "user", "scope_id": user_id, "limit_usd": "4242.42"})),
    )
    .await;
    let stored = api_ok(
        tg,
        Method::PUT,
        &key,
        "/api/v2/users/me/provider-keys/openai",
        Some(&json!({"api_key": "sk-alice-stored-provider-key-qz81"})),
    )
    .await;
    Victim {
        private: vec![
            "alice-victim".into(),
            prompt.into(),
            "alice-private-keyname".into(),
            "alice-private-group".into(),
            "4242.42".into(),
            "qz81".into(),
            created["secret"].as_str().expect("new key secret")[3..].to_string(),
            key[3..].to_string(),
            stored["hint"].as_str().unwrap().to_string(),
            // Her ids are private too, except where bob typed them himself (checked per call).
            user_id.clone(),
            key_id.clone(),
            group_id.clone(),
            interception_id.clone(),
            session_id.into(),
        ],
        key,
        user_id,
        key_id,
        group_id,
        interception_id,
        session_id: session_id.into(),
    }
}

/// Values to put in a path parameter: every id of alice's, each kind in every position.
fn candidates(param: &str, v: &Victim) -> Vec<String> {
    let mut all = vec![
        v.user_id.clone(),
        v.key_id.clone(),
        v.group_id.clone(),
        v.interception_id.clone(),
        v.session_id.clone(),
        "alice-victim".to_string(),
    ];
    match param {
        "scope" => all.extend(["user", "group", "default"].map(String::from)),
        "model" => all.push("gpt-4o".into()),
        "provider" => all.push("openai".into()),
        _ => {}
    }
    all
}

fn concrete_paths(template: &str, v: &Victim) -> Vec<String> {
    let mut paths = vec![String::new()];
    for segment in template.split('/').skip(1) {
        let options = match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(param) => candidates(param, v),
            None => vec![segment.to_string()],
        };
        paths = paths
            .iter()
            .flat_map(|p| options.iter().map(move |o| format!("{p}/{o}")))
            .collect();
    }
    paths
}

#[tokio::test(flavor = "multi_thread")]
async fn members_reach_no_other_users_data_through_any_documented_route() {
    let upstream = provider_upstream().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        .extra("[keys]\ncentral_api_key_enabled = true\nallow_user_api_key = true\nallow_central_api_key_fallback = true")
        .start()
        .await;
    let root = tg.admin_key("root");
    let victim = seed_victim(&tg, &root).await;
    let bob = tg.user_key("bob");
    let doc = api_ok(&tg, Method::GET, &bob, "/api/v2/openapi.json", None).await;
    let paths = doc["paths"].as_object().expect("openapi paths");
    assert!(
        paths.len() >= 20,
        "the document lists {} paths",
        paths.len()
    );

    let before = snapshot(&tg, &root, &victim).await;
    // Member-readable lists, asked for alice by every name she has.
    let spying_queries = [
        String::new(),
        format!("?q=initiator:{}", victim.user_id),
        "?q=initiator:alice-victim".to_string(),
        format!("?q=session_id:{}", victim.session_id),
        format!("?user={}", victim.user_id),
        "?user=alice-victim".to_string(),
        "?group_by=user".to_string(),
        format!("?after_id={}", victim.interception_id),
    ];
    // Bodies that would escalate bob or touch alice if a handler forgot its role check.
    let bodies = [
        json!({}),
        json!({
            "username": "bob", "is_admin": true, "name": "x", "groups": ["alice-private-group"],
            "user_id": victim.user_id, "scope": "user", "scope_id": victim.user_id,
            "limit_usd": "0", "input": "0", "output": "0", "cache_read": "0",
            "cache_write": "0", "api_key": "sk-bob-overwrites-alice"
        }),
    ];
    let mut calls = 0;
    for (template, item) in paths {
        for (method, _) in item.as_object().unwrap() {
            let Ok(method) = Method::from_bytes(method.to_uppercase().as_bytes()) else {
                continue;
            };
            let own_records = template.starts_with("/api/v2/users/me");
            for path in concrete_paths(template, &victim) {
                let reads = method == Method::GET;
                let variants: Vec<(String, Option<&Value>)> = if reads {
                    spying_queries
                        .iter()
                        .map(|q| (format!("{path}{q}"), None))
                        .collect()
                } else {
                    bodies.iter().map(|b| (path.clone(), Some(b))).collect()
                };
                for (url, body) in variants {
                    let (status, text) = api(&tg, method.clone(), &bob, &url, body).await;
                    calls += 1;
                    assert!(status < 500, "{method} {url}: {status} {text}");
                    for secret in &victim.private {
                        // An id bob sent may be echoed in his own error message.
                        if url.contains(secret.as_str()) && !(200..300).contains(&status) {
                            continue;
                        }
                        assert!(
                            !text.contains(secret.as_str()),
                            "{method} {url} ({status}) shows bob alice's {secret:?}:\n{text}"
                        );
                    }
                    if !reads && !own_records {
                        assert!(
                            status == 403
                                || status == 401
                                || status == 404
                                || status == 400
                                || status == 422,
                            "{method} {url}: a member's write answered {status}: {text}"
                        );
                    }
                }
            }
        }
    }
    assert!(calls > 200, "only {calls} calls made");

    // Nothing of alice's changed, and bob is still a member.
    assert_eq!(snapshot(&tg, &root, &victim).await, before);
    let me = api_ok(&tg, Method::GET, &bob, "/api/v2/users/me/budget", None).await;
    assert!(!me.to_string().contains("alice"), "{me}");
    let (status, _) = api(&tg, Method::GET, &bob, "/api/v2/users", None).await;
    assert_eq!(status, 403, "bob became an admin");
    let resp = http()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .bearer_auth(&victim.key)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "still mine"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "alice's key stopped working");
    resp.bytes().await.unwrap();
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some("Bearer sk-alice-stored-provider-key-qz81"),
        "alice's stored provider key was replaced"
    );
}

/// What an admin sees of alice: must be identical before and after bob's attempts.
async fn snapshot(tg: &Tollgate, root: &str, v: &Victim) -> Vec<String> {
    let mut out = Vec::new();
    for path in [
        format!("/api/v2/users/{}", v.user_id),
        format!("/api/v2/users/{}/keys", v.user_id),
        format!("/api/v2/groups/{}", v.group_id),
        format!("/api/v2/aibridge/interceptions/{}", v.interception_id),
        format!("/api/v2/aibridge/interceptions?q=initiator:{}", v.user_id),
        "/api/v2/budgets".to_string(),
        "/api/v2/pricing".to_string(),
        "/api/v2/users".to_string(),
        "/api/v2/groups".to_string(),
    ] {
        let mut value = api_ok(tg, Method::GET, root, &path, None).await;
        strip_volatile(&mut value);
        out.push(format!("{path}: {value}"));
    }
    out
}

/// Drops fields that move on their own (last use of a key, seat activity).
fn strip_volatile(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with("last_") && k != "updated_at");
            map.values_mut().for_each(strip_volatile);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_appear_in_logs_errors_api_responses_or_metrics() {
    let upstream = provider_upstream().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        // Nothing listens here: the 502 body must not carry the credential it would have sent.
        .provider("down", "openai", "http://127.0.0.1:9")
        .mitm_hosts("openai", &["api.openai.com"])
        .proxy("")
        .extra("[keys]\ncentral_api_key_enabled = true\nallow_user_api_key = true\nallow_central_api_key_fallback = true")
        .start()
        .await;
    let root = tg.admin_key("root");
    let key = tg.user_key("carol");
    let request_key = "sk-carol-per-request-key-5d9e0a";
    let stored_key = "sk-carol-stored-key-b71c44";
    let near_miss = format!("{}x", &key[..key.len() - 1]);
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let c = http();
    let mut seen: Vec<String> = Vec::new();
    macro_rules! send {
        ($req:expr) => {{
            let resp = $req.send().await.unwrap();
            let status = resp.status().as_u16();
            let mut text = format!("{status}\n");
            for (name, value) in resp.headers() {
                text.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            text.push_str(&resp.text().await.unwrap());
            seen.push(text);
            status
        }};
    }
    let gw = |path: &str| format!("{}{path}", tg.gateway);

    // Central key, per-request user key, stored user key: each reaches the upstream (so the
    // secrets were really in play) and none comes back.
    assert_eq!(
        send!(c
            .post(gw("/openai/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat)),
        200
    );
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some(format!("Bearer {OPENAI_CENTRAL_KEY}").as_str())
    );
    assert_eq!(
        send!(c
            .post(gw("/openai/v1/chat/completions"))
            .header("x-tollgate-key", &key)
            .bearer_auth(request_key)
            .json(&chat)),
        200
    );
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some(format!("Bearer {request_key}").as_str())
    );
    assert_eq!(
        send!(c
            .put(format!("{}/api/v2/users/me/provider-keys/openai", tg.admin))
            .bearer_auth(&key)
            .json(&json!({"api_key": stored_key}))),
        200
    );
    assert_eq!(
        send!(c
            .post(gw("/openai/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat)),
        200
    );
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some(format!("Bearer {stored_key}").as_str())
    );
    assert_eq!(
        send!(c.post(gw("/anthropic/v1/messages")).header("x-api-key", &key).json(&json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))),
        200
    );
    assert_eq!(
        upstream.last_request().header("x-api-key"),
        Some(ANTHROPIC_CENTRAL_KEY)
    );
    // Refusals and failures of every kind, each carrying secrets in its request.
    for (req, expected) in [
        (
            c.post(gw("/openai/v1/chat/completions"))
                .bearer_auth(&near_miss)
                .json(&chat),
            401,
        ),
        (
            c.post(gw("/anthropic/v1/messages"))
                .header("x-api-key", &near_miss)
                .json(&chat),
            401,
        ),
        (
            c.post(gw("/openai/v1/chat/completions"))
                .header("x-tollgate-key", &near_miss)
                .bearer_auth(request_key)
                .json(&chat),
            401,
        ),
        (
            c.post(gw("/openai/v1/files")).bearer_auth(&key).json(&chat),
            404,
        ),
        (
            c.post(gw("/openai/v1/chat/completions"))
                .bearer_auth(&key)
                .body("not json"),
            400,
        ),
        (
            c.post(gw("/openai/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&json!({"messages": []})),
            400,
        ),
        (
            c.post(gw("/down/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&chat),
            502,
        ),
        (
            c.post(gw("/down/v1/chat/completions"))
                .header("x-tollgate-key", &key)
                .bearer_auth(request_key)
                .json(&chat),
            502,
        ),
    ] {
        assert_eq!(send!(req), expected);
    }
    // The proxy: a good and a near-miss password, a MITM request and a refused tunnel.
    let proxy = tg.proxy_addr();
    let (_, head) = connect(&proxy, "api.openai.com:443", Some(&near_miss)).await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    seen.push(head);
    let (_, head) = connect(&proxy, "10.0.0.1:443", Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    seen.push(head);
    let through_proxy = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(format!("http://tollgate:{key}@{proxy}")).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(tg.proxy_ca_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    assert_eq!(
        send!(through_proxy
            .post("https://api.openai.com/v1/chat/completions")
            .bearer_auth(request_key)
            .json(&chat)),
        200
    );
    // The API: listings, keys, stored keys, and every read an admin can make.
    let carol_id: String = tg
        .scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = ?",
            &["carol"],
        )
        .await;
    tg.wait_until_recorded(5).await;
    for path in [
        "/api/v2/aibridge/interceptions".to_string(),
        "/api/v2/aibridge/sessions".to_string(),
        "/api/v2/usage?group_by=user".to_string(),
        "/api/v2/seats".to_string(),
        "/api/v2/users".to_string(),
        format!("/api/v2/users/{carol_id}"),
        format!("/api/v2/users/{carol_id}/keys"),
        "/api/v2/budgets".to_string(),
        "/api/v2/openapi.json".to_string(),
        "/metrics".to_string(),
        "/readyz".to_string(),
    ] {
        assert_eq!(
            send!(c.get(format!("{}{path}", tg.admin)).bearer_auth(&root)),
            200,
            "{path}"
        );
    }
    let ids: Vec<String> = tg
        .column("SELECT CAST(id AS TEXT) FROM interceptions", &[])
        .await;
    for id in &ids {
        assert_eq!(
            send!(c
                .get(format!("{}/api/v2/aibridge/interceptions/{id}", tg.admin))
                .bearer_auth(&root)),
            200
        );
    }
    assert_eq!(
        send!(c
            .get(format!("{}/api/v2/users/me/provider-keys", tg.admin))
            .bearer_auth(&key)),
        200
    );
    assert_eq!(
        send!(c
            .get(format!("{}/api/v2/users", tg.admin))
            .bearer_auth(&near_miss)),
        401
    );
    // A key shown once at creation: that response is the one place it may appear.
    let (status, created) = api(
        &tg,
        Method::POST,
        &root,
        &format!("/api/v2/users/{carol_id}/keys"),
        Some(&json!({"name": "second"})),
    )
    .await;
    assert!((200..300).contains(&status), "{status} {created}");
    let second = serde_json::from_str::<Value>(&created).unwrap()["secret"]
        .as_str()
        .expect("new key shown once")
        .to_string();
    assert_eq!(
        send!(c
            .get(format!("{}/api/v2/users/{carol_id}/keys", tg.admin))
            .bearer_auth(&root)),
        200
    );

    let (_, logs) = tg.stop().await;
    // The scan below means something only if there was plenty to scan.
    assert!(seen.len() >= 30, "only {} responses captured", seen.len());
    assert!(
        logs.iter()
            .filter(|l| l.contains("interception log"))
            .count()
            >= 5 * 4,
        "too few interception records logged"
    );
    let secrets = [
        OPENAI_CENTRAL_KEY.to_string(),
        ANTHROPIC_CENTRAL_KEY.to_string(),
        request_key.to_string(),
        stored_key.to_string(),
        key.clone(),
        key[3..].to_string(),
        key[key.len() - 16..].to_string(),
        root[3..].to_string(),
        near_miss[3..].to_string(),
        second[3..].to_string(),
        basic(&key),
        basic(&near_miss),
    ];
    for secret in &secrets {
        for (i, text) in seen.iter().enumerate() {
            assert!(
                !text.contains(secret.as_str()),
                "response {i} shows a secret ({}…):\n{text}",
                &secret[..6]
            );
        }
        for line in &logs {
            assert!(
                !line.contains(secret.as_str()),
                "a log line shows a secret ({}…):\n{line}",
                &secret[..6]
            );
        }
    }
}

/// Runs `tollgate serve` on `config` in `dir`; it must stop by itself. Returns exit code and output.
fn serve_exits(dir: &std::path::Path, config: &str) -> (Option<i32>, String) {
    std::fs::write(dir.join("t.toml"), config).unwrap();
    let mut child = std::process::Command::new(common::server::BIN)
        .args(["serve", "--config", "t.toml"])
        .current_dir(dir)
        .env_remove("TOLLGATE_SECRET_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn secret_files_others_can_read_stop_the_server_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = tollgate::tls::generate_ca().unwrap();
    std::fs::write(certs.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(certs.join("ca.key"), &ca.key_pem).unwrap();
    let base = format!(
        "[server]\ngateway_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n",
        dir.path().join("t.db").display()
    );
    let with_proxy = format!("{base}[proxy]\nenabled = true\nlisten = \"127.0.0.1:0\"\n");
    let chmod = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o620, 0o602] {
        chmod(&certs.join("ca.key"), mode);
        let (code, out) = serve_exits(dir.path(), &with_proxy);
        assert_eq!(code, Some(1), "CA key mode {mode:o} was accepted:\n{out}");
        assert!(out.contains("chmod 600"), "mode {mode:o}: {out}");
        assert!(
            !out.contains("BEGIN PRIVATE KEY"),
            "the key itself was printed"
        );
    }

    // So is a database someone else can read: it holds every prompt, tool call and thought.
    let db = dir.path().join("t.db");
    std::fs::write(&db, b"").unwrap();
    for mode in [0o644, 0o640, 0o604] {
        chmod(&db, mode);
        let (code, out) = serve_exits(dir.path(), &base);
        assert_eq!(code, Some(1), "database mode {mode:o} was accepted:\n{out}");
        assert!(
            out.contains("t.db") && out.contains("chmod 600"),
            "mode {mode:o}: {out}"
        );
    }
    std::fs::remove_file(&db).unwrap();

    // The vault secret (stored provider keys) is held to the same rule.
    let vault = format!(
        "{base}[keys]\ncentral_api_key_enabled = true\nallow_user_api_key = true\nsecret_key_file = \"vault.key\"\n"
    );
    let vault_secret = "ab".repeat(32);
    std::fs::write(dir.path().join("vault.key"), &vault_secret).unwrap();
    for mode in [0o644, 0o640, 0o604] {
        chmod(&dir.path().join("vault.key"), mode);
        let (code, out) = serve_exits(dir.path(), &vault);
        assert_eq!(
            code,
            Some(1),
            "vault key mode {mode:o} was accepted:\n{out}"
        );
        assert!(
            out.contains("vault.key") && out.contains("chmod 600"),
            "mode {mode:o}: {out}"
        );
        assert!(!out.contains(&vault_secret), "the vault secret was printed");
    }
}

#[test]
fn what_tollgate_writes_is_readable_by_its_owner_only() {
    if common::server::skip_on_postgres("checks the modes of the SQLite files") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(Tollgate::builder().start());
    tg.user_key("alice"); // a write, so the WAL and shared-memory files exist
    let mode = |p: &std::path::Path| tollgate::private_files::mode(p).unwrap();
    let db = tg.db_path.display().to_string();
    for file in [db.clone(), format!("{db}-wal"), format!("{db}-shm")] {
        let file = std::path::Path::new(&file);
        assert_eq!(
            mode(file),
            0o600,
            "{} (umask 022 when created)",
            file.display()
        );
    }
    // A database in a directory Tollgate creates gets a directory only its owner can enter.
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("data/db/t.db");
    let config = format!(
        "[server]\ngateway_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n",
        nested.display()
    );
    std::fs::write(dir.path().join("t.toml"), config).unwrap();
    let out = std::process::Command::new(common::server::BIN)
        .args(["users", "create", "ada", "--config", "t.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&dir.path().join("data")), 0o700);
    assert_eq!(mode(&nested), 0o600);
}

/// Creates a user through the API; returns its id.
async fn api_user(tg: &Tollgate, root: &str, name: &str) -> String {
    let body = json!({ "username": name });
    let user = api_ok(tg, Method::POST, root, "/api/v2/users", Some(&body)).await;
    user["id"].as_str().unwrap().to_string()
}

/// Creates a key for user `uid` through the API: its secret and its id.
async fn api_key(tg: &Tollgate, root: &str, uid: &str, name: &str) -> (String, String) {
    let path = format!("/api/v2/users/{uid}/keys");
    let key = api_ok(
        tg,
        Method::POST,
        root,
        &path,
        Some(&json!({ "name": name })),
    )
    .await;
    let field = |f: &str| key[f].as_str().unwrap().to_string();
    (field("secret"), field("id"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dashboard_cookie_is_a_session_that_sign_out_revocation_and_deletion_end() {
    let tg = Tollgate::builder().start().await;
    let root = tg.admin_key("root");
    let uid = api_user(&tg, &root, "alice").await;
    let open = |key: String| {
        let tg = &tg;
        async move {
            let resp = sign_in_response(tg, &key).await;
            assert_eq!(resp.status(), 303);
            cookie_of(&resp).expect("a session cookie")
        }
    };
    let status = |cookie: String| {
        let tg = &tg;
        async move { dashboard_get(tg, &cookie, "/dashboard").await.0 }
    };
    // An admin's DELETE, then the session `cookie` must be over (sent back to sign-in).
    let ends_after_delete = |path: String, cookie: String, why: &'static str| {
        let (tg, root) = (&tg, root.clone());
        async move {
            let (deleted, _) = api(tg, Method::DELETE, &root, &path, None).await;
            assert!((200..300).contains(&deleted), "DELETE {path}: {deleted}");
            assert_eq!(
                dashboard_get(tg, &cookie, "/dashboard").await.0,
                303,
                "{why}"
            );
        }
    };
    let (key, key_id) = api_key(&tg, &root, &uid, "laptop").await;

    // The cookie holds a session id, not the key, and is no key anywhere.
    let first = open(key.clone()).await;
    let value = first.split_once('=').unwrap().1.to_string();
    assert!(!value.contains(&key[3..]) && value.len() == 64, "{first}");
    let (as_key, _) = api(&tg, Method::GET, &value, "/api/v2/users/me/budget", None).await;
    assert_eq!(as_key, 401, "a session id is not an API key");
    let stored: Vec<String> = tg
        .column("SELECT id_hash FROM dashboard_sessions", &[])
        .await;
    assert_eq!(stored.len(), 1);
    assert!(!stored[0].contains(&value), "only the id's hash is stored");

    // Two sessions, each with its own CSRF token.
    let second = open(key.clone()).await;
    let (_, page) = dashboard_get(&tg, &first, "/dashboard").await;
    let first_csrf = csrf_of(&page);
    let (_, page) = dashboard_get(&tg, &second, "/dashboard").await;
    assert_ne!(first_csrf, csrf_of(&page));
    let sign_out = |cookie: String, csrf: String| {
        let tg = &tg;
        async move {
            dashboard_post(tg, &cookie, "/dashboard/sign-out", &[("csrf", &csrf)])
                .await
                .status()
        }
    };
    let crossed = sign_out(second.clone(), first_csrf.clone()).await;
    assert_eq!(crossed, 403, "a token of another session is refused");

    // Signing out ends the session on the server: the copied cookie is refused.
    assert_eq!(sign_out(first.clone(), first_csrf).await, 303);
    assert_eq!(status(first).await, 303, "replayed after sign-out");
    assert_eq!(status(second.clone()).await, 200, "the other session lives");

    // Revoking the key a session was opened with ends it at once (no cache in between), and
    // deleting the user ends the sessions of every key of theirs.
    let keys = format!("/api/v2/users/{uid}/keys/{key_id}");
    ends_after_delete(keys, second, "its key was revoked").await;
    let (key, _) = api_key(&tg, &root, &uid, "desk").await;
    let third = open(key).await;
    assert_eq!(status(third.clone()).await, 200);
    ends_after_delete(
        format!("/api/v2/users/{uid}"),
        third,
        "its user was deleted",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_csv_defuses_every_formula_leading_character() {
    let upstream = provider_upstream().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .start()
        .await;
    let member = tg.user_key("mallory");
    let root = tg.admin_key("root");
    let models = ["=1+1", "\t=2+2", "\r=3+3", "+4", "-5", "@6", "\u{FF1D}7"];
    for model in models {
        let r = http()
            .post(format!("{}/openai/v1/chat/completions", tg.gateway))
            .bearer_auth(&member)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{model:?}");
    }
    tg.wait_until_recorded(models.len() as i64).await;
    let cookie = cookie_of(&sign_in_response(&tg, &root).await).unwrap();
    let (status, csv) = dashboard_get(&tg, &cookie, "/dashboard/usage.csv?group_by=model").await;
    assert_eq!(status, 200);
    let mut fields = 0;
    for row in csv.split("\r\n").skip(1).filter(|r| !r.is_empty()) {
        let first = row.strip_prefix('"').unwrap_or(row);
        assert!(
            first.starts_with('\''),
            "a field a spreadsheet would run: {row:?}"
        );
        fields += 1;
    }
    assert_eq!(fields, models.len(), "{csv}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_stops_working_inside_an_open_tunnel() {
    let upstream = provider_upstream().await;
    let (tg, _) = with_proxy(&upstream, "").await;
    let root = tg.admin_key("root");
    let uid = api_user(&tg, &root, "alice").await;
    let (key, key_id) = api_key(&tg, &root, &uid, "laptop").await;

    let (tcp, head) = connect(&tg.proxy_addr(), "api.openai.com:443", Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut tunnel = tls_client(&der_of(&tg.proxy_ca_pem()))
        .connect(
            rustls::pki_types::ServerName::try_from("api.openai.com").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let models = b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n";
    tunnel.write_all(models).await.unwrap();
    assert_eq!(read_h1_response(&mut tunnel).await.0, 200);

    let (status, _) = api(
        &tg,
        Method::DELETE,
        &root,
        &format!("/api/v2/users/{uid}/keys/{key_id}"),
        None,
    )
    .await;
    assert!((200..300).contains(&status), "{status}");
    // The same tunnel, the same connection: the next request is checked again, and refused.
    tunnel.write_all(models).await.unwrap();
    assert_eq!(read_h1_response(&mut tunnel).await.0, 401);
    assert_eq!(upstream.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_carry_no_ids_and_no_secrets() {
    let upstream = provider_upstream().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .start()
        .await;
    let key = tg.user_key("carol-7d1e");
    let session = "carol-session-5b9f";
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    for bearer in [
        key.as_str(),
        "tg_ffffffffffffffffffffffffffffffffffffffffffffffff",
    ] {
        http()
            .post(format!("{}/openai/v1/chat/completions", tg.gateway))
            .bearer_auth(bearer)
            .header("x-tollgate-session", session)
            .json(&chat)
            .send()
            .await
            .unwrap();
    }
    tg.wait_until_recorded(1).await;
    let text = common::server::metrics(&tg).await;
    assert!(
        text.contains("tollgate_interceptions_total"),
        "metrics were recorded"
    );
    let mut never: Vec<String> = vec![
        key.clone(),
        key[3..].to_string(),
        "carol-7d1e".into(),
        session.into(),
        OPENAI_CENTRAL_KEY.into(),
    ];
    for sql in [
        "SELECT CAST(id AS TEXT) FROM users",
        "SELECT CAST(id AS TEXT) FROM api_keys",
        "SELECT CAST(id AS TEXT) FROM interceptions",
    ] {
        never.extend(tg.column::<String>(sql, &[]).await);
    }
    for value in &never {
        assert!(!text.contains(value.as_str()), "/metrics names {value:?}");
    }
}
