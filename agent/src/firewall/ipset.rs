//! The ipset backend: `hash:net` sets `fleetban-v4` / `fleetban-v6` with
//! per-entry timeouts, matched by one iptables and one ip6tables rule.
//!
//! Every commit is one `ipset restore -exist` (removals, then additions; an
//! addition of a held entry replaces its timeout). Timeouts are clamped to
//! ipset's maximum ([`MAX_TIMEOUT_SECS`]); a permanent entry has timeout 0.
//! The rules (`-I INPUT 1`, marked with the comment `fleetban`) are checked
//! with `-C` and inserted only when missing, and the rule of the other scope
//! is removed, so `setup` is idempotent and never touches the entries. In
//! scope `"all"` a conntrack rule (`ESTABLISHED,RELATED -j ACCEPT`, same
//! comment) sits above the drop, so that a block never cuts a connection the
//! host already has, above all its uplink to the fleet server.

use std::fmt::Write as _;

use super::{Backend, Entry, Exec, FirewallError, SMTP_PORTS, Staged, display_net, parse_net};
use crate::config::FirewallScope;

/// The IPv4 set.
pub const SET_V4: &str = "fleetban-v4";
/// The IPv6 set.
pub const SET_V6: &str = "fleetban-v6";
/// ipset's largest timeout, seconds.
pub const MAX_TIMEOUT_SECS: u64 = 2_147_483;
/// Capacity of each set.
pub const MAX_ELEMENTS: u32 = 1 << 20;

/// The ipset backend.
#[derive(Debug)]
pub struct Ipset {
    scope: FirewallScope,
    ports: Vec<u16>,
    exec: Exec,
    staged: Staged,
}

impl Ipset {
    /// A backend with `scope`, running `ipset`/`iptables` through `exec`.
    pub fn new(scope: FirewallScope, exec: Exec) -> Self {
        Self { scope, ports: SMTP_PORTS.to_vec(), exec, staged: Staged::default() }
    }

    /// The TCP ports of the `smtp` scope (default: 25, 465, 587).
    pub fn with_ports(mut self, ports: Vec<u16>) -> Self {
        self.ports = ports;
        self
    }

    fn rule(scope: FirewallScope, ports: &[u16], set: &str) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        if scope == FirewallScope::Smtp {
            let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
            args.extend(["-p", "tcp", "-m", "multiport", "--dports"].map(String::from));
            args.push(ports.join(","));
        }
        args.extend(
            ["-m", "set", "--match-set", set, "src", "-m", "comment", "--comment", "fleetban", "-j", "DROP"]
                .map(String::from),
        );
        args
    }

    /// The rule that lets established and related traffic pass before the
    /// drop in scope `"all"`.
    fn established_rule() -> Vec<String> {
        [
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-m",
            "comment",
            "--comment",
            "fleetban",
            "-j",
            "ACCEPT",
        ]
        .map(String::from)
        .to_vec()
    }

    fn iptables_for(set: &str) -> &'static str {
        if set == SET_V4 { "iptables" } else { "ip6tables" }
    }

    /// Whether a rule exists (`-C`).
    fn has_rule(&self, tool: &str, rule: &[String]) -> bool {
        let mut args = vec!["-w", "-C", "INPUT"];
        args.extend(rule.iter().map(String::as_str));
        self.exec.run(tool, &args, None).is_ok()
    }

    fn change_rule(&self, tool: &str, op: &[&str], rule: &[String]) -> Result<(), FirewallError> {
        let mut args = vec!["-w"];
        args.extend_from_slice(op);
        args.extend(rule.iter().map(String::as_str));
        self.exec.run(tool, &args, None).map(|_| ())
    }

    /// The `ipset restore` input of one commit.
    pub fn restore_script(removes: &[Entry], adds: &[Entry], now_ms: i64) -> String {
        let mut script = String::new();
        for entry in removes {
            let _ = writeln!(script, "del {} {}", set_of(entry), display_net(&entry.net));
        }
        for entry in adds {
            let timeout = entry.remaining_secs(now_ms).map_or(0, |secs| secs.min(MAX_TIMEOUT_SECS));
            let _ = writeln!(script, "add {} {} timeout {timeout}", set_of(entry), display_net(&entry.net));
        }
        script
    }

    /// Parses `ipset save` output of our sets.
    pub fn parse_save(text: &str, now_ms: i64) -> Result<Vec<Entry>, String> {
        let mut out = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("add") {
                continue;
            }
            let Some(set) = words.next() else { continue };
            if set != SET_V4 && set != SET_V6 {
                continue;
            }
            let target = words.next().ok_or_else(|| format!("entry without address: `{line}`"))?;
            let net = parse_net(target).ok_or_else(|| format!("bad entry `{target}`"))?;
            let mut expires_at_ms = None;
            while let Some(word) = words.next() {
                if word == "timeout" {
                    let secs: i64 = words.next().and_then(|s| s.parse().ok()).ok_or("bad timeout")?;
                    if secs > 0 {
                        expires_at_ms = Some(now_ms + secs * 1000);
                    }
                }
            }
            out.push(Entry { net, expires_at_ms, reason: String::new() });
        }
        Ok(out)
    }
}

