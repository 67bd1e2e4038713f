//! Fleet correlation: turns per-address evidence from many agents into fleet
//! blocks, with the shared evidence model of `fleetban_proto::policy`.
//!
//! This module owns the policy (`[correlate]` in the server TOML,
//! [`CorrelateConfig`]) and the [`Correlator`] that applies it. After ingest
//! commits a batch it calls [`Correlator::on_batch`] with the abuse addresses
//! the batch touched; an agent's `LocalBlock` goes to
//! [`Correlator::on_local_block`]. The rules:
//!
//! - **scenarios** (`auth`, `relay`, `dictionary`, `protocol`, `conn_limit`,
//!   `acl`): each abuse kind feeds one scenario with its weight; a scenario
//!   blocks when one host's weighted events (`per_host`), or the fleet's
//!   spread over `min_hosts` hosts (`fleet`), within its `window_secs` meet
//!   its threshold ([`policy::judge`]). Context lines (connects, the global
//!   refusals everyone gets while a host is full, lost sessions, TLS errors,
//!   accepted mail) are never evidence. Counts come from `evidence_minutes`
//!   and `auth_users`, kept by ingest;
//! - **good standing**: an address that delivered accepted mail or logged in
//!   within `good_standing_secs` (`sender_standing`) needs each rule's
//!   `good_standing_factor` times the evidence (0 = never);
//! - **protected senders**: a verified reverse-DNS name in
//!   `protected_domains` is never blocked automatically, only by an
//!   operator;
//! - **local block**: an agent's own block is a fleet block at once when
//!   `trust_local_blocks`, for a host only (an IPv4 /32, an IPv6 /128 or the
//!   /`ipv6_block_prefix` itself; wider ranges are refused and counted) and
//!   for the policy's TTL (a longer TTL the agent asks for is capped),
//!   unless the address is protected, or in good standing and the agent's
//!   rule is a scenario (its one host's evidence is then not enough; a slot
//!   flood or connection flood still is);
//! - **prefix**: `prefix_min_addresses` blocked addresses in one /24, or /64s
//!   in one /48, within `prefix_window_secs` make a block of the prefix,
//!   which retires the blocks inside it. Only clearly abusive blocks count:
//!   never one of an address in good standing;
//! - an IPv6 address is judged and blocked as its /`ipv6_block_prefix`;
//! - the n-th block of a range within `offence_window_secs` lasts
//!   `ttl_secs[n-1]` (the last value repeats); blocks an operator revoked do
//!   not count as offences, nor towards a prefix;
//! - **an operator's unblock wins**: evidence about a range from before the
//!   newest operator revocation of a block overlapping it (from its minute
//!   on) is not counted again, so only new evidence blocks it again;
//! - **shadow mode**: a rule named in `shadow_rules` (or a scenario table
//!   with `enforce = false`) records what it would have blocked in
//!   `shadow_decisions` and blocks nothing;
//! - never: allowlisted, `never_block` or fleet-own ranges, nor over-broad ones
//!   (enforced by [`crate::blocks`] for every creator). An IPv6 /64 refused
//!   because it holds such an address falls back to the attacker's /128.
//!
//! Every evaluation takes the time it judges at as a parameter, so the
//! replay (`crate::replay`) runs the same code over past traffic.
//! Every decision records its [`Evidence`] as the block's JSON evidence.
//! Decisions about one range are serialised by a transaction-level advisory
//! lock on it, so concurrent batches about one attacker make one block.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetban_proto::canonical_net;
use fleetban_proto::detect::Rule as LocalRule;
use fleetban_proto::policy::{self, Count, DEFAULT_PROTECTED_DOMAINS, RuleTable, Rules, Scenario, Tally, Verdict};
use fleetban_proto::text::{LOCAL_BLOCK_MAX_EVIDENCE_BYTES, LOCAL_BLOCK_MAX_REASON_BYTES, truncate};
use fleetban_proto::v1::{EventKind, Policy, RulePolicy};
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
    /// Replaced by the scenario rules (`[correlate.rules.<scenario>]
    /// min_hosts`); refused with a message that says so.
    pub min_hosts: Option<u32>,
    /// Replaced by the scenario rules' `window_secs`; refused.
    pub window_secs: Option<u64>,
    /// Replaced by the scenario rules' `per_host`; refused.
    pub single_host_threshold: Option<u32>,
    /// Per-scenario rules (`auth`, `relay`, `dictionary`, `protocol`,
    /// `conn_limit`, `acl`), each key optional: `per_host`, `fleet`,
    /// `min_hosts`, `window_secs`, `distinct_users`, `good_standing_factor`,
    /// `enforce`. Default: the shipped rules (`deploy/server.example.toml`).
    pub rules: BTreeMap<String, RuleTable>,
    /// Rules that run in shadow mode (record, never block): scenario names,
    /// `local_block` (agents' local blocks), `prefix`, and the agents' own
    /// `slot_exhaustion` and `conn_rate` (pushed to them). Default: none.
    pub shadow_rules: Vec<String>,
    /// How long accepted mail or a login keeps an address in good standing,
    /// seconds. Default 604800 (7 days).
    pub good_standing_secs: u64,
    /// Verified reverse-DNS domains never blocked automatically. Default: the
    /// big mailbox providers and ESPs.
    pub protected_domains: Option<Vec<String>>,
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
    /// multicast, RFC 1918, carrier-grade NAT (100.64.0.0/10), reserved and
    /// broadcast (240.0.0.0/4), ULA ranges and the IPv4-mapped IPv6 space
    /// (addresses in it are judged as IPv4).
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
    "100.64.0.0/10",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
    "fc00::/7",
    "::ffff:0:0/96",
];

