//! The HTTPS_PROXY front door seen from outside: the real binary with its proxy listener on
//! 127.0.0.1, clients that believe they talk to `https://api.openai.com` (reqwest with a proxy
//! and the Tollgate CA, or raw sockets for what reqwest will not send), and the mock upstream as
//! every provider's plain-http `base_url`. No DNS is needed: the proxy resolves MITM hosts only
//! to recognise their addresses in tunnels, and `api.openai.com` not resolving just means none.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::interception_id;
use common::mock::{fixture_bytes, fixture_manifest, MockResponse, MockUpstream};
use common::server::{Tollgate, OPENAI_CENTRAL_KEY};
use common::tunnel::{
    connect_tunnel, der_of, read_h1_response, tls_client, tls_client_alpn, TlsEchoSite,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use sqlx::{Row, SqlitePool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OPENAI: &str = "https://api.openai.com";

fn chat_request(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "Why does the build fail?"}],
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

/// A mock that answers the OpenAI and Anthropic APIs with their fixtures.
async fn fixture_upstream() -> MockUpstream {
    MockUpstream::start(|req| {
        if req.method == "GET" {
            return MockResponse::json(200, json!({"object": "list", "data": [{"id": "gpt-4o"}]}));
        }
        let stream = req.json()["stream"].as_bool().unwrap_or(false);
        let name = match (req.path_without_query(), stream) {
            ("/v1/chat/completions" | "/chat/completions", false) => "openai-chat.json",
            ("/v1/chat/completions" | "/chat/completions", true) => "openai-chat-stream.sse",
            ("/v1/responses", false) => "openai-responses.json",
            ("/v1/responses", true) => "openai-responses-stream.sse",
            ("/v1/messages", false) => "anthropic-messages.json",
            ("/v1/messages", true) => "anthropic-messages-stream.sse",
            _ => return MockResponse::json(500, json!({"unexpected": req.path})),
        };
        MockResponse::fixture(name)
    })
    .await
}

/// Tollgate with the proxy on, openai and anthropic intercepted, and a key for alice.
async fn proxy_with(upstream: &MockUpstream, proxy_extra: &str, extra: &str) -> (Tollgate, String) {
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .mitm_hosts("anthropic", &["api.anthropic.com"])
        .proxy(proxy_extra)
        .extra(extra)
        .start()
        .await;
    let key = tg.user_key("alice");
    (tg, key)
}

/// A client whose HTTPS goes through the proxy with `key` as the proxy password, trusting only
/// the Tollgate CA (and `extra_roots`).
fn proxied(tg: &Tollgate, key: &str, http1_only: bool, extra_roots: &[&str]) -> reqwest::Client {
    let proxy_url = match tg.proxy.split_once("://") {
        Some((scheme, addr)) => format!("{scheme}://tollgate:{key}@{addr}"),
        None => panic!("proxy not listening"),
    };
    let mut builder = reqwest::Client::builder()
        .proxy(reqwest::Proxy::https(&proxy_url).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(tg.proxy_ca_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(20));
    for pem in extra_roots {
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

/// Builds the comparison JSON from an interceptions row and its children, whichever the
/// backend's row type (the SQL in `interception` hands both the same column types).
macro_rules! interception_json {
    ($r:expr, $tools:expr, $thoughts:expr, $prompts:expr) => {{
        let (r, tools) = (&$r, &$tools);
        json!({
            "provider": r.get::<String, _>("provider"),
            "model": r.get::<String, _>("model"),
            "status": r.get::<String, _>("status"),
            "upstream_status": r.get::<Option<i64>, _>("upstream_status"),
            "streaming": r.get::<bool, _>("streaming"),
            "client": r.get::<String, _>("client"),
            "credential_kind": r.get::<String, _>("credential_kind"),
            "credential_hint": r.get::<Option<String>, _>("credential_hint"),
            "response_id": r.get::<Option<String>, _>("response_id"),
            "input": r.get::<i64, _>("input_tokens"),
            "output": r.get::<i64, _>("output_tokens"),
            "cache_read": r.get::<i64, _>("cache_read_input_tokens"),
            "cache_write": r.get::<i64, _>("cache_write_input_tokens"),
            "reasoning": r.get::<i64, _>("reasoning_tokens"),
            "cost_nano_usd": r.get::<i64, _>("cost_nano_usd"),
            "user_id": r.get::<String, _>("user_id"),
            "prompts": $prompts,
            "tools": tools.iter().map(|t| json!({
                "id": t.get::<String, _>(0),
                "name": t.get::<String, _>(1),
                "arguments": serde_json::from_str::<Value>(&t.get::<String, _>(2)).unwrap_or(Value::Null),
            })).collect::<Vec<_>>(),
            "thoughts": $thoughts,
        })
    }};
}

/// The recorded interception, in the fields the gateway tests compare, from either backend.
async fn interception(tg: &Tollgate, id: &str) -> Value {
    if !common::server::on_postgres() {
        return interception_sqlite(&tg.db().await, id).await;
    }
    // uuid and integer columns cast to what the SQLite file holds (text ids, i64).
    let db = sqlx::PgPool::connect(&tg.db_url).await.unwrap();
    let r = sqlx::query(
        "SELECT provider, model, status, upstream_status::bigint AS upstream_status, streaming, \
         client, credential_kind, credential_hint, response_id, input_tokens, output_tokens, \
         cache_read_input_tokens, cache_write_input_tokens, reasoning_tokens, cost_nano_usd, \
         user_id::text AS user_id FROM interceptions WHERE id = $1::uuid",
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
    let thoughts: Vec<String> = sqlx::query_scalar(
        "SELECT content FROM model_thoughts WHERE interception_id = $1::uuid ORDER BY id",
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
    db.close().await;
    interception_json!(r, tools, thoughts, prompts)
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
    let thoughts: Vec<String> = sqlx::query_scalar(
        "SELECT content FROM model_thoughts WHERE interception_id = ? ORDER BY id",
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
    interception_json!(r, tools, thoughts, prompts)
}

fn assert_matches_manifest(row: &Value, fixture: &str) {
    let m = &fixture_manifest()[fixture];
    for field in [
        "input",
        "output",
        "cache_read",
        "cache_write",
        "reasoning",
        "response_id",
        "thoughts",
    ] {
        assert_eq!(row[field], m[field], "{fixture}: {field}");
    }
    let tools: Vec<Value> = m["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| json!({"id": t["id"], "name": t["name"], "arguments": t["arguments"]}))
        .collect();
    assert_eq!(row["tools"], json!(tools), "{fixture}: tool calls");
}

/// A counter from the admin listener's /metrics (0 when absent).
async fn metric(tg: &Tollgate, series: &str) -> u64 {
    common::server::metric_value(&common::server::metrics(tg).await, series).unwrap_or(0.0) as u64
}

const MITM_CONNECTS: &str = "tollgate_proxy_connects_total{mode=\"mitm\"}";

/// Sends `bytes` on a fresh connection to the proxy and returns everything it answers until it
/// closes (or `wait` passes).
async fn raw_exchange(addr: &str, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A CA made by the test (root or intermediate), as PEM, with its issuer handle.
fn test_ca(
    cn: &str,
    parent: Option<&Issuer<'static, KeyPair>>,
) -> (String, String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = match parent {
        Some(p) => params.signed_by(&key, p).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    let key_pem = key.serialize_pem();
    let issuer = Issuer::new(params, key);
    (cert.pem(), key_pem, issuer)
}

/// A server certificate for `names`, signed by `issuer`: (cert PEM, key PEM).
fn server_cert(names: &[&str], issuer: &Issuer<'static, KeyPair>) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn mitm_calls_are_recorded_exactly_like_gateway_calls() {
    let upstream = fixture_upstream().await;
    let (tg, key) = proxy_with(&upstream, "", "").await;
    let client = proxied(&tg, &key, false, &[]);
    let cases = [
        (
            format!("{OPENAI}/v1/chat/completions"),
            chat_request(false),
            "openai-chat.json",
        ),
        (
            format!("{OPENAI}/v1/chat/completions"),
            chat_request(true),
            "openai-chat-stream.sse",
        ),
        (
            format!("{OPENAI}/v1/responses"),
            json!({"model": "gpt-5-2025-08-07", "input": "Run the tests.", "stream": true}),
            "openai-responses-stream.sse",
        ),
        (
            "https://api.anthropic.com/v1/messages".to_string(),
            json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024, "stream": false,
                   "messages": [{"role": "user", "content": "Fix the flaky test."}]}),
            "anthropic-messages.json",
        ),
    ];
    let mut ids = Vec::new();
    for (url, body, fixture) in &cases {
        // The client sends its own provider key, as SDKs do; the default policy replaces it.
        let resp = client
            .post(url)
            .bearer_auth("sk-client-own-key-5555")
            .header("x-api-key", "sk-ant-client-own-5555")
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{url}");
        assert_eq!(
            resp.version(),
            reqwest::Version::HTTP_2,
            "ALPN picked h2 inside the tunnel"
        );
        ids.push(interception_id(&resp));
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(
            bytes.as_ref(),
            fixture_bytes(fixture).as_slice(),
            "{fixture}: relayed unchanged"
        );
    }
    for req in upstream.requests() {
        let credential = req
            .header("authorization")
            .or(req.header("x-api-key"))
            .unwrap();
        assert!(
            credential == format!("Bearer {OPENAI_CENTRAL_KEY}")
                || credential == common::server::ANTHROPIC_CENTRAL_KEY,
            "the central key went upstream, not {credential}"
        );
        assert!(req
            .headers
            .iter()
            .all(|(_, v)| !v.contains("client-own") && !v.contains(&key)));
        assert!(req.header("proxy-authorization").is_none());
    }
    tg.wait_until_recorded(cases.len() as i64).await;
    let alice: String = tg
        .scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = 'alice'",
            &[],
        )
        .await;
    for ((url, body, fixture), id) in cases.iter().zip(&ids) {
        let row = interception(&tg, id).await;
        assert_matches_manifest(&row, fixture);
        let provider = if url.contains("anthropic") {
            "anthropic"
        } else {
            "openai"
        };
        assert_eq!(row["provider"], provider);
        assert_eq!(row["model"], body["model"]);
        assert_eq!(row["status"], "completed");
        assert_eq!(row["upstream_status"], 200);
        assert_eq!(row["streaming"], fixture.ends_with(".sse"));
        assert_eq!(row["credential_kind"], "central");
        assert_eq!(
            row["user_id"],
            alice.as_str(),
            "the proxy password says who called"
        );
        assert!(row["cost_nano_usd"].as_i64().unwrap() > 0);
    }
    let rows: Vec<Value> =
        futures_util::future::join_all(ids.iter().map(|id| interception(&tg, id))).await;
    // The stream and its blocking twin are recorded alike.
    for field in [
        "input",
        "output",
        "cache_read",
        "reasoning",
        "cost_nano_usd",
        "response_id",
    ] {
        assert_eq!(rows[0][field], rows[1][field], "twin mismatch on {field}");
    }
    assert_eq!(rows[0]["prompts"], json!(["Why does the build fail?"]));
    // One CONNECT per host (the client reused each tunnel), one leaf per host.
    assert_eq!(metric(&tg, MITM_CONNECTS).await, 2);
    assert_eq!(metric(&tg, "tollgate_leaf_certs_minted_total").await, 2);
    assert_eq!(
        metric(&tg, "tollgate_mitm_requests_total{provider=\"openai\"}").await,
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_and_http2_share_one_connect_each() {
    let upstream = fixture_upstream().await;
    let (tg, key) = proxy_with(&upstream, "", "").await;
    let url = format!("{OPENAI}/v1/chat/completions");
    for (http1_only, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let client = proxied(&tg, &key, http1_only, &[]);
        for _ in 0..3 {
            let resp = client
                .post(&url)
                .json(&chat_request(true))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), version);
            resp.bytes().await.unwrap();
            // Let the client put the connection back in its pool before the next request
            // (otherwise it may race a new CONNECT against the pooled one).
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Two clients, six requests, two CONNECTs: keep-alive (h1) and multiplexing (h2) inside.
    assert_eq!(metric(&tg, MITM_CONNECTS).await, 2);
    assert_eq!(
        metric(&tg, "tollgate_leaf_certs_minted_total").await,
        1,
        "the leaf was cached"
    );
    // The same by hand, with no client pool in the way: three requests on one TLS connection.
    let (tcp, head) = connect_tunnel(&tg.proxy_addr(), "api.openai.com:443", Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut tls = tls_client(&der_of(&tg.proxy_ca_pem()))
        .connect(ServerName::try_from("api.openai.com").unwrap(), tcp)
        .await
        .unwrap();
    let body = chat_request(false).to_string();
    for _ in 0..3 {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let (status, got) = read_h1_response(&mut tls).await;
        assert_eq!(status, 200);
        assert_eq!(got, fixture_bytes("openai-chat.json"));
    }
    assert_eq!(metric(&tg, MITM_CONNECTS).await, 3);
    tg.wait_until_recorded(9).await;
    // The proxy port also serves the gateway routes (not a CONNECT: replayed to the gateway).
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = plain
        .post(format!("{}/openai/v1/chat/completions", tg.proxy))
        .bearer_auth(&key)
        .json(&chat_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = plain
        .get(format!("{}/nope", tg.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404, "never an open relay");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_clients_own_key_is_kept_when_the_policy_allows_it() {
    let upstream = fixture_upstream().await;
    let (tg, key) = proxy_with(
        &upstream,
        "",
        "[keys]\ncentral_api_key_enabled = true\nallow_user_api_key = true\nallow_central_api_key_fallback = false",
    )
    .await;
    let resp = proxied(&tg, &key, false, &[])
        .post(format!("{OPENAI}/v1/chat/completions"))
        .bearer_auth("sk-dana-personal-4321")
        .json(&chat_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some("Bearer sk-dana-personal-4321")
    );
    tg.wait_until_recorded(1).await;
    let row = interception(&tg, &id).await;
    assert_eq!(row["credential_kind"], "byok");
    assert_eq!(row["credential_hint"], "sk-…4321");
}

#[tokio::test(flavor = "multi_thread")]
async fn copilot_through_mitm_keeps_the_github_token_and_is_recorded() {
    let upstream = fixture_upstream().await;
    let tg = Tollgate::builder()
        .provider("copilot", "copilot", &upstream.base_url())
        .mitm_hosts(
            "copilot",
            &[
                "api.individual.githubcopilot.com",
                "api.business.githubcopilot.com",
                "api.enterprise.githubcopilot.com",
            ],
        )
        .proxy("")
        .start()
        .await;
    let key = tg.user_key("carol");
    let client = proxied(&tg, &key, false, &[]);
    let resp = client
        .post("https://api.individual.githubcopilot.com/chat/completions")
        .bearer_auth("ghu_carolsGitHubToken1234")
        .header("user-agent", "GitHubCopilotChat/0.31.2")
        .header("x-interaction-id", "5f0c-interaction")
        .json(&chat_request(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        fixture_bytes("openai-chat-stream.sse").as_slice()
    );
    let sent = upstream.last_request();
    assert_eq!(sent.path, "/chat/completions", "copilot routes have no /v1");
    assert_eq!(
        sent.header("authorization"),
        Some("Bearer ghu_carolsGitHubToken1234")
    );
    assert!(sent.headers.iter().all(|(_, v)| !v.contains(&key)));
    // The business host maps to the same provider.
    let resp = client
        .get("https://api.business.githubcopilot.com/models")
        .bearer_auth("ghu_carolsGitHubToken1234")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(upstream.last_request().path, "/models");
    assert_eq!(
        upstream.last_request().header("authorization"),
        Some("Bearer ghu_carolsGitHubToken1234")
    );
    tg.wait_until_recorded(1).await;
    let row = interception(&tg, &id).await;
    assert_matches_manifest(&row, "openai-chat-stream.sse");
    assert_eq!(row["provider"], "copilot");
    assert_eq!(row["client"], "GitHub Copilot (VS Code)");
    assert_eq!(row["credential_kind"], "byok");
    let carol: String = tg
        .scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = 'carol'",
            &[],
        )
        .await;
    assert_eq!(row["user_id"], carol.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_proxy_url_runs_tls_inside_tls() {
    let upstream = fixture_upstream().await;
    let (listener_ca_pem, _, listener_ca) = test_ca("Proxy listener test CA", None);
    let (cert, cert_key) = server_cert(&["127.0.0.1", "localhost"], &listener_ca);
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .file("certs/proxy.pem", cert)
        .file("certs/proxy.key", cert_key)
        .proxy("tls_cert = \"certs/proxy.pem\"\ntls_key = \"certs/proxy.key\"")
        .start()
        .await;
    assert!(tg.proxy.starts_with("https://"), "{}", tg.proxy);
    let key = tg.user_key("alice");
    let client = proxied(&tg, &key, false, &[&listener_ca_pem]);
    for _ in 0..2 {
        let resp = client
            .post(format!("{OPENAI}/v1/chat/completions"))
            .json(&chat_request(false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.bytes().await.unwrap().as_ref(),
            fixture_bytes("openai-chat.json").as_slice()
        );
    }
    assert_eq!(metric(&tg, MITM_CONNECTS).await, 1);
    // Plain HTTP to the TLS listener is not a request: the connection just ends.
    let out = raw_exchange(
        &tg.proxy_addr(),
        b"CONNECT api.openai.com:443 HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(!out.contains("200"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tunnels_pass_bytes_unchanged_to_a_local_tls_server() {
    // A TLS echo server with its own throwaway certificate.
    let (server_pem, server_key) = {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let server_der = der_of(&server_pem);
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        server_der.clone(),
        rustls_pemfile::private_key(&mut server_key.as_bytes())
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 70_000];
                let mut n = 0;
                while n < buf.len() {
                    match tls.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                }
                let _ = tls.write_all(&buf[..n]).await;
                let _ = tls.shutdown().await;
            });
        }
    });

    let upstream = fixture_upstream().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .proxy(&format!(
            "allowed_private_cidrs = [\"127.0.0.1/32\"]\nallowed_ports = [443, {port}]"
        ))
        .start()
        .await;
    // No credentials needed for a host Tollgate does not intercept.
    let (tcp, head) = connect_tunnel(&tg.proxy_addr(), &format!("localhost:{port}"), None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut tls = tls_client(&server_der)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("end-to-end TLS with the server's own certificate");
    let seen = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    assert_eq!(
        seen, server_der,
        "the client sees the server's certificate, not a minted one"
    );
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    tls.write_all(&payload).await.unwrap();
    let mut echoed = Vec::new();
    tls.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, payload, "bytes pass unchanged both ways");
    assert_eq!(
        metric(&tg, "tollgate_proxy_connects_total{mode=\"tunnel\"}").await,
        1
    );
    assert_eq!(metric(&tg, "tollgate_leaf_certs_minted_total").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tunnels_to_private_addresses_and_denied_tunnels_get_403() {
    let upstream = fixture_upstream().await;
    let (tg, key) = proxy_with(&upstream, "", "").await;
    let addr = tg.proxy_addr();
    for target in [
        "127.0.0.1:443",
        "localhost:443",
        "[::1]:443",
        "169.254.169.254:80",
        "10.0.0.1:443",
    ] {
        let (_, head) = connect_tunnel(&addr, target, Some(&key)).await;
        assert!(
            head.starts_with("HTTP/1.1 403 Forbidden"),
            "{target}: {head}"
        );
    }
    let out = raw_exchange(
        &addr,
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.contains("private or reserved address"), "{out}");
    assert!(out.contains("allowed_private_cidrs"), "{out}");
    let out = raw_exchange(
        &addr,
        b"CONNECT example.com:22 HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out}");
    assert!(out.contains("ports 80, 443 only"), "{out}");
    assert!(metric(&tg, "tollgate_proxy_connects_total{mode=\"denied\"}").await >= 7);

    let denying = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .proxy("tunnel = \"deny\"")
        .start()
        .await;
    let out = raw_exchange(
        &denying.proxy_addr(),
        b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403 Forbidden"), "{out}");
    assert!(out.contains("proxy.tunnel = \"deny\""), "{out}");
}

/// Opens a CONNECT tunnel to `target` and starts TLS inside it for `name`, trusting `roots`.
async fn tls_through_tunnel(
    proxy: &str,
    target: &str,
    key: Option<&str>,
    name: &str,
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let (tcp, head) = connect_tunnel(proxy, target, key).await;
    assert!(head.starts_with("HTTP/1.1 200"), "CONNECT {target}: {head}");
    let name = ServerName::try_from(name.to_string()).unwrap();
    let connecting = tls_client(roots).connect(name, tcp);
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .expect("the TLS handshake ends, one way or the other")
        .map_err(|e| e.to_string())
}

/// Asserts that a tunnel to `target` without credentials, with a ClientHello for `name`, reaches
/// `site` end to end (its own certificate) and echoes.
async fn assert_tunnelled_to(site: &TlsEchoSite, proxy: &str, target: &str, name: &str) {
    let mut tls = tls_through_tunnel(proxy, target, None, name, &site.cert)
        .await
        .unwrap_or_else(|e| panic!("a ClientHello for {name} through {target}: {e}"));
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

const DENIED_CONNECTS: &str = "tollgate_proxy_connects_total{mode=\"denied\"}";

#[tokio::test(flavor = "multi_thread")]
async fn a_blind_tunnel_to_a_mitm_hosts_address_is_refused() {
    // `localhost` is the MITM host, so 127.0.0.1 is a governed address; loopback is opened for
    // tunnels, so nothing else stands between a tunnel and the site on it.
    let site = TlsEchoSite::start(&["other.example", "127.0.0.1"]).await;
    let port = site.port;
    let upstream = fixture_upstream().await;
    let open_loopback =
        format!("allowed_private_cidrs = [\"127.0.0.0/8\"]\nallowed_ports = [443, {port}]");
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["localhost"])
        .proxy(&open_loopback)
        .start()
        .await;
    let key = tg.user_key("alice");
    let proxy = tg.proxy_addr();
    let by_ip = format!("127.0.0.1:{port}");

    // The address is reachable: a ClientHello that names another host in clear is tunnelled
    // (CDN addresses serve other sites too).
    assert_tunnelled_to(&site, &proxy, &by_ip, "other.example").await;
    assert_eq!(site.hellos(), [Some("other.example".to_string())]);

    // By IP with no SNI (rustls sends none for an IP address): refused with a TLS alert, key or
    // no key (a key opens interception of a named MITM host, not a blind tunnel).
    for auth in [None, Some(key.as_str())] {
        let err = tls_through_tunnel(&proxy, &by_ip, auth, "127.0.0.1", &site.cert)
            .await
            .expect_err("a blind ClientHello to a MITM host's address is refused");
        assert!(err.contains("AccessDenied"), "{err}");
    }
    // Not TLS at all: closed, nothing relayed.
    let (mut tcp, head) = connect_tunnel(&proxy, &by_ip, None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "closed without an answer: {out:?}"
    );
    assert_eq!(
        site.hellos().len(),
        1,
        "no blind ClientHello reached the site"
    );
    assert_eq!(metric(&tg, DENIED_CONNECTS).await, 3);
    assert_eq!(
        metric(&tg, "tollgate_proxy_connects_total{mode=\"tunnel\"}").await,
        1
    );
    let (_, logs) = tg.stop().await;
    let refused = logs
        .iter()
        .filter(|l| l.contains("proxy connect refused") && l.contains("governed_address"))
        .count();
    assert_eq!(refused, 3, "{}", logs.join("\n"));

    // The control: where `localhost` is not a MITM host, the very same blind hello is tunnelled,
    // so the refusal above is the governed address and nothing else.
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .proxy(&open_loopback)
        .start()
        .await;
    assert_tunnelled_to(&site, &tg.proxy_addr(), &by_ip, "127.0.0.1").await;
    assert_eq!(site.hellos().last(), Some(&None));
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_whose_client_hello_names_a_mitm_host_is_intercepted_or_refused() {
    // The CONNECT goes to an allowed, ungoverned address (the site); only the SNI names
    // api.openai.com.
    let site = TlsEchoSite::start(&["other.example"]).await;
    let port = site.port;
    let upstream = fixture_upstream().await;
    let (tg, key) = proxy_with(
        &upstream,
        &format!("allowed_private_cidrs = [\"127.0.0.1/32\"]\nallowed_ports = [443, {port}]"),
        "",
    )
    .await;
    let proxy = tg.proxy_addr();
    let ca = der_of(&tg.proxy_ca_pem());
    let by_ip = format!("127.0.0.1:{port}");

    // The control: another SNI through the same tunnel reaches the site, no key needed.
    assert_tunnelled_to(&site, &proxy, &by_ip, "other.example").await;

    // Without a valid key as the proxy password: a TLS alert, and neither the site nor the
    // provider sees anything.
    let wrong = "tg_ffffffffffffffffffffffffffffffffffffffffffffffff";
    for auth in [None, Some(wrong)] {
        let err = tls_through_tunnel(&proxy, &by_ip, auth, "API.OpenAI.com.", &ca)
            .await
            .expect_err("a ClientHello for a MITM host without a key is refused");
        assert!(err.contains("AccessDenied"), "{err}");
    }
    assert_eq!(site.hellos(), [Some("other.example".to_string())]);
    assert_eq!(upstream.request_count(), 0);
    assert_eq!(metric(&tg, DENIED_CONNECTS).await, 2);

    // With the key: intercepted exactly as a CONNECT to api.openai.com would be.
    let mut tls = tls_through_tunnel(&proxy, &by_ip, Some(&key), "api.openai.com", &ca)
        .await
        .expect("Tollgate's leaf for api.openai.com");
    let body = serde_json::to_vec(&chat_request(false)).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer sk-client-own-key-5555\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    tls.write_all(&body).await.unwrap();
    let (status, answer) = read_h1_response(&mut tls).await;
    assert_eq!(status, 200);
    assert_eq!(answer, fixture_bytes("openai-chat.json"));
    drop(tls);
    let sent = upstream.last_request();
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {OPENAI_CENTRAL_KEY}").as_str()),
        "the central key went upstream"
    );
    assert!(sent
        .headers
        .iter()
        .all(|(_, v)| !v.contains(&key) && !v.contains("client-own")));
    tg.wait_until_recorded(1).await;
    let id: String = tg
        .scalar("SELECT CAST(id AS TEXT) FROM interceptions", &[])
        .await;
    let alice: String = tg
        .scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = 'alice'",
            &[],
        )
        .await;
    let row = interception(&tg, &id).await;
    assert_eq!(row["provider"], "openai");
    assert_eq!(row["status"], "completed");
    assert_eq!(row["credential_kind"], "central");
    assert_eq!(row["user_id"], alice.as_str());
    assert_eq!(site.hellos().len(), 1, "the site never saw the hello");
    assert_eq!(metric(&tg, MITM_CONNECTS).await, 1);
    assert_eq!(metric(&tg, DENIED_CONNECTS).await, 2);
    let (_, logs) = tg.stop().await;
    let joined = logs.join("\n");
    let refused = logs
        .iter()
        .filter(|l| l.contains("proxy connect refused") && l.contains("governed_host_by_sni"))
        .count();
    assert_eq!(refused, 2, "{joined}");
    assert!(
        !joined.contains(&key),
        "the proxy password never appears in a log line"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mitm_hosts_need_a_valid_key_as_the_proxy_password() {
    let upstream = fixture_upstream().await;
    let (tg, key) = proxy_with(&upstream, "", "").await;
    let addr = tg.proxy_addr();
    for (auth, why) in [
        (None, "missing proxy credentials"),
        (
            Some("tg_ffffffffffffffffffffffffffffffffffffffffffffffff"),
            "invalid or revoked",
        ),
    ] {
        let (_, head) = connect_tunnel(&addr, "api.openai.com:443", auth).await;
        assert!(
            head.starts_with("HTTP/1.1 407 Proxy Authentication Required"),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authenticate: Basic realm=\"tollgate\""),
            "{head}"
        );
        let out = raw_exchange(
            &addr,
            format!(
                "CONNECT api.openai.com:443 HTTP/1.1\r\n{}\r\n",
                auth.map(|k| {
                    use base64::Engine;
                    format!(
                        "Proxy-Authorization: Basic {}\r\n",
                        base64::engine::general_purpose::STANDARD.encode(format!("u:{k}"))
                    )
                })
                .unwrap_or_default()
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert!(out.contains(why), "{out}");
    }
    // reqwest sees the refusal as a failed tunnel.
    let err = proxied(&tg, "tg_wrong", false, &[])
        .post(format!("{OPENAI}/v1/chat/completions"))
        .json(&chat_request(false))
        .send()
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("ProxyAuthRequired"), "{err:?}");
    assert_eq!(upstream.request_count(), 0);
    let (_, head) = connect_tunnel(&addr, "api.openai.com:443", Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_never_disturbs_other_connections() {
    let upstream = fixture_upstream().await;
    let (tg, key) = proxy_with(&upstream, "handshake_timeout_ms = 1500", "").await;
    let addr = tg.proxy_addr();
    let ca_der = der_of(&tg.proxy_ca_pem());
    let client = proxied(&tg, &key, false, &[]);
    // A normal request keeps working while the bad clients below do their worst.
    let normal = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..10 {
                let resp = client
                    .post(format!("{OPENAI}/v1/chat/completions"))
                    .json(&chat_request(true))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap();
                ok += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            ok
        })
    };
    let wait = Duration::from_secs(5);
    let garbage = raw_exchange(&addr, b"\x00\x01\x02 definitely not http\r\n\r\n", wait);
    let no_port = raw_exchange(
        &addr,
        b"CONNECT api.openai.com HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
        wait,
    );
    let huge = {
        let mut req = b"CONNECT api.openai.com:443 HTTP/1.1\r\nX-Filler: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 1024 * 1024));
        req.extend_from_slice(b"\r\n\r\n");
        let addr = addr.clone();
        async move { raw_exchange(&addr, &req, wait).await }
    };
    let plain_http_inside = {
        let (addr, key) = (addr.clone(), key.clone());
        async move {
            let (mut s, head) = connect_tunnel(&addr, "api.openai.com:443", Some(&key)).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let other_sni = {
        let (addr, key, ca_der) = (addr.clone(), key.clone(), ca_der.clone());
        async move {
            let (s, head) = connect_tunnel(&addr, "api.openai.com:443", Some(&key)).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            // Even a host Tollgate would intercept elsewhere is refused: it is not the CONNECT target.
            tls_client(&ca_der)
                .connect(ServerName::try_from("api.anthropic.com").unwrap(), s)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let never_finishes = {
        let (addr, key) = (addr.clone(), key.clone());
        async move {
            let (mut s, head) = connect_tunnel(&addr, "api.openai.com:443", Some(&key)).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            // The start of a TLS record, then silence.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
            let started = Instant::now();
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            (read.is_ok(), started.elapsed())
        }
    };
    let silent_h2 = {
        let (addr, key, ca_der) = (addr.clone(), key.clone(), ca_der.clone());
        async move {
            let (s, head) = connect_tunnel(&addr, "api.openai.com:443", Some(&key)).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let mut tls = tls_client_alpn(&ca_der, &[b"h2"])
                .connect(ServerName::try_from("api.openai.com").unwrap(), s)
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            // No HTTP/2 preface: the proxy closes after the handshake timeout.
            let started = Instant::now();
            let mut out = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
            (read.is_ok(), started.elapsed())
        }
    };
    let silent = {
        let addr = addr.clone();
        async move {
            let mut s = TcpStream::connect(&addr).await.unwrap();
            let mut out = Vec::new();
            let started = Instant::now();
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            (read.is_ok(), started.elapsed())
        }
    };
    let (garbage, no_port, huge, plain_http_inside, other_sni, never_finishes, silent, silent_h2) = tokio::join!(
        garbage,
        no_port,
        huge,
        plain_http_inside,
        other_sni,
        never_finishes,
        silent,
        silent_h2
    );
    assert!(garbage.starts_with("HTTP/1.1 400 Bad Request"), "{garbage}");
    assert!(garbage.contains("not an HTTP request"), "{garbage}");
    assert!(no_port.starts_with("HTTP/1.1 400 Bad Request"), "{no_port}");
    assert!(no_port.contains("no port"), "{no_port}");
    assert!(
        huge.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{huge}"
    );
    assert!(
        plain_http_inside.starts_with("HTTP/1.1 400 Bad Request"),
        "{plain_http_inside}"
    );
    assert!(
        plain_http_inside.contains("must start TLS"),
        "{plain_http_inside}"
    );
    let err = other_sni.expect_err("a ClientHello for another host must not get a certificate");
    assert!(
        err.contains("alert") || err.contains("HandshakeFailure"),
        "{err}"
    );
    let (closed, after) = never_finishes;
    assert!(closed, "a stalled handshake is closed by the proxy");
    assert!(
        after >= Duration::from_millis(1000) && after < Duration::from_secs(5),
        "{after:?}"
    );
    let (closed, after) = silent;
    assert!(
        closed && after < Duration::from_secs(5),
        "a silent client is closed: {after:?}"
    );
    let (closed, after) = silent_h2;
    assert!(
        closed && after < Duration::from_secs(5),
        "a silent HTTP/2 client is closed: {after:?}"
    );

    assert_eq!(normal.await.unwrap(), 10, "the normal client never noticed");
    let resp = client
        .post(format!("{OPENAI}/v1/chat/completions"))
        .json(&chat_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "the proxy still serves");
    let (_, logs) = tg.stop().await;
    let joined = logs.join("\n");
    assert!(!joined.contains("panicked"), "{joined}");
    assert!(
        !joined.contains(&key),
        "the proxy password never appears in a log line"
    );
    assert!(joined.contains("the ClientHello names another host than the CONNECT"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corporate_ca_with_an_intermediate_sends_leaf_and_intermediate() {
    let (root_pem, _, root) = test_ca("Corp Root CA (test)", None);
    let (inter_pem, inter_key, _) = test_ca("Corp Issuing CA (test)", Some(&root));
    let upstream = fixture_upstream().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        // The signing CA first, then the root (which is not sent: clients already hold it).
        .file("certs/ca.pem", format!("{inter_pem}{root_pem}"))
        .file("certs/ca.key", inter_key)
        .proxy("")
        .start()
        .await;
    let key = tg.user_key("alice");
    let (tcp, head) = connect_tunnel(&tg.proxy_addr(), "api.openai.com:443", Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let tls = tls_client(&der_of(&root_pem))
        .connect(ServerName::try_from("api.openai.com").unwrap(), tcp)
        .await
        .expect("a client trusting only the root accepts the minted leaf");
    let chain = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    assert_eq!(chain[1], der_of(&inter_pem)[0]);
    drop(tls);
    // The same through an HTTP client that trusts the corporate root only.
    let proxy = reqwest::Proxy::https(format!("http://u:{key}@{}", tg.proxy_addr())).unwrap();
    let client = reqwest::Client::builder()
        .proxy(proxy)
        .add_root_certificate(reqwest::Certificate::from_pem(root_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let resp = client
        .post(format!("{OPENAI}/v1/chat/completions"))
        .json(&chat_request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs1_rsa_and_sec1_ec_corporate_keys_work_end_to_end() {
    let upstream = fixture_upstream().await;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ca");
    for name in ["rsa-ca", "ec-ca"] {
        let cert = std::fs::read_to_string(format!("{fixtures}/{name}.pem")).unwrap();
        let ca_key = std::fs::read_to_string(format!("{fixtures}/{name}.key")).unwrap();
        let tg = Tollgate::builder()
            .provider("openai", "openai", &upstream.base_url())
            .mitm_hosts("openai", &["api.openai.com"])
            .file("certs/ca.pem", cert.clone())
            .file("certs/ca.key", ca_key)
            .proxy("")
            .start()
            .await;
        let key = tg.user_key("alice");
        let resp = proxied(&tg, &key, false, &[])
            .post(format!("{OPENAI}/v1/chat/completions"))
            .json(&chat_request(false))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(resp.status(), 200, "{name}");
    }
}

/// Runs `tollgate serve` with `config` in `dir` and returns its exit code and output (it must
/// stop on its own).
fn serve_fails(dir: &std::path::Path, config: &str) -> (Option<i32>, String) {
    std::fs::write(dir.join("t.toml"), config).unwrap();
    let out = std::process::Command::new(common::server::BIN)
        .args(["serve", "--config", "t.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn ca_init_writes_a_private_key_and_never_overwrites() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(common::server::BIN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["ca", "init"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("certs/ca.pem") && stdout.contains("SHA-256 fingerprint"),
        "{stdout}"
    );
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("certs/ca.key"), 0o600);
    let pem = std::fs::read_to_string(dir.path().join("certs/ca.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let key_before = std::fs::read(dir.path().join("certs/ca.key")).unwrap();
    let again = run(&["ca", "init"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(
        std::fs::read(dir.path().join("certs/ca.key")).unwrap(),
        key_before
    );
    let out = run(&["ca", "init", "--out", "elsewhere/ca"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode("elsewhere/ca/ca.key"), 0o600);
}

#[test]
fn the_proxy_refuses_to_start_without_a_usable_ca() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\ngateway_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n[proxy]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
        dir.path().join("t.db").display()
    );
    let (code, out) = serve_fails(dir.path(), &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("tollgate ca init"), "{out}");

    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    // A CA key anyone can read.
    let ca = tollgate::tls::generate_ca().unwrap();
    std::fs::write(certs.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(certs.join("ca.key"), &ca.key_pem).unwrap();
    std::fs::set_permissions(certs.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = serve_fails(dir.path(), &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("chmod 600"), "{out}");
    // A key that belongs to another certificate.
    let other = tollgate::tls::generate_ca().unwrap();
    std::fs::remove_file(certs.join("ca.key")).unwrap();
    std::fs::write(certs.join("ca.key"), &other.key_pem).unwrap();
    std::fs::set_permissions(certs.join("ca.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out) = serve_fails(dir.path(), &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("does not belong to the certificate"), "{out}");
    // A certificate that is not a CA.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::new(vec!["example.com".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(certs.join("ca.pem"), leaf.pem()).unwrap();
    std::fs::write(certs.join("ca.key"), key.serialize_pem()).unwrap();
    let (code, out) = serve_fails(dir.path(), &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("is not a CA certificate"), "{out}");
    // An expired CA.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    std::fs::write(
        certs.join("ca.pem"),
        params.self_signed(&key).unwrap().pem(),
    )
    .unwrap();
    std::fs::write(certs.join("ca.key"), key.serialize_pem()).unwrap();
    let (code, out) = serve_fails(dir.path(), &config);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("expired on"), "{out}");
    // A good CA, but the listener's own certificate is missing.
    let ca = tollgate::tls::generate_ca().unwrap();
    std::fs::write(certs.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(certs.join("ca.key"), &ca.key_pem).unwrap();
    let with_tls = format!("{config}tls_cert = \"certs/nope.pem\"\ntls_key = \"certs/nope.key\"\n");
    let (code, out) = serve_fails(dir.path(), &with_tls);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("proxy.tls_cert / proxy.tls_key: cannot read certs/nope.pem"),
        "{out}"
    );
}

/// Every place a client can put its Tollgate key, through both doors and under every key
/// policy: the provider never receives it (issue 14; before, with `allow_user_api_key` the key
/// sent both as `X-Tollgate-Key` and as `Authorization` went upstream as the "user's key").
#[tokio::test(flavor = "multi_thread")]
async fn a_tollgate_key_never_reaches_the_provider_under_any_policy_header_or_door() {
    let upstream = fixture_upstream().await;
    let policies = [
        (true, false, false),
        (false, true, false),
        (true, true, false),
        (true, true, true),
    ];
    let mut sent = 0;
    for (central, user, fallback) in policies {
        let (tg, key) = proxy_with(
            &upstream,
            "",
            &format!(
                "[keys]\ncentral_api_key_enabled = {central}\nallow_user_api_key = {user}\nallow_central_api_key_fallback = {fallback}"
            ),
        )
        .await;
        let bearer = format!("Bearer {key}");
        // (header, value) sets: the key alone, with its own header, and under other names.
        let header_sets: Vec<Vec<(&str, &str)>> = vec![
            vec![("authorization", &bearer)],
            vec![("x-api-key", &key)],
            vec![("x-tollgate-key", &key), ("authorization", &bearer)],
            vec![("x-tollgate-key", &key), ("x-api-key", &key)],
            vec![
                ("x-tollgate-key", &key),
                ("authorization", &bearer),
                ("x-api-key", &key),
            ],
            vec![
                ("x-coder-ai-governance-token", &key),
                ("authorization", &bearer),
            ],
            vec![
                ("x-tollgate-key", &key),
                ("api-key", &key),
                ("x-goog-api-key", &key),
                ("openai-organization", &key),
            ],
        ];
        let gateway = reqwest::Client::builder().no_proxy().build().unwrap();
        let mitm = proxied(&tg, &key, true, &[]);
        for (provider, body, path) in [
            ("openai", chat_request(false), "/v1/chat/completions"),
            (
                "anthropic",
                json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 64,
                       "messages": [{"role": "user", "content": "hi"}]}),
                "/v1/messages",
            ),
        ] {
            for headers in &header_sets {
                // The base-URL door, then the proxy door (the key is also the proxy password).
                let mut requests = vec![gateway.post(format!("{}/{provider}{path}", tg.gateway))];
                requests.push(mitm.post(format!("https://api.{provider}.com{path}")));
                for mut request in requests {
                    for (name, value) in headers {
                        request = request.header(*name, *value);
                    }
                    let resp = request.json(&body).send().await.unwrap();
                    let status = resp.status().as_u16();
                    // The central key serves it where the policy uses it; otherwise the user
                    // has no key of their own (a Tollgate key is not one): 403.
                    let expected = if central && (!user || fallback) {
                        200
                    } else {
                        403
                    };
                    assert_eq!(
                        status,
                        expected,
                        "{provider} {headers:?} policy {central}/{user}/{fallback}: {}",
                        resp.text().await.unwrap()
                    );
                    sent += 1;
                }
            }
        }
        let secret = &key[3..];
        for request in upstream.requests() {
            for (name, value) in &request.headers {
                assert!(
                    !value.contains(secret),
                    "the Tollgate key went upstream in {name} under {central}/{user}/{fallback}"
                );
            }
        }
        // A query string carrying it is refused outright (the path goes upstream as it is).
        let resp = gateway
            .get(format!("{}/openai/v1/models?key={key}", tg.gateway))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert!(upstream.requests().iter().all(|r| !r.path.contains(secret)));
    }
    assert_eq!(sent, 4 * 2 * 7 * 2);
    assert!(upstream.request_count() > 0);
}

/// An HTTP/2 client (Codex through the proxy) resets its stream the moment it has the final
/// event; the call completed and is recorded so (before: `client_aborted`).
#[tokio::test(flavor = "multi_thread")]
async fn a_reset_after_the_final_event_leaves_the_call_completed() {
    let mut stream = fixture_bytes("openai-responses-stream.sse");
    let end = stream.len();
    // After the final event the upstream lingers (a keep-alive comment) before it ends.
    stream.extend_from_slice(b": keep-alive\n\n");
    let upstream = MockUpstream::always(
        MockResponse::sse(stream)
            .chunking(common::mock::Chunking::At(vec![end]))
            .delay(Duration::from_millis(300)),
    )
    .await;
    let (tg, key) = proxy_with(&upstream, "", "").await;
    let client = proxied(&tg, &key, false, &[]);
    let body = json!({"model": "gpt-5", "input": "Run the tests.", "stream": true});
    let resp = client
        .post(format!("{OPENAI}/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let id = interception_id(&resp);
    let mut got = Vec::new();
    let mut body_stream = resp.bytes_stream();
    use futures_util::StreamExt;
    while let Some(chunk) = body_stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
        if String::from_utf8_lossy(&got).contains("response.completed") {
            break;
        }
    }
    drop(body_stream); // RST_STREAM: the client has what it wanted
    tg.wait_until_recorded(1).await;
    let row = interception(&tg, &id).await;
    assert_eq!(row["status"], "completed", "{row}");
    assert_eq!(row["output"], 180, "{row}");
}
