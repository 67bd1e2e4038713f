//! The fleet blocklist: live blocks and the versioned change log every agent
//! follows.
//!
//! A block is a row of `blocks`: a CIDR, why and by whom it was decided, the
//! evidence, and when it expires. Every write to `blocks` appends its `add` or
//! `remove` rows to `block_changes` in the same transaction; a trigger gives
//! each row the next version and notifies `fleetban_blocks` at commit, which
//! is how every server replica learns of it.
//!
//! Invariants:
//! - Versions are gap-free and become visible in commit order: a reader that
//!   sees version N sees every version below it. Code never sets a version.
//! - At most one live (not revoked) block per CIDR: creating a live CIDR again
//!   extends its expiry (a new `add` change) instead of adding a second row.
//! - The blocklist at version N is the set of live blocks after the changes up
//!   to N. [`snapshot`] reads the version and the blocks in one repeatable-read
//!   transaction, so a snapshot plus the deltas after it reproduce the current
//!   list; [`changes_since`] coalesces the changes of each block into its net
//!   effect.
//! - Policy is enforced here, in the creating transaction, whoever creates:
//!   allowlisted ranges (unexpired `allowlist` rows) and `never_block` ranges
//!   are refused; ranges broader than `min_prefix_v4`/`min_prefix_v6` need
//!   `force`. Ranges holding a fleet address (`agent_addresses`, which agents
//!   report themselves) are refused to automatic and agent blocks only: an
//!   agent's word never vetoes an operator's manual block. Ranges are checked
//!   and stored in canonical form ([`fleetban_proto::canonical_net`]):
//!   `::ffff:127.0.0.1` is refused as the loopback address it maps, and
//!   `::ffff:0.0.0.0/96` as all of IPv4.
//! - Expired blocks stay live until the sweeper ([`expire_due`]) turns them
//!   into `remove` changes; agents also time entries out on their own.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use fleetban_proto::canonical_net;
use fleetban_proto::v1::{BlockEntry, BlocklistDelta, BlocklistSnapshot, Cidr, Revocation, Revocations};
use ipnet::IpNet;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

/// The longest block TTL; longer TTLs are clamped to it (100 years).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The reason recorded on the `remove` changes of expired blocks.
pub const EXPIRED_REASON: &str = "expired";

/// How far back a snapshot announces operators' revocations: an agent's
/// local block lives at most this long in practice (escalating TTLs stay
/// below it), so an agent that was away longer has nothing left to drop.
pub const REVOCATION_HORIZON: Duration = Duration::from_secs(7 * 86_400);

/// Revocations announced with one snapshot, newest first, at most.
const REVOCATIONS_MAX: i64 = 10_000;

/// Expired blocks removed per statement by [`expire_due`].
const EXPIRE_BATCH: i64 = 1_000;

/// Who decided a block. Stored as `auto`, `agent`, `manual`, `feed` or
/// `policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockSource {
    /// Fleet correlation.
    Auto,
    /// An agent's local block, made a fleet block.
    Agent,
    /// An operator (API or CLI).
    Manual,
    /// A blocklist feed ([`crate::feeds`]; its name is `evidence.feed`).
    Feed,
    /// An ASN policy rule ([`crate::geo`]; its name is `evidence.feed`).
    Policy,
}

impl BlockSource {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockSource::Auto => "auto",
            BlockSource::Agent => "agent",
            BlockSource::Manual => "manual",
            BlockSource::Feed => "feed",
            BlockSource::Policy => "policy",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(BlockSource::Auto),
            "agent" => Some(BlockSource::Agent),
            "manual" => Some(BlockSource::Manual),
            "feed" => Some(BlockSource::Feed),
            "policy" => Some(BlockSource::Policy),
            _ => None,
        }
    }
}

impl fmt::Display for BlockSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A block as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Server-assigned id; agents remove entries by it.
    pub id: i64,
    /// The blocked range (host bits are always zero).
    pub cidr: IpNet,
    /// Short reason (`fleet_correlation`, `local_block`, `prefix`, ...).
    pub reason: String,
    /// Who decided it.
    pub source: BlockSource,
    /// Why: agents, kinds, counts, first/last seen, sample lines.
    pub evidence: serde_json::Value,
    /// The operator or token name for manual blocks.
    pub created_by: Option<String>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it expires; `None` = permanent.
    pub expires_at: Option<OffsetDateTime>,
    /// When it stopped being live (expired, superseded or revoked).
    pub revoked_at: Option<OffsetDateTime>,
}

/// A block to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBlock {
    /// The range; host bits are cleared.
    pub cidr: IpNet,
    /// Short reason.
    pub reason: String,
    /// Who decides it.
    pub source: BlockSource,
    /// Why (JSON object).
    pub evidence: serde_json::Value,
    /// How long it lasts from now; `None` = permanent. Clamped to [`MAX_TTL`].
    pub ttl: Option<Duration>,
    /// The operator or token name for manual blocks.
    pub created_by: Option<String>,
    /// Allow a range broader than `min_prefix_v4`/`min_prefix_v6`. Never
    /// overrides the allowlist, the fleet's addresses or `never_block`.
    pub force: bool,
}

/// Why a block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The range overlaps a live allowlist entry.
    #[error("{cidr} overlaps the allowlisted range {entry}")]
    Allowlisted {
        /// The refused range.
        cidr: IpNet,
        /// The allowlist entry.
        entry: IpNet,
    },
    /// The range holds an address of one of the fleet's agents.
    #[error("{cidr} contains {address}, an address of agent {agent_id}")]
    FleetOwn {
        /// The refused range.
        cidr: IpNet,
        /// The fleet address inside it.
        address: IpAddr,
        /// The agent that reported it.
        agent_id: Uuid,
    },
    /// The range overlaps a configured `never_block` range.
    #[error("{cidr} overlaps the never_block range {range}")]
    NeverBlock {
        /// The refused range.
        cidr: IpNet,
        /// The `never_block` range.
        range: IpNet,
    },
    /// The range is broader than the configured minimum prefix and not forced.
    #[error("{cidr} is broader than /{min_prefix_len}; only a forced block may be")]
    TooBroad {
        /// The refused range.
        cidr: IpNet,
        /// `min_prefix_v4` or `min_prefix_v6`.
        min_prefix_len: u8,
    },
}

