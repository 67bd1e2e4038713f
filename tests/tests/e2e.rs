//! Whole-fleet end-to-end tests: Postgres, `fleetban-server`, three mail
//! hosts each with an SMTP listener writing an Exim log and a real
//! `fleetban-agent` with the nftables backend, an attacker and a legitimate
//! client, all in network namespaces (see `tests/src/fleet.rs`).
//!
//! They need root (namespaces, nftables). Without root they fail with a
//! message saying so. Each test prints its measured figures; run with
//! `cargo test -p fleetban-tests --test e2e -- --nocapture --test-threads 1`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use fleetban_tests::drill::failure_drills;
use fleetban_tests::fleet::{
    self, CLIENT, Fleet, FleetOptions, PROBE_TIMEOUT, att_v4, auth_failures, connect, mx_v4, smtp_banner,
};
use fleetban_tests::netns::is_root;

/// One fleet at a time: the machine is small and the figures are latencies.
static SERIAL: Mutex<()> = Mutex::new(());
static BINS: OnceLock<PathBuf> = OnceLock::new();

fn smtp(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(mx_v4(i)), 25)
}

fn start(options: FleetOptions) -> Fleet {
    assert!(
        is_root(),
        "the end-to-end tests need root (network namespaces and nftables); run them as root, e.g. \
         `sudo -E cargo test -p fleetban-tests --test e2e`"
    );
    let bins = BINS.get_or_init(|| fleet::binaries().unwrap_or_else(|error| panic!("{error:#}")));
    Fleet::start(bins.clone(), options).unwrap_or_else(|error| panic!("starting the fleet: {error:#}"))
}

