//! The nftables backend: fleetban's own `table inet fleetban`.
//!
//! ```text
//! table inet fleetban {
//!     set v4 { type ipv4_addr; flags interval, timeout; }
//!     set v6 { type ipv6_addr; flags interval, timeout; }
//!     chain input {
//!         type filter hook input priority -10; policy accept;
//!         tcp dport { 25, 465, 587 } ip saddr @v4 counter drop     # scope "smtp"
//!         tcp dport { 25, 465, 587 } ip6 saddr @v6 counter drop
//!     }
//! }
//! ```
//!
//! The chain sits at priority -10, before the usual filter chains, so it
//! works beside CSF, firewalld or plain iptables. Every element carries its
//! remaining timeout, so the kernel expires it exactly even if the agent is
//! gone. Each commit is one `nft -f -` transaction: all of it applies or none.
//! The sets deliberately do not use `auto-merge`: merging adjacent elements
//! with different timeouts keeps only one of the timeouts (nft 1.0.6), so a
//! merged set could never be read back as what was written; the reconciler
//! hands over disjoint elements instead, which nft stores as they are.

use std::fmt::Write as _;

use ipnet::IpNet;
use serde_json::Value;

use super::{Backend, Entry, Exec, FirewallError, SMTP_PORTS, display_net};
use crate::config::FirewallScope;

/// Name of the table.
pub const TABLE: &str = "fleetban";

/// The nftables backend.
#[derive(Debug)]
pub struct Nftables {
    scope: FirewallScope,
    exec: Exec,
    adds: Vec<Entry>,
    removes: Vec<Entry>,
}

impl Nftables {
    /// A backend with `scope`, running `nft` through `exec`.
    pub fn new(scope: FirewallScope, exec: Exec) -> Self {
        Self { scope, exec, adds: Vec::new(), removes: Vec::new() }
    }

    /// The ruleset `setup` loads: creates the table and sets if missing
    /// (existing elements are kept) and replaces the chain's rules.
    pub fn setup_script(scope: FirewallScope) -> String {
        let matcher = match scope {
            FirewallScope::Smtp => {
                let ports: Vec<String> = SMTP_PORTS.iter().map(u16::to_string).collect();
                format!("tcp dport {{ {} }} ", ports.join(", "))
            }
            FirewallScope::All => String::new(),
        };
        format!(
            "table inet {TABLE} {{\n\
             \tset v4 {{ type ipv4_addr; flags interval, timeout; }}\n\
             \tset v6 {{ type ipv6_addr; flags interval, timeout; }}\n\
             \tchain input {{ type filter hook input priority -10; policy accept; }}\n\
             }}\n\
             flush chain inet {TABLE} input\n\
             add rule inet {TABLE} input {matcher}ip saddr @v4 counter drop\n\
             add rule inet {TABLE} input {matcher}ip6 saddr @v6 counter drop\n"
        )
    }

    /// The transaction of one commit: removals, then additions.
    pub fn commit_script(removes: &[Entry], adds: &[Entry], now_ms: i64) -> String {
        let mut script = String::new();
        for (family, v4) in [("v4", true), ("v6", false)] {
            let mut elements = removes.iter().filter(|e| e.net.addr().is_ipv4() == v4).peekable();
            if elements.peek().is_some() {
                let _ = write!(script, "delete element inet {TABLE} {family} {{ ");
                for (i, entry) in elements.enumerate() {
                    if i > 0 {
                        script.push_str(", ");
                    }
                    script.push_str(&display_net(&entry.net));
                }
                script.push_str(" }\n");
            }
        }
        for (family, v4) in [("v4", true), ("v6", false)] {
            let mut elements = adds.iter().filter(|e| e.net.addr().is_ipv4() == v4).peekable();
            if elements.peek().is_some() {
                let _ = write!(script, "add element inet {TABLE} {family} {{ ");
                for (i, entry) in elements.enumerate() {
                    if i > 0 {
                        script.push_str(", ");
                    }
                    script.push_str(&display_net(&entry.net));
                    if let Some(secs) = entry.remaining_secs(now_ms) {
                        let _ = write!(script, " timeout {secs}s");
                    }
                }
                script.push_str(" }\n");
            }
        }
        script
    }

    /// Parses `nft -j list table inet fleetban` into entries.
    pub fn parse_listing(json: &[u8], now_ms: i64) -> Result<Vec<Entry>, String> {
        let value: Value = serde_json::from_slice(json).map_err(|error| error.to_string())?;
        let items = value.get("nftables").and_then(Value::as_array).ok_or("no `nftables` array")?;
        let mut out = Vec::new();
        for item in items {
            let Some(set) = item.get("set") else { continue };
            if set.get("table").and_then(Value::as_str) != Some(TABLE)
                || !matches!(set.get("name").and_then(Value::as_str), Some("v4" | "v6"))
            {
                continue;
            }
            let Some(elements) = set.get("elem").and_then(Value::as_array) else { continue };
            for element in elements {
                let (value, expires) = match element.get("elem") {
                    Some(inner) => {
                        (inner.get("val").ok_or("element without `val`")?, inner.get("expires").and_then(Value::as_i64))
                    }
                    None => (element, None),
                };
                let expires_at_ms = expires.map(|secs| now_ms + secs * 1000);
                for net in element_nets(value)? {
                    out.push(Entry { net, expires_at_ms, reason: String::new() });
                }
            }
        }
        Ok(out)
    }
}

