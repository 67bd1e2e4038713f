//! Fleet correlation: turns per-address evidence from many agents into fleet
//! blocks.
//!
//! This module owns the policy (`[correlate]` in the server TOML,
//! [`CorrelateConfig`]) and the [`Correlator`] that applies it. After ingest
//! commits a batch it calls [`Correlator::on_batch`] with the abuse addresses
//! the batch touched; an agent's `LocalBlock` goes to
//! [`Correlator::on_local_block`]. The rules:
//!
//! - **fleet**: abuse from one address on at least `min_hosts` distinct agents
//!   within `window_secs` (`offender_hosts.last_seen`, kept by ingest);
//! - **single host**: at least `single_host_threshold` abuse events from one
//!   address on the reporting agent within `window_secs` (counted in `events`);
//! - **local block**: an agent's own block is a fleet block at once when
//!   `trust_local_blocks`, for a host only (an IPv4 /32, an IPv6 /128 or the
//!   /`ipv6_block_prefix` itself; wider ranges are refused and counted) and
//!   for the policy's TTL (a longer TTL the agent asks for is capped);
//! - **prefix**: `prefix_min_addresses` blocked addresses in one /24, or /64s
//!   in one /48, within `prefix_window_secs` make a block of the prefix, which
//!   retires the blocks inside it;
//! - an IPv6 address is judged and blocked as its /`ipv6_block_prefix`: with
//!   64, every address of a /64 counts as the same attacker;
//! - the n-th block of a range within `offence_window_secs` lasts
//!   `ttl_secs[n-1]` (the last value repeats); blocks an operator revoked do
//!   not count as offences, nor towards a prefix;
//! - never: allowlisted, `never_block` or fleet-own ranges, nor over-broad ones
//!   (enforced by [`crate::blocks`] for every creator). An IPv6 /64 refused
//!   because it holds such an address falls back to the attacker's /128,
//!   only when an attacker's address was reported (never the /64's network
//!   address for a reported /64).
//!
//! Every decision records its [`Evidence`] as the block's JSON evidence.
//! Decisions about one range are serialised by a transaction-level advisory
//! lock on it, so concurrent batches about one attacker make one block.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::blocks::{self, Block, BlockError, BlockSource, NewBlock, Refusal};

/// The `[correlate]` table of the server TOML: when an address becomes a fleet
/// block, for how long, and what is never blocked.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrelateConfig {
    /// Distinct agents that must see abuse from one address within
    /// `window_secs` for a fleet block. Default 2.
    pub min_hosts: u32,
    /// Sliding evidence window, seconds. Default 600.
    pub window_secs: u64,
    /// Abuse events from one address on one agent within `window_secs` that
    /// make a fleet block on their own. Default 50.
    pub single_host_threshold: u32,
    /// Blocked addresses in one /24 (IPv4) or /48 (IPv6, counting /64s)
    /// within `prefix_window_secs` that escalate to a block of the prefix.
    /// Default 4.
    pub prefix_min_addresses: u32,
    /// Window for prefix escalation, seconds. Default 86400 (24 h).
    pub prefix_window_secs: u64,
    /// Prefix length an IPv6 attacker is blocked as: 64 (default) or 128.
    pub ipv6_block_prefix: u8,
    /// Block TTLs by offence count within `offence_window_secs`, seconds:
    /// the first block lasts `ttl_secs[0]`, the second `ttl_secs[1]`, and so
    /// on; the last value repeats. Default 1 h, 6 h, 24 h, 7 d.
    pub ttl_secs: Vec<u64>,
    /// Window in which earlier blocks count as offences, seconds. Default
    /// 2592000 (30 days).
    pub offence_window_secs: u64,
    /// Make an agent's `LocalBlock` a fleet block immediately. Default true.
    pub trust_local_blocks: bool,
    /// Ranges never blocked, in addition to the allowlist table and the
    /// fleet's own addresses. Default: unspecified, loopback, link-local,
    /// multicast, RFC 1918 and ULA ranges.
    pub never_block: Vec<IpNet>,
    /// Shortest IPv4 prefix blocked without `force`. Default 16.
    pub min_prefix_v4: u8,
    /// Shortest IPv6 prefix blocked without `force`. Default 32.
    pub min_prefix_v6: u8,
}

/// The ranges that are never blocked unless configured otherwise.
pub const DEFAULT_NEVER_BLOCK: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
    "fc00::/7",
];

impl Default for CorrelateConfig {
    fn default() -> Self {
        CorrelateConfig {
            min_hosts: 2,
            window_secs: 600,
            single_host_threshold: 50,
            prefix_min_addresses: 4,
            prefix_window_secs: 86_400,
            ipv6_block_prefix: 64,
            ttl_secs: vec![3_600, 21_600, 86_400, 604_800],
            offence_window_secs: 2_592_000,
            trust_local_blocks: true,
            // The constants are valid CIDRs; a test parses every one.
            never_block: DEFAULT_NEVER_BLOCK.iter().filter_map(|s| s.parse().ok()).collect(),
            min_prefix_v4: 16,
            min_prefix_v6: 32,
        }
    }
}

/// A `[correlate]` value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("correlate.{key}: {problem}")]
pub struct ConfigError {
    /// The offending key.
    pub key: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl CorrelateConfig {
    /// Checks values that deserialize but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, problem: &str| Err(ConfigError { key, problem: problem.to_owned() });
        if self.min_hosts == 0 {
            return err("min_hosts", "must be at least 1");
        }
        if self.window_secs == 0 {
            return err("window_secs", "must be at least 1");
        }
        if self.single_host_threshold == 0 {
            return err("single_host_threshold", "must be at least 1");
        }
        if self.prefix_min_addresses < 2 {
            return err("prefix_min_addresses", "must be at least 2");
        }
        if !(self.ipv6_block_prefix == 64 || self.ipv6_block_prefix == 128) {
            return err("ipv6_block_prefix", "must be 64 or 128");
        }
        if self.ttl_secs.is_empty() || self.ttl_secs.contains(&0) {
            return err("ttl_secs", "must be a non-empty list of positive durations");
        }
        if self.min_prefix_v4 > 32 {
            return err("min_prefix_v4", "must be at most 32");
        }
        if self.min_prefix_v6 > 128 {
            return err("min_prefix_v6", "must be at most 128");
        }
        Ok(())
    }
}

