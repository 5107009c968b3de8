//! The admin listener's own serving loop: the management API, the dashboard and the
//! operational routes over HTTP/1.1 (hyper), with the limits every listener has against
//! clients that have not proved who they are (`crate::front_door`):
//!
//! - connections: its own [`ConnectionLimiter`] (in all and per client address), sized apart
//!   from the gateway's and the proxy's, so a flood there never takes `/healthz` with it;
//! - every request head: hyper's whole-head timeout (`server.client_header_timeout_ms`, counted
//!   from when hyper starts waiting for the head, so it bounds idle keep-alive too) and its read
//!   buffer capped at `server.max_request_head_bytes` (hyper's floor is 8 KiB): a larger head
//!   gets 431;
//! - every request carries its peer address (axum's `ConnectInfo`), for the per-address limit on
//!   failed authentication (`crate::auth::failures`).
//!
//! `axum::serve` offers none of these: no head timeout (it sets no timer), a ~400 KB head
//! buffer, no connection limit.
//!
//! Not here: the routes (`api::router`), the limits' sizes (`crate::front_door`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::front_door::connections::turn_away;
use crate::front_door::{ClientKey, ConnectionLimiter, HeadLimits};

/// hyper refuses a smaller read buffer.
const HYPER_MIN_BUFFER: usize = 8 * 1024;
/// A pause after an accept error that is not about one connection (out of descriptors), so
/// the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `stop` completes, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    connections: Arc<ConnectionLimiter>,
    heads: HeadLimits,
    stop: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(heads.timeout)
        .max_buf_size(heads.max_bytes.max(HYPER_MIN_BUFFER));
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (mut tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset) {
                        tracing::error!(error = %e, "admin listener cannot accept");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let place = match connections.admit(ClientKey::of(Some(peer.ip()))) {
            Ok(place) => place,
            Err(refused) => {
                tokio::spawn(async move { turn_away(&mut tcp, &refused).await });
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer));
            router.clone().oneshot(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(peer = %peer, error = %e, "admin connection ended");
            }
            drop(place);
        });
    }
    graceful.shutdown().await;
}