/// Rule names `shadow_rules` accepts besides the scenarios.
const OTHER_RULES: [&str; 4] = ["local_block", "prefix", "slot_exhaustion", "conn_rate"];

/// A block-store result with the policy's refusal apart: `Ok(Err(refusal))`
/// is a decision not to block, a database failure is the error.
fn refusable<T>(result: Result<T, BlockError>) -> Result<Result<T, Refusal>, CorrelateError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(BlockError::Refused(refusal)) => Ok(Err(refusal)),
        Err(BlockError::Database(error)) => Err(error.into()),
    }
}

impl blocks::BlockPolicy for CorrelateConfig {
    fn min_prefix_v4(&self) -> u8 {
        self.min_prefix_v4
    }

    fn min_prefix_v6(&self) -> u8 {
        self.min_prefix_v6
    }

    fn never_block(&self) -> &[IpNet] {
        &self.never_block
    }
}

impl Default for CorrelateConfig {
    fn default() -> Self {
        CorrelateConfig {
            min_hosts: None,
            window_secs: None,
            single_host_threshold: None,
            rules: BTreeMap::new(),
            shadow_rules: Vec::new(),
            good_standing_secs: 604_800,
            protected_domains: None,
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
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl CorrelateConfig {
    /// Checks values that deserialize but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, problem: &str| Err(ConfigError { key: key.to_owned(), problem: problem.to_owned() });
        if self.min_hosts.is_some() {
            return err("min_hosts", "was replaced by per-scenario rules: set [correlate.rules.<scenario>] min_hosts");
        }
        if self.window_secs.is_some() {
            return err(
                "window_secs",
                "was replaced by per-scenario rules: set [correlate.rules.<scenario>] window_secs",
            );
        }
        if self.single_host_threshold.is_some() {
            return err(
                "single_host_threshold",
                "was replaced by per-scenario rules: set [correlate.rules.<scenario>] per_host",
            );
        }
        for name in self.rules.keys() {
            if Scenario::from_name(name).is_none() {
                return err(
                    &format!("rules.{name}"),
                    "is not a scenario (auth, relay, dictionary, protocol, conn_limit, acl)",
                );
            }
        }
        for name in &self.shadow_rules {
            if Scenario::from_name(name).is_none() && !OTHER_RULES.contains(&name.as_str()) {
                return err(
                    "shadow_rules",
                    &format!(
                        "{name:?} is not a rule (auth, relay, dictionary, protocol, conn_limit, acl, local_block, prefix, slot_exhaustion, conn_rate)"
                    ),
                );
            }
        }
        if let Err(e) = self.resolved_rules().validate() {
            return err(&format!("rules.{}.{}", e.scenario, e.key), e.problem);
        }
        if self.good_standing_secs == 0 || self.good_standing_secs > 31_536_000 {
            return err("good_standing_secs", "must be between 1 and 31536000 (a year)");
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

    /// The scenario rules in force: the shipped ones with the configured
    /// tables applied and `shadow_rules` set.
    pub fn resolved_rules(&self) -> Rules {
        let mut rules = Rules::default();
        for scenario in Scenario::ALL {
            let mut rule = self.rules.get(scenario.as_str()).copied().unwrap_or_default().resolve(scenario);
            rule.shadow |= self.is_shadow(scenario.as_str());
            rules.set(scenario, rule);
        }
        rules
    }

    /// Whether the rule named `name` runs in shadow mode by `shadow_rules`.
    pub fn is_shadow(&self, name: &str) -> bool {
        self.shadow_rules.iter().any(|n| n == name)
    }

    /// The protected domains in force.
    pub fn protected_domains(&self) -> Vec<String> {
        match &self.protected_domains {
            Some(list) => list.clone(),
            None => DEFAULT_PROTECTED_DOMAINS.iter().map(|d| (*d).to_owned()).collect(),
        }
    }

    /// The policy pushed to every agent on Hello: the IPv6 block prefix, the
    /// per-host parts of the scenario rules the operator configured, the
    /// shadow flags of the agents' own rules, and the protected domains and
    /// good-standing time when configured. A field left at zero keeps the
    /// agent's own value.
    pub fn agent_policy(&self) -> Policy {
        let resolved = self.resolved_rules();
        let mut rules: Vec<RulePolicy> = resolved
            .to_proto()
            .into_iter()
            .filter(|r| self.rules.contains_key(&r.name) || self.is_shadow(&r.name))
            .collect();
        for local in [LocalRule::SlotExhaustion, LocalRule::ConnRate] {
            rules.push(RulePolicy {
                name: local.as_str().to_owned(),
                shadow: self.is_shadow(local.as_str()),
                ..RulePolicy::default()
            });
        }
        Policy {
            ipv6_block_prefix: u32::from(self.ipv6_block_prefix),
            rules,
            protected_domains: self.protected_domains.clone().unwrap_or_default(),
            protected_domains_set: self.protected_domains.is_some(),
            good_standing_secs: if self.good_standing_secs == 604_800 {
                0
            } else {
                u32::try_from(self.good_standing_secs).unwrap_or(u32::MAX)
            },
            ..Policy::default()
        }
    }
}

/// The stored names (`events.kind`, `offender_hosts.kind`) of the event kinds
/// that count as abuse (the shared vocabulary's abuse kinds).
pub fn abuse_kinds() -> Vec<&'static str> {
    EventKind::ALL.into_iter().filter(|k| k.is_abuse()).map(EventKind::as_str).collect()
}

/// Block reason: a scenario's fleet threshold (evidence from several agents).
pub const REASON_FLEET: &str = "fleet_correlation";
/// Block reason: a scenario's per-host threshold, seen by the server.
pub const REASON_SINGLE_HOST: &str = "single_host";
/// Block reason: an agent's local block.
pub const REASON_LOCAL: &str = "local_block";
/// Block reason: prefix escalation.
pub const REASON_PREFIX: &str = "prefix";

/// Counter of agents' `LocalBlock`s refused by the trust model, by `why`.
pub const LOCAL_BLOCKS_REFUSED: &str = "fleetban_local_blocks_refused_total";
/// Counter of agents' `LocalBlock`s whose TTL was capped at the policy's.
pub const LOCAL_BLOCKS_TTL_CAPPED: &str = "fleetban_local_blocks_ttl_capped_total";
/// Metric: decisions of rules in shadow mode, by rule.
pub const SHADOW_DECISIONS: &str = "fleetban_shadow_decisions_total";
/// Metric: automatic decisions not made, by why (`protected`,
/// `good_standing`).
pub const SPARED: &str = "fleetban_correlate_spared_total";

/// Sample raw lines kept in a decision's evidence.
const MAX_SAMPLES: usize = 5;
/// Addresses listed in a decision's evidence.
const MAX_ADDRESSES: usize = 64;
/// A shadow decision about a range is recorded at most once per this long
/// per rule.
const SHADOW_REPEAT: Duration = Duration::from_secs(3_600);

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
    /// The scenario whose threshold was met, for a scenario verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<Scenario>,
    /// The verdict in one line (counts, window, threshold).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub verdict: String,
    /// The address was in good standing (the thresholds were raised).
    pub good_standing: bool,
    /// Whether this block counts towards a prefix escalation (only clearly
    /// abusive ones do; absent in older blocks = true).
    #[serde(default = "yes")]
    pub escalates: bool,
    /// Agents that saw abuse from the range.
    pub agents: BTreeSet<Uuid>,
    /// Abuse events by kind, within each kind's rule window.
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

fn yes() -> bool {
    true
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
    /// The JSON stored with a block or shadow decision.
    pub fn to_json(&self) -> serde_json::Value {
        // Serialising plain data (strings, numbers, UTC timestamps) cannot fail.
        serde_json::to_value(self).unwrap_or_else(|_| serde_json::json!({ "rule": self.rule }))
    }

    /// Adds per-(agent, kind) counts with their first and last minute.
    fn count(&mut self, per_agent: &[AgentCount]) {
        for (agent, kind, n, first, last) in per_agent {
            self.agents.insert(*agent);
            *self.kinds.entry(kind.clone()).or_default() += n;
            self.events += n;
            self.see(*first, *last);
        }
    }

    fn see(&mut self, first: OffsetDateTime, last: OffsetDateTime) {
        self.first_seen = Some(self.first_seen.map_or(first, |t| t.min(first)));
        self.last_seen = Some(self.last_seen.map_or(last, |t| t.max(last)));
    }
}

/// Abuse events of one (agent, kind) within the kind's window: the agent,
/// the kind's stored name, the count, and the first and last minute.
pub type AgentCount = (Uuid, String, i64, OffsetDateTime, OffsetDateTime);

/// What the store knows about one range at one time: the evaluation of
/// [`Correlator::assess`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assessment {
    /// The counts, standing and protection the verdict is judged on.
    pub tally: Tally,
    /// Abuse events by (agent, kind) within each kind's window, with the
    /// first and last minute seen.
    pub per_agent: Vec<AgentCount>,
    /// The verified reverse-DNS names seen for the range.
    pub host_names: Vec<String>,
}

/// A decision the correlation made (or would make, in shadow mode).
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The range.
    pub target: IpNet,
    /// The scenario verdict.
    pub verdict: Verdict,
    /// The evidence to store.
    pub evidence: Evidence,
}

/// Why an automatic decision was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spared {
    /// The sender's verified reverse DNS is in a protected domain.
    Protected,
    /// The sender is in good standing and one host's evidence is not enough.
    GoodStanding,
}

