//! What this host's firewall enforces, and why: `fleetban-agent firewall
//! list` and `fleetban-agent why IP`.
//!
//! The truth is the kernel (or CSF's lists, or the dry-run file): the
//! entries are read back from the configured backend exactly as the
//! reconciler reads them, never from memory. Each entry is then joined with
//! the agent's state file (`state_dir/blocklist.pb`): the fleet blocks
//! (server block id and reason) and this host's own local blocks (rule and
//! when it was made) whose range holds it. The reconciler cuts blocks into
//! disjoint pieces (around allowlisted ranges, around longer-lived narrower
//! blocks), so an entry may be a piece of a block, and several blocks may
//! hold one entry; the one that lasts longest comes first. An entry no block
//! explains is `unknown` (the state file was lost, or the kernel drifted:
//! the next full reconcile removes it).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::Entry;
use super::plan::outlasts;

/// Where a block the firewall enforces comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The fleet blocklist pushed by the server.
    Fleet,
    /// This host's own detection.
    Local,
}

/// A block (fleet or local) that holds an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    /// Fleet or local.
    pub origin: Origin,
    /// The server's block id (fleet blocks only).
    pub block_id: Option<i64>,
    /// The block's own range (the entry may be a piece of it).
    pub cidr: IpNet,
    /// The server's reason, or the local rule.
    pub reason: String,
    /// When the block expires, unix ms; `None` = never.
    pub expires_at_ms: Option<i64>,
    /// When this host made it, unix ms (local blocks; `None` = not known).
    pub made_at_ms: Option<i64>,
}

/// One entry the firewall holds, with the blocks behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    /// The range as the firewall holds it.
    pub cidr: IpNet,
    /// Its expiry as the firewall holds it, unix ms; `None` = never.
    pub expires_at_ms: Option<i64>,
    /// The blocks holding it, longest-lived first; empty = unknown.
    pub sources: Vec<Source>,
}

/// The state a listing is joined with.
#[derive(Debug, Default)]
pub struct Known<'a> {
    /// Fleet blocks: id and entry.
    pub fleet: Vec<(i64, &'a Entry)>,
    /// Local blocks: entry and when made (0 = not known).
    pub local: Vec<(&'a Entry, i64)>,
    /// Never-blocked ranges (allowlists, own addresses, the server).
    pub exclude: &'a [IpNet],
}

impl Known<'_> {
    /// The blocks whose range holds `net`, longest-lived first.
    pub fn sources(&self, net: &IpNet, now_ms: i64) -> Vec<Source> {
        let live = |e: &Entry| e.expires_at_ms.is_none_or(|at| at > now_ms);
        let mut out: Vec<Source> = self
            .fleet
            .iter()
            .filter(|(_, e)| live(e) && e.net.contains(net))
            .map(|(id, e)| Source {
                origin: Origin::Fleet,
                block_id: Some(*id),
                cidr: e.net,
                reason: e.reason.clone(),
                expires_at_ms: e.expires_at_ms,
                made_at_ms: None,
            })
            .chain(self.local.iter().filter(|(e, _)| live(e) && e.net.contains(net)).map(|(e, made)| Source {
                origin: Origin::Local,
                block_id: None,
                cidr: e.net,
                reason: e.reason.clone(),
                expires_at_ms: e.expires_at_ms,
                made_at_ms: (*made > 0).then_some(*made),
            }))
            .collect();
        out.sort_by(|a, b| {
            if outlasts(a.expires_at_ms, b.expires_at_ms) {
                std::cmp::Ordering::Less
            } else if outlasts(b.expires_at_ms, a.expires_at_ms) {
                std::cmp::Ordering::Greater
            } else {
                (a.origin == Origin::Local).cmp(&(b.origin == Origin::Local)).then(a.cidr.cmp(&b.cidr))
            }
        });
        out
    }
}

/// Joins what the backend holds with the known blocks, in address order.
pub fn list(actual: Vec<Entry>, known: &Known<'_>, now_ms: i64) -> Vec<Held> {
    let mut held: Vec<Held> = actual
        .into_iter()
        .map(|entry| Held {
            sources: known.sources(&entry.net, now_ms),
            cidr: entry.net,
            expires_at_ms: entry.expires_at_ms,
        })
        .collect();
    held.sort_by_key(|h| (h.cidr.addr().is_ipv6(), h.cidr));
    held
}

/// The answer to `why IP`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Why {
    /// The address asked about.
    pub ip: IpAddr,
    /// The firewall entry that matches it; `None` = not blocked here.
    pub entry: Option<Held>,
    /// Never-blocked ranges holding it (allowlists, own addresses).
    pub allowlisted_by: Vec<IpNet>,
    /// Blocks that cover it but that this host does not enforce for it
    /// (allowlisted, or not applied yet).
    pub not_enforced: Vec<Source>,
}

/// Which entry of `held` blocks `ip`, and what else concerns it.
pub fn why(ip: IpAddr, held: &[Held], known: &Known<'_>, now_ms: i64) -> Why {
    let ip = ip.to_canonical();
    let host = IpNet::from(ip);
    let entry = held.iter().find(|h| h.cidr.contains(&ip)).cloned();
    let allowlisted_by: Vec<IpNet> = known.exclude.iter().filter(|x| x.contains(&ip)).copied().collect();
    let not_enforced = if entry.is_some() { Vec::new() } else { known.sources(&host, now_ms) };
    Why { ip, entry, allowlisted_by, not_enforced }
}

fn time_text(ms: Option<i64>) -> String {
    match ms.and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok()) {
        Some(at) => at.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        None => "never".to_owned(),
    }
}

