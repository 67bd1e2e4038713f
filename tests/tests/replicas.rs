//! Three server replicas behind a real HAProxy (TCP passthrough of the
//! agents' TLS, health checks on `/readyz`) in the namespace fleet, three
//! mail hosts with agents (see `tests/src/replicas.rs`):
//!
//! - an attack on every host is blocked everywhere while the agents are
//!   spread over the replicas;
//! - `kill -9` of the replica serving the most agents, in the middle of
//!   traffic: its agents come back through HAProxy to the others within the
//!   reconnect backoff, every session is stored exactly once, and a block
//!   made on a surviving replica's API reaches every host;
//! - a Postgres restart under traffic with the three replicas: nothing
//!   lost or duplicated;
//! - the single-server test's failure drills (agent, replica and Postgres
//!   killed or restarted, a host's link cut) with the replicas;
//! - the legitimate client is never blocked.
//!
//! They need root (namespaces, nftables) and `/usr/sbin/haproxy`; run with
//! `cargo test -p fleetban-tests --test replicas -- --nocapture --test-threads 1`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use fleetban_tests::drill::{self, Accounting, account, converge};
use fleetban_tests::fleet::{self, CLIENT, Fleet, FleetOptions, PROBE_TIMEOUT, att_v4, auth_failures, connect, mx_v4};
use fleetban_tests::netns::{NetnsError, is_root};
use fleetban_tests::replicas::HAPROXY;

/// One fleet at a time: the machine is small.
static SERIAL: Mutex<()> = Mutex::new(());
static BINS: OnceLock<PathBuf> = OnceLock::new();

const REPLICAS: usize = 3;
const HOSTS: usize = 3;
/// A busy relay the operator allowlisted: the drills' heavy traffic (200
/// sessions a second per host) comes from it.
const RELAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 60);
/// The legitimate client's pace per host: well under the connection-rate
/// rule (30 a minute), and it is not allowlisted.
const CLIENT_PACE: Duration = Duration::from_millis(2500);
/// How long an agent of a killed replica may take to hold a session on
/// another one: the first reconnect attempts wait 0.25–0.5 s, 0.5–1 s and
/// 1–2 s (`uplink::backoff`), HAProxy redispatches a connection that finds
/// the dead replica before its checks (every 500 ms, two failures) notice.
const MOVE_BOUND: Duration = Duration::from_secs(5);

fn smtp(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(mx_v4(i)), 25)
}

fn start() -> Fleet {
    start_with(vec![format!("{RELAY}/32")])
}

/// Three replicas and three hosts whose agents allowlist `agent_allowlist`;
/// the relay's address is added to the client namespace and allowlisted at
/// the server.
fn start_with(agent_allowlist: Vec<String>) -> Fleet {
    assert!(
        is_root(),
        "the end-to-end tests need root (network namespaces and nftables); run them as root, e.g. \
         `sudo -E cargo test -p fleetban-tests --test replicas`"
    );
    assert!(std::path::Path::new(HAPROXY).is_file(), "{HAPROXY} is missing: apt-get install haproxy");
    let bins = BINS.get_or_init(|| fleet::binaries().unwrap_or_else(|error| panic!("{error:#}")));
    // Context is summarised in 2 s intervals, so the drills' accounting
    // sees the summaries soon after the traffic.
    let aggregate = "interval_secs = 2".to_owned();
    let fleet = Fleet::start(
        bins.clone(),
        FleetOptions { replicas: REPLICAS, agent_allowlist, aggregate, ..FleetOptions::default() },
    )
    .unwrap_or_else(|error| panic!("starting the fleet: {error:#}"));
    fleet.client().ip(&["addr", "add", &format!("{RELAY}/32"), "dev", "eth0"]).expect("the relay's address");
    fleet.allowlist(&format!("{RELAY}/32")).expect("allowlist the relay");
    fleet
}

/// Waits until every agent has exactly one connection through HAProxy;
/// returns the replica of each host.
fn placement(fleet: &Fleet, within: Duration) -> Vec<usize> {
    let mut last = Vec::new();
    let ok = fleet::wait_until(within, || {
        last = fleet.agent_replicas().unwrap_or_default();
        last.len() == HOSTS && last.iter().all(|r| r.len() == 1)
    });
    assert!(ok, "agents are not each on one replica: {last:?}\n{}", fleet.server_log_tail());
    last.iter().map(|r| r[0]).collect()
}

