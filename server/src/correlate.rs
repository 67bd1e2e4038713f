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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetban_proto::policy::Rules;
use fleetban_proto::v1::EventKind;
use ipnet::IpNet;
use sqlx::PgPool;

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

mod config;
mod escalate;
mod evidence;
mod rules;
mod store;

pub use config::{ConfigError, CorrelateConfig, DEFAULT_NEVER_BLOCK};
pub use escalate::escalation_prefix;
pub use evidence::{AgentCount, Assessment, Evidence, Finding, LocalEvidence, Spared, judge_local};

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

/// Errors of correlation. Policy refusals are not errors: the address is
/// simply not blocked.
#[derive(Debug, thiserror::Error)]
pub enum CorrelateError {
    /// The database failed.
    #[error("correlation database error: {0}")]
    Database(#[from] sqlx::Error),
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
    pub(super) fn kind_windows(&self) -> (Vec<&'static str>, Vec<f64>) {
        EventKind::ALL
            .into_iter()
            .filter_map(|k| k.scenario().map(|s| (k.as_str(), f64::from(self.rules.get(s).window_secs))))
            .unzip()
    }
}

#[cfg(test)]
mod tests;
