//! Who is calling the management API: a Tollgate key (`Authorization: Bearer tg_...`) resolved
//! through the same key cache the gateway uses, and the caller's role.
//!
//! [`Caller`] admits any valid key (admin or member); [`Admin`] admits admins only (403 for a
//! member). Handlers that members may use take [`Caller`] and restrict what they read to the
//! caller's own records.
//!
//! A bad key counts against the caller's address (the listener puts it in every request): an
//! address that fails too often gets 429 for keys not already known, without a lookup.
//!
//! Not here: the key cache itself (`crate::auth`) or the records' ownership checks (handlers).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use super::error::ApiError;
use crate::app::AppState;
use crate::auth::KeyCheckError;
use crate::front_door::ClientKey;
use crate::store::Principal;

/// The address a request came from (`api::listener` records it), for per-address limits.
pub fn client_of(parts: &Parts) -> ClientKey {
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
    ClientKey::of(peer.map(|ConnectInfo(addr)| addr.ip()))
}

/// The caller's address (an extractor that never refuses; `ClientKey::Unknown` when the
/// request did not come through the admin listener, e.g. a router driven directly).
pub struct ClientAddress(pub ClientKey);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(client_of(parts)))
    }
}

/// Any authenticated user.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Principal>);

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.0.is_admin
    }
}

/// An authenticated admin.
#[derive(Debug, Clone)]
pub struct Admin(pub Arc<Principal>);

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let (secret, _) =
            crate::auth::presented_key(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let client = client_of(parts);
        match state
            .keys
            .resolve(&secret, client, &state.store, &state.db)
            .await
        {
            Ok(Some(principal)) => Ok(Caller(principal)),
            Ok(None) => Err(ApiError::Unauthorized),
            Err(KeyCheckError::Throttled(throttled)) => Err(ApiError::TooManyRequests(throttled)),
            Err(KeyCheckError::Store(e)) => Err(ApiError::Internal(format!("key lookup: {e}"))),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        if principal.is_admin {
            Ok(Admin(principal))
        } else {
            Err(ApiError::admin_only())
        }
    }
}
