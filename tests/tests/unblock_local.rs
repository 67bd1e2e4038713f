//! An operator's unblock wins on every host, including the one whose own
//! detection made the block: the fleet in network namespaces (server, three
//! hosts with real agents and nftables, an attacker; `tests/src/fleet.rs`),
//! a brute force that mx1 blocks on its own, then `fleetban unblock ADDRESS`.
//!
//! Needs root (namespaces, nftables); without root it fails and says so.
//! `cargo test -p fleetban-tests --test unblock_local -- --nocapture`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fleetban_tests::fleet::{self, Fleet, FleetOptions, att_v4, auth_failures, mx_v4, smtp_banner};
use fleetban_tests::netns::is_root;

/// One fleet at a time: the figures are latencies on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn smtp(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(mx_v4(i)), 25)
}

fn start() -> Fleet {
    assert!(
        is_root(),
        "the end-to-end tests need root (network namespaces and nftables); run them as root, e.g. \
         `sudo -E cargo test -p fleetban-tests --test unblock_local`"
    );
    let bins = fleet::binaries().unwrap_or_else(|error| panic!("{error:#}"));
    Fleet::start(bins, FleetOptions::default()).unwrap_or_else(|error| panic!("starting the fleet: {error:#}"))
}

/// `n` failed logins of one user from `from` on mx1, in one session.
fn fail_logins(fleet: &Fleet, from: IpAddr, n: usize) {
    let users: Vec<String> = (0..n).map(|_| "admin@example.test".to_owned()).collect();
    fleet
        .in_attacker(move || auth_failures(smtp(0), from, &users))
        .expect("attacker thread")
        .expect("the AUTH attempts ran");
}

fn held_by(fleet: &Fleet, i: usize, addr: &str) -> bool {
    fleet.nft_entries(i).unwrap_or_default().contains(addr)
}

#[test]
fn unblock_removes_a_locally_detected_block_everywhere_and_old_evidence_does_not_return_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = start();
    let attacker = att_v4(47);
    let text = attacker.to_string();

    // mx1 blocks the brute force on its own evidence (10 failures of one
    // user is its per-host threshold), and the fleet follows.
    fail_logins(&fleet, attacker, 10);
    let everywhere = fleet::wait_until(Duration::from_secs(10), || (0..3).all(|i| held_by(&fleet, i, &text)));
    assert!(everywhere, "the brute force was not blocked everywhere\nmx1:\n{}", fleet.agent_log_tail(0));
    assert!(
        fleet.agent_log_tail(0).contains("Blocked locally."),
        "mx1 did not block on its own evidence:\n{}",
        fleet.agent_log_tail(0)
    );
    let (id, cidr, source) = fleet.live_block(attacker).expect("query").expect("a live fleet block");
    assert_eq!(cidr, format!("{attacker}/32"));

    // The operator unblocks the address.
    let token = fleet.admin_token().expect("admin API token");
    let unblocked_at = Instant::now();
    let unblocked_ms = fleetban_agent::firewall::now_ms();
    let (ok, out, err) = fleet.cli(&token, &["unblock", &text]).expect("fleetban unblock");
    assert!(ok && out.contains(&format!("block {id}")), "fleetban unblock {text}: {out}{err}");
    let gone = fleet::wait_until(Duration::from_secs(5), || (0..3).all(|i| !held_by(&fleet, i, &text)));
    let took = unblocked_at.elapsed();
    assert!(
        gone,
        "the address is still in a host's kernel set after the unblock\nmx1 nft:\n{}\nmx1 log:\n{}",
        fleet.nft_entries(0).unwrap_or_default(),
        fleet.agent_log_tail(0)
    );
    println!(
        "e2e unblock of a local block ({source} block {id}): fleetban unblock -> gone from all 3 kernel sets \
         {} ms",
        took.as_millis()
    );
    assert!(took <= Duration::from_secs(1), "the unblock took {took:?}");
    assert!(
        fleet.agent_log_tail(0).contains("Local block dropped: an operator revoked it."),
        "mx1 did not drop its own block:\n{}",
        fleet.agent_log_tail(0)
    );

    // One more failure: with the evidence from before the unblock it would
    // be over mx1's threshold and the fleet's per-host bar; alone it is not.
    fail_logins(&fleet, attacker, 1);
    let stored = fleet::wait_until(Duration::from_secs(10), || fleet.stored_events(attacker).unwrap_or(0) >= 11);
    assert!(stored, "the failure after the unblock was not stored: {:?}", fleet.stored_events(attacker));
    // A full reconcile on mx1 after the failure was stored: the firewall is
    // compared with its desired set again, not just with the last commit.
    let stored_ms = fleetban_agent::firewall::now_ms();
    let reconciled = fleet::wait_until(Duration::from_secs(15), || {
        fleet.agent_last_reconcile_ms(0).is_some_and(|at| at > stored_ms && at > unblocked_ms)
    });
    assert!(reconciled, "mx1 reported no full reconcile after the unblock");
    assert!(fleet.live_block(attacker).expect("query").is_none(), "old evidence blocked the address again");
    for i in 0..3 {
        assert!(!held_by(&fleet, i, &text), "mx{} holds the address again", i + 1);
    }

    // New evidence after the unblock still counts: a new burst blocks again.
    fail_logins(&fleet, attacker, 10);
    let again = fleet::wait_until(Duration::from_secs(10), || held_by(&fleet, 0, &text));
    assert!(again, "a new burst after the unblock was not blocked\nmx1:\n{}", fleet.agent_log_tail(0));
}

