//! `/api/v1/blocks`: the fleet blocklist — list with filters and keyset
//! pagination, create a manual block, remove a block.
//!
//! Writes go through [`crate::blocks`], so an API block is versioned,
//! notified and pushed to every agent exactly like a correlated one, and
//! policy (allowlist, the fleet's own addresses, `never_block`, over-broad
//! prefixes without `force`) is enforced in one place. The `evidence` shown
//! for a block is computed from the evidence tables for the addresses inside
//! its range; what the deciding rule recorded is kept as `detail`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Admin, Caller, audit};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use super::{AppState, next_cursor_headers, params};
use crate::blocks::{self as store, BlockError, BlockSource, NewBlock};

/// Filters of the block list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct BlockQuery {
    /// `true` (default): live blocks only; `false`: every block, also
    /// expired and removed ones.
    pub active: Option<bool>,
    /// Only blocks whose range contains this address or range.
    pub contains: Option<String>,
    /// Only blocks of exactly this range.
    pub cidr: Option<String>,
    /// Only blocks of this source: `auto`, `agent` or `manual`.
    pub source: Option<String>,
    /// Only blocks the rule made (`fleet_correlation`, `single_host`,
    /// `local_block`, `prefix`; a manual block's rule is its reason).
    pub rule: Option<String>,
    /// Only blocks with evidence from this agent (id).
    pub agent: Option<uuid::Uuid>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// The `x-next-cursor` of the previous page.
    pub cursor: Option<String>,
}

/// What the fleet saw from the addresses inside a block's range.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Evidence {
    /// Distinct agents that saw abuse from the range.
    pub agents: i64,
    /// Kinds of abuse seen.
    pub kinds: Vec<String>,
    /// Abuse events.
    pub events: i64,
    /// First abuse event.
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_seen: Option<OffsetDateTime>,
    /// Last abuse event.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
}

/// A block as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Block {
    /// Block id.
    pub id: i64,
    /// Blocked range.
    #[schema(value_type = String, example = "203.0.113.0/24")]
    pub cidr: IpNet,
    /// Reason.
    pub reason: String,
    /// `auto`, `agent`, `manual`, `feed` (a blocklist feed) or `policy` (an ASN rule).
    pub source: String,
    /// Token name of a manual block.
    pub created_by: Option<String>,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Expiry; `null` = permanent.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// When it stopped being live.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Whether it is live now.
    pub active: bool,
    /// Live allowlist entries that agents cut out of it: `whole` (it is not
    /// enforced at all), `part`, or `null`. It is enforced again once they
    /// are removed or expire.
    pub suppressed: Option<String>,
    /// Evidence across hosts.
    pub evidence: Evidence,
    /// What the deciding rule recorded.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// Why it was blocked, in one sentence (kinds, hosts, the rule and its
    /// threshold).
    pub why: String,
}

#[derive(sqlx::FromRow)]
struct BlockRow {
    id: i64,
    cidr: IpNet,
    reason: String,
    source: String,
    created_by: Option<String>,
    created_at: OffsetDateTime,
    expires_at: Option<OffsetDateTime>,
    revoked_at: Option<OffsetDateTime>,
    active: bool,
    suppressed: Option<String>,
    evidence: serde_json::Value,
    ev_agents: i64,
    ev_kinds: Vec<String>,
    ev_events: i64,
    ev_first: Option<OffsetDateTime>,
    ev_last: Option<OffsetDateTime>,
}

impl From<BlockRow> for Block {
    fn from(r: BlockRow) -> Self {
        let why = super::explain::why(&r.source, &r.reason, r.created_by.as_deref(), &r.evidence);
        Block {
            why,
            id: r.id,
            cidr: r.cidr,
            reason: r.reason,
            source: r.source,
            created_by: r.created_by,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            active: r.active,
            suppressed: r.suppressed,
            evidence: Evidence {
                agents: r.ev_agents,
                kinds: r.ev_kinds,
                events: r.ev_events,
                first_seen: r.ev_first,
                last_seen: r.ev_last,
            },
            detail: r.evidence,
        }
    }
}

/// The columns of a [`BlockRow`], before a `where`.
const SELECT: &str = "select b.id, b.cidr, b.reason, b.source, b.created_by, b.created_at, b.expires_at, b.revoked_at, \
       exists(select 1 from live_blocks l where l.id = b.id) as active, \
       (select case when count(*) = 0 then null when bool_or(a.cidr >>= b.cidr) then 'whole' else 'part' end \
          from live_allowlist a where a.cidr && b.cidr) as suppressed, \
       b.evidence, \
       ev.agents as ev_agents, ev.kinds as ev_kinds, ev.events as ev_events, ev.first_seen as ev_first, \
       ev.last_seen as ev_last \
     from blocks b left join lateral ( \
       select count(distinct h.agent_id) as agents, coalesce(array_agg(distinct h.kind), '{}') as kinds, \
              coalesce(sum(h.events), 0)::bigint as events, min(h.first_seen) as first_seen, \
              max(h.last_seen) as last_seen \
       from offender_hosts h where h.address between fleetban_first(b.cidr) and fleetban_last(b.cidr)) ev on true";

