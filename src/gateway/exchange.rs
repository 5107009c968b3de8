//! Exchange: the upstream call. Sends the buffered request (failing over between pooled keys on
//! 429/401/403), relays the response head and every body chunk as they arrive, and tells the
//! interception what happened (progress, breaker verdict, failures) as it goes.
//!
//! Not here: what a response means (the provider's parser, fed through the interception) or
//! what it costs (`governance`, through [`Gateway::settle`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession as UpstreamSession;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use super::credential::Credential;
use super::intake::Routed;
use super::interception::OpenInterception;
use super::refusal::{Refusal, RefusalKind};
use super::{Gateway, Stop};
use crate::providers::{Endpoint, UsageChunkStripper};
use crate::store::InterceptionStatus;
use crate::telemetry::metric;
use crate::upstream::keypool::{self, Failover};
use crate::upstream::{self, breaker, ProviderRoute};

impl Gateway {
    /// Phase 6: the upstream call. The response head and every body chunk are relayed as they
    /// arrive; intercepted responses also pass through the provider's parser.
    pub(super) async fn exchange(
        &self,
        session: &mut Session,
        mut open: Option<&mut OpenInterception>,
        routed: &Routed,
        body: Bytes,
        credential: &Credential,
    ) -> Result<(), Stop> {
        let route = &routed.route;
        let waited = Instant::now();
        let addr = match self.state.dns.resolve(&route.upstream).await {
            Ok(a) => a,
            Err(e) => {
                let msg = format!("cannot resolve upstream {}: {e}", route.upstream.host);
                mark_failed(&mut open, InterceptionStatus::UpstreamAborted, &msg);
                return Err(Refusal::new(RefusalKind::UpstreamUnreachable, msg).into());
            }
        };
        let peer = route.peer(addr);
        let mut key = credential.key.clone();
        let mut slot = credential.pool_slot;
        let mut tried: Vec<usize> = Vec::new();
        let mut retry_after_override = None;
        // One attempt per central key at most: an upstream 429/401/403 on a pooled key retries
        // the (buffered) request on the next usable key before anything reaches the client.
        let mut up = loop {
            let req = session.req_header();
            let head = upstream::upstream_request(
                &req.method,
                &route.upstream_path(&routed.rest),
                &req.headers,
                route,
                key.as_deref(),
                body.len(),
            )
            .map_err(|e| {
                Refusal::new(
                    RefusalKind::BadRequest,
                    format!("cannot forward request headers: {e}"),
                )
            })?;

            // From here the upstream may have the request, and bill it.
            if let Some(o) = open.as_deref_mut() {
                o.progress.request_sent = true;
            }
            // While the upstream thinks (a long generation can take minutes before its first
            // byte), watch the client: if it goes away, stop waiting and stop paying for the call.
            let sent = {
                // Boxed: the connect-and-send future is ~10 KB, and inline it would stay part of
                // this request's future (and its memory) for the whole life of a stream.
                let mut send =
                    Box::pin(self.send(&peer, head, body.clone(), route.first_byte_timeout));
                tokio::select! {
                    sent = &mut send => sent,
                    gone = session.as_downstream_mut().read_body_or_idle(true) => {
                        let e = match gone {
                            Err(e) => e,
                            Ok(_) => Error::explain(ErrorType::ConnectionClosed, "client sent data while waiting for a response"),
                        };
                        mark_failed(&mut open, InterceptionStatus::ClientAborted, "client disconnected before the response");
                        if let Some(o) = open.as_deref_mut() {
                            o.progress.upstream_wait += waited.elapsed();
                        }
                        return Err(Stop::Broken(e));
                    }
                }
            };
            let up = match sent {
                Ok(up) => up,
                Err(e) => {
                    let (status, kind, msg) = match upstream_timeout_phase(&e) {
                        Some((phase, config_key, limit)) => {
                            metrics::counter!(metric::UPSTREAM_TIMEOUTS_TOTAL, "provider" => route.name.clone(), "phase" => phase).increment(1);
                            let limit = limit(route);
                            (
                                InterceptionStatus::Timeout,
                                RefusalKind::UpstreamTimeout,
                                format!(
                                    "upstream {} timed out: {phase} timeout after {} ms ({config_key})",
                                    route.name,
                                    limit.as_millis()
                                ),
                            )
                        }
                        None => (
                            InterceptionStatus::UpstreamAborted,
                            RefusalKind::UpstreamUnreachable,
                            format!("upstream {} failed: {}", route.name, e.etype().as_str()),
                        ),
                    };
                    mark_failed(&mut open, status, &msg);
                    if let Some(o) = open.as_deref_mut() {
                        // A connection that never opened carried nothing to bill.
                        o.progress.request_sent = !is_connect_failure(&e);
                        o.progress.upstream_wait += waited.elapsed();
                        if let Some(t) = o.breaker.take() {
                            t.failed();
                        }
                    }
                    return Err(Refusal::new(kind, msg).into());
                }
            };
            let (Some(index), Some(head)) = (slot, up.response_header()) else {
                break up;
            };
            let status = head.status.as_u16();
            let retry_after = head
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok());
            match route
                .keys
                .after_answer(index, status, retry_after, &mut tried)
            {
                Failover::Keep | Failover::Exhausted => break up,
                Failover::Retry(next) => {
                    let mut up = up;
                    up.shutdown().await;
                    key = Some(next.secret);
                    slot = Some(next.slot);
                    if let Some(o) = open.as_deref_mut() {
                        o.credential_hint = Some(next.hint);
                    }
                }
                // Upstream errors are relayed as they came; with several keys the wait the
                // client is told is the pool's (the first key back), not this key's.
                Failover::AllCooling(wait) => {
                    if route.keys.len() > 1 {
                        retry_after_override = Some(keypool::retry_after_secs(wait));
                    }
                    break up;
                }
            }
        };
        // The head is read in place (borrowed from the upstream session, not copied).
        let upstream_head = match up.response_header() {
            Some(h) => h,
            None => {
                return Err(Refusal::new(
                    RefusalKind::UpstreamUnreachable,
                    "upstream sent no response head",
                )
                .into())
            }
        };
        let status = upstream_head.status.as_u16();
        let streaming = upstream_head
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        route
            .series()
            .upstream_ttfb()
            .record(waited.elapsed().as_secs_f64());

