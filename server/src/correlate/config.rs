//! The policy: the `[correlate]` table of the server TOML, its defaults
//! and its validation.

use std::collections::BTreeMap;

use fleetban_proto::detect::Rule as LocalRule;
use fleetban_proto::policy::{DEFAULT_PROTECTED_DOMAINS, RuleTable, Rules, Scenario};
use fleetban_proto::v1::{Policy, RulePolicy};
use ipnet::IpNet;
use serde::Deserialize;

use crate::blocks::{self};

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
