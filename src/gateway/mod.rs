//! The gateway pipeline: one pingora `ProxyHttp` serving every provider route. This file is the
//! list of phases ([`Gateway::handle`]); each phase lives in its own file, in this order:
//!
//! 1. `intake`: [`Gateway::route`] (provider and API from the path, 404 otherwise) →
//!    [`Gateway::authenticate`] (Tollgate key → principal) → the per-user rate and concurrency →
//!    [`read_body`] (whole and bounded);
//! 2. `credential`: [`Gateway::credential`] (the key-policy truth table: the user's key, stored or
//!    sent, or a pooled central key);
//! 3. parse the body (the provider adapter);
//! 4. `admit`: [`Gateway::admit`] (circuit breaker, budgets, shared budget);
//! 5. `interception`: [`Gateway::open_interception`] (client, session, thread);
//! 6. `exchange`: [`Gateway::exchange`] (upstream call with key failover; the response streamed
//!    through the parser chunk by chunk, settled through governance before its last byte);
//! 7. `interception`: [`Gateway::close_interception`] (metrics, logs, recorder queue), from
//!    pingora's `logging` phase whatever happened before.
//!
//! Any phase may refuse: a [`Refusal`] (`refusal`, with every refusal message) is rendered in the
//! client's provider format in exactly one place, [`Gateway::refuse`].
//!
//! The whole exchange runs inside `request_filter` with pingora's connector, rather than in
//! pingora's own upstream phases, because the body must be read and judged *before* anything is
//! sent upstream: a refusal (400/401/402/403/413/429) never contacts the provider, and pingora
//! replays at most 64 KiB of a body that was read early.
//!
//! Not here: provider wire formats (`providers`), provider routes, key pools and breakers
//! (`upstream`), key storage (`store`), pricing and budgets (`governance`), the state shared by
//! every request (`app`).

mod admit;
mod credential;
mod exchange;
mod head_deadline;
mod intake;
mod interception;
mod listener;
mod refusal;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};

use crate::app::AppState;
use crate::auth::PresentedCredentials;
use crate::governance::limits::ConcurrencyPermit;
use crate::telemetry::metric;
use crate::upstream::ProviderRoute;

use admit::Admitted;
use intake::{read_body, Target};
use interception::OpenInterception;
use refusal::denial_refusal;

pub use listener::GatewayListener;
pub use refusal::{Refusal, RefusalKind};

/// The canonical route prefix (as Coder's AI Bridge); `/{provider}` is the short alias.
pub const ROUTE_PREFIX: &str = "/api/v2/aibridge/";

/// The pingora service value. `fixed_provider` is set for the proxy front door, where the
/// CONNECT target (not the path) says which provider a request is for; `tunnel_key` is then the
/// Tollgate key the CONNECT carried in `Proxy-Authorization`.
pub struct Gateway {
    state: Arc<AppState>,
    fixed_provider: Option<Arc<ProviderRoute>>,
    tunnel_key: Option<String>,
}

impl Gateway {
    pub fn new(state: Arc<AppState>) -> Gateway {
        Gateway {
            state,
            fixed_provider: None,
            tunnel_key: None,
        }
    }

    /// The gateway behind one decrypted CONNECT tunnel: every request inside goes to
    /// `provider` and is made by the holder of `tollgate_key` (the proxy credentials).
    pub fn for_tunnel(
        state: Arc<AppState>,
        provider: Arc<ProviderRoute>,
        tollgate_key: String,
    ) -> Gateway {
        Gateway {
            state,
            fixed_provider: Some(provider),
            tunnel_key: Some(tollgate_key),
        }
    }
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {
    /// Boxed: the context is stored inline in pingora's per-connection future (and copied
    /// between its states), so an inline interception made every open connection carry it
    /// more than once.
    interception: Option<Box<OpenInterception>>,
    /// The user's concurrency slot, released when the request ends.
    _permit: Option<ConcurrencyPermit>,
}

/// Why `handle` stopped early.
enum Stop {
    /// Answer with a provider-shaped error (nothing has been sent to the client yet).
    Refuse(Refusal),
    /// The response was cut after it started (client gone, upstream reset or timeout): close the
    /// connection without a clean end so the client sees the break.
    Broken(Box<Error>),
}

impl From<Refusal> for Stop {
    fn from(r: Refusal) -> Stop {
        Stop::Refuse(r)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    /// Runs the whole pipeline; always answers the client itself, so pingora's upstream phases
    /// never run. An `Err` means the response broke after it started.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        match self.handle(session, ctx).await {
            Ok(()) => Ok(true),
            Err(Stop::Refuse(refusal)) => {
                let format = self.error_format_for(session);
                self.refuse(session, format, &refusal).await;
                Ok(true)
            }
            Err(Stop::Broken(e)) => Err(e),
        }
    }

