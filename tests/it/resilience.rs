//! Fault injection: the real binary between clients and a mock upstream that misbehaves on
//! purpose (rate limits, rejected keys, overload, stalls, resets, huge and endless bodies), and
//! clients that misbehave too (slow readers, disconnects at every phase). Each test asserts what
//! the client sees, what was recorded, and that memory and other traffic are unaffected.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::http_untimed as http;
use common::client::interception_id;
use common::mock::{fixture_bytes, Chunking, MockResponse, MockUpstream};
use common::server::{metric_value, metrics, rss, watch_rss, Tollgate, TollgateBuilder};
use common::tunnel::{connect_tunnel, der_of, read_h1_response, tls_client};
use futures_util::StreamExt;
use rustls::pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY_A: &str = "sk-pool-aaaaaaaaaaaaaaaa-key1";
const KEY_B: &str = "sk-pool-bbbbbbbbbbbbbbbb-key2";
const KEY_C: &str = "sk-pool-cccccccccccccccc-key3";

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-4o-2024-08-06",
        "messages": [{"role": "user", "content": "Why does the build fail?"}],
        "stream": stream,
    })
}

fn messages(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": "Fix the flaky test."}]
    })
}

/// OpenAI and Anthropic providers on `upstream`, customised by `f`, and a user key.
async fn start(
    upstream: &MockUpstream,
    f: impl FnOnce(TollgateBuilder) -> TollgateBuilder,
) -> (Tollgate, String) {
    let builder = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .provider("anthropic", "anthropic", &upstream.base_url());
    let tg = f(builder).start().await;
    let key = tg.user_key("alice");
    (tg, key)
}

/// A pool of three keys on the openai provider: the test's KEY_A, KEY_B, KEY_C in that order.
fn with_pool(b: TollgateBuilder, extra: &str) -> TollgateBuilder {
    b.provider_extra(
        "openai",
        &format!("api_key_envs = [\"POOL_B\", \"POOL_C\"]\n{extra}"),
    )
    .env("TEST_OPENAI_KEY", KEY_A)
    .env("POOL_B", KEY_B)
    .env("POOL_C", KEY_C)
}

