//! The admin listener: the management REST API under `/api/v2` (interceptions, sessions, usage,
//! seats, users, groups, keys, budgets, pricing, the proxy CA, the OpenAPI document) and the
//! operational routes `/metrics`, `/healthz`, `/readyz`.
//!
//! Runs on Tollgate's background runtime (not on the proxy threads), so a slow admin query
//! never competes with provider traffic for a worker.
//!
//! Every route is registered once, in [`routes`], through `utoipa_axum`: the `#[utoipa::path]`
//! annotation on a handler gives both the route the router serves and its entry in the OpenAPI
//! document, so the two cannot drift apart. Do not add routes with a plain `.route(...)`.
//!
//! Not here: provider traffic (gateway) and the queries themselves (`store::Queries`).

pub mod auth;
pub mod budgets;
pub mod error;
pub mod extract;
pub mod interceptions;
pub mod listener;
pub mod me;
pub mod query;
pub mod seats;
pub mod sessions;
pub mod system;
pub mod usage;
pub mod users;

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::Uri;
use axum::{Extension, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use error::ApiError;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate management API",
        description = "Interceptions, sessions, usage, seats and the administration of users, groups, keys, budgets and prices. Authenticate with a Tollgate key: `Authorization: Bearer tg_...`. Admins see everything; members see only their own interceptions, sessions and usage.",
    ),
    modifiers(&BearerAuth),
    security(("tollgate_key" = [])),
    tags(
        (name = "interceptions", description = "Recorded provider calls"),
        (name = "sessions", description = "Interceptions grouped by session"),
        (name = "usage", description = "Token and cost rollups"),
        (name = "seats", description = "AI seat use"),
        (name = "users", description = "Users and their Tollgate keys (admins)"),
        (name = "groups", description = "Groups and membership (admins)"),
        (name = "budgets", description = "Spend limits (admins)"),
        (name = "pricing", description = "Model prices (admins)"),
        (name = "proxy", description = "The HTTPS proxy front door"),
        (name = "operations", description = "Metrics, health and this document"),
    )
)]
struct ApiDoc;

/// Declares the `tollgate_key` bearer scheme every `/api/v2` operation uses by default.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "tollgate_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tg_...")
                    .description(Some("A Tollgate API key"))
                    .build(),
            ),
        );
    }
}

/// Documents the 429 every key-checked operation can answer: where a bad key gets 401, an
/// address that has failed too often gets 429 with `Retry-After` before its key is looked up
/// (`crate::auth::failures`). Added here once rather than on every handler, after the routes
/// are in the document ([`routes`]).
struct ThrottledAuth;

impl utoipa::Modify for ThrottledAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder, Type};
        let throttled = ResponseBuilder::new()
            .description("Too many failed authentications from this address; the key was not checked. Retry after `Retry-After` seconds.")
            .header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(utoipa::openapi::ObjectBuilder::new().schema_type(Type::Integer))
                    .build(),
            )
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                if op.responses.responses.contains_key("401") {
                    op.responses
                        .responses
                        .entry("429".to_string())
                        .or_insert_with(|| throttled.clone().into());
                }
            }
        }
    }
}

/// Every route with its OpenAPI entry: the single list both are built from.
pub fn routes() -> (Router<Arc<AppState>>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(interceptions::list_interceptions))
        .routes(routes!(interceptions::get_interception))
        .routes(routes!(sessions::list_sessions))
        .routes(routes!(sessions::get_session))
        .routes(routes!(usage::usage))
        .routes(routes!(seats::seats))
        .routes(routes!(users::list_users, users::create_user))
        .routes(routes!(
            users::get_user,
            users::update_user,
            users::delete_user
        ))
        .routes(routes!(users::list_keys, users::create_key))
        .routes(routes!(users::revoke_key))
        .routes(routes!(users::list_groups, users::create_group))
        .routes(routes!(users::get_group, users::delete_group))
        .routes(routes!(users::add_member))
        .routes(routes!(users::remove_member))
        .routes(routes!(
            budgets::list_budgets,
            budgets::put_budget,
            budgets::post_budget
        ))
        .routes(routes!(budgets::delete_default_budget))
        .routes(routes!(budgets::delete_scoped_budget))
        .routes(routes!(budgets::list_prices))
        .routes(routes!(budgets::put_price, budgets::delete_price))
        .routes(routes!(me::my_budget))
        .routes(routes!(me::list_provider_keys))
        .routes(routes!(me::put_provider_key, me::delete_provider_key))
        .routes(routes!(system::ca_cert))
        .routes(routes!(system::openapi))
        .routes(routes!(system::metrics))
        .routes(routes!(system::healthz))
        .routes(routes!(system::readyz))
        .split_for_parts();
    utoipa::Modify::modify(&ThrottledAuth, &mut doc);
    (router, doc)
}

/// The OpenAPI document of [`routes`].
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().1
}

/// Builds the admin router: the API's routes, then `pages` (the dashboard's HTML views, which
/// share the listener but not the OpenAPI document).
pub fn router(state: Arc<AppState>, pages: Router<Arc<AppState>>) -> Router {
    let (router, doc) = routes();
    // Rendered once: the document is static for the life of the process.
    let json = doc.to_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot render the OpenAPI document");
        "{}".to_string()
    });
    // The dashboard's HTML pages are views over these handlers, not API.
    router
        .merge(pages)
        .fallback(no_route)
        .layer(Extension(system::OpenApiJson(Bytes::from(json))))
        .with_state(state)
}

/// Unknown paths get the API's JSON error rather than an empty 404.
async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}
