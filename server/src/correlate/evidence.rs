//! The evidence model of a decision: what the store knows about a range
//! ([`Assessment`]), the counts it is judged on ([`Tally`]), and the
//! [`Evidence`] stored with a block.

use std::collections::{BTreeMap, BTreeSet};

use fleetban_proto::detect::Rule as LocalRule;
use fleetban_proto::policy::{Count, Scenario, Tally, Verdict};
use fleetban_proto::v1::EventKind;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Sample raw lines kept in a decision's evidence.
pub(super) const MAX_SAMPLES: usize = 5;
/// Addresses listed in a decision's evidence.
pub(super) const MAX_ADDRESSES: usize = 64;
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
    pub(super) fn count(&mut self, per_agent: &[AgentCount]) {
        for c in per_agent {
            self.agents.insert(c.agent_id);
            *self.kinds.entry(c.kind.clone()).or_default() += c.events;
            self.events += c.events;
            self.see(c.first_seen, c.last_seen);
        }
    }

    pub(super) fn see(&mut self, first: OffsetDateTime, last: OffsetDateTime) {
        self.first_seen = Some(self.first_seen.map_or(first, |t| t.min(first)));
        self.last_seen = Some(self.last_seen.map_or(last, |t| t.max(last)));
    }
}

/// Abuse events of one (agent, kind) within the kind's window.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AgentCount {
    /// The agent that saw them.
    pub agent_id: Uuid,
    /// The kind's stored name.
    pub kind: String,
    /// How many.
    pub events: i64,
    /// The first minute seen.
    pub first_seen: OffsetDateTime,
    /// The last minute seen.
    pub last_seen: OffsetDateTime,
}

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

/// The tally of per-(agent, kind) counts and per-agent failing users.
pub(super) fn tally(per_agent: &[AgentCount], users: &[(Option<Uuid>, i64)]) -> Tally {
    let mut t = Tally::default();
    // Per scenario, per agent: weighted events.
    let mut by_agent: [BTreeMap<Uuid, u64>; 6] = Default::default();
    for AgentCount { agent_id: agent, kind, events: n, .. } in per_agent {
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
