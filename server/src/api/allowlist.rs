//! `/api/v1/allowlist`: ranges that are never blocked.
//!
//! Adding an entry also removes every live block it covers (through
//! [`crate::blocks::revoke_covered_by`], so the removals reach every agent),
//! and from then on policy refuses blocks that overlap it.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, Caller, audit};
use super::blocks::block_error;
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::{AppState, params};

/// A live allowlist entry.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
pub struct AllowEntry {
    /// Entry id.
    pub id: i64,
    /// The range.
    #[schema(value_type = String, example = "198.51.100.0/24")]
    pub cidr: IpNet,
    /// Why it is allowed.
    pub note: String,
    /// Token name that added it.
    pub created_by: Option<String>,
    /// Added.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Expiry; `null` = permanent.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

const LIVE: &str = "(expires_at is null or expires_at > now())";
const COLUMNS: &str = "id, cidr, note, created_by, created_at, expires_at";

/// Every live allowlist entry.
#[utoipa::path(get, path = "/api/v1/allowlist", tag = "allowlist", security(("bearer" = [])),
    responses((status = 200, body = [AllowEntry]), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<Vec<AllowEntry>>, ApiError> {
    let entries =
        sqlx::query_as::<_, AllowEntry>(&format!("select {COLUMNS} from allowlist where {LIVE} order by cidr"))
            .fetch_all(&state.pool)
            .await?;
    Ok(Json(entries))
}

/// An allowlist entry to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAllow {
    /// Address or range.
    #[schema(example = "198.51.100.0/24")]
    pub cidr: String,
    /// Why (at most 1024 characters).
    #[serde(default)]
    pub note: String,
    /// Lifetime, seconds; absent = permanent.
    pub ttl_secs: Option<u64>,
}

/// The added entry and the blocks it removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Allowed {
    /// The entry.
    pub entry: AllowEntry,
    /// Ids of the live blocks inside (or equal to) the range that were removed.
    pub removed_blocks: Vec<i64>,
}

/// Adds an entry; live blocks inside it are removed from every agent.
#[utoipa::path(post, path = "/api/v1/allowlist", tag = "allowlist", security(("bearer" = [])), request_body = CreateAllow,
    responses((status = 201, body = Allowed), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody),
              (status = 409, description = "The range is already allowlisted", body = super::error::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(body): ApiJson<CreateAllow>,
) -> Result<(StatusCode, Json<Allowed>), ApiError> {
    let cidr = params::cidr("cidr", &body.cidr)?;
    if body.note.chars().count() > 1024 {
        return Err(ApiError::bad_request("note must be at most 1024 characters"));
    }
    let ttl_secs = match body.ttl_secs {
        Some(0) => return Err(ApiError::bad_request("ttl_secs must be positive")),
        // Clamped like block TTLs, so that any u64 is a valid interval.
        Some(secs) => Some(secs.min(crate::blocks::MAX_TTL.as_secs())),
        None => None,
    };
    let entry = sqlx::query_as::<_, AllowEntry>(&format!(
        "insert into allowlist (cidr, note, created_by, expires_at) \
         select $1, $2, $3, now() + make_interval(secs => $4) \
         where not exists (select 1 from allowlist where cidr = $1 and {LIVE}) \
         returning {COLUMNS}"
    ))
    .bind(cidr)
    .bind(body.note.trim())
    .bind(&caller.name)
    .bind(ttl_secs.map(|s| s as f64))
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| ApiError::Conflict(format!("{cidr} is already allowlisted")))?;
    // Blocks strictly inside the range, then a block of exactly the range.
    let reason = format!("allowlisted by {}", caller.name);
    let mut removed_blocks: Vec<i64> = crate::blocks::revoke_covered_by(&state.pool, cidr, &reason)
        .await
        .map_err(block_error)?
        .iter()
        .map(|b| b.id)
        .collect();
    let same: Option<i64> = sqlx::query_scalar("select id from blocks where cidr = $1 and revoked_at is null")
        .bind(cidr)
        .fetch_optional(&state.pool)
        .await?;
    if let Some(id) = same
        && let Some(block) = crate::blocks::revoke(&state.pool, id, &reason).await.map_err(block_error)?
    {
        removed_blocks.push(block.id);
    }
    removed_blocks.sort_unstable();
    audit(
        &state.pool,
        &caller.name,
        "allowlist.create",
        &cidr.to_string(),
        serde_json::json!({ "id": entry.id, "note": entry.note, "ttl_secs": body.ttl_secs, "removed_blocks": removed_blocks }),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(Allowed { entry, removed_blocks })))
}

/// Which entries to remove.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Remove the live entries of exactly this range.
    pub cidr: String,
}

/// Removes the live entries of a range.
#[utoipa::path(delete, path = "/api/v1/allowlist", tag = "allowlist", security(("bearer" = [])), params(DeleteQuery),
    responses((status = 204, description = "Removed"), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn delete_by_cidr(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let cidr = params::cidr("cidr", &query.cidr)?;
    let ids: Vec<i64> = sqlx::query_scalar(&format!("delete from allowlist where cidr = $1 and {LIVE} returning id"))
        .bind(cidr)
        .fetch_all(&state.pool)
        .await?;
    if ids.is_empty() {
        return Err(ApiError::not_found(format!("{cidr} is not allowlisted")));
    }
    audit(&state.pool, &caller.name, "allowlist.delete", &cidr.to_string(), serde_json::json!({ "ids": ids })).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes one entry by id.
#[utoipa::path(delete, path = "/api/v1/allowlist/{id}", tag = "allowlist", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Entry id")),
    responses((status = 204, description = "Removed"), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let cidr: Option<IpNet> = sqlx::query_scalar("delete from allowlist where id = $1 returning cidr")
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
    let cidr = cidr.ok_or_else(|| ApiError::not_found(format!("no allowlist entry {id}")))?;
    audit(&state.pool, &caller.name, "allowlist.delete", &cidr.to_string(), serde_json::json!({ "ids": [id] })).await?;
    Ok(StatusCode::NO_CONTENT)
}
