//! Who is looking at the dashboard: server-side sessions opened by signing in with a Tollgate
//! key, and the CSRF token every POST form must carry.
//!
//! Signing in checks the key (through the same key cache and per-address failure limit as the
//! API) and opens a session ([`crate::store::DashboardSession`]): the cookie
//! (`HttpOnly; SameSite=Strict`) holds a random 256-bit session id, never the key, and the
//! database only the id's SHA-256. A session ends when its user signs out (the row is
//! deleted, so a copied cookie stops working at once), when it has been idle for
//! `auth.dashboard_idle_minutes` or is `auth.dashboard_max_hours` old, when the key it was
//! opened with is revoked, and when its user is deleted; every page checks all of that in one
//! query. Unknown session ids count as failed authentication for the client's address.
//!
//! The CSRF token is a hash of the session id under a purpose prefix: bound to the session,
//! computable only by someone holding the id (which lives in the HttpOnly cookie), and the same
//! on every replica, so a form rendered by one is accepted by another behind a load balancer.
//! SameSite=Strict already keeps other sites' forms from sending the cookie; the token is the
//! second lock.
//!
//! Not here: the pages (`dashboard`), key resolution (`crate::auth`), the session rows
//! (`crate::store`).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::auth::{client_of, Admin, Caller};
use crate::app::AppState;
use crate::auth::failures::Throttled;
use crate::auth::KeyCheckError;
use crate::front_door::ClientKey;
use crate::store::{Principal, StoreError};

pub const COOKIE: &str = "tollgate_dashboard";

/// Hex characters of a session id (32 random bytes).
const SESSION_ID_LEN: usize = 64;
/// A session's last use is written at most this often (each page would otherwise be a write).
const TOUCH_EVERY: chrono::Duration = chrono::Duration::seconds(60);

/// A signed-in user of the dashboard.
pub struct Viewer {
    pub principal: Arc<Principal>,
    /// The CSRF token of this session, put in every form.
    pub csrf: String,
    /// The session's id hash (sign-out deletes it).
    session: [u8; 32],
}

/// Why no dashboard session could be opened or found.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("the key is not valid, or it was revoked")]
    BadKey,
    #[error(transparent)]
    Throttled(Throttled),
    #[error("the database could not answer: {0}")]
    Store(#[from] StoreError),
}

impl Viewer {
    pub fn caller(&self) -> Caller {
        Caller(self.principal.clone())
    }

    pub fn is_admin(&self) -> bool {
        self.principal.is_admin
    }

    /// The admin view of this viewer, or the 403 page for a member.
    // The error is the page the handler returns as is, once per request; boxing buys nothing.
    #[allow(clippy::result_large_err)]
    pub fn admin(&self) -> Result<Admin, Response> {
        if self.principal.is_admin {
            Ok(Admin(self.principal.clone()))
        } else {
            Err(super::error_page(
                StatusCode::FORBIDDEN,
                "This page is for administrators.",
            ))
        }
    }

    /// Refuses a form whose token is missing or not this session's.
    #[allow(clippy::result_large_err)]
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), Response> {
        let ok = presented.is_some_and(|t| bool::from(t.as_bytes().ct_eq(self.csrf.as_bytes())));
        if ok {
            Ok(())
        } else {
            Err(super::error_page(
                StatusCode::FORBIDDEN,
                "This form has expired or did not come from this dashboard. Reload the page and try again.",
            ))
        }
    }

    /// Ends this session (sign-out): its cookie, wherever it was copied, stops working.
    pub async fn sign_out(&self, state: &AppState) -> Result<(), StoreError> {
        state.store.end_dashboard_session(&self.session).await?;
        Ok(())
    }
}

/// The form token of a session: a hash of its id under a purpose prefix (see the module docs).
fn csrf_token(session_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"tollgate-dashboard-csrf\0");
    h.update(session_id.as_bytes());
    hex::encode(h.finalize())
}

/// What the database keeps of a session id. The prefix keeps it distinct from key hashes.
fn session_hash(session_id: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"tollgate-dashboard-session\0");
    h.update(session_id.as_bytes());
    h.finalize().into()
}

/// The session id in the dashboard cookie, if there is one of the right shape.
fn cookie_session(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then(|| value.to_string())
        })
        .filter(|v| v.len() == SESSION_ID_LEN && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `Secure` only when a TLS-terminating proxy in front says the browser used HTTPS: the admin
/// listener itself speaks plain HTTP, and a Secure cookie would never come back over it.
fn secure(headers: &HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    if https {
        "; Secure"
    } else {
        ""
    }
}

/// The cookie of a new session; it lasts as long as the session can.
pub fn set_cookie(headers: &HeaderMap, session_id: &str, max_age: std::time::Duration) -> String {
    format!(
        "{COOKIE}={session_id}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.as_secs(),
        secure(headers)
    )
}

pub fn clear_cookie(headers: &HeaderMap) -> String {
    format!(
        "{COOKIE}=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure(headers)
    )
}

/// False when a browser says the form came from another site: its `Origin` names a different
/// host than the one it sent the form to, or is `null` (what a browser sends for a cross-site
/// form under a strict referrer policy; the dashboard's own pages use `same-origin`, so their
/// forms carry the real origin). The sign-in form has no session (and so no CSRF token) yet,
/// and this keeps another site from signing a visitor in with the attacker's key. No `Origin`
/// (a non-browser client) passes.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    !host.is_empty() && origin_host == Some(host)
}