impl Spared {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Spared::Protected => "protected",
            Spared::GoodStanding => "good_standing",
        }
    }
}

/// Whether an agent's local block for `reason` may become a fleet block of
/// a range with `tally`: never for a protected sender; for one in good
/// standing only a slot or connection flood (the agent has already doubled
/// those thresholds), never one host's scenario evidence.
pub fn judge_local(tally: &Tally, reason: &str) -> Result<(), Spared> {
    if tally.protected {
        return Err(Spared::Protected);
    }
    let flood = matches!(LocalRule::from_name(reason), Some(LocalRule::SlotExhaustion | LocalRule::ConnRate));
    if tally.good_standing && !flood {
        return Err(Spared::GoodStanding);
    }
    Ok(())
}

/// Which rule an automatic decision is recorded under.
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
    rules: Rules,
    protected: Arc<Vec<String>>,
    /// ASN/country evidence multipliers ([`crate::geo`]).
    geo: Arc<crate::geo::GeoPolicy>,
}

/// Seconds as the `double precision` that `make_interval(secs => ..)` takes.
fn secs(s: u64) -> f64 {
    s as f64
}

/// The time from which evidence about the range `$1` counts at the time `$4`:
/// after the newest operator revocation of a block overlapping it (an
/// operator's unblock wins, old evidence does not block again), else always.
/// Evidence is kept per minute, so the minute of the revocation itself is
/// left out too.
macro_rules! revoked_since {
    () => {
        "coalesce((select date_trunc('minute', max(revoked_at)) from blocks \
           where revoked_cause = 'revoked' and cidr && $1::cidr and revoked_at <= $4), '-infinity')"
    };
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

/// The prefix an escalation of `range` would block, with the prefix length of
/// the units counted inside it: /24 counting addresses, /48 counting /64s.
pub fn escalation_prefix(range: IpNet) -> Option<(IpNet, u8)> {
    let (len, unit) = match range {
        IpNet::V4(_) => (24, 32),
        IpNet::V6(_) => (48, 64),
    };
    if range.prefix_len() <= len {
        return None;
    }
    IpNet::new(range.addr(), len).ok().map(|p| (p.trunc(), unit))
}

/// The tally of per-(agent, kind) counts and per-agent failing users.
fn tally(per_agent: &[(Uuid, String, i64, OffsetDateTime, OffsetDateTime)], users: &[(Option<Uuid>, i64)]) -> Tally {
    let mut t = Tally::default();
    // Per scenario, per agent: weighted events.
    let mut by_agent: [BTreeMap<Uuid, u64>; 6] = Default::default();
    for (agent, kind, n, _, _) in per_agent {
        let Some(kind) = EventKind::from_name(kind) else { continue };
        let Some(scenario) = kind.scenario() else { continue };
        let w = u64::from(kind.weight()) * u64::try_from(*n).unwrap_or(0);
        *by_agent[scenario.index()].entry(*agent).or_default() += w;
    }
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    for scenario in Scenario::ALL {
        let m = &by_agent[scenario.index()];
        t.counts[scenario.index()] = Count {
            host_max: clamp(m.values().copied().max().unwrap_or(0)),
            fleet: clamp(m.values().sum()),
            hosts: clamp(m.values().filter(|v| **v > 0).count() as u64),
            ..Count::default()
        };
    }
    let auth = &mut t.counts[Scenario::Auth.index()];
    for (agent, n) in users {
        let n = clamp(u64::try_from(*n).unwrap_or(0));
        match agent {
            Some(_) => auth.host_users = auth.host_users.max(n),
            None => auth.fleet_users = n,
        }
    }
    t
}

impl Correlator {
    /// A correlator deciding with `config` (already validated).
    pub fn new(pool: PgPool, config: CorrelateConfig) -> Self {
        let rules = config.resolved_rules();
        let protected = Arc::new(config.protected_domains());
        Correlator { pool, config: Arc::new(config), rules, protected, geo: Arc::default() }
    }

    /// Judges with the evidence multipliers of `geo`.
    pub fn with_geo(mut self, geo: Arc<crate::geo::GeoPolicy>) -> Self {
        self.geo = geo;
        self
    }

    /// The policy in force.
    pub fn config(&self) -> &CorrelateConfig {
        &self.config
    }

    /// The scenario rules in force.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The range an attacker at `addr` is judged and blocked as.
    pub fn target(&self, addr: IpAddr) -> IpNet {
        match addr.to_canonical() {
            IpAddr::V4(v4) => IpNet::from(IpAddr::V4(v4)),
            IpAddr::V6(v6) => IpNet::new(IpAddr::V6(v6), self.config.ipv6_block_prefix)
                .map_or(IpNet::from(IpAddr::V6(v6)), |n| n.trunc()),
        }
    }

    /// Whether `range` is in a `never_block` range.
    pub fn never_blocked(&self, range: IpNet) -> bool {
        self.config.never_block.iter().any(|r| r.contains(&range) || range.contains(r))
    }

    /// The TTL of a block that is offence number `earlier + 1`.
    pub fn ttl(&self, earlier: i64) -> Duration {
        let i = usize::try_from(earlier).unwrap_or(usize::MAX).min(self.config.ttl_secs.len().saturating_sub(1));
        Duration::from_secs(self.config.ttl_secs.get(i).copied().unwrap_or(3_600))
    }

    /// Every abuse kind's stored name with its rule's window, seconds (the
    /// two arrays the counting queries join on).
    fn kind_windows(&self) -> (Vec<&'static str>, Vec<f64>) {
        EventKind::ALL
            .into_iter()
            .filter_map(|k| k.scenario().map(|s| (k.as_str(), f64::from(self.rules.get(s).window_secs))))
            .unzip()
    }

    /// What the store knows about `range` at `now`: per-scenario counts
    /// within each rule's window, failing users, good standing and the
    /// verified names (protection).
    pub async fn assess(
        &self,
        conn: &mut PgConnection,
        range: IpNet,
        now: OffsetDateTime,
    ) -> Result<Assessment, sqlx::Error> {
        let (kinds, windows) = self.kind_windows();
        let per_agent: Vec<AgentCount> = sqlx::query_as(concat!(
            "select em.agent_id, em.kind, sum(em.events)::int8, min(em.minute), max(em.minute) \
             from evidence_minutes em join unnest($2::text[], $3::float8[]) as w(kind, secs) on em.kind = w.kind \
             where em.address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
             and em.minute > $4 - make_interval(secs => w.secs) and em.minute <= $4 \
             and em.minute > ",
            revoked_since!(),
            " group by em.agent_id, em.kind"
        ))
        .bind(range)
        .bind(&kinds)
        .bind(&windows)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
        let auth_window = f64::from(self.rules.get(Scenario::Auth).window_secs);
        let users: Vec<(Option<Uuid>, i64)> = if per_agent.iter().any(|(_, k, ..)| k == EventKind::AuthFailed.as_str())
        {
            sqlx::query_as(
                "select agent_id, count(distinct auth_user) from auth_users \
                 where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
                 and last_seen > $2 - make_interval(secs => $3) and last_seen <= $2 \
                 and last_seen > coalesce((select max(revoked_at) from blocks where revoked_cause = 'revoked' \
                     and cidr && $1::cidr and revoked_at <= $2), '-infinity') \
                 group by grouping sets ((agent_id), ())",
            )
            .bind(range)
            .bind(now)
            .bind(auth_window)
            .fetch_all(&mut *conn)
            .await?
        } else {
            Vec::new()
        };
        let (good, host_names): (Option<bool>, Option<Vec<String>>) = sqlx::query_as(
            "select bool_or(last_accepted > $2 - make_interval(secs => $3) and last_accepted <= $2), \
                    array_agg(distinct host_name) filter (where host_name is not null) \
             from (select last_accepted, host_name from sender_standing \
                   where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) limit 256) s",
        )
        .bind(range)
        .bind(now)
        .bind(secs(self.config.good_standing_secs))
        .fetch_one(&mut *conn)
        .await?;
        let host_names = host_names.unwrap_or_default();
        let mut t = tally(&per_agent, &users);
        t.good_standing = good.unwrap_or(false);
        t.protected = host_names.iter().any(|n| policy::is_protected(n, &self.protected));
        Ok(Assessment { tally: t, per_agent, host_names })
    }

    /// Judges `range` at `now`: the finding it makes, if any (in shadow mode
    /// too; the caller decides what to do with it). Reads only.
    pub async fn evaluate(
        &self,
        conn: &mut PgConnection,
        range: IpNet,
        now: OffsetDateTime,
    ) -> Result<Option<Finding>, sqlx::Error> {
        let a = self.assess(conn, range, now).await?;
        let rules = self.geo.adjust_rules(conn, range, &self.rules).await?;
        let Some(verdict) = policy::judge(&rules, &a.tally) else {
            if a.tally.protected && policy::judge(&rules, &Tally { protected: false, ..a.tally }).is_some() {
                metrics::counter!(SPARED, "why" => "protected").increment(1);
            }
            return Ok(None);
        };
        let rule = match verdict.scope {
            policy::Scope::Fleet => Rule::Fleet,
            policy::Scope::Host => Rule::SingleHost,
        };
        let mut evidence = Evidence {
            rule: rule.reason().to_owned(),
            scenario: Some(verdict.scenario),
            verdict: verdict.describe(self.rules.get(verdict.scenario)),
            good_standing: verdict.good_standing,
            escalates: !verdict.good_standing,
            ..Evidence::default()
        };
        evidence.count(&a.per_agent);
        self.samples(conn, range, now, &mut evidence).await?;
        Ok(Some(Finding { target: range, verdict, evidence }))
    }

    /// Adds the range's offending addresses and a few sample lines.
    async fn samples(
        &self,
        conn: &mut PgConnection,
        range: IpNet,
        now: OffsetDateTime,
        ev: &mut Evidence,
    ) -> Result<(), sqlx::Error> {
        let window = f64::from(self.rules.longest_window_secs());
        let hosts: Vec<(IpNet, Option<String>)> = sqlx::query_as(
            "select address, sample_raw from offender_hosts \
             where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
             and last_seen >= $2 - make_interval(secs => $3) \
             order by last_seen desc limit $4",
        )
        .bind(range)
        .bind(now)
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
        Ok(())
    }

    /// After a batch from `agent_id` committed: evaluates the abuse addresses
    /// it touched and returns the blocks created (prefix blocks included).
    pub async fn on_batch(&self, _agent_id: Uuid, addresses: &[IpAddr]) -> Result<Vec<Block>, CorrelateError> {
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
        let open: Vec<IpNet> = sqlx::query_scalar(
            "select t.target from unnest($1::cidr[]) as t(target) \
             where not exists (select 1 from blocks b where b.revoked_at is null and b.cidr >>= t.target \
                               and (b.expires_at is null or b.expires_at > now()))",
        )
        .bind(&list)
        .fetch_all(&self.pool)
        .await?;
        let now = OffsetDateTime::now_utc();
        let mut created = Vec::new();
        let touched: BTreeSet<IpNet> = open.iter().copied().collect();
        for target in open {
            let finding = {
                let mut conn = self.pool.acquire().await?;
                self.evaluate(&mut conn, target, now).await?
            };
            let Some(finding) = finding else { continue };
            if finding.verdict.shadow {
                self.record_shadow(
                    finding.target,
                    finding.verdict.scenario.as_str(),
                    BlockSource::Auto,
                    None,
                    &finding.evidence,
                )
                .await?;
                continue;
            }
            let rule = if finding.verdict.scope == policy::Scope::Fleet { Rule::Fleet } else { Rule::SingleHost };
            let addr = targets.get(&target).copied().unwrap_or(target.addr());
            if let Some(block) = self.decide(target, Some(addr), rule, finding.evidence, None).await? {
                let prefix = self.escalate(block.cidr).await?;
                created.push(block);
                created.extend(prefix);
            }
        }
        created.extend(self.campaigns(&touched).await?);
        Ok(created)
    }

    /// Records what a rule in shadow mode would have blocked (once per
    /// range and rule within [`SHADOW_REPEAT`]); true when recorded.
    pub async fn record_shadow(
        &self,
        cidr: IpNet,
        rule: &str,
        source: BlockSource,
        agent_id: Option<Uuid>,
        evidence: &Evidence,
    ) -> Result<bool, sqlx::Error> {
        let inserted = sqlx::query(
            "insert into shadow_decisions (cidr, rule, source, agent_id, evidence) \
             select $1, $2, $3, $4, $5 where not exists (select 1 from shadow_decisions \
               where cidr = $1::cidr and rule = $2 and decided_at > now() - make_interval(secs => $6))",
        )
        .bind(cidr)
        .bind(rule)
        .bind(source.as_str())
        .bind(agent_id)
        .bind(evidence.to_json())
        .bind(secs(SHADOW_REPEAT.as_secs()))
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0;
        if inserted {
            metrics::counter!(SHADOW_DECISIONS, "rule" => rule.to_owned()).increment(1);
            tracing::info!(%cidr, rule, source = source.as_str(), "Shadow decision: would block, blocking nothing.");
        }
        Ok(inserted)
    }

    /// An agent's shadow-mode `LocalBlock`: recorded, nothing blocked.
    pub async fn on_shadow_local_block(
        &self,
        agent_id: Uuid,
        cidr: IpNet,
        reason: &str,
        evidence: &str,
    ) -> Result<bool, CorrelateError> {
        let target = canonical_net(cidr);
        let ev = Evidence {
            rule: REASON_LOCAL.to_owned(),
            agents: BTreeSet::from([agent_id]),
            local: Some(LocalEvidence {
                agent_id,
                reason: truncate(reason, LOCAL_BLOCK_MAX_REASON_BYTES).to_owned(),
                evidence: truncate(evidence, LOCAL_BLOCK_MAX_EVIDENCE_BYTES).to_owned(),
            }),
            ..Evidence::default()
        };
        let rule = truncate(reason, LOCAL_BLOCK_MAX_REASON_BYTES).to_owned();
        Ok(self.record_shadow(target, &rule, BlockSource::Agent, Some(agent_id), &ev).await?)
    }

    /// An agent's `LocalBlock`: makes it a fleet block (unless
    /// `trust_local_blocks` is off, it names a range rather than a host, the
    /// range is already covered, protected, in good standing for a scenario
    /// rule, or policy refuses it). The TTL is the policy's offence TTL; a
    /// longer one the agent asks for is capped. A prefix escalation it
    /// causes is created too (visible in the change log), but only the block
    /// of `cidr` is returned.
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
        if self.config.is_shadow(REASON_LOCAL) || self.config.is_shadow(reason) {
            self.on_shadow_local_block(agent_id, target, reason, evidence).await?;
            return Ok(None);
        }
        let assessment = {
            let mut conn = self.pool.acquire().await?;
            self.assess(&mut conn, target, OffsetDateTime::now_utc()).await?
        };
        if let Err(spared) = judge_local(&assessment.tally, reason) {
            metrics::counter!(SPARED, "why" => spared.as_str()).increment(1);
            tracing::info!(%agent_id, %cidr, reason, why = spared.as_str(), "Local block not made a fleet block.");
            return Ok(None);
        }
        let local = LocalEvidence {
            agent_id,
            reason: truncate(reason, LOCAL_BLOCK_MAX_REASON_BYTES).to_owned(),
            evidence: truncate(evidence, LOCAL_BLOCK_MAX_EVIDENCE_BYTES).to_owned(),
        };
        let mut ev = Evidence {
            rule: REASON_LOCAL.to_owned(),
            good_standing: assessment.tally.good_standing,
            escalates: !assessment.tally.good_standing,
            ..Evidence::default()
        };
        ev.count(&assessment.per_agent);
        {
            let mut conn = self.pool.acquire().await?;
            self.samples(&mut conn, target, OffsetDateTime::now_utc(), &mut ev).await?;
        }
        let requested_ttl = Duration::from_secs(u64::from(ttl_secs));
        let block = self.decide(target, fallback, Rule::Local, ev, Some((local, requested_ttl))).await?;
        if let Some(block) = &block {
            self.escalate(block.cidr).await?;
        }
        Ok(block)
    }

    /// Blocks `target` for `rule` with `evidence` unless it is covered
    /// already or policy refuses it; `fallback` is the reported attacker's
    /// address inside it (the /128 fallback of a refused IPv6 /64), `None`
    /// when nobody reported a single address. `local` carries an agent's
    /// evidence and the TTL it asked for, which never lengthens the policy's
    /// TTL.
    async fn decide(
        &self,
        target: IpNet,
        fallback: Option<IpAddr>,
        rule: Rule,
        mut evidence: Evidence,
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
        match refusable(blocks::check_policy(&mut tx, self.config.as_ref(), range, force).await)? {
            Ok(()) => {}
            Err(refusal) => {
                let fallback = fallback.map(IpNet::from).filter(|f| *f != range && matches!(f, IpNet::V6(_)));
                let retry = match fallback {
                    Some(fallback)
                        if matches!(
                            refusal,
                            Refusal::FleetOwn { .. } | Refusal::Allowlisted { .. } | Refusal::NeverBlock { .. }
                        ) =>
                    {
                        refusable(blocks::check_policy(&mut tx, self.config.as_ref(), fallback, force).await)?.is_ok()
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
        }
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
        let block = match refusable(blocks::create_in(&mut tx, self.config.as_ref(), new).await)? {
            Ok(block) => block,
            Err(refusal) => {
                tracing::info!(cidr = %range, %refusal, "Not blocking: policy refuses it.");
                return Ok(None);
            }
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
            scenario = evidence.scenario.map(Scenario::as_str),
            offence = evidence.offence,
            ttl_secs = ttl.as_secs(),
            "Fleet block created."
        );
        Ok(Some(block))
    }

    /// Judges the prefix `prefix` (a /24, or a /48 counting /64s: `unit`)
    /// as one attacker at `now`: a campaign of many addresses that each stay
    /// below every threshold. After an operator revoked a block of the
    /// prefix (or around it), only evidence after that counts. The evidence
    /// of its units (addresses or /64s) is summed, leaving out units in good standing, protected ones and
    /// ones with too little evidence of their own (under a quarter of a
    /// rule's `per_host`); at least `prefix_min_addresses` units must
    /// remain, and the sum must meet a scenario's thresholds as one
    /// address's would. Reads only.
    pub async fn evaluate_campaign(
        &self,
        conn: &mut PgConnection,
        prefix: IpNet,
        unit: u8,
        now: OffsetDateTime,
    ) -> Result<Option<Finding>, sqlx::Error> {
        let (kinds, windows) = self.kind_windows();
        let rows: Vec<(IpAddr, Uuid, String, i64, OffsetDateTime, OffsetDateTime)> = sqlx::query_as(
            "select em.address, em.agent_id, em.kind, sum(em.events)::int8, min(em.minute), max(em.minute) \
             from evidence_minutes em join unnest($2::text[], $3::float8[]) as w(kind, secs) on em.kind = w.kind \
             where em.address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
             and em.minute > $4 - make_interval(secs => w.secs) and em.minute <= $4 \
             and em.minute > coalesce((select date_trunc('minute', max(revoked_at)) from blocks \
                 where revoked_cause = 'revoked' and cidr >>= $1::cidr and revoked_at <= $4), '-infinity') \
             group by em.address, em.agent_id, em.kind limit 20000",
        )
        .bind(prefix)
        .bind(&kinds)
        .bind(&windows)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
        let unit_of = |a: IpAddr| IpNet::new(a, unit).map_or(IpNet::from(a), |n| n.trunc());
        // A unit takes part only with evidence of its own: in one scenario,
        // at least a quarter of that rule's per-host threshold (at least 2),
        // so one mistyped password never lends its address to a campaign.
        let mut weight: BTreeMap<(IpNet, Scenario), u64> = BTreeMap::new();
        for (address, _, kind, n, _, _) in &rows {
            if let Some(kind) = EventKind::from_name(kind)
                && let Some(scenario) = kind.scenario()
            {
                *weight.entry((unit_of(*address), scenario)).or_default() +=
                    u64::from(kind.weight()) * u64::try_from(*n).unwrap_or(0);
            }
        }
        let abusive: BTreeSet<IpNet> = weight
            .iter()
            .filter(|((_, scenario), w)| {
                let per_host = self.rules.get(*scenario).per_host;
                per_host > 0 && **w >= u64::from(per_host.div_ceil(4).max(2))
            })
            .map(|((unit, _), _)| *unit)
            .collect();
        let min_units = usize::try_from(self.config.prefix_min_addresses).unwrap_or(usize::MAX);
        if abusive.len() < min_units {
            return Ok(None);
        }
        let standing: Vec<(IpAddr, bool, Option<String>)> = sqlx::query_as(
            "select address, coalesce(last_accepted > $2 - make_interval(secs => $3) and last_accepted <= $2, false), host_name \
             from sender_standing where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) limit 20000",
        )
        .bind(prefix)
        .bind(now)
        .bind(secs(self.config.good_standing_secs))
        .fetch_all(&mut *conn)
        .await?;
        let excluded: BTreeSet<IpNet> = standing
            .iter()
            .filter(|(_, good, name)| {
                *good || name.as_deref().is_some_and(|n| policy::is_protected(n, &self.protected))
            })
            .map(|(a, _, _)| unit_of(*a))
            .collect();
        let units: BTreeSet<IpNet> = abusive.difference(&excluded).copied().collect();
        if units.len() < min_units {
            return Ok(None);
        }
        let mut per_agent: BTreeMap<(Uuid, String), (i64, OffsetDateTime, OffsetDateTime)> = BTreeMap::new();
        for (address, agent, kind, n, first, last) in &rows {
            if !units.contains(&unit_of(*address)) {
                continue;
            }
            let e = per_agent.entry((*agent, kind.clone())).or_insert((0, *first, *last));
            e.0 += n;
            e.1 = e.1.min(*first);
            e.2 = e.2.max(*last);
        }
        let per_agent: Vec<AgentCount> = per_agent.into_iter().map(|((a, k), (n, f, l))| (a, k, n, f, l)).collect();
        let mut users: Vec<(Option<Uuid>, i64)> = Vec::new();
        if per_agent.iter().any(|(_, k, ..)| k == EventKind::AuthFailed.as_str()) {
            let rows: Vec<(IpAddr, Uuid, String)> = sqlx::query_as(
                "select address, agent_id, auth_user from auth_users \
                 where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
                 and last_seen > $2 - make_interval(secs => $3) and last_seen <= $2 limit 20000",
            )
            .bind(prefix)
            .bind(now)
            .bind(f64::from(self.rules.get(Scenario::Auth).window_secs))
            .fetch_all(&mut *conn)
            .await?;
            let mut by_agent: BTreeMap<Uuid, BTreeSet<&str>> = BTreeMap::new();
            let mut all: BTreeSet<&str> = BTreeSet::new();
            for (address, agent, user) in rows.iter().filter(|r| units.contains(&unit_of(r.0))) {
                let _ = address;
                by_agent.entry(*agent).or_default().insert(user);
                all.insert(user);
            }
            users = by_agent.into_iter().map(|(a, u)| (Some(a), u.len() as i64)).collect();
            users.push((None, all.len() as i64));
        }
        let t = tally(&per_agent, &users);
        let Some(verdict) = policy::judge(&self.rules, &t) else { return Ok(None) };
        let mut evidence = Evidence {
            rule: REASON_PREFIX.to_owned(),
            scenario: Some(verdict.scenario),
            verdict: format!(
                "campaign of {} addresses: {}",
                units.len(),
                verdict.describe(self.rules.get(verdict.scenario))
            ),
            escalates: false,
            addresses: units.iter().map(ToString::to_string).collect(),
            ..Evidence::default()
        };
        evidence.count(&per_agent);
        self.samples(conn, prefix, now, &mut evidence).await?;
        evidence.addresses = units.iter().map(ToString::to_string).collect();
        Ok(Some(Finding { target: prefix, verdict, evidence }))
    }

    /// Evaluates the campaign prefixes of `targets` and blocks (or, in
    /// shadow mode, records) each one found.
    async fn campaigns(&self, targets: &BTreeSet<IpNet>) -> Result<Vec<Block>, CorrelateError> {
        let prefixes: BTreeMap<IpNet, u8> = targets.iter().filter_map(|t| escalation_prefix(*t)).collect();
        let now = OffsetDateTime::now_utc();
        let mut created = Vec::new();
        for (prefix, unit) in prefixes {
            if self.never_blocked(prefix) {
                continue;
            }
            let finding = {
                let mut conn = self.pool.acquire().await?;
                let (covered, _) = standing(&mut conn, prefix, false, self.config.offence_window_secs).await?;
                if covered {
                    continue;
                }
                self.evaluate_campaign(&mut conn, prefix, unit, now).await?
            };
            let Some(finding) = finding else { continue };
            if finding.verdict.shadow || self.config.is_shadow(REASON_PREFIX) {
                self.record_shadow(prefix, REASON_PREFIX, BlockSource::Auto, None, &finding.evidence).await?;
                continue;
            }
            let mut tx = self.pool.begin().await?;
            lock_range(&mut tx, prefix).await?;
            let (covered, earlier) = standing(&mut tx, prefix, false, self.config.offence_window_secs).await?;
            if covered {
                continue;
            }
            if let Some(block) = self.block_prefix(tx, prefix, finding.evidence, earlier).await? {
                created.push(block);
            }
        }
        Ok(created)
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
             and coalesce((evidence->>'escalates')::boolean, true) \
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
        let mut ev = Evidence { rule: REASON_PREFIX.to_owned(), escalates: false, ..Evidence::default() };
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
        if self.config.is_shadow(REASON_PREFIX) {
            tx.rollback().await?;
            self.record_shadow(prefix, REASON_PREFIX, BlockSource::Auto, None, &ev).await?;
            return Ok(None);
        }
        self.block_prefix(tx, prefix, ev, earlier).await
    }

    /// Blocks `prefix` in `tx` (which holds its lock): retires the blocks
    /// inside, creates the prefix block, commits. A prefix policy refuses (a
    /// fleet address or allowlisted host inside) leaves the blocks inside
    /// alone.
    async fn block_prefix(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        prefix: IpNet,
        mut ev: Evidence,
        earlier: i64,
    ) -> Result<Option<Block>, CorrelateError> {
        if let Err(refusal) = refusable(blocks::check_policy(&mut tx, self.config.as_ref(), prefix, false).await)? {
            tracing::info!(%prefix, %refusal, "Not blocking the prefix: policy refuses it.");
            return Ok(None);
        }
        ev.offence = u32::try_from(earlier + 1).unwrap_or(u32::MAX);
        let ttl = self.ttl(earlier);
        // Retire the blocks inside first: the prefix's add and their removes
        // commit together, and row locks are taken in the same order as every
        // other blocklist writer (block rows, then the version counter).
        let retired = blocks::revoke_covered_by_in(&mut tx, prefix, &format!("superseded by prefix {prefix}")).await;
        let retired = refusable(retired)?.unwrap_or_default();
        let new = NewBlock {
            cidr: prefix,
            reason: REASON_PREFIX.to_owned(),
            source: BlockSource::Auto,
            evidence: ev.to_json(),
            ttl: Some(ttl),
            created_by: None,
            force: false,
        };
        let block = match refusable(blocks::create_in(&mut tx, self.config.as_ref(), new).await)? {
            Ok(block) => block,
            Err(refusal) => {
                tracing::info!(%prefix, %refusal, "Not escalating to the prefix: policy refuses it.");
                return Ok(None);
            }
        };
        tx.commit().await?;
        tracing::info!(
            %prefix,
            block_id = block.id,
            ranges = ev.addresses.len(),
            retired = retired.len(),
            ttl_secs = ttl.as_secs(),
            "Prefix block created."
        );
        Ok(Some(block))
    }
}

#[cfg(test)]
mod tests;