/// Every replica's own count of agent sessions agrees with where HAProxy
/// sent the agents (replicas in `down` do not answer).
fn replicas_agree(fleet: &Fleet, on: &[usize], down: &[usize], within: Duration) -> bool {
    fleet::wait_until(within, || {
        (0..REPLICAS).all(|r| {
            let sessions = fleet.replica_sessions(r);
            if down.contains(&r) {
                sessions.is_none()
            } else {
                sessions == Some(on.iter().filter(|&&x| x == r).count() as u64)
            }
        })
    })
}

/// Drill traffic to every host: the relay's heavy sessions (ports
/// `20000 + 1000 h`.., every 5 ms) and the client's paced ones (ports
/// `40000 + 100 h`..), for at most `max_time`.
struct Traffic {
    relay: Vec<Range<u16>>,
    client: Vec<Range<u16>>,
    threads: Vec<std::thread::JoinHandle<Result<usize, NetnsError>>>,
}

impl Traffic {
    fn start(fleet: &Fleet, base: u16, max_time: Duration) -> Traffic {
        let mut t = Traffic { relay: Vec::new(), client: Vec::new(), threads: Vec::new() };
        for h in 0..HOSTS {
            let relay = base + 1000 * h as u16..base + 1000 * (h as u16 + 1);
            let client = base + 20_000 + 100 * h as u16..base + 20_000 + 100 * (h as u16 + 1);
            let pace = Duration::from_millis(5);
            t.threads.push(drill::traffic(fleet.client(), IpAddr::V4(RELAY), smtp(h), relay.clone(), pace, max_time));
            t.threads.push(drill::traffic(
                fleet.client(),
                IpAddr::V4(CLIENT),
                smtp(h),
                client.clone(),
                CLIENT_PACE,
                max_time,
            ));
            t.relay.push(relay);
            t.client.push(client);
        }
        t
    }

    /// Waits for the traffic, then accounts every host's sessions; returns
    /// the names of the failed accountings.
    fn account(self, fleet: &Fleet, drill: &str) -> Vec<String> {
        for thread in self.threads {
            thread.join().expect("traffic thread").expect("namespace");
        }
        let mut failed = Vec::new();
        for h in 0..HOSTS {
            for (who, addr, ports) in [("relay", RELAY, &self.relay[h]), ("client", CLIENT, &self.client[h])] {
                let acc: Accounting = account(fleet, h, IpAddr::V4(addr), ports.clone(), Duration::from_secs(40));
                let (written, stored, lost, dup, caught_up) = acc;
                println!(
                    "replicas drill {drill}: mx{} {who}: lines written {written}, events stored {stored}, lost {lost}, \
                     duplicated {dup}; store complete {} ms after the traffic ended",
                    h + 1,
                    caught_up.as_millis()
                );
                if lost != 0 || dup != 0 || written == 0 {
                    failed.push(format!("{drill} mx{} {who}", h + 1));
                }
            }
        }
        failed
    }
}

/// The legitimate client: no block ever covered it, no host's firewall
/// holds it, and every host answers it.
fn assert_client_never_blocked(fleet: &Fleet) {
    let client = IpAddr::V4(CLIENT);
    let ever = fleet.blocks_ever(client).expect("query blocks");
    assert!(ever.is_empty(), "blocks covered the legitimate client: {ever:?}");
    for h in 0..HOSTS {
        let nft = fleet.nft_entries(h).expect("nft");
        assert!(!nft.contains(&CLIENT.to_string()), "mx{} holds the legitimate client:\n{nft}", h + 1);
    }
    let reached = fleet
        .in_client(move || (0..HOSTS).all(|h| fleet::smtp_banner(smtp(h), Some(client)).is_ok()))
        .expect("client thread");
    assert!(reached, "the legitimate client was refused");
}

