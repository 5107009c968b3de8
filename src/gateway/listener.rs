//! The gateway listener: the pingora app behind `server.gateway_listen`, which also serves the
//! plain HTTP requests that arrive on the proxy port and the requests inside decrypted HTTP/1.1
//! proxy tunnels (`crate::proxy` hands it those connections).
//!
//! Every connection is HTTP/1.x (the TLS listener offers no ALPN, and h2c is off), served by a
//! request loop of our own over pingora's HTTP/1 session: read a head, run [`Gateway`]'s hooks
//! (`request_filter`, then `fail_to_proxy` if it broke, then `logging`) in the order pingora's
//! `HttpProxy` runs them, and hand the connection back for the next request. Why not
//! `HttpProxy` itself: the gateway answers every request in `request_filter`, but pingora's
//! per-request future is sized for the upstream, cache and retry phases that never run here.
//! It lives as long as the request, so every open stream carried ~20 KB of it (issue 9: 10,000
//! open streams). Decrypted HTTP/2 tunnels still use `HttpProxy`.
//!
//! Every head on a connection, not only the first, is bounded (issue 15): the loop waits at
//! most `server.client_header_timeout_ms` for each one, counted from when it starts waiting (so
//! on a kept-alive connection it is also the idle limit), and a head past
//! `server.max_request_head_bytes` is answered 431 ([`HeadGuardStream`] counts its bytes). A
//! new connection on the gateway port first needs a place from the port's
//! [`ConnectionLimiter`] (in all and per client address); without one it is turned away.
//!
//! Not here: what a request does (the [`Gateway`] pipeline), counting head bytes
//! ([`HeadGuardStream`]), the limits' sizes (`crate::front_door`), the proxy front door (its
//! own app, `crate::proxy`).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::ShutdownWatch;
use pingora::ErrorType;

use super::head_deadline::{HeadGuardStream, HeadWatch};
use super::Gateway;
use crate::front_door::connections::turn_away;
use crate::front_door::{linger_close, ClientKey, ConnectionLimiter, HeadLimits};
use crate::telemetry::metric;

/// See the module docs.
pub struct GatewayListener {
    gateway: Gateway,
    heads: HeadLimits,
    /// The gateway port's connection limits; `None` for connections the proxy listener has
    /// already admitted (its own limits hold them).
    connections: Option<Arc<ConnectionLimiter>>,
}

/// Why no request head was read.
enum NoHead {
    /// The client closed (or a kept-alive connection ended quietly).
    Closed,
    /// pingora could not parse the head.
    Malformed,
    /// Reading failed (a reset, or the head outgrew its cap).
    Broken,
    /// The whole-head deadline passed.
    TimedOut,
}

impl GatewayListener {
    pub fn new(
        gateway: Gateway,
        heads: HeadLimits,
        connections: Option<Arc<ConnectionLimiter>>,
    ) -> GatewayListener {
        GatewayListener {
            gateway,
            heads,
            connections,
        }
    }

