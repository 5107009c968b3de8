//! The gateway pipeline: one pingora `ProxyHttp` serving every provider route.
//!
//! A request goes through these phases, each a function below, in this order:
//! [`Gateway::route`] (provider and API from the path) → [`Gateway::authenticate`] (Tollgate key
//! → principal) → [`read_body`] (bounded) → [`Gateway::credential`] (key policy) → parse the body
//! (provider adapter) → [`Gateway::open_interception`] (client, session, thread) →
//! [`Gateway::exchange`] (upstream call, response streamed through the parser chunk by chunk) →
//! [`Gateway::close_interception`] (cost, metrics, logs, recorder queue).
//!
//! The whole exchange runs inside `request_filter` with pingora's connector, rather than in
//! pingora's own upstream phases, because the body must be read and judged *before* anything is
//! sent upstream: a refusal (400/401/402/403/413/429) never contacts the provider, and pingora
//! replays at most 64 KiB of a body that was read early.
//!
//! Not here: provider wire formats (`providers`), key storage (`store`), pricing (`governance`).

mod head_deadline;
mod listener;
mod refusal;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Utc};
use http::HeaderMap;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession as UpstreamSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{presented_key, KeySource};
use crate::clients::{self, ClientInfo};
use crate::config::KeyPolicyConfig;
use crate::governance::budget::LimitScope;
use crate::governance::estimate::{self, EstimateInput};
use crate::governance::limits::ConcurrencyPermit;
use crate::governance::{Admission, Charge, CostRequest, Denial, Settlement};
use crate::lineage::ThreadLink;
use crate::money::NanoUsd;
use crate::providers::{
    CredentialHeader, Endpoint, ErrorFormat, ParsedRequest, ProviderKind, ResponseParser,
    ResponseSummary, RouteMatch, TokenUsage, UsageChunkStripper, UsageSource,
};
use crate::store::{
    contains_tollgate_key, mask_secret, CredentialKind, InterceptionRecord, InterceptionStatus,
    Principal,
};
use crate::telemetry::{self, metric};
use crate::upstream::keypool::{self, Failover, NoKey};
use crate::upstream::{self, breaker, ProviderRoute};

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

/// An interception between its start and its record.
struct OpenInterception {
    id: Uuid,
    started: Instant,
    started_at: DateTime<Utc>,
    route: Arc<ProviderRoute>,
    endpoint: Endpoint,
    request: ParsedRequest,
    principal: Arc<Principal>,
    client: ClientInfo,
    thread: Option<ThreadLink>,
    credential_kind: CredentialKind,
    credential_hint: Option<String>,
    admission: Option<Admission>,
    /// The body as it went upstream: what an estimate of input tokens reads.
    body: Bytes,
    /// The request was (or may have been) delivered to the upstream, which then bills it.
    request_sent: bool,
    /// The client has the whole answer (its final event or last byte was written): nothing it
    /// does afterwards makes the interception anything but `completed`.
    delivered: bool,
    /// The circuit breaker's permission, reported with the upstream's answer.
    breaker: Option<breaker::Ticket>,
    parser: Option<Box<dyn ResponseParser>>,
    /// What the parser found, once the response is complete (or cut).
    summary: Option<ResponseSummary>,
    /// What was charged, set together with `summary`.
    settled: Option<Settled>,
    streaming: bool,
    upstream_status: Option<u16>,
    ttfb: Option<Duration>,
    /// Time spent waiting on the upstream (connect, head, body reads).
    upstream_wait: Duration,
    status: Option<InterceptionStatus>,
    error: Option<String>,
    /// First bytes of an upstream error body, for the record.
    error_body: Vec<u8>,
}

