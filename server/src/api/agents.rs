//! `/api/v1/agents`: the fleet's enrolled agents; renaming, revoking and
//! removing one.
//!
//! Revoking (`POST /api/v1/agents/{id}/revoke`) sets `agents.revoked_at`: the
//! agent's credentials stop working at once (the session side refuses
//! revoked agents on `Connect`; a trigger announces the revocation and the
//! server process holding the agent's live session closes it, or failing
//! that its next heartbeat or report does), and it is shown offline.
//!
//! Removing (`DELETE /api/v1/agents/{id}`) revokes the agent if it was not
//! revoked and takes it out of the fleet (`removed_at`): it leaves the list
//! (`?removed=true` shows it), its name is free for another host, and its
//! events, evidence and blocks stay as history. Until this endpoint removed,
//! it only revoked; removing is what operators used it for.
//!
//! Renaming (`PATCH`) changes the name only: id, credentials and history
//! stay. Names are unique among agents not removed (case-insensitively).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::{Admin, Caller, audit};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use crate::auth::{self, RenameError};

/// An agent as the API shows it.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Agent {
    /// Agent id.
    pub id: Uuid,
    /// Name given at enrollment.
    pub name: String,
    /// Host name the agent reported.
    pub hostname: String,
    /// Agent software version.
    pub version: String,
    /// Whether a session is open now.
    pub connected: bool,
    /// Last frame received.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// Blocklist version the agent last applied.
    pub blocklist_version: i64,
    /// Firewall entries the agent last reported.
    pub firewall_entries: i64,
    /// How long the oldest blocklist change the agent has not applied has
    /// been waiting, seconds (0 when it is current).
    pub lag_secs: f64,
    /// The host's own addresses (never blocked).
    pub addresses: Vec<String>,
    /// When it enrolled.
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    /// When it was revoked; `null` while it may connect.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// When its host last enrolled again, replacing its credentials.
    #[serde(with = "time::serde::rfc3339::option")]
    pub reenrolled_at: Option<OffsetDateTime>,
    /// When it was removed from the fleet; `null` while it is part of it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub removed_at: Option<OffsetDateTime>,
}

/// Filter of the agent list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AgentQuery {
    /// Also list agents removed from the fleet (default false).
    #[serde(default)]
    pub removed: bool,
}

/// A change to an agent.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgent {
    /// The new name (1 to 128 characters, unique among agents).
    pub name: String,
}

const SELECT: &str = "select a.id, a.name, a.hostname, a.version, a.connected and a.revoked_at is null as connected, \
     a.last_seen, a.blocklist_version, a.firewall_entries, a.enrolled_at, a.revoked_at, a.reenrolled_at, a.removed_at, \
     coalesce(extract(epoch from now() - \
       (select min(c.changed_at) from block_changes c where c.version > a.blocklist_version)), 0)::float8 as lag_secs, \
     coalesce((select array_agg(host(x.address) order by x.address) from agent_addresses x \
               where x.agent_id = a.id), '{}') as addresses \
     from agents a";

/// Every agent of the fleet, by name (`removed=true`: removed ones too).
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", security(("bearer" = [])), params(AgentQuery),
    responses((status = 200, body = [Agent]), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<AgentQuery>,
) -> Result<Json<Vec<Agent>>, ApiError> {
    let agents = sqlx::query_as::<_, Agent>(&format!(
        "{SELECT} where $1 or a.removed_at is null order by a.removed_at is not null, a.name, a.id"
    ))
    .bind(query.removed)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(agents))
}

/// One agent.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Agent id")),
    responses((status = 200, body = Agent), (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Agent>, ApiError> {
    sqlx::query_as::<_, Agent>(&format!("{SELECT} where a.id = $1"))
        .bind(id)
        .fetch_optional(&state.pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no agent {id}")))
}

/// Renames an agent; its id, credentials and history stay.
#[utoipa::path(patch, path = "/api/v1/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Agent id")), request_body = UpdateAgent,
    responses((status = 200, body = Agent), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody),
              (status = 409, description = "The name is taken, or the agent was removed", body = super::error::ErrorBody)))]
pub async fn rename(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateAgent>,
) -> Result<Json<Agent>, ApiError> {
    let old = auth::rename_agent(&state.pool, id, &body.name).await.map_err(|error| match error {
        RenameError::NotFound(_) => ApiError::not_found(error.to_string()),
        RenameError::BadName(message) => ApiError::bad_request(message),
        RenameError::Removed(_) | RenameError::Taken { .. } => ApiError::Conflict(error.to_string()),
        RenameError::Database(error) => ApiError::Database(error),
    })?;
    let detail = serde_json::json!({ "from": old, "to": body.name });
    audit(&state.pool, &caller.name, "agent.rename", &id.to_string(), detail).await?;
    get(State(state), caller, ApiPath(id)).await
}

/// Revokes an agent: its sessions are closed and it cannot reconnect.
#[utoipa::path(post, path = "/api/v1/agents/{id}/revoke", tag = "agents", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Agent id")),
    responses((status = 204, description = "Revoked"), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn revoke(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let previous: Option<(String, Option<OffsetDateTime>)> = sqlx::query_as(
        "update agents a set revoked_at = coalesce(a.revoked_at, now()), connected = false \
         from agents old where a.id = $1 and old.id = a.id returning a.name, old.revoked_at",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    match previous {
        None => Err(ApiError::not_found(format!("no agent {id}"))),
        Some((_, Some(at))) => {
            Err(ApiError::Conflict(format!("agent {id} was already revoked at {}", auth::rfc3339(at))))
        }
        Some((name, None)) => {
            // Sessions of other replicas learn it from the column; this wakes
            // any listener at once.
            sqlx::query("select pg_notify('fleetban_agents', $1)").bind(id.to_string()).execute(&state.pool).await?;
            audit(&state.pool, &caller.name, "agent.revoke", &id.to_string(), serde_json::json!({ "name": name }))
                .await?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// Removes an agent from the fleet: it is revoked (if it was not), leaves the
/// agent list and frees its name; its events, evidence and blocks stay.
#[utoipa::path(delete, path = "/api/v1/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Agent id")),
    responses((status = 204, description = "Removed"), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody),
              (status = 409, description = "Already removed", body = super::error::ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    // Enrollment and renames read names under this lock.
    sqlx::query("select pg_advisory_xact_lock($1)").bind(auth::ENROLL_LOCK).execute(&mut *tx).await?;
    let previous: Option<(String, Option<OffsetDateTime>, Option<OffsetDateTime>)> = sqlx::query_as(
        "update agents a set removed_at = coalesce(a.removed_at, now()), \
           revoked_at = coalesce(a.revoked_at, now()), connected = false \
         from agents old where a.id = $1 and old.id = a.id returning a.name, old.revoked_at, old.removed_at",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    match previous {
        None => Err(ApiError::not_found(format!("no agent {id}"))),
        Some((_, _, Some(at))) => {
            Err(ApiError::Conflict(format!("agent {id} was already removed at {}", auth::rfc3339(at))))
        }
        Some((name, revoked_at, None)) => {
            tx.commit().await?;
            let detail = serde_json::json!({ "name": name, "was_revoked": revoked_at.is_some() });
            audit(&state.pool, &caller.name, "agent.remove", &id.to_string(), detail).await?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}
