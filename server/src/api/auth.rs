//! Bearer tokens of the REST API, their roles, and the audit log.
//!
//! A token is `fbt_` followed by 64 hex digits (256 random bits). Only its
//! sha-256 is stored (`api_tokens.token_hash`); the token itself is printed
//! once by `fleetban-server token create`. Roles: `admin` may read and write,
//! `read` may only read.
//!
//! Invariants: a request without a valid, unrevoked token never reaches a
//! handler that needs [`Caller`] (401); a `read` token never reaches one that
//! needs [`Admin`] (403); every successful write calls [`audit`] with the
//! token's name as the actor.

use std::fmt;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use super::AppState;
use super::error::ApiError;

/// The prefix of every API token.
pub const TOKEN_PREFIX: &str = "fbt_";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read and write.
    Admin,
    /// Read only.
    Read,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Read => "read",
        }
    }

    /// Parses a stored or command-line name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "admin" => Some(Role::Admin),
            "read" => Some(Role::Read),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of token management.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The database failed.
    #[error("api token database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The name is empty or too long.
    #[error("token name must be 1 to 128 characters")]
    BadName,
}

/// A newly created token; `token` is shown once and never stored.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// Row id.
    pub id: i64,
    /// Its name (the audit log's actor).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The bearer token.
    pub token: String,
}

/// The sha-256 of a token, as stored.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates a token with `role`; `name` defaults to `<role>-<id>`.
pub async fn create_token(pool: &PgPool, role: Role, name: Option<&str>) -> Result<NewToken, TokenError> {
    if let Some(name) = name
        && (name.is_empty() || name.chars().count() > 128)
    {
        return Err(TokenError::BadName);
    }
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let (id, name): (i64, String) = sqlx::query_as(
        "insert into api_tokens (name, role, token_hash) values (coalesce($1, ''), $2, $3) returning id, name",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(hash_token(&token))
    .fetch_one(pool)
    .await?;
    let name = if name.is_empty() {
        let generated = format!("{role}-{id}");
        sqlx::query("update api_tokens set name = $2 where id = $1").bind(id).bind(&generated).execute(pool).await?;
        generated
    } else {
        name
    };
    Ok(NewToken { id, name, role, token })
}

/// The authenticated caller of a request: any valid token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Token id.
    pub token_id: i64,
    /// Token name; the audit log's actor.
    pub name: String,
    /// Token role.
    pub role: Role,
}

/// A caller whose token has the `admin` role.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token (Authorization: Bearer ...)".to_owned()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("malformed Authorization header; expected Bearer".to_owned()))?;
        let row: Option<(i64, String, String)> = sqlx::query_as(
            "update api_tokens set last_used_at = now() \
             where token_hash = $1 and revoked_at is null returning id, name, role",
        )
        .bind(hash_token(token))
        .fetch_optional(&state.pool)
        .await?;
        let (token_id, name, role) =
            row.ok_or_else(|| ApiError::Unauthorized("unknown or revoked token".to_owned()))?;
        let role =
            Role::parse(&role).ok_or_else(|| ApiError::Internal(format!("api token {token_id} has role {role}")))?;
        Ok(Caller { token_id, name, role })
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if caller.role != Role::Admin {
            return Err(ApiError::Forbidden(format!("token {} has the read role; this needs admin", caller.name)));
        }
        Ok(Admin(caller))
    }
}

/// Appends a row to the audit log: `actor` did `action` on `target`.
pub async fn audit(
    pool: &PgPool,
    actor: &str,
    action: &str,
    target: &str,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("insert into audit_log (actor, action, target, detail) values ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(detail)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for role in [Role::Admin, Role::Read] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn tokens_are_stored_hashed(pool: PgPool) {
        let token = create_token(&pool, Role::Read, None).await.unwrap();
        assert!(token.token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.token.len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(token.name, format!("read-{}", token.id));
        let stored: Vec<u8> = sqlx::query_scalar("select token_hash from api_tokens where id = $1")
            .bind(token.id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(stored, hash_token(&token.token));
        assert_ne!(stored, token.token.as_bytes());
        let other = create_token(&pool, Role::Admin, Some("ops")).await.unwrap();
        assert_ne!(other.token, token.token);
        assert!(matches!(create_token(&pool, Role::Admin, Some("")).await, Err(TokenError::BadName)));
    }
}
