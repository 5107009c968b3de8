//! Checks the mock upstream (`tests/it/common/mock.rs`) itself, with a real HTTP client and raw
//! sockets, so gateway tests can trust what it puts on the wire.
//!
//! Not a test of Tollgate: nothing here touches the gateway.

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::http_untimed as client;
use common::mock::{
    fixture_bytes, fixture_manifest, Chunking, MockResponse, MockUpstream, Transfer,
};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Each body frame the client received and when, measured from just before the request.
async fn frames_with_arrival(
    response: reqwest::Response,
    started: Instant,
) -> Vec<(Duration, Bytes)> {
    let mut frames = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(frame) = stream.next().await {
        frames.push((started.elapsed(), frame.expect("body frame")));
    }
    frames
}

/// Sends raw bytes on a fresh connection and returns everything the mock writes until it closes.
async fn raw_exchange(upstream: &MockUpstream, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut wire))
        .await
        .expect("mock closed the connection")
        .unwrap();
    String::from_utf8(wire).unwrap()
}

#[tokio::test]
async fn serves_json_fixture_and_records_the_request() {
    let upstream = MockUpstream::always(MockResponse::fixture("openai-chat.json")).await;
    let response = client()
        .post(format!(
            "{}/v1/chat/completions?api-version=1",
            upstream.base_url()
        ))
        .bearer_auth("sk-test")
        .header("X-Custom", "Value")
        .json(&serde_json::json!({"model": "gpt-4o", "stream": false}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "{:?}",
        response.headers()
    );
    let expected = fixture_bytes("openai-chat.json");
    assert_eq!(
        response.headers()["content-length"],
        expected.len().to_string().as_str()
    );
    assert_eq!(response.bytes().await.unwrap(), expected);

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/chat/completions?api-version=1");
    assert_eq!(request.path_without_query(), "/v1/chat/completions");
    assert_eq!(request.header("authorization"), Some("Bearer sk-test"));
    assert_eq!(request.header("X-CUSTOM"), Some("Value"));
    assert!(request.headers.iter().any(|(name, _)| name == "x-custom"));
    assert_eq!(request.json()["model"], "gpt-4o");
}

#[tokio::test]
async fn builders_set_status_and_headers() {
    let upstream = MockUpstream::always(
        MockResponse::fixture("openai-error-ratelimit.json")
            .status(429)
            .header("retry-after", "3")
            .header("Content-Type", "application/json; charset=utf-8"),
    )
    .await;
    let response = client().get(upstream.base_url()).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "3");
    assert_eq!(
        response.headers().get_all("content-type").iter().count(),
        1,
        "a header set twice is replaced, not repeated"
    );
    assert_eq!(
        response.bytes().await.unwrap(),
        fixture_bytes("openai-error-ratelimit.json")
    );

    let overloaded = MockUpstream::always(MockResponse::json(
        529,
        serde_json::json!({"type": "error", "error": {"type": "overloaded_error"}}),
    ))
    .await;
    let response = client().get(overloaded.base_url()).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 529);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn sse_arrives_one_event_per_frame_with_the_delay_between() {
    let delay = Duration::from_millis(120);
    let events = [
        "data: one\n\n",
        "event: two\ndata: 2\n\n",
        "data: [DONE]\n\n",
    ];
    let upstream = MockUpstream::always(MockResponse::sse(events.concat()).delay(delay)).await;

    let started = Instant::now();
    let response = client().get(upstream.base_url()).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["transfer-encoding"], "chunked");
    let frames = frames_with_arrival(response, started).await;

    let received: Vec<&[u8]> = frames.iter().map(|(_, frame)| frame.as_ref()).collect();
    let expected: Vec<&[u8]> = events.iter().map(|event| event.as_bytes()).collect();
    assert_eq!(received, expected);
    // The mock writes event i no sooner than i delays after the headers, so these lower bounds
    // hold however slow the machine is.
    for (index, (arrival, _)) in frames.iter().enumerate() {
        let earliest = delay * u32::try_from(index).unwrap();
        assert!(*arrival >= earliest, "event {index} arrived at {arrival:?}");
    }
}

#[tokio::test]
async fn sse_fixture_is_split_after_each_blank_line() {
    for name in [
        "openai-chat-stream.sse",
        "openai-responses-stream.sse",
        "anthropic-messages-stream.sse",
    ] {
        let body = fixture_bytes(name);
        let pieces = Chunking::PerEvent.split(&body);
        assert_eq!(pieces.concat(), body, "{name}");
        let blank_lines = body.windows(2).filter(|pair| pair == b"\n\n").count();
        assert_eq!(pieces.len(), blank_lines, "{name}");
        assert!(
            pieces.iter().all(|piece| piece.ends_with(b"\n\n")),
            "{name}"
        );
    }
    let crlf = b"data: a\r\n\r\ndata: b\r\rdata: c\n\ntail";
    let pieces = Chunking::PerEvent.split(crlf);
    assert_eq!(
        pieces,
        [
            &b"data: a\r\n\r\n"[..],
            b"data: b\r\r",
            b"data: c\n\n",
            b"tail"
        ]
    );
}

