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
//! - Enrollments (and agent renames, [`rename_agent`]) serialise on one
//!   advisory lock ([`ENROLL_LOCK`]) held by their transaction, so a token's
//!   uses cannot be overspent and two hosts cannot claim one name at once.
//!
//! # Agent identity
//!
//! An agent is its name in the fleet (`fleetban-agent enroll --name`, default
//! the hostname; compared case-insensitively) plus the host id the agent
//! keeps in its state directory (`EnrollRequest.host_id`). Enrolling again
//! with the same name and host id *replaces* that agent's credentials: the
//! agent id, its events, evidence and blocks stay, the old secret stops
//! working at once and a session still open with it is closed. A different
//! host (another or no host id) asking for a name a live agent holds is
//! refused ([`AuthError::NameTaken`]), and so is a host already enrolled
//! under another name ([`AuthError::HostEnrolled`]); an agent an operator
//! revoked must be removed before its host enrolls again
//! ([`AuthError::AgentRevoked`]). Removed agents (`removed_at`) hold no name.

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

/// Longest agent name, characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest host id, bytes.
pub const MAX_HOST_ID_BYTES: usize = 128;
/// The advisory lock key enrollments and renames hold (`fleetban1` in ASCII).
pub const ENROLL_LOCK: i64 = 0x666c_6565_7462_6e31;

/// How to make a new enrollment token, for error messages.
const NEW_ENROLL_TOKEN: &str =
    "create a new one with `fleetban enroll-token create` (or `fleetban-server enroll-token create`)";

/// Why a credential was refused or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No enrollment token has this value.
    #[error("unknown enrollment token")]
    InvalidToken,
    /// The enrollment token expired.
    #[error("enrollment token expired at {}; {NEW_ENROLL_TOKEN}", rfc3339(*.0))]
    TokenExpired(OffsetDateTime),
    /// The enrollment token has no uses left.
    #[error("enrollment token has no uses left; {NEW_ENROLL_TOKEN}")]
    TokenUsedUp,
    /// An operator revoked the enrollment token.
    #[error("enrollment token was revoked; {NEW_ENROLL_TOKEN}")]
    TokenRevoked,
    /// Another host's agent holds the name.
    #[error(
        "the name {name:?} is already used by agent {agent_id} (host {hostname:?}) on another host; enroll with \
         another --name, or remove that agent first (`fleetban agents remove {agent_id}`)"
    )]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The agent holding it.
        agent_id: Uuid,
        /// That agent's host name.
        hostname: String,
    },
    /// This host is enrolled under another name.
    #[error(
        "this host is already enrolled as agent {agent_id} named {name:?}; enroll with --name {name:?} to replace \
         its credentials, or remove it first (`fleetban agents remove {agent_id}`); a host cloned from another \
         needs its own /etc/machine-id and no copied host-id file in the agent's state directory"
    )]
    HostEnrolled {
        /// The name it is enrolled under.
        name: String,
        /// Its agent id.
        agent_id: Uuid,
    },
    /// The agent this host would replace was revoked by an operator.
    #[error(
        "agent {agent_id} named {name:?} was revoked by an operator; remove it (`fleetban agents remove \
         {agent_id}`) before this host enrolls again"
    )]
    AgentRevoked {
        /// Its name.
        name: String,
        /// Its agent id.
        agent_id: Uuid,
    },
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
    /// The agent's name.
    pub name: String,
    /// The credentials of an existing agent were replaced (same id).
    pub reenrolled: bool,
}

/// What an agent presents to enroll.
#[derive(Debug, Clone, Copy)]
pub struct Enrollment<'a> {
    /// The enrollment token.
    pub token: &'a str,
    /// The name it asks for; `None` or empty = `hostname`.
    pub name: Option<&'a str>,
    /// Its host id; `None` or empty = not known (older agents).
    pub host_id: Option<&'a str>,
    /// The host's name.
    pub hostname: &'a str,
    /// The agent's version.
    pub version: &'a str,
    /// The host's own addresses.
    pub addresses: &'a [IpAddr],
}