/// Errors of the blocklist store.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Policy forbids the block.
    #[error("block refused: {0}")]
    Refused(#[from] Refusal),
    /// The database failed.
    #[error("blocklist database error: {0}")]
    Database(#[from] sqlx::Error),
}

macro_rules! block_columns {
    () => {
        "id, cidr, reason, source, evidence, created_by, created_at, expires_at, revoked_at"
    };
}

#[derive(sqlx::FromRow)]
struct BlockRow {
    id: i64,
    cidr: IpNet,
    reason: String,
    source: String,
    evidence: serde_json::Value,
    created_by: Option<String>,
    created_at: OffsetDateTime,
    expires_at: Option<OffsetDateTime>,
    revoked_at: Option<OffsetDateTime>,
}

impl TryFrom<BlockRow> for Block {
    type Error = sqlx::Error;

    fn try_from(row: BlockRow) -> Result<Self, Self::Error> {
        let source = BlockSource::parse(&row.source)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown block source {:?}", row.source).into()))?;
        Ok(Block {
            id: row.id,
            cidr: row.cidr,
            reason: row.reason,
            source,
            evidence: row.evidence,
            created_by: row.created_by,
            created_at: row.created_at,
            expires_at: row.expires_at,
            revoked_at: row.revoked_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct UpsertRow {
    #[sqlx(flatten)]
    block: BlockRow,
    inserted: bool,
}

/// What every new block is checked against: how broad it may be without
/// `force`, and the ranges never blocked. The server's implementation is
/// `correlate::CorrelateConfig` (its `[correlate]` keys `min_prefix_v4`,
/// `min_prefix_v6` and `never_block`); the block store itself knows nothing
/// of correlation.
pub trait BlockPolicy: Send + Sync {
    /// Shortest IPv4 prefix allowed without `force`.
    fn min_prefix_v4(&self) -> u8;
    /// Shortest IPv6 prefix allowed without `force`.
    fn min_prefix_v6(&self) -> u8;
    /// Ranges no block may overlap.
    fn never_block(&self) -> &[IpNet];
}

/// The shortest prefix allowed without `force` for `cidr`'s family.
fn min_prefix_len(policy: &dyn BlockPolicy, cidr: IpNet) -> u8 {
    match cidr {
        IpNet::V4(_) => policy.min_prefix_v4(),
        IpNet::V6(_) => policy.min_prefix_v6(),
    }
}

/// Checks `cidr` (canonical, host bits cleared) against the policy for an
/// automatic block.
pub(crate) async fn check_policy(
    conn: &mut PgConnection,
    policy: &dyn BlockPolicy,
    cidr: IpNet,
    force: bool,
) -> Result<(), BlockError> {
    check_policy_for(conn, policy, cidr, force, BlockSource::Auto).await
}

/// Checks `cidr` (host bits already cleared) against the policy for a block
/// decided by `source`. The fleet's own addresses come from the agents'
/// `Hello`, so they veto automatic and agent blocks but not manual ones.
pub(crate) async fn check_policy_for(
    conn: &mut PgConnection,
    policy: &dyn BlockPolicy,
    cidr: IpNet,
    force: bool,
    source: BlockSource,
) -> Result<(), BlockError> {
    let min = min_prefix_len(policy, cidr);
    if cidr.prefix_len() < min && !force {
        return Err(Refusal::TooBroad { cidr, min_prefix_len: min }.into());
    }
    // `cidr` is canonical; the configured ranges are taken as written (the
    // default `::ffff:0:0/96` guards IPv6 ranges spanning the mapped space).
    if let Some(range) = policy.never_block().iter().find(|r| r.contains(&cidr) || cidr.contains(*r)) {
        return Err(Refusal::NeverBlock { cidr, range: *range }.into());
    }
    let allowed: Option<IpNet> =
        sqlx::query_scalar("select cidr from live_allowlist where cidr && $1::cidr order by masklen(cidr) limit 1")
            .bind(cidr)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(entry) = allowed {
        return Err(Refusal::Allowlisted { cidr, entry }.into());
    }
    if source == BlockSource::Manual {
        return Ok(());
    }
    let own: Option<(Uuid, IpNet)> =
        sqlx::query_as("select agent_id, address from agent_addresses where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) limit 1")
            .bind(cidr)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some((agent_id, address)) = own {
        return Err(Refusal::FleetOwn { cidr, address: address.addr(), agent_id }.into());
    }
    Ok(())
}

/// `now + ttl`, with the TTL clamped to [`MAX_TTL`].
fn expiry(now: OffsetDateTime, ttl: Duration) -> OffsetDateTime {
    let ttl = time::Duration::try_from(ttl.min(MAX_TTL)).unwrap_or(time::Duration::ZERO);
    now.saturating_add(ttl)
}

/// Appends one change; the trigger assigns and returns its version.
async fn append_change(
    conn: &mut PgConnection,
    op: &str,
    block_id: i64,
    cidr: IpNet,
    expires_at: Option<OffsetDateTime>,
    reason: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "insert into block_changes (op, block_id, cidr, expires_at, reason) values ($1, $2, $3::cidr, $4, $5) \
         returning version",
    )
    .bind(op)
    .bind(block_id)
    .bind(cidr)
    .bind(expires_at)
    .bind(reason)
    .fetch_one(conn)
    .await
}

/// Creates (or extends) a block after checking the policy.
///
/// If a live block of the same CIDR exists, its expiry is extended when the
/// new one is later (permanent is latest), with an `add` change carrying the
/// new expiry; otherwise it is returned unchanged and no change is written.
pub async fn create(pool: &PgPool, policy: &dyn BlockPolicy, new: NewBlock) -> Result<Block, BlockError> {
    let mut tx = pool.begin().await?;
    let block = create_in(&mut tx, policy, new).await?;
    tx.commit().await?;
    Ok(block)
}

/// [`create`] inside the caller's transaction.
pub(crate) async fn create_in(
    conn: &mut PgConnection,
    policy: &dyn BlockPolicy,
    new: NewBlock,
) -> Result<Block, BlockError> {
    let cidr = canonical_net(new.cidr);
    check_policy_for(conn, policy, cidr, new.force, new.source).await?;
    let now: OffsetDateTime = sqlx::query_scalar("select now()").fetch_one(&mut *conn).await?;
    let expires_at = new.ttl.map(|ttl| expiry(now, ttl));
    // A conflicting live row is locked by the upsert even when its WHERE
    // leaves it unchanged, so it is still live when read back below.
    let upserted: Option<UpsertRow> = sqlx::query_as(concat!(
        "insert into blocks (cidr, reason, source, evidence, created_by, expires_at) ",
        "values ($1::cidr, $2, $3, $4, $5, $6) ",
        "on conflict (cidr) where revoked_at is null do update set expires_at = excluded.expires_at ",
        "where blocks.expires_at is not null ",
        "and (excluded.expires_at is null or excluded.expires_at > blocks.expires_at) ",
        "returning ",
        block_columns!(),
        ", (xmax = 0) as inserted"
    ))
    .bind(cidr)
    .bind(&new.reason)
    .bind(new.source.as_str())
    .bind(&new.evidence)
    .bind(&new.created_by)
    .bind(expires_at)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(UpsertRow { block, inserted }) = upserted else {
        let row: BlockRow = sqlx::query_as(concat!(
            "select ",
            block_columns!(),
            " from blocks where cidr = $1::cidr and revoked_at is null"
        ))
        .bind(cidr)
        .fetch_one(&mut *conn)
        .await?;
        return Ok(Block::try_from(row)?);
    };
    let block = Block::try_from(block)?;
    let version = append_change(conn, "add", block.id, block.cidr, block.expires_at, &block.reason).await?;
    if inserted {
        sqlx::query("update blocks set created_version = $2 where id = $1")
            .bind(block.id)
            .bind(version)
            .execute(&mut *conn)
            .await?;
    }
    Ok(block)
}

/// Revokes the live block `id` (a `remove` change); `None` if there is no such
/// live block.
pub async fn revoke(pool: &PgPool, id: i64, reason: &str) -> Result<Option<Block>, BlockError> {
    let mut tx = pool.begin().await?;
    let row: Option<BlockRow> = sqlx::query_as(concat!(
        "update blocks set revoked_at = now(), revoked_reason = $2, revoked_cause = 'revoked' ",
        "where id = $1 and revoked_at is null returning ",
        block_columns!()
    ))
    .bind(id)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let block = Block::try_from(row)?;
    append_change(&mut tx, "remove", block.id, block.cidr, block.expires_at, reason).await?;
    tx.commit().await?;
    Ok(Some(block))
}

/// Retires every live block strictly inside `cidr` (superseded by a block of
/// `cidr` itself, which is left alone), one `remove` change each.
pub async fn revoke_covered_by(pool: &PgPool, cidr: IpNet, reason: &str) -> Result<Vec<Block>, BlockError> {
    let mut tx = pool.begin().await?;
    let blocks = revoke_covered_by_in(&mut tx, cidr, reason).await?;
    tx.commit().await?;
    Ok(blocks)
}

/// [`revoke_covered_by`] inside the caller's transaction.
pub(crate) async fn revoke_covered_by_in(
    conn: &mut PgConnection,
    cidr: IpNet,
    reason: &str,
) -> Result<Vec<Block>, BlockError> {
    let rows: Vec<BlockRow> = sqlx::query_as(concat!(
        "with gone as (update blocks set revoked_at = now(), revoked_reason = $2, revoked_cause = 'superseded' ",
        "where revoked_at is null and cidr << $1::cidr returning ",
        block_columns!(),
        "), changes as (insert into block_changes (op, block_id, cidr, expires_at, reason) ",
        "select 'remove', id, cidr, expires_at, $2 from gone order by id) ",
        "select * from gone order by id"
    ))
    .bind(cidr.trunc())
    .bind(reason)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(Block::try_from).collect::<Result<_, _>>()?)
}

/// Retires the live blocks `ids` (a feed entry gone from its list): a
/// `remove` change each, cause `expired` (not an operator's revocation).
/// Returns how many were live.
pub(crate) async fn retire_in(conn: &mut PgConnection, ids: &[i64], reason: &str) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let n: i64 = sqlx::query_scalar(
        "with gone as (update blocks set revoked_at = now(), revoked_reason = $2, revoked_cause = 'expired' \
           where id = any($1) and revoked_at is null returning id, cidr, expires_at), \
         changes as (insert into block_changes (op, block_id, cidr, expires_at, reason) \
           select 'remove', id, cidr, expires_at, $2 from gone order by id returning 1) \
         select count(*) from changes",
    )
    .bind(ids)
    .bind(reason)
    .fetch_one(conn)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Turns every live block whose expiry has passed into a `remove` change;
/// returns how many. Safe to run on several replicas at once (rows another
/// sweeper holds are skipped).
pub async fn expire_due(pool: &PgPool) -> Result<u64, BlockError> {
    let mut total = 0u64;
    loop {
        let n: i64 = sqlx::query_scalar(
            "with due as (select id from blocks where revoked_at is null and expires_at <= now() \
               order by expires_at, id limit $1 for update skip locked), \
             gone as (update blocks b set revoked_at = now(), revoked_reason = $2, revoked_cause = 'expired' \
               from due where b.id = due.id returning b.id, b.cidr, b.expires_at), \
             changes as (insert into block_changes (op, block_id, cidr, expires_at, reason) \
               select 'remove', id, cidr, expires_at, $2 from gone order by id returning 1) \
             select count(*) from changes",
        )
        .bind(EXPIRE_BATCH)
        .bind(EXPIRED_REASON)
        .fetch_one(pool)
        .await?;
        total += u64::try_from(n).unwrap_or(0);
        if n < EXPIRE_BATCH {
            return Ok(total);
        }
    }
}

/// Runs [`expire_due`] every `every` (at least 10 ms) until `shutdown`
/// resolves. Failures are logged and retried at the next tick.
pub async fn run_expiry_sweeper(pool: PgPool, every: Duration, shutdown: impl Future<Output = ()>) {
    crate::periodic::every(every.max(Duration::from_millis(10)), shutdown, || async {
        match expire_due(&pool).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "Expired blocks removed from the blocklist."),
            Err(error) => tracing::warn!(%error, "Block expiry sweep failed; retrying at the next tick."),
        }
    })
    .await;
}

/// Deletes changes older than `keep` from the change log; returns how many.
/// An agent behind the newest deleted version then gets a snapshot instead
/// of a delta ([`changes_since`] returns `None`).
pub async fn compact_changes(pool: &PgPool, keep: Duration) -> Result<u64, BlockError> {
    let deleted: i64 = sqlx::query_scalar(
        "with gone as (delete from block_changes \
               where changed_at < now() - make_interval(secs => $1::double precision) returning version), \
             mark as (update block_version \
               set compacted_through = greatest(compacted_through, (select coalesce(max(version), 0) from gone))) \
         select count(*) from gone",
    )
    .bind(keep.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(deleted).unwrap_or(0))
}

/// The newest committed blocklist version; 0 before the first change.
pub async fn current_version(db: impl sqlx::PgExecutor<'_>) -> Result<u64, BlockError> {
    let version: i64 = sqlx::query_scalar("select last from block_version").fetch_one(db).await?;
    Ok(u64::try_from(version).unwrap_or(0))
}

fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn entry(block_id: i64, cidr: IpNet, expires_at: Option<OffsetDateTime>, reason: String) -> BlockEntry {
    BlockEntry { block_id, cidr: Some(Cidr::from(cidr)), expires_at_ms: expires_at.map_or(0, unix_ms), reason }
}

/// The whole live blocklist at one version. Blocks past their expiry that the
/// sweeper has not removed yet are left out (their `remove` change comes
/// later and is a no-op for the agent).
pub async fn snapshot<'a>(
    db: impl sqlx::Acquire<'a, Database = sqlx::Postgres>,
) -> Result<BlocklistSnapshot, BlockError> {
    let mut tx = db.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only").execute(&mut *tx).await?;
    let version: i64 = sqlx::query_scalar("select last from block_version").fetch_one(&mut *tx).await?;
    let rows: Vec<LiveBlockRow> =
        sqlx::query_as("select id, cidr, expires_at, reason from live_blocks order by id").fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(BlocklistSnapshot {
        version: u64::try_from(version).unwrap_or(0),
        entries: rows.into_iter().map(|b| entry(b.id, b.cidr, b.expires_at, b.reason)).collect(),
    })
}

