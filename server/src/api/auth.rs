//! Bearer tokens of the REST API, their roles, and the audit log.
//!
//! A token is `fbt_` followed by 64 hex digits (256 random bits). Only its
//! sha-256 is stored (`api_tokens.token_hash`); the token itself is printed
//! once by `fleetban-server token create`. Roles: `admin` may read and write,
//! `read` may only read.
//!
//! A token may expire (`expires_at`; `fleetban tokens create --expires 30d`,
//! `fleetban-server token create --expires 30d`); an expired or revoked
//! token is refused with a 401 that says so and how to get a new one.
//! Listings ([`list_tokens`]) show a token's id and first characters
//! (`prefix`), never the token.
//!
//! Invariants: a request without a valid, unrevoked, unexpired token never reaches a
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
    /// The lifetime is zero or too long.
    #[error("token lifetime must be 1 s to {max} s (ten years)", max = crate::auth::MAX_TTL_SECS)]
    BadTtl,
}

/// An API token as listed; the token itself is never shown.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Id (`fleetban tokens revoke ID`).
    pub id: i64,
    /// Name; the audit log's actor.
    pub name: String,
    /// `admin` or `read`.
    pub role: String,
    /// The token's first characters (`fbt_` and 8 hex digits); `null` for
    /// tokens created before prefixes were kept.
    pub prefix: Option<String>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    /// When it last authenticated a request.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<time::OffsetDateTime>,
    /// When it expires; `null` = never.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<time::OffsetDateTime>,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<time::OffsetDateTime>,
    /// Whether it authenticates requests now.
    pub active: bool,
}

/// Every API token, newest first (`all = false`: only usable ones).
pub async fn list_tokens(pool: &PgPool, all: bool) -> Result<Vec<TokenInfo>, sqlx::Error> {
    sqlx::query_as(
        "select * from (select id, name, role, prefix, created_at, last_used_at, expires_at, revoked_at, \
           revoked_at is null and (expires_at is null or expires_at > now()) as active from api_tokens) t \
         where $1 or active order by id desc",
    )
    .bind(all)
    .fetch_all(pool)
    .await
}

/// Revokes API token `id`: it authenticates nothing from now on.
pub async fn revoke_token(pool: &PgPool, id: i64) -> Result<String, crate::auth::RevokeError> {
    use crate::auth::RevokeError;
    let row: Option<(String, Option<time::OffsetDateTime>)> = sqlx::query_as(
        "update api_tokens t set revoked_at = coalesce(t.revoked_at, now()) \
         from api_tokens old where t.id = $1 and old.id = t.id returning t.name, old.revoked_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match row {
        None => Err(RevokeError::NotFound(id)),
        Some((_, Some(at))) => Err(RevokeError::AlreadyRevoked { id, at }),
        Some((name, None)) => Ok(name),
    }
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
    /// Its listed prefix.
    pub prefix: String,
    /// When it expires; `None` = never.
    pub expires_at: Option<time::OffsetDateTime>,
}

/// The sha-256 of a token, as stored.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates a token with `role` that never expires; `name` defaults to
/// `<role>-<id>`.
pub async fn create_token(pool: &PgPool, role: Role, name: Option<&str>) -> Result<NewToken, TokenError> {
    create_token_expiring(pool, role, name, None).await
}

/// Creates a token with `role` that expires after `ttl` (`None` = never);
/// `name` defaults to `<role>-<id>`.
pub async fn create_token_expiring(
    pool: &PgPool,
    role: Role,
    name: Option<&str>,
    ttl: Option<std::time::Duration>,
) -> Result<NewToken, TokenError> {
    if let Some(name) = name
        && (name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control))
    {
        return Err(TokenError::BadName);
    }
    let expires_at = match ttl {
        None => None,
        Some(ttl) if ttl.is_zero() || ttl.as_secs() > crate::auth::MAX_TTL_SECS => return Err(TokenError::BadTtl),
        Some(ttl) => {
            let ttl = time::Duration::try_from(ttl).map_err(|_| TokenError::BadTtl)?;
            Some(time::OffsetDateTime::now_utc().checked_add(ttl).ok_or(TokenError::BadTtl)?)
        }
    };
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let prefix = crate::auth::token_prefix(&token);
    let (id, name): (i64, String) = sqlx::query_as(
        "insert into api_tokens (name, role, token_hash, expires_at, prefix) \
         values (coalesce($1, ''), $2, $3, $4, $5) returning id, name",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(hash_token(&token))
    .bind(expires_at)
    .bind(&prefix)
    .fetch_one(pool)
    .await?;
    let name = if name.is_empty() {
        let generated = format!("{role}-{id}");
        sqlx::query("update api_tokens set name = $2 where id = $1").bind(id).bind(&generated).execute(pool).await?;
        generated
    } else {
        name
    };
    Ok(NewToken { id, name, role, token, prefix, expires_at })
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
        let hash = hash_token(token);
        let row: Option<(i64, String, String)> = sqlx::query_as(
            "update api_tokens set last_used_at = now() \
             where token_hash = $1 and revoked_at is null and (expires_at is null or expires_at > now()) \
             returning id, name, role",
        )
        .bind(&hash)
        .fetch_optional(&state.pool)
        .await?;
        let Some((token_id, name, role)) = row else {
            return Err(refusal(&state.pool, &hash).await?);
        };
        let role =
            Role::parse(&role).ok_or_else(|| ApiError::Internal(format!("api token {token_id} has role {role}")))?;
        Ok(Caller { token_id, name, role })
    }
}

/// How to get a new API token, for error messages.
const NEW_TOKEN: &str = "create a new one with `fleetban tokens create` (or `fleetban-server token create`)";

/// Why the token with `hash` does not authenticate: unknown, revoked or
/// expired.
async fn refusal(pool: &PgPool, hash: &[u8]) -> Result<ApiError, ApiError> {
    let row: Option<(String, Option<time::OffsetDateTime>, Option<time::OffsetDateTime>)> =
        sqlx::query_as("select name, revoked_at, expires_at from api_tokens where token_hash = $1")
            .bind(hash)
            .fetch_optional(pool)
            .await?;
    let message = match row {
        None => "unknown token".to_owned(),
        Some((name, Some(at), _)) => {
            format!("token {name:?} was revoked at {}; {NEW_TOKEN}", crate::auth::rfc3339(at))
        }
        Some((name, None, Some(at))) => {
            format!("token {name:?} expired at {}; {NEW_TOKEN}", crate::auth::rfc3339(at))
        }
        // Expired or revoked between the two statements, or usable again:
        // refuse this request either way.
        Some((name, None, None)) => format!("token {name:?} is not usable; {NEW_TOKEN}"),
    };
    Ok(ApiError::Unauthorized(message))
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