/// An interception's usage and what it cost.
struct Settled {
    usage: TokenUsage,
    source: UsageSource,
    settlement: Settlement,
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

/// A request routed to a provider: which one, what API, and the path to send upstream.
struct Routed {
    route: Arc<ProviderRoute>,
    target: RouteMatch,
    /// Path after the provider prefix, with the query string.
    rest: String,
}

/// The upstream credential chosen by the key policy.
struct Credential {
    key: Option<String>,
    kind: CredentialKind,
    /// Masked for the record (`sk-…abcd`).
    hint: Option<String>,
    /// Index in the provider's central key pool (pooled keys fail over; personal keys do not).
    pool_slot: Option<usize>,
}

/// Upper bound of an upstream error body kept for the record.
const ERROR_BODY_KEEP: usize = 2048;

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
    async fn handle(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<(), Stop> {
        let routed = self.route(session)?;
        if self.tunnel_key.is_some() {
            metrics::counter!(metric::MITM_REQUESTS_TOTAL, "provider" => routed.route.name.clone())
                .increment(1);
        }
        let (principal, key_source) = self.authenticate(session, &routed.route).await?;
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
            .credential(
                &routed.route,
                &session.req_header().headers,
                key_source,
                &principal,
            )
            .await?;
        let endpoint = match routed.target {
            RouteMatch::Intercept(endpoint) => endpoint,
            RouteMatch::Passthrough => {
                metrics::counter!(metric::PASSTHROUGH_TOTAL, "provider" => routed.route.name.clone()).increment(1);
                return self
                    .exchange(session, None, &routed, body, &credential)
                    .await;
            }
            RouteMatch::NotFound => unreachable!("route() refuses unknown paths"),
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
        let breaker_ticket = routed
            .route
            .breakers
            .admit(&request.model)
            .map_err(|wait| circuit_open_refusal(&routed.route.name, &request.model, wait))?;
        let cost_request = CostRequest {
            model: &request.model,
            price_family: routed.route.kind.price_family(),
            body_bytes: body_len(&upstream_body),
            max_output_tokens: request.max_output_tokens,
            choices: request.choices,
            input: &request.input,
        };
        let admission = self
            .state
            .governance
            .admit(&principal, &cost_request, Utc::now())
            .map_err(|denial| denial_refusal(denial, request.input.unseen.as_ref()))?;
        let admission = self
            .state
            .governance
            .admit_shared(admission)
            .await
            .map_err(|denial| denial_refusal(denial, request.input.unseen.as_ref()))?;
        let mut open = Box::new(
            self.open_interception(session, &routed, endpoint, request, principal, &credential)
                .await,
        );
        open.admission = Some(admission);
        open.body = upstream_body.clone();
        open.breaker = breaker_ticket;
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

    /// Phase 1: which provider and which of its APIs the path names (404 otherwise).
    fn route(&self, session: &Session) -> Result<Routed, Refusal> {
        let req = session.req_header();
        let path = req.uri.path();
        let query = req.uri.query();
        let (route, rest_path) = match &self.fixed_provider {
            // The tunnel was opened on an earlier configuration: use the reloaded route of the
            // same name when there is one.
            Some(p) => (
                self.state.provider(&p.name).unwrap_or_else(|| p.clone()),
                path,
            ),
            None => {
                let tail = path
                    .strip_prefix(ROUTE_PREFIX)
                    .or_else(|| path.strip_prefix('/'))
                    .unwrap_or("");
                let (name, rest) = match tail.find('/') {
                    Some(i) => (&tail[..i], &tail[i..]),
                    None => (tail, "/"),
                };
                match self.state.provider(name) {
                    Some(p) => (p.clone(), rest),
                    None => {
                        return Err(Refusal::new(
                            RefusalKind::NotFound,
                            format!("no provider route at {path}"),
                        ))
                    }
                }
            }
        };
        let target = route.adapter.route(&req.method, rest_path);
        if target == RouteMatch::NotFound {
            return Err(Refusal::new(
                RefusalKind::NotFound,
                format!(
                    "{} {} is not a route of provider {}",
                    req.method, rest_path, route.name
                ),
            ));
        }
        let rest = match query {
            // The path goes upstream as it is: a Tollgate key in it would reach the provider.
            Some(q) if contains_tollgate_key(q) => {
                return Err(Refusal::new(
                    RefusalKind::BadRequest,
                    "the query string carries a Tollgate key, which is never sent to a provider: send it in a header (Authorization, x-api-key or X-Tollgate-Key)",
                ))
            }
            Some(q) => format!("{rest_path}?{q}"),
            None => rest_path.to_string(),
        };
        Ok(Routed {
            route,
            target,
            rest,
        })
    }

    /// Phase 2: the Tollgate key → principal (401 when missing, unknown or revoked).
    async fn authenticate(
        &self,
        session: &Session,
        route: &ProviderRoute,
    ) -> Result<(Arc<Principal>, KeySource), Refusal> {
        let headers = &session.req_header().headers;
        let found = match &self.tunnel_key {
            // Inside a CONNECT tunnel the proxy credentials say who is calling; the request's own
            // Authorization/x-api-key are the client's provider credentials.
            Some(key) => Some((key.clone(), KeySource::ProxyCredentials)),
            None => presented_key(headers)
                // Copilot's Authorization is the user's GitHub token, never a Tollgate key.
                .filter(|(_, source)| {
                    route.kind != ProviderKind::Copilot || *source == KeySource::TollgateHeader
                }),
        };
        let Some((secret, source)) = found else {
            let hint = if route.kind == ProviderKind::Copilot {
                "missing Tollgate key: send it in X-Tollgate-Key (or as the proxy password)"
            } else {
                "missing Tollgate key: send it as Authorization: Bearer, x-api-key or X-Tollgate-Key"
            };
            return Err(Refusal::new(RefusalKind::Unauthenticated, hint));
        };
        let client = Self::client_of(session);
        match self
            .state
            .keys
            .resolve(&secret, client, &self.state.store, &self.state.db)
            .await
        {
            Ok(Some(p)) => Ok((p, source)),
            Ok(None) => Err(Refusal::new(
                RefusalKind::Unauthenticated,
                "invalid or revoked Tollgate key",
            )),
            Err(crate::auth::KeyCheckError::Throttled(throttled)) => {
                Err(Self::throttled_refusal(throttled))
            }
            Err(crate::auth::KeyCheckError::Store(e)) => {
                tracing::error!(error = %e, "key lookup failed");
                Err(Refusal::new(
                    RefusalKind::StoreUnavailable,
                    "Tollgate cannot check this key right now (database unavailable); retry shortly",
                )
                .with_header("retry-after", "5"))
            }
        }
    }

    /// The address a request came from (inside a proxy tunnel: the tunnel's client), for the
    /// per-address limit on failed authentication.
    fn client_of(session: &Session) -> crate::front_door::ClientKey {
        let ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        crate::front_door::ClientKey::of(ip)
    }

    /// 429 in the provider's format for an address that failed authentication too often: its
    /// key was not looked up.
    fn throttled_refusal(throttled: crate::auth::failures::Throttled) -> Refusal {
        let secs = throttled.retry_after.as_secs().max(1);
        Refusal::new(
            RefusalKind::RateLimited,
            format!("too many failed authentications from this address; retry in {secs} s"),
        )
        .with_header("retry-after", secs.to_string())
        .with_code("too_many_failed_authentications")
    }

    /// Phase 4: the key policy (contract truth table) picks the upstream credential.
    async fn credential(
        &self,
        route: &ProviderRoute,
        headers: &HeaderMap,
        source: KeySource,
        principal: &Principal,
    ) -> Result<Credential, Refusal> {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().to_string())
        };
        let bearer = text("authorization").and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
                .map(|t| t.trim().to_string())
        });
        if route.adapter.credential_header() == CredentialHeader::ClientAuthorization {
            // Copilot: the client's own GitHub token is always the credential.
            if bearer.as_deref().is_some_and(contains_tollgate_key) {
                return Err(Refusal::new(
                    RefusalKind::KeyPolicy,
                    "Authorization carries a Tollgate key: copilot requests need the client's own GitHub token there, and the Tollgate key in X-Tollgate-Key (or as the proxy password)",
                ));
            }
            return match bearer.filter(|t| !t.is_empty()) {
                Some(token) => Ok(Credential {
                    hint: Some(mask_secret(&token)),
                    key: Some(token),
                    kind: CredentialKind::Byok,
                    pool_slot: None,
                }),
                None => Err(Refusal::new(
                    RefusalKind::KeyPolicy,
                    "copilot requests must carry the client's own GitHub token in Authorization",
                )),
            };
        }
        // Only with the Tollgate key in its own header do Authorization/x-api-key carry a user key,
        // and a Tollgate key there is not one (clients configured with their Tollgate key, then
        // moved behind the proxy, send it both ways): it is never sent to a provider.
        let user_key = if matches!(
            source,
            KeySource::TollgateHeader | KeySource::ProxyCredentials
        ) {
            bearer
                .or_else(|| text("x-api-key"))
                .filter(|k| !k.is_empty() && !contains_tollgate_key(k))
        } else {
            None
        };
        // A key the user stored is the fallback for one sent with the request.
        let user_key = match user_key {
            Some(k) => Some(k),
            None if self.state.config().keys.allow_user_api_key => {
                self.stored_key(principal.user_id, &route.name).await
            }
            None => None,
        };
        choose_credential(self.state.config().keys, user_key, || {
            central_credential(route)
        })
    }

    /// The user's stored provider key for `provider`, decrypted (cached briefly).
    async fn stored_key(&self, user: Uuid, provider: &str) -> Option<String> {
        let vault = self.state.vault.as_ref()?;
        if let Some(hit) = self.state.stored_keys.get(user, provider) {
            return hit;
        }
        let store = self.state.store.clone();
        let name = provider.to_string();
        let sealed = self
            .state
            .db
            .spawn(async move { store.sealed_provider_key(user, &name).await })
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::error!(error = %e, "stored key lookup failed"))
                    .ok()
            })
            .flatten();
        let key = sealed.and_then(|row| {
            let sealed = crate::governance::keyvault::Sealed {
                nonce: row.nonce,
                ciphertext: row.ciphertext,
            };
            vault
                .open(&user.to_string(), provider, &sealed)
                .map_err(|e| tracing::error!(error = %e, provider, "stored provider key unusable"))
                .ok()
        });
        self.state.stored_keys.put(user, provider, key.clone());
        key
    }

    /// Phase 5: the interception starts: who, which client and session, which thread.
    async fn open_interception(
        &self,
        session: &Session,
        routed: &Routed,
        endpoint: Endpoint,
        request: ParsedRequest,
        principal: Arc<Principal>,
        credential: &Credential,
    ) -> OpenInterception {
        let headers = &session.req_header().headers;
        let client = clients::identify(headers, request.metadata_user_id.as_deref());
        let thread = self
            .find_thread(principal.user_id, &request.tool_result_ids)
            .await;
        routed.route.series().inflight().increment(1.0);
        OpenInterception {
            id: Uuid::now_v7(),
            started: Instant::now(),
            started_at: Utc::now(),
            route: routed.route.clone(),
            endpoint,
            request,
            principal,
            client,
            thread,
            credential_kind: credential.kind,
            credential_hint: credential.hint.clone(),
            admission: None,
            body: Bytes::new(),
            request_sent: false,
            delivered: false,
            breaker: None,
            parser: None,
            summary: None,
            settled: None,
            streaming: false,
            upstream_status: None,
            ttfb: None,
            upstream_wait: Duration::ZERO,
            status: None,
            error: None,
            error_body: Vec::new(),
        }
    }

    async fn find_thread(&self, user: Uuid, tool_result_ids: &[String]) -> Option<ThreadLink> {
        for id in tool_result_ids.iter().rev() {
            if let Some(link) = self.state.threads.find(user, id) {
                return Some(link);
            }
        }
        // Not in memory (older, or produced by another replica): ask the store once.
        let last = tool_result_ids.last()?.clone();
        let store = self.state.store.clone();
        let db = &self.state.db;
        let found = self
            .state
            .store
            .on_hot_path(async move {
                db.spawn(async move { store.thread_of_tool_call(user, &last).await })
                    .await
                    .map_err(|e| {
                        crate::store::StoreError::Invalid(format!(
                            "lineage lookup task failed: {e}"
                        ))
                    })?
            })
            .await??;
        Some(ThreadLink {
            parent: found.0,
            root: found.1,
        })
    }

    /// Phase 6: the upstream call. The response head and every body chunk are relayed as they
    /// arrive; intercepted responses also pass through the provider's parser.
    async fn exchange(
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
                o.request_sent = true;
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
                            o.upstream_wait += waited.elapsed();
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
                        o.request_sent = !is_connect_failure(&e);
                        o.upstream_wait += waited.elapsed();
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
            o.ttfb = Some(o.started.elapsed());
            o.upstream_wait += waited.elapsed();
            o.upstream_status = Some(status);
            o.streaming = streaming;
            if let Some(t) = o.breaker.take() {
                if breaker::is_failure_status(status) {
                    t.failed();
                } else {
                    t.succeeded();
                }
            }
            if status < 400 {
                o.parser = Some(route.adapter.response_parser(o.endpoint, streaming));
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
                o.upstream_wait += read_started.elapsed();
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
                match o.parser.as_mut() {
                    Some(p) => {
                        p.feed(&chunk);
                        final_event = p.ended();
                    }
                    None if o.error_body.len() < ERROR_BODY_KEEP => {
                        let keep = (ERROR_BODY_KEEP - o.error_body.len()).min(chunk.len());
                        o.error_body.extend_from_slice(&chunk[..keep]);
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
                    Box::pin(self.settle(o)).await;
                    if let Some(s) = &o.settled {
                        self.state
                            .governance
                            .settle_shared(&s.settlement.charge, s.settlement.cost)
                            .await;
                    }
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
                    o.delivered = true;
                }
            }
        }
        if let Some(o) = open.as_deref_mut() {
            Box::pin(self.settle(o)).await;
            if o.status.is_none() {
                o.status = Some(if status >= 400 {
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

    /// The response is over (complete or cut): takes the parser's findings, makes its tool
    /// calls known to thread lineage right away, and charges the usage: as reported, or
    /// estimated when the response carried none but the request reached the provider (which
    /// bills it whatever the client saw; see `governance::estimate`).
    async fn settle(&self, open: &mut OpenInterception) {
        if open.summary.is_some() {
            return;
        }
        let summary = open
            .parser
            .take()
            .map(|mut p| p.finish())
            .unwrap_or_default();
        let link = ThreadLink {
            parent: open.id,
            root: open.thread.map(|t| t.root).unwrap_or(open.id),
        };
        for call in &summary.tool_calls {
            self.state
                .threads
                .remember(open.principal.user_id, &call.id, link);
        }
        let billed = open.request_sent && open.upstream_status.is_none_or(|s| s < 400);
        let estimate = match &open.admission {
            Some(admission) if billed && summary.usage.is_none() => Some(EstimateJob {
                body: open.body.clone(),
                model: summary
                    .model
                    .clone()
                    .unwrap_or_else(|| open.request.model.clone()),
                media_parts: open.request.input.media_parts,
                output_bytes: summary.output_bytes,
                bound: admission.bound,
            }),
            _ => None,
        };
        let (usage, source) = match (summary.usage, estimate, summary.partial_usage) {
            (Some(usage), _, _) => (usage, UsageSource::Reported),
            // A stream cut before its final usage may have reported part of it (Anthropic's
            // input counts come first, the output count last): what it reported stands, and
            // output is at least what the client was sent.
            (None, Some(job), Some(partial)) => {
                let estimated = estimated_usage(job).await;
                let usage = TokenUsage {
                    output: partial.output.max(estimated.output),
                    ..partial
                };
                (usage, UsageSource::Estimated)
            }
            (None, Some(job), None) => (estimated_usage(job).await, UsageSource::Estimated),
            (None, None, partial) => (partial.unwrap_or_default(), UsageSource::Absent),
        };
        // Charge now, before the client has the last byte, so its next request already sees
        // the spend (sequential requests cannot slip past a nearly spent cap).
        let settlement = match open.admission.take() {
            Some(admission) => {
                self.state
                    .governance
                    .settle(admission, &usage, summary.model.as_deref())
            }
            None => Settlement {
                price: None,
                cost: NanoUsd::ZERO,
                charge: Charge {
                    period_start: self.state.governance.period_start(Utc::now()),
                    shared_reservation: None,
                },
            },
        };
        open.settled = Some(Settled {
            usage,
            source,
            settlement,
        });
        if let Some(journal) = &self.state.journal {
            // As it stands now: the final record, if it is ever written, replaces nothing (a
            // recovered one is inserted only where the final one is missing).
            let thread_root = open.thread.map(|t| t.root);
            let session_key = session_key(&open.principal, &open.client, thread_root, open.id);
            journal.append(&journal_entry(open, &summary, &session_key));
        }
        open.summary = Some(summary);
    }

    /// Phase 7: the record. Cost (settled here if the response broke before its end), metrics,
    /// structured logs, then the recorder queue (never waits).
    async fn close_interception(&self, mut open: OpenInterception) {
        self.settle(&mut open).await;
        let summary = open.summary.take().unwrap_or_default();
        let mut record = record_of(&open, &summary, status_of(&open, open.delivered));
        record.prompt = open.request.last_user_prompt.take();
        record.tool_calls = summary.tool_calls;
        record.thoughts = summary.thoughts;
        open.route.series().inflight().decrement(1.0);
        telemetry::count_interception(
            &record,
            open.started.elapsed().as_secs_f64(),
            open.upstream_wait.as_secs_f64(),
        );
        telemetry::log_interception(&record);
        self.state.recorder.submit(record);
    }

    fn error_format_for(&self, session: &Session) -> ErrorFormat {
        if let Some(p) = &self.fixed_provider {
            return p.kind.error_format();
        }
        let path = session.req_header().uri.path();
        let tail = path
            .strip_prefix(ROUTE_PREFIX)
            .or_else(|| path.strip_prefix('/'))
            .unwrap_or("");
        let name = tail.split('/').next().unwrap_or("");
        self.state
            .provider(name)
            .map(|p| p.kind.error_format())
            .unwrap_or(ErrorFormat::OpenAi)
    }

    /// Renders a refusal in the client's provider format (the one place this happens).
    async fn refuse(&self, session: &mut Session, format: ErrorFormat, refusal: &Refusal) {
        metrics::counter!(metric::REFUSALS_TOTAL, "reason" => refusal.kind.reason()).increment(1);
        tracing::info!(
            status = refusal.status(),
            reason = refusal.kind.reason(),
            path = %session.req_header().uri.path(),
            detail = %refusal.message,
            "request refused"
        );
        let body = Bytes::from(refusal.body(format));
        let Ok(mut head) = ResponseHeader::build(refusal.status(), Some(4 + refusal.headers.len()))
        else {
            return;
        };
        let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string());
        for (name, value) in &refusal.headers {
            let _ = head.insert_header(*name, value.as_str());
        }
        if session
            .write_response_header(Box::new(head), false)
            .await
            .is_ok()
        {
            let _ = session.write_response_body(Some(body), true).await;
        }
    }
}

/// Renders a governance denial as the contract's refusal (429, 402, 403). `unseen` is why the
/// request's cost had no bound, if it had none (a 402 then says why it had to run alone).
fn denial_refusal(denial: Denial, unseen: Option<&crate::providers::UnseenInput>) -> Refusal {
    match denial {
        Denial::RateLimited { retry_after } => {
            let secs = retry_after.as_secs().max(1);
            Refusal::new(
                RefusalKind::RateLimited,
                format!("rate limit reached: too many requests per minute for this user; retry in {secs} s"),
            )
            .with_header("retry-after", secs.to_string())
        }
        Denial::TooManyInFlight { limit } => Refusal::new(
            RefusalKind::RateLimited,
            format!("too many concurrent requests: at most {limit} may be in flight per user"),
        )
        .with_header("retry-after", "1"),
        Denial::Budget { refusal, reset } => {
            let scope = match &refusal.scope {
                LimitScope::User => "your user limit".to_string(),
                LimitScope::Group(name) => format!("the limit of group {name}"),
                LimitScope::Default => "the default limit".to_string(),
            };
            let reset = reset.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let message = if refusal.spent >= refusal.cap {
                format!(
                    "spend cap reached: ${} of ${} spent this period ({scope}); the budget resets at {reset}",
                    refusal.spent, refusal.cap
                )
            } else if let Some(unseen) = unseen {
                format!(
                    "this request's cost has no bound the gateway can see (it uses {unseen}), so under a spend cap it runs only while nothing else of yours is in flight; ${} spent and ${} reserved by your in-flight requests, of ${} ({scope}); retry when they finish",
                    refusal.spent, refusal.reserved, refusal.cap
                )
            } else {
                format!(
                    "spend cap reached: ${} spent and ${} reserved by your in-flight requests, of ${} ({scope}); the budget resets at {reset}",
                    refusal.spent, refusal.reserved, refusal.cap
                )
            };
            Refusal::new(RefusalKind::BudgetExceeded, message)
                .with_header("x-tollgate-budget-reset", reset)
                .with_header("x-tollgate-budget-scope", refusal.scope.as_str())
                .with_header("x-tollgate-budget-limit", refusal.cap.to_string())
                .with_header("x-tollgate-budget-spent", refusal.spent.to_string())
        }
        Denial::Unpriced { model } => Refusal::new(
            RefusalKind::Unpriced,
            format!("model {model} has no price, and this gateway refuses unpriced models (budgets.unpriced = \"deny\")"),
        ),
        Denial::BudgetUnavailable => Refusal::new(
            RefusalKind::StoreUnavailable,
            "the budget store cannot be reached, and this gateway refuses capped requests until it is back (budgets.when_database_down = \"refuse\")",
        )
        .with_header("retry-after", "5"),
    }
}

/// `x-tollgate-budget-*` headers on every intercepted response.
pub fn budget_headers(view: &crate::governance::BudgetView) -> [(&'static str, String); 5] {
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

fn body_len(body: &Bytes) -> u64 {
    body.len() as u64
}

/// The contract's key-policy truth table; `central` is asked only when the policy uses it.
fn choose_credential(
    policy: KeyPolicyConfig,
    user_key: Option<String>,
    central: impl FnOnce() -> Result<Credential, Refusal>,
) -> Result<Credential, Refusal> {
    if !policy.allow_user_api_key {
        return central();
    }
    match user_key {
        Some(k) => Ok(Credential {
            hint: Some(mask_secret(&k)),
            key: Some(k),
            kind: CredentialKind::Byok,
            pool_slot: None,
        }),
        None if policy.central_api_key_enabled && policy.allow_central_api_key_fallback => central(),
        None => Err(Refusal::new(
            RefusalKind::KeyPolicy,
            "this provider requires your own API key: send it in Authorization or x-api-key with your Tollgate key in X-Tollgate-Key",
        )),
    }
}

/// The first usable key of the provider's central pool, or why there is none (all cooling:
/// 429 with the shortest wait; all rejected by the upstream: 503).
fn central_credential(route: &ProviderRoute) -> Result<Credential, Refusal> {
    match route.keys.pick(&[]) {
        Ok(pooled) => Ok(Credential {
            key: Some(pooled.secret),
            kind: CredentialKind::Central,
            hint: Some(pooled.hint),
            pool_slot: Some(pooled.slot),
        }),
        Err(NoKey::Unconfigured) => Err(Refusal::new(
            RefusalKind::KeyPolicy,
            format!(
                "no usable provider key: the central key for provider {} is not configured",
                route.name
            ),
        )),
        Err(NoKey::Cooling { retry_after }) => Err(keys_cooling_refusal(&route.name, retry_after)),
        Err(NoKey::Exhausted) => Err(Refusal::new(
            RefusalKind::NoUsableKey,
            format!(
                "every central key of provider {} was rejected by the upstream; an operator must replace them and reload the configuration",
                route.name
            ),
        )),
    }
}

fn keys_cooling_refusal(provider: &str, retry_after: Duration) -> Refusal {
    let secs = keypool::retry_after_secs(retry_after);
    Refusal::new(
        RefusalKind::RateLimited,
        format!("every central key of provider {provider} is rate limited by the upstream; retry in {secs} s"),
    )
    .with_header("retry-after", secs.to_string())
}

fn circuit_open_refusal(provider: &str, model: &str, wait: Duration) -> Refusal {
    let secs = keypool::retry_after_secs(wait);
    Refusal::new(
        RefusalKind::CircuitOpen,
        format!("provider {provider} is failing for model {model}: the gateway stopped sending requests for now (circuit breaker open); retry in {secs} s"),
    )
    .with_header("retry-after", secs.to_string())
}

/// Phase 3: the request body, whole and bounded (413 past `max`), read before anything is sent
/// upstream.
async fn read_body(session: &mut Session, max: usize, stall: Duration) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::new(
            RefusalKind::BodyTooLarge,
            format!("request body is larger than the {max} bytes this gateway accepts"),
        )
    };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    // A body that arrives as one chunk (the usual case) is used as it is; only a body in
    // several chunks is copied into one buffer.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                let so_far =
                    first.as_ref().map_or(0, Bytes::len) + joined.as_ref().map_or(0, BytesMut::len);
                if so_far + chunk.len() > max {
                    return Err(too_large());
                }
                match (joined.as_mut(), first.take()) {
                    (Some(buf), _) => buf.extend_from_slice(&chunk),
                    (None, None) => first = Some(chunk),
                    (None, Some(head)) => {
                        let need = head.len() + chunk.len();
                        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).max(need));
                        buf.extend_from_slice(&head);
                        buf.extend_from_slice(&chunk);
                        joined = Some(buf);
                    }
                }
            }
            Ok(None) => break,
            Err(e) if e.etype() == &ErrorType::ReadTimedout => {
                return Err(Refusal::new(
                    RefusalKind::ClientTimeout,
                    format!(
                        "the request body stalled: nothing received for {} ms (server.client_body_timeout_ms)",
                        stall.as_millis()
                    ),
                ))
            }
            Err(e) => {
                return Err(Refusal::new(
                    RefusalKind::BadRequest,
                    format!("could not read the request body: {}", e.etype().as_str()),
                ))
            }
        }
    }
    Ok(match joined {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    })
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
    if let Some(o) = open.as_deref_mut().filter(|o| !o.delivered) {
        o.status = Some(status);
        o.error = Some(message.to_string());
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

/// How an interception ended: the failure it recorded, else by the upstream's answer if the
/// client has the whole answer (`delivered`), else the client went away.
fn status_of(open: &OpenInterception, delivered: bool) -> InterceptionStatus {
    open.status
        .unwrap_or(match (delivered, open.upstream_status) {
            (true, Some(status)) if status >= 400 => InterceptionStatus::UpstreamError,
            (true, _) => InterceptionStatus::Completed,
            (false, _) => InterceptionStatus::ClientAborted,
        })
}

/// The record of a settled interception, without its text (prompt, tool calls, thoughts),
/// which the caller adds if it keeps them.
fn record_of(
    open: &OpenInterception,
    summary: &ResponseSummary,
    status: InterceptionStatus,
) -> InterceptionRecord {
    let settled = open
        .settled
        .as_ref()
        .expect("records are made of settled interceptions");
    let error = open.error.clone().or_else(|| {
        (!open.error_body.is_empty())
            .then(|| String::from_utf8_lossy(&open.error_body).into_owned())
    });
    let thread_root = open.thread.map(|t| t.root);
    InterceptionRecord {
        id: open.id,
        user_id: open.principal.user_id,
        api_key_id: Some(open.principal.api_key_id),
        provider: open.route.name.clone(),
        provider_kind: open.route.kind.as_str(),
        endpoint: endpoint_name(open.endpoint),
        model: open.request.model.clone(),
        response_model: summary.model.clone(),
        client: open.client.client.as_str(),
        client_session_id: open.client.session_id.clone(),
        session_key: session_key(&open.principal, &open.client, thread_root, open.id),
        thread_parent_id: open.thread.map(|t| t.parent),
        thread_root_id: thread_root,
        credential_kind: open.credential_kind,
        credential_hint: open.credential_hint.clone(),
        status,
        upstream_status: open.upstream_status,
        error,
        streaming: open.streaming,
        started_at: open.started_at,
        ended_at: Utc::now(),
        ttfb_ms: open.ttfb.map(|d| d.as_millis() as u64),
        response_id: summary.response_id.clone(),
        usage: settled.usage,
        usage_source: settled.source,
        prompt: None,
        tool_calls: Vec::new(),
        thoughts: Vec::new(),
        cost: settled.settlement.cost,
        price: settled.settlement.price,
        spend_period_start: settled.settlement.charge.period_start,
        shared_reservation: settled.settlement.charge.shared_reservation,
    }
}

/// A settled interception as the spend journal keeps it (borrowing what `open` holds).
fn journal_entry<'a>(
    open: &'a OpenInterception,
    summary: &'a ResponseSummary,
    session_key: &'a str,
) -> crate::store::JournalEntry<&'a str> {
    let settled = open
        .settled
        .as_ref()
        .expect("journal entries are made of settled interceptions");
    crate::store::JournalEntry {
        id: open.id.as_u64_pair(),
        user_id: open.principal.user_id.as_u64_pair(),
        api_key_id: Some(open.principal.api_key_id.as_u64_pair()),
        provider: &open.route.name,
        provider_kind: open.route.kind.as_str(),
        endpoint: endpoint_name(open.endpoint),
        model: &open.request.model,
        response_model: summary.model.as_deref(),
        client: open.client.client.as_str(),
        client_session_id: open.client.session_id.as_deref(),
        session_key,
        thread_parent_id: open.thread.map(|t| t.parent.as_u64_pair()),
        thread_root_id: open.thread.map(|t| t.root.as_u64_pair()),
        credential_kind: open.credential_kind,
        credential_hint: open.credential_hint.as_deref(),
        status: status_of(open, true),
        upstream_status: open.upstream_status,
        error: open.error.as_deref(),
        streaming: open.streaming,
        started_ms: open.started_at.timestamp_millis(),
        ended_ms: Utc::now().timestamp_millis(),
        ttfb_ms: open.ttfb.map(|d| d.as_millis() as u64),
        response_id: summary.response_id.as_deref(),
        usage: settled.usage,
        usage_source: settled.source,
        cost: settled.settlement.cost.0,
        price: settled.settlement.price,
        spend_period_ms: settled.settlement.charge.period_start.timestamp_millis(),
        shared_reservation: settled
            .settlement
            .charge
            .shared_reservation
            .map(|r| r.as_u64_pair()),
    }
}