/// Waits until every host's nftables holds `addr` and the attacker's probe
/// from it is dropped everywhere; returns how long it took.
fn blocked_everywhere(fleet: &Fleet, addr: IpAddr, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let text = addr.to_string();
    let held =
        fleet::wait_until(within, || (0..HOSTS).all(|h| fleet.nft_entries(h).unwrap_or_default().contains(&text)));
    if !held {
        return None;
    }
    let took = started.elapsed();
    let dropped = fleet
        .in_attacker(move || (0..HOSTS).all(|h| connect(smtp(h), Some(addr), PROBE_TIMEOUT).is_err()))
        .expect("attacker thread");
    dropped.then_some(took)
}

/// The fleet's `heartbeat_secs` (`tests/src/fleet.rs`'s `server.toml`).
const HEARTBEAT_SECS: u64 = 5;

/// The database's clock.
fn db_now(fleet: &Fleet) -> time::OffsetDateTime {
    fleet
        .rt
        .block_on(sqlx::query_scalar::<_, time::OffsetDateTime>("select now()").fetch_one(&fleet.pool))
        .expect("select now()")
}

/// For each agent, how long after `t` its row was last touched (heartbeat,
/// batch or session start).
fn last_seen_since(fleet: &Fleet, t: time::OffsetDateTime) -> Option<Vec<Duration>> {
    let mut out = Vec::new();
    for h in 0..HOSTS {
        let id = fleet.agent_id(h).ok()?;
        let seen: Option<time::OffsetDateTime> = fleet
            .rt
            .block_on(sqlx::query_scalar("select last_seen from agents where id = $1").bind(id).fetch_one(&fleet.pool))
            .ok()?;
        out.push(Duration::try_from(seen? - t).unwrap_or_default());
    }
    Some(out)
}

fn histogram(placement: &[usize]) -> BTreeMap<usize, usize> {
    let mut by_replica = BTreeMap::new();
    for &r in placement {
        *by_replica.entry(r).or_insert(0) += 1;
    }
    by_replica
}

