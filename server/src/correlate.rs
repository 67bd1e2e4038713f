//! Fleet correlation: turns per-address evidence from many agents into fleet
//! blocks.
//!
//! This module owns the policy (`[correlate]` in the server TOML). The rules
//! and their evidence are described on [`CorrelateConfig`].

use ipnet::IpNet;
use serde::Deserialize;

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
}