        let mut stripper = None;
        if let Some(o) = open.as_deref_mut() {
            o.progress.ttfb = Some(o.started.elapsed());
            o.progress.upstream_wait += waited.elapsed();
            o.progress.upstream_status = Some(status);
            o.progress.streaming = streaming;
            if let Some(t) = o.breaker.take() {
                if breaker::is_failure_status(status) {
                    t.failed();
                } else {
                    t.succeeded();
                }
            }
            if status < 400 {
                o.progress.parser = Some(route.adapter.response_parser(o.endpoint, streaming));
                let injected_usage = o.endpoint == Endpoint::ChatCompletions
                    && o.request.stream
                    && !o.request.client_requested_usage;
                if injected_usage && streaming {
                    stripper = Some(UsageChunkStripper::new());
                }
            }
        }

        let mut downstream_head =
            ResponseHeader::build(status, Some(upstream_head.headers.len() + 2))
                .map_err(Stop::Broken)?;
        for (name, value) in upstream_head.headers.iter() {
            let n = name.as_str();
            if upstream::is_hop_by_hop_response_header(n)
                || (stripper.is_some() && n == "content-length")
            {
                continue;
            }
            let _ = downstream_head.append_header(name.clone(), value.clone());
        }
        if let Some(secs) = retry_after_override {
            let _ = downstream_head.insert_header(http::header::RETRY_AFTER, secs.to_string());
        }
        if let Some(o) = open.as_deref() {
            let _ = downstream_head.insert_header("x-tollgate-interception-id", o.id.to_string());
            let view = self.state.governance.budget_view(
                o.principal.user_id,
                &o.principal.group_ids,
                Utc::now(),
            );
            for (name, value) in budget_headers(&view) {
                let _ = downstream_head.insert_header(name, value);
            }
        }
        // Without a length, HTTP/1.1 must be chunked: a close-delimited body would make a cut
        // stream look complete to the client.
        if downstream_head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_none()
            && session.req_header().version != http::Version::HTTP_10
        {
            let _ = downstream_head.insert_header(http::header::TRANSFER_ENCODING, "chunked");
        }
        let empty_response = up.response_done();
        if let Err(e) = session
            .write_response_header(Box::new(downstream_head), empty_response)
            .await
        {
            mark_failed(
                &mut open,
                InterceptionStatus::ClientAborted,
                "client went away before the response head",
            );
            up.shutdown().await;
            return Err(Stop::Broken(e));
        }