/// An enrollment token as listed; the token itself is never shown.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EnrollmentToken {
    /// Id (`fleetban enroll-token revoke ID`).
    pub id: i64,
    /// The token's first characters (`fbe_` and 8 hex digits); `null` for
    /// tokens created before prefixes were kept.
    pub prefix: Option<String>,
    /// The operator's note.
    pub note: String,
    /// Enrollments it still allows.
    pub uses_left: i32,
    /// Enrollments it allowed when created (`null` if not recorded).
    pub uses_granted: Option<i32>,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When an agent last enrolled with it.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// When it expires.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Whether an agent may enroll with it now.
    pub active: bool,
}

/// A newly created enrollment token; `token` is shown once.
#[derive(Debug, Clone)]
pub struct NewEnrollmentToken {
    /// Row id.
    pub id: i64,
    /// The token text.
    pub token: String,
    /// Its listed prefix.
    pub prefix: String,
    /// When it expires.
    pub expires_at: OffsetDateTime,
}

/// Why revoking a token did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// No token has this id.
    #[error("no token {0}")]
    NotFound(i64),
    /// It was revoked before.
    #[error("token {id} was already revoked at {}", rfc3339(*.at))]
    AlreadyRevoked {
        /// The token id.
        id: i64,
        /// When.
        at: OffsetDateTime,
    },
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// `t` as RFC 3339 (UTC, whole seconds).
pub fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The listed prefix of a token: its type prefix and 8 hex digits.
pub fn token_prefix(token: &str) -> String {
    token.chars().take(12).collect()
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

/// Longest lifetime of a token, seconds (ten years).
pub const MAX_TTL_SECS: u64 = 10 * 365 * 86_400;

/// Creates an enrollment token good for `uses` enrollments within `ttl`;
/// returns the token text (shown once).
pub async fn create_enrollment_token(pool: &PgPool, uses: u32, ttl: Duration, note: &str) -> Result<String, AuthError> {
    Ok(new_enrollment_token(pool, uses, ttl, note).await?.token)
}

/// Creates an enrollment token good for `uses` enrollments within `ttl`.
pub async fn new_enrollment_token(
    pool: &PgPool,
    uses: u32,
    ttl: Duration,
    note: &str,
) -> Result<NewEnrollmentToken, AuthError> {
    if uses == 0 {
        return Err(AuthError::BadRequest("uses must be at least 1".into()));
    }
    let uses = i32::try_from(uses).map_err(|_| AuthError::BadRequest("uses is too large".into()))?;
    if ttl.as_secs() > MAX_TTL_SECS || ttl.is_zero() {
        return Err(AuthError::BadRequest(format!("ttl must be 1 s to {MAX_TTL_SECS} s (ten years)")));
    }
    if note.chars().count() > 1024 {
        return Err(AuthError::BadRequest("note must be at most 1024 characters".into()));
    }
    let ttl = time::Duration::try_from(ttl).map_err(|_| AuthError::BadRequest("ttl is too large".into()))?;
    let expires_at =
        OffsetDateTime::now_utc().checked_add(ttl).ok_or_else(|| AuthError::BadRequest("ttl is too large".into()))?;
    let token = random_credential(TOKEN_PREFIX);
    let prefix = token_prefix(&token);
    let id: i64 = sqlx::query_scalar(
        "insert into enrollment_tokens (token_hash, uses_left, uses_granted, expires_at, note, prefix) \
         values ($1, $2, $2, $3, $4, $5) returning id",
    )
    .bind(hash_credential(&token))
    .bind(uses)
    .bind(expires_at)
    .bind(note)
    .bind(&prefix)
    .fetch_one(pool)
    .await?;
    Ok(NewEnrollmentToken { id, token, prefix, expires_at })
}

/// Every enrollment token, newest first (`all = false`: only those an agent
/// may still enroll with).
pub async fn list_enrollment_tokens(pool: &PgPool, all: bool) -> Result<Vec<EnrollmentToken>, sqlx::Error> {
    sqlx::query_as(
        "select * from (select id, prefix, note, uses_left, uses_granted, created_at, last_used_at, expires_at, \
           revoked_at, revoked_at is null and uses_left > 0 and expires_at > now() as active \
           from enrollment_tokens) t where $1 or active order by id desc",
    )
    .bind(all)
    .fetch_all(pool)
    .await
}

/// Revokes enrollment token `id`: no agent can enroll with it any more
/// (agents that enrolled with it keep working).
pub async fn revoke_enrollment_token(pool: &PgPool, id: i64) -> Result<(), RevokeError> {
    let previous: Option<Option<OffsetDateTime>> = sqlx::query_scalar(
        "update enrollment_tokens t set revoked_at = coalesce(t.revoked_at, now()) \
         from enrollment_tokens old where t.id = $1 and old.id = t.id returning old.revoked_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    match previous {
        None => Err(RevokeError::NotFound(id)),
        Some(Some(at)) => Err(RevokeError::AlreadyRevoked { id, at }),
        Some(None) => Ok(()),
    }
}

/// Trades `token` for a new agent identity named after `hostname`, without
/// a host id (what agents that send neither a name nor a host id get).
pub async fn enroll(
    pool: &PgPool,
    token: &str,
    hostname: &str,
    version: &str,
    addresses: &[IpAddr],
) -> Result<Enrolled, AuthError> {
    enroll_agent(pool, &Enrollment { token, name: None, host_id: None, hostname, version, addresses }).await
}

/// Checks an agent name: 1 to [`MAX_NAME_CHARS`] characters, no control
/// characters, not only white space.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(format!("name must be 1 to {MAX_NAME_CHARS} characters without control characters"));
    }
    Ok(())
}

