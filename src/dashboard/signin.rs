//! Who is looking at the dashboard: the Tollgate key kept in an HttpOnly, SameSite=Strict
//! cookie after sign-in, resolved through the same key cache as the API (a revoked key stops
//! working within the cache TTL), and the CSRF token every POST form must carry.
//!
//! The CSRF token is derived from the key with a secret drawn at process start, so it needs no
//! server-side session table and is useless without the cookie. SameSite=Strict already keeps
//! other sites' forms from sending the cookie; the token is the second lock.
//!
//! Not here: the pages (`dashboard`), or key resolution itself (`crate::auth`).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::auth::{Admin, Caller};
use crate::gateway::GatewayState;
use crate::store::Principal;

pub const COOKIE: &str = "tollgate_dashboard";

/// A signed-in user of the dashboard.
pub struct Viewer {
    pub principal: Arc<Principal>,
    /// The CSRF token of this sign-in, put in every form.
    pub csrf: String,
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

    /// Refuses a form whose token is missing or not this sign-in's.
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
}

/// The form token of a sign-in: a hash of its key under a purpose prefix. Only someone holding
/// the key (which lives in an HttpOnly cookie) can compute it, and it is the same on every
/// replica, so a form rendered by one replica is accepted by another behind a load balancer.
/// The prefix keeps it distinct from the stored key hash (`store::hash_key`).
pub fn csrf_token(key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"tollgate-dashboard-csrf\0");
    h.update(key.as_bytes());
    hex::encode(h.finalize())
}

/// The key in the dashboard cookie, if any.
pub fn cookie_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE && !value.is_empty()).then(|| value.to_string())
        })
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

pub fn set_cookie(headers: &HeaderMap, key: &str) -> String {
    format!(
        "{COOKIE}={key}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=43200{}",
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
/// forms carry the real origin). The sign-in form has no cookie (and so no CSRF token) yet, and
/// this keeps another site from signing a visitor in with the attacker's key. No `Origin` (a
/// non-browser client) passes.
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

/// The principal of a key, if it is valid and not revoked.
pub async fn resolve(state: &GatewayState, key: &str) -> Option<Arc<Principal>> {
    state
        .keys
        .resolve(key, &state.store, &state.db)
        .await
        .ok()
        .flatten()
}

impl FromRequestParts<Arc<GatewayState>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<GatewayState>,
    ) -> Result<Self, Self::Rejection> {
        let signed_out = || Redirect::to("/dashboard/sign-in").into_response();
        let key = cookie_key(&parts.headers).ok_or_else(signed_out)?;
        let principal = resolve(state, &key).await.ok_or_else(signed_out)?;
        Ok(Viewer {
            principal,
            csrf: csrf_token(&key),
        })
    }
}