/// A live block as a snapshot carries it.
#[derive(sqlx::FromRow)]
struct LiveBlockRow {
    id: i64,
    cidr: IpNet,
    expires_at: Option<OffsetDateTime>,
    reason: String,
}

/// A revoked block as the revocation queries read it.
#[derive(sqlx::FromRow)]
struct RevokedRow {
    block_id: i64,
    cidr: IpNet,
    /// How long ago it was revoked, ms.
    age_ms: i64,
}

fn revocations_of(rows: Vec<RevokedRow>) -> Revocations {
    Revocations {
        revocations: rows
            .into_iter()
            .map(|row| Revocation {
                block_id: row.block_id,
                cidr: Some(Cidr::from(row.cidr)),
                age_ms: u64::try_from(row.age_ms).unwrap_or(0),
            })
            .collect(),
    }
}

/// The blocks an operator revoked (not expired, not superseded) by the
/// changes after `from_version` up to `to_version`, in version order, with
/// their age now. Agents drop their own local blocks of these ranges made
/// before the revocation.
pub async fn revocations_between(
    db: impl sqlx::PgExecutor<'_>,
    from_version: u64,
    to_version: u64,
) -> Result<Revocations, BlockError> {
    let from = i64::try_from(from_version).unwrap_or(i64::MAX);
    let to = i64::try_from(to_version).unwrap_or(i64::MAX);
    if to <= from {
        return Ok(Revocations::default());
    }
    let rows: Vec<RevokedRow> = sqlx::query_as(
        "select c.block_id, c.cidr, \
                greatest(0, (extract(epoch from clock_timestamp() - b.revoked_at) * 1000))::bigint as age_ms \
         from block_changes c join blocks b on b.id = c.block_id \
         where c.version > $1 and c.version <= $2 and c.op = 'remove' and b.revoked_cause = 'revoked' \
         order by c.version",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await?;
    Ok(revocations_of(rows))
}

/// The blocks operators revoked within [`REVOCATION_HORIZON`], newest first
/// (at most 10,000), sent with every snapshot: an agent that gets a snapshot
/// may have missed the deltas that carried them.
pub async fn recent_revocations(pool: &PgPool) -> Result<Revocations, BlockError> {
    let rows: Vec<RevokedRow> = sqlx::query_as(
        "select id as block_id, cidr, \
                greatest(0, (extract(epoch from clock_timestamp() - revoked_at) * 1000))::bigint as age_ms \
         from blocks where revoked_cause = 'revoked' \
         and revoked_at > now() - make_interval(secs => $1::double precision) \
         order by revoked_at desc limit $2",
    )
    .bind(REVOCATION_HORIZON.as_secs_f64())
    .bind(REVOCATIONS_MAX)
    .fetch_all(pool)
    .await?;
    Ok(revocations_of(rows))
}

#[derive(sqlx::FromRow)]
struct ChangeRow {
    op: String,
    block_id: i64,
    cidr: IpNet,
    expires_at: Option<OffsetDateTime>,
    reason: String,
    created_version: Option<i64>,
}

/// The net changes from `from_version` to `to_version` (default: the newest),
/// or `None` when the change log cannot serve them and the agent needs a
/// [`snapshot`]: `from_version` is 0 (the agent holds nothing), newer than
/// the newest version (the database was replaced), or older than the
/// compacted part of the log.
///
/// Each block appears once: in `added` with its latest entry if it is live at
/// `to_version`, in `removed` if it is not and existed at `from_version`; a
/// block both added and removed inside the range is left out. A `to_version`
/// past the newest version is clamped to it.
pub async fn changes_since<'a>(
    db: impl sqlx::Acquire<'a, Database = sqlx::Postgres>,
    from_version: u64,
    to_version: Option<u64>,
) -> Result<Option<BlocklistDelta>, BlockError> {
    let Ok(from) = i64::try_from(from_version) else {
        return Ok(None);
    };
    if from == 0 {
        return Ok(None);
    }
    let mut tx = db.begin().await?;
    sqlx::query("set transaction isolation level repeatable read, read only").execute(&mut *tx).await?;
    let (last, compacted): (i64, i64) =
        sqlx::query_as("select last, compacted_through from block_version").fetch_one(&mut *tx).await?;
    if from > last || from < compacted {
        return Ok(None);
    }
    let to = to_version.map_or(last, |v| i64::try_from(v).unwrap_or(i64::MAX).min(last)).max(from);
    let rows: Vec<ChangeRow> = sqlx::query_as(
        "select c.op, c.block_id, c.cidr, c.expires_at, c.reason, b.created_version \
         from block_changes c join blocks b on b.id = c.block_id \
         where c.version > $1 and c.version <= $2 order by c.version",
    )
    .bind(from)
    .bind(to)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;

    // Latest change per block, in version order of that change.
    let mut latest: BTreeMap<i64, (usize, ChangeRow)> = BTreeMap::new();
    for (i, row) in rows.into_iter().enumerate() {
        latest.insert(row.block_id, (i, row));
    }
    let mut last_changes: Vec<(usize, ChangeRow)> = latest.into_values().collect();
    last_changes.sort_by_key(|(i, _)| *i);
    let mut delta =
        BlocklistDelta { from_version, to_version: u64::try_from(to).unwrap_or(from_version), ..Default::default() };
    for (_, row) in last_changes {
        if row.op == "add" {
            delta.added.push(entry(row.block_id, row.cidr, row.expires_at, row.reason));
        } else if row.created_version.is_none_or(|created| created <= from) {
            delta.removed.push(row.block_id);
        }
    }
    delta.removed.sort_unstable();
    Ok(Some(delta))
}

