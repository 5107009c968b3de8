//! The gateway listener: the pingora app behind `server.gateway_listen`.
//!
//! Every connection is HTTP/1.x (the TLS listener offers no ALPN, and h2c is off), served by a
//! request loop of our own over pingora's HTTP/1 session: read a head, run [`Gateway`]'s hooks
//! (`request_filter`, then `fail_to_proxy` if it broke, then `logging`) in the order pingora's
//! `HttpProxy` runs them, and hand the connection back for the next request. Why not
//! `HttpProxy` itself: the gateway answers every request in `request_filter`, but pingora's
//! per-request future is sized for the upstream, cache and retry phases that never run here.
//! It lives as long as the request, so every open stream carried ~20 KB of it (issue 9: 10,000
//! open streams). The proxy front door's tunnels still use `HttpProxy` (they speak HTTP/2 too).
//!
//! Not here: what a request does (the [`Gateway`] pipeline), the first head's deadline
//! ([`HeadDeadlineStream`]), the proxy front door (its own app, `crate::proxy`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream, ServerApp};
use pingora::protocols::Stream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::ShutdownWatch;
use pingora::ErrorType;

use super::head_deadline::HeadDeadlineStream;
use super::Gateway;

/// How long an idle kept-alive connection waits for its next request (pingora's default).
const KEEPALIVE_SECS: u64 = 60;

/// See the module docs.
pub struct GatewayListener {
    gateway: Gateway,
    head_timeout: Duration,
}

impl GatewayListener {
    pub fn new(gateway: Gateway, head_timeout: Duration) -> GatewayListener {
        GatewayListener {
            gateway,
            head_timeout,
        }
    }

    /// One request on an HTTP/1 connection, from its head to the connection's release; `None`
    /// when the connection is done (closed, broken, not to be reused, or shutting down).
    /// pingora's `finish` and `respond_error` futures are boxed: inline, their 3.7 KB and 1.3 KB
    /// would size this future, which lives as long as the request (a long stream).
    async fn serve(
        &self,
        mut session: Session,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let mut stopping = shutdown.clone();
        let read = tokio::select! {
            // A request already buffered is served even when shutdown begins.
            biased;
            read = session.downstream_session.read_request() => read,
            _ = stopping.wait_for(|stop| *stop) => return None,
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                if e.etype == ErrorType::InvalidHTTPHeader {
                    let _ = Box::pin(session.downstream_session.respond_error(400)).await;
                }
                tracing::debug!(error = %e, "gateway connection closed before a request");
                session.downstream_session.shutdown().await;
                return None;
            }
        }
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
}

#[async_trait]
impl ServerApp for GatewayListener {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream: Stream = Box::new(HeadDeadlineStream::new(stream, self.head_timeout));
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let mut session = Session::new_h1(stream);
            match settings {
                Some(previous) => previous.apply_to_session(&mut session.downstream_session),
                None => session.set_keepalive(Some(KEEPALIVE_SECS)),
            }
            let reused = self.serve(session, shutdown).await?;
            (stream, settings) = reused.consume();
        }
    }
}
