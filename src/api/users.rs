//! Admin CRUD of users, groups (with membership) and Tollgate API keys.
//!
//! A key's secret appears exactly once, in the response that creates it; lists show ids, names
//! and masked hints. Every write ends with `governance_changed`, so this replica's key cache and
//! group-based caps see the change at once.
//!
//! Not here: budgets and prices (`api::budgets`), or a member's own provider keys.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Admin;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, ApiJson, ApiPath, Params};
use crate::app::AppState;
use crate::store::{ApiKeyInfo, GroupDetail, UserDetail};

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupRef {
    pub id: Uuid,
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
    /// Ordered by name.
    pub groups: Vec<GroupRef>,
}

impl From<UserDetail> for User {
    fn from(d: UserDetail) -> User {
        User {
            id: d.user.id,
            username: d.user.username,
            is_admin: d.user.is_admin,
            created_at: d.user.created_at,
            groups: d
                .groups
                .into_iter()
                .map(|g| GroupRef {
                    id: g.id,
                    name: g.name,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    pub count: i64,
    /// Newest first.
    pub users: Vec<User>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// 1-64 letters, digits, '-', '_', '.' or '@'.
    pub username: String,
    #[serde(default)]
    pub is_admin: bool,
    /// Group names; groups that do not exist yet are created.
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    pub is_admin: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupMember {
    pub id: Uuid,
    pub username: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Group {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub member_count: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupList {
    pub count: i64,
    /// Newest first.
    pub groups: Vec<Group>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GroupWithMembers {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// Ordered by username.
    pub members: Vec<GroupMember>,
}

impl From<GroupDetail> for GroupWithMembers {
    fn from(g: GroupDetail) -> GroupWithMembers {
        GroupWithMembers {
            id: g.id,
            name: g.name,
            created_at: g.created_at,
            members: g
                .members
                .into_iter()
                .map(|(id, username)| GroupMember { id, username })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    pub user_id: Uuid,
}

/// A Tollgate key as listed: never the secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    /// `tg_…abcd`.
    pub hint: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyInfo> for ApiKey {
    fn from(k: ApiKeyInfo) -> ApiKey {
        ApiKey {
            id: k.id,
            user_id: k.user_id,
            name: k.name,
            hint: k.hint,
            created_at: k.created_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyList {
    pub count: usize,
    /// Newest first.
    pub keys: Vec<ApiKey>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A label (at most 64 characters).
    #[serde(default)]
    pub name: String,
}

/// A newly created key: the only response that ever contains the secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub name: String,
    pub hint: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// `tg_...`: shown once; only its hash is stored.
    pub secret: String,
}

fn user_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("user {id} not found"))
}

fn group_not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("group {id} not found"))
}

// ---- users -----------------------------------------------------------------------------------

/// Lists users, newest first.
#[utoipa::path(
    get,
    path = "/api/v2/users",
    tag = "users",
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)."),
        ("after_id" = Option<Uuid>, Query, description = "The last user id of the previous page."),
    ),
    responses(
        (status = 200, body = UserList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn list_users(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    uri: Uri,
) -> Result<Json<UserList>, ApiError> {
    let params = Params::from_uri(&uri, &["limit", "after_id"])?;
    let limit = params.limit()?;
    let queries = state.store.queries();
    let after =
        match params.get("after_id") {
            None => None,
            Some(text) => {
                let id = parse_id("after_id", text)?;
                Some(queries.user_cursor(id).await?.ok_or_else(|| {
                    ApiError::BadRequest(format!("after_id `{id}` is not a user"))
                })?)
            }
        };
    let (count, users) = queries.list_users(after, limit).await?;
    Ok(Json(UserList {
        count,
        users: users.into_iter().map(User::from).collect(),
    }))
}

/// Creates a user (and any groups named that do not exist yet).
#[utoipa::path(
    post,
    path = "/api/v2/users",
    tag = "users",
    request_body = CreateUser,
    responses(
        (status = 201, body = User),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, description = "Username taken", body = ErrorBody),
        (status = 422, description = "Invalid username or group name", body = ErrorBody),
    )
)]
pub async fn create_user(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiJson(body): ApiJson<CreateUser>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let user = state
        .store
        .create_user(&body.username, body.is_admin, &body.groups)
        .await?;
    state.governance_changed().await;
    let detail = state
        .store
        .queries()
        .user(user.id)
        .await?
        .ok_or_else(|| user_not_found(user.id))?;
    Ok((StatusCode::CREATED, Json(detail.into())))
}

/// One user with their groups.
#[utoipa::path(
    get,
    path = "/api/v2/users/{id}",
    tag = "users",
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 200, body = User),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn get_user(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<User>, ApiError> {
    let id = parse_id("user id", &id)?;
    let user = state
        .store
        .queries()
        .user(id)
        .await?
        .ok_or_else(|| user_not_found(id))?;
    Ok(Json(user.into()))
}

/// Grants or withdraws admin rights. An admin cannot demote themselves (409), so an
/// installation is never left without the admin who made the change.
#[utoipa::path(
    patch,
    path = "/api/v2/users/{id}",
    tag = "users",
    params(("id" = Uuid, Path, description = "User id")),
    request_body = UpdateUser,
    responses(
        (status = 200, body = User),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn update_user(
    State(state): State<Arc<AppState>>,
    Admin(admin): Admin,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<UpdateUser>,
) -> Result<Json<User>, ApiError> {
    let id = parse_id("user id", &id)?;
    if id == admin.user_id && !body.is_admin {
        return Err(ApiError::Conflict(
            "you cannot remove your own admin rights".into(),
        ));
    }
    let user = state
        .store
        .queries()
        .set_user_admin(id, body.is_admin)
        .await?
        .ok_or_else(|| user_not_found(id))?;
    state.governance_changed().await;
    Ok(Json(user.into()))
}

/// Deletes a user, their keys, memberships, stored provider keys and spend limit. Their
/// interceptions are kept. An admin cannot delete themselves (409).
#[utoipa::path(
    delete,
    path = "/api/v2/users/{id}",
    tag = "users",
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody),
    )
)]
pub async fn delete_user(
    State(state): State<Arc<AppState>>,
    Admin(admin): Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("user id", &id)?;
    if id == admin.user_id {
        return Err(ApiError::Conflict("you cannot delete yourself".into()));
    }
    if !state.store.queries().delete_user(id).await? {
        return Err(user_not_found(id));
    }
    state.governance_changed().await;
    Ok(StatusCode::NO_CONTENT)
}

// ---- keys ------------------------------------------------------------------------------------

/// A user's Tollgate keys (ids, names, hints; never secrets), newest first.
#[utoipa::path(
    get,
    path = "/api/v2/users/{id}/keys",
    tag = "users",
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 200, body = ApiKeyList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ApiKeyList>, ApiError> {
    let id = parse_id("user id", &id)?;
    let queries = state.store.queries();
    if queries.user(id).await?.is_none() {
        return Err(user_not_found(id));
    }
    let keys: Vec<ApiKey> = queries
        .api_keys(id)
        .await?
        .into_iter()
        .map(ApiKey::from)
        .collect();
    Ok(Json(ApiKeyList {
        count: keys.len(),
        keys,
    }))
}

/// Creates a key for the user; the response carries the secret, once.
#[utoipa::path(
    post,
    path = "/api/v2/users/{id}/keys",
    tag = "users",
    params(("id" = Uuid, Path, description = "User id")),
    request_body = CreateKey,
    responses(
        (status = 201, body = CreatedKey),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let id = parse_id("user id", &id)?;
    if body.name.chars().count() > 64 || body.name.chars().any(char::is_control) {
        return Err(ApiError::Unprocessable(
            "name: at most 64 characters, no control characters".into(),
        ));
    }
    let key = state.store.create_api_key(id, &body.name).await?;
    state.governance_changed().await;
    let info = key.info;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: info.id,
            user_id: info.user_id,
            name: info.name,
            hint: info.hint,
            created_at: info.created_at,
            revoked_at: info.revoked_at,
            secret: key.secret,
        }),
    ))
}

