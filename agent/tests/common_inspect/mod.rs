//! The one scenario `firewall list` and `why` are checked with on every
//! backend: a running agent's reconciler holds fleet blocks (one partly
//! allowlisted) and a local block and persists its state; a second
//! reconciler over a fresh backend of the same kind (what the command
//! builds) reads the firewall back and joins it with that state.

use std::sync::Arc;

use fleetban_agent::firewall::inspect::{self, Known, Origin};
use fleetban_agent::firewall::reconcile::Reconciler;
use fleetban_agent::firewall::{Backend, Entry, now_ms};
use fleetban_proto::v1::{BlockEntry, BlocklistSnapshot};
use ipnet::IpNet;

fn block(id: i64, cidr: &str, expires_at_ms: i64, reason: &str) -> BlockEntry {
    BlockEntry { block_id: id, cidr: Some(cidr.parse::<IpNet>().unwrap().into()), expires_at_ms, reason: reason.into() }
}

/// Runs the scenario; `make` builds a backend of the kind under test.
pub fn inspection_joins_the_kernel_with_the_state(make: &dyn Fn() -> Box<dyn Backend>) {
    let state = tempfile::tempdir().unwrap();
    let now = now_ms();
    let hour = now + 3_600_000;
    let mut running = Reconciler::new(make(), vec![], Some(state.path().to_owned()), Arc::default());
    running.reconcile(now).unwrap();
    running
        .apply_snapshot(
            &BlocklistSnapshot {
                version: 3,
                entries: vec![
                    block(13, "198.51.100.0/24", hour, "campaign"),
                    block(14, "203.0.113.9/32", hour, "spam run"),
                ],
            },
            now,
        )
        .unwrap();
    running.set_exclusions(vec!["198.51.100.128/25".parse().unwrap()], now).unwrap();
    running
        .add_local(
            Entry { net: "192.0.2.7/32".parse().unwrap(), expires_at_ms: Some(hour + 600_000), reason: "auth".into() },
            now,
        )
        .unwrap();
    running.shutdown().unwrap();

    let mut command = Reconciler::new(make(), vec![], Some(state.path().to_owned()), Arc::default());
    let actual = command.read_actual().unwrap();
    let exclude = command.exclusions().to_vec();
    assert_eq!(exclude, ["198.51.100.128/25".parse::<IpNet>().unwrap()], "the allowlist persisted by the agent");
    let known =
        Known { fleet: command.fleet_blocks().collect(), local: command.local_blocks().collect(), exclude: &exclude };
    let held = inspect::list(actual, &known, now_ms());
    let cidrs: Vec<String> = held.iter().map(|h| h.cidr.to_string()).collect();
    assert_eq!(cidrs, ["192.0.2.7/32", "198.51.100.0/25", "203.0.113.9/32"], "{held:?}");
    assert_eq!((held[0].sources[0].origin, held[0].sources[0].reason.as_str()), (Origin::Local, "auth"));
    assert!(held[0].sources[0].made_at_ms.is_some_and(|at| at >= now));
    assert_eq!(held[1].sources[0].block_id, Some(13));
    assert_eq!((held[2].sources[0].block_id, held[2].sources[0].reason.as_str()), (Some(14), "spam run"));
    for h in &held {
        let left = h.expires_at_ms.expect("timed entries") - now;
        assert!(left > 3_000_000 && left <= 4_300_000, "{h:?}");
    }

    let blocked = inspect::why("198.51.100.5".parse().unwrap(), &held, &known, now_ms());
    assert_eq!(blocked.entry.as_ref().unwrap().cidr.to_string(), "198.51.100.0/25");
    assert!(inspect::why_text(&blocked).contains("fleet block 13 198.51.100.0/24 (campaign"));
    let allowed = inspect::why("198.51.100.200".parse().unwrap(), &held, &known, now_ms());
    assert!(allowed.entry.is_none());
    assert_eq!(allowed.allowlisted_by.len(), 1);
    assert_eq!(allowed.not_enforced[0].block_id, Some(13));
    let clean = inspect::why("192.0.2.99".parse().unwrap(), &held, &known, now_ms());
    assert!(clean.entry.is_none() && clean.allowlisted_by.is_empty() && clean.not_enforced.is_empty());
}
