//! Intake: the phases before anything is judged: which provider route and API the path names,
//! who is calling (the Tollgate key), and the request body, whole and bounded.
//!
//! Not here: the key policy (`credential`), limits and budgets (`admit`), the rendering of a
//! refusal (`refusal`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::ErrorType;

use super::refusal::{Refusal, RefusalKind};
use super::{Gateway, ROUTE_PREFIX};
use crate::auth::{KeySource, PresentedCredentials};
use crate::providers::{Endpoint, ErrorFormat, ProviderKind, RouteMatch};
use crate::store::{contains_tollgate_key, Principal};
use crate::upstream::ProviderRoute;

/// What a routed request is for (an unknown path never gets this far).
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    /// An API the gateway understands: parsed, governed and recorded.
    Intercept(Endpoint),
    /// Any other route of the provider: relayed as it is.
    Passthrough,
}

/// A request routed to a provider: which one, what API, and the path to send upstream.
pub(super) struct Routed {
    pub(super) route: Arc<ProviderRoute>,
    pub(super) target: Target,
    /// Path after the provider prefix, with the query string.
    pub(super) rest: String,
}

impl Gateway {
    /// Phase 1 (intake): which provider and which of its APIs the path names (404 otherwise).
    pub(super) fn route(&self, session: &Session) -> Result<Routed, Refusal> {
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
        let target = match route.adapter.route(&req.method, rest_path) {
            RouteMatch::Intercept(endpoint) => Target::Intercept(endpoint),
            RouteMatch::Passthrough => Target::Passthrough,
            RouteMatch::NotFound => {
                return Err(Refusal::new(
                    RefusalKind::NotFound,
                    format!(
                        "{} {} is not a route of provider {}",
                        req.method, rest_path, route.name
                    ),
                ))
            }
        };
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

    /// Phase 1 (intake): the Tollgate key → principal (401 when missing, unknown or revoked).
    pub(super) async fn authenticate(
        &self,
        session: &Session,
        route: &ProviderRoute,
        presented: &PresentedCredentials,
    ) -> Result<(Arc<Principal>, KeySource), Refusal> {
        let found = match &self.tunnel_key {
            // Inside a CONNECT tunnel the proxy credentials say who is calling; the request's own
            // Authorization/x-api-key are the client's provider credentials.
            Some(key) => Some((key.as_str(), KeySource::ProxyCredentials)),
            None => presented
                .tollgate_key()
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
            .resolve(secret, client, &self.state.store, &self.state.db)
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

    pub(super) fn error_format_for(&self, session: &Session) -> ErrorFormat {
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
}

/// Phase 1 (intake): the request body, whole and bounded (413 past `max`), read before anything
/// is sent upstream.
pub(super) async fn read_body(
    session: &mut Session,
    max: usize,
    stall: Duration,
) -> Result<Bytes, Refusal> {
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