/// The stored names (`events.kind`, `offender_hosts.kind`) of the event kinds
/// that count as abuse; the same set ingest keeps evidence for.
pub const ABUSE_KINDS: &[&str] = &[
    "refused_too_many",
    "refused_per_host",
    "auth_failed",
    "relay_denied",
    "rcpt_rejected",
    "sync_error",
    "too_many_nonmail",
    "too_many_syntax",
    "too_many_unrecognized",
    "protocol_error",
    "syntax_error",
    "acl_rejected",
    "acl_dropped",
];

/// Block reason: abuse seen on `min_hosts` agents.
pub const REASON_FLEET: &str = "fleet_correlation";
/// Block reason: `single_host_threshold` events on one agent.
pub const REASON_SINGLE_HOST: &str = "single_host";
/// Block reason: an agent's local block.
pub const REASON_LOCAL: &str = "local_block";
/// Block reason: prefix escalation.
pub const REASON_PREFIX: &str = "prefix";

/// Sample raw lines kept in a decision's evidence.
const MAX_SAMPLES: usize = 5;
/// Counter of agents' `LocalBlock`s refused by the trust model, by `why`.
pub const LOCAL_BLOCKS_REFUSED: &str = "fleetban_local_blocks_refused_total";
/// Counter of agents' `LocalBlock`s whose TTL was capped at the policy's.
pub const LOCAL_BLOCKS_TTL_CAPPED: &str = "fleetban_local_blocks_ttl_capped_total";
/// Addresses listed in a decision's evidence.
const MAX_ADDRESSES: usize = 64;
/// Longest agent-supplied evidence text kept, bytes.
const MAX_LOCAL_EVIDENCE_BYTES: usize = 4096;

/// Longest agent-supplied rule name kept, bytes.
const MAX_LOCAL_REASON_BYTES: usize = 128;

/// `text` cut to at most `max` bytes on a character boundary.
fn truncated(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Errors of correlation. Policy refusals are not errors: the address is
/// simply not blocked.
#[derive(Debug, thiserror::Error)]
pub enum CorrelateError {
    /// The database failed.
    #[error("correlation database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Why a range was blocked: the JSON evidence of a block.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Evidence {
    /// The rule that fired: `fleet_correlation`, `single_host`,
    /// `local_block` or `prefix`.
    pub rule: String,
    /// Agents that saw abuse from the range.
    pub agents: BTreeSet<Uuid>,
    /// Abuse events by kind.
    pub kinds: BTreeMap<String, i64>,
    /// Abuse events in all.
    pub events: i64,
    /// Earliest abuse event considered.
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_seen: Option<OffsetDateTime>,
    /// Latest abuse event considered.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    /// A few raw log lines.
    pub samples: Vec<String>,
    /// The offending addresses (for a prefix: the blocked ranges inside it).
    pub addresses: BTreeSet<String>,
    /// Which offence of the range within `offence_window_secs` this is (1 =
    /// first); it chose the TTL.
    pub offence: u32,
    /// The agent's own account, for a local block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalEvidence>,
}

/// What an agent said about its local block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalEvidence {
    /// The agent that blocked.
    pub agent_id: Uuid,
    /// Its rule (`slot_exhaustion`, `conn_rate`, ...; truncated to 128 bytes).
    pub reason: String,
    /// Its human-readable evidence (truncated to 4 KiB).
    pub evidence: String,
}

impl Evidence {
    fn to_json(&self) -> serde_json::Value {
        // Serialising plain data (strings, numbers, UTC timestamps) cannot fail.
        serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({ "rule": self.rule }))
    }

    fn see(&mut self, first: OffsetDateTime, last: OffsetDateTime) {
        self.first_seen = Some(self.first_seen.map_or(first, |t| t.min(first)));
        self.last_seen = Some(self.last_seen.map_or(last, |t| t.max(last)));
    }
}

/// Which threshold rule an address met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Fleet,
    SingleHost,
    Local,
}

impl Rule {
    fn reason(self) -> &'static str {
        match self {
            Rule::Fleet => REASON_FLEET,
            Rule::SingleHost => REASON_SINGLE_HOST,
            Rule::Local => REASON_LOCAL,
        }
    }
}

/// Applies the correlation policy. Cheap to clone; one per server process.
#[derive(Debug, Clone)]
pub struct Correlator {
    pool: PgPool,
    config: Arc<CorrelateConfig>,
}

/// Seconds as the `double precision` that `make_interval(secs => ..)` takes.
fn secs(s: u64) -> f64 {
    s as f64
}

/// Takes the transaction-level lock that serialises decisions about `range`.
async fn lock_range(conn: &mut PgConnection, range: IpNet) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('fleetban_correlate ' || $1::cidr::text, 0))")
        .bind(range)
        .execute(conn)
        .await?;
    Ok(())
}

/// The range's standing: is it already covered by a live, unexpired block,
/// and how many earlier blocks of it (`cidr >>= range`, or also inside it
/// with `overlapping`) count as offences.
async fn standing(
    conn: &mut PgConnection,
    range: IpNet,
    overlapping: bool,
    offence_window_secs: u64,
) -> Result<(bool, i64), sqlx::Error> {
    sqlx::query_as(
        "select exists(select 1 from blocks where revoked_at is null and cidr >>= $1::cidr \
                   and (expires_at is null or expires_at > now())), \
                (select count(*) from blocks \
                   where (cidr >>= $1::cidr or ($2 and cidr << $1::cidr)) \
                   and created_at >= now() - make_interval(secs => $3) \
                   and revoked_cause is distinct from 'revoked')",
    )
    .bind(range)
    .bind(overlapping)
    .bind(secs(offence_window_secs))
    .fetch_one(conn)
    .await
}

/// The canonical form of an address: `::ffff:a.b.c.d` is IPv4.
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_or(net, |n| n.trunc());
    }
    net.trunc()
}