/// One block by id.
pub(crate) async fn fetch(pool: &PgPool, id: i64) -> Result<Option<Block>, sqlx::Error> {
    Ok(sqlx::query_as::<_, BlockRow>(&format!("{SELECT} where b.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .map(Block::from))
}

/// Blocks, newest first. The next page's cursor is in the `x-next-cursor`
/// header (absent on the last page).
#[utoipa::path(get, path = "/api/v1/blocks", tag = "blocks", security(("bearer" = [])), params(BlockQuery),
    responses((status = 200, body = [Block], headers(("x-next-cursor" = String, description = "Cursor of the next page"))),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<BlockQuery>,
) -> Result<(HeaderMap, Json<Vec<Block>>), ApiError> {
    let limit = params::limit(query.limit)?;
    let contains = query.contains.as_deref().map(|v| params::cidr("contains", v)).transpose()?;
    let cidr = query.cidr.as_deref().map(|v| params::cidr("cidr", v)).transpose()?;
    let cursor = query.cursor.as_deref().map(params::parse_id_cursor).transpose()?;
    let source = match query.source.as_deref() {
        None | Some("auto" | "agent" | "manual") => query.source.as_deref(),
        Some(other) => return Err(ApiError::bad_request(format!("source: {other:?} is not auto, agent or manual"))),
    };
    let mut rows = sqlx::query_as::<_, BlockRow>(&format!(
        "{} where (not $1 or b.id in (select id from live_blocks)) and ($2::inet is null or b.cidr >>= $2) \
           and ($3::cidr is null or b.cidr = $3) and ($4::bigint is null or b.id < $4) \
           and ($6::text is null or b.source = $6) \
           and ($7::text is null or coalesce(b.evidence->>'rule', b.reason) = $7) \
           and ($8::uuid is null or b.evidence->'agents' ? $8::text or b.evidence->'local'->>'agent_id' = $8::text) \
         order by b.id desc limit $5",
        SELECT
    ))
    .bind(query.active.unwrap_or(true))
    .bind(contains)
    .bind(cidr)
    .bind(cursor)
    .bind(limit + 1)
    .bind(source)
    .bind(query.rule.as_deref())
    .bind(query.agent)
    .fetch_all(&state.pool)
    .await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok((next_cursor_headers(next), Json(rows.into_iter().map(Block::from).collect())))
}

/// One block.
#[utoipa::path(get, path = "/api/v1/blocks/{id}", tag = "blocks", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Block id")),
    responses((status = 200, body = Block), (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<Block>, ApiError> {
    fetch(&state.pool, id).await?.map(Json).ok_or_else(|| ApiError::not_found(format!("no block {id}")))
}

/// A manual block to create.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBlock {
    /// Address or range to block.
    #[schema(example = "203.0.113.0/24")]
    pub cidr: String,
    /// Lifetime, seconds; absent = permanent.
    pub ttl_secs: Option<u64>,
    /// Why (1 to 256 characters).
    pub reason: String,
    /// Allow a range broader than the configured minimum prefix.
    #[serde(default)]
    pub force: bool,
}

/// Longest reason, characters.
const MAX_REASON_CHARS: usize = 256;

/// Blocks a range on every agent. An existing live block of the same range
/// is extended instead.
#[utoipa::path(post, path = "/api/v1/blocks", tag = "blocks", security(("bearer" = [])), request_body = CreateBlock,
    responses((status = 201, body = Block), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody),
              (status = 422, description = "Refused by policy", body = super::error::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(body): ApiJson<CreateBlock>,
) -> Result<(StatusCode, Json<Block>), ApiError> {
    let cidr = params::cidr("cidr", &body.cidr)?;
    let reason = body.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
        return Err(ApiError::bad_request(format!("reason must be 1 to {MAX_REASON_CHARS} characters")));
    }
    let ttl = match body.ttl_secs {
        Some(0) => return Err(ApiError::bad_request("ttl_secs must be positive")),
        Some(secs) => Some(std::time::Duration::from_secs(secs)),
        None => None,
    };
    let new = NewBlock {
        cidr,
        reason: reason.to_owned(),
        source: BlockSource::Manual,
        evidence: serde_json::json!({ "operator": caller.name }),
        ttl,
        created_by: Some(caller.name.clone()),
        force: body.force,
    };
    let block = store::create(&state.pool, state.policy.as_ref(), new).await.map_err(block_error)?;
    audit(
        &state.pool,
        &caller.name,
        "block.create",
        &cidr.to_string(),
        serde_json::json!({ "id": block.id, "ttl_secs": body.ttl_secs, "reason": reason, "force": body.force }),
    )
    .await?;
    let shown = fetch(&state.pool, block.id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("block {} vanished after creation", block.id)))?;
    Ok((StatusCode::CREATED, Json(shown)))
}

/// Removes a block from every agent's firewall.
#[utoipa::path(delete, path = "/api/v1/blocks/{id}", tag = "blocks", security(("bearer" = [])),
    params(("id" = i64, Path, description = "Block id")),
    responses((status = 204, description = "Removed"), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody),
              (status = 409, description = "Already removed or expired", body = super::error::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let reason = format!("removed by {}", caller.name);
    match store::revoke(&state.pool, id, &reason).await.map_err(block_error)? {
        Some(block) => {
            audit(&state.pool, &caller.name, "block.delete", &block.cidr.to_string(), serde_json::json!({ "id": id }))
                .await?;
            Ok(StatusCode::NO_CONTENT)
        }
        None => match fetch(&state.pool, id).await? {
            None => Err(ApiError::not_found(format!("no block {id}"))),
            Some(_) => Err(ApiError::Conflict(format!("block {id} is no longer live"))),
        },
    }
}

/// Maps a store error: refusals are 422, the rest internal.
pub(crate) fn block_error(error: BlockError) -> ApiError {
    match error {
        BlockError::Refused(refusal) => ApiError::Refused(refusal.to_string()),
        BlockError::Database(error) => ApiError::Database(error),
    }
}
