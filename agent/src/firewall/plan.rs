//! Pure set arithmetic of the reconciler: the desired set from the fleet and
//! local blocks, and the difference between two sets.
//!
//! [`desired`] returns *disjoint* CIDRs (nftables interval sets refuse
//! overlapping elements, and disjoint entries keep every expiry exact):
//! expired entries are dropped, excluded ranges (allowlist, own addresses)
//! are cut out of any entry that contains them, duplicates keep the longest
//! expiry, and a narrower entry inside a broader one either disappears (the
//! broader one lasts at least as long) or cuts the broader one into the
//! pieces around it (it lasts longer). The union of the result covers exactly
//! the addresses that must be blocked, each until its longest expiry.

use std::collections::HashMap;

use ipnet::IpNet;

use super::Entry;

/// Two expiries closer than this are the same: read-back has one-second
/// resolution, and listing a large set takes seconds while the timeouts keep
/// running. A real change of expiry (a block extended by the server) is
/// minutes or more.
pub const EXPIRY_TOLERANCE_MS: i64 = 10_000;

/// An entry that expires within this is left to expire on its own rather than
/// removed (the kernel may drop it before the removal arrives).
pub const EXPIRING_SOON_MS: i64 = 2_000;

/// Whether `a` lasts longer than `b` (`None` = forever).
pub fn outlasts(a: Option<i64>, b: Option<i64>) -> bool {
    match (a, b) {
        (None, None) => false,
        (None, Some(_)) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a > b,
    }
}

/// The pieces of `outer` that remain when `hole` (inside it) is cut out.
pub fn cut(outer: IpNet, hole: IpNet) -> Vec<IpNet> {
    let mut pieces = Vec::new();
    let mut current = outer;
    while current.prefix_len() < hole.prefix_len() {
        let Ok(mut halves) = current.subnets(current.prefix_len() + 1) else { break };
        let (Some(low), Some(high)) = (halves.next(), halves.next()) else { break };
        if low.contains(&hole) {
            pieces.push(high);
            current = low;
        } else {
            pieces.push(low);
            current = high;
        }
    }
    pieces
}

/// `net` minus every range in `exclude`.
pub fn subtract(net: IpNet, exclude: &[IpNet]) -> Vec<IpNet> {
    let mut parts = vec![net];
    for hole in exclude {
        let mut next = Vec::with_capacity(parts.len());
        for part in parts {
            if hole.contains(&part) {
                continue;
            }
            if part.contains(hole) {
                next.extend(cut(part, *hole));
            } else {
                next.push(part);
            }
        }
        parts = next;
    }
    parts
}

/// The desired set (see the module documentation), keyed by range.
pub fn desired<'a>(
    entries: impl IntoIterator<Item = &'a Entry>,
    exclude: &[IpNet],
    now_ms: i64,
) -> HashMap<IpNet, Entry> {
    // Longest expiry per exact range, exclusions cut out.
    let mut by_net: HashMap<IpNet, Entry> = HashMap::new();
    for entry in entries {
        if entry.expires_at_ms.is_some_and(|at| at <= now_ms) {
            continue;
        }
        let net = entry.net.trunc();
        let pieces = if exclude.iter().any(|hole| hole.contains(&net) || net.contains(hole)) {
            subtract(net, exclude)
        } else {
            vec![net]
        };
        for piece in pieces {
            match by_net.get_mut(&piece) {
                Some(held) if outlasts(entry.expires_at_ms, held.expires_at_ms) => {
                    held.expires_at_ms = entry.expires_at_ms;
                    held.reason.clone_from(&entry.reason);
                }
                Some(_) => {}
                None => {
                    by_net.insert(piece, Entry { net: piece, ..entry.clone() });
                }
            }
        }
    }
    // Broadest first, so a range can only fall inside one already placed.
    let mut sorted: Vec<Entry> = by_net.into_values().collect();
    sorted.sort_by_key(|entry| (entry.net.prefix_len(), entry.net));
    let mut placed: HashMap<IpNet, Entry> = HashMap::with_capacity(sorted.len());
    // Prefix lengths present in `placed`, per family: a container can only
    // have one of them (usually one or two, instead of up to 128 lookups).
    let mut lengths = [[false; 129]; 2];
    let family = |net: &IpNet| usize::from(net.addr().is_ipv6());
    for entry in sorted {
        // A piece cut from a broader entry may be exactly this range.
        if let Some(held) = placed.get_mut(&entry.net) {
            if outlasts(entry.expires_at_ms, held.expires_at_ms) {
                *held = entry;
            }
            continue;
        }
        let present = &lengths[family(&entry.net)];
        let container = (0..entry.net.prefix_len())
            .rev()
            .filter(|len| present[usize::from(*len)])
            .filter_map(|len| IpNet::new(entry.net.addr(), len).ok().map(|n| n.trunc()))
            .find(|candidate| placed.contains_key(candidate));
        match container {
            None => {
                lengths[family(&entry.net)][usize::from(entry.net.prefix_len())] = true;
                placed.insert(entry.net, entry);
            }
            Some(outer) => {
                let Some(outer_entry) = placed.get(&outer) else { continue };
                if !outlasts(entry.expires_at_ms, outer_entry.expires_at_ms) {
                    continue;
                }
                let Some(outer_entry) = placed.remove(&outer) else { continue };
                for piece in cut(outer, entry.net) {
                    lengths[family(&piece)][usize::from(piece.prefix_len())] = true;
                    placed.insert(piece, Entry { net: piece, ..outer_entry.clone() });
                }
                lengths[family(&entry.net)][usize::from(entry.net.prefix_len())] = true;
                placed.insert(entry.net, entry);
            }
        }
    }
    placed
}