#[tokio::test]
async fn chunking_variants_cut_where_asked() {
    let body = b"abcdefg";
    assert_eq!(Chunking::Whole.split(body), [&body[..]]);
    assert_eq!(
        Chunking::EveryNBytes(3).split(body),
        [&b"abc"[..], b"def", b"g"]
    );
    assert_eq!(Chunking::EveryNBytes(0).split(body).len(), 7);
    assert_eq!(Chunking::ByteByByte.split(body).len(), 7);
    assert_eq!(
        Chunking::At(vec![5, 3, 0, 3, 7, 99]).split(body),
        [&b"abc"[..], b"de", b"fg"]
    );
    assert!(Chunking::Whole.split(b"").is_empty());
    assert!(Chunking::PerEvent.split(b"").is_empty());
}

#[tokio::test]
async fn byte_by_byte_chunked_puts_one_byte_in_each_http_chunk() {
    let upstream = MockUpstream::always(
        MockResponse::bytes(200, "text/plain", "hello")
            .chunking(Chunking::ByteByByte)
            .transfer(Transfer::Chunked),
    )
    .await;
    let wire = raw_exchange(
        &upstream,
        b"GET /x HTTP/1.1\r\nhost: mock\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(wire.starts_with("HTTP/1.1 200 OK\r\n"), "{wire}");
    assert!(
        wire.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{wire}"
    );
    assert!(
        wire.ends_with("\r\n\r\n1\r\nh\r\n1\r\ne\r\n1\r\nl\r\n1\r\nl\r\n1\r\no\r\n0\r\n\r\n"),
        "{wire}"
    );
}

#[tokio::test]
async fn byte_by_byte_content_length_reaches_the_client_in_pieces() {
    let body = br#"{"id":"chatcmpl-1","ok":true}"#;
    let upstream = MockUpstream::always(
        MockResponse::bytes(200, "application/json", &body[..])
            .chunking(Chunking::ByteByByte)
            .delay(Duration::from_millis(5)),
    )
    .await;
    let started = Instant::now();
    let response = client().get(upstream.base_url()).send().await.unwrap();
    assert_eq!(
        response.headers()["content-length"],
        body.len().to_string().as_str()
    );
    let frames = frames_with_arrival(response, started).await;
    let received: Vec<u8> = frames
        .iter()
        .flat_map(|(_, frame)| frame.to_vec())
        .collect();
    assert_eq!(received, body);
    assert!(
        frames.len() > 1,
        "one frame: the pieces were not kept apart"
    );
    let gaps = u32::try_from(body.len() - 1).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(5) * gaps);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let upstream =
        MockUpstream::always(MockResponse::json(200, serde_json::json!({"ok": 1}))).await;
    let client = client();
    for _ in 0..3 {
        let response = client.get(upstream.base_url()).send().await.unwrap();
        assert_eq!(response.bytes().await.unwrap(), r#"{"ok":1}"#);
    }
    assert_eq!(upstream.request_count(), 3);
    assert_eq!(upstream.connections_accepted(), 1);
}

#[tokio::test]
async fn pipelined_requests_with_both_body_framings_are_read_in_order() {
    let upstream = MockUpstream::start(|request| {
        MockResponse::bytes(200, "text/plain", format!("echo {}", request.body.len()))
    })
    .await;
    let wire = raw_exchange(
        &upstream,
        b"POST /first HTTP/1.1\r\nhost: mock\r\ncontent-length: 5\r\n\r\nhello\
          POST /second HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n\
          connection: close\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: x\r\n\r\n",
    )
    .await;
    assert_eq!(wire.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{wire}");
    assert!(
        wire.contains("echo 5") && wire.ends_with("echo 5"),
        "{wire}"
    );

    let requests = upstream.requests();
    assert_eq!(requests[0].path, "/first");
    assert_eq!(requests[0].body, b"hello");
    assert_eq!(requests[1].path, "/second");
    assert_eq!(requests[1].body, b"abcde");
    assert_eq!(upstream.connections_accepted(), 1);
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let upstream = MockUpstream::always(MockResponse::json(200, serde_json::json!({}))).await;
    let client = client();
    for _ in 0..2 {
        let response = client
            .get(upstream.base_url())
            .header("connection", "close")
            .send()
            .await
            .unwrap();
        response.bytes().await.unwrap();
    }
    assert_eq!(upstream.connections_accepted(), 2);

    let closing = MockUpstream::always(
        MockResponse::json(200, serde_json::json!({})).header("connection", "close"),
    )
    .await;
    for _ in 0..2 {
        let response = client.get(closing.base_url()).send().await.unwrap();
        response.bytes().await.unwrap();
    }
    assert_eq!(closing.connections_accepted(), 2);
}

#[tokio::test]
async fn reset_mid_body_is_a_client_error() {
    let body = vec![b'x'; 4096];
    let upstream = MockUpstream::always(
        MockResponse::bytes(200, "application/json", body)
            .chunking(Chunking::EveryNBytes(100))
            .reset_after(250),
    )
    .await;
    let response = client().get(upstream.base_url()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err());

    let stream_upstream = MockUpstream::always(
        MockResponse::fixture("anthropic-messages-stream.sse")
            .delay(Duration::from_millis(20))
            .reset_after(300),
    )
    .await;
    let response = client()
        .get(stream_upstream.base_url())
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut received = 0;
    let mut failed = false;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(frame) => received += frame.len(),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the reset was not reported");
    assert_eq!(received, 300, "the bytes before the reset arrive first");
}

#[tokio::test]
async fn reset_is_a_tcp_reset_not_a_clean_close() {
    let upstream = MockUpstream::always(
        MockResponse::bytes(200, "text/plain", "0123456789")
            .delay(Duration::from_millis(50))
            .reset_after(4),
    )
    .await;
    let mut stream = TcpStream::connect(upstream.addr()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: mock\r\n\r\n")
        .await
        .unwrap();
    let mut wire = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut wire))
        .await
        .expect("the mock must end the connection");
    let error = ended.expect_err("a reset must not look like EOF");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    let wire = String::from_utf8(wire).unwrap();
    assert!(wire.ends_with("content-length: 10\r\n\r\n0123"), "{wire}");
}

#[tokio::test]
async fn stall_hangs_until_the_mock_is_dropped() {
    let upstream =
        MockUpstream::always(MockResponse::sse("data: first\n\ndata: never\n\n").stall_after(13))
            .await;
    let response = client().get(upstream.base_url()).send().await.unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first, "data: first\n\n");
    let waited = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(waited.is_err(), "the stalled stream produced {waited:?}");

    drop(upstream);
    let after_drop = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("dropping the mock must end the stalled connection");
    assert!(
        matches!(after_drop, Some(Err(_))),
        "an unterminated chunked body must fail, got {after_drop:?}"
    );
}

