//! The failure drills, their traffic and their accounting, shared by the
//! end-to-end tests (`tests/tests/e2e.rs` with one server,
//! `tests/tests/replicas.rs` with replicas behind HAProxy).
//!
//! Drill traffic binds a distinct source port per SMTP session, so the
//! `[ip]:port` of a connect line in a host's Exim log tells the drills
//! apart; the accounting compares the connect lines a host's log holds with
//! the connects its agent stored (single events and context summaries).
//! Both sides are counted in one place each: [`Fleet::written_connects`]
//! reads the log and [`Fleet::stored_connects`] queries the store.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fleet::{self, Fleet};
use crate::netns::{Netns, NetnsError};

/// Polite sessions (banner, `QUIT`) from `from` to `to`, one per source
/// port of `ports`, one every `pace`, for at most `max_time`; the thread
/// returns how many completed.
pub fn traffic(
    ns: &Netns,
    from: IpAddr,
    to: SocketAddr,
    ports: Range<u16>,
    pace: Duration,
    max_time: Duration,
) -> JoinHandle<Result<usize, NetnsError>> {
    ns.spawn(move || {
        let started = Instant::now();
        let mut ok = 0;
        for port in ports {
            if started.elapsed() > max_time {
                break;
            }
            if fleet::smtp_quit(to, SocketAddr::new(from, port), Duration::from_millis(300)).is_ok() {
                ok += 1;
            }
            std::thread::sleep(pace);
        }
        ok
    })
}

/// (written, stored, lost, duplicated, catch-up time): connect lines in the
/// log during this drill, connects stored for them, lines missing from the
/// store, connects stored beyond the lines, and how long after the
/// accounting started the store was complete.
pub type Accounting = (i64, i64, i64, i64, Duration);

