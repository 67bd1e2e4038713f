//! `/api/v1/tokens` and `/api/v1/enroll-tokens`: the credentials operators
//! hand out, created, listed and revoked over the API (admin only).
//!
//! A token's text is returned once, by the `POST` that creates it; lists show
//! its id and first characters (`prefix`), never the token, and only its hash
//! is stored. Every create and revoke is audited under the caller's name.
//! Revoking an enrollment token stops new enrollments with it; agents that
//! enrolled with it keep their credentials.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::{self as api_auth, Admin, Role, TokenError, TokenInfo, audit};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::auth::{self, AuthError, EnrollmentToken, RevokeError};

/// Lifetime of an enrollment token created without `ttl_secs`, seconds.
pub const DEFAULT_ENROLL_TTL_SECS: u64 = 86_400;

/// Filter of the token lists.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TokenQuery {
    /// Also list expired, used-up and revoked tokens (default false).
    #[serde(default)]
    pub all: bool,
}

/// An API token to create.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// `admin` (read and write) or `read`.
    pub role: Role,
    /// Name shown in the audit log (default `<role>-<id>`).
    pub name: Option<String>,
    /// Lifetime, seconds; absent = never expires.
    pub ttl_secs: Option<u64>,
}

/// A created API token: `token` is shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The bearer token; not retrievable later.
    pub token: String,
    /// Its first characters, as lists show them.
    pub prefix: String,
    /// When it expires; `null` = never.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// An enrollment token to create.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollToken {
    /// How many agents may enroll with it (default 1).
    pub uses: Option<u32>,
    /// Lifetime, seconds (default 86400).
    pub ttl_secs: Option<u64>,
    /// Who or what it is for.
    #[serde(default)]
    pub note: String,
}

/// A created enrollment token: `token` is shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedEnrollToken {
    /// Id.
    pub id: i64,
    /// The enrollment token; not retrievable later.
    pub token: String,
    /// Its first characters, as lists show them.
    pub prefix: String,
    /// Enrollments it allows.
    pub uses: u32,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The note.
    pub note: String,
}

fn revoke_error(error: RevokeError) -> ApiError {
    match error {
        RevokeError::NotFound(_) => ApiError::not_found(error.to_string()),
        RevokeError::AlreadyRevoked { .. } => ApiError::Conflict(error.to_string()),
        RevokeError::Database(error) => ApiError::Database(error),
    }
}

/// API tokens, newest first; never the tokens themselves.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", security(("bearer" = [])), params(TokenQuery),
    responses((status = 200, body = [TokenInfo]), (status = 403, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<TokenQuery>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(api_auth::list_tokens(&state.pool, query.all).await?))
}

/// Creates an API token; the response is the only time it is shown.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", security(("bearer" = [])), request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let ttl = body.ttl_secs.map(std::time::Duration::from_secs);
    let token = api_auth::create_token_expiring(&state.pool, body.role, body.name.as_deref(), ttl).await.map_err(
        |e| match e {
            TokenError::Database(error) => ApiError::Database(error),
            other => ApiError::bad_request(other.to_string()),
        },
    )?;
    let detail = serde_json::json!({
        "id": token.id, "role": token.role.as_str(), "prefix": token.prefix,
        "expires_at": token.expires_at.map(auth::rfc3339),
    });
    audit(&state.pool, &caller.name, "token.create", &token.name, detail).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: token.id,
            name: token.name,
            role: token.role,
            token: token.token,
            prefix: token.prefix,
            expires_at: token.expires_at,
        }),
    ))
}

/// Revokes an API token: it authenticates nothing from now on.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Token id")),
    responses((status = 204, description = "Revoked"), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn revoke(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let name = api_auth::revoke_token(&state.pool, id).await.map_err(revoke_error)?;
    audit(&state.pool, &caller.name, "token.revoke", &name, serde_json::json!({ "id": id })).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Enrollment tokens, newest first; never the tokens themselves.
#[utoipa::path(get, path = "/api/v1/enroll-tokens", tag = "tokens", security(("bearer" = [])), params(TokenQuery),
    responses((status = 200, body = [EnrollmentToken]), (status = 403, body = super::error::ErrorBody)))]
pub async fn list_enroll(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<TokenQuery>,
) -> Result<Json<Vec<EnrollmentToken>>, ApiError> {
    Ok(Json(auth::list_enrollment_tokens(&state.pool, query.all).await?))
}

/// Creates an enrollment token; the response is the only time it is shown.
#[utoipa::path(post, path = "/api/v1/enroll-tokens", tag = "tokens", security(("bearer" = [])),
    request_body = CreateEnrollToken,
    responses((status = 201, body = CreatedEnrollToken), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody)))]
pub async fn create_enroll(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(body): ApiJson<CreateEnrollToken>,
) -> Result<(StatusCode, Json<CreatedEnrollToken>), ApiError> {
    let uses = body.uses.unwrap_or(1);
    let ttl = std::time::Duration::from_secs(body.ttl_secs.unwrap_or(DEFAULT_ENROLL_TTL_SECS));
    let token = auth::new_enrollment_token(&state.pool, uses, ttl, &body.note).await.map_err(|e| match e {
        AuthError::Database(error) => ApiError::Database(error),
        other => ApiError::bad_request(other.to_string()),
    })?;
    let detail = serde_json::json!({
        "uses": uses, "prefix": token.prefix, "expires_at": auth::rfc3339(token.expires_at), "note": body.note,
    });
    audit(&state.pool, &caller.name, "enroll_token.create", &token.id.to_string(), detail).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollToken {
            id: token.id,
            token: token.token,
            prefix: token.prefix,
            uses,
            expires_at: token.expires_at,
            note: body.note,
        }),
    ))
}

/// Revokes an enrollment token: no agent can enroll with it any more.
#[utoipa::path(delete, path = "/api/v1/enroll-tokens/{id}", tag = "tokens", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Enrollment token id")),
    responses((status = 204, description = "Revoked"), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn revoke_enroll(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    auth::revoke_enrollment_token(&state.pool, id).await.map_err(revoke_error)?;
    audit(&state.pool, &caller.name, "enroll_token.revoke", &id.to_string(), serde_json::json!({})).await?;
    Ok(StatusCode::NO_CONTENT)
}