/// The prefix an escalation of `range` would block, with the prefix length of
/// the units counted inside it: /24 counting addresses, /48 counting /64s.
fn escalation_prefix(range: IpNet) -> Option<(IpNet, u8)> {
    let (len, unit) = match range {
        IpNet::V4(_) => (24, 32),
        IpNet::V6(_) => (48, 64),
    };
    if range.prefix_len() <= len {
        return None;
    }
    IpNet::new(range.addr(), len).ok().map(|p| (p.trunc(), unit))
}

impl Correlator {
    /// A correlator deciding with `config` (already validated).
    pub fn new(pool: PgPool, config: CorrelateConfig) -> Self {
        Correlator { pool, config: Arc::new(config) }
    }

    /// The policy in force.
    pub fn config(&self) -> &CorrelateConfig {
        &self.config
    }

    /// The range an attacker at `addr` is judged and blocked as.
    pub fn target(&self, addr: IpAddr) -> IpNet {
        match addr.to_canonical() {
            IpAddr::V4(v4) => IpNet::from(IpAddr::V4(v4)),
            IpAddr::V6(v6) => IpNet::new(IpAddr::V6(v6), self.config.ipv6_block_prefix)
                .map_or(IpNet::from(IpAddr::V6(v6)), |n| n.trunc()),
        }
    }

    fn never_blocked(&self, range: IpNet) -> bool {
        self.config.never_block.iter().any(|r| r.contains(&range) || range.contains(r))
    }

    /// The TTL of a block that is offence number `earlier + 1`.
    fn ttl(&self, earlier: i64) -> Duration {
        let i = usize::try_from(earlier).unwrap_or(usize::MAX).min(self.config.ttl_secs.len().saturating_sub(1));
        Duration::from_secs(self.config.ttl_secs.get(i).copied().unwrap_or(3_600))
    }

    /// After a batch from `agent_id` committed: evaluates the abuse addresses
    /// it touched and returns the blocks created (prefix blocks included).
    pub async fn on_batch(&self, agent_id: Uuid, addresses: &[IpAddr]) -> Result<Vec<Block>, CorrelateError> {
        // Target range → one address of the batch inside it.
        let mut targets: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
        for addr in addresses {
            let target = self.target(*addr);
            if !self.never_blocked(target) {
                targets.entry(target).or_insert(addr.to_canonical());
            }
        }
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<IpNet> = targets.keys().copied().collect();
        let window = secs(self.config.window_secs);
        let candidates: Vec<(IpNet, i64, i64)> = sqlx::query_as(
            "select t.target, \
               (select count(distinct oh.agent_id) from offender_hosts oh \
                  where oh.address between fleetban_first(t.target) and fleetban_last(t.target) and oh.last_seen >= now() - make_interval(secs => $2)), \
               (select count(*) from (select 1 from events e \
                  where e.remote between fleetban_first(t.target) and fleetban_last(t.target) and e.agent_id = $3 \
                  and e.time >= now() - make_interval(secs => $2) and e.kind = any($4) limit $5) x) \
             from unnest($1::cidr[]) as t(target) \
             where not exists (select 1 from blocks b where b.revoked_at is null and b.cidr >>= t.target \
                               and (b.expires_at is null or b.expires_at > now()))",
        )
        .bind(&list)
        .bind(window)
        .bind(agent_id)
        .bind(ABUSE_KINDS)
        .bind(i64::from(self.config.single_host_threshold))
        .fetch_all(&self.pool)
        .await?;

        let mut created = Vec::new();
        for (target, hosts, single) in candidates {
            let rule = if hosts >= i64::from(self.config.min_hosts) {
                Rule::Fleet
            } else if single >= i64::from(self.config.single_host_threshold) {
                Rule::SingleHost
            } else {
                continue;
            };
            let addr = targets.get(&target).copied().unwrap_or(target.addr());
            if let Some(block) = self.decide(target, Some(addr), rule, None).await? {
                let prefix = self.escalate(block.cidr).await?;
                created.push(block);
                created.extend(prefix);
            }
        }
        Ok(created)
    }

    /// An agent's `LocalBlock`: makes it a fleet block (unless
    /// `trust_local_blocks` is off, the range is already covered, or policy
    /// refuses it). The TTL is the offence TTL, at least the agent's own.
    /// A prefix escalation it causes is created too (visible in the change
    /// log), but only the block of `cidr` is returned.
    pub async fn on_local_block(
        &self,
        agent_id: Uuid,
        cidr: IpNet,
        reason: &str,
        evidence: &str,
        ttl_secs: u32,
    ) -> Result<Option<Block>, CorrelateError> {
        if !self.config.trust_local_blocks {
            tracing::debug!(%agent_id, %cidr, "Local block not made a fleet block: trust_local_blocks is off.");
            return Ok(None);
        }
        let reported = canonical_net(cidr);
        // An agent vouches for one attacker: an IPv4 host, or an IPv6 host or
        // exactly the prefix the fleet blocks IPv6 attackers as. Ranges are
        // the server's to decide (prefix escalation), never an agent's.
        let host = match reported {
            IpNet::V4(v4) => v4.prefix_len() == 32,
            IpNet::V6(v6) => v6.prefix_len() == 128 || v6.prefix_len() == self.config.ipv6_block_prefix,
        };
        if !host {
            metrics::counter!(LOCAL_BLOCKS_REFUSED, "why" => "range").increment(1);
            tracing::warn!(
                %agent_id, cidr = %reported, ipv6_block_prefix = self.config.ipv6_block_prefix,
                "Local block refused: an agent may report a host, not a range."
            );
            return Ok(None);
        }
        // A reported IPv6 host is judged as its prefix, and may fall back to
        // itself when policy refuses the prefix; a reported prefix has no
        // address of its own to fall back to.
        let (target, fallback) = match reported {
            IpNet::V6(v6) if v6.prefix_len() == 128 => (self.target(v6.addr().into()), Some(v6.addr().into())),
            IpNet::V6(_) => (reported, None),
            IpNet::V4(v4) => (reported, Some(v4.addr().into())),
        };
        let local = LocalEvidence {
            agent_id,
            reason: truncated(reason, MAX_LOCAL_REASON_BYTES),
            evidence: truncated(evidence, MAX_LOCAL_EVIDENCE_BYTES),
        };
        let requested_ttl = Duration::from_secs(u64::from(ttl_secs));
        let block = self.decide(target, fallback, Rule::Local, Some((local, requested_ttl))).await?;
        if let Some(block) = &block {
            self.escalate(block.cidr).await?;
        }
        Ok(block)
    }

