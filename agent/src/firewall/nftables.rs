//! The nftables backend: fleetban's own `table inet fleetban`.
//!
//! ```text
//! table inet fleetban {
//!     set v4_32  { type ipv4_addr; flags timeout; }            # hosts
//!     set v4_24  { type ipv4_addr; flags timeout; }            # /24 networks
//!     set v4     { type ipv4_addr; flags interval, timeout; }  # any other prefix
//!     set v6_128 { type ipv6_addr; flags timeout; }
//!     set v6_64  { type ipv6_addr; flags timeout; }
//!     set v6_48  { type ipv6_addr; flags timeout; }
//!     set v6     { type ipv6_addr; flags interval, timeout; }
//!     chain input {
//!         type filter hook input priority -10; policy accept;
//!         tcp dport { 25, 465, 587 } ip saddr @v4_32 counter drop              # scope "smtp"
//!         tcp dport { 25, 465, 587 } ip saddr & 255.255.255.0 @v4_24 counter drop
//!         tcp dport { 25, 465, 587 } ip saddr @v4 counter drop
//!         ... the same for ip6 saddr with the v6 sets
//!     }
//! }
//! ```
//!
//! In scope `"all"` the chain starts with `ct state established,related
//! accept` and the drops carry no port match: a block never cuts a
//! connection the host already has, above all its uplink to the fleet
//! server, whose replies would otherwise be dropped along with the unblock
//! that could end it.
//!
//! The chain sits at priority -10, before the usual filter chains, so it
//! works beside CSF, firewalld or plain iptables. Every element carries its
//! remaining timeout, so the kernel expires it exactly even if the agent is
//! gone. Each commit is one `nft -f -` transaction: all of it applies or none.
//!
//! Why hash sets beside the interval sets `v4`/`v6`: the prefix lengths a
//! fleet blocks (single hosts, IPv4 /24 escalations, IPv6 /64 attackers and
//! /48 escalations) go to plain hash sets looked up with the address masked
//! to that length. nft 1.0.6 handles interval sets in user space: loading
//! 100k elements takes over a second and deleting 500 elements from a 100k
//! interval set took more than 30 s in our measurements, while the same
//! delta on a hash set takes about 40 ms. Other prefix lengths (rare) use the
//! interval sets. The sets do not use `auto-merge`: merging adjacent elements
//! with different timeouts keeps only one timeout, and the reconciler hands
//! over disjoint elements anyway.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

use super::{Backend, Entry, Exec, FirewallError, SMTP_PORTS, Staged, display_net};
use crate::config::FirewallScope;

/// Name of the table.
pub const TABLE: &str = "fleetban";

/// The hash sets: name, IPv4?, prefix length, address mask.
const HASH_SETS: [(&str, bool, u8, &str); 5] = [
    ("v4_32", true, 32, ""),
    ("v4_24", true, 24, "255.255.255.0"),
    ("v6_128", false, 128, ""),
    ("v6_64", false, 64, "ffff:ffff:ffff:ffff::"),
    ("v6_48", false, 48, "ffff:ffff:ffff::"),
];

/// Capacity of each hash set.
const HASH_SET_SIZE: u32 = 1 << 20;

/// The set an entry belongs in.
pub fn set_for(net: &IpNet) -> &'static str {
    let v4 = net.addr().is_ipv4();
    HASH_SETS
        .iter()
        .find(|(_, is_v4, len, _)| *is_v4 == v4 && *len == net.prefix_len())
        .map_or(if v4 { "v4" } else { "v6" }, |(name, ..)| name)
}

/// The nftables backend.
#[derive(Debug)]
pub struct Nftables {
    scope: FirewallScope,
    ports: Vec<u16>,
    exec: Exec,
    staged: Staged,
}

impl Nftables {
    /// A backend with `scope`, running `nft` through `exec`.
    pub fn new(scope: FirewallScope, exec: Exec) -> Self {
        Self { scope, ports: SMTP_PORTS.to_vec(), exec, staged: Staged::default() }
    }

    /// The TCP ports of the `smtp` scope (default: 25, 465, 587).
    pub fn with_ports(mut self, ports: Vec<u16>) -> Self {
        self.ports = ports;
        self
    }

