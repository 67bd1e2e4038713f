//! Enrollment tokens and agent credentials.
//!
//! An operator creates an enrollment token (`fleetban-server enroll-token
//! create`); an agent trades it once for an agent id and an agent secret, and
//! then authenticates every `Connect` with both in request metadata.
//!
//! Invariants:
//! - Tokens and secrets are 256-bit random values from the operating system;
//!   only their SHA-256 is stored, so a database leak does not leak
//!   credentials. Comparisons of hashes are constant-time.
//! - Neither a token nor a secret is ever logged or put into an error message.
//! - A token's use count is decremented in the same statement that checks it,
//!   so concurrent enrollments cannot overspend it.

use std::net::IpAddr;
use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use uuid::Uuid;

/// Prefix of every enrollment token, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "fbe_";
/// Prefix of every agent secret.
pub const SECRET_PREFIX: &str = "fbs_";

/// Longest host name accepted at enrollment, bytes.
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest version string accepted, bytes.
pub const MAX_VERSION_BYTES: usize = 64;
/// Most own addresses an agent may report.
pub const MAX_AGENT_ADDRESSES: usize = 1024;

/// Why a credential was refused or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is unknown, used up or expired.
    #[error("enrollment token is invalid, used up or expired")]
    InvalidToken,
    /// The agent id is unknown or the secret does not match.
    #[error("unknown agent or wrong secret")]
    InvalidCredentials,
    /// The agent was revoked by an operator.
    #[error("agent {0} is revoked")]
    Revoked(Uuid),
    /// A field of the request is out of bounds.
    #[error("{0}")]
    BadRequest(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// A new agent's identity, returned once by [`enroll`].
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The agent id.
    pub agent_id: Uuid,
    /// The agent secret in clear text; stored nowhere on the server.
    pub secret: String,
}

