//! `/api/v1/allowlist`: ranges that are never blocked.
//!
//! An entry *suppresses* the live blocks it overlaps instead of removing
//! them: every agent receives the allowlist and cuts it out of what its
//! firewall holds (and its detection never blocks inside it), policy refuses
//! new blocks that overlap it, and removing the entry (or its expiry) makes
//! the blocks still live enforced again. An entry broader than the minimum
//! block prefix (`min_prefix_v4`/`min_prefix_v6`, /16 and /32 by default)
//! lifts a large part of the blocklist at once and needs `force`, like such a
//! block does.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, Caller, audit};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::{AppState, params};

/// A live allowlist entry.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
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

const COLUMNS: &str = "id, cidr, note, created_by, created_at, expires_at";

/// Every live allowlist entry.
#[utoipa::path(get, path = "/api/v1/allowlist", tag = "allowlist", security(("bearer" = [])),
    responses((status = 200, body = [AllowEntry]), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<Vec<AllowEntry>>, ApiError> {
    let entries = sqlx::query_as::<_, AllowEntry>(&format!("select {COLUMNS} from live_allowlist order by cidr"))
        .fetch_all(&state.pool)
        .await?;
    Ok(Json(entries))
}

/// An allowlist entry to add.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
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
    /// Allow a range broader than the minimum block prefix (`/16` IPv4,
    /// `/32` IPv6 by default).
    #[serde(default)]
    pub force: bool,
}

/// The added entry and the blocks it suppresses.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Allowed {
    /// The entry.
    pub entry: AllowEntry,
    /// Ids of the live blocks overlapping the range: agents no longer
    /// enforce them inside it, and do again once the entry is gone.
    pub suppressed_blocks: Vec<i64>,
    /// Always empty: blocks are suppressed, no longer removed (kept for
    /// older clients).
    pub removed_blocks: Vec<i64>,
}

/// Why an allowlist entry cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowRefusal {
    /// Broader than the minimum prefix, without `force`.
    #[error("{cidr} is broader than /{min_prefix_len}; allowlisting it lifts every block inside it, so it needs force")]
    TooBroad {
        /// The range.
        cidr: IpNet,
        /// `min_prefix_v4` or `min_prefix_v6`.
        min_prefix_len: u8,
    },
    /// A live entry of exactly this range exists.
    #[error("{0} is already allowlisted")]
    Duplicate(IpNet),
}

/// Checks the breadth of `cidr` (canonical) against the policy.
pub(crate) fn check_breadth(
    policy: &crate::correlate::CorrelateConfig,
    cidr: IpNet,
    force: bool,
) -> Result<(), AllowRefusal> {
    let min = match cidr {
        IpNet::V4(_) => policy.min_prefix_v4,
        IpNet::V6(_) => policy.min_prefix_v6,
    };
    if cidr.prefix_len() < min && !force {
        return Err(AllowRefusal::TooBroad { cidr, min_prefix_len: min });
    }
    Ok(())
}

/// Inserts an entry unless a live one of exactly `cidr` exists (`None`).
pub(crate) async fn insert(
    conn: &mut PgConnection,
    cidr: IpNet,
    note: &str,
    created_by: &str,
    ttl_secs: Option<u64>,
) -> Result<Option<AllowEntry>, sqlx::Error> {
    // Clamped like block TTLs, so that any u64 is a valid interval.
    let ttl_secs = ttl_secs.map(|secs| secs.min(crate::blocks::MAX_TTL.as_secs()));
    sqlx::query_as::<_, AllowEntry>(&format!(
        "insert into allowlist (cidr, note, created_by, expires_at) \
         select $1, $2, $3, now() + make_interval(secs => $4) \
         where not exists (select 1 from live_allowlist where cidr = $1) \
         returning {COLUMNS}"
    ))
    .bind(cidr)
    .bind(note)
    .bind(created_by)
    .bind(ttl_secs.map(|s| s as f64))
    .fetch_optional(conn)
    .await
}

/// Ids of the live blocks overlapping `cidr`.
pub(crate) async fn overlapping_blocks(conn: &mut PgConnection, cidr: IpNet) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("select id from live_blocks where cidr && $1::cidr order by id").bind(cidr).fetch_all(conn).await
}

/// Adds an entry; live blocks overlapping it are no longer enforced inside
/// it on any agent (until the entry is removed or expires).
#[utoipa::path(post, path = "/api/v1/allowlist", tag = "allowlist", security(("bearer" = [])), request_body = CreateAllow,
    responses((status = 201, body = Allowed), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody),
              (status = 409, description = "The range is already allowlisted", body = super::error::ErrorBody),
              (status = 422, description = "Broader than the minimum prefix without force", body = super::error::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(body): ApiJson<CreateAllow>,
) -> Result<(StatusCode, Json<Allowed>), ApiError> {
    let cidr = params::cidr("cidr", &body.cidr)?;
    if body.note.chars().count() > 1024 {
        return Err(ApiError::bad_request("note must be at most 1024 characters"));
    }
    if body.ttl_secs == Some(0) {
        return Err(ApiError::bad_request("ttl_secs must be positive"));
    }
    check_breadth(&state.policy, cidr, body.force).map_err(|refusal| ApiError::Refused(refusal.to_string()))?;
    let mut conn = state.pool.acquire().await?;
    let entry = insert(&mut conn, cidr, body.note.trim(), &caller.name, body.ttl_secs)
        .await?
        .ok_or_else(|| ApiError::Conflict(AllowRefusal::Duplicate(cidr).to_string()))?;
    let suppressed_blocks = overlapping_blocks(&mut conn, cidr).await?;
    drop(conn);
    audit(
        &state.pool,
        &caller.name,
        "allowlist.create",
        &cidr.to_string(),
        serde_json::json!({ "id": entry.id, "note": entry.note, "ttl_secs": body.ttl_secs, "force": body.force,
            "suppressed_blocks": suppressed_blocks }),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(Allowed { entry, suppressed_blocks, removed_blocks: Vec::new() })))
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
    let ids: Vec<i64> = sqlx::query_scalar(
        "delete from allowlist where id in (select id from live_allowlist where cidr = $1) returning id",
    )
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