async fn post(tg: &Tollgate, path: &str, key: &str, body: &Value) -> reqwest::Response {
    http()
        .post(format!("{}{path}", tg.gateway))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// status, error, upstream_status, credential_hint of the interception with `id`.
async fn record(tg: &Tollgate, id: &str) -> (String, Option<String>, Option<i64>, Option<String>) {
    let q = |col: &str| format!("SELECT {col} FROM interceptions WHERE CAST(id AS TEXT) = ?");
    (
        tg.scalar(&q("status"), &[id]).await,
        tg.scalar(&q("error"), &[id]).await,
        tg.scalar(&q("CAST(upstream_status AS BIGINT)"), &[id])
            .await,
        tg.scalar(&q("credential_hint"), &[id]).await,
    )
}

/// The Authorization header values the mock saw, in order.
fn keys_seen(upstream: &MockUpstream) -> Vec<String> {
    upstream
        .requests()
        .iter()
        .map(|r| {
            r.header("authorization")
                .unwrap_or_default()
                .trim_start_matches("Bearer ")
                .to_string()
        })
        .collect()
}

fn rate_limited(retry_after: &str) -> MockResponse {
    MockResponse::fixture("openai-error-ratelimit.json")
        .status(429)
        .header("retry-after", retry_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn pooled_keys_fail_over_on_429_and_401_before_the_client_sees_anything() {
    let upstream = MockUpstream::start(|r| match r.header("authorization") {
        Some(a) if a.ends_with(KEY_A) => rate_limited("30"),
        Some(a) if a.ends_with(KEY_B) => MockResponse::json(
            401,
            json!({"error": {"message": "Incorrect API key", "type": "invalid_request_error", "code": "invalid_api_key"}}),
        ),
        _ => MockResponse::fixture("openai-chat.json"),
    })
    .await;
    let (tg, key) = start(&upstream, |b| with_pool(b, "")).await;

    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat(false)).await;
    assert_eq!(
        resp.status(),
        200,
        "the client never sees the 429 or the 401"
    );
    let id = interception_id(&resp);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["id"], "chatcmpl-TG0001");
    assert_eq!(keys_seen(&upstream), [KEY_A, KEY_B, KEY_C]);
    for r in upstream.requests() {
        assert_eq!(
            r.json()["model"],
            "gpt-4o-2024-08-06",
            "the same body each time"
        );
    }

    // Key A cools down for the upstream's 30 s, key B is disabled: the next request goes
    // straight to C.
    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(keys_seen(&upstream)[3..], [KEY_C]);

    tg.wait_until_recorded(2).await;
    let (status, _, upstream_status, hint) = record(&tg, &id).await;
    assert_eq!(status, "completed");
    assert_eq!(upstream_status, Some(200));
    let hint = hint.expect("credential hint");
    assert!(hint.ends_with("key3"), "the key that served it: {hint}");
    assert!(!hint.contains("cccccccc"), "masked: {hint}");

    let m = metrics(&tg).await;
    let change = |key: &str, state: &str| {
        metric_value(
            &m,
            &format!("tollgate_provider_key_state_changes_total{{provider=\"openai\",key=\"{key}\",state=\"{state}\"}}"),
        )
    };
    assert_eq!(change("0", "cooling"), Some(1.0), "{m}");
    assert_eq!(change("1", "disabled"), Some(1.0), "{m}");
    assert_eq!(
        metric_value(&m, "tollgate_provider_keys_usable{provider=\"openai\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "tollgate_provider_key_failovers_total{provider=\"openai\"}"
        ),
        Some(2.0)
    );
    for secret in [KEY_A, KEY_B, KEY_C] {
        assert!(!m.contains(secret));
        assert!(
            !tg.logs().iter().any(|l| l.contains(secret)),
            "{secret} logged"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn all_keys_cooling_gives_a_provider_shaped_429_with_the_shortest_retry_after() {
    let upstream = MockUpstream::start(|r| match r.header("authorization") {
        Some(a) if a.ends_with(KEY_A) => rate_limited("40"),
        Some(a) if a.ends_with(KEY_B) => rate_limited("7"),
        // An HTTP-date a minute ahead.
        _ => {
            let at = chrono::Utc::now() + chrono::Duration::seconds(60);
            rate_limited(&at.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        }
    })
    .await;
    let (tg, key) = start(&upstream, |b| with_pool(b, "")).await;

    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat(false)).await;
    // The last upstream 429 is relayed as it came, except that the wait it announces is the
    // pool's shortest (key B's 7 s), not key C's minute.
    assert_eq!(resp.status(), 429);
    let retry_after = resp.headers()["retry-after"].to_str().unwrap();
    let retry_after: u64 = retry_after.parse().expect(retry_after);
    assert!((6..=7).contains(&retry_after), "{retry_after}");
    assert_eq!(
        resp.bytes().await.unwrap().as_ref(),
        fixture_bytes("openai-error-ratelimit.json").as_slice()
    );
    assert_eq!(upstream.request_count(), 3, "every key was tried once");

    // While they all cool down, requests are refused in the provider's format without
    // contacting the upstream.
    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat(false)).await;
    assert_eq!(resp.status(), 429);
    let retry_after = resp.headers()["retry-after"].to_str().unwrap();
    assert!(retry_after.parse::<u64>().unwrap() <= 7, "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("every central key"));
    assert_eq!(upstream.request_count(), 3);
    let m = metrics(&tg).await;
    assert_eq!(
        metric_value(&m, "tollgate_refusals_total{reason=\"rate_limited\"}"),
        Some(1.0)
    );

    tg.wait_until_recorded(1).await;
    let status: String = tg.scalar("SELECT status FROM interceptions", &[]).await;
    let up: i64 = tg
        .scalar(
            "SELECT CAST(upstream_status AS BIGINT) FROM interceptions",
            &[],
        )
        .await;
    assert_eq!((status.as_str(), up), ("upstream_error", 429));
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_opens_after_a_run_of_failures_rejects_without_the_upstream_then_half_opens_and_closes(
) {
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let upstream = MockUpstream::start(move |r| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        if r.path.contains("messages") && n < 3 {
            MockResponse::fixture("anthropic-error-overloaded.json").status(529)
        } else {
            MockResponse::fixture("anthropic-messages.json")
        }
    })
    .await;
    let (tg, key) = start(&upstream, |b| {
        b.provider_extra(
            "anthropic",
            "[providers.anthropic.breaker]\nenabled = true\nfailure_threshold = 3\nopen_ms = 1500",
        )
    })
    .await;
    let url = "/anthropic/v1/messages";
    for _ in 0..3 {
        let resp = post(&tg, url, &key, &messages(false)).await;
        assert_eq!(
            resp.status(),
            529,
            "upstream errors are relayed as they came"
        );
    }
    // Open: answered here, in Anthropic's format, without reaching the mock.
    let resp = post(&tg, url, &key, &messages(false)).await;
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");
    assert_eq!(upstream.request_count(), 3);
    // Another model of the same provider is not affected.
    let mut other = messages(false);
    other["model"] = json!("claude-haiku-4-5");
    assert_eq!(post(&tg, url, &key, &other).await.status(), 200);
    assert_eq!(upstream.request_count(), 4);

    let m = metrics(&tg).await;
    let series = |name: &str| {
        metric_value(
            &m,
            &format!("{name}{{provider=\"anthropic\",model=\"claude-sonnet-4-5-20250929\"}}"),
        )
    };
    assert_eq!(series("tollgate_breaker_state"), Some(1.0), "{m}");
    assert_eq!(series("tollgate_breaker_trips_total"), Some(1.0));
    assert_eq!(series("tollgate_breaker_rejects_total"), Some(1.0));

    // After the open period one trial goes through; it succeeds, and the breaker closes.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(post(&tg, url, &key, &messages(false)).await.status(), 200);
    assert_eq!(post(&tg, url, &key, &messages(false)).await.status(), 200);
    assert_eq!(upstream.request_count(), 6);
    let m = metrics(&tg).await;
    assert_eq!(
        metric_value(
            &m,
            "tollgate_breaker_state{provider=\"anthropic\",model=\"claude-sonnet-4-5-20250929\"}"
        ),
        Some(0.0)
    );
    // Rejects are refusals, not interceptions: 3 errors + 3 successes recorded.
    tg.wait_until_recorded(6).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n: i64 = tg.scalar("SELECT COUNT(*) FROM interceptions", &[]).await;
    assert_eq!(n, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_that_never_sends_a_first_byte_gets_504_and_a_timeout_record() {
    // OpenAI stalls; Anthropic, on the same mock, answers at once.
    let upstream = MockUpstream::start(|r| {
        if r.path.contains("chat") {
            MockResponse::fixture("openai-chat.json").first_byte_delay(Duration::from_secs(600))
        } else {
            MockResponse::fixture("anthropic-messages.json")
        }
    })
    .await;
    let (tg, key) = start(&upstream, |b| {
        b.provider_extra("openai", "first_byte_timeout_ms = 1500")
    })
    .await;
    let started = Instant::now();
    let stalled = {
        let (url, key) = (tg.gateway.clone(), key.clone());
        tokio::spawn(async move {
            http()
                .post(format!("{url}/openai/v1/chat/completions"))
                .bearer_auth(key)
                .json(&chat(false))
                .send()
                .await
                .unwrap()
        })
    };
    // Other traffic is unaffected while the stalled call waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = post(&tg, "/anthropic/v1/messages", &key, &messages(false)).await;
    assert_eq!(other.status(), 200);
    assert!(
        !stalled.is_finished(),
        "answered while the stalled call still waits"
    );
    let resp = stalled.await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "upstream_error");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    tg.wait_until_recorded(2).await;
    let q = "SELECT status FROM interceptions WHERE provider = 'openai'";
    let status: String = tg.scalar(q, &[]).await;
    let q = "SELECT error FROM interceptions WHERE provider = 'openai'";
    let error: String = tg.scalar(q, &[]).await;
    assert_eq!(status, "timeout");
    assert!(error.contains("first_byte_timeout_ms"), "{error}");
    let m = metrics(&tg).await;
    assert_eq!(
        metric_value(
            &m,
            "tollgate_upstream_timeouts_total{provider=\"openai\",phase=\"first_byte\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_that_stalls_mid_stream_is_cut_and_recorded_as_an_idle_timeout() {
    let fixture = fixture_bytes("anthropic-messages-stream.sse");
    let upstream = MockUpstream::always(
        MockResponse::fixture("anthropic-messages-stream.sse").stall_after(fixture.len() / 2),
    )
    .await;
    let (tg, key) = start(&upstream, |b| {
        b.provider_extra("anthropic", "idle_timeout_ms = 500")
    })
    .await;
    let started = Instant::now();
    let resp = post(&tg, "/anthropic/v1/messages", &key, &messages(true)).await;
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    let got = resp.bytes().await;
    assert!(got.is_err(), "a cut stream must not look complete");
    assert!(started.elapsed() < Duration::from_secs(3));
    tg.wait_until_recorded(1).await;
    let (status, error, _, _) = record(&tg, &id).await;
    assert_eq!(status, "timeout");
    assert!(error.unwrap().contains("idle_timeout_ms"));
    let input: i64 = tg
        .scalar("SELECT input_tokens FROM interceptions", &[])
        .await;
    assert_eq!(input, 420, "usage seen before the stall is kept");
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs.
async fn blackhole() -> (
    std::net::SocketAddr,
    Vec<tokio::net::TcpStream>,
    tokio::net::TcpListener,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            _ => return (addr, held, listener),
        }
    }
    panic!("the accept queue never filled");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_that_never_accepts_the_connection_gets_504_and_a_timeout_record() {
    let (addr, _held, _listener) = blackhole().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &format!("http://{addr}"))
        .provider_extra("openai", "connect_timeout_ms = 300")
        .start()
        .await;
    let key = tg.user_key("alice");
    let started = Instant::now();
    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat(false)).await;
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(3));
    tg.wait_until_recorded(1).await;
    let status: String = tg.scalar("SELECT status FROM interceptions", &[]).await;
    let error: String = tg.scalar("SELECT error FROM interceptions", &[]).await;
    assert_eq!(status, "timeout");
    assert!(error.contains("connect_timeout_ms"), "{error}");
}

/// One chat stream event carrying `len` bytes of content (no usage).
fn big_event(len: usize) -> Vec<u8> {
    let content = "a".repeat(len);
    format!(
        "data: {{\"id\":\"chatcmpl-big\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
    )
    .into_bytes()
}

fn chat_with_usage() -> Value {
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mb_stream_is_streamed_through_with_bounded_memory() {
    let event = big_event(16 * 1024);
    let copies = 100 * 1024 * 1024 / event.len() + 1;
    let total = event.len() * copies;
    let upstream = MockUpstream::sequence(vec![
        MockResponse::sse(event.clone()),
        MockResponse::sse(event)
            .chunking(Chunking::Whole)
            .repeat(copies),
    ])
    .await;
    let (tg, key) = start(&upstream, |b| b).await;
    let pid = tg.pid();
    // A stream without usage is charged an estimate, and the first estimate for an OpenAI
    // model loads the o200k encoding tables (~70 MB, once per process). A short stream loads
    // them first, so what is measured below is what a stream's size costs.
    let warm = post(&tg, "/openai/v1/chat/completions", &key, &chat_with_usage()).await;
    warm.bytes().await.unwrap();
    tg.wait_until_recorded(1).await;
    let before = rss(pid);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_rss(pid, stop.clone());
    let started = Instant::now();
    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat_with_usage()).await;
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    let mut stream = resp.bytes_stream();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        received += chunk.expect("the stream completes").len();
    }
    stop.store(true, Ordering::SeqCst);
    let peak = watcher.join().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(received, total, "every byte arrived");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "100 MB stream: {} MB in {elapsed:?}, RSS before {} MB, peak {} MB (+{} MB)",
        total >> 20,
        before >> 20,
        peak >> 20,
        growth >> 20
    );
    assert!(growth < 48 << 20, "RSS grew by {} MB", growth >> 20);
    tg.wait_until_recorded(2).await;
    let (status, ..) = record(&tg, &id).await;
    assert_eq!(status, "completed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reading_client_gets_backpressure_not_buffering() {
    let event = big_event(16 * 1024);
    // 200 MB on offer, written as fast as the sockets take it.
    let upstream = MockUpstream::always(
        MockResponse::sse(event.clone())
            .chunking(Chunking::Whole)
            .repeat(200 * 1024 * 1024 / event.len()),
    )
    .await;
    let (tg, key) = start(&upstream, |b| b).await;
    let pid = tg.pid();
    let before = rss(pid);

    let addr = tg.gateway.trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = chat_with_usage().to_string();
    client
        .write_all(
            format!(
                "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // Read 4 KB every 20 ms for 3 s: about 600 KB of the 200 MB.
    let mut read = 0usize;
    let mut peak = before;
    let mut buf = vec![0u8; 4096];
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        read += client.read(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak = peak.max(rss(pid));
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "slow client: read {} KB in 3 s, RSS before {} MB, peak {} MB (+{} MB)",
        read >> 10,
        before >> 20,
        peak >> 20,
        growth >> 20
    );
    assert!(read > 0 && read < 8 << 20);
    assert!(growth < 32 << 20, "RSS grew by {} MB", growth >> 20);
    // The client leaves: recorded, and the upstream connection is closed.
    drop(client);
    tg.wait_until_recorded(1).await;
    let status: String = tg.scalar("SELECT status FROM interceptions", &[]).await;
    assert_eq!(status, "client_aborted");
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.connections_closed() < 1 {
        assert!(Instant::now() < deadline, "upstream connection left open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_stream_ends_when_the_client_leaves_and_the_upstream_is_released() {
    let upstream = MockUpstream::always(
        MockResponse::sse(big_event(64))
            .chunking(Chunking::Whole)
            .delay(Duration::from_millis(10))
            .repeat_forever(),
    )
    .await;
    let (tg, key) = start(&upstream, |b| b).await;
    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat_with_usage()).await;
    let id = interception_id(&resp);
    let mut stream = resp.bytes_stream();
    let mut received = 0;
    while received < 20 * 1024 {
        received += stream.next().await.unwrap().unwrap().len();
    }
    drop(stream);
    tg.wait_until_recorded(1).await;
    let (status, error, ..) = record(&tg, &id).await;
    assert_eq!(status, "client_aborted");
    assert!(error.unwrap().contains("mid-response"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.connections_closed() < 1 {
        assert!(
            Instant::now() < deadline,
            "the endless upstream stream was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_in_a_stream_is_relayed_byte_for_byte_and_usage_still_counts() {
    let mut body = fixture_bytes("openai-chat-stream.sse");
    let at = body
        .windows(9)
        .position(|w| w == b"The build")
        .expect("fixture text");
    body.splice(at + 3..at + 3, [0xff, 0xfe, 0xc3]);
    let upstream = MockUpstream::always(MockResponse::sse(body.clone())).await;
    let (tg, key) = start(&upstream, |b| b).await;
    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat_with_usage()).await;
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), body.as_slice());
    tg.wait_until_recorded(1).await;
    let (status, ..) = record(&tg, &id).await;
    assert_eq!(status, "completed");
    let input: i64 = tg
        .scalar("SELECT input_tokens FROM interceptions", &[])
        .await;
    assert_eq!(input, 226);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_content_type_is_relayed_unchanged_and_charged_an_estimate() {
    // An SSE body labelled as JSON, and an HTML error page labelled as a 200.
    let sse = fixture_bytes("openai-chat-stream.sse");
    let html = b"<html><body>Bad gateway</body></html>".to_vec();
    let upstream = MockUpstream::sequence(vec![
        MockResponse::bytes(200, "application/json", sse.clone()),
        MockResponse::bytes(200, "text/html", html.clone()),
    ])
    .await;
    let (tg, key) = start(&upstream, |b| b).await;
    for (request, expected, ct) in [
        (chat_with_usage(), sse, "application/json"),
        (chat(false), html, "text/html"),
    ] {
        let resp = post(&tg, "/openai/v1/chat/completions", &key, &request).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], ct);
        assert_eq!(resp.bytes().await.unwrap().as_ref(), expected.as_slice());
    }
    tg.wait_until_recorded(2).await;
    let statuses: Vec<String> = tg.column("SELECT status FROM interceptions", &[]).await;
    assert_eq!(statuses, ["completed", "completed"]);
    // Nothing parseable, but the provider answered 200 and billed it: charged an estimate,
    // and recorded as one (issue 14), never as free.
    let sources: Vec<String> = tg
        .column("SELECT usage_source FROM interceptions", &[])
        .await;
    assert_eq!(sources, ["estimated", "estimated"]);
    let cheapest: i64 = tg
        .scalar(
            "SELECT CAST(MIN(cost_nano_usd) AS BIGINT) FROM interceptions",
            &[],
        )
        .await;
    assert!(cheapest > 0, "an answered request is never free");
}

/// Sends `bytes` on a fresh connection to the gateway and returns it.
async fn raw(tg: &Tollgate, bytes: &[u8]) -> tokio::net::TcpStream {
    let addr = tg.gateway.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

fn raw_request(key: &str, body: &str, declared_len: usize) -> Vec<u8> {
    format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {declared_len}\r\n\r\n{body}"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stalls_its_body_gets_408() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let (tg, key) = start(&upstream, |b| {
        b.server_extra("client_body_timeout_ms = 300")
    })
    .await;
    let mut s = raw(&tg, &raw_request(&key, "{\"model\":", 500)).await;
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(upstream.request_count(), 0);
    let m = metrics(&tg).await;
    assert_eq!(
        metric_value(&m, "tollgate_refusals_total{reason=\"client_timeout\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_leaving_at_every_phase_are_recorded_where_due_and_others_are_unaffected() {
    let upstream = MockUpstream::start(|r| {
        let text = String::from_utf8_lossy(&r.body);
        if text.contains("wait-for-me") {
            MockResponse::fixture("openai-chat.json").first_byte_delay(Duration::from_secs(3))
        } else if text.contains("\"stream\":true") {
            MockResponse::fixture("openai-chat-stream.sse").delay(Duration::from_millis(200))
        } else {
            MockResponse::fixture("openai-chat.json")
        }
    })
    .await;
    let (tg, key) = start(&upstream, |b| b).await;

    // 1. During the request head.
    drop(
        raw(
            &tg,
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthori",
        )
        .await,
    );
    // 2. During the body upload.
    drop(raw(&tg, &raw_request(&key, "{\"model\":\"gpt-4o\",", 4000)).await);
    // 3. While waiting for the upstream's first byte.
    let mut waiting = chat(false);
    waiting["messages"][0]["content"] = json!("wait-for-me");
    let waiting = waiting.to_string();
    let s = raw(&tg, &raw_request(&key, &waiting, waiting.len())).await;
    // Meanwhile, an ordinary request goes through.
    let normal = post(&tg, "/openai/v1/chat/completions", &key, &chat(false)).await;
    assert_eq!(normal.status(), 200);
    let normal_id = interception_id(&normal);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    // 4. Mid-stream.
    let resp = post(&tg, "/openai/v1/chat/completions", &key, &chat(true)).await;
    let stream_id = interception_id(&resp);
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);

    tg.wait_until_recorded(3).await;
    // Nothing more arrives: the first two never became interceptions.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n: i64 = tg.scalar("SELECT COUNT(*) FROM interceptions", &[]).await;
    assert_eq!(n, 3);
    assert_eq!(record(&tg, &normal_id).await.0, "completed");
    let (status, error, ..) = record(&tg, &stream_id).await;
    assert_eq!(status, "client_aborted");
    assert!(error.unwrap().contains("mid-response"));
    let waited: Vec<String> = tg
        .column(
            "SELECT error FROM interceptions WHERE status = 'client_aborted'",
            &[],
        )
        .await;
    assert!(
        waited.iter().any(|e| e.contains("before the response")),
        "{waited:?}"
    );
    // The gateway still serves.
    let after = post(&tg, "/openai/v1/chat/completions", &key, &chat(false)).await;
    assert_eq!(after.status(), 200);
}

/// Waits until at least `n` log lines contain `needle`; returns the last such line.
async fn wait_log(tg: &Tollgate, needle: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hits: Vec<String> = tg
            .logs()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect();
        if hits.len() >= n {
            return hits.last().unwrap().clone();
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the logs:\n{}",
            tg.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sighup(tg: &Tollgate) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &tg.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn price_block(input: &str, output: &str, cache_read: &str) -> String {
    format!(
        "[[pricing.models]]\nmodel = \"gpt-4o-2024-08-06\"\nprovider = \"openai\"\ninput = \"{input}\"\noutput = \"{output}\"\ncache_read = \"{cache_read}\"\n"
    )
}

async fn cost_of(tg: &Tollgate, id: &str) -> i64 {
    tg.wait_until_recorded(1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<i64> = tg
            .column(
                "SELECT cost_nano_usd FROM interceptions WHERE CAST(id AS TEXT) = ?",
                &[id],
            )
            .await;
        if let Some(c) = found.first() {
            return *c;
        }
        assert!(Instant::now() < deadline, "{id} never recorded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts a slowly streamed request and returns a task that reads it to the end.
async fn slow_stream(tg: &Tollgate, key: &str) -> tokio::task::JoinHandle<Result<usize, String>> {
    let resp = post(tg, "/openai/v1/chat/completions", key, &chat_with_usage()).await;
    assert_eq!(resp.status(), 200);
    tokio::spawn(async move {
        resp.bytes()
            .await
            .map(|b| b.len())
            .map_err(|e| e.to_string())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_prices_and_key_pools_refuses_a_bad_file_and_drops_no_connection() {
    let key_a_rejected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rejected = key_a_rejected.clone();
    let upstream = MockUpstream::start(move |r| {
        let by_a = r
            .header("authorization")
            .is_some_and(|a| a.ends_with(KEY_A));
        if by_a && rejected.load(Ordering::SeqCst) {
            MockResponse::json(
                401,
                json!({"error": {"message": "revoked", "type": "invalid_request_error"}}),
            )
        } else if r.json()["stream"] == true {
            MockResponse::fixture("openai-chat-stream.sse").delay(Duration::from_millis(150))
        } else {
            MockResponse::fixture("openai-chat.json")
        }
    })
    .await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .env("TEST_OPENAI_KEY", KEY_A)
        .env("POOL_B", KEY_B)
        .extra(&price_block("1.00", "1.00", "1.00"))
        .start()
        .await;
    let key = tg.user_key("alice");
    let url = "/openai/v1/chat/completions";
    // (226 input + 96 output + 1024 cache read) tokens at $1 per million.
    let resp = post(&tg, url, &key, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cost_of(&tg, &interception_id(&resp)).await, 1_346_000);

    // The only key is revoked upstream: relayed once, then disabled (503, upstream spared).
    key_a_rejected.store(true, Ordering::SeqCst);
    assert_eq!(post(&tg, url, &key, &chat(false)).await.status(), 401);
    let resp = post(&tg, url, &key, &chat(false)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "no_usable_provider_key"
    );
    assert_eq!(upstream.request_count(), 2);

    // Add a key and change the prices (and a listener, which needs a restart).
    let original = std::fs::read_to_string(&tg.config_path).unwrap();
    let reloaded = original
        .replace(
            "api_key_env = \"TEST_OPENAI_KEY\"",
            "api_key_env = \"TEST_OPENAI_KEY\"\napi_key_envs = [\"POOL_B\"]",
        )
        .replace(
            &price_block("1.00", "1.00", "1.00"),
            &price_block("2.00", "3.00", "0.50"),
        )
        .replace(
            "gateway_listen = \"127.0.0.1:0\"",
            "gateway_listen = \"127.0.0.1:1\"",
        );
    assert_ne!(reloaded, original);
    std::fs::write(&tg.config_path, &reloaded).unwrap();
    sighup(&tg);
    let line = wait_log(&tg, "configuration reloaded", 1).await;
    assert!(line.contains("server.gateway_listen"), "{line}");
    wait_log(&tg, "only a restart applies it", 1).await;

    // Key A (re-enabled by the reload) fails over to the new key B; the new prices apply.
    let resp = post(&tg, url, &key, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    let id = interception_id(&resp);
    assert_eq!(keys_seen(&upstream)[2..], [KEY_A, KEY_B]);
    // 226 × 2.00 + 96 × 3.00 + 1024 × 0.50 per million.
    assert_eq!(cost_of(&tg, &id).await, 1_252_000);
    let (_, _, _, hint) = record(&tg, &id).await;
    assert!(hint.unwrap().ends_with("key2"));

    // An invalid file is refused while a stream is in flight; the stream and new traffic carry
    // on with the running configuration.
    let in_flight = slow_stream(&tg, &key).await;
    std::fs::write(
        &tg.config_path,
        format!("{reloaded}\n[limits]\nrequests_per_minute = \"many\"\n"),
    )
    .unwrap();
    sighup(&tg);
    let line = wait_log(&tg, "configuration reload refused", 1).await;
    assert!(line.contains("limits.requests_per_minute"), "{line}");
    let resp = post(&tg, url, &key, &chat(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cost_of(&tg, &interception_id(&resp)).await, 1_252_000);
    let streamed = in_flight
        .await
        .unwrap()
        .expect("the stream survived the refused reload");
    assert_eq!(streamed, fixture_bytes("openai-chat-stream.sse").len());

    // A valid reload while a stream is in flight: the stream finishes, new requests use it.
    let in_flight = slow_stream(&tg, &key).await;
    std::fs::write(
        &tg.config_path,
        reloaded.replace(
            &price_block("2.00", "3.00", "0.50"),
            &price_block("10.00", "10.00", "10.00"),
        ),
    )
    .unwrap();
    sighup(&tg);
    wait_log(&tg, "configuration reloaded", 2).await;
    let resp = post(&tg, url, &key, &chat(false)).await;
    assert_eq!(cost_of(&tg, &interception_id(&resp)).await, 13_460_000);
    let streamed = in_flight
        .await
        .unwrap()
        .expect("the stream survived the reload");
    assert_eq!(streamed, fixture_bytes("openai-chat-stream.sse").len());
    let m = metrics(&tg).await;
    assert_eq!(
        metric_value(&m, "tollgate_config_reloads_total{result=\"applied\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&m, "tollgate_config_reloads_total{result=\"refused\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_off_and_recorded_as_a_timeout() {
    let event = big_event(16 * 1024);
    let upstream = MockUpstream::always(
        MockResponse::sse(event.clone())
            .chunking(Chunking::Whole)
            .repeat(200 * 1024 * 1024 / event.len()),
    )
    .await;
    let (tg, key) = start(&upstream, |b| {
        b.server_extra("client_write_timeout_ms = 500")
    })
    .await;
    let body = chat_with_usage().to_string();
    let mut client = raw(&tg, &raw_request(&key, &body, body.len())).await;
    let mut head = [0u8; 1024];
    let n = client.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    // From here on the client reads nothing, but keeps the connection open.
    let started = Instant::now();
    tg.wait_until_recorded(1).await;
    let status: String = tg.scalar("SELECT status FROM interceptions", &[]).await;
    let error: String = tg.scalar("SELECT error FROM interceptions", &[]).await;
    assert_eq!(status, "timeout");
    assert!(error.contains("client_write_timeout_ms"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.connections_closed() < 1 {
        assert!(Instant::now() < deadline, "upstream connection left open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_inside_an_open_mitm_tunnel() {
    let key_a_rejected = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let rejected = key_a_rejected.clone();
    let upstream = MockUpstream::start(move |r| {
        let by_a = r
            .header("authorization")
            .is_some_and(|a| a.ends_with(KEY_A));
        if by_a && rejected.load(Ordering::SeqCst) {
            MockResponse::json(401, json!({"error": {"message": "revoked"}}))
        } else {
            MockResponse::fixture("openai-chat.json")
        }
    })
    .await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .proxy("")
        .env("TEST_OPENAI_KEY", KEY_A)
        .env("POOL_B", KEY_B)
        .start()
        .await;
    let key = tg.user_key("alice");
    // One TLS connection inside one CONNECT tunnel, by hand: an HTTP client's pool may race a
    // second CONNECT against its pooled connection, and this test is about the first one.
    let (tcp, head) = connect_tunnel(&tg.proxy_addr(), "api.openai.com:443", Some(&key)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let tls = tls_client(&der_of(&tg.proxy_ca_pem()))
        .connect(ServerName::try_from("api.openai.com").unwrap(), tcp)
        .await
        .unwrap();
    let tls = tokio::sync::Mutex::new(tls);
    let body = chat(false).to_string();
    let call = || async {
        let mut tls = tls.lock().await;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        read_h1_response(&mut *tls).await.0
    };
    assert_eq!(call().await, 401);
    assert_eq!(call().await, 503, "the only key is disabled");

    let config = std::fs::read_to_string(&tg.config_path).unwrap().replace(
        "api_key_env = \"TEST_OPENAI_KEY\"",
        "api_key_env = \"TEST_OPENAI_KEY\"\napi_key_envs = [\"POOL_B\"]",
    );
    std::fs::write(&tg.config_path, config).unwrap();
    sighup(&tg);
    wait_log(&tg, "configuration reloaded", 1).await;

    assert_eq!(call().await, 200, "the tunnel uses the reloaded route");
    assert_eq!(keys_seen(&upstream), [KEY_A, KEY_A, KEY_B]);
    let m = metrics(&tg).await;
    assert_eq!(
        metric_value(&m, "tollgate_proxy_connects_total{mode=\"mitm\"}"),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_trickling_its_request_head_is_disconnected() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let (tg, key) = start(&upstream, |b| {
        b.server_extra("client_header_timeout_ms = 500")
    })
    .await;
    let mut slow = raw(
        &tg,
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nx-slow: ",
    )
    .await;
    let started = Instant::now();
    // One byte every 100 ms: each read succeeds, so only a deadline on the whole head stops it.
    let closed = loop {
        if slow.write_all(b"a").await.is_err() {
            break true;
        }
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => panic!("answered a head that never ended"),
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
    };
    assert!(closed, "still connected after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_millis(400));
    // A client that sends its head at a normal pace (and then takes its time over the body,
    // which the header deadline does not cover) is served.
    let body = chat(false).to_string();
    let request = raw_request(&key, &body, body.len());
    let split = request.len() - body.len();
    let mut ok = raw(&tg, &request[..split]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    ok.write_all(&request[split..]).await.unwrap();
    let mut head = [0u8; 12];
    ok.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let m = metrics(&tg).await;
    assert_eq!(
        metric_value(&m, "tollgate_client_header_timeouts_total"),
        Some(1.0),
        "{m}"
    );
}

/// Leaf minting fails when the proxy's CA expires while Tollgate runs (a corporate CA not
/// renewed in time): MITM handshakes for new tunnels fail with the reason in the log, nothing
/// expired is ever served, and other traffic is unaffected.
#[tokio::test(flavor = "multi_thread")]
async fn a_ca_expiring_while_running_fails_new_mitm_handshakes_and_nothing_else() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "Tollgate test CA, expiring");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(5);
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let expires = Instant::now() + Duration::from_secs(5);

    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &upstream.base_url())
        .mitm_hosts("openai", &["api.openai.com"])
        .file("certs/ca.pem", ca_pem.clone())
        .file("certs/ca.key", ca_key.serialize_pem())
        .proxy("")
        .start()
        .await;
    let key = tg.user_key("alice");
    let (scheme, addr) = tg.proxy.split_once("://").unwrap();
    // A fresh client per call: each opens its own tunnel and handshake.
    let proxied = || {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::https(format!("{scheme}://tollgate:{key}@{addr}")).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let mitm = |client: reqwest::Client| async move {
        client
            .post("https://api.openai.com/v1/chat/completions")
            .json(&chat(false))
            .send()
            .await
    };
    // While the CA is valid the MITM door works (the leaf is minted to expire with the CA).
    let before = mitm(proxied()).await.expect("MITM while the CA is valid");
    assert_eq!(before.status(), 200);

    tokio::time::sleep(expires.saturating_duration_since(Instant::now()) + Duration::from_secs(1))
        .await;
    let after = mitm(proxied()).await;
    assert!(
        after.is_err(),
        "a handshake after the CA expired: {after:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !tg.logs().iter().any(|l| {
        l.contains("cannot mint a leaf certificate") && l.contains("the CA certificate expired")
    }) {
        assert!(
            Instant::now() < deadline,
            "no reason logged:\n{}",
            tg.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The gateway door does not depend on the CA.
    let resp = reqwest::Client::new()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .bearer_auth(&key)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        upstream.request_count(),
        2,
        "the failed handshake sent nothing upstream"
    );
}
