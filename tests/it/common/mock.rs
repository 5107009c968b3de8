//! A mock upstream provider for integration tests: a real HTTP/1.1 server on 127.0.0.1:0 whose
//! every byte on the wire is under the test's control.
//!
//! It is written on a raw `tokio::net::TcpListener` (no HTTP library) so a test decides exactly
//! where the response body is cut into TCP writes, how long it waits between them, and whether
//! the connection ends cleanly, is reset, or hangs. It is the only stand-in for a provider the
//! tests use; everything else in a test is the real gateway.
//!
//! Not for: TLS (tests point the gateway's `base_url` at `http://`), HTTP/2, or anything the
//! gateway itself does. It never parses provider JSON; it replays what it is given.
//!
//! # Use
//! ```ignore
//! let upstream = MockUpstream::start(|request| {
//!     assert_eq!(request.path, "/v1/chat/completions");
//!     MockResponse::fixture("openai-chat-stream.sse").delay(Duration::from_millis(20))
//! })
//! .await;
//! // point the gateway at upstream.base_url(), send a request through it, then:
//! assert_eq!(upstream.requests()[0].json()["model"], "gpt-4o");
//! assert_eq!(upstream.connections_accepted(), 1);
//! ```
//! - [`MockUpstream::start`] takes a handler called once per request (after the whole request,
//!   body included, has been read and recorded); [`MockUpstream::always`] and
//!   [`MockUpstream::sequence`] cover the common fixed cases. Dropping the `MockUpstream` closes
//!   the listener and every open connection, including stalled ones.
//! - Requests may use `Content-Length` or chunked bodies; connections are kept alive (several and
//!   pipelined requests per connection) unless the request or the response says
//!   `Connection: close`, or the response is [`Transfer::CloseDelimited`].
//! - A [`MockResponse`] is built from [`MockResponse::json`], [`MockResponse::sse`],
//!   [`MockResponse::bytes`] or [`MockResponse::fixture`] (`tests/fixtures/<name>`, by extension),
//!   then refined with builder methods: `.status()`, `.header()`, `.chunking()`, `.delay()`,
//!   `.first_byte_delay()`, `.transfer()`, `.reset_after()`, `.stall_after()`, `.repeat()`,
//!   `.repeat_forever()` (the body written again and again without being held more than once:
//!   100 MB bodies and endless streams).
//! - Timeline of a response: wait `first_byte_delay`; write the status line and headers; write the
//!   body pieces given by [`Chunking`], flushing each one (TCP_NODELAY is set) and waiting
//!   `delay_between_chunks` between consecutive pieces; with [`Transfer::Chunked`] each piece is
//!   one HTTP chunk. `reset_after(n)` / `stall_after(n)` stop after `n` body bytes (payload bytes,
//!   not chunk framing), wait one more `delay_between_chunks` so the client can read what was
//!   sent, then reset the TCP connection (RST) or hang until the mock is dropped. A cut response
//!   never completes, even when `n` is at least the body length: no terminating chunk is sent.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Request heads larger than this are refused: a runaway client, not a real request.
const MAX_HEAD_BYTES: usize = 1024 * 1024;

type Handler = dyn Fn(&RecordedRequest) -> MockResponse + Send + Sync;

/// A running mock provider. See the module documentation.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

struct Shared {
    handler: Box<Handler>,
    requests: Mutex<Vec<RecordedRequest>>,
    connections_accepted: AtomicUsize,
    connections_closed: AtomicUsize,
}

