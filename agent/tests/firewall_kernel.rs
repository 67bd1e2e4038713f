//! The nftables and ipset backends against the real kernel, in network
//! namespaces created by the test: blocked sources cannot connect to port
//! 25 and allowed ones can, a /24 blocks all of it, expired entries vanish,
//! drift is repaired by reconcile, 100k entries load in one commit.
//! Needs root; without it every test prints a loud SKIPPED and passes.

mod common_inspect;
mod support;

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fleetban_agent::config::{FirewallBackend, FirewallScope};
use fleetban_agent::firewall::reconcile::{FirewallStats, Reconciler};
use fleetban_agent::firewall::{Entry, Exec, backend_of, now_ms};
use fleetban_proto::v1::{BlockEntry, BlocklistDelta, BlocklistSnapshot};
use ipnet::IpNet;
use support::Netns;

fn block(id: i64, cidr: &str, expires_at_ms: i64) -> BlockEntry {
    BlockEntry { block_id: id, cidr: Some(cidr.parse::<IpNet>().unwrap().into()), expires_at_ms, reason: "test".into() }
}

fn reconciler(ns: &Netns, kind: FirewallBackend, scope: FirewallScope) -> Reconciler {
    let backend = backend_of(kind, scope, std::env::temp_dir(), Exec { netns: Some(ns.server.clone()) });
    Reconciler::new(backend, vec!["198.51.100.20/32".parse().unwrap()], None, Arc::new(FirewallStats::default()))
}

fn assert_reachability(ns: &Netns, blocked: &[&str], allowed: &[&str], port: u16) {
    for source in blocked {
        assert!(!ns.can_connect(source, port), "{source} reached port {port} but is blocked");
    }
    for source in allowed {
        assert!(ns.can_connect(source, port), "{source} could not reach port {port} but is allowed");
    }
}

/// Blocks, scope, /24, allowlist, delta removal, expiry, drift repair.
fn blocks_and_repairs(kind: FirewallBackend, tag: &str, flush_by_hand: &[&str]) {
    let ns = Netns::new(tag);
    let mut fw = reconciler(&ns, kind, FirewallScope::Smtp);
    let now = now_ms();
    fw.reconcile(now).unwrap();
    let hour = now + 3_600_000;
    let snapshot = BlocklistSnapshot {
        version: 1,
        entries: vec![
            block(1, "192.0.2.10/32", hour),
            block(2, "2001:db8:bad::/64", hour),
            // A prefix length without a hash set of its own.
            block(5, "192.0.2.252/30", hour),
            // Allowlisted: never applied.
            block(3, "198.51.100.20/32", hour),
        ],
    };
    fw.apply_snapshot(&snapshot, now_ms()).unwrap();
    assert_reachability(
        &ns,
        &["192.0.2.10", "192.0.2.254", "2001:db8:bad::1", "2001:db8:bad::2"],
        &["192.0.2.1", "192.0.2.77", "198.51.100.10", "198.51.100.20", "2001:db8:600d::1"],
        25,
    );
    // Scope smtp: other ports stay open.
    assert_reachability(&ns, &[], &["192.0.2.10", "2001:db8:bad::1"], 80);

    // A /24 blocks every address in it.
    let delta = BlocklistDelta {
        from_version: 1,
        to_version: 2,
        added: vec![block(4, "192.0.2.0/24", hour)],
        removed: vec![2],
    };
    fw.apply_delta(&delta, now_ms()).unwrap();
    assert_reachability(
        &ns,
        &["192.0.2.1", "192.0.2.10", "192.0.2.77", "192.0.2.254"],
        &["2001:db8:bad::1", "198.51.100.10"],
        25,
    );

    // A local block that expires in 2 s disappears by itself.
    fw.add_local(
        Entry {
            net: "198.51.100.10/32".parse().unwrap(),
            expires_at_ms: Some(now_ms() + 2_000),
            reason: "conn_rate".into(),
        },
        now_ms(),
    )
    .unwrap();
    assert_reachability(&ns, &["198.51.100.10"], &[], 25);
    std::thread::sleep(Duration::from_millis(3_500));
    assert_reachability(&ns, &[], &["198.51.100.10"], 25);
    assert_eq!(fw.reconcile(now_ms()).unwrap(), 0, "the expired entry is gone from the kernel too");

    // Someone flushes the set by hand: the next reconcile repairs it.
    ns.exec_server(flush_by_hand);
    assert_reachability(&ns, &[], &["192.0.2.10"], 25);
    let stats = fw.stats();
    let repaired_before = stats.drift_repaired.load(Ordering::Relaxed);
    assert!(fw.reconcile(now_ms()).unwrap() > 0);
    assert!(stats.drift_repaired.load(Ordering::Relaxed) > repaired_before);
    assert_reachability(&ns, &["192.0.2.1", "192.0.2.10"], &["198.51.100.10"], 25);

    // Scope "all": every port, but never a connection the host already has
    // (its uplink to the fleet server, here at 192.0.2.10).
    // The agent sets its firewall up before it connects (conntrack follows
    // the connection from its first packet on).
    let mut all = reconciler(&ns, kind, FirewallScope::All);
    all.reconcile(now_ms()).unwrap();
    let (mut host, mut server) = ns.outbound("192.0.2.10", 7_000);
    all.apply_snapshot(&BlocklistSnapshot { version: 2, entries: vec![block(4, "192.0.2.0/24", hour)] }, now_ms())
        .unwrap();
    assert_reachability(&ns, &["192.0.2.10"], &["198.51.100.10"], 80);
    server.write_all(b"unblock").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut reply = [0u8; 7];
    host.read_exact(&mut reply).expect("the established connection still receives");
    assert_eq!(&reply, b"unblock");
    // Setting up again keeps the accept above the drop.
    let mut again = reconciler(&ns, kind, FirewallScope::All);
    again.reconcile(now_ms()).unwrap();
    server.write_all(b"again!!").unwrap();
    host.read_exact(&mut reply).expect("still receives after a second setup");
    assert_eq!(&reply, b"again!!");
}