/// Checks `key` (presented from `client`) and opens a session for its owner; returns the new
/// session id, for the cookie.
pub async fn sign_in(
    state: &AppState,
    key: &str,
    client: ClientKey,
) -> Result<String, SignInError> {
    let principal = match state
        .keys
        .resolve(key, client, &state.store, &state.db)
        .await
    {
        Ok(Some(principal)) => principal,
        Ok(None) => return Err(SignInError::BadKey),
        Err(KeyCheckError::Throttled(t)) => return Err(SignInError::Throttled(t)),
        Err(KeyCheckError::Store(e)) => return Err(e.into()),
    };
    let auth = state.config().auth;
    let now = Utc::now();
    let mut raw = [0u8; SESSION_ID_LEN / 2];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let session_id = hex::encode(raw);
    let max_age = chrono::Duration::from_std(auth.dashboard_max_age).unwrap_or_default();
    state
        .store
        .create_dashboard_session(&session_hash(&session_id), &principal, now, now + max_age)
        .await?;
    // Sign-ins are rare: a good moment to drop sessions nobody can use any more.
    let idle = chrono::Duration::from_std(auth.dashboard_idle).unwrap_or_default();
    if let Err(e) = state.store.purge_dashboard_sessions(now, now - idle).await {
        tracing::warn!(error = %e, "purging ended dashboard sessions failed");
    }
    Ok(session_id)
}

/// The viewer behind a request's session cookie: `Ok(None)` when there is no valid session.
pub async fn viewer(
    state: &AppState,
    headers: &HeaderMap,
    client: ClientKey,
) -> Result<Option<Viewer>, SignInError> {
    let Some(session_id) = cookie_session(headers) else {
        return Ok(None);
    };
    // An unknown session id is a failed authentication: spent before the lookup, given back
    // when the session is found (or the database could not say).
    let failures = state.keys.failures();
    failures.take(client).map_err(SignInError::Throttled)?;
    let hash = session_hash(&session_id);
    let now = Utc::now();
    let idle = chrono::Duration::from_std(state.config().auth.dashboard_idle).unwrap_or_default();
    let found = state.store.dashboard_session(&hash, now, now - idle).await;
    if !matches!(found, Ok(None)) {
        failures.refund(client);
    }
    let Some(session) = found? else {
        return Ok(None);
    };
    if now - session.last_seen_at >= TOUCH_EVERY {
        state.store.touch_dashboard_session(&hash, now).await?;
    }
    Ok(Some(Viewer {
        principal: Arc::new(session.principal),
        csrf: csrf_token(&session_id),
        session: hash,
    }))
}

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match viewer(state, &parts.headers, client_of(parts)).await {
            Ok(Some(viewer)) => Ok(viewer),
            Ok(None) => Err(Redirect::to("/dashboard/sign-in").into_response()),
            Err(e) => Err(refusal_page(&e)),
        }
    }
}

/// The page for a sign-in or session check that could not be made.
pub fn refusal_page(e: &SignInError) -> Response {
    match e {
        SignInError::BadKey => super::error_page(
            StatusCode::UNAUTHORIZED,
            "That key is not valid, or it was revoked.",
        ),
        SignInError::Throttled(t) => {
            let mut page = super::error_page(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed sign-ins from this address. Wait a minute and try again.",
            );
            let secs = t.retry_after.as_secs().max(1);
            page.headers_mut().insert(header::RETRY_AFTER, secs.into());
            page
        }
        SignInError::Store(e) => {
            tracing::error!(error = %e, "dashboard session lookup failed");
            super::error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database could not answer; try again shortly.",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_session_ids_are_read_from_the_cookie() {
        let mut h = HeaderMap::new();
        let id = "ab".repeat(32);
        h.insert(
            header::COOKIE,
            format!("other=1; {COOKIE}={id}").parse().unwrap(),
        );
        assert_eq!(cookie_session(&h).as_deref(), Some(id.as_str()));
        for bad in ["tg_0123", "", &"zz".repeat(32), &"ab".repeat(33)] {
            h.insert(header::COOKIE, format!("{COOKIE}={bad}").parse().unwrap());
            assert_eq!(cookie_session(&h), None, "{bad}");
        }
    }

    #[test]
    fn csrf_tokens_are_bound_to_their_session_and_differ_from_its_stored_hash() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        assert_eq!(csrf_token(&a), csrf_token(&a));
        assert_ne!(csrf_token(&a), csrf_token(&b));
        assert_ne!(csrf_token(&a), hex::encode(session_hash(&a)));
    }
}