impl Shared {
    fn requests(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        // A panicking handler poisons nothing worth protecting: the list is append-only.
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl MockUpstream {
    /// Binds 127.0.0.1:0 and serves every request with `handler`. Must be called inside a tokio
    /// runtime; the server runs on it until the `MockUpstream` is dropped.
    pub async fn start(
        handler: impl Fn(&RecordedRequest) -> MockResponse + Send + Sync + 'static,
    ) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("mock upstream: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("mock upstream: local address");
        let shared = Arc::new(Shared {
            handler: Box::new(handler),
            requests: Mutex::new(Vec::new()),
            connections_accepted: AtomicUsize::new(0),
            connections_closed: AtomicUsize::new(0),
        });
        let accept_task = tokio::spawn(accept_connections(listener, Arc::clone(&shared)));
        MockUpstream {
            addr,
            shared,
            accept_task,
        }
    }

    /// Answers every request with the same response.
    pub async fn always(response: MockResponse) -> MockUpstream {
        MockUpstream::start(move |_| response.clone()).await
    }

    /// Answers the first request with `responses[0]`, the second with `responses[1]`, and so on;
    /// once they run out the last one repeats (e.g. `[529 overloaded, 200 ok]` for a retry test).
    pub async fn sequence(responses: Vec<MockResponse>) -> MockUpstream {
        assert!(
            !responses.is_empty(),
            "MockUpstream::sequence needs a response"
        );
        let served = AtomicUsize::new(0);
        MockUpstream::start(move |_| {
            let index = served.fetch_add(1, Ordering::SeqCst);
            responses[index.min(responses.len() - 1)].clone()
        })
        .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests().clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.requests().len()
    }

    /// The most recent request; panics if there has been none.
    pub fn last_request(&self) -> RecordedRequest {
        self.shared
            .requests()
            .last()
            .cloned()
            .expect("mock upstream: no request received")
    }

    /// TCP connections accepted so far: 1 after several requests means they shared a connection.
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections_accepted.load(Ordering::SeqCst)
    }

    /// Connections that ended (closed by either side, or failed) so far; stalled ones never do.
    pub fn connections_closed(&self) -> usize {
        self.shared.connections_closed.load(Ordering::SeqCst)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // The accept task owns the listener and the JoinSet of connection tasks; aborting it
        // drops both, which aborts every connection, stalled ones included.
        self.accept_task.abort();
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as sent: path plus query string.
    pub path: String,
    /// In arrival order, names lowercased, values as sent.
    pub headers: Vec<(String, String)>,
    /// The body after removing any chunked transfer-encoding.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON; panics with the body in the message if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "mock upstream: request body is not JSON ({error}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as UTF-8 text; panics if it is not.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("mock upstream: request body is not UTF-8")
    }

    /// [`RecordedRequest::path`] without its query string.
    pub fn path_without_query(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }
}

/// How the response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// `Content-Length: <full body length>` (even when the response is cut short).
    ContentLength,
    /// `Transfer-Encoding: chunked`, one HTTP chunk per piece.
    Chunked,
    /// No length: the body ends when the mock closes the connection.
    CloseDelimited,
}

/// Where the response body is cut into separate writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunking {
    /// One write.
    Whole,
    /// Pieces of this many bytes (0 counts as 1), the last one possibly shorter.
    EveryNBytes(usize),
    /// One byte per write: every possible split point of a parser at once.
    ByteByByte,
    /// After each blank line (`\n\n`, `\r\n\r\n`, `\r\r`): one SSE event per write.
    PerEvent,
    /// Cut before each of these byte offsets (any order; 0, duplicates and offsets at or past
    /// the end are ignored): `At(vec![3, 5])` on `"abcdefg"` writes `abc`, `de`, `fg`.
    At(Vec<usize>),
}

impl Chunking {
    /// The pieces `body` is written in, in order; never an empty piece.
    pub fn split<'body>(&self, body: &'body [u8]) -> Vec<&'body [u8]> {
        match self {
            Chunking::Whole => cut_at(body, Vec::new()),
            Chunking::EveryNBytes(size) => body.chunks((*size).max(1)).collect(),
            Chunking::ByteByByte => body.chunks(1).collect(),
            Chunking::PerEvent => cut_at(body, blank_line_ends(body)),
            Chunking::At(offsets) => cut_at(body, offsets.clone()),
        }
    }
}

fn cut_at(body: &[u8], mut offsets: Vec<usize>) -> Vec<&[u8]> {
    offsets.retain(|offset| *offset > 0 && *offset < body.len());
    offsets.sort_unstable();
    offsets.dedup();
    let mut pieces = Vec::with_capacity(offsets.len() + 1);
    let mut start = 0;
    for offset in offsets {
        pieces.push(&body[start..offset]);
        start = offset;
    }
    if start < body.len() {
        pieces.push(&body[start..]);
    }
    pieces
}

/// Offsets just past each empty line, accepting `\r\n`, `\n` and `\r` line endings as SSE does.
fn blank_line_ends(body: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut line_start = 0;
    let mut index = 0;
    while index < body.len() {
        let terminator_len = match body[index] {
            b'\r' if body.get(index + 1) == Some(&b'\n') => 2,
            b'\r' | b'\n' => 1,
            _ => {
                index += 1;
                continue;
            }
        };
        let line_was_empty = index == line_start;
        index += terminator_len;
        if line_was_empty {
            ends.push(index);
        }
        line_start = index;
    }
    ends
}