fn set_of(entry: &Entry) -> &'static str {
    if entry.net.addr().is_ipv4() { SET_V4 } else { SET_V6 }
}

impl Backend for Ipset {
    fn name(&self) -> &'static str {
        "ipset"
    }

    fn setup(&mut self) -> Result<(), FirewallError> {
        let max = MAX_ELEMENTS.to_string();
        for (set, family) in [(SET_V4, "inet"), (SET_V6, "inet6")] {
            self.exec.run(
                "ipset",
                &[
                    "create", set, "hash:net", "family", family, "hashsize", "4096", "maxelem", &max, "timeout",
                    "3600", "-exist",
                ],
                None,
            )?;
        }
        let other = match self.scope {
            FirewallScope::Smtp => FirewallScope::All,
            FirewallScope::All => FirewallScope::Smtp,
        };
        for set in [SET_V4, SET_V6] {
            let tool = Self::iptables_for(set);
            let rule = Self::rule(self.scope, &self.ports, set);
            // The other scope's rule, and the default ports' rule when other
            // ports are configured, are left from an earlier configuration.
            for stale in [Self::rule(other, &self.ports, set), Self::rule(FirewallScope::Smtp, &SMTP_PORTS, set)] {
                while stale != rule && self.has_rule(tool, &stale) {
                    self.change_rule(tool, &["-D", "INPUT"], &stale)?;
                }
            }
            let established = Self::established_rule();
            let inserted = !self.has_rule(tool, &rule);
            if inserted {
                self.change_rule(tool, &["-I", "INPUT", "1"], &rule)?;
            }
            match self.scope {
                FirewallScope::All => {
                    // The accept must stay above the drop: a drop inserted
                    // just now went to the top, so the accept moves up too.
                    let present = self.has_rule(tool, &established);
                    if present && inserted {
                        self.change_rule(tool, &["-D", "INPUT"], &established)?;
                    }
                    if !present || inserted {
                        self.change_rule(tool, &["-I", "INPUT", "1"], &established)?;
                    }
                }
                FirewallScope::Smtp => {
                    while self.has_rule(tool, &established) {
                        self.change_rule(tool, &["-D", "INPUT"], &established)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn read(&mut self, now_ms: i64) -> Result<Vec<Entry>, FirewallError> {
        let mut out = Vec::new();
        for set in [SET_V4, SET_V6] {
            let text = self.exec.run("ipset", &["save", set], None)?;
            let entries = Self::parse_save(&String::from_utf8_lossy(&text), now_ms)
                .map_err(|message| FirewallError::Parse { program: "ipset".into(), message })?;
            out.extend(entries);
        }
        Ok(out)
    }

    fn staged(&mut self) -> &mut Staged {
        &mut self.staged
    }

    fn commit(&mut self, now_ms: i64) -> Result<(), FirewallError> {
        let Some((removes, adds)) = self.staged.take_batch() else { return Ok(()) };
        let script = Self::restore_script(&removes, &adds, now_ms);
        self.exec.run("ipset", &["restore", "-exist"], Some(script.as_bytes())).map(|_| ())
    }

    fn flush(&mut self) -> Result<(), FirewallError> {
        for set in [SET_V4, SET_V6] {
            let tool = Self::iptables_for(set);
            for rule in [
                Self::rule(FirewallScope::Smtp, &self.ports, set),
                Self::rule(FirewallScope::Smtp, &SMTP_PORTS, set),
                Self::rule(FirewallScope::All, &self.ports, set),
                Self::established_rule(),
            ] {
                while self.has_rule(tool, &rule) {
                    self.change_rule(tool, &["-D", "INPUT"], &rule)?;
                }
            }
            if self.exec.run("ipset", &["list", "-n", set], None).is_ok() {
                self.exec.run("ipset", &["destroy", set], None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_script_clamps_and_orders() {
        let e = |s: &str, at: Option<i64>| Entry { net: s.parse().unwrap(), expires_at_ms: at, reason: String::new() };
        let script = Ipset::restore_script(
            &[e("192.0.2.1/32", None)],
            &[e("192.0.2.0/24", Some(10_000)), e("2001:db8::/64", None), e("198.51.100.1/32", Some(i64::MAX))],
            0,
        );
        assert_eq!(
            script,
            "del fleetban-v4 192.0.2.1\n\
             add fleetban-v4 192.0.2.0/24 timeout 10\n\
             add fleetban-v6 2001:db8::/64 timeout 0\n\
             add fleetban-v4 198.51.100.1 timeout 2147483\n"
        );
    }

    #[test]
    fn save_output_parses() {
        let text = "create fleetban-v4 hash:net family inet hashsize 4096 maxelem 1048576 timeout 3600\n\
                    add fleetban-v4 192.0.2.0/24 timeout 59\n\
                    add fleetban-v4 198.51.100.7 timeout 0\n\
                    add other 10.0.0.1 timeout 5\n";
        let entries = Ipset::parse_save(text, 1_000).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].expires_at_ms, Some(60_000));
        assert_eq!(entries[1].expires_at_ms, None);
        assert!(Ipset::parse_save("add fleetban-v4 nonsense timeout 1\n", 0).is_err());
    }
}