/// Whether two expiries are the same for the firewall's purposes.
pub fn same_expiry(a: Option<i64>, b: Option<i64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= EXPIRY_TOLERANCE_MS,
        _ => false,
    }
}

/// What to change so that `actual` becomes `desired`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// Entries to remove (including the old version of a re-timed entry).
    pub remove: Vec<Entry>,
    /// Entries to add (including the new version of a re-timed entry).
    pub add: Vec<Entry>,
}

impl Diff {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    /// Number of changed ranges (a re-timed entry counts once).
    pub fn changes(&self) -> usize {
        let removed: std::collections::HashSet<IpNet> = self.remove.iter().map(|entry| entry.net).collect();
        let retimed = self.add.iter().filter(|add| removed.contains(&add.net)).count();
        self.add.len() + self.remove.len() - retimed
    }
}

/// The difference between `actual` and `desired` at `now_ms`.
pub fn diff(desired: &HashMap<IpNet, Entry>, actual: &HashMap<IpNet, Entry>, now_ms: i64) -> Diff {
    let mut out = Diff::default();
    for (net, held) in actual {
        match desired.get(net) {
            None => {
                if held.expires_at_ms.is_none_or(|at| at - now_ms > EXPIRING_SOON_MS) {
                    out.remove.push(held.clone());
                }
            }
            Some(want) if !same_expiry(want.expires_at_ms, held.expires_at_ms) => {
                out.remove.push(held.clone());
                out.add.push(want.clone());
            }
            Some(_) => {}
        }
    }
    for (net, want) in desired {
        if !actual.contains_key(net) {
            out.add.push(want.clone());
        }
    }
    out.remove.sort_by_key(|entry| entry.net);
    out.add.sort_by_key(|entry| entry.net);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn entry(s: &str, expires: Option<i64>) -> Entry {
        Entry { net: net(s), expires_at_ms: expires, reason: "test".into() }
    }

    fn nets(map: &HashMap<IpNet, Entry>) -> Vec<String> {
        let mut out: Vec<_> = map.values().map(|e| format!("{} {:?}", e.net, e.expires_at_ms)).collect();
        out.sort();
        out
    }

    #[test]
    fn cut_leaves_the_pieces_around_the_hole() {
        let pieces = cut(net("192.0.2.0/24"), net("192.0.2.5/32"));
        assert_eq!(pieces.len(), 8);
        let total: u64 = pieces.iter().map(|p| 1u64 << (32 - p.prefix_len())).sum();
        assert_eq!(total, 255);
        assert!(pieces.iter().all(|p| !p.contains(&net("192.0.2.5/32"))));
    }

    #[test]
    fn expired_dropped_duplicates_keep_the_longest() {
        let entries = [
            entry("192.0.2.1/32", Some(50)),
            entry("192.0.2.2/32", Some(500)),
            entry("192.0.2.2/32", Some(900)),
            entry("192.0.2.3/32", None),
            entry("192.0.2.3/32", Some(900)),
        ];
        let out = desired(&entries, &[], 100);
        assert_eq!(nets(&out), ["192.0.2.2/32 Some(900)", "192.0.2.3/32 None"]);
    }

    #[test]
    fn exclusions_are_cut_out() {
        let entries = [entry("192.0.2.0/24", None), entry("198.51.100.7/32", None), entry("2001:db8::/64", None)];
        let exclude = [net("192.0.2.128/25"), net("198.51.100.0/24"), net("2001:db8::1/128")];
        let out = desired(&entries, &exclude, 0);
        assert!(out.contains_key(&net("192.0.2.0/25")));
        assert!(!out.keys().any(|n| n.contains(&net("192.0.2.200/32"))));
        assert!(!out.keys().any(|n| n.contains(&net("198.51.100.7/32"))));
        assert!(!out.keys().any(|n| n.contains(&net("2001:db8::1/128"))));
        assert!(out.keys().any(|n| n.contains(&net("2001:db8::2/128"))));
        assert_eq!(out.keys().filter(|n| n.addr().is_ipv6()).count(), 64);
    }

    #[test]
    fn narrower_entry_inside_a_broader_one() {
        // Shorter-lived inner entry: absorbed.
        let out = desired(&[entry("192.0.2.0/24", Some(1000)), entry("192.0.2.9/32", Some(500))], &[], 0);
        assert_eq!(nets(&out), ["192.0.2.0/24 Some(1000)"]);
        // Longer-lived inner entry: the outer one is cut around it.
        let out = desired(&[entry("192.0.2.0/24", Some(1000)), entry("192.0.2.9/32", Some(5000))], &[], 0);
        assert_eq!(out.len(), 9);
        assert_eq!(out[&net("192.0.2.9/32")].expires_at_ms, Some(5000));
        assert!(out.values().filter(|e| e.net != net("192.0.2.9/32")).all(|e| e.expires_at_ms == Some(1000)));
    }

    #[test]
    fn a_cut_piece_keeps_the_longer_expiry() {
        // Found by the property test: the /24 is cut around the permanent
        // /26, and the remaining /26 piece is also an input of its own.
        let out = desired(
            &[entry("192.0.2.0/26", None), entry("192.0.2.0/24", Some(2000)), entry("192.0.2.64/26", Some(1000))],
            &[],
            0,
        );
        assert_eq!(nets(&out), ["192.0.2.0/26 None", "192.0.2.128/25 Some(2000)", "192.0.2.64/26 Some(2000)"]);
    }

    #[test]
    fn diff_adds_removes_and_retimes() {
        let want = desired(&[entry("192.0.2.1/32", Some(100_000)), entry("192.0.2.2/32", Some(100_000))], &[], 0);
        let actual = desired(
            &[entry("192.0.2.2/32", Some(50_000)), entry("192.0.2.3/32", None), entry("192.0.2.4/32", Some(1_000))],
            &[],
            0,
        );
        let d = diff(&want, &actual, 0);
        assert_eq!(d.add.iter().map(|e| e.net).collect::<Vec<_>>(), [net("192.0.2.1/32"), net("192.0.2.2/32")]);
        // .4 expires within the grace period: left to expire.
        assert_eq!(d.remove.iter().map(|e| e.net).collect::<Vec<_>>(), [net("192.0.2.2/32"), net("192.0.2.3/32")]);
        assert_eq!(d.changes(), 3);
        assert!(diff(&want, &want, 0).is_empty());
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (any::<u8>(), 24u8..=32, prop::option::of(1i64..10)).prop_map(|(host, len, expires)| Entry {
            net: IpNet::new(std::net::Ipv4Addr::new(192, 0, 2, host).into(), len).unwrap().trunc(),
            expires_at_ms: expires.map(|e| e * 1000),
            reason: String::new(),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Every address is blocked in the result exactly when some input
        /// entry (not excluded) blocks it, until that entry's longest expiry;
        /// the result is disjoint.
        #[test]
        fn desired_covers_exactly_and_disjointly(
            entries in prop::collection::vec(arb_entry(), 0..12),
            holes in prop::collection::vec((any::<u8>(), 28u8..=32), 0..3),
        ) {
            let exclude: Vec<IpNet> = holes.iter()
                .map(|(h, len)| IpNet::new(std::net::Ipv4Addr::new(192, 0, 2, *h).into(), *len).unwrap().trunc())
                .collect();
            let out = desired(&entries, &exclude, 0);
            for host in 0..=255u8 {
                let ip = IpNet::from(std::net::IpAddr::from(std::net::Ipv4Addr::new(192, 0, 2, host)));
                let holders: Vec<&Entry> = out.values().filter(|e| e.net.contains(&ip)).collect();
                prop_assert!(holders.len() <= 1, "overlap at {}", ip);
                let excluded = exclude.iter().any(|x| x.contains(&ip));
                let covering: Vec<&Entry> = entries.iter().filter(|e| e.net.contains(&ip)).collect();
                if excluded || covering.is_empty() {
                    prop_assert!(holders.is_empty(), "{} blocked but must not be", ip);
                } else {
                    let longest = covering
                        .iter()
                        .map(|e| e.expires_at_ms)
                        .reduce(|a, b| if outlasts(b, a) { b } else { a })
                        .expect("covering is not empty");
                    prop_assert_eq!(holders.len(), 1, "{} not blocked", ip);
                    prop_assert_eq!(holders[0].expires_at_ms, longest);
                }
            }
        }
    }
}