/// A session groups one user's interceptions: the client's session id (scoped to the user, so
/// another user reusing it starts a session of their own), else the thread root, else the
/// interception itself (both ids of the user's own interceptions).
fn session_key(
    principal: &Principal,
    client: &ClientInfo,
    thread_root: Option<Uuid>,
    own_id: Uuid,
) -> String {
    match (&client.session_id, thread_root) {
        (Some(client_session), _) => format!("{}:{client_session}", principal.user_id),
        (None, Some(root)) => root.to_string(),
        (None, None) => own_id.to_string(),
    }
}

/// What the blocking pool needs to estimate usage.
struct EstimateJob {
    body: Bytes,
    model: String,
    media_parts: u32,
    output_bytes: u64,
    bound: crate::governance::pricing::CostBound,
}

/// Usage estimated on the blocking pool (tokenizing is CPU work the gateway's threads must
/// not do); if the estimate fails, the request's whole bound.
async fn estimated_usage(job: EstimateJob) -> TokenUsage {
    let bound = job.bound;
    let run = move || {
        estimate::estimate_usage(&EstimateInput {
            body: &job.body,
            model: &job.model,
            media_parts: job.media_parts,
            output_bytes: job.output_bytes,
            bound: job.bound,
        })
    };
    match tokio::task::spawn_blocking(run).await {
        Ok(usage) => usage,
        Err(e) => {
            tracing::error!(error = %e, "usage estimate failed; charging the request's bound");
            TokenUsage {
                input: bound.input_tokens,
                output: bound.output_tokens,
                ..TokenUsage::default()
            }
        }
    }
}