/// The ranges an element value stands for: an address, a prefix, or a range
/// (split into CIDRs).
fn element_nets(value: &Value) -> Result<Vec<IpNet>, String> {
    if let Some(text) = value.as_str() {
        let ip: std::net::IpAddr = text.parse().map_err(|_| format!("bad address `{text}`"))?;
        return Ok(vec![IpNet::from(ip)]);
    }
    if let Some(prefix) = value.get("prefix") {
        let addr = prefix.get("addr").and_then(Value::as_str).ok_or("prefix without addr")?;
        let len = prefix.get("len").and_then(Value::as_u64).ok_or("prefix without len")?;
        let ip: std::net::IpAddr = addr.parse().map_err(|_| format!("bad address `{addr}`"))?;
        let net = IpNet::new(ip, u8::try_from(len).map_err(|_| "bad prefix length")?)
            .map_err(|_| format!("bad prefix `{addr}/{len}`"))?;
        return Ok(vec![net]);
    }
    if let Some([low, high]) = value.get("range").and_then(Value::as_array).map(Vec::as_slice) {
        let low: std::net::IpAddr = low.as_str().and_then(|s| s.parse().ok()).ok_or("bad range start")?;
        let high: std::net::IpAddr = high.as_str().and_then(|s| s.parse().ok()).ok_or("bad range end")?;
        return match (low, high) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
                Ok(ipnet::Ipv4Subnets::new(a, b, 0).map(IpNet::V4).collect())
            }
            (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
                Ok(ipnet::Ipv6Subnets::new(a, b, 0).map(IpNet::V6).collect())
            }
            _ => Err("range mixes families".into()),
        };
    }
    Err(format!("unknown element {value}"))
}

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn setup(&mut self) -> Result<(), FirewallError> {
        self.exec.run("nft", &["-f", "-"], Some(Self::setup_script(self.scope).as_bytes())).map(|_| ())
    }

    fn read(&mut self, now_ms: i64) -> Result<Vec<Entry>, FirewallError> {
        let json = self.exec.run("nft", &["-j", "list", "table", "inet", TABLE], None)?;
        Self::parse_listing(&json, now_ms).map_err(|message| FirewallError::Parse { program: "nft".into(), message })
    }

    fn stage_add(&mut self, entry: Entry) {
        self.adds.push(entry);
    }

    fn stage_remove(&mut self, entry: Entry) {
        self.removes.push(entry);
    }

    fn commit(&mut self, now_ms: i64) -> Result<(), FirewallError> {
        let removes = std::mem::take(&mut self.removes);
        let adds = std::mem::take(&mut self.adds);
        if removes.is_empty() && adds.is_empty() {
            return Ok(());
        }
        let script = Self::commit_script(&removes, &adds, now_ms);
        self.exec.run("nft", &["-f", "-"], Some(script.as_bytes())).map(|_| ())
    }

    fn flush(&mut self) -> Result<(), FirewallError> {
        // `add table` first so that deleting never fails on a missing table.
        let script = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
        self.exec.run("nft", &["-f", "-"], Some(script.as_bytes())).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_script_removes_then_adds_with_timeouts() {
        let e = |s: &str, at: Option<i64>| Entry { net: s.parse().unwrap(), expires_at_ms: at, reason: String::new() };
        let script = Nftables::commit_script(
            &[e("192.0.2.1/32", None)],
            &[e("192.0.2.0/25", Some(61_500)), e("2001:db8::/64", None)],
            1_000,
        );
        assert_eq!(
            script,
            "delete element inet fleetban v4 { 192.0.2.1 }\n\
             add element inet fleetban v4 { 192.0.2.0/25 timeout 61s }\n\
             add element inet fleetban v6 { 2001:db8::/64 }\n"
        );
    }

    #[test]
    fn setup_script_scopes() {
        assert!(Nftables::setup_script(FirewallScope::Smtp).contains("tcp dport { 25, 465, 587 } ip saddr @v4"));
        assert!(Nftables::setup_script(FirewallScope::All).contains("input ip6 saddr @v6 counter drop"));
    }

    #[test]
    fn listing_parses_every_element_form() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "v4", "table": "fleetban", "type": "ipv4_addr",
              "elem": [{"elem": {"val": {"prefix": {"addr": "192.0.2.0", "len": 24}}, "timeout": 100, "expires": 99}},
                       {"elem": {"val": "198.51.100.7", "timeout": 50, "expires": 49}},
                       {"prefix": {"addr": "203.0.113.0", "len": 25}},
                       {"range": ["10.0.0.0", "10.0.0.2"]}]}},
            {"set": {"family": "inet", "name": "v6", "table": "fleetban", "elem": ["2001:db8::1"]}},
            {"set": {"family": "inet", "name": "other", "table": "fleetban", "elem": ["192.0.2.99"]}},
            {"chain": {"family": "inet", "table": "fleetban", "name": "input"}}]}"#;
        let entries = Nftables::parse_listing(json, 1_000).unwrap();
        let got: Vec<(String, Option<i64>)> = entries.iter().map(|e| (e.net.to_string(), e.expires_at_ms)).collect();
        assert_eq!(
            got,
            [
                ("192.0.2.0/24".into(), Some(100_000)),
                ("198.51.100.7/32".into(), Some(50_000)),
                ("203.0.113.0/25".into(), None),
                ("10.0.0.0/31".into(), None),
                ("10.0.0.2/32".into(), None),
                ("2001:db8::1/128".into(), None),
            ]
        );
        assert!(Nftables::parse_listing(b"not json", 0).is_err());
        assert!(
            Nftables::parse_listing(
                br#"{"nftables": [{"set": {"name": "v4", "table": "fleetban", "elem": [{"bogus": 1}]}}]}"#,
                0
            )
            .is_err()
        );
    }
}
