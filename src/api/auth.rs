//! Who is calling the management API: a Tollgate key (`Authorization: Bearer tg_...`) resolved
//! through the same key cache the gateway uses, and the caller's role.
//!
//! [`Caller`] admits any valid key (admin or member); [`Admin`] admits admins only (403 for a
//! member). Handlers that members may use take [`Caller`] and restrict what they read to the
//! caller's own records.
//!
//! Not here: the key cache itself (`crate::auth`) or the records' ownership checks (handlers).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::gateway::GatewayState;
use crate::store::Principal;

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

impl FromRequestParts<Arc<GatewayState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<GatewayState>,
    ) -> Result<Self, Self::Rejection> {
        let (secret, _) =
            crate::auth::presented_key(&parts.headers).ok_or(ApiError::Unauthorized)?;
        match state.keys.resolve(&secret, &state.store, &state.db).await {
            Ok(Some(principal)) => Ok(Caller(principal)),
            Ok(None) => Err(ApiError::Unauthorized),
            Err(e) => Err(ApiError::Internal(format!("key lookup: {e}"))),
        }
    }
}

impl FromRequestParts<Arc<GatewayState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<GatewayState>,
    ) -> Result<Self, Self::Rejection> {
        let Caller(principal) = Caller::from_request_parts(parts, state).await?;
        if principal.is_admin {
            Ok(Admin(principal))
        } else {
            Err(ApiError::admin_only())
        }
    }
}
