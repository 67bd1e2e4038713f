//! Decisions that never block legitimate mail, against real Exim.
//!
//! Two mail hosts (`mx1`, `mx2`), each a real Exim 4.96 daemon
//! (`smtp_accept_max = 20`, `smtp_receive_timeout = 10s`, cPanel's log
//! selectors; tests/src/exim.rs) and a real `fleetban-agent run` with the
//! nftables backend, a `fleetban-server`, an attacker namespace and a
//! legitimate MTA's namespace (tests/src/fleet.rs).
//!
//! Three attacker addresses each open and hold up to 15 connections to both
//! hosts at once (until they are blocked, at most 60 s), so every slot is
//! taken and Exim refuses the rest. Meanwhile a legitimate MTA delivers the
//! way a polite one does, once a second to each host: banner, `EHLO`, `QUIT`
//! (Exim logs `closed by QUIT`); while the hosts are full it is refused, as
//! everyone is. The flooders hold open sessions and must be blocked on both
//! hosts; the MTA's sessions all ended, it never holds a slot, and it must
//! never be blocked, on either host or in the server's blocks table. Once
//! the flooders are blocked (and their held sessions time out in Exim) the
//! MTA completes a session on both hosts again.
//!
//! Needs root (namespaces, nftables) and Exim (`exim4-daemon-heavy`);
//! without either it fails and says so. Run with
//! `cargo test -p fleetban-tests --test exim_flood -- --nocapture`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetban_tests::exim::{self, EximOptions, Polite, polite_session};
use fleetban_tests::fleet::{self, CLIENT, Fleet, FleetOptions, Mta, att_v4, connect, mx_v4};
use fleetban_tests::netns::is_root;

/// The mail hosts.
const HOSTS: usize = 2;
/// Connections each flooder opens to each host.
const PER_FLOODER: usize = 15;
/// Longest a flooder holds its connections.
const HOLD: Duration = Duration::from_secs(60);

fn smtp(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(mx_v4(i)), 25)
}

fn flooders() -> Vec<IpAddr> {
    [46, 47, 48].into_iter().map(att_v4).collect()
}

/// One polite session of the legitimate MTA.
#[derive(Debug, Clone)]
struct Attempt {
    at: Instant,
    host: usize,
    outcome: Polite,
}

/// Whether host `i`'s nft table holds `addr`.
fn nft_holds(fleet: &Fleet, i: usize, addr: IpAddr) -> bool {
    fleet.nft_entries(i).unwrap_or_default().contains(&addr.to_string())
}

/// The highest `TCP/IP connection count` in an Exim main log.
fn peak_count(log: &str) -> u32 {
    log.lines()
        .filter_map(|l| l.split("(TCP/IP connection count = ").nth(1))
        .filter_map(|rest| rest.trim_end_matches(')').parse().ok())
        .max()
        .unwrap_or(0)
}

fn completed_since(log: &Mutex<Vec<Attempt>>, host: usize, since: Instant) -> bool {
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|a| a.host == host && a.at >= since && a.outcome == Polite::Completed)
}