    /// The ruleset `setup` loads: creates the table and sets if missing
    /// (existing elements are kept) and replaces the chain's rules.
    pub fn setup_script(scope: FirewallScope, ports: &[u16]) -> String {
        let matcher = match scope {
            FirewallScope::Smtp => {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                format!("tcp dport {{ {} }} ", ports.join(", "))
            }
            FirewallScope::All => String::new(),
        };
        let mut script = format!("table inet {TABLE} {{\n");
        for (name, v4, _, _) in HASH_SETS {
            let kind = if v4 { "ipv4_addr" } else { "ipv6_addr" };
            let _ = writeln!(script, "\tset {name} {{ type {kind}; flags timeout; size {HASH_SET_SIZE}; }}");
        }
        script.push_str("\tset v4 { type ipv4_addr; flags interval, timeout; }\n");
        script.push_str("\tset v6 { type ipv6_addr; flags interval, timeout; }\n");
        script.push_str("\tchain input { type filter hook input priority -10; policy accept; }\n}\n");
        let _ = writeln!(script, "flush chain inet {TABLE} input");
        if scope == FirewallScope::All {
            let _ = writeln!(script, "add rule inet {TABLE} input ct state established,related accept");
        }
        for v4 in [true, false] {
            let field = if v4 { "ip saddr" } else { "ip6 saddr" };
            for (name, is_v4, _, mask) in HASH_SETS {
                if is_v4 != v4 {
                    continue;
                }
                let masked = if mask.is_empty() { String::new() } else { format!(" & {mask}") };
                let _ = writeln!(script, "add rule inet {TABLE} input {matcher}{field}{masked} @{name} counter drop");
            }
            let interval = if v4 { "v4" } else { "v6" };
            let _ = writeln!(script, "add rule inet {TABLE} input {matcher}{field} @{interval} counter drop");
        }
        script
    }

    /// The transaction of one commit: removals, then additions, one
    /// statement per set.
    pub fn commit_script(removes: &[Entry], adds: &[Entry], now_ms: i64) -> String {
        let mut script = String::new();
        let mut by_set: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        for entry in removes {
            by_set.entry(set_for(&entry.net)).or_default().push(entry);
        }
        for (set, entries) in &by_set {
            let _ = write!(script, "delete element inet {TABLE} {set} {{ ");
            for (i, entry) in entries.iter().enumerate() {
                if i > 0 {
                    script.push_str(", ");
                }
                script.push_str(&element(&entry.net));
            }
            script.push_str(" }\n");
        }
        let mut by_set: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
        for entry in adds {
            by_set.entry(set_for(&entry.net)).or_default().push(entry);
        }
        for (set, entries) in &by_set {
            let _ = write!(script, "add element inet {TABLE} {set} {{ ");
            for (i, entry) in entries.iter().enumerate() {
                if i > 0 {
                    script.push_str(", ");
                }
                script.push_str(&element(&entry.net));
                if let Some(secs) = entry.remaining_secs(now_ms) {
                    let _ = write!(script, " timeout {secs}s");
                }
            }
            script.push_str(" }\n");
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
            if set.get("table").and_then(Value::as_str) != Some(TABLE) {
                continue;
            }
            let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
            let hash_len = HASH_SETS.iter().find(|(n, ..)| *n == name).map(|(_, _, len, _)| *len);
            if hash_len.is_none() && name != "v4" && name != "v6" {
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
                let nets = match hash_len {
                    Some(len) => {
                        let text = value.as_str().ok_or_else(|| format!("unexpected element {value} in {name}"))?;
                        let ip: IpAddr = text.parse().map_err(|_| format!("bad address `{text}`"))?;
                        vec![IpNet::new(ip, len).map_err(|_| format!("bad element `{text}`"))?.trunc()]
                    }
                    None => element_nets(value)?,
                };
                for net in nets {
                    out.push(Entry { net, expires_at_ms, reason: String::new() });
                }
            }
        }
        Ok(out)
    }
}

/// How a range is written as an element of its set: hash sets hold the
/// network address, the interval sets a prefix (or a bare host).
fn element(net: &IpNet) -> String {
    if set_for(net).contains('_') { net.network().to_string() } else { display_net(net) }
}