#[tokio::test]
async fn chunked_request_bodies_are_recorded_whole() {
    let upstream = MockUpstream::always(MockResponse::json(200, serde_json::json!({}))).await;
    let parts: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"model\":")),
        Ok(Bytes::from_static(b"\"claude-sonnet-4-5\",")),
        Ok(Bytes::from_static(b"\"stream\":true}")),
    ];
    let response = client()
        .post(format!("{}/v1/messages", upstream.base_url()))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            parts,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let request = upstream.last_request();
    assert_eq!(request.header("transfer-encoding"), Some("chunked"));
    assert_eq!(request.header("content-length"), None);
    assert_eq!(
        request.text(),
        r#"{"model":"claude-sonnet-4-5","stream":true}"#
    );
    assert_eq!(request.json()["stream"], true);
}

#[tokio::test]
async fn close_delimited_body_ends_at_eof() {
    let upstream = MockUpstream::always(
        MockResponse::fixture("openai-chat-stream.sse").transfer(Transfer::CloseDelimited),
    )
    .await;
    let response = client().get(upstream.base_url()).send().await.unwrap();
    assert!(response.headers().get("content-length").is_none());
    assert!(response.headers().get("transfer-encoding").is_none());
    assert_eq!(response.headers()["connection"], "close");
    assert_eq!(
        response.bytes().await.unwrap(),
        fixture_bytes("openai-chat-stream.sse")
    );
}

#[tokio::test]
async fn first_byte_delay_holds_back_the_status_line() {
    let delay = Duration::from_millis(200);
    let upstream = MockUpstream::always(
        MockResponse::json(200, serde_json::json!({})).first_byte_delay(delay),
    )
    .await;
    let started = Instant::now();
    let response = client().get(upstream.base_url()).send().await.unwrap();
    assert!(started.elapsed() >= delay);
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn sequence_replays_in_order_then_repeats_the_last() {
    let upstream = MockUpstream::sequence(vec![
        MockResponse::fixture("anthropic-error-overloaded.json").status(529),
        MockResponse::fixture("anthropic-messages.json"),
    ])
    .await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client.get(upstream.base_url()).send().await.unwrap();
        statuses.push(response.status().as_u16());
        response.bytes().await.unwrap();
    }
    assert_eq!(statuses, [529, 200, 200]);
}

#[tokio::test]
async fn every_manifest_fixture_loads_with_the_right_content_type() {
    let manifest = fixture_manifest();
    let names = manifest.as_object().expect("manifest is an object");
    assert!(names.len() >= 7);
    for (name, expected) in names {
        let response = MockResponse::fixture(name);
        assert!(!response.body.is_empty(), "{name}");
        let content_type = &response
            .headers
            .iter()
            .find(|(header, _)| header == "content-type")
            .unwrap()
            .1;
        if name.ends_with(".sse") {
            assert_eq!(content_type, "text/event-stream", "{name}");
            assert_eq!(response.transfer, Transfer::Chunked, "{name}");
        } else {
            assert_eq!(content_type, "application/json", "{name}");
            let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            assert!(body.is_object(), "{name}");
        }
        assert!(expected["model"].is_string(), "{name}");
    }
}

#[tokio::test]
async fn dropping_the_mock_closes_its_port() {
    let upstream = MockUpstream::always(MockResponse::json(200, serde_json::json!({}))).await;
    let addr = upstream.addr();
    drop(upstream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the port still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