/// (a) + (d): agents spread over the replicas; password spraying on every
/// host (below each host's own thresholds) is correlated across replicas and
/// blocked on every host; the legitimate client is untouched.
#[test]
fn attack_is_blocked_everywhere_while_agents_are_spread_over_replicas() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = start();
    let on = placement(&fleet, Duration::from_secs(10));
    let by_replica = histogram(&on);
    println!("replicas: agents per replica {by_replica:?} (HAProxy leastconn)");
    assert!(by_replica.len() >= 2, "HAProxy sent every agent to one replica: {on:?}");
    assert!(
        replicas_agree(&fleet, &on, &[], Duration::from_secs(5)),
        "the replicas' session counts disagree with HAProxy's placement {on:?}: {:?}",
        (0..REPLICAS).map(|r| fleet.replica_sessions(r)).collect::<Vec<_>>()
    );

    let client = fleet.in_client(|| {
        (0..HOSTS)
            .all(|h| fleet::smtp_quit(smtp(h), SocketAddr::new(IpAddr::V4(CLIENT), 0), Duration::from_secs(1)).is_ok())
    });
    assert!(client.expect("client thread"), "the legitimate client's sessions failed");

    let attacker = att_v4(20);
    fleet
        .in_attacker(move || {
            for h in 0..HOSTS {
                let users: Vec<String> = (0..4).map(|k| format!("user{h}{k}@example.test")).collect();
                auth_failures(smtp(h), attacker, &users)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .expect("attacker thread")
        .expect("the AUTH attempts ran");
    let Some(took) = blocked_everywhere(&fleet, attacker, Duration::from_secs(10)) else {
        panic!(
            "the attacker is not blocked on every host\n{}\nmx1 nft:\n{}",
            fleet.server_log_tail(),
            fleet.nft_entries(0).unwrap_or_default()
        );
    };
    let block = fleet.live_block(attacker).expect("query").expect("a live block");
    assert_eq!(block.2, "auto", "the block comes from correlation across the replicas: {block:?}");
    println!(
        "replicas attack: last failed AUTH -> blocked on all {HOSTS} hosts {} ms (block {}; agents on replicas {on:?})",
        took.as_millis(),
        block.1
    );
    assert_eq!(placement(&fleet, Duration::from_secs(1)), on, "agents moved between replicas during the attack");
    assert_client_never_blocked(&fleet);
}

/// (b) + (d): kill -9 the replica serving the most agents in the middle of
/// traffic.
#[test]
fn killing_the_busiest_replica_moves_its_agents_and_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut fleet = start();
    let on = placement(&fleet, Duration::from_secs(10));
    let by_replica = histogram(&on);
    let busiest = by_replica.iter().max_by_key(|(_, n)| **n).map(|(r, _)| *r).expect("a replica with agents");
    let moved: Vec<usize> = (0..HOSTS).filter(|&h| on[h] == busiest).collect();
    let stayed: Vec<usize> = (0..HOSTS).filter(|&h| on[h] != busiest).collect();
    let before = fleet.agent_sessions().expect("agent sessions");
    assert!(before.iter().all(|(id, connected)| id.is_some() && *connected), "not every agent connected: {before:?}");

    let traffic = Traffic::start(&fleet, 10_000, Duration::from_secs(8));
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    let killed_db = db_now(&fleet);
    fleet.kill_replica(busiest).expect("kill the replica");

    // Its agents hold new sessions on the others, through HAProxy.
    let mut back: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut last = (Vec::new(), Vec::new());
    fleet::wait_until(MOVE_BOUND + Duration::from_secs(10), || {
        let placement = fleet.agent_replicas().unwrap_or_default();
        let sessions = fleet.agent_sessions().unwrap_or_default();
        for &h in &moved {
            let elsewhere = placement.get(h).is_some_and(|r| r.len() == 1 && r[0] != busiest);
            let renewed = sessions.get(h).is_some_and(|(id, connected)| *connected && *id != before[h].0);
            if elsewhere && renewed {
                back.entry(h).or_insert_with(|| killed_at.elapsed());
            }
        }
        last = (placement, sessions);
        back.len() == moved.len()
    });
    println!(
        "replicas kill -9: replica {busiest} served mx{:?}; back on another replica after {:?} ms",
        moved.iter().map(|h| h + 1).collect::<Vec<_>>(),
        back.iter().map(|(h, d)| (h + 1, d.as_millis())).collect::<BTreeMap<_, _>>()
    );
    assert_eq!(
        back.len(),
        moved.len(),
        "agents of the killed replica did not come back: placement {:?}, sessions {:?}\n{}",
        last.0,
        last.1,
        fleet.server_log_tail()
    );
    let slowest = back.values().max().copied().unwrap_or_default();
    assert!(slowest <= MOVE_BOUND, "an agent took {slowest:?} to move (bound {MOVE_BOUND:?})");
    let after = fleet.agent_sessions().expect("agent sessions");
    for &h in &stayed {
        assert_eq!(after[h].0, before[h].0, "mx{}'s agent lost its session on a surviving replica", h + 1);
    }
    let now_on = placement(&fleet, Duration::from_secs(2));
    assert!(
        replicas_agree(&fleet, &now_on, &[busiest], Duration::from_secs(5)),
        "the surviving replicas' session counts disagree with HAProxy's placement {now_on:?}: {:?}",
        (0..REPLICAS).map(|r| fleet.replica_sessions(r)).collect::<Vec<_>>()
    );

    // A block made through a surviving replica's own API reaches every host.
    let survivor = (0..REPLICAS).find(|&r| r != busiest).expect("a survivor");
    let token = fleet.admin_token().expect("admin token");
    let target = att_v4(46);
    let made_at = Instant::now();
    let (ok, out, err) = fleet
        .cli_on_replica(
            survivor,
            &token,
            &["block", &format!("{target}/32"), "--reason", "replica drill", "--ttl", "1h"],
        )
        .expect("fleetban block");
    assert!(ok, "fleetban block on replica {survivor} failed: {out}{err}");
    let Some(took) = blocked_everywhere(&fleet, target, Duration::from_secs(5)) else {
        panic!("the block made on replica {survivor} did not reach every host\n{}", fleet.server_log_tail());
    };
    println!(
        "replicas kill -9: block made on replica {survivor}'s API -> in every host's nftables {} ms (CLI included {} ms)",
        took.as_millis(),
        made_at.elapsed().as_millis()
    );
    assert!(took <= Duration::from_secs(1), "the block took {took:?} to reach every host");

    let failed = traffic.account(&fleet, "kill -9 replica");
    // The killed replica comes back; HAProxy puts it back in rotation.
    fleet.start_replica(busiest).expect("restart the replica");
    fleet.wait_replicas_up(&[busiest], Duration::from_secs(5)).expect("replica back up");
    let conv = converge(&fleet, Duration::from_secs(10));
    // The surviving replicas' stale-session sweeps (every heartbeat, 5 s;
    // silent for three) have judged every agent since the move: each
    // agent's row was touched more than three heartbeats after the kill.
    let stale_after = Duration::from_secs(3 * HEARTBEAT_SECS + 1);
    let swept = fleet::wait_until(Duration::from_secs(40), || {
        last_seen_since(&fleet, killed_db).is_some_and(|since| since.iter().all(|d| *d > stale_after))
    });
    assert!(
        swept,
        "agents were not heard from for {stale_after:?} after the kill: {:?}",
        last_seen_since(&fleet, killed_db)
    );
    let sessions = fleet.agent_sessions().expect("agent sessions");
    println!(
        "replicas kill -9: firewalls converged {}; {} s after the kill the store shows agents connected {:?}",
        conv.map_or("NEVER".to_owned(), |d| format!("{} ms", d.as_millis())),
        killed_at.elapsed().as_secs(),
        sessions.iter().map(|s| s.1).collect::<Vec<_>>()
    );
    assert!(failed.is_empty(), "sessions lost or duplicated: {failed:?}\n{}", fleet.server_log_tail());
    assert!(conv.is_some(), "the firewalls did not converge on the blocklist");
    assert!(
        sessions.iter().all(|s| s.1),
        "an agent is shown disconnected after moving replicas: {sessions:?}\n{}",
        fleet.server_log_tail()
    );
    assert_client_never_blocked(&fleet);
}

/// (c) + (d): Postgres stops for 2 s and restarts while the three replicas
/// take traffic: nothing lost or duplicated, every agent and replica back.
#[test]
fn postgres_restart_with_replicas_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut fleet = start();
    let on = placement(&fleet, Duration::from_secs(10));
    println!("replicas postgres: agents on replicas {on:?}");

    let traffic = Traffic::start(&fleet, 10_000, Duration::from_secs(8));
    std::thread::sleep(Duration::from_millis(1500));
    fleet.set_postgres(false).expect("stop postgres");
    std::thread::sleep(Duration::from_secs(2));
    fleet.set_postgres(true).expect("start postgres");
    let restarted_at = Instant::now();
    fleet.wait_replicas_up(&[0, 1, 2], Duration::from_secs(15)).expect("every replica ready again");
    let ready = restarted_at.elapsed();
    fleet.manual_block("198.51.100.44/32").expect("block");
    let failed = traffic.account(&fleet, "restart postgres");
    let conv = converge(&fleet, Duration::from_secs(10));
    let connected = fleet::wait_until(Duration::from_secs(15), || {
        fleet.agent_sessions().is_ok_and(|s| s.iter().all(|(_, connected)| *connected))
    });
    println!(
        "replicas postgres: replicas ready {} ms after Postgres restarted; firewalls converged {}; agents on {:?}",
        ready.as_millis(),
        conv.map_or("NEVER".to_owned(), |d| format!("{} ms", d.as_millis())),
        fleet.agent_replicas().unwrap_or_default()
    );
    assert!(failed.is_empty(), "sessions lost or duplicated: {failed:?}\n{}", fleet.server_log_tail());
    assert!(conv.is_some(), "the firewalls did not converge on the blocklist");
    assert!(connected, "agents not connected again: {:?}", fleet.agent_sessions());
    assert_client_never_blocked(&fleet);
}

