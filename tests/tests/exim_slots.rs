//! Blocking an attacker frees the Exim slots it already holds, against
//! real Exim (`smtp_accept_max = 20`, `smtp_receive_timeout = 5m`,
//! cPanel's log selectors; tests/src/exim.rs) with a real agent on the
//! nftables backend (tests/src/fleet.rs, tests/src/slots.rs).
//!
//! 1. A manual block: local detection off, so only the operator blocks.
//!    Two flooders hold all 20 slots; a legitimate client is refused with
//!    `421`; the operator blocks both; the client gets `220` within 1 s of
//!    the block, three times in a row, and the host ended every held
//!    flooder connection (without that, the slots stay taken for the 5
//!    minutes of `smtp_receive_timeout`).
//!    The control: the same with `[firewall] end_connections = false`, and
//!    the client is still refused 10 s after the block (what every peer
//!    does: the drop rule alone frees nothing).
//! 2. A local block: the agent's own slot detection blocks the flooders as
//!    the host fills, and their held connections end at once: a polite
//!    client completes a session within 1 s of the block, and is never
//!    blocked itself.
//!
//! Needs root (namespaces, nftables) and Exim (`exim4-daemon-heavy`).
//! Run with `cargo test -p fleetban-tests --test exim_slots -- --nocapture`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fleetban_tests::exim::{self, EximOptions, Polite, polite_session};
use fleetban_tests::fleet::{self, CLIENT, Fleet, FleetOptions, Mta, att_v4, mx_v4};
use fleetban_tests::netns::is_root;
use fleetban_tests::slots::manual_block_cycle;

/// Exim's `smtp_receive_timeout`, seconds: held connections would keep
/// their slots this long.
const RECEIVE_TIMEOUT_SECS: u32 = 300;

fn fleet_with(detect: &str, firewall: &str) -> Fleet {
    let bins = fleet::binaries().unwrap_or_else(|error| panic!("{error:#}"));
    let options = FleetOptions {
        hosts: 1,
        mta: Mta::Exim(EximOptions { receive_timeout_secs: RECEIVE_TIMEOUT_SECS, ..EximOptions::default() }),
        smtp_accept_max: 20,
        detect: detect.into(),
        firewall: firewall.into(),
        ..FleetOptions::default()
    };
    Fleet::start(bins, options).unwrap_or_else(|error| panic!("starting the fleet: {error:#}"))
}

#[test]
fn blocking_flooders_frees_their_slots_at_once() {
    assert!(
        is_root(),
        "this test needs root (network namespaces and nftables); run it as root, e.g. \
         `sudo -E cargo test -p fleetban-tests --test exim_slots`"
    );
    exim::binary().unwrap_or_else(|error| panic!("{error}"));
    let legit = IpAddr::V4(CLIENT);

    // 1. Manual blocks, detection off.
    {
        let fleet = fleet_with("enabled = false", "");
        let flooders = [att_v4(46), att_v4(47)];
        let cidrs: Vec<String> = flooders.iter().map(|f| format!("{f}/32")).collect();
        for run in 0..3 {
            let cycle = manual_block_cycle(&fleet, &flooders, 10, &cidrs, legit)
                .unwrap_or_else(|error| panic!("run {run}: {error:#}\nagent:\n{}", fleet.agent_log_tail(0)));
            println!("manual block, run {run}: {cycle:?}");
            assert_eq!(cycle.refused_with, 421, "run {run}: {cycle:?}");
            assert_eq!(cycle.held, 20, "run {run}: the flood did not take every slot: {cycle:?}");
            assert_eq!(cycle.ended, cycle.held, "run {run}: held connections were left open: {cycle:?}");
            assert!(cycle.create_to_220 < Duration::from_secs(1), "run {run}: {cycle:?}");
        }
        let log = fleet.agent_log_tail(0);
        assert!(log.contains("Ended the established connections of a blocked range"), "{log}");
    }

    // The control: without ending connections, the block alone does not
    // free the slots (they stay taken until the receive timeout).
    {
        let fleet = fleet_with("enabled = false", "end_connections = false");
        let flooders = [att_v4(46), att_v4(47)];
        let cidrs: Vec<String> = flooders.iter().map(|f| format!("{f}/32")).collect();
        let outcome = manual_block_cycle(&fleet, &flooders, 10, &cidrs, legit);
        let error = outcome.expect_err("the slots were freed without ending the connections");
        assert!(format!("{error:#}").contains("not served within 10 s"), "{error:#}");
    }

    // 2. The agent's own slot detection.
    let fleet = fleet_with("", "");
    let flooders = [att_v4(40), att_v4(41)];
    let smtp = SocketAddr::new(IpAddr::V4(mx_v4(0)), 25);
    let warm = fleet.in_client(move || polite_session(smtp, legit, "mta.example.org", Duration::from_secs(3)));
    assert_eq!(warm.expect("client namespace"), Polite::Completed);
    let flood = {
        let fleet_flooders = flooders.to_vec();
        fleet.attacker().spawn(move || {
            let mut held = Vec::new();
            for _ in 0..12 {
                for &from in &fleet_flooders {
                    if let Ok(stream) = fleet::connect(smtp, Some(from), Duration::from_millis(300)) {
                        held.push(stream);
                    }
                }
            }
            // Held until the end of the test, at most 20 s.
            std::thread::sleep(Duration::from_secs(20));
            held.len()
        })
    };
    let blocked = fleet::wait_until(Duration::from_secs(15), || {
        let nft = fleet.nft_entries(0).unwrap_or_default();
        flooders.iter().all(|f| nft.contains(&f.to_string()))
    });
    let blocked_at = Instant::now();
    assert!(blocked, "the agent did not block the flooders:\n{}", fleet.agent_log_tail(0));
    let served = fleet
        .in_client(move || {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                if polite_session(smtp, legit, "mta.example.org", Duration::from_secs(2)) == Polite::Completed {
                    return Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        })
        .expect("client namespace");
    let served_at =
        served.unwrap_or_else(|| panic!("the client was not served within 5 s:\n{}", fleet.agent_log_tail(0)));
    let after = served_at.saturating_duration_since(blocked_at);
    println!("local block: the polite client was served {} ms after the block was seen", after.as_millis());
    assert!(after < Duration::from_secs(1), "{after:?}");
    // The flooders' sessions ended in Exim long before its receive timeout.
    let pid = fleet.hosts[0].exim.as_ref().and_then(|e| e.pid()).expect("exim pid");
    let drained = fleet::wait_until(Duration::from_secs(2), || exim::children(pid).is_empty());
    assert!(drained, "Exim still serves {:?} sessions after the block", exim::children(pid));
    let log = fleet.agent_log_tail(0);
    assert!(log.contains("Ended the established connections of a blocked range"), "{log}");
    // The polite client is blocked nowhere.
    assert!(!fleet.nft_entries(0).unwrap_or_default().contains(&legit.to_string()));
    assert!(fleet.blocks_ever(legit).expect("blocks").is_empty());
    drop(flood);
}
