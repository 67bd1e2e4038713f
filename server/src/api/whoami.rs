//! `/api/v1/whoami`: the calling token's name and role, so that a client
//! (the dashboard) shows write controls only to tokens that may use them.

use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{Caller, Role};

/// The caller's identity.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name (the audit log's actor).
    pub name: String,
    /// `admin` (read and write) or `read`.
    pub role: Role,
    /// Whether the token may write (block, unblock, allowlist, tokens).
    pub can_write: bool,
}

/// The calling token's name and role.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = WhoAmI), (status = 401, body = super::error::ErrorBody)))]
pub async fn get(caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI { name: caller.name, can_write: caller.role == Role::Admin, role: caller.role })
}