/// Probes `hosts` from `from` every 20 ms until each refuses a TCP connect
/// (or `within` passed); returns the first refusal instant per host.
fn wait_blocked(fleet: &Fleet, from: IpAddr, hosts: Vec<usize>, within: Duration) -> Vec<Option<Instant>> {
    fleet
        .in_attacker(move || {
            let mut first: Vec<Option<Instant>> = vec![None; hosts.len()];
            let deadline = Instant::now() + within;
            while Instant::now() < deadline && first.iter().any(Option::is_none) {
                for (k, &i) in hosts.iter().enumerate() {
                    if first[k].is_none() {
                        let t = Instant::now();
                        if connect(smtp(i), Some(from), PROBE_TIMEOUT).is_err() {
                            first[k] = Some(t);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            first
        })
        .expect("attacker thread")
}

/// Probes until every host in `hosts` answers `from` with a banner; returns
/// the instant all did.
fn wait_open(fleet: &Fleet, from: IpAddr, hosts: Vec<usize>, within: Duration) -> Option<Instant> {
    fleet
        .in_attacker(move || {
            let mut open = vec![false; hosts.len()];
            let deadline = Instant::now() + within;
            while Instant::now() < deadline {
                for (k, &i) in hosts.iter().enumerate() {
                    if !open[k] {
                        open[k] = smtp_banner(smtp(i), Some(from)).is_ok();
                    }
                }
                if open.iter().all(|&o| o) {
                    return Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
        .expect("attacker thread")
}

/// The legitimate client gets a `220` banner from every host, retrying like
/// a mail server would (every 500 ms, not in a tight loop that would itself
/// look like abuse).
fn client_reaches_all(fleet: &Fleet, within: Duration) -> bool {
    fleet
        .in_client(move || {
            let deadline = Instant::now() + within;
            (0..3).all(|i| {
                loop {
                    if smtp_banner(smtp(i), Some(IpAddr::V4(CLIENT))).is_ok() {
                        break true;
                    }
                    if Instant::now() > deadline {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .expect("client thread")
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Scenario 1: slot-exhaustion flood on mx1 → mx1 drops the attacker within
/// 1 s, mx2 and mx3 within 1 s more; the legitimate client is never hurt.
#[test]
fn flood_is_blocked_locally_then_fleet_wide() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The alarm fires when the slots are full, not before; the rate rule stays out of the way.
    let fleet =
        start(FleetOptions { detect: "slot_alarm_ratio = 1.0\nconn_rate = 1000\n".into(), ..FleetOptions::default() });
    let attacker = att_v4(10);
    // Flood mx1: at most 200 connects in at most 15 s, held open, until one fails.
    let (full_at, blocked_at, held) = fleet
        .in_attacker(move || {
            let mut held = Vec::new();
            let mut full_at = None;
            let started = Instant::now();
            for _ in 0..200 {
                if started.elapsed() > Duration::from_secs(15) {
                    break;
                }
                let t = Instant::now();
                match connect(smtp(0), Some(attacker), PROBE_TIMEOUT) {
                    Ok(stream) => {
                        held.push(stream);
                        if held.len() == 20 {
                            full_at = Some(Instant::now());
                        }
                    }
                    Err(_) => return (full_at, Some(t), held),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (full_at, None, held)
        })
        .expect("attacker thread");
    let full_at = full_at.expect("the flood filled mx1's 20 slots");
    let Some(local_at) = blocked_at else {
        panic!("mx1 never dropped the flooding address\n{}", fleet.agent_log_tail(0));
    };
    let fleet_first = wait_blocked(&fleet, attacker, vec![1, 2], Duration::from_secs(5));
    drop(held);
    assert!(fleet.nft_entries(0).expect("nft").contains("198.51.100.10"), "mx1's nft set holds the attacker");
    let detect_to_local = local_at.saturating_duration_since(full_at);
    let fleet_at = fleet_first.iter().flatten().max().copied();
    assert!(
        fleet_first.iter().all(Option::is_some),
        "mx2/mx3 never dropped the attacker: {fleet_first:?}\nserver:\n{}\nmx2:\n{}",
        fleet.server_log_tail(),
        fleet.agent_log_tail(1)
    );
    let local_to_fleet = fleet_at.map(|t| t.saturating_duration_since(local_at)).unwrap_or_default();
    println!(
        "e2e flood: slots full -> mx1 drops attacker {} ms; mx1 block -> mx2+mx3 drop it {} ms",
        ms(detect_to_local),
        ms(local_to_fleet)
    );
    assert!(detect_to_local <= Duration::from_secs(1), "local block took {detect_to_local:?}");
    assert!(local_to_fleet <= Duration::from_secs(1), "fleet block took {local_to_fleet:?}");
    // The legitimate client still gets a banner everywhere (mx1 once the
    // dropped attacker's connections time out in Exim).
    assert!(client_reaches_all(&fleet, Duration::from_secs(8)), "the legitimate client was refused");
}

/// Four failed logins of four users on one host: below every host's own
/// thresholds (10 failures, 5 users).
fn spray(host: usize, from: IpAddr) -> std::io::Result<()> {
    let users: Vec<String> = (0..4).map(|k| format!("user{host}{k}@example.test")).collect();
    auth_failures(smtp(host), from, &users)
}

/// Scenario 2: password spraying on every host, each below the local
/// thresholds (10 failures, 5 users) → a fleet block by correlation (12
/// distinct users across the fleet, the fleet's bar is 7).
#[test]
fn distributed_brute_force_is_blocked_by_correlation() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = start(FleetOptions::default());
    let attacker = att_v4(20);
    let sent = fleet
        .in_attacker(move || {
            for host in 0..3 {
                spray(host, attacker)?;
            }
            Ok::<_, std::io::Error>(Instant::now())
        })
        .expect("attacker thread")
        .expect("the AUTH attempts ran");
    let first = wait_blocked(&fleet, attacker, vec![0, 1, 2], Duration::from_secs(10));
    assert!(
        first.iter().all(Option::is_some),
        "not blocked everywhere: {first:?}\nserver:\n{}",
        fleet.server_log_tail()
    );
    let block = fleet.live_block(attacker).expect("query").expect("a live block");
    assert_eq!(block.2, "auto", "the block comes from correlation, not a local block: {block:?}");
    let all = first.iter().flatten().max().copied().unwrap_or(sent);
    println!(
        "e2e brute force: last failed AUTH -> blocked on all 3 hosts {} ms (block {})",
        ms(all.saturating_duration_since(sent)),
        block.1
    );
}

/// Scenario 3: four addresses of one /24 blocked → the /24 on every host,
/// and a fifth address of it, never seen, is refused.
#[test]
fn four_addresses_escalate_to_the_prefix() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = start(FleetOptions::default());
    let attackers: Vec<IpAddr> = [31, 32, 33, 34].into_iter().map(att_v4).collect();
    let sent = fleet
        .in_attacker(move || {
            let users: Vec<String> = (0..5).map(|_| "admin@example.test".to_owned()).collect();
            for (k, &a) in attackers.iter().enumerate() {
                auth_failures(smtp(k % 3), a, &users)?;
            }
            Ok::<_, std::io::Error>(Instant::now())
        })
        .expect("attacker thread")
        .expect("the AUTH attempts ran");
    let fifth = att_v4(35);
    let first = wait_blocked(&fleet, fifth, vec![0, 1, 2], Duration::from_secs(10));
    assert!(
        first.iter().all(Option::is_some),
        "the unseen fifth address is not refused everywhere: {first:?}\nserver:\n{}",
        fleet.server_log_tail()
    );
    let block = fleet.live_block(fifth).expect("query").expect("a live block");
    assert_eq!(block.1, "198.51.100.0/24");
    for i in 0..3 {
        let held = fleet::wait_until(Duration::from_secs(3), || {
            // /24 blocks live in the set of /24 prefixes, as their network address.
            fleet.nft_set(i, "v4_24").unwrap_or_default().contains("198.51.100.0")
        });
        assert!(held, "mx{} does not hold the /24:\n{}", i + 1, fleet.nft_entries(i).unwrap_or_default());
    }
    assert!(client_reaches_all(&fleet, Duration::from_secs(3)), "the legitimate client was refused");
    let all = first.iter().flatten().max().copied().unwrap_or(sent);
    println!(
        "e2e prefix: fourth address's last failed AUTH -> /24 refused on all 3 hosts {} ms",
        ms(all.saturating_duration_since(sent))
    );
}

/// Scenario 4: unblocking reaches every host within 1 s; an allowlisted
/// address that attacks is never blocked.
#[test]
fn unblock_and_allowlist() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let allowed = att_v4(41);
    let fleet = start(FleetOptions { agent_allowlist: vec![format!("{allowed}/32")], ..FleetOptions::default() });
    fleet.allowlist(&format!("{allowed}/32")).expect("allowlist");

    // A fleet block by correlation, then its deletion.
    let attacker = att_v4(40);
    fleet
        .in_attacker(move || (0..3).try_for_each(|host| spray(host, attacker)))
        .expect("attacker thread")
        .expect("the AUTH attempts ran");
    let first = wait_blocked(&fleet, attacker, vec![0, 1, 2], Duration::from_secs(10));
    assert!(first.iter().all(Option::is_some), "not blocked everywhere: {first:?}");
    let (id, _, _) = fleet.live_block(attacker).expect("query").expect("a live block");
    let token = fleet.admin_token().expect("admin API token");
    let revoked_at = Instant::now();
    fleet.unblock_via_api(&token, id).expect("unblock through the REST API");
    let open_at = wait_open(&fleet, attacker, vec![0, 1, 2], Duration::from_secs(5));
    let Some(open_at) = open_at else {
        panic!(
            "the unblocked address is still refused somewhere\nmx1 nft:\n{}",
            fleet.nft_entries(0).unwrap_or_default()
        );
    };
    let unblock = open_at.saturating_duration_since(revoked_at);
    println!("e2e unblock: block deleted -> all 3 hosts accept the address {} ms", ms(unblock));
    assert!(unblock <= Duration::from_secs(1), "unblock took {unblock:?}");

    // The allowlisted address brute-forces every host, well past every threshold.
    fleet
        .in_attacker(move || {
            let users: Vec<String> = (0..8).map(|k| format!("user{k}@example.test")).collect();
            for i in 0..3 {
                auth_failures(smtp(i), allowed, &users)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .expect("attacker thread")
        .expect("the AUTH attempts ran");
    // First the positive signal: every host's agent has stored the attack
    // (its 24 failed logins), so correlation has
    // judged it; then the absence.
    let stored = fleet::wait_until(Duration::from_secs(10), || fleet.stored_events(allowed).unwrap_or(0) >= 24);
    assert!(stored, "the allowlisted address's attack was not stored: {:?}", fleet.stored_events(allowed));
    std::thread::sleep(Duration::from_millis(500));
    assert!(fleet.live_block(allowed).expect("query").is_none(), "a block covers the allowlisted address");
    for i in 0..3 {
        assert!(
            !fleet.nft_entries(i).expect("nft").contains("198.51.100.41"),
            "mx{} holds the allowlisted address",
            i + 1
        );
    }
    assert!(
        wait_open(&fleet, allowed, vec![0, 1, 2], Duration::from_secs(1)).is_some(),
        "the allowlisted address is refused"
    );
    println!("e2e allowlist: allowlisted address after 24 failed logins on 3 hosts: never blocked");
}

/// Scenario 5: kill -9 an agent, kill -9 the server, restart Postgres and
/// cut a host's link for 30 s, each in the middle of traffic: every connect
/// line is stored exactly once, and the firewalls converge on the
/// blocklist. The agents aggregate context (2 s intervals, so summaries
/// arrive soon), so connects are counted in summaries: the drill compares
/// the connect lines of the client in the log with the connects stored for
/// it (single events and summaries), which a line lost or counted twice
/// across the kill -9 (the replay of open summaries) would change.
#[test]
fn failure_drills_lose_and_duplicate_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut fleet = start(FleetOptions {
        agent_allowlist: vec!["203.0.113.0/24".into(), "192.0.2.0/24".into()],
        aggregate: "interval_secs = 2".into(),
        ..FleetOptions::default()
    });
    fleet.allowlist("203.0.113.0/24").expect("allowlist");
    let failures = failure_drills(&mut fleet, "e2e");
    assert!(
        failures.is_empty(),
        "failed drills: {failures:?}\nserver:\n{}\nmx1:\n{}",
        fleet.server_log_tail(),
        fleet.agent_log_tail(0)
    );
}