    /// Serves a connection, request after request, until it is done.
    pub async fn serve_connection(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let watch = Arc::new(HeadWatch::default());
        let mut stream: Stream = Box::new(HeadGuardStream::new(
            stream,
            watch.clone(),
            self.heads.max_bytes,
        ));
        // pingora's own timeout on each read of a later head; the whole-head deadline below is
        // never longer, so it is the one that fires.
        let keepalive_secs = self.heads.timeout.as_secs_f64().ceil().max(1.0) as u64;
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let mut session = Session::new_h1(stream);
            match settings {
                Some(previous) => previous.apply_to_session(&mut session.downstream_session),
                None => session.set_keepalive(Some(keepalive_secs)),
            }
            let Some(reused) = self.serve(session, &watch, shutdown).await else {
                return;
            };
            (stream, settings) = reused.consume();
        }
    }

    /// One request on an HTTP/1 connection, from its head to the connection's release; `None`
    /// when the connection is done (closed, broken, not to be reused, or shutting down).
    /// pingora's `finish` and `respond_error` futures are boxed: inline, their 3.7 KB and 1.3 KB
    /// would size this future, which lives as long as the request (a long stream).
    async fn serve(
        &self,
        mut session: Session,
        watch: &HeadWatch,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let mut stopping = shutdown.clone();
        watch.expect_head();
        let deadline = tokio::time::Instant::now() + self.heads.timeout;
        let read = tokio::select! {
            // A request already buffered is served even when shutdown begins.
            biased;
            read = tokio::time::timeout_at(deadline, session.downstream_session.read_request()) => read,
            _ = stopping.wait_for(|stop| *stop) => return None,
        };
        let no_head = match read {
            Ok(Ok(true)) => None,
            Ok(Ok(false)) => Some(NoHead::Closed),
            Ok(Err(e)) if e.etype == ErrorType::InvalidHTTPHeader => Some(NoHead::Malformed),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "gateway connection broke before a request");
                Some(NoHead::Broken)
            }
            Err(_) => Some(NoHead::TimedOut),
        };
        if let Some(no_head) = no_head {
            self.end_without_request(session, watch, no_head).await;
            return None;
        }
        // pingora has the whole head: whatever follows (the body) is not counted as head.
        watch.stop();
        if session.req_header().method == http::Method::CONNECT {
            // As pingora's HttpProxy: CONNECT belongs to the proxy front door, not here.
            let _ = Box::pin(session.downstream_session.respond_error(405)).await;
            session.downstream_session.shutdown().await;
            return None;
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }

        let mut ctx = self.gateway.new_ctx();
        match self.gateway.request_filter(&mut session, &mut ctx).await {
            Ok(_) => {
                self.gateway.logging(&mut session, None, &mut ctx).await;
                let settings = HttpPersistentSettings::for_session(&session.downstream_session);
                let finish = Box::pin(session.downstream_session.finish());
                let reusable = finish.await.ok().flatten()?;
                Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
            }
            Err(e) => {
                // The gateway never lets a broken connection be reused (`fail_to_proxy`).
                self.gateway.fail_to_proxy(&mut session, &e, &mut ctx).await;
                self.gateway.logging(&mut session, Some(&e), &mut ctx).await;
                session.downstream_session.on_proxy_failure(e);
                None
            }
        }
    }

    /// Answers what can be answered when no head came (431 for one past the cap, 400 for one
    /// that does not parse) and closes the connection, lingering after an answer so it is not
    /// lost to a reset; counts oversized and timed-out heads.
    async fn end_without_request(&self, mut session: Session, watch: &HeadWatch, why: NoHead) {
        let answer = if watch.too_large() {
            metrics::counter!(metric::REQUEST_HEADS_TOO_LARGE_TOTAL).increment(1);
            Some(431)
        } else {
            match why {
                NoHead::Malformed => Some(400),
                // An idle kept-alive connection reaching the deadline is not a slow head.
                NoHead::TimedOut if watch.bytes_read() > 0 => {
                    metrics::counter!(metric::CLIENT_HEADER_TIMEOUTS_TOTAL).increment(1);
                    None
                }
                NoHead::TimedOut | NoHead::Closed | NoHead::Broken => None,
            }
        };
        let Some(status) = answer else {
            session.downstream_session.shutdown().await;
            return;
        };
        let _ = Box::pin(session.downstream_session.respond_error(status)).await;
        watch.stop();
        match *session.downstream_session {
            ServerSession::H1(h1) => linger_close(&mut h1.into_inner()).await,
            mut other => other.shutdown().await,
        }
    }
}

#[async_trait]
impl ServerApp for GatewayListener {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _place = match &self.connections {
            Some(limiter) => match limiter.admit(ClientKey::of_stream(&stream)) {
                Ok(place) => Some(place),
                Err(refused) => {
                    turn_away(&mut stream, &refused).await;
                    return None;
                }
            },
            None => None,
        };
        self.serve_connection(stream, shutdown).await;
        None
    }
}