fn endpoint_name(e: Endpoint) -> &'static str {
    match e {
        Endpoint::ChatCompletions => "chat_completions",
        Endpoint::Responses => "responses",
        Endpoint::Messages => "messages",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(c: bool, u: bool, f: bool) -> KeyPolicyConfig {
        KeyPolicyConfig {
            central_api_key_enabled: c,
            allow_user_api_key: u,
            allow_central_api_key_fallback: f,
        }
    }

    #[test]
    fn key_policy_truth_table() {
        let user = || Some("sk-user".to_string());
        let central = || {
            Ok(Credential {
                key: Some("sk-central".into()),
                kind: CredentialKind::Central,
                hint: None,
                pool_slot: Some(0),
            })
        };
        let pick = |p, u| choose_credential(p, u, central).map(|c| (c.key.unwrap(), c.kind));
        // C=1 U=0 F=0: the user key is ignored.
        assert_eq!(
            pick(policy(true, false, false), user()).unwrap(),
            ("sk-central".into(), CredentialKind::Central)
        );
        assert_eq!(
            pick(policy(true, false, false), None).unwrap().1,
            CredentialKind::Central
        );
        // C=0 U=1 F=0 and C=1 U=1 F=0: user's, else 403.
        for p in [policy(false, true, false), policy(true, true, false)] {
            assert_eq!(
                pick(p, user()).unwrap(),
                ("sk-user".into(), CredentialKind::Byok)
            );
            assert_eq!(pick(p, None).unwrap_err().kind, RefusalKind::KeyPolicy);
        }
        // C=1 U=1 F=1: user's, else central.
        assert_eq!(
            pick(policy(true, true, true), user()).unwrap().1,
            CredentialKind::Byok
        );
        assert_eq!(
            pick(policy(true, true, true), None).unwrap().1,
            CredentialKind::Central
        );
    }
}