/// What the mock sends back for one request. See the module documentation for the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockResponse {
    pub status: u16,
    /// Sent as given, in order. Framing headers (`content-length`, `transfer-encoding`,
    /// `connection: close`) are added from `transfer` unless already present here, so a test can
    /// also send a lying `content-length`.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub chunking: Chunking,
    pub delay_between_chunks: Duration,
    /// Wait before the status line (upstream latency / time to first byte).
    pub first_byte_delay: Duration,
    /// Send this many body bytes, then reset the TCP connection.
    pub reset_after_bytes: Option<usize>,
    /// Send this many body bytes, then hang until the mock is dropped.
    pub stall_after_bytes: Option<usize>,
    pub transfer: Transfer,
    /// Write the body this many times in a row (`Some(1)`, the default, once; `None` without
    /// end); `Content-Length` counts every copy.
    pub repeat: Option<usize>,
}

impl MockResponse {
    /// A body of any type, sent whole with `Content-Length`.
    pub fn bytes(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> MockResponse {
        MockResponse {
            status,
            headers: vec![("content-type".to_owned(), content_type.to_owned())],
            body: body.into(),
            chunking: Chunking::Whole,
            delay_between_chunks: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            reset_after_bytes: None,
            stall_after_bytes: None,
            transfer: Transfer::ContentLength,
            repeat: Some(1),
        }
    }

    /// `application/json`, sent whole with `Content-Length`.
    pub fn json(status: u16, body: serde_json::Value) -> MockResponse {
        MockResponse::bytes(status, "application/json", body.to_string())
    }

    /// A 200 `text/event-stream`, chunked, one write per event.
    pub fn sse(body: impl Into<Vec<u8>>) -> MockResponse {
        MockResponse::bytes(200, "text/event-stream", body)
            .header("cache-control", "no-cache")
            .transfer(Transfer::Chunked)
            .chunking(Chunking::PerEvent)
    }

    /// `tests/fixtures/<name>` with status 200: `.sse` files as [`MockResponse::sse`], anything
    /// else as JSON sent whole. Error fixtures need their status set: `.status(429)`.
    pub fn fixture(name: &str) -> MockResponse {
        let body = fixture_bytes(name);
        if name.ends_with(".sse") {
            MockResponse::sse(body)
        } else {
            MockResponse::bytes(200, "application/json", body)
        }
    }

    pub fn status(mut self, status: u16) -> MockResponse {
        self.status = status;
        self
    }

    /// Sets a header, replacing any of the same name (any case).
    pub fn header(mut self, name: &str, value: &str) -> MockResponse {
        self.headers
            .retain(|(existing, _)| !existing.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn chunking(mut self, chunking: Chunking) -> MockResponse {
        self.chunking = chunking;
        self
    }

    /// Wait between consecutive body pieces.
    pub fn delay(mut self, between_chunks: Duration) -> MockResponse {
        self.delay_between_chunks = between_chunks;
        self
    }

    pub fn first_byte_delay(mut self, delay: Duration) -> MockResponse {
        self.first_byte_delay = delay;
        self
    }

    pub fn transfer(mut self, transfer: Transfer) -> MockResponse {
        self.transfer = transfer;
        self
    }

    pub fn reset_after(mut self, body_bytes: usize) -> MockResponse {
        self.reset_after_bytes = Some(body_bytes);
        self
    }

    pub fn stall_after(mut self, body_bytes: usize) -> MockResponse {
        self.stall_after_bytes = Some(body_bytes);
        self
    }

    /// The body `times` times in a row (a large body the mock holds only once).
    pub fn repeat(mut self, times: usize) -> MockResponse {
        self.repeat = Some(times);
        self
    }

    /// The body again and again until the client goes away (use chunked or close-delimited).
    pub fn repeat_forever(mut self) -> MockResponse {
        self.repeat = None;
        self
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(existing, _)| existing.eq_ignore_ascii_case(name))
    }

    fn says_close(&self) -> bool {
        self.headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("connection") && has_token(value, "close")
        })
    }