#[test]
fn flooders_are_blocked_and_a_polite_mta_never_is() {
    assert!(
        is_root(),
        "this test needs root (network namespaces and nftables); run it as root, e.g. \
         `sudo -E cargo test -p fleetban-tests --test exim_flood`"
    );
    exim::binary().unwrap_or_else(|error| panic!("{error}"));
    let bins = fleet::binaries().unwrap_or_else(|error| panic!("{error:#}"));
    let options = FleetOptions {
        hosts: HOSTS,
        mta: Mta::Exim(EximOptions { receive_timeout_secs: 10, ..EximOptions::default() }),
        smtp_accept_max: 20,
        ..FleetOptions::default()
    };
    let fleet = Fleet::start(bins, options).unwrap_or_else(|error| panic!("starting the fleet: {error:#}"));
    let legit = IpAddr::V4(CLIENT);
    let flooders = flooders();

    // The legitimate MTA: a polite session to each host once a second, at
    // most 150 rounds or 150 s, until told to stop.
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let stop_mta = Arc::new(AtomicBool::new(false));
    let mta = {
        let (attempts, stop) = (Arc::clone(&attempts), Arc::clone(&stop_mta));
        fleet.client().spawn(move || {
            let started = Instant::now();
            for _ in 0..150 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(150) {
                    break;
                }
                for host in 0..HOSTS {
                    let outcome = polite_session(smtp(host), legit, "mta.example.org", Duration::from_secs(3));
                    attempts.lock().unwrap_or_else(|e| e.into_inner()).push(Attempt {
                        at: Instant::now(),
                        host,
                        outcome,
                    });
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // The MTA is a recent, frequent sender on both hosts before the flood:
    // a rule that counted recent connects instead of open sessions would
    // take it for a slot holder.
    let warm = fleet::wait_until(Duration::from_secs(20), || {
        (0..HOSTS).all(|h| {
            attempts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|a| a.host == h && a.outcome == Polite::Completed)
                .count()
                >= 3
        })
    });
    assert!(
        warm,
        "the MTA did not complete 3 sessions per host before the flood: {:?}",
        attempts.lock().map(|a| a.clone())
    );

    // The flood: every flooder opens PER_FLOODER connections to both hosts
    // at once and holds them until told to stop (at most HOLD).
    let stop_flood = Arc::new(AtomicBool::new(false));
    let flood_at = Instant::now();
    let mut floods = Vec::new();
    for &from in &flooders {
        for host in 0..HOSTS {
            let stop = Arc::clone(&stop_flood);
            floods.push(fleet.attacker().spawn(move || {
                let mut held = Vec::new();
                let mut failed = 0;
                for _ in 0..PER_FLOODER {
                    match connect(smtp(host), Some(from), Duration::from_secs(1)) {
                        Ok(stream) => held.push(stream),
                        Err(_) => failed += 1,
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let opened = held.len();
                while !stop.load(Ordering::Relaxed) && flood_at.elapsed() < HOLD {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(held);
                (from, host, opened, failed)
            }));
        }
    }

    // Positive signal: every flooder in both hosts' nft sets (at most 30 s).
    let blocked = fleet::wait_until(Duration::from_secs(30), || {
        (0..HOSTS).all(|i| {
            let nft = fleet.nft_entries(i).unwrap_or_default();
            flooders.iter().all(|f| nft.contains(&f.to_string()))
        })
    });
    let blocked_at = Instant::now();
    let report = |what: &str| {
        format!(
            "{what}\nmx1 nft:\n{}\nmx2 nft:\n{}\nmx1 agent:\n{}\nmx2 agent:\n{}\nserver:\n{}",
            fleet.nft_entries(0).unwrap_or_default(),
            fleet.nft_entries(1).unwrap_or_default(),
            fleet.agent_log_tail(0),
            fleet.agent_log_tail(1),
            fleet.server_log_tail()
        )
    };
    if !blocked {
        stop_flood.store(true, Ordering::Relaxed);
        stop_mta.store(true, Ordering::Relaxed);
        panic!("{}", report("the flooders were not all blocked on both hosts within 30 s"));
    }
    // The flood really took the slots: on some host Exim counted at least
    // 18 of its 20 connections at once (the agents' alarm level; they block
    // from there on, so Exim may never have to refuse anyone).
    let peaks: Vec<u32> =
        fleet.hosts.iter().map(|h| h.exim.as_ref().map_or(0, |e| peak_count(&e.main_log_text()))).collect();
    assert!(peaks.iter().any(|&p| p >= 18), "{}", report(&format!("the flood never filled a host: peaks {peaks:?}")));
    // The server has what the agents reported: a block for every flooder
    // (so a block of the MTA, had an agent made one, would be there too).
    let stored = fleet::wait_until(Duration::from_secs(10), || {
        flooders.iter().all(|&f| fleet.live_block(f).ok().flatten().is_some())
    });
    assert!(stored, "{}", report("the server holds no block for some flooder"));

    // The MTA tried both hosts while the flood held its connections (it is
    // refused while the flooders' sessions fill the slots; at most 10 s).
    let tried = fleet::wait_until(Duration::from_secs(10), || {
        let attempts = attempts.lock().unwrap_or_else(|e| e.into_inner());
        (0..HOSTS).all(|h| attempts.iter().any(|a| a.host == h && a.at >= flood_at))
    });
    assert!(tried, "the MTA made no attempt on both hosts during the flood");

    // Absence: the MTA is blocked nowhere.
    for i in 0..HOSTS {
        assert!(!nft_holds(&fleet, i, legit), "{}", report(&format!("mx{} blocked the legitimate MTA", i + 1)));
    }
    let ever = fleet.blocks_ever(legit).expect("query blocks");
    assert!(ever.is_empty(), "the server blocked the legitimate MTA: {ever:?}");

    stop_flood.store(true, Ordering::Relaxed);
    let flood_end = Instant::now();
    let mut opened = Vec::new();
    for flood in floods {
        opened.push(flood.join().expect("flooder thread").expect("attacker namespace"));
    }

    // Once the flooders' held sessions time out in Exim, the MTA gets
    // through on both hosts: 220, EHLO 250, QUIT 221 (at most 45 s).
    let through =
        fleet::wait_until(Duration::from_secs(45), || (0..HOSTS).all(|h| completed_since(&attempts, h, blocked_at)));
    let through_at = Instant::now();
    stop_mta.store(true, Ordering::Relaxed);
    mta.join().expect("MTA thread").expect("client namespace");
    let attempts = attempts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        through,
        "{}",
        report(&format!(
            "the MTA did not complete a session on both hosts after the flooders were blocked: {:?}",
            attempts.iter().filter(|a| a.at >= blocked_at).collect::<Vec<_>>()
        ))
    );

    // And still blocked nowhere at the end.
    for i in 0..HOSTS {
        assert!(!nft_holds(&fleet, i, legit), "{}", report(&format!("mx{} blocked the legitimate MTA", i + 1)));
        for &f in &flooders {
            assert!(nft_holds(&fleet, i, f), "mx{} no longer holds flooder {f}", i + 1);
        }
    }
    let ever = fleet.blocks_ever(legit).expect("query blocks");
    assert!(ever.is_empty(), "the server blocked the legitimate MTA: {ever:?}");

    let during = attempts.iter().filter(|a| a.at >= flood_at && a.at < flood_end).count();
    let refused = attempts.iter().filter(|a| matches!(a.outcome, Polite::Refused(_))).count();
    let completed = attempts.iter().filter(|a| a.outcome == Polite::Completed).count();
    println!(
        "exim flood: peak connection counts {peaks:?}; flooders' connections opened (addr, host, opened, failed) {opened:?}; \
         all 3 blocked on both hosts {} ms after the flood began; MTA sessions: {} in all, {completed} completed, {refused} refused, \
         {during} while the flooders held their connections, never blocked; through again on both hosts {} ms after the block",
        blocked_at.saturating_duration_since(flood_at).as_millis(),
        attempts.len(),
        through_at.saturating_duration_since(blocked_at).as_millis()
    );
}