fn source_text(s: &Source) -> String {
    let what = match (s.origin, s.block_id) {
        (Origin::Fleet, Some(id)) => format!("fleet block {id}"),
        (Origin::Fleet, None) => "fleet block".to_owned(),
        (Origin::Local, _) => "local block".to_owned(),
    };
    format!("{what} {} ({}, expires {})", s.cidr, escape(&s.reason), time_text(s.expires_at_ms))
}

/// Control characters in a reason from the server are shown escaped.
fn escape(text: &str) -> String {
    text.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// `firewall list` as an aligned table.
pub fn list_table(held: &[Held]) -> String {
    let rows: Vec<[String; 5]> = held
        .iter()
        .map(|h| {
            let first = h.sources.first();
            let sources = if h.sources.is_empty() {
                "unknown".to_owned()
            } else {
                h.sources.iter().map(|s| format!("{:?}", s.origin).to_lowercase()).collect::<Vec<_>>().join("+")
            };
            [
                h.cidr.to_string(),
                time_text(h.expires_at_ms),
                sources,
                first.and_then(|s| s.block_id).map_or_else(|| "-".to_owned(), |id| id.to_string()),
                first.map_or_else(|| "not in the agent's state".to_owned(), |s| escape(&s.reason)),
            ]
        })
        .collect();
    let headers = ["CIDR", "EXPIRES (UTC)", "SOURCE", "BLOCK", "REASON"];
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `why IP` in words.
pub fn why_text(why: &Why) -> String {
    let mut out = String::new();
    match &why.entry {
        Some(held) => {
            out.push_str(&format!(
                "{} is blocked on this host by the entry {} (expires {}).\n",
                why.ip,
                held.cidr,
                time_text(held.expires_at_ms)
            ));
            if held.sources.is_empty() {
                out.push_str("  No block in the agent's state explains it: the next full reconcile removes it.\n");
            }
            for s in &held.sources {
                out.push_str(&format!("  from {}\n", source_text(s)));
            }
        }
        None => out.push_str(&format!("{} is not blocked on this host.\n", why.ip)),
    }
    for range in &why.allowlisted_by {
        out.push_str(&format!("  allowlisted (never blocked here) by {range}\n"));
    }
    for s in &why.not_enforced {
        out.push_str(&format!("  not enforced here: {}\n", source_text(s)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(net: &str, expires: Option<i64>, reason: &str) -> Entry {
        Entry { net: net.parse().unwrap(), expires_at_ms: expires, reason: reason.into() }
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn entries_are_joined_with_the_blocks_that_hold_them() {
        let fleet_24 = entry("198.51.100.0/24", Some(NOW + 3_600_000), "campaign");
        let local = entry("198.51.100.7/32", Some(NOW + 7_200_000), "auth");
        let other = entry("203.0.113.9/32", None, "manual ban");
        let exclude = ["198.51.100.128/25".parse().unwrap()];
        let known =
            Known { fleet: vec![(13, &fleet_24), (14, &other)], local: vec![(&local, NOW - 1_000)], exclude: &exclude };
        let actual = vec![
            entry("203.0.113.9/32", None, ""),
            entry("198.51.100.7/32", Some(NOW + 7_200_000), ""),
            entry("198.51.100.0/30", Some(NOW + 3_600_000), ""),
            entry("192.0.2.1/32", None, ""),
        ];
        let held = list(actual, &known, NOW);
        let cidrs: Vec<String> = held.iter().map(|h| h.cidr.to_string()).collect();
        assert_eq!(cidrs, ["192.0.2.1/32", "198.51.100.0/30", "198.51.100.7/32", "203.0.113.9/32"]);
        assert!(held[0].sources.is_empty(), "unknown");
        assert_eq!(held[1].sources[0].block_id, Some(13));
        // The local block outlives the fleet /24 that also holds it.
        assert_eq!(held[2].sources.iter().map(|s| s.origin).collect::<Vec<_>>(), [Origin::Local, Origin::Fleet]);
        assert_eq!(held[2].sources[0].made_at_ms, Some(NOW - 1_000));
        assert_eq!(held[3].sources[0].reason, "manual ban");
        let table = list_table(&held);
        assert!(table.lines().nth(3).unwrap().contains("local+fleet"), "{table}");
        assert!(table.contains("unknown") && table.contains("campaign"), "{table}");

        let w = why("198.51.100.2".parse().unwrap(), &held, &known, NOW);
        assert_eq!(w.entry.as_ref().map(|h| h.cidr.to_string()).as_deref(), Some("198.51.100.0/30"));
        assert!(why_text(&w).contains("from fleet block 13 198.51.100.0/24 (campaign"), "{}", why_text(&w));
        // Allowlisted inside the fleet /24: not blocked, and says why.
        let w = why("198.51.100.200".parse().unwrap(), &held, &known, NOW);
        assert!(w.entry.is_none());
        assert_eq!(w.allowlisted_by, ["198.51.100.128/25".parse::<IpNet>().unwrap()]);
        assert_eq!(w.not_enforced.len(), 1);
        let text = why_text(&w);
        assert!(text.starts_with("198.51.100.200 is not blocked") && text.contains("allowlisted"), "{text}");
        let w = why("2001:db8::1".parse().unwrap(), &held, &known, NOW);
        assert!(w.entry.is_none() && w.allowlisted_by.is_empty() && w.not_enforced.is_empty());
        // A mapped address is the IPv4 address.
        let w = why("::ffff:203.0.113.9".parse().unwrap(), &held, &known, NOW);
        assert!(w.entry.is_some());
    }
}
