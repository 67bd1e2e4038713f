//! `/api/v1/replicas`: the server replicas on this database, which one
//! leads the fleet-wide sweeps, and which one answered ([`crate::replica`]).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::replica::ReplicaRow;

/// The replicas and this one.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Replicas {
    /// The id of the replica that answered; `null` when it runs without one
    /// (an API served outside `fleetban-server serve`).
    pub this_id: Option<Uuid>,
    /// Its `replica_name`.
    pub this_name: Option<String>,
    /// Whether it leads now (by its own connection, not its row).
    pub this_leads: bool,
    /// The name of the replica leading now (whose connection holds the
    /// leadership lock); `null` while none does (a handover).
    pub leader: Option<String>,
    /// Every replica with a row, newest first; rows of replicas gone for a
    /// day are deleted.
    pub replicas: Vec<ReplicaRow>,
}

/// The server replicas and their leader.
#[utoipa::path(get, path = "/api/v1/replicas", tag = "operations", security(("bearer" = [])),
    responses((status = 200, body = Replicas), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<Replicas>, ApiError> {
    let replicas = crate::replica::list(&state.pool).await?;
    let leader = replicas.iter().find(|r| r.leader).map(|r| r.name.clone());
    Ok(Json(Replicas {
        this_id: state.replica.as_ref().map(|r| r.id()),
        this_name: state.replica.as_ref().map(|r| r.name().to_owned()),
        this_leads: state.replica.as_ref().is_some_and(|r| r.is_leader()),
        leader,
        replicas,
    }))
}