/// A random credential with `prefix`: 32 random bytes, hex.
fn random_credential(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// SHA-256 of a credential's text.
pub fn hash_credential(credential: &str) -> Vec<u8> {
    Sha256::digest(credential.as_bytes()).to_vec()
}

/// Creates an enrollment token good for `uses` enrollments within `ttl`;
/// returns the token text (shown once).
pub async fn create_enrollment_token(pool: &PgPool, uses: u32, ttl: Duration, note: &str) -> Result<String, AuthError> {
    if uses == 0 {
        return Err(AuthError::BadRequest("uses must be at least 1".into()));
    }
    let uses = i32::try_from(uses).map_err(|_| AuthError::BadRequest("uses is too large".into()))?;
    let ttl = time::Duration::try_from(ttl).map_err(|_| AuthError::BadRequest("ttl is too large".into()))?;
    let expires_at =
        OffsetDateTime::now_utc().checked_add(ttl).ok_or_else(|| AuthError::BadRequest("ttl is too large".into()))?;
    let token = random_credential(TOKEN_PREFIX);
    sqlx::query("insert into enrollment_tokens (token_hash, uses_left, expires_at, note) values ($1, $2, $3, $4)")
        .bind(hash_credential(&token))
        .bind(uses)
        .bind(expires_at)
        .bind(note)
        .execute(pool)
        .await?;
    Ok(token)
}

/// Trades `token` for a new agent identity, recording the host's own
/// addresses (never blocked).
pub async fn enroll(
    pool: &PgPool,
    token: &str,
    hostname: &str,
    version: &str,
    addresses: &[IpAddr],
) -> Result<Enrolled, AuthError> {
    check_host_fields(hostname, version, addresses.len())?;
    let mut tx = pool.begin().await?;
    let token_id: Option<i64> = sqlx::query_scalar(
        "update enrollment_tokens set uses_left = uses_left - 1 \
         where token_hash = $1 and uses_left > 0 and expires_at > now() returning id",
    )
    .bind(hash_credential(token))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(token_id) = token_id else {
        return Err(AuthError::InvalidToken);
    };
    let agent_id = Uuid::new_v4();
    let secret = random_credential(SECRET_PREFIX);
    sqlx::query(
        "insert into agents (id, name, hostname, version, secret_hash, enrollment_token_id) \
         values ($1, $2, $2, $3, $4, $5)",
    )
    .bind(agent_id)
    .bind(hostname)
    .bind(version)
    .bind(hash_credential(&secret))
    .bind(token_id)
    .execute(&mut *tx)
    .await?;
    replace_addresses(&mut tx, agent_id, addresses).await?;
    tx.commit().await?;
    Ok(Enrolled { agent_id, secret })
}

/// Bounds on the free-text fields an agent reports about itself.
pub fn check_host_fields(hostname: &str, version: &str, addresses: usize) -> Result<(), AuthError> {
    if hostname.is_empty() || hostname.len() > MAX_HOSTNAME_BYTES || hostname.contains('\0') {
        return Err(AuthError::BadRequest(format!("hostname must be 1 to {MAX_HOSTNAME_BYTES} bytes")));
    }
    if version.len() > MAX_VERSION_BYTES || version.contains('\0') {
        return Err(AuthError::BadRequest(format!("version must be at most {MAX_VERSION_BYTES} bytes")));
    }
    if addresses > MAX_AGENT_ADDRESSES {
        return Err(AuthError::BadRequest(format!("at most {MAX_AGENT_ADDRESSES} addresses")));
    }
    Ok(())
}

/// Replaces the agent's own addresses with `addresses`.
pub async fn replace_addresses(
    conn: &mut sqlx::PgConnection,
    agent_id: Uuid,
    addresses: &[IpAddr],
) -> Result<(), sqlx::Error> {
    // Canonical, so that policy finds `::ffff:192.0.2.1` as 192.0.2.1.
    let addresses: Vec<IpAddr> = addresses.iter().map(|a| fleetban_proto::canonical_ip(*a)).collect();
    sqlx::query("delete from agent_addresses where agent_id = $1").bind(agent_id).execute(&mut *conn).await?;
    sqlx::query("insert into agent_addresses (agent_id, address) select $1, a from unnest($2::inet[]) as t(a) on conflict do nothing")
        .bind(agent_id)
        .bind(&addresses)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Checks an agent's id and secret; revoked agents are refused.
pub async fn authenticate(pool: &PgPool, agent_id: Uuid, secret: &str) -> Result<(), AuthError> {
    let row: Option<(Vec<u8>, Option<OffsetDateTime>)> =
        sqlx::query_as("select secret_hash, revoked_at from agents where id = $1")
            .bind(agent_id)
            .fetch_optional(pool)
            .await?;
    // Hash even for an unknown agent so that both paths cost the same.
    let presented = hash_credential(secret);
    let Some((stored, revoked_at)) = row else {
        return Err(AuthError::InvalidCredentials);
    };
    if !bool::from(stored.ct_eq(&presented)) {
        return Err(AuthError::InvalidCredentials);
    }
    if revoked_at.is_some() {
        return Err(AuthError::Revoked(agent_id));
    }
    Ok(())
}

/// Parses a duration such as `90s`, `15m`, `24h` or `7d` (a bare number is
/// seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().map_err(|_| format!("invalid duration {text:?}: expected e.g. 24h"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3_600),
        "d" => n.checked_mul(86_400),
        _ => None,
    };
    match secs {
        Some(0) => Err(format!("invalid duration {text:?}: must be positive")),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(format!("invalid duration {text:?}: use a number with s, m, h or d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_random_prefixed_and_hashed() {
        let a = random_credential(TOKEN_PREFIX);
        let b = random_credential(TOKEN_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64, "{a}");
        assert_eq!(hash_credential(&a).len(), 32);
        assert_ne!(hash_credential(&a), hash_credential(&b));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "h", "0h", "5w", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn token_is_spent_and_secret_authenticates(pool: PgPool) {
        let token = create_enrollment_token(&pool, 1, Duration::from_secs(60), "").await.unwrap();
        let addr: IpAddr = "192.0.2.10".parse().unwrap();
        let agent = enroll(&pool, &token, "mx1.example", "0.1.0", &[addr]).await.unwrap();
        assert!(matches!(enroll(&pool, &token, "mx2", "0.1.0", &[]).await, Err(AuthError::InvalidToken)));
        authenticate(&pool, agent.agent_id, &agent.secret).await.unwrap();
        let wrong = authenticate(&pool, agent.agent_id, "fbs_00").await;
        assert!(matches!(wrong, Err(AuthError::InvalidCredentials)));
        let unknown = authenticate(&pool, Uuid::new_v4(), &agent.secret).await;
        assert!(matches!(unknown, Err(AuthError::InvalidCredentials)));
        let stored: Vec<u8> = sqlx::query_scalar("select secret_hash from agents").fetch_one(&pool).await.unwrap();
        assert_ne!(stored, agent.secret.as_bytes(), "secret stored in clear");
        let n: i64 = sqlx::query_scalar("select count(*) from agent_addresses where address = '192.0.2.10'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 1);
        sqlx::query("update agents set revoked_at = now()").execute(&pool).await.unwrap();
        assert!(matches!(authenticate(&pool, agent.agent_id, &agent.secret).await, Err(AuthError::Revoked(_))));
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn expired_token_is_refused(pool: PgPool) {
        let token = create_enrollment_token(&pool, 5, Duration::from_secs(60), "").await.unwrap();
        sqlx::query("update enrollment_tokens set expires_at = now() - interval '1 second'")
            .execute(&pool)
            .await
            .unwrap();
        assert!(matches!(enroll(&pool, &token, "mx1", "0.1.0", &[]).await, Err(AuthError::InvalidToken)));
    }
}