#[cfg(test)]
mod tests {
    use crate::correlate::CorrelateConfig;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use sqlx::postgres::PgListener;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn new_block(cidr: &str, ttl_secs: Option<u64>) -> NewBlock {
        NewBlock {
            cidr: net(cidr),
            reason: "manual".into(),
            source: BlockSource::Manual,
            evidence: serde_json::json!({}),
            ttl: ttl_secs.map(Duration::from_secs),
            created_by: Some("test".into()),
            force: false,
        }
    }

    async fn changes(pool: &PgPool) -> Vec<(i64, String, i64)> {
        sqlx::query_as("select version, op, block_id from block_changes order by version")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    async fn add_agent(pool: &PgPool, addresses: &[&str]) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, 'mx1', 'mx1.example', '\\x00')")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        for a in addresses {
            sqlx::query("insert into agent_addresses (agent_id, address) values ($1, $2::inet)")
                .bind(id)
                .bind(a.parse::<IpAddr>().unwrap())
                .execute(pool)
                .await
                .unwrap();
        }
        id
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn create_appends_an_add_and_extends_a_live_cidr(pool: PgPool) {
        let policy = CorrelateConfig::default();
        assert_eq!(current_version(&pool).await.unwrap(), 0);
        let a = create(&pool, &policy, new_block("203.0.113.7/32", Some(3_600))).await.unwrap();
        assert_eq!(a.cidr, net("203.0.113.7/32"));
        let ttl = a.expires_at.unwrap() - a.created_at;
        assert_eq!(ttl, time::Duration::hours(1));
        assert_eq!(changes(&pool).await, vec![(1, "add".into(), a.id)]);

        // Host bits are cleared; an earlier expiry leaves the block alone.
        let same = create(&pool, &policy, new_block("203.0.113.7/32", Some(60))).await.unwrap();
        assert_eq!(same, a);
        assert_eq!(current_version(&pool).await.unwrap(), 1);

        let longer = create(&pool, &policy, new_block("203.0.113.7/32", Some(6 * 3_600))).await.unwrap();
        assert_eq!(longer.id, a.id);
        assert!(longer.expires_at > a.expires_at);
        let permanent = create(&pool, &policy, new_block("203.0.113.7/32", None)).await.unwrap();
        assert_eq!((permanent.id, permanent.expires_at), (a.id, None));
        let again = create(&pool, &policy, new_block("203.0.113.7/32", Some(3_600))).await.unwrap();
        assert_eq!(again.expires_at, None);
        assert_eq!(
            changes(&pool).await,
            vec![(1, "add".into(), a.id), (2, "add".into(), a.id), (3, "add".into(), a.id)]
        );
        let live: i64 = sqlx::query_scalar("select count(*) from blocks").fetch_one(&pool).await.unwrap();
        assert_eq!(live, 1);

        let wide = create(&pool, &policy, new_block("198.51.100.77/24", Some(60))).await.unwrap();
        assert_eq!(wide.cidr, net("198.51.100.0/24"));
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn policy_refusals_write_nothing(pool: PgPool) {
        let policy = CorrelateConfig::default();
        sqlx::query("insert into allowlist (cidr, note) values ('198.51.100.0/25', 'partner')")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "insert into allowlist (cidr, note, expires_at) values ('192.0.2.0/24', 'old', now() - interval '1 hour')",
        )
        .execute(&pool)
        .await
        .unwrap();
        let agent = add_agent(&pool, &["203.0.113.5", "2001:db8:1:2::25"]).await;

        let refused = |r: Result<Block, BlockError>| match r {
            Err(BlockError::Refused(refusal)) => refusal,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Inside, and around, an allowlisted range.
        assert_eq!(
            refused(create(&pool, &policy, new_block("198.51.100.9/32", None)).await),
            Refusal::Allowlisted { cidr: net("198.51.100.9/32"), entry: net("198.51.100.0/25") }
        );
        assert!(matches!(
            refused(create(&pool, &policy, new_block("198.51.100.0/24", None)).await),
            Refusal::Allowlisted { .. }
        ));
        // The fleet's own addresses veto automatic and agent blocks, also
        // through an IPv6 /64.
        let decided = |cidr: &str, source| NewBlock { source, created_by: None, ..new_block(cidr, None) };
        assert_eq!(
            refused(create(&pool, &policy, decided("203.0.113.5/32", BlockSource::Auto)).await),
            Refusal::FleetOwn { cidr: net("203.0.113.5/32"), address: "203.0.113.5".parse().unwrap(), agent_id: agent }
        );
        assert!(matches!(
            refused(create(&pool, &policy, decided("2001:db8:1:2::/64", BlockSource::Agent)).await),
            Refusal::FleetOwn { .. }
        ));
        // never_block, whether inside or around the range.
        assert!(matches!(
            refused(create(&pool, &policy, new_block("10.1.2.3/32", None)).await),
            Refusal::NeverBlock { .. }
        ));
        let mut forced = new_block("172.0.0.0/8", None);
        forced.force = true;
        assert!(matches!(refused(create(&pool, &policy, forced).await), Refusal::NeverBlock { .. }));
        assert!(matches!(
            refused(create(&pool, &policy, new_block("::1/128", None)).await),
            Refusal::NeverBlock { .. }
        ));
        assert_eq!(current_version(&pool).await.unwrap(), 0, "a refusal must not write a change");

        // An expired allowlist row no longer protects; neighbours are fine.
        create(&pool, &policy, new_block("192.0.2.10/32", None)).await.unwrap();
        create(&pool, &policy, new_block("198.51.100.200/32", None)).await.unwrap();
        create(&pool, &policy, new_block("203.0.113.6/32", None)).await.unwrap();
        create(&pool, &policy, new_block("2001:db8:1:3::/64", None)).await.unwrap();
        assert_eq!(current_version(&pool).await.unwrap(), 4);
        // What agents report as their own never vetoes an operator.
        create(&pool, &policy, new_block("203.0.113.5/32", None)).await.unwrap();
        create(&pool, &policy, new_block("2001:db8:1:2::/64", None)).await.unwrap();
        assert_eq!(current_version(&pool).await.unwrap(), 6);
    }

    /// Every creator (API, correlation of batches and of agents' local
    /// blocks) goes through `create`: a mapped spelling is judged and stored
    /// as the IPv4 range it maps.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn mapped_and_reserved_ranges_are_judged_as_ipv4(pool: PgPool) {
        let policy = CorrelateConfig::default();
        let agent = add_agent(&pool, &[]).await;
        let mut conn = pool.acquire().await.unwrap();
        crate::auth::replace_addresses(&mut conn, agent, &["::ffff:203.0.113.5".parse().unwrap()]).await.unwrap();
        drop(conn);
        let refused = |r: Result<Block, BlockError>| match r {
            Err(BlockError::Refused(refusal)) => refusal,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            refused(create(&pool, &policy, new_block("::ffff:127.0.0.1/128", None)).await),
            Refusal::NeverBlock { cidr: net("127.0.0.1/32"), range: net("127.0.0.0/8") }
        );
        assert_eq!(
            refused(create(&pool, &policy, new_block("::ffff:0.0.0.0/96", None)).await),
            Refusal::TooBroad { cidr: net("0.0.0.0/0"), min_prefix_len: 16 }
        );
        let mut forced = new_block("::ffff:0.0.0.0/96", None);
        forced.force = true;
        assert!(matches!(refused(create(&pool, &policy, forced).await), Refusal::NeverBlock { .. }));
        let mut spanning = new_block("::fffe:0:0/95", None);
        spanning.force = true;
        assert_eq!(
            refused(create(&pool, &policy, spanning).await),
            Refusal::NeverBlock { cidr: net("::fffe:0:0/95"), range: net("::ffff:0:0/96") }
        );
        // The agent reported its address mapped; it is stored as IPv4 (and
        // vetoes automatic blocks of it).
        let mut auto = new_block("203.0.113.5/32", None);
        auto.source = BlockSource::Auto;
        assert_eq!(
            refused(create(&pool, &policy, auto).await),
            Refusal::FleetOwn { cidr: net("203.0.113.5/32"), address: "203.0.113.5".parse().unwrap(), agent_id: agent }
        );
        // Carrier-grade NAT, reserved and broadcast addresses.
        for cidr in
            ["100.64.1.2/32", "100.127.255.255/32", "240.0.0.1/32", "255.255.255.255/32", "::ffff:100.64.0.1/128"]
        {
            assert!(matches!(refused(create(&pool, &policy, new_block(cidr, None)).await), Refusal::NeverBlock { .. }));
        }
        assert_eq!(current_version(&pool).await.unwrap(), 0, "a refusal must not write a change");
        let block = create(&pool, &policy, new_block("::ffff:198.51.100.77/128", None)).await.unwrap();
        assert_eq!(block.cidr, net("198.51.100.77/32"));
        // Neighbours of the new never_block ranges are attackers as before.
        create(&pool, &policy, new_block("100.63.255.255/32", None)).await.unwrap();
        create(&pool, &policy, new_block("100.128.0.0/32", None)).await.unwrap();
        // Below 240.0.0.0/4 lies multicast, refused by its own range.
        assert_eq!(
            refused(create(&pool, &policy, new_block("239.255.255.255/32", None)).await),
            Refusal::NeverBlock { cidr: net("239.255.255.255/32"), range: net("224.0.0.0/4") }
        );
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn over_broad_ranges_need_force(pool: PgPool) {
        let policy = CorrelateConfig::default();
        for (cidr, min) in [("198.0.0.0/8", 16), ("2001:db8::/29", 32)] {
            let err = create(&pool, &policy, new_block(cidr, None)).await.unwrap_err();
            assert!(
                matches!(err, BlockError::Refused(Refusal::TooBroad { min_prefix_len, .. }) if min_prefix_len == min),
                "{err}"
            );
            let mut forced = new_block(cidr, None);
            forced.force = true;
            assert_eq!(create(&pool, &policy, forced).await.unwrap().cidr, net(cidr));
        }
        create(&pool, &policy, new_block("198.51.0.0/16", None)).await.unwrap();
        create(&pool, &policy, new_block("2001:db8::/32", None)).await.unwrap();
        assert_eq!(current_version(&pool).await.unwrap(), 4);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn revoke_and_revoke_covered_by_write_removes(pool: PgPool) {
        let policy = CorrelateConfig::default();
        let mut singles = Vec::new();
        for i in 1..=4 {
            singles.push(create(&pool, &policy, new_block(&format!("192.0.2.{i}/32"), Some(3_600))).await.unwrap());
        }
        let prefix = create(&pool, &policy, new_block("192.0.2.0/24", Some(3_600))).await.unwrap();
        let outside = create(&pool, &policy, new_block("192.0.3.1/32", Some(3_600))).await.unwrap();

        let retired = revoke_covered_by(&pool, net("192.0.2.0/24"), "superseded by prefix").await.unwrap();
        assert_eq!(retired.iter().map(|b| b.id).collect::<Vec<_>>(), singles.iter().map(|b| b.id).collect::<Vec<_>>());
        assert!(retired.iter().all(|b| b.revoked_at.is_some()));
        let log = changes(&pool).await;
        assert_eq!(log.len(), 10);
        let removes: Vec<i64> = log[6..].iter().map(|(_, op, id)| if op == "remove" { *id } else { -1 }).collect();
        assert_eq!(removes, singles.iter().map(|b| b.id).collect::<Vec<_>>());
        assert!(revoke_covered_by(&pool, net("192.0.2.0/24"), "again").await.unwrap().is_empty());

        let gone = revoke(&pool, outside.id, "false positive").await.unwrap().unwrap();
        assert_eq!(gone.id, outside.id);
        assert!(revoke(&pool, outside.id, "twice").await.unwrap().is_none());
        assert_eq!(changes(&pool).await.last().unwrap(), &(11, "remove".into(), outside.id));
        let live: Vec<i64> =
            sqlx::query_scalar("select id from blocks where revoked_at is null").fetch_all(&pool).await.unwrap();
        assert_eq!(live, vec![prefix.id]);
        // A revoked CIDR can be blocked again, as a new block.
        let again = create(&pool, &policy, new_block("192.0.3.1/32", None)).await.unwrap();
        assert_ne!(again.id, outside.id);
    }

    /// Only an operator's revocation is announced (not expiry, not a prefix
    /// superseding), by the versions of its change and with snapshots, also
    /// when the block was created inside the range an agent catches up on.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn operator_revocations_are_announced(pool: PgPool) {
        let policy = CorrelateConfig::default();
        let single = create(&pool, &policy, new_block("192.0.2.1/32", Some(3_600))).await.unwrap(); // v1
        let expiring = create(&pool, &policy, new_block("192.0.2.2/32", Some(3_600))).await.unwrap(); // v2
        create(&pool, &policy, new_block("198.51.100.0/24", Some(3_600))).await.unwrap(); // v3
        create(&pool, &policy, new_block("198.51.100.0/23", Some(3_600))).await.unwrap(); // v4
        revoke_covered_by(&pool, net("198.51.100.0/23"), "superseded").await.unwrap(); // v5
        sqlx::query("update blocks set expires_at = now() - interval '1 second' where id = $1")
            .bind(expiring.id)
            .execute(&pool)
            .await
            .unwrap();
        expire_due(&pool).await.unwrap(); // v6
        revoke(&pool, single.id, "false positive").await.unwrap().unwrap(); // v7
        let late = create(&pool, &policy, new_block("203.0.113.9/32", None)).await.unwrap(); // v8
        revoke(&pool, late.id, "false positive").await.unwrap().unwrap(); // v9
        let ids = |r: &Revocations| r.revocations.iter().map(|r| r.block_id).collect::<Vec<_>>();
        assert_eq!(ids(&revocations_between(&pool, 1, 9).await.unwrap()), vec![single.id, late.id]);
        assert_eq!(ids(&revocations_between(&pool, 7, 9).await.unwrap()), vec![late.id], "created after 7");
        assert!(revocations_between(&pool, 1, 6).await.unwrap().revocations.is_empty());
        assert!(revocations_between(&pool, 9, 9).await.unwrap().revocations.is_empty());
        let recent = recent_revocations(&pool).await.unwrap();
        assert_eq!(ids(&recent), vec![late.id, single.id], "newest first");
        let first = &recent.revocations[1];
        assert_eq!(IpNet::try_from(first.cidr.as_ref().unwrap()).unwrap(), net("192.0.2.1/32"));
        assert!(first.age_ms < 60_000, "{}", first.age_ms);
        // Beyond the horizon a revocation is no longer announced.
        sqlx::query("update blocks set revoked_at = now() - interval '8 days' where id = $1")
            .bind(single.id)
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(ids(&recent_revocations(&pool).await.unwrap()), vec![late.id]);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn expiry_produces_remove_changes(pool: PgPool) {
        let policy = CorrelateConfig::default();
        let short = create(&pool, &policy, new_block("203.0.113.1/32", Some(3_600))).await.unwrap();
        let long = create(&pool, &policy, new_block("203.0.113.2/32", Some(7_200))).await.unwrap();
        let permanent = create(&pool, &policy, new_block("203.0.113.3/32", None)).await.unwrap();
        assert_eq!(expire_due(&pool).await.unwrap(), 0);

        sqlx::query("update blocks set expires_at = now() - interval '1 second' where id = $1")
            .bind(short.id)
            .execute(&pool)
            .await
            .unwrap();
        let snap = snapshot(&pool).await.unwrap();
        assert_eq!(snap.entries.iter().map(|e| e.block_id).collect::<Vec<_>>(), vec![long.id, permanent.id]);
        assert_eq!(expire_due(&pool).await.unwrap(), 1);
        assert_eq!(changes(&pool).await.last().unwrap(), &(4, "remove".into(), short.id));
        let cause: Option<String> = sqlx::query_scalar("select revoked_cause from blocks where id = $1")
            .bind(short.id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(cause.as_deref(), Some("expired"));
        assert_eq!(expire_due(&pool).await.unwrap(), 0);
        let delta = changes_since(&pool, 3, None).await.unwrap().unwrap();
        assert_eq!((delta.removed, delta.added.len()), (vec![short.id], 0));

        // The sweeper does the same on its own and stops on shutdown.
        sqlx::query("update blocks set expires_at = now() - interval '1 second' where id = $1")
            .bind(long.id)
            .execute(&pool)
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sweeper = tokio::spawn(run_expiry_sweeper(pool.clone(), Duration::from_millis(20), async {
            let _ = stopped.await;
        }));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while current_version(&pool).await.unwrap() < 5 {
            assert!(tokio::time::Instant::now() < deadline, "the sweeper did not expire the block");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(changes(&pool).await.last().unwrap(), &(5, "remove".into(), long.id));
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), sweeper).await.unwrap().unwrap();
    }

    /// The blocklist after replaying the raw change log up to `version`:
    /// block id → expiry in ms.
    async fn replay(pool: &PgPool, version: i64) -> BTreeMap<i64, i64> {
        let rows: Vec<(String, i64, Option<OffsetDateTime>)> =
            sqlx::query_as("select op, block_id, expires_at from block_changes where version <= $1 order by version")
                .bind(version)
                .fetch_all(pool)
                .await
                .unwrap();
        let mut state = BTreeMap::new();
        for (op, id, expires_at) in rows {
            if op == "add" {
                state.insert(id, expires_at.map_or(0, unix_ms));
            } else {
                state.remove(&id);
            }
        }
        state
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn changes_since_serves_exactly_the_missing_delta(pool: PgPool) {
        let policy = CorrelateConfig::default();
        assert!(changes_since(&pool, 0, None).await.unwrap().is_none());
        assert!(changes_since(&pool, 1, None).await.unwrap().is_none(), "ahead of an empty log");

        let a = create(&pool, &policy, new_block("203.0.113.10/32", Some(3_600))).await.unwrap(); // v1
        let b = create(&pool, &policy, new_block("203.0.113.11/32", Some(3_600))).await.unwrap(); // v2
        let c = create(&pool, &policy, new_block("203.0.113.12/32", None)).await.unwrap(); // v3
        let a2 = create(&pool, &policy, new_block("203.0.113.10/32", Some(86_400))).await.unwrap(); // v4
        revoke(&pool, b.id, "test").await.unwrap().unwrap(); // v5
        let d = create(&pool, &policy, new_block("203.0.113.13/32", Some(60))).await.unwrap(); // v6
        revoke(&pool, d.id, "test").await.unwrap().unwrap(); // v7
        assert_eq!(current_version(&pool).await.unwrap(), 7);

        let ids = |d: &BlocklistDelta| d.added.iter().map(|e| e.block_id).collect::<Vec<_>>();
        let from3 = changes_since(&pool, 3, None).await.unwrap().unwrap();
        assert_eq!((from3.from_version, from3.to_version), (3, 7));
        assert_eq!(ids(&from3), vec![a.id]);
        assert_eq!(from3.added[0].expires_at_ms, unix_ms(a2.expires_at.unwrap()));
        assert_eq!(from3.removed, vec![b.id], "d was added and removed inside the range");

        let from1 = changes_since(&pool, 1, None).await.unwrap().unwrap();
        assert_eq!(ids(&from1), vec![c.id, a.id]);
        assert!(from1.removed.is_empty(), "b and d were created after version 1");

        let partial = changes_since(&pool, 5, Some(6)).await.unwrap().unwrap();
        assert_eq!((partial.to_version, ids(&partial), partial.removed.clone()), (6, vec![d.id], vec![]));
        let empty = changes_since(&pool, 7, None).await.unwrap().unwrap();
        assert_eq!((empty.to_version, empty.added.len(), empty.removed.len()), (7, 0, 0));
        let clamped = changes_since(&pool, 6, Some(100)).await.unwrap().unwrap();
        assert_eq!((clamped.to_version, clamped.removed.clone()), (7, vec![d.id]));
        assert!(changes_since(&pool, 8, None).await.unwrap().is_none(), "ahead of the log");

        // From every version, the delta takes the replayed state to the
        // current snapshot.
        let snap = snapshot(&pool).await.unwrap();
        assert_eq!(snap.version, 7);
        let now: BTreeMap<i64, i64> = snap.entries.iter().map(|e| (e.block_id, e.expires_at_ms)).collect();
        assert_eq!(now, replay(&pool, 7).await);
        for from in 1..=7u64 {
            let mut state = replay(&pool, from as i64).await;
            let delta = changes_since(&pool, from, None).await.unwrap().unwrap();
            for id in &delta.removed {
                assert!(state.remove(id).is_some(), "from {from}: removed {id} that the agent does not hold");
            }
            for e in &delta.added {
                state.insert(e.block_id, e.expires_at_ms);
            }
            assert_eq!(state, now, "from version {from}");
        }

        // Compaction: older versions can no longer be served.
        assert_eq!(compact_changes(&pool, Duration::ZERO).await.unwrap(), 7);
        assert!(changes_since(&pool, 3, None).await.unwrap().is_none());
        assert!(changes_since(&pool, 7, None).await.unwrap().is_some());
        let e = create(&pool, &policy, new_block("203.0.113.14/32", None)).await.unwrap();
        assert_eq!(current_version(&pool).await.unwrap(), 8, "versions continue after compaction");
        assert_eq!(ids(&changes_since(&pool, 7, None).await.unwrap().unwrap()), vec![e.id]);
        assert!(changes_since(&pool, 6, None).await.unwrap().is_none());
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn versions_are_gap_free_in_commit_order_under_concurrent_creates(pool: PgPool) {
        const TASKS: usize = 8;
        const PER_TASK: usize = 12;
        let total = (TASKS * PER_TASK) as i64;
        let mut listener = PgListener::connect_with(&pool).await.unwrap();
        listener.listen("fleetban_blocks").await.unwrap();

        // A reader that must never see version N without every version below.
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (pool, done) = (pool.clone(), done.clone());
            tokio::spawn(async move {
                let mut observed = 0;
                while !done.load(Ordering::Relaxed) {
                    let (max, count): (Option<i64>, i64) =
                        sqlx::query_as("select max(version), count(*) from block_changes")
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                    assert_eq!(max.unwrap_or(0), count, "a version became visible before a lower one");
                    observed += 1;
                }
                observed
            })
        };
        let policy = Arc::new(CorrelateConfig::default());
        let writers: Vec<_> = (0..TASKS)
            .map(|t| {
                let (pool, policy) = (pool.clone(), policy.clone());
                tokio::spawn(async move {
                    for i in 0..PER_TASK {
                        let cidr = if t % 2 == 0 {
                            format!("203.0.113.{}/32", t * PER_TASK + i)
                        } else {
                            format!("2001:db8:{t}:{i}::/64")
                        };
                        create(&pool, policy.as_ref(), new_block(&cidr, Some(3_600))).await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        done.store(true, Ordering::Relaxed);
        assert!(reader.await.unwrap() > 0);

        let versions: Vec<i64> =
            sqlx::query_scalar("select version from block_changes order by version").fetch_all(&pool).await.unwrap();
        assert_eq!(versions, (1..=total).collect::<Vec<_>>());
        let mut notified = Vec::new();
        while notified.len() < versions.len() {
            let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.unwrap().unwrap();
            notified.push(n.payload().parse::<i64>().unwrap());
        }
        assert_eq!(notified, versions, "notifications arrive in version order");
        let created: Vec<i64> = sqlx::query_scalar("select created_version from blocks order by created_version")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(created, versions, "every block records the version that created it");
    }
}