/// The ranges an interval-set element stands for: an address, a prefix, or
/// a range (split into CIDRs).
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
        self.exec.run("nft", &["-f", "-"], Some(Self::setup_script(self.scope, &self.ports).as_bytes())).map(|_| ())
    }

    fn read(&mut self, now_ms: i64) -> Result<Vec<Entry>, FirewallError> {
        let json = self.exec.run("nft", &["-j", "list", "table", "inet", TABLE], None)?;
        Self::parse_listing(&json, now_ms).map_err(|message| FirewallError::Parse { program: "nft".into(), message })
    }

    fn staged(&mut self) -> &mut Staged {
        &mut self.staged
    }

    fn commit(&mut self, now_ms: i64) -> Result<(), FirewallError> {
        let Some((removes, adds)) = self.staged.take_batch() else { return Ok(()) };
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

    fn e(s: &str, at: Option<i64>) -> Entry {
        Entry { net: s.parse().unwrap(), expires_at_ms: at, reason: String::new() }
    }

    #[test]
    fn entries_go_to_the_set_of_their_prefix_length() {
        let sets: Vec<&str> = [
            "192.0.2.1/32",
            "192.0.2.0/24",
            "192.0.2.0/25",
            "2001:db8::1/128",
            "2001:db8::/64",
            "2001:db8::/48",
            "2001:db8::/56",
        ]
        .iter()
        .map(|s| set_for(&s.parse().unwrap()))
        .collect();
        assert_eq!(sets, ["v4_32", "v4_24", "v4", "v6_128", "v6_64", "v6_48", "v6"]);
    }

    #[test]
    fn commit_script_removes_then_adds_with_timeouts() {
        let script = Nftables::commit_script(
            &[e("192.0.2.1/32", None)],
            &[e("192.0.2.0/25", Some(61_500)), e("198.51.100.0/24", Some(11_000)), e("2001:db8::/64", None)],
            1_000,
        );
        assert_eq!(
            script,
            "delete element inet fleetban v4_32 { 192.0.2.1 }\n\
             add element inet fleetban v4 { 192.0.2.0/25 timeout 61s }\n\
             add element inet fleetban v4_24 { 198.51.100.0 timeout 10s }\n\
             add element inet fleetban v6_64 { 2001:db8:: }\n"
        );
    }

    #[test]
    fn setup_script_scopes() {
        let smtp = Nftables::setup_script(FirewallScope::Smtp, &SMTP_PORTS);
        assert!(
            smtp.contains("input tcp dport { 25, 465, 587 } ip saddr & 255.255.255.0 @v4_24 counter drop"),
            "{smtp}"
        );
        assert!(smtp.contains("input tcp dport { 25, 465, 587 } ip6 saddr @v6 counter drop"));
        assert!(!smtp.contains("ct state"), "{smtp}");
        let all = Nftables::setup_script(FirewallScope::All, &SMTP_PORTS);
        let extra = Nftables::setup_script(FirewallScope::Smtp, &[25, 26, 465, 587]);
        assert!(extra.contains("input tcp dport { 25, 26, 465, 587 } ip saddr @v4 counter drop"), "{extra}");
        assert!(all.contains("input ip6 saddr & ffff:ffff:ffff:ffff:: @v6_64 counter drop"), "{all}");
        // Established and related traffic (the uplink) passes before any drop.
        let accept = all.find("add rule inet fleetban input ct state established,related accept").expect("accept rule");
        let first_drop = all.find("counter drop").expect("drop rules");
        assert!(accept < first_drop, "{all}");
    }

    #[test]
    fn listing_parses_every_element_form() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "v4", "table": "fleetban", "type": "ipv4_addr",
              "elem": [{"elem": {"val": {"prefix": {"addr": "192.0.2.0", "len": 25}}, "timeout": 100, "expires": 99}},
                       {"prefix": {"addr": "203.0.113.0", "len": 26}},
                       {"range": ["10.0.0.0", "10.0.0.2"]}]}},
            {"set": {"family": "inet", "name": "v4_32", "table": "fleetban", "elem": [{"elem": {"val": "198.51.100.7", "timeout": 50, "expires": 49}}]}},
            {"set": {"family": "inet", "name": "v4_24", "table": "fleetban", "elem": ["198.51.100.0"]}},
            {"set": {"family": "inet", "name": "v6_64", "table": "fleetban", "elem": ["2001:db8:1:2::"]}},
            {"set": {"family": "inet", "name": "other", "table": "fleetban", "elem": ["192.0.2.99"]}},
            {"chain": {"family": "inet", "table": "fleetban", "name": "input"}}]}"#;
        let entries = Nftables::parse_listing(json, 1_000).unwrap();
        let got: Vec<(String, Option<i64>)> = entries.iter().map(|e| (e.net.to_string(), e.expires_at_ms)).collect();
        assert_eq!(
            got,
            [
                ("192.0.2.0/25".into(), Some(100_000)),
                ("203.0.113.0/26".into(), None),
                ("10.0.0.0/31".into(), None),
                ("10.0.0.2/32".into(), None),
                ("198.51.100.7/32".into(), Some(50_000)),
                ("198.51.100.0/24".into(), None),
                ("2001:db8:1:2::/64".into(), None),
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