/// The single-server test's failure drills (`drill::failure_drills`: kill
/// -9 an agent, kill -9 the replica mx1's agent is on, restart Postgres, cut
/// mx1's link for 30 s) with three replicas behind HAProxy: nothing lost or
/// duplicated, the firewalls converge, every agent connected at the end.
#[test]
fn failure_drills_with_replicas_lose_and_duplicate_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The drills' traffic comes from the client at 200 sessions a second.
    let mut fleet = start_with(vec!["203.0.113.0/24".into(), "192.0.2.0/24".into()]);
    fleet.allowlist("203.0.113.0/24").expect("allowlist");
    println!("replicas drills: agents on replicas {:?}", placement(&fleet, Duration::from_secs(10)));
    let failures = drill::failure_drills(&mut fleet, "replicas");
    let connected = fleet::wait_until(Duration::from_secs(15), || {
        fleet.agent_sessions().is_ok_and(|s| s.iter().all(|(_, connected)| *connected))
    });
    println!(
        "replicas drills: agents on replicas {:?} at the end; connected in the store {:?}",
        fleet.agent_replicas().unwrap_or_default(),
        fleet.agent_sessions().map(|s| s.iter().map(|x| x.1).collect::<Vec<_>>())
    );
    assert!(
        failures.is_empty(),
        "failed drills: {failures:?}\n{}\nmx1:\n{}",
        fleet.server_log_tail(),
        fleet.agent_log_tail(0)
    );
    assert!(connected, "agents not connected after the drills: {:?}", fleet.agent_sessions());
}

