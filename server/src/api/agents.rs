//! `/api/v1/agents`: the fleet's enrolled agents, and revoking one.
//!
//! Revoking sets `agents.revoked_at`: the agent's credentials stop working at
//! once (the session side refuses revoked agents on `Connect`; a trigger
//! announces the revocation and the server process holding the agent's live
//! session closes it, or failing that its next heartbeat or report does), and
//! it is shown offline.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::{Admin, Caller, audit};
use super::error::{ApiError, ApiPath};

/// An agent as the API shows it.
#[derive(Debug, Serialize, sqlx::FromRow, ToSchema)]
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
    /// The host's own addresses (never blocked).
    pub addresses: Vec<String>,
    /// When it enrolled.
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    /// When it was revoked; `null` while it may connect.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

const SELECT: &str = "select a.id, a.name, a.hostname, a.version, a.connected and a.revoked_at is null as connected, \
     a.last_seen, a.blocklist_version, a.firewall_entries, a.enrolled_at, a.revoked_at, \
     coalesce((select array_agg(host(x.address) order by x.address) from agent_addresses x \
               where x.agent_id = a.id), '{}') as addresses \
     from agents a";

/// Every agent, by name.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", security(("bearer" = [])),
    responses((status = 200, body = [Agent]), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<Vec<Agent>>, ApiError> {
    let agents = sqlx::query_as::<_, Agent>(&format!("{SELECT} order by a.name, a.id")).fetch_all(&state.pool).await?;
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

/// Revokes an agent: its sessions are closed and it cannot reconnect.
#[utoipa::path(delete, path = "/api/v1/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Agent id")),
    responses((status = 204, description = "Revoked"), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn revoke(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let previous: Option<Option<OffsetDateTime>> = sqlx::query_scalar(
        "update agents set revoked_at = coalesce(revoked_at, now()), connected = false \
         where id = $1 returning (select revoked_at from agents where id = $1)",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    match previous {
        None => Err(ApiError::not_found(format!("no agent {id}"))),
        Some(Some(at)) => Err(ApiError::Conflict(format!("agent {id} was already revoked at {at}"))),
        Some(None) => {
            // Sessions of other replicas learn it from the column; this wakes
            // any listener at once.
            sqlx::query("select pg_notify('fleetban_agents', $1)").bind(id.to_string()).execute(&state.pool).await?;
            audit(&state.pool, &caller.name, "agent.revoke", &id.to_string(), serde_json::json!({})).await?;
            Ok(StatusCode::NO_CONTENT)
        }
    }
}