/// Revokes one of the user's keys (idempotent). Every replica refuses it within the key cache
/// TTL; this one at once.
#[utoipa::path(
    delete,
    path = "/api/v2/users/{id}/keys/{key_id}",
    tag = "users",
    params(
        ("id" = Uuid, Path, description = "User id"),
        ("key_id" = Uuid, Path, description = "Key id"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath((id, key_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("user id", &id)?;
    let key_id = parse_id("key id", &key_id)?;
    match state.store.queries().revoke_user_key(id, key_id).await? {
        None => Err(ApiError::NotFound(format!("user {id} has no key {key_id}"))),
        Some(_) => {
            state.governance_changed().await;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

// ---- groups ----------------------------------------------------------------------------------

/// Lists groups with member counts, newest first.
#[utoipa::path(
    get,
    path = "/api/v2/groups",
    tag = "groups",
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)."),
        ("after_id" = Option<Uuid>, Query, description = "The last group id of the previous page."),
    ),
    responses(
        (status = 200, body = GroupList),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
    )
)]
pub async fn list_groups(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    uri: Uri,
) -> Result<Json<GroupList>, ApiError> {
    let params = Params::from_uri(&uri, &["limit", "after_id"])?;
    let limit = params.limit()?;
    let queries = state.store.queries();
    let after =
        match params.get("after_id") {
            None => None,
            Some(text) => {
                let id = parse_id("after_id", text)?;
                Some(queries.group_cursor(id).await?.ok_or_else(|| {
                    ApiError::BadRequest(format!("after_id `{id}` is not a group"))
                })?)
            }
        };
    let (count, groups) = queries.list_groups(after, limit).await?;
    Ok(Json(GroupList {
        count,
        groups: groups
            .into_iter()
            .map(|(g, member_count)| Group {
                id: g.id,
                name: g.name,
                created_at: g.created_at,
                member_count,
            })
            .collect(),
    }))
}

/// Creates an empty group.
#[utoipa::path(
    post,
    path = "/api/v2/groups",
    tag = "groups",
    request_body = CreateGroup,
    responses(
        (status = 201, body = GroupWithMembers),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn create_group(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiJson(body): ApiJson<CreateGroup>,
) -> Result<(StatusCode, Json<GroupWithMembers>), ApiError> {
    let group = state.store.queries().create_group(&body.name).await?;
    state.governance_changed().await;
    Ok((StatusCode::CREATED, Json(group.into())))
}

/// One group with its members.
#[utoipa::path(
    get,
    path = "/api/v2/groups/{id}",
    tag = "groups",
    params(("id" = Uuid, Path, description = "Group id")),
    responses(
        (status = 200, body = GroupWithMembers),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn get_group(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<GroupWithMembers>, ApiError> {
    let id = parse_id("group id", &id)?;
    let group = state
        .store
        .queries()
        .group(id)
        .await?
        .ok_or_else(|| group_not_found(id))?;
    Ok(Json(group.into()))
}

/// Deletes a group, its memberships and its spend limit.
#[utoipa::path(
    delete,
    path = "/api/v2/groups/{id}",
    tag = "groups",
    params(("id" = Uuid, Path, description = "Group id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    )
)]
pub async fn delete_group(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("group id", &id)?;
    if !state.store.queries().delete_group(id).await? {
        return Err(group_not_found(id));
    }
    state.governance_changed().await;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a user to the group (idempotent).
#[utoipa::path(
    post,
    path = "/api/v2/groups/{id}/members",
    tag = "groups",
    params(("id" = Uuid, Path, description = "Group id")),
    request_body = AddMember,
    responses(
        (status = 200, body = GroupWithMembers),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "No such group or user", body = ErrorBody),
        (status = 422, body = ErrorBody),
    )
)]
pub async fn add_member(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<AddMember>,
) -> Result<Json<GroupWithMembers>, ApiError> {
    let id = parse_id("group id", &id)?;
    let queries = state.store.queries();
    queries.add_group_member(id, body.user_id).await?;
    state.governance_changed().await;
    let group = queries
        .group(id)
        .await?
        .ok_or_else(|| group_not_found(id))?;
    Ok(Json(group.into()))
}

/// Removes a user from the group.
#[utoipa::path(
    delete,
    path = "/api/v2/groups/{id}/members/{user_id}",
    tag = "groups",
    params(
        ("id" = Uuid, Path, description = "Group id"),
        ("user_id" = Uuid, Path, description = "User id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "Not a member", body = ErrorBody),
    )
)]
pub async fn remove_member(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiPath((id, user_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("group id", &id)?;
    let user_id = parse_id("user id", &user_id)?;
    if !state
        .store
        .queries()
        .remove_group_member(id, user_id)
        .await?
    {
        return Err(ApiError::NotFound(format!(
            "user {user_id} is not a member of group {id}"
        )));
    }
    state.governance_changed().await;
    Ok(StatusCode::NO_CONTENT)
}