/// Failed enrollments from a stranger must not keep the fleet's agents
/// out. Behind HAProxy every connection reaches a replica from HAProxy's
/// address; without the PROXY header HAProxy sends (`send-proxy-v2`,
/// `proxy_protocol_from` on the replicas) each replica's throttle of failed
/// authentication (`[limits] auth_failure_burst` 10,
/// `auth_failures_per_minute` 6, per source) would count the stranger and
/// every agent as one source: 40 failed `Enroll` calls from the attacker's
/// namespace would spend every replica's bucket, and an agent whose replica
/// dies would be refused (`RESOURCE_EXHAUSTED`) for about 10 s instead of
/// reconnecting within the backoff's half second.
#[test]
fn failed_enrollments_through_haproxy_do_not_keep_agents_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut fleet = start();
    let on = placement(&fleet, Duration::from_secs(10));
    let bins = BINS.get().expect("binaries").clone();
    // An enrollment attempt with a token the server never issued.
    let config = std::fs::read_to_string(fleet.hosts[0].dir.join("agent.toml")).expect("mx1's agent.toml").replace(
        &fleet.hosts[0].dir.join("state").display().to_string(),
        &fleet.dir.join("stranger").display().to_string(),
    );
    let stranger = fleet.dir.join("stranger.toml");
    std::fs::write(&stranger, config).expect("write the stranger's config");
    let mut refused = 0;
    let mut throttled = 0;
    for _ in 0..40 {
        let out = fleet
            .attacker()
            .command(bins.join("fleetban-agent").to_str().expect("UTF-8 path"))
            .args(["enroll", "--server", "https://192.0.2.1:50051", "--token", "not-a-token", "--name", "stranger"])
            .arg("--config")
            .arg(&stranger)
            .output()
            .expect("fleetban-agent enroll");
        refused += usize::from(!out.status.success());
        throttled += usize::from(String::from_utf8_lossy(&out.stderr).contains("too many failed authentication"));
    }
    assert_eq!(refused, 40, "the stranger's enrollments were not all refused");
    // The throttle still works, on the stranger's own address.
    assert!(throttled > 0, "the stranger was never throttled: the replicas do not see its address");
    let before = fleet.agent_sessions().expect("agent sessions");
    let victim = on[0];
    let killed_at = Instant::now();
    fleet.kill_replica(victim).expect("kill mx1's replica");
    let back = fleet::wait_until(Duration::from_secs(60), || {
        fleet.agent_sessions().is_ok_and(|s| s[0].1 && s[0].0 != before[0].0)
    });
    let took = killed_at.elapsed();
    println!("replicas throttle: mx1 back on another replica: {back} after {} ms", took.as_millis());
    assert!(back && took <= MOVE_BOUND, "mx1's agent took {took:?} to come back\n{}", fleet.agent_log_tail(0));
}