fn loads_100k_in_one_commit(kind: FirewallBackend, tag: &str) {
    let ns = Netns::new(tag);
    let mut fw = reconciler(&ns, kind, FirewallScope::Smtp);
    fw.reconcile(now_ms()).unwrap();
    let hour = now_ms() + 3_600_000;
    // 198.18.0.0/15 (benchmarking range): 100 000 distinct hosts.
    let entries: Vec<BlockEntry> = (0..100_000u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0xC612_0000 + i);
            block(i64::from(i) + 1, &format!("{ip}/32"), hour)
        })
        .collect();
    let started = Instant::now();
    let changes = fw.apply_snapshot(&BlocklistSnapshot { version: 1, entries }, now_ms()).unwrap();
    let took = started.elapsed();
    eprintln!("{kind:?}: 100k entries applied in {took:?}");
    assert_eq!(changes, 100_000);
    assert_eq!(fw.entries(), 100_000);
    // Read back: the kernel holds all of them, nothing left to do.
    assert_eq!(fw.reconcile(now_ms()).unwrap(), 0);
    assert_eq!(fw.stats().errors.load(Ordering::Relaxed), 0);
}

#[test]
fn nftables_blocks_expires_and_repairs_drift() {
    if support::root_or_skip("nftables_blocks_expires_and_repairs_drift") {
        blocks_and_repairs(FirewallBackend::Nftables, "n1", &["nft", "flush", "set", "inet", "fleetban", "v4_24"]);
    }
}

#[test]
fn nftables_loads_100k_entries_in_one_commit() {
    if support::root_or_skip("nftables_loads_100k_entries_in_one_commit") {
        loads_100k_in_one_commit(FirewallBackend::Nftables, "n2");
    }
}

#[test]
fn nftables_recreates_a_deleted_table_and_flush_removes_it() {
    if !support::root_or_skip("nftables_recreates_a_deleted_table_and_flush_removes_it") {
        return;
    }
    let ns = Netns::new("n3");
    let mut fw = reconciler(&ns, FirewallBackend::Nftables, FirewallScope::Smtp);
    let hour = now_ms() + 3_600_000;
    fw.apply_snapshot(&BlocklistSnapshot { version: 1, entries: vec![block(1, "192.0.2.10/32", hour)] }, now_ms())
        .unwrap();
    ns.exec_server(&["nft", "delete", "table", "inet", "fleetban"]);
    assert_reachability(&ns, &[], &["192.0.2.10"], 25);
    // The next change notices the missing table and reconciles in full.
    fw.apply_delta(
        &BlocklistDelta {
            from_version: 1,
            to_version: 2,
            added: vec![block(2, "192.0.2.77/32", hour)],
            removed: vec![],
        },
        now_ms(),
    )
    .unwrap();
    assert_reachability(&ns, &["192.0.2.10", "192.0.2.77"], &["192.0.2.1"], 25);
    fw.flush().unwrap();
    assert!(!ns.exec_server(&["nft", "list", "tables"]).contains("fleetban"));
    assert_reachability(&ns, &[], &["192.0.2.10"], 25);
}

#[test]
fn ipset_blocks_expires_and_repairs_drift() {
    if support::root_or_skip("ipset_blocks_expires_and_repairs_drift") {
        blocks_and_repairs(FirewallBackend::Ipset, "i1", &["ipset", "flush", "fleetban-v4"]);
    }
}

#[test]
fn ipset_loads_100k_entries_in_one_commit() {
    if support::root_or_skip("ipset_loads_100k_entries_in_one_commit") {
        loads_100k_in_one_commit(FirewallBackend::Ipset, "i2");
    }
}

/// `firewall list` / `why` read the nftables sets back from the kernel.
#[test]
fn nftables_inspection() {
    if !support::root_or_skip("nftables_inspection") {
        return;
    }
    let ns = Netns::new("ni");
    let exec = Exec { netns: Some(ns.server.clone()) };
    common_inspect::inspection_joins_the_kernel_with_the_state(&|| {
        backend_of(FirewallBackend::Nftables, FirewallScope::Smtp, std::env::temp_dir(), exec.clone())
    });
}

/// `firewall list` / `why` read the ipsets back from the kernel.
#[test]
fn ipset_inspection() {
    if !support::root_or_skip("ipset_inspection") {
        return;
    }
    let ns = Netns::new("ii");
    let exec = Exec { netns: Some(ns.server.clone()) };
    common_inspect::inspection_joins_the_kernel_with_the_state(&|| {
        backend_of(FirewallBackend::Ipset, FirewallScope::Smtp, std::env::temp_dir(), exec.clone())
    });
}
