//! `/api/v1/shadow`: what rules in shadow mode would have blocked.
//!
//! A rule named in `[correlate] shadow_rules` (or a scenario table with
//! `enforce = false`) decides as usual but blocks nothing; its decisions,
//! and agents' shadow-mode local decisions, are recorded in
//! `shadow_decisions`. Operators read them here (and with `fleetban shadow`
//! and on the dashboard) before they turn a rule on.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ApiQuery};
use super::{AppState, next_cursor_headers, params};

/// Filters of the shadow decision list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ShadowQuery {
    /// Only decisions since: RFC 3339 or a duration ago (default `24h`).
    pub since: Option<String>,
    /// Only decisions of this rule (`auth`, `slot_exhaustion`, `prefix`, ...).
    pub rule: Option<String>,
    /// Only decisions whose range contains this address or range.
    pub contains: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// The `x-next-cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One decision a rule in shadow mode made.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ShadowDecision {
    /// Id.
    pub id: i64,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub decided_at: OffsetDateTime,
    /// The range it would have blocked.
    #[schema(value_type = String, example = "203.0.113.7/32")]
    pub cidr: IpNet,
    /// The rule.
    pub rule: String,
    /// `auto` (the server's correlation) or `agent` (an agent's detection).
    pub source: String,
    /// The agent, for an agent's decision.
    pub agent_id: Option<Uuid>,
    /// The evidence, as a block's `detail` would hold it.
    #[schema(value_type = Object)]
    pub evidence: serde_json::Value,
}

/// Shadow decisions, newest first. The next page's cursor is in the
/// `x-next-cursor` header (absent on the last page).
#[utoipa::path(get, path = "/api/v1/shadow", tag = "blocks", security(("bearer" = [])), params(ShadowQuery),
    responses((status = 200, body = [ShadowDecision], headers(("x-next-cursor" = String, description = "Cursor of the next page"))),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<ShadowQuery>,
) -> Result<(HeaderMap, Json<Vec<ShadowDecision>>), ApiError> {
    let limit = params::limit(query.limit)?;
    let since = params::time("since", query.since.as_deref().unwrap_or("24h"))?;
    let contains = query.contains.as_deref().map(|v| params::cidr("contains", v)).transpose()?;
    let cursor = query.cursor.as_deref().map(params::parse_id_cursor).transpose()?;
    if let Some(rule) = &query.rule
        && (rule.is_empty() || rule.len() > 64)
    {
        return Err(ApiError::bad_request("rule: must be a rule name of 1 to 64 bytes"));
    }
    let mut rows: Vec<ShadowDecision> = sqlx::query_as(
        "select id, decided_at, cidr, rule, source, agent_id, evidence from shadow_decisions \
         where decided_at >= $1 and ($2::text is null or rule = $2) and ($3::cidr is null or cidr >>= $3) \
           and ($4::bigint is null or id < $4) \
         order by id desc limit $5",
    )
    .bind(since)
    .bind(query.rule.as_deref())
    .bind(contains)
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