    /// Where the body is cut short, if it is: the smaller of the two limits, and whether the
    /// connection is then reset (else it stalls).
    fn cut(&self) -> Option<(usize, bool)> {
        match (self.reset_after_bytes, self.stall_after_bytes) {
            (Some(reset), Some(stall)) if stall < reset => Some((stall, false)),
            (Some(reset), _) => Some((reset, true)),
            (None, Some(stall)) => Some((stall, false)),
            (None, None) => None,
        }
    }
}

/// The bytes of `tests/fixtures/<name>`.
pub fn fixture_bytes(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|error| panic!("fixture {path}: {error}"))
}

/// `tests/fixtures/manifest.json`: the usage, ids, tool calls and thoughts each fixture carries.
pub fn fixture_manifest() -> serde_json::Value {
    serde_json::from_slice(&fixture_bytes("manifest.json")).expect("fixture manifest is JSON")
}

async fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    shared.connections_accepted.fetch_add(1, Ordering::SeqCst);
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                Err(error) => {
                    // Usually descriptor exhaustion: back off instead of spinning.
                    eprintln!("mock upstream: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so a long test does not accumulate them.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let counted = Arc::clone(&shared);
    serve_requests(stream, shared).await;
    counted.connections_closed.fetch_add(1, Ordering::SeqCst);
}

async fn serve_requests(stream: TcpStream, shared: Arc<Shared>) {
    // Without this, Nagle's algorithm would merge the small writes a test asked to keep apart.
    if let Err(error) = stream.set_nodelay(true) {
        eprintln!("mock upstream: TCP_NODELAY: {error}");
    }
    let mut connection = Connection {
        stream,
        received: Vec::new(),
    };
    loop {
        let (request, client_keeps_alive) = match connection.read_request().await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(error) => {
                eprintln!("mock upstream: unreadable request: {error}");
                let _ = connection
                    .stream
                    .write_all(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                return;
            }
        };
        shared.requests().push(request.clone());
        let response = (shared.handler)(&request);
        let ending = match write_response(&mut connection.stream, &response).await {
            Ok(ending) => ending,
            // The client went away mid-response; nothing left to serve.
            Err(_) => return,
        };
        match ending {
            ResponseEnding::Complete
                if client_keeps_alive
                    && !response.says_close()
                    && response.transfer != Transfer::CloseDelimited => {}
            ResponseEnding::Complete => {
                let _ = connection.stream.shutdown().await;
                return;
            }
            ResponseEnding::Reset => {
                // SO_LINGER 0 makes close() send RST instead of FIN.
                if let Err(error) = connection.stream.set_zero_linger() {
                    eprintln!("mock upstream: SO_LINGER: {error}");
                }
                return;
            }
            ResponseEnding::Stall => std::future::pending::<()>().await,
        }
    }
}

enum ResponseEnding {
    Complete,
    Reset,
    Stall,
}

async fn write_response(
    stream: &mut TcpStream,
    response: &MockResponse,
) -> std::io::Result<ResponseEnding> {
    if !response.first_byte_delay.is_zero() {
        tokio::time::sleep(response.first_byte_delay).await;
    }
    stream.write_all(&response_head(response)).await?;
    stream.flush().await?;

    let cut = response.cut();
    let mut budget = cut.map_or(usize::MAX, |(limit, _)| limit);
    let pieces = response.chunking.split(&response.body);
    let copies = response.repeat.unwrap_or(usize::MAX);
    for (index, piece) in std::iter::repeat_n(pieces.iter(), copies)
        .flatten()
        .copied()
        .enumerate()
    {
        let piece = &piece[..piece.len().min(budget)];
        if piece.is_empty() {
            break;
        }
        if index > 0 && !response.delay_between_chunks.is_zero() {
            tokio::time::sleep(response.delay_between_chunks).await;
        }
        if response.transfer == Transfer::Chunked {
            let mut framed = format!("{:x}\r\n", piece.len()).into_bytes();
            framed.extend_from_slice(piece);
            framed.extend_from_slice(b"\r\n");
            stream.write_all(&framed).await?;
        } else {
            stream.write_all(piece).await?;
        }
        stream.flush().await?;
        budget -= piece.len();
    }

    if let Some((_, reset)) = cut {
        // Give the client the same pause it would get before a next piece, so it reads what was
        // sent before the reset or stall.
        tokio::time::sleep(response.delay_between_chunks).await;
        return Ok(if reset {
            ResponseEnding::Reset
        } else {
            ResponseEnding::Stall
        });
    }
    if response.transfer == Transfer::Chunked {
        stream.write_all(b"0\r\n\r\n").await?;
        stream.flush().await?;
    }
    Ok(ResponseEnding::Complete)
}

fn response_head(response: &MockResponse) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(response.status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("Unknown");
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", response.status);
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match response.transfer {
        Transfer::ContentLength if !response.has_header("content-length") => {
            let copies = response.repeat.unwrap_or(1);
            head.push_str(&format!(
                "content-length: {}\r\n",
                response.body.len() * copies
            ));
        }
        Transfer::Chunked if !response.has_header("transfer-encoding") => {
            head.push_str("transfer-encoding: chunked\r\n");
        }
        Transfer::CloseDelimited if !response.has_header("connection") => {
            head.push_str("connection: close\r\n");
        }
        _ => {}
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn has_token(header_value: &str, token: &str) -> bool {
    header_value
        .split(',')
        .any(|part| part.trim().eq_ignore_ascii_case(token))
}

/// One accepted connection and the bytes read from it but not yet consumed (pipelined requests).
struct Connection {
    stream: TcpStream,
    received: Vec<u8>,
}

impl Connection {
    /// The next request and whether the client allows the connection to stay open after it;
    /// `None` when the client closed the connection between requests.
    async fn read_request(&mut self) -> std::io::Result<Option<(RecordedRequest, bool)>> {
        let head_len = loop {
            if let Some(end) = find(&self.received, b"\r\n\r\n") {
                break end + 4;
            }
            if self.received.len() > MAX_HEAD_BYTES {
                return Err(invalid("request head too large"));
            }
            if self.fill().await? == 0 {
                return if self.received.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::ErrorKind::UnexpectedEof.into())
                };
            }
        };

        let mut header_slots = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Request::new(&mut header_slots);
        match parsed.parse(&self.received[..head_len]) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(invalid("incomplete request head")),
            Err(error) => return Err(invalid(&format!("request head: {error}"))),
        }
        let method = parsed.method.unwrap_or_default().to_owned();
        let path = parsed.path.unwrap_or_default().to_owned();
        let http_1_0 = parsed.version == Some(0);
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|header| {
                (
                    header.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(header.value).into_owned(),
                )
            })
            .collect();
        self.received.drain(..head_len);

        let header = |name: &str| {
            headers
                .iter()
                .find(|(header, _)| header == name)
                .map(|(_, value)| value.as_str())
        };
        let chunked = header("transfer-encoding").is_some_and(|value| has_token(value, "chunked"));
        let content_length = match header("content-length") {
            Some(value) => value
                .trim()
                .parse::<usize>()
                .map_err(|_| invalid("content-length is not a number"))?,
            None => 0,
        };
        let expects_body = chunked || content_length > 0;
        if expects_body && header("expect").is_some_and(|value| has_token(value, "100-continue")) {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        let body = if chunked {
            self.read_chunked_body().await?
        } else {
            self.take(content_length).await?
        };
        let connection = header("connection").unwrap_or_default();
        let keeps_alive = if http_1_0 {
            has_token(connection, "keep-alive")
        } else {
            !has_token(connection, "close")
        };
        Ok(Some((
            RecordedRequest {
                method,
                path,
                headers,
                body,
            },
            keeps_alive,
        )))
    }

    async fn read_chunked_body(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let size_line = self.take_line().await?;
            let size_text = size_line
                .split(|byte| *byte == b';')
                .next()
                .unwrap_or_default();
            let size = std::str::from_utf8(size_text)
                .ok()
                .and_then(|text| usize::from_str_radix(text.trim(), 16).ok())
                .ok_or_else(|| invalid("bad chunk size"))?;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                while !self.take_line().await?.is_empty() {}
                return Ok(body);
            }
            body.extend_from_slice(&self.take(size).await?);
            if !self.take_line().await?.is_empty() {
                return Err(invalid("chunk data longer than its size"));
            }
        }
    }

    /// The next line, without its CRLF.
    async fn take_line(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(end) = find(&self.received, b"\r\n") {
                let line = self.received[..end].to_vec();
                self.received.drain(..end + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn take(&mut self, count: usize) -> std::io::Result<Vec<u8>> {
        while self.received.len() < count {
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.received.drain(..count).collect())
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut buffer = [0u8; 16 * 1024];
        let read = self.stream.read(&mut buffer).await?;
        self.received.extend_from_slice(&buffer[..read]);
        Ok(read)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn invalid(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_owned())
}