    /// Never reached: `request_filter` always answers. Kept to satisfy the trait.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        Err(Error::explain(
            ErrorType::InternalError,
            "the gateway answers every request in request_filter",
        ))
    }

    /// Only reached for a response that broke mid-way: nothing more can be said to the client.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        _e: &Error,
        _ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if session.response_written().is_none() {
            let format = self.error_format_for(session);
            let refusal = Refusal::new(
                RefusalKind::UpstreamUnreachable,
                "the gateway could not complete the request",
            );
            self.refuse(session, format, &refusal).await;
        }
        FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        }
    }

    /// Breaks are recorded on the interception; pingora's own error line would only repeat them.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    /// Closes the interception (on success, refusal after start, client abort or upstream break).
    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(open) = ctx.interception.take() {
            Box::pin(self.close_interception(*open)).await;
        }
    }
}

impl Gateway {
    /// The phases in order (see the module doc). `Err` stops the request: a refusal before
    /// anything was sent to the client, or a response that broke after it started.
    async fn handle(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), Stop> {
        let routed = self.route(session)?;
        if self.tunnel_key.is_some() {
            metrics::counter!(metric::MITM_REQUESTS_TOTAL, "provider" => routed.route.name.clone())
                .increment(1);
        }
        // The credential headers, read once: who is calling, and with which provider key.
        let presented = PresentedCredentials::read(&session.req_header().headers);
        let (principal, key_source) = self
            .authenticate(session, &routed.route, &presented)
            .await?;
        ctx._permit = Some(
            self.state
                .governance
                .check_rate(principal.user_id)
                .map_err(|denial| denial_refusal(denial, None))?,
        );
        let config = self.state.config();
        // pingora applies both to each read or write: a client may take long overall, but
        // not stall for long.
        session.set_read_timeout(Some(config.server.client_body_timeout));
        session.set_write_timeout(Some(config.server.client_write_timeout));
        let body = read_body(
            session,
            config.limits.max_body_bytes,
            config.server.client_body_timeout,
        )
        .await?;
        let credential = self
            .credential(&routed.route, presented, key_source, &principal)
            .await?;
        let endpoint = match routed.target {
            Target::Intercept(endpoint) => endpoint,
            Target::Passthrough => {
                metrics::counter!(metric::PASSTHROUGH_TOTAL, "provider" => routed.route.name.clone()).increment(1);
                return self
                    .exchange(session, None, &routed, body, &credential)
                    .await;
            }
        };
        let request = routed
            .route
            .adapter
            .parse_request(endpoint, &body)
            .map_err(|e| Refusal::new(RefusalKind::BadRequest, e.to_string()))?;
        let upstream_body = match routed
            .route
            .adapter
            .rewrite_request(endpoint, &body, &request)
        {
            Some(rewritten) => Bytes::from(rewritten),
            None => body,
        };
        let Admitted { admission, breaker } = self
            .admit(&routed.route, &principal, &request, &upstream_body)
            .await?;
        let mut open = Box::new(
            self.open_interception(session, &routed, endpoint, request, principal, &credential)
                .await,
        );
        open.admission = Some(admission);
        open.body = upstream_body.clone();
        open.breaker = breaker;
        ctx.interception = Some(open);
        self.exchange(
            session,
            ctx.interception.as_deref_mut(),
            &routed,
            upstream_body,
            &credential,
        )
        .await
    }
}