/// Whether `from` gets a banner from every host (true) or from none (false),
/// probing every 20 ms for at most `within`; the time from `started` until
/// it did, `None` if neither settled.
fn settles_since(fleet: &Fleet, from: IpAddr, open: bool, started: Instant, within: Duration) -> Option<Duration> {
    fleet
        .in_attacker(move || {
            while started.elapsed() < within {
                let reached = (0..3).filter(|&i| smtp_banner(smtp(i), Some(from)).is_ok()).count();
                if (open && reached == 3) || (!open && reached == 0) {
                    return Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
        .expect("attacker thread")
}

fn settles(fleet: &Fleet, from: IpAddr, open: bool, within: Duration) -> Option<Duration> {
    settles_since(fleet, from, open, Instant::now(), within)
}

/// `unblock ADDRESS --carve` under a /24 opens the address on every host
/// within the budget while the rest of the /24 stays blocked; `unallow`
/// puts the /24 back in force for it.
#[test]
fn carve_exempts_an_address_from_a_covering_block_and_unallow_restores_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = start();
    let token = fleet.admin_token().expect("admin API token");
    let (inside, neighbour) = (att_v4(48), att_v4(46));
    let (ok, out, err) =
        fleet.cli(&token, &["block", "198.51.100.0/24", "--ttl", "1h", "--reason", "campaign"]).expect("fleetban");
    assert!(ok, "{out}{err}");
    assert!(settles(&fleet, inside, false, Duration::from_secs(5)).is_some(), "the /24 is not enforced everywhere");

    // Without --carve the answer names the covering block.
    let (ok, out, err) = fleet.cli(&token, &["unblock", &inside.to_string()]).expect("fleetban");
    assert!(!ok && err.contains("covered by block") && err.contains("198.51.100.0/24"), "{out}{err}");

    let carved_at = Instant::now();
    let (ok, out, err) = fleet.cli(&token, &["unblock", &inside.to_string(), "--carve", "--yes"]).expect("fleetban");
    assert!(ok && out.contains("Exempted 198.51.100.48/32"), "{out}{err}");
    let opened = settles_since(&fleet, inside, true, carved_at, Duration::from_secs(5));
    let Some(opened) = opened else {
        panic!("the carved address is still refused somewhere\nmx1 nft:\n{}", fleet.nft_entries(0).unwrap_or_default());
    };
    println!("e2e carve: fleetban unblock --carve -> the address reaches all 3 hosts {} ms", opened.as_millis());
    assert!(opened <= Duration::from_secs(1), "the carve took {opened:?}");
    assert_eq!(
        settles(&fleet, neighbour, false, Duration::from_millis(200)).map(|_| ()),
        Some(()),
        "the rest of the /24 stays blocked"
    );

    // Unallow: the /24 covers it again.
    let unallowed_at = Instant::now();
    let (ok, out, err) = fleet.cli(&token, &["unallow", &format!("{inside}/32"), "--yes"]).expect("fleetban");
    assert!(ok, "{out}{err}");
    let closed = settles_since(&fleet, inside, false, unallowed_at, Duration::from_secs(5));
    println!("e2e unallow: fleetban unallow -> the /24 refuses the address on all 3 hosts again {closed:?}");
    assert!(closed.is_some_and(|t| t <= Duration::from_secs(1)), "unallow did not restore the /24: {closed:?}");
}