    /// Blocks `target` for `rule` unless it is covered already or policy
    /// refuses it; `fallback` is the reported attacker's address inside it
    /// (the /128 fallback of a refused IPv6 /64), `None` when nobody reported
    /// a single address. `local` carries an agent's evidence and the TTL it
    /// asked for, which never lengthens the policy's TTL.
    async fn decide(
        &self,
        target: IpNet,
        fallback: Option<IpAddr>,
        rule: Rule,
        local: Option<(LocalEvidence, Duration)>,
    ) -> Result<Option<Block>, CorrelateError> {
        let mut tx = self.pool.begin().await?;
        lock_range(&mut tx, target).await?;
        let mut range = target;
        let (covered, earlier) = standing(&mut tx, range, true, self.config.offence_window_secs).await?;
        if covered {
            return Ok(None);
        }
        let force = false;
        match blocks::check_policy(&mut tx, &self.config, range, force).await {
            Ok(()) => {}
            Err(BlockError::Refused(refusal)) => {
                let fallback = fallback.map(IpNet::from).filter(|f| *f != range && matches!(f, IpNet::V6(_)));
                let retry = match fallback {
                    Some(fallback)
                        if matches!(
                            refusal,
                            Refusal::FleetOwn { .. } | Refusal::Allowlisted { .. } | Refusal::NeverBlock { .. }
                        ) =>
                    {
                        blocks::check_policy(&mut tx, &self.config, fallback, force).await.is_ok()
                    }
                    _ => false,
                };
                let Some(fallback) = fallback.filter(|_| retry) else {
                    tracing::info!(cidr = %range, rule = rule.reason(), %refusal, "Not blocking: policy refuses it.");
                    return Ok(None);
                };
                tracing::info!(cidr = %range, fallback = %fallback, %refusal, "Blocking the address alone: policy refuses its range.");
                range = fallback;
            }
            Err(BlockError::Database(error)) => return Err(error.into()),
        }
        let mut evidence = self.evidence(&mut tx, range, rule).await?;
        evidence.offence = u32::try_from(earlier + 1).unwrap_or(u32::MAX);
        let ttl = self.ttl(earlier);
        let source = match local {
            Some((local, requested_ttl)) => {
                evidence.agents.insert(local.agent_id);
                if requested_ttl > ttl {
                    metrics::counter!(LOCAL_BLOCKS_TTL_CAPPED).increment(1);
                    tracing::info!(
                        agent_id = %local.agent_id, cidr = %range, requested_ttl_secs = requested_ttl.as_secs(),
                        ttl_secs = ttl.as_secs(), "Local block's TTL capped at the policy's."
                    );
                }
                evidence.local = Some(local);
                BlockSource::Agent
            }
            None => BlockSource::Auto,
        };
        let new = NewBlock {
            cidr: range,
            reason: rule.reason().to_owned(),
            source,
            evidence: evidence.to_json(),
            ttl: Some(ttl),
            created_by: None,
            force,
        };
        let block = match blocks::create_in(&mut tx, &self.config, new).await {
            Ok(block) => block,
            Err(BlockError::Refused(refusal)) => {
                tracing::info!(cidr = %range, %refusal, "Not blocking: policy refuses it.");
                return Ok(None);
            }
            Err(BlockError::Database(error)) => return Err(error.into()),
        };
        sqlx::query("update offenders set last_blocked_at = now() where address between fleetban_first($1::cidr) and fleetban_last($1::cidr)")
            .bind(range)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(
            cidr = %block.cidr,
            block_id = block.id,
            rule = rule.reason(),
            offence = evidence.offence,
            ttl_secs = ttl.as_secs(),
            "Fleet block created."
        );
        Ok(Some(block))
    }