        // The upstream connection goes back to the pool the moment its response is complete,
        // before the client sees the last bytes, so the client's next request can reuse it.
        let mut upstream = Some(up);
        while let Some(conn) = upstream.as_mut() {
            if conn.response_done() {
                Box::pin(self.release(upstream.take(), &peer)).await;
                break;
            }
            let read_started = Instant::now();
            let read = tokio::time::timeout(route.idle_timeout, conn.read_response_body()).await;
            if let Some(o) = open.as_deref_mut() {
                o.progress.upstream_wait += read_started.elapsed();
            }
            let Ok(read) = read else {
                metrics::counter!(metric::UPSTREAM_TIMEOUTS_TOTAL, "provider" => route.name.clone(), "phase" => "idle").increment(1);
                mark_failed(
                    &mut open,
                    InterceptionStatus::Timeout,
                    &format!(
                        "upstream {} stalled mid-response: idle timeout after {} ms (idle_timeout_ms)",
                        route.name,
                        route.idle_timeout.as_millis()
                    ),
                );
                conn.shutdown().await;
                return Err(Stop::Broken(Error::explain(
                    ErrorType::ReadTimedout,
                    "upstream idle timeout",
                )));
            };
            let chunk = match read {
                Ok(Some(c)) => c,
                Ok(None) if conn.response_done() => continue,
                // The body ended without its proper end (chunked terminator, declared length).
                Ok(None) => {
                    mark_failed(
                        &mut open,
                        InterceptionStatus::UpstreamAborted,
                        &format!(
                            "upstream {} broke mid-response: body ended early",
                            route.name
                        ),
                    );
                    conn.shutdown().await;
                    return Err(Stop::Broken(Error::explain(
                        ErrorType::ReadError,
                        "upstream body ended early",
                    )));
                }
                Err(e) => {
                    let status = if is_timeout(&e) {
                        InterceptionStatus::Timeout
                    } else {
                        InterceptionStatus::UpstreamAborted
                    };
                    mark_failed(
                        &mut open,
                        status,
                        &format!(
                            "upstream {} broke mid-response: {}",
                            route.name,
                            e.etype().as_str()
                        ),
                    );
                    conn.shutdown().await;
                    return Err(Stop::Broken(e));
                }
            };
            let mut final_event = false;
            if let Some(o) = open.as_deref_mut().filter(|o| o.summary.is_none()) {
                match o.progress.parser.as_mut() {
                    Some(p) => {
                        p.feed(&chunk);
                        final_event = p.ended();
                    }
                    None if o.outcome.error_body.len() < ERROR_BODY_KEEP => {
                        let keep = (ERROR_BODY_KEEP - o.outcome.error_body.len()).min(chunk.len());
                        o.outcome.error_body.extend_from_slice(&chunk[..keep]);
                    }
                    None => {}
                }
            }
            let done = conn.response_done();
            if done || final_event {
                // The final event or the last chunk: settle what it says before the client can
                // act on it (a follow-up tool result may arrive the moment the client has these
                // bytes), and before a crash could lose it (the spend journal).
                if let Some(o) = open.as_deref_mut().filter(|o| o.summary.is_none()) {
                    Box::pin(self.settle_before_last_byte(o)).await;
                }
            }
            if done {
                Box::pin(self.release(upstream.take(), &peer)).await;
            }
            let out = match stripper.as_mut() {
                Some(s) => s.push(&chunk),
                None => chunk,
            };
            if out.is_empty() {
                continue;
            }
            if let Err(e) = session.write_response_body(Some(out), false).await {
                let (status, why) = client_write_failure(&e, session);
                mark_failed(&mut open, status, &why);
                if let Some(mut conn) = upstream.take() {
                    conn.shutdown().await;
                }
                return Err(Stop::Broken(e));
            }
            if let Some(o) = open.as_deref_mut() {
                // The final event is the client's: a reset after it (HTTP/2 clients send one
                // the moment they have it) does not undo a completed call.
                if upstream.is_none() || o.summary.as_ref().is_some_and(|s| s.ended) {
                    o.progress.delivered = true;
                }
            }
        }
        if let Some(o) = open.as_deref_mut() {
            Box::pin(self.settle(o)).await;
            if o.outcome.status.is_none() {
                o.outcome.status = Some(if status >= 400 {
                    InterceptionStatus::UpstreamError
                } else {
                    InterceptionStatus::Completed
                });
            }
        }
        let tail = stripper
            .as_mut()
            .map(|s| s.finish())
            .filter(|t| !t.is_empty());
        if !empty_response {
            if let Err(e) = session.write_response_body(tail, true).await {
                mark_failed(
                    &mut open,
                    InterceptionStatus::ClientAborted,
                    "client disconnected at the end of the response",
                );
                return Err(Stop::Broken(e));
            }
        }
        Ok(())
    }

    async fn release(&self, conn: Option<UpstreamSession>, peer: &HttpPeer) {
        if let Some(conn) = conn {
            self.state
                .connector
                .release_http_session(conn, peer, Some(Duration::from_secs(60)))
                .await;
        }
    }

    /// Sends the request head and body and reads the response head. A pooled connection the
    /// upstream closed while idle fails before any response: that case is retried once on a
    /// fresh connection.
    async fn send(
        &self,
        peer: &HttpPeer,
        head: pingora::http::RequestHeader,
        body: Bytes,
        first_byte: Duration,
    ) -> pingora::Result<UpstreamSession> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (mut up, reused) = self.state.connector.get_http_session(peer).await?;
            let result = async {
                up.write_request_header(Box::new(head.clone())).await?;
                if !body.is_empty() {
                    up.write_request_body(body.clone(), true).await?;
                }
                up.finish_request_body().await?;
                match tokio::time::timeout(first_byte, up.read_response_header()).await {
                    Ok(read) => read,
                    Err(_) => Error::e_explain(ErrorType::ReadTimedout, FIRST_BYTE_TIMEOUT),
                }
            }
            .await;
            match result {
                Ok(()) => return Ok(up),
                Err(e) if reused && attempt == 1 && !is_timeout(&e) => {
                    up.shutdown().await;
                    continue;
                }
                Err(e) => {
                    up.shutdown().await;
                    return Err(e);
                }
            }
        }
    }
}

