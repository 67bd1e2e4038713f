//! `/api/v1/audit`: the audit log, newest first.
//!
//! Every API write, every `fleetban-server` admin command and every agent
//! enrollment appends a row (`api::auth::audit`, `auth::enroll_agent`): who
//! (`actor`: a token's name, `fleetban-server`, or `enroll-token:<id>`), what
//! (`action`, such as `block.create` or `agent.remove`), on what (`target`),
//! and details. Read tokens may read it.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, ApiQuery};
use super::{AppState, next_cursor_headers, params};

/// Filters of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries since: RFC 3339 or a duration ago (default `24h`).
    pub since: Option<String>,
    /// Only this action (`agent.remove`) or actions under a prefix ending in
    /// a dot (`agent.`).
    pub action: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// The `x-next-cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One entry of the audit log.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct AuditEntry {
    /// Id.
    pub id: i64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who: a token's name, `fleetban-server`, or `enroll-token:<id>`.
    pub actor: String,
    /// What, such as `block.create` or `agent.revoke`.
    pub action: String,
    /// On what: a range, an agent id, a token name or id.
    pub target: Option<String>,
    /// Details of the change.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// The audit log, newest first. The next page's cursor is in the
/// `x-next-cursor` header (absent on the last page).
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", security(("bearer" = [])), params(AuditQuery),
    responses((status = 200, body = [AuditEntry], headers(("x-next-cursor" = String, description = "Cursor of the next page"))),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<(HeaderMap, Json<Vec<AuditEntry>>), ApiError> {
    let limit = params::limit(query.limit)?;
    let since = params::time("since", query.since.as_deref().unwrap_or("24h"))?;
    let cursor = query.cursor.as_deref().map(params::parse_id_cursor).transpose()?;
    let (exact, prefix) = match query.action.as_deref() {
        None => (None, None),
        Some(a) if a.is_empty() || a.len() > 64 => {
            return Err(ApiError::bad_request("action: must be 1 to 64 bytes"));
        }
        Some(a) if a.ends_with('.') => (None, Some(a.to_owned())),
        Some(a) => (Some(a.to_owned()), None),
    };
    let mut rows: Vec<AuditEntry> = sqlx::query_as(
        "select id, at, actor, action, target, detail from audit_log \
         where at >= $1 and ($2::text is null or action = $2) \
           and ($3::text is null or starts_with(action, $3)) and ($4::bigint is null or id < $4) \
         order by id desc limit $5",
    )
    .bind(since)
    .bind(exact)
    .bind(prefix)
    .bind(cursor)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok((next_cursor_headers(next), Json(rows)))
}