    /// The abuse evidence for `range` within the window.
    async fn evidence(&self, conn: &mut PgConnection, range: IpNet, rule: Rule) -> Result<Evidence, sqlx::Error> {
        let window = secs(self.config.window_secs);
        let rows: Vec<(Uuid, String, i64, OffsetDateTime, OffsetDateTime)> = sqlx::query_as(
            "select agent_id, kind, count(*), min(time), max(time) from events \
             where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) and time >= now() - make_interval(secs => $2) and kind = any($3) \
             group by agent_id, kind",
        )
        .bind(range)
        .bind(window)
        .bind(ABUSE_KINDS)
        .fetch_all(&mut *conn)
        .await?;
        let mut ev = Evidence { rule: rule.reason().to_owned(), ..Evidence::default() };
        for (agent, kind, n, first, last) in rows {
            ev.agents.insert(agent);
            *ev.kinds.entry(kind).or_default() += n;
            ev.events += n;
            ev.see(first, last);
        }
        let hosts: Vec<(IpNet, Option<String>)> = sqlx::query_as(
            "select address, sample_raw from offender_hosts \
             where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) and last_seen >= now() - make_interval(secs => $2) \
             order by last_seen desc limit $3",
        )
        .bind(range)
        .bind(window)
        .bind(i64::try_from(MAX_ADDRESSES).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
        for (address, sample) in hosts {
            ev.addresses.insert(address.addr().to_string());
            if let Some(sample) = sample.filter(|s| !s.is_empty())
                && ev.samples.len() < MAX_SAMPLES
                && !ev.samples.contains(&sample)
            {
                ev.samples.push(sample);
            }
        }
        Ok(ev)
    }

    /// Prefix escalation after `blocked` was blocked: when enough ranges
    /// inside its /24 (IPv4) or /48 (IPv6, counting /64s) were blocked within
    /// `prefix_window_secs`, blocks the prefix and retires the blocks inside.
    async fn escalate(&self, blocked: IpNet) -> Result<Option<Block>, CorrelateError> {
        let Some((prefix, unit)) = escalation_prefix(blocked) else {
            return Ok(None);
        };
        let mut tx = self.pool.begin().await?;
        lock_range(&mut tx, prefix).await?;
        let (covered, earlier) = standing(&mut tx, prefix, false, self.config.offence_window_secs).await?;
        if covered {
            return Ok(None);
        }
        let inside: Vec<(IpNet, serde_json::Value)> = sqlx::query_as(
            "select cidr, evidence from blocks where cidr << $1::cidr \
             and created_at >= now() - make_interval(secs => $2) and revoked_cause is distinct from 'revoked' \
             order by created_at",
        )
        .bind(prefix)
        .bind(secs(self.config.prefix_window_secs))
        .fetch_all(&mut *tx)
        .await?;
        let units: BTreeSet<IpNet> =
            inside.iter().filter_map(|(cidr, _)| IpNet::new(cidr.addr(), unit).ok().map(|n| n.trunc())).collect();
        if units.len() < usize::try_from(self.config.prefix_min_addresses).unwrap_or(usize::MAX) {
            return Ok(None);
        }
        // Refused prefixes (a fleet address or allowlisted host inside) leave
        // the single blocks alone.
        match blocks::check_policy(&mut tx, &self.config, prefix, false).await {
            Ok(()) => {}
            Err(BlockError::Refused(refusal)) => {
                tracing::info!(%prefix, %refusal, "Not escalating to the prefix: policy refuses it.");
                return Ok(None);
            }
            Err(BlockError::Database(error)) => return Err(error.into()),
        }
        let mut ev = Evidence { rule: REASON_PREFIX.to_owned(), ..Evidence::default() };
        for (cidr, json) in inside {
            ev.addresses.insert(cidr.to_string());
            let Ok(one) = serde_json::from_value::<Evidence>(json) else {
                continue;
            };
            ev.agents.extend(one.agents);
            for (kind, n) in one.kinds {
                *ev.kinds.entry(kind).or_default() += n;
            }
            ev.events += one.events;
            if let (Some(first), Some(last)) = (one.first_seen, one.last_seen) {
                ev.see(first, last);
            }
            for sample in one.samples {
                if ev.samples.len() < MAX_SAMPLES && !ev.samples.contains(&sample) {
                    ev.samples.push(sample);
                }
            }
        }
        ev.offence = u32::try_from(earlier + 1).unwrap_or(u32::MAX);
        let ttl = self.ttl(earlier);
        // Retire the blocks inside first: the prefix's add and their removes
        // commit together, and row locks are taken in the same order as every
        // other blocklist writer (block rows, then the version counter).
        let retired = blocks::revoke_covered_by_in(&mut tx, prefix, &format!("superseded by prefix {prefix}")).await;
        let retired = match retired {
            Ok(retired) => retired,
            Err(BlockError::Refused(_)) => Vec::new(),
            Err(BlockError::Database(error)) => return Err(error.into()),
        };
        let new = NewBlock {
            cidr: prefix,
            reason: REASON_PREFIX.to_owned(),
            source: BlockSource::Auto,
            evidence: ev.to_json(),
            ttl: Some(ttl),
            created_by: None,
            force: false,
        };
        let block = match blocks::create_in(&mut tx, &self.config, new).await {
            Ok(block) => block,
            Err(BlockError::Refused(refusal)) => {
                tracing::info!(%prefix, %refusal, "Not escalating to the prefix: policy refuses it.");
                return Ok(None);
            }
            Err(BlockError::Database(error)) => return Err(error.into()),
        };
        tx.commit().await?;
        tracing::info!(
            %prefix,
            block_id = block.id,
            ranges = units.len(),
            retired = retired.len(),
            ttl_secs = ttl.as_secs(),
            "Prefix block created."
        );
        Ok(Some(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let cfg = CorrelateConfig::default();
        assert_eq!(cfg.never_block.len(), DEFAULT_NEVER_BLOCK.len(), "a default never_block range failed to parse");
        cfg.validate().unwrap();
        let doc: IpNet = "192.0.2.0/24".parse().unwrap();
        assert!(!cfg.never_block.iter().any(|n| n.contains(&doc)), "documentation ranges are attackers in tests");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cfg = CorrelateConfig { ipv6_block_prefix: 48, ..Default::default() };
        assert_eq!(cfg.validate().unwrap_err().key, "ipv6_block_prefix");
        let cfg = CorrelateConfig { ttl_secs: vec![], ..Default::default() };
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "correlate.ttl_secs: must be a non-empty list of positive durations"
        );
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncated("abc", 10), "abc");
        assert_eq!(truncated("abcdef", 3), "abc");
        assert_eq!(truncated("aé", 2), "a", "é is two bytes");
        assert_eq!(truncated("", 0), "");
    }

    // ---- Correlator (database tests) ----

    use std::net::IpAddr;

    use sqlx::PgPool;
    use uuid::Uuid;

    use crate::blocks::{self, Block, BlockSource};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    async fn agent(pool: &PgPool, name: &str, addresses: &[&str]) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, $2, $2, '\\x00')")
            .bind(id)
            .bind(name)
            .execute(pool)
            .await
            .unwrap();
        for a in addresses {
            sqlx::query("insert into agent_addresses (agent_id, address) values ($1, $2)")
                .bind(id)
                .bind(ip(a))
                .execute(pool)
                .await
                .unwrap();
        }
        id
    }

    /// What ingest writes for `n` abuse events of `kind` from `addr` on
    /// `agent`, `ago_secs` before now: the events, then the evidence rows
    /// (`offender_hosts` upsert, `offenders` upsert with the host count).
    async fn abuse(pool: &PgPool, agent: Uuid, addr: &str, kind: &str, n: i32, ago_secs: i64) {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("select fleetban_ensure_event_partition((now() - make_interval(secs => $1))::date)")
            .bind(ago_secs as f64)
            .execute(&mut *tx)
            .await
            .unwrap();
        let raw = format!(
            "2026-11-27 02:00:00 dovecot_login authenticator failed for (User) [{addr}]:51234: \
             535 Incorrect authentication data (set_id=info@example.com)"
        );
        let (first, last): (OffsetDateTime, OffsetDateTime) = sqlx::query_as(
            "with b as (select coalesce(max(batch_seq), 0) + 1 as seq from events where agent_id = $1), \
             ins as (insert into events (agent_id, batch_seq, batch_index, time, kind, remote, raw) \
               select $1, b.seq, g, now() - make_interval(secs => $2) - g * interval '1 millisecond', $3, $4, $5 \
               from b, generate_series(1, $6) g returning time) \
             select min(time), max(time) from ins",
        )
        .bind(agent)
        .bind(ago_secs as f64)
        .bind(kind)
        .bind(ip(addr))
        .bind(&raw)
        .bind(n)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "insert into offender_hosts (address, agent_id, kind, first_seen, last_seen, events, sample_raw) \
             values ($1, $2, $3, $4, $5, $6, $7) \
             on conflict (address, agent_id, kind) do update set \
               first_seen = least(offender_hosts.first_seen, excluded.first_seen), \
               last_seen = greatest(offender_hosts.last_seen, excluded.last_seen), \
               events = offender_hosts.events + excluded.events, \
               sample_raw = coalesce(excluded.sample_raw, offender_hosts.sample_raw)",
        )
        .bind(ip(addr))
        .bind(agent)
        .bind(kind)
        .bind(first)
        .bind(last)
        .bind(i64::from(n))
        .bind(&raw)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "insert into offenders (address, first_seen, last_seen, events, hosts) \
             values ($1, $2, $3, $4, (select count(distinct agent_id) from offender_hosts where address = $1)) \
             on conflict (address) do update set \
               first_seen = least(offenders.first_seen, excluded.first_seen), \
               last_seen = greatest(offenders.last_seen, excluded.last_seen), \
               events = offenders.events + excluded.events, hosts = excluded.hosts",
        )
        .bind(ip(addr))
        .bind(first)
        .bind(last)
        .bind(i64::from(n))
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    fn correlator(pool: &PgPool) -> Correlator {
        Correlator::new(pool.clone(), CorrelateConfig::default())
    }

    fn ttl_secs(block: &Block) -> i64 {
        (block.expires_at.unwrap() - block.created_at).whole_seconds()
    }

    async fn live(pool: &PgPool) -> Vec<IpNet> {
        sqlx::query_scalar("select cidr from blocks where revoked_at is null order by cidr")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// Two agents see `addr`; the second batch triggers the decision.
    async fn two_agent_attack(c: &Correlator, a: Uuid, b: Uuid, addr: &str) -> Vec<Block> {
        abuse(&c.pool, a, addr, "auth_failed", 3, 30).await;
        assert!(c.on_batch(a, &[ip(addr)]).await.unwrap().is_empty(), "{addr}: one agent is not enough");
        abuse(&c.pool, b, addr, "rcpt_rejected", 2, 5).await;
        c.on_batch(b, &[ip(addr)]).await.unwrap()
    }

    /// One more event from an address whose two-agent evidence is still in
    /// the window.
    async fn attack_again(c: &Correlator, a: Uuid, addr: &str) -> Vec<Block> {
        abuse(&c.pool, a, addr, "auth_failed", 1, 1).await;
        c.on_batch(a, &[ip(addr)]).await.unwrap()
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn two_agents_make_a_fleet_block_with_evidence(pool: PgPool) {
        let c = correlator(&pool);
        let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
        let made = two_agent_attack(&c, a, b, "203.0.113.9").await;
        assert_eq!(made.len(), 1);
        let block = &made[0];
        assert_eq!(
            (block.cidr, block.reason.as_str(), block.source),
            (net("203.0.113.9/32"), REASON_FLEET, BlockSource::Auto)
        );
        assert_eq!(ttl_secs(block), 3_600);
        let ev = &block.evidence;
        let mut agents: Vec<String> = serde_json::from_value(ev["agents"].clone()).unwrap();
        agents.sort();
        let mut want = vec![a.to_string(), b.to_string()];
        want.sort();
        assert_eq!(agents, want);
        assert_eq!(ev["kinds"], serde_json::json!({"auth_failed": 3, "rcpt_rejected": 2}));
        assert_eq!(ev["events"], 5);
        assert_eq!(ev["rule"], REASON_FLEET);
        assert_eq!(ev["offence"], 1);
        assert!(ev["samples"][0].as_str().unwrap().contains("[203.0.113.9]"), "{ev}");
        let first =
            OffsetDateTime::parse(ev["first_seen"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
                .unwrap();
        let last =
            OffsetDateTime::parse(ev["last_seen"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
                .unwrap();
        assert!(first < last && (last - first).whole_seconds() >= 24, "{first} {last}");
        let logged: Option<OffsetDateTime> =
            sqlx::query_scalar("select last_blocked_at from offenders where address = '203.0.113.9'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(logged.is_some());

        // Another batch about the blocked address changes nothing.
        abuse(&pool, a, "203.0.113.9", "auth_failed", 3, 1).await;
        assert!(c.on_batch(a, &[ip("203.0.113.9")]).await.unwrap().is_empty());
        assert_eq!(blocks::current_version(&pool).await.unwrap(), 1);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn below_the_thresholds_nothing_is_blocked(pool: PgPool) {
        let c = correlator(&pool);
        let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
        // One agent, 49 events: neither rule.
        abuse(&pool, a, "203.0.113.20", "auth_failed", 49, 10).await;
        assert!(c.on_batch(a, &[ip("203.0.113.20")]).await.unwrap().is_empty());
        // The second agent's evidence is older than the window.
        abuse(&pool, b, "203.0.113.20", "auth_failed", 5, 700).await;
        assert!(c.on_batch(b, &[ip("203.0.113.20")]).await.unwrap().is_empty());
        // Non-abuse events do not count towards the single-host threshold.
        abuse(&pool, a, "203.0.113.21", "connect", 80, 10).await;
        assert!(c.on_batch(a, &[ip("203.0.113.21")]).await.unwrap().is_empty());
        assert!(live(&pool).await.is_empty());
        // With min_hosts = 3, two agents are not enough.
        let strict = Correlator::new(pool.clone(), CorrelateConfig { min_hosts: 3, ..Default::default() });
        abuse(&pool, b, "203.0.113.22", "auth_failed", 1, 10).await;
        abuse(&pool, a, "203.0.113.22", "auth_failed", 1, 10).await;
        assert!(strict.on_batch(a, &[ip("203.0.113.22")]).await.unwrap().is_empty());
        assert_eq!(c.on_batch(a, &[ip("203.0.113.22")]).await.unwrap().len(), 1);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn heavy_abuse_on_one_host_is_blocked(pool: PgPool) {
        let c = correlator(&pool);
        let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
        abuse(&pool, a, "203.0.113.30", "too_many_syntax", 30, 100).await;
        abuse(&pool, a, "203.0.113.30", "auth_failed", 19, 10).await;
        assert!(c.on_batch(a, &[ip("203.0.113.30")]).await.unwrap().is_empty());
        // Another agent's batch does not count the first agent's events.
        abuse(&pool, b, "203.0.113.31", "auth_failed", 1, 10).await;
        assert!(c.on_batch(b, &[ip("203.0.113.30"), ip("203.0.113.31")]).await.unwrap().is_empty());
        abuse(&pool, a, "203.0.113.30", "auth_failed", 1, 1).await;
        let made = c.on_batch(a, &[ip("203.0.113.30")]).await.unwrap();
        assert_eq!(made.len(), 1);
        assert_eq!((made[0].cidr, made[0].reason.as_str()), (net("203.0.113.30/32"), REASON_SINGLE_HOST));
        assert_eq!(made[0].evidence["events"], 50);
        assert_eq!(made[0].evidence["kinds"], serde_json::json!({"auth_failed": 20, "too_many_syntax": 30}));
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn local_blocks_become_fleet_blocks(pool: PgPool) {
        let c = correlator(&pool);
        let a = agent(&pool, "mx1", &["198.51.100.25"]).await;
        let block = c
            .on_local_block(a, net("203.0.113.40/32"), "slot_exhaustion", "held 80 of 100 slots", 600)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (block.cidr, block.source, block.reason.as_str()),
            (net("203.0.113.40/32"), BlockSource::Agent, REASON_LOCAL)
        );
        assert_eq!(ttl_secs(&block), 3_600, "the offence TTL when longer than the agent's");
        assert_eq!(block.evidence["local"]["reason"], "slot_exhaustion");
        assert_eq!(block.evidence["local"]["evidence"], "held 80 of 100 slots");
        assert_eq!(block.evidence["agents"], serde_json::json!([a.to_string()]));
        // Already covered: nothing new.
        assert!(c.on_local_block(a, net("203.0.113.40/32"), "conn_rate", "", 600).await.unwrap().is_none());
        // A longer TTL the agent asks for is capped at the policy's; an IPv6
        // /128 becomes its /64.
        let v6 = c.on_local_block(a, net("2001:db8:4:4::7/128"), "conn_rate", "", u32::MAX).await.unwrap().unwrap();
        assert_eq!((v6.cidr, ttl_secs(&v6)), (net("2001:db8:4:4::/64"), 3_600));
        // Mapped IPv4 is IPv4.
        let mapped = c.on_local_block(a, net("::ffff:203.0.113.41/128"), "conn_rate", "", 60).await.unwrap().unwrap();
        assert_eq!(mapped.cidr, net("203.0.113.41/32"));
        // Never: the fleet's own address, a never_block range, an over-broad range.
        assert!(c.on_local_block(a, net("198.51.100.25/32"), "conn_rate", "", 60).await.unwrap().is_none());
        assert!(c.on_local_block(a, net("192.168.1.1/32"), "conn_rate", "", 60).await.unwrap().is_none());
        assert!(c.on_local_block(a, net("198.0.0.0/8"), "conn_rate", "", 60).await.unwrap().is_none());
        // Nor any range wider than a host, however narrow.
        for range in ["198.51.0.0/16", "203.0.113.0/24", "203.0.113.40/31", "2001:db8:5::/48", "2001:db8:5:5::/96"] {
            assert!(c.on_local_block(a, net(range), "conn_rate", "", 60).await.unwrap().is_none(), "{range}");
        }
        assert_eq!(live(&pool).await.len(), 3);
        // Not trusted: nothing.
        let distrust =
            Correlator::new(pool.clone(), CorrelateConfig { trust_local_blocks: false, ..Default::default() });
        assert!(distrust.on_local_block(a, net("203.0.113.42/32"), "conn_rate", "", 60).await.unwrap().is_none());
        assert_eq!(blocks::current_version(&pool).await.unwrap(), 3);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn four_addresses_in_a_slash_24_escalate_to_the_prefix(pool: PgPool) {
        let c = correlator(&pool);
        let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
        let mut singles = Vec::new();
        for i in 1..=3 {
            let made = two_agent_attack(&c, a, b, &format!("192.0.2.{i}")).await;
            assert_eq!(made.len(), 1, "three addresses do not escalate");
            singles.push(made[0].id);
        }
        let made = two_agent_attack(&c, a, b, "192.0.2.200").await;
        assert_eq!(made.len(), 2, "{made:?}");
        singles.push(made[0].id);
        let prefix = &made[1];
        assert_eq!((prefix.cidr, prefix.reason.as_str()), (net("192.0.2.0/24"), REASON_PREFIX));
        assert_eq!(ttl_secs(prefix), 3_600);
        assert_eq!(live(&pool).await, vec![net("192.0.2.0/24")], "the prefix replaces the singles");
        let ev = &prefix.evidence;
        assert_eq!(ev["addresses"].as_array().unwrap().len(), 4);
        assert_eq!(ev["events"], 20);
        assert_eq!(ev["agents"].as_array().unwrap().len(), 2);

        // The change log: 4 adds, the prefix's removes of the singles and its add, in one commit.
        let log: Vec<(String, i64)> =
            sqlx::query_as("select op, block_id from block_changes order by version").fetch_all(&pool).await.unwrap();
        let removes: Vec<i64> = log.iter().filter(|(op, _)| op == "remove").map(|(_, id)| *id).collect();
        assert_eq!(removes, singles);
        assert_eq!(log.last().unwrap(), &("add".to_owned(), prefix.id));
        let delta = blocks::changes_since(&pool, 3, None).await.unwrap().unwrap();
        assert_eq!(delta.added.iter().map(|e| e.block_id).collect::<Vec<_>>(), vec![prefix.id]);
        assert_eq!(delta.removed, singles[..3].to_vec());

        // A fifth address inside is covered; another /24 is unaffected.
        abuse(&pool, a, "192.0.2.77", "auth_failed", 60, 1).await;
        assert!(c.on_batch(a, &[ip("192.0.2.77")]).await.unwrap().is_empty());
        assert_eq!(two_agent_attack(&c, a, b, "192.0.3.1").await.len(), 1);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn ipv6_attackers_are_blocked_as_their_slash_64(pool: PgPool) {
        let c = correlator(&pool);
        let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
        // Two addresses of one /64 on two agents are one attacker.
        abuse(&pool, a, "2001:db8:a:b::1", "auth_failed", 2, 20).await;
        assert!(c.on_batch(a, &[ip("2001:db8:a:b::1")]).await.unwrap().is_empty());
        abuse(&pool, b, "2001:db8:a:b::2", "auth_failed", 2, 10).await;
        let made = c.on_batch(b, &[ip("2001:db8:a:b::2")]).await.unwrap();
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].cidr, net("2001:db8:a:b::/64"));
        assert_eq!(made[0].evidence["addresses"], serde_json::json!(["2001:db8:a:b::1", "2001:db8:a:b::2"]));

        // Four /64s of one /48 escalate to the /48.
        for i in 1..=3 {
            let made = two_agent_attack(&c, a, b, &format!("2001:db8:a:{i}::5")).await;
            assert_eq!(made.len(), if i < 3 { 1 } else { 2 }, "{i}");
        }
        assert_eq!(live(&pool).await, vec![net("2001:db8:a::/48")]);

        // Configured to /128: the address alone, and four of one /64 are one /64 towards the /48.
        let exact = Correlator::new(pool.clone(), CorrelateConfig { ipv6_block_prefix: 128, ..Default::default() });
        for i in 1..=4 {
            let addr = format!("2001:db8:c:d::{i}");
            abuse(&pool, a, &addr, "auth_failed", 1, 10).await;
            abuse(&pool, b, &addr, "auth_failed", 1, 10).await;
            let made = exact.on_batch(b, &[ip(&addr)]).await.unwrap();
            assert_eq!(made.iter().map(|b| b.cidr).collect::<Vec<_>>(), vec![net(&format!("{addr}/128"))]);
        }
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn repeat_offenders_get_escalating_ttls(pool: PgPool) {
        let c = correlator(&pool);
        let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
        let addr = "203.0.113.50";
        let mut ttls = Vec::new();
        for round in 0..4 {
            let made =
                if round == 0 { two_agent_attack(&c, a, b, addr).await } else { attack_again(&c, a, addr).await };
            assert_eq!(made.len(), 1);
            ttls.push((ttl_secs(&made[0]), made[0].evidence["offence"].as_i64().unwrap()));
            // The block runs out; the attacker comes back.
            sqlx::query("update blocks set expires_at = now() - interval '1 second' where id = $1")
                .bind(made[0].id)
                .execute(&pool)
                .await
                .unwrap();
            assert_eq!(blocks::expire_due(&pool).await.unwrap(), 1);
        }
        assert_eq!(ttls, vec![(3_600, 1), (21_600, 2), (86_400, 3), (604_800, 4)]);

        // An operator's revocation is not an offence; blocks older than the window are not either.
        let fresh = "203.0.113.51";
        let first = two_agent_attack(&c, a, b, fresh).await.remove(0);
        blocks::revoke(&pool, first.id, "false positive").await.unwrap().unwrap();
        let again = attack_again(&c, a, fresh).await.remove(0);
        assert_eq!(ttl_secs(&again), 3_600);
        sqlx::query("update blocks set created_at = now() - interval '31 days', expires_at = now() - interval '1 second' where id = $1")
            .bind(again.id)
            .execute(&pool)
            .await
            .unwrap();
        blocks::expire_due(&pool).await.unwrap();
        assert_eq!(ttl_secs(&attack_again(&c, a, fresh).await.remove(0)), 3_600);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn allowlisted_and_fleet_addresses_are_never_blocked(pool: PgPool) {
        let c = correlator(&pool);
        let a = agent(&pool, "mx1", &["203.0.113.60", "2001:db8:f:1::25"]).await;
        let b = agent(&pool, "mx2", &[]).await;
        sqlx::query("insert into allowlist (cidr, note) values ('198.51.100.0/24', 'partner relays')")
            .execute(&pool)
            .await
            .unwrap();
        for addr in ["198.51.100.5", "203.0.113.60", "10.0.0.5"] {
            abuse(&pool, a, addr, "auth_failed", 60, 10).await;
            assert!(two_agent_attack(&c, a, b, addr).await.is_empty(), "{addr}");
            assert!(c.on_local_block(b, IpNet::from(ip(addr)), "conn_rate", "", 60).await.unwrap().is_none(), "{addr}");
        }
        // Four allowlisted addresses in one /24 do not escalate either.
        assert!(live(&pool).await.is_empty());
        assert_eq!(blocks::current_version(&pool).await.unwrap(), 0);

        // An attacker in the /64 of a fleet host: the address alone.
        let made = two_agent_attack(&c, a, b, "2001:db8:f:1::bad").await;
        assert_eq!(made.iter().map(|b| b.cidr).collect::<Vec<_>>(), vec![net("2001:db8:f:1::bad/128")]);
        // A prefix that would hold an allowlisted or fleet address is not made.
        sqlx::query("insert into allowlist (cidr, note) values ('192.0.2.99/32', 'monitoring')")
            .execute(&pool)
            .await
            .unwrap();
        for i in 1..=4 {
            assert_eq!(two_agent_attack(&c, a, b, &format!("192.0.2.{i}")).await.len(), 1);
        }
        assert_eq!(live(&pool).await.len(), 5);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn concurrent_batches_about_one_attacker_make_one_block(pool: PgPool) {
        let c = correlator(&pool);
        let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
        abuse(&pool, a, "203.0.113.70", "auth_failed", 2, 10).await;
        abuse(&pool, b, "203.0.113.70", "auth_failed", 2, 10).await;
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let c = c.clone();
                let agent = if i % 2 == 0 { a } else { b };
                tokio::spawn(async move { c.on_batch(agent, &[ip("203.0.113.70")]).await.unwrap().len() })
            })
            .collect();
        let mut made = 0;
        for t in tasks {
            made += t.await.unwrap();
        }
        assert_eq!(made, 1);
        assert_eq!(blocks::current_version(&pool).await.unwrap(), 1);
    }
}