/// An enrollment token as enrollment checks it.
#[derive(sqlx::FromRow)]
struct EnrollTokenRow {
    id: i64,
    uses_left: i32,
    expires_at: OffsetDateTime,
    expired: bool,
    revoked: bool,
}

/// A live agent holding the name an agent enrolls with.
#[derive(sqlx::FromRow)]
struct NameHolder {
    id: Uuid,
    host_id: Option<String>,
    hostname: String,
    revoked: bool,
}

/// Trades an enrollment token for an agent identity (see "Agent identity"
/// in the module documentation): a new agent, or new credentials for the
/// agent of the same name and host. The token's use is spent, and the
/// enrollment audited (actor `enroll-token:<id>`), only when it succeeds.
pub async fn enroll_agent(pool: &PgPool, request: &Enrollment<'_>) -> Result<Enrolled, AuthError> {
    let Enrollment { token, hostname, version, addresses, .. } = *request;
    check_host_fields(hostname, version, addresses.len())?;
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock($1)").bind(ENROLL_LOCK).execute(&mut *tx).await?;
    let row: Option<EnrollTokenRow> = sqlx::query_as(
        "select id, uses_left, expires_at, expires_at <= now() as expired, revoked_at is not null as revoked \
         from enrollment_tokens where token_hash = $1 for update",
    )
    .bind(hash_credential(token))
    .fetch_optional(&mut *tx)
    .await?;
    let token_id = match row {
        None => return Err(AuthError::InvalidToken),
        Some(t) if t.revoked => return Err(AuthError::TokenRevoked),
        Some(t) if t.expired => return Err(AuthError::TokenExpired(t.expires_at)),
        Some(t) if t.uses_left <= 0 => return Err(AuthError::TokenUsedUp),
        Some(t) => t.id,
    };
    // Checked after the token, so that a caller without one learns nothing
    // more. A name defaulted from the hostname is bounded as the hostname
    // always was (older agents keep enrolling as before).
    let name = match request.name.filter(|n| !n.is_empty()) {
        Some(name) => {
            check_name(name).map_err(AuthError::BadRequest)?;
            name
        }
        None => hostname,
    };
    let host_id = request.host_id.filter(|h| !h.is_empty());
    if let Some(h) = host_id
        && (h.len() > MAX_HOST_ID_BYTES || !h.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(AuthError::BadRequest(format!(
            "host_id must be at most {MAX_HOST_ID_BYTES} printable ASCII bytes"
        )));
    }

    // Live agents holding the name (older versions allowed duplicates).
    let holders: Vec<NameHolder> = sqlx::query_as(
        "select id, host_id, hostname, revoked_at is not null as revoked from agents \
         where lower(name) = lower($1) and removed_at is null order by enrolled_at, id",
    )
    .bind(name)
    .fetch_all(&mut *tx)
    .await?;
    let same_host = holders.iter().find(|h| host_id.is_some() && h.host_id.as_deref() == host_id);
    let replace = match (same_host, holders.first()) {
        (Some(holder), _) if holder.revoked => {
            return Err(AuthError::AgentRevoked { name: name.to_owned(), agent_id: holder.id });
        }
        (Some(holder), _) => Some(holder.id),
        (None, Some(holder)) => {
            return Err(AuthError::NameTaken {
                name: name.to_owned(),
                agent_id: holder.id,
                hostname: holder.hostname.clone(),
            });
        }
        (None, None) => None,
    };
    if replace.is_none()
        && let Some(host_id) = host_id
    {
        let enrolled: Option<(Uuid, String)> =
            sqlx::query_as("select id, name from agents where host_id = $1 and removed_at is null")
                .bind(host_id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((agent_id, name)) = enrolled {
            return Err(AuthError::HostEnrolled { name, agent_id });
        }
    }

    let secret = random_credential(SECRET_PREFIX);
    let agent_id = match replace {
        Some(agent_id) => {
            sqlx::query(
                "update agents set secret_hash = $2, hostname = $3, version = $4, enrollment_token_id = $5, \
                 reenrolled_at = now() where id = $1",
            )
            .bind(agent_id)
            .bind(hash_credential(&secret))
            .bind(hostname)
            .bind(version)
            .bind(token_id)
            .execute(&mut *tx)
            .await?;
            // A session still open with the old secret is closed (sessions
            // re-check their credentials when the id is announced).
            sqlx::query("select pg_notify('fleetban_revoked', $1)")
                .bind(agent_id.to_string())
                .execute(&mut *tx)
                .await?;
            agent_id
        }
        None => {
            let agent_id = Uuid::new_v4();
            sqlx::query(
                "insert into agents (id, name, hostname, version, secret_hash, enrollment_token_id, host_id) \
                 values ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(agent_id)
            .bind(name)
            .bind(hostname)
            .bind(version)
            .bind(hash_credential(&secret))
            .bind(token_id)
            .bind(host_id)
            .execute(&mut *tx)
            .await?;
            agent_id
        }
    };
    sqlx::query("update enrollment_tokens set uses_left = uses_left - 1, last_used_at = now() where id = $1")
        .bind(token_id)
        .execute(&mut *tx)
        .await?;
    replace_addresses(&mut tx, agent_id, addresses).await?;
    let action = if replace.is_some() { "agent.reenroll" } else { "agent.enroll" };
    sqlx::query("insert into audit_log (actor, action, target, detail) values ($1, $2, $3, $4)")
        .bind(format!("enroll-token:{token_id}"))
        .bind(action)
        .bind(agent_id.to_string())
        .bind(serde_json::json!({ "name": name, "hostname": hostname, "version": version }))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Enrolled { agent_id, secret, name: name.to_owned(), reenrolled: replace.is_some() })
}

/// Why renaming an agent did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RenameError {
    /// No live agent has this id.
    #[error("no agent {0}")]
    NotFound(Uuid),
    /// The agent was removed from the fleet.
    #[error("agent {0} was removed")]
    Removed(Uuid),
    /// The name is not acceptable.
    #[error("{0}")]
    BadName(String),
    /// Another live agent holds the name.
    #[error("the name {name:?} is already used by agent {holder}")]
    Taken {
        /// The name.
        name: String,
        /// The agent holding it.
        holder: Uuid,
    },
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Renames agent `id` to `name`; returns the old name. The agent keeps its
/// id, credentials and history; its host must enroll with the new name from
/// now on to replace its credentials.
pub async fn rename_agent(pool: &PgPool, id: Uuid, name: &str) -> Result<String, RenameError> {
    check_name(name).map_err(RenameError::BadName)?;
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock($1)").bind(ENROLL_LOCK).execute(&mut *tx).await?;
    let row: Option<(String, Option<OffsetDateTime>)> =
        sqlx::query_as("select name, removed_at from agents where id = $1 for update")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let old = match row {
        None => return Err(RenameError::NotFound(id)),
        Some((_, Some(_))) => return Err(RenameError::Removed(id)),
        Some((old, None)) => old,
    };
    let holder: Option<Uuid> = sqlx::query_scalar(
        "select id from agents where lower(name) = lower($1) and removed_at is null and id <> $2 limit 1",
    )
    .bind(name)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(holder) = holder {
        return Err(RenameError::Taken { name: name.to_owned(), holder });
    }
    sqlx::query("update agents set name = $2 where id = $1").bind(id).bind(name).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(old)
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

/// Parses a duration such as `90s`, `15m`, `24h`, `7d` or `2w` (a bare
/// number is seconds); zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::units::positive_duration(text)
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
        assert_eq!(parse_duration("2w").unwrap(), Duration::from_secs(1_209_600));
        for bad in ["", "h", "0h", "5y", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn token_is_spent_and_secret_authenticates(pool: PgPool) {
        let token = create_enrollment_token(&pool, 1, Duration::from_secs(60), "").await.unwrap();
        let addr: IpAddr = "192.0.2.10".parse().unwrap();
        let agent = enroll(&pool, &token, "mx1.example", "0.1.0", &[addr]).await.unwrap();
        assert!(matches!(enroll(&pool, &token, "mx2", "0.1.0", &[]).await, Err(AuthError::TokenUsedUp)));
        assert!(matches!(enroll(&pool, "fbe_00", "mx2", "0.1.0", &[]).await, Err(AuthError::InvalidToken)));
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
        let error = enroll(&pool, &token, "mx1", "0.1.0", &[]).await.unwrap_err();
        assert!(matches!(error, AuthError::TokenExpired(_)), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("expired at") && message.contains("enroll-token create"), "{message}");
        // Nothing was spent or written.
        let (uses, agents): (i32, i64) =
            sqlx::query_as("select uses_left, (select count(*) from agents) from enrollment_tokens")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((uses, agents), (5, 0));
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn revoked_token_is_refused_and_listed(pool: PgPool) {
        let token = new_enrollment_token(&pool, 5, Duration::from_secs(3600), "rollout").await.unwrap();
        assert_eq!(token.prefix, token.token[..12]);
        let listed = list_enrollment_tokens(&pool, false).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].prefix.as_deref(), Some(token.prefix.as_str()));
        assert!(listed[0].active && listed[0].uses_granted == Some(5));
        revoke_enrollment_token(&pool, token.id).await.unwrap();
        assert!(matches!(revoke_enrollment_token(&pool, token.id).await, Err(RevokeError::AlreadyRevoked { .. })));
        assert!(matches!(revoke_enrollment_token(&pool, 999).await, Err(RevokeError::NotFound(999))));
        let error = enroll(&pool, &token.token, "mx1", "0.1.0", &[]).await.unwrap_err();
        assert!(matches!(error, AuthError::TokenRevoked), "{error:?}");
        assert!(list_enrollment_tokens(&pool, false).await.unwrap().is_empty());
        let all = list_enrollment_tokens(&pool, true).await.unwrap();
        assert!(!all[0].active && all[0].revoked_at.is_some());
    }

    fn host<'a>(token: &'a str, name: &'a str, host_id: &'a str) -> Enrollment<'a> {
        Enrollment {
            token,
            name: Some(name),
            host_id: Some(host_id),
            hostname: "mx1.example.net",
            version: "0.2.0",
            addresses: &[],
        }
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn re_enrolling_a_host_replaces_its_credentials(pool: PgPool) {
        let token = create_enrollment_token(&pool, 10, Duration::from_secs(60), "").await.unwrap();
        let first = enroll_agent(&pool, &host(&token, "mx1", "host-a")).await.unwrap();
        assert!(!first.reenrolled);
        let again = enroll_agent(&pool, &host(&token, "MX1", "host-a")).await.unwrap();
        assert!(again.reenrolled);
        assert_eq!(again.agent_id, first.agent_id, "same agent id");
        assert!(matches!(authenticate(&pool, first.agent_id, &first.secret).await, Err(AuthError::InvalidCredentials)));
        authenticate(&pool, again.agent_id, &again.secret).await.unwrap();
        let n: i64 = sqlx::query_scalar("select count(*) from agents").fetch_one(&pool).await.unwrap();
        assert_eq!(n, 1, "no second agent");

        // Another host asking for the name is refused, naming the holder.
        let taken = enroll_agent(&pool, &host(&token, "mx1", "host-b")).await.unwrap_err();
        assert!(matches!(&taken, AuthError::NameTaken { agent_id, .. } if *agent_id == first.agent_id), "{taken:?}");
        assert!(taken.to_string().contains(&first.agent_id.to_string()), "{taken}");
        // So is an agent without a host id (older versions) or by hostname.
        assert!(matches!(enroll(&pool, &token, "mx1", "0.1.0", &[]).await, Err(AuthError::NameTaken { .. })));
        // The same host under another name is refused too.
        let other = enroll_agent(&pool, &host(&token, "mx1-new", "host-a")).await.unwrap_err();
        assert!(matches!(other, AuthError::HostEnrolled { .. }), "{other:?}");
        // Refusals spend nothing: 10 uses, 2 enrollments.
        let uses: i32 = sqlx::query_scalar("select uses_left from enrollment_tokens").fetch_one(&pool).await.unwrap();
        assert_eq!(uses, 8);

        // A revoked agent's host must be removed before it enrolls again.
        sqlx::query("update agents set revoked_at = now()").execute(&pool).await.unwrap();
        let revoked = enroll_agent(&pool, &host(&token, "mx1", "host-a")).await.unwrap_err();
        assert!(matches!(revoked, AuthError::AgentRevoked { .. }), "{revoked:?}");
        sqlx::query("update agents set removed_at = now()").execute(&pool).await.unwrap();
        let fresh = enroll_agent(&pool, &host(&token, "mx1", "host-a")).await.unwrap();
        assert!(!fresh.reenrolled);
        assert_ne!(fresh.agent_id, first.agent_id);

        // Renames: to a free name, not to a taken one.
        let mx2 = enroll_agent(&pool, &host(&token, "mx2", "host-c")).await.unwrap();
        assert!(matches!(rename_agent(&pool, mx2.agent_id, "Mx1").await, Err(RenameError::Taken { .. })));
        assert_eq!(rename_agent(&pool, mx2.agent_id, "mx3").await.unwrap(), "mx2");
        assert!(matches!(rename_agent(&pool, mx2.agent_id, "").await, Err(RenameError::BadName(_))));
        assert!(matches!(rename_agent(&pool, first.agent_id, "old").await, Err(RenameError::Removed(_))));
        let audited: Vec<String> =
            sqlx::query_scalar("select action from audit_log order by id").fetch_all(&pool).await.unwrap();
        assert_eq!(audited, ["agent.enroll", "agent.reenroll", "agent.enroll", "agent.enroll"]);
    }
}