/// Waits until host `i` stored as many connects from `remote` (single
/// events and context summaries, every drill so far) as its log holds
/// connect lines from it, or `within` passed, and returns the
/// [`Accounting`] of the sessions with a source port in `ports` (this
/// drill's). Agents summarise connects per address and interval, so the
/// comparison is of totals: a line lost or counted twice (a kill -9 in the
/// middle of an open interval, a batch resent to another replica) changes
/// the total.
pub fn account(fleet: &Fleet, i: usize, remote: IpAddr, ports: Range<u16>, within: Duration) -> Accounting {
    let this_drill: i64 = fleet.written_connects(i, remote, ports).unwrap_or_default().values().sum();
    let written: i64 = fleet.written_connects(i, remote, 0..u16::MAX).unwrap_or_default().values().sum();
    let started = Instant::now();
    let deadline = started + within;
    loop {
        let stored = fleet.stored_connects(i, remote).unwrap_or_default();
        let (lost, dup) = ((written - stored).max(0), (stored - written).max(0));
        // Past the deadline a surplus is final; a shortfall may still come.
        if (lost == 0 && dup == 0) || Instant::now() > deadline {
            return (this_drill, this_drill - lost + dup, lost, dup, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every live block is in every host's nftables (or `within`
/// passed); returns how long it took.
pub fn converge(fleet: &Fleet, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let cidrs = fleet.live_cidrs().unwrap_or_default();
        let ok = (0..fleet.hosts.len()).all(|i| {
            let nft = fleet.nft_entries(i).unwrap_or_default();
            cidrs.iter().all(|c| nft.contains(c.trim_end_matches("/32")))
        });
        if ok {
            return Some(started.elapsed());
        }
        if started.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn smtp(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(fleet::mx_v4(i)), 25)
}

/// One session every 5 ms, bounded by `ports` and `max_time`.
fn drill_traffic(
    ns: &Netns,
    from: IpAddr,
    to: SocketAddr,
    ports: Range<u16>,
    max_time: Duration,
) -> JoinHandle<Result<usize, NetnsError>> {
    traffic(ns, from, to, ports, Duration::from_millis(5), max_time)
}

/// The failure drills, each in the middle of traffic to mx1: kill -9 its
/// agent, kill -9 the server (with replicas, the one mx1's agent is
/// connected to), restart Postgres, cut mx1's link for 30 s. After each,
/// every connect line is stored exactly once (by its source port) and the
/// firewalls converge on the blocklist. Prints one line per drill prefixed
/// `label`; returns the names of the drills that failed.
///
/// The fleet must allowlist the client (203.0.113.0/24) and the segment
/// (192.0.2.0/24) at the agents, and the client at the server: the traffic
/// runs at 200 sessions a second.
pub fn failure_drills(fleet: &mut Fleet, label: &str) -> Vec<String> {
    let client = IpAddr::V4(fleet::CLIENT);
    let mut failures = Vec::new();
    let mut report = |name: &str, (written, stored, lost, dup, caught_up): Accounting, conv: Option<Duration>| {
        println!(
            "{label} drill {name}: lines written {written}, events stored {stored}, lost {lost}, duplicated {dup}; \
             store complete {} ms after the traffic ended; firewalls converged {}",
            caught_up.as_millis(),
            conv.map_or("NEVER".to_owned(), |d| format!("{} ms later", d.as_millis()))
        );
        if lost != 0 || dup != 0 || written == 0 || conv.is_none() {
            failures.push(name.to_owned());
        }
    };

    // 1. kill -9 mx1's agent mid-traffic; a block is made while it is down.
    let ports = 20000..21000;
    let traffic = drill_traffic(fleet.client(), client, smtp(0), ports.clone(), Duration::from_secs(6));
    std::thread::sleep(Duration::from_secs(1));
    fleet.hosts[0].agent.kill9();
    fleet.manual_block("198.51.100.42/32").expect("block");
    std::thread::sleep(Duration::from_secs(1));
    fleet.start_agent(0).expect("restart agent");
    traffic.join().expect("traffic thread").expect("namespace");
    let acc = account(fleet, 0, client, ports, Duration::from_secs(30));
    report("kill -9 agent", acc, converge(fleet, Duration::from_secs(10)));

    // 2. kill -9 the server (mx1's replica) mid-traffic.
    let ports = 21000..22000;
    let traffic = drill_traffic(fleet.client(), client, smtp(0), ports.clone(), Duration::from_secs(6));
    std::thread::sleep(Duration::from_secs(1));
    if fleet.cluster.is_some() {
        let replicas = fleet.agent_replicas().expect("HAProxy sessions");
        let replica = replicas[0].first().copied().expect("mx1's agent holds a session through HAProxy");
        println!("{label} drill kill -9 server: mx1's agent is on replica {replica} (agents on {replicas:?})");
        fleet.kill_replica(replica).expect("kill replica");
    } else {
        fleet.server.kill9();
    }
    std::thread::sleep(Duration::from_secs(2));
    fleet.start_server().expect("restart server");
    fleet.manual_block("198.51.100.43/32").expect("block");
    traffic.join().expect("traffic thread").expect("namespace");
    let acc = account(fleet, 0, client, ports, Duration::from_secs(40));
    report("kill -9 server", acc, converge(fleet, Duration::from_secs(10)));

    // 3. restart Postgres mid-traffic.
    let ports = 22000..23000;
    let traffic = drill_traffic(fleet.client(), client, smtp(0), ports.clone(), Duration::from_secs(6));
    std::thread::sleep(Duration::from_secs(1));
    fleet.set_postgres(false).expect("stop postgres");
    std::thread::sleep(Duration::from_secs(2));
    fleet.set_postgres(true).expect("start postgres");
    traffic.join().expect("traffic thread").expect("namespace");
    fleet.manual_block("198.51.100.44/32").expect("block");
    let acc = account(fleet, 0, client, ports, Duration::from_secs(40));
    report("restart postgres", acc, converge(fleet, Duration::from_secs(10)));

    // 4. cut mx1's link for 30 s; its own traffic (from itself, over
    // loopback) goes on; a block is made and one deleted meanwhile.
    let ports = 23000..30000;
    let me = IpAddr::V4(fleet::mx_v4(0));
    let traffic = drill_traffic(fleet.host_ns(0), me, smtp(0), ports.clone(), Duration::from_secs(33));
    std::thread::sleep(Duration::from_secs(1));
    fleet.set_host_link(0, false).expect("cut link");
    let gone = fleet.live_block(fleet::att_v4(42)).expect("query").expect("block 42");
    fleet.revoke_block(gone.0).expect("revoke");
    fleet.manual_block("198.51.100.45/32").expect("block");
    std::thread::sleep(Duration::from_secs(30));
    fleet.set_host_link(0, true).expect("restore link");
    traffic.join().expect("traffic thread").expect("namespace");
    let acc = account(fleet, 0, me, ports, Duration::from_secs(60));
    let conv = converge(fleet, Duration::from_secs(40));
    let stale = fleet.nft_entries(0).unwrap_or_default().contains("198.51.100.42");
    report("cut link 30 s", acc, if stale { None } else { conv });
    failures
}