/// Upper bound of an upstream error body kept for the record.
const ERROR_BODY_KEEP: usize = 2048;

/// `x-tollgate-budget-*` headers on every intercepted response.
fn budget_headers(view: &crate::governance::BudgetView) -> [(&'static str, String); 5] {
    [
        (
            "x-tollgate-budget-limit",
            view.cap
                .map(|c| c.to_string())
                .unwrap_or_else(|| "none".into()),
        ),
        ("x-tollgate-budget-spent", view.spent.to_string()),
        (
            "x-tollgate-budget-remaining",
            view.remaining()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "unlimited".into()),
        ),
        (
            "x-tollgate-budget-scope",
            view.scope
                .as_ref()
                .map(|s| s.as_str())
                .unwrap_or("none")
                .to_string(),
        ),
        (
            "x-tollgate-budget-reset",
            view.reset
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
    ]
}

/// How a failed write to the client is recorded: a client that stopped reading (its receive
/// window stayed full for `client_write_timeout_ms`) timed out; any other failure is a client
/// that went away.
fn client_write_failure(e: &Error, session: &Session) -> (InterceptionStatus, String) {
    if e.etype() == &ErrorType::WriteTimedout {
        let limit = session
            .as_downstream()
            .get_write_timeout()
            .unwrap_or_default();
        (
            InterceptionStatus::Timeout,
            format!(
                "client stopped reading mid-response: nothing accepted for {} ms (server.client_write_timeout_ms)",
                limit.as_millis()
            ),
        )
    } else {
        (
            InterceptionStatus::ClientAborted,
            "client disconnected mid-response".to_string(),
        )
    }
}

fn mark_failed(
    open: &mut Option<&mut OpenInterception>,
    status: InterceptionStatus,
    message: &str,
) {
    if let Some(o) = open.as_deref_mut().filter(|o| !o.progress.delivered) {
        o.outcome.status = Some(status);
        o.outcome.error = Some(message.to_string());
    }
}

/// Context of the error `send` returns when the response head did not come in time.
const FIRST_BYTE_TIMEOUT: &str = "no response head within first_byte_timeout_ms";

type TimeoutLimit = fn(&ProviderRoute) -> Duration;

/// Which upstream timeout an error is: (phase label, config key, the limit).
fn upstream_timeout_phase(e: &Error) -> Option<(&'static str, &'static str, TimeoutLimit)> {
    match e.etype() {
        ErrorType::ConnectTimedout => {
            Some(("connect", "connect_timeout_ms", |r| r.connect_timeout))
        }
        ErrorType::ReadTimedout => Some(("first_byte", "first_byte_timeout_ms", |r| {
            r.first_byte_timeout
        })),
        ErrorType::WriteTimedout => Some(("write", "fixed upstream write timeout", |_| {
            upstream::UPSTREAM_WRITE_TIMEOUT
        })),
        _ => None,
    }
}

/// Failures before a connection to the upstream existed: no request reached it.
fn is_connect_failure(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert
            | ErrorType::SocketError
            | ErrorType::BindError
    )
}

fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
    )
}
