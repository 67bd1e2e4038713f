//! IMAP and POP3 password guessing against real Dovecot is blocked on the
//! host and fleet-wide; a user who mistypes once and then logs in is not.
//!
//! Two mail hosts (`mx1`, `mx2`), each with a real Dovecot 2.3 (IMAP 143,
//! POP3 110, one passwd-file user; tests/src/dovecot.rs) logging to its own
//! `log_path`, and a `fleetban-agent run` tailing that log as a `dovecot`
//! source beside its Exim source (nftables backend, `smtp` scope, which then
//! also covers 110 and 143); a `fleetban-server`; an attacker namespace and a
//! client namespace (tests/src/fleet.rs).
//!
//! 1. The client (one NAT address) logs in over IMAP on `mx1` and over POP3
//!    on `mx2`, each time with a typo first and then the right password.
//! 2. One attacker address guesses IMAP passwords on `mx1` (4 sessions of 3
//!    wrong passwords: Dovecot logs `auth failed, 3 attempts` per session),
//!    another guesses POP3 passwords on `mx2` the same way.
//! 3. Both attackers end up in both hosts' nftables sets (the local block on
//!    the host they guessed on, the fleet block on the other) and in the
//!    server's blocks; the IMAP attacker can no longer reach `mx1`'s IMAP
//!    port. The client's events were stored (with their service) and it is
//!    blocked nowhere.
//!
//! Needs root (namespaces, nftables) and Dovecot (`dovecot-imapd`,
//! `dovecot-pop3d`); without either it fails and says so. Run with
//! `cargo test -p fleetban-tests --test dovecot_logins -- --nocapture`.
//! With `FLEETBAN_DOVECOT_LOG_COPY=<path>` set, `mx1`'s Dovecot log is copied
//! there at the end (how `agent/tests/data/dovecot/` was captured).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use fleetban_agent::parse::{EventKind, LogKind, Parser, Service, Timezone};
use fleetban_tests::dovecot::{self, IMAP_PORT, Login, PASSWORD, POP3_PORT, USER, imap_logins, pop3_logins};
use fleetban_tests::fleet::{self, CLIENT, Fleet, FleetOptions, att_v4, mx_v4};
use fleetban_tests::netns::is_root;

fn imap(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(mx_v4(i)), IMAP_PORT)
}

fn pop3(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(mx_v4(i)), POP3_PORT)
}

fn nft_holds(fleet: &Fleet, i: usize, addr: IpAddr) -> bool {
    fleet.nft_entries(i).unwrap_or_default().contains(&addr.to_string())
}

/// Stored events of `addr` as (kind, service).
fn stored(fleet: &Fleet, addr: IpAddr) -> Vec<(String, Option<String>)> {
    fleet
        .rt
        .block_on(
            sqlx::query_as::<_, (String, Option<String>)>(
                "select kind, service from events where remote = $1::inet order by time, kind",
            )
            .bind(addr.to_string())
            .fetch_all(&fleet.pool),
        )
        .unwrap_or_default()
}

#[test]
fn imap_and_pop3_guessing_is_blocked_fleet_wide_and_a_typo_is_not() {
    assert!(
        is_root(),
        "this test needs root (network namespaces and nftables); run it as root, e.g. \
         `sudo -E cargo test -p fleetban-tests --test dovecot_logins`"
    );
    dovecot::binary().unwrap_or_else(|error| panic!("{error}"));
    let bins = fleet::binaries().unwrap_or_else(|error| panic!("{error:#}"));
    let options = FleetOptions { hosts: 2, dovecot: true, ..FleetOptions::default() };
    let fleet = Fleet::start(bins, options).unwrap_or_else(|error| panic!("starting the fleet: {error:#}"));
    let client = IpAddr::V4(CLIENT);
    let (imap_attacker, pop3_attacker) = (att_v4(40), att_v4(41));
    let report = |what: &str| {
        format!(
            "{what}\nmx1 nft:\n{}\nmx2 nft:\n{}\nmx1 dovecot:\n{}\nmx1 agent:\n{}\nmx2 agent:\n{}\nserver:\n{}",
            fleet.nft_entries(0).unwrap_or_default(),
            fleet.nft_entries(1).unwrap_or_default(),
            fleet.hosts[0].dovecot.as_ref().map(|d| d.log_text()).unwrap_or_default(),
            fleet.agent_log_tail(0),
            fleet.agent_log_tail(1),
            fleet.server_log_tail()
        )
    };

    // 1. The client: a session with a typo, then one with the right
    // password, on both protocols (Dovecot logs a session that ends logged
    // in as `Login:` only, so the typo gets a session of its own).
    let typo = fleet
        .in_client(move || {
            let imap =
                [imap_logins(imap(0), client, USER, &["hunter2"]), imap_logins(imap(0), client, USER, &[PASSWORD])];
            let pop3 =
                [pop3_logins(pop3(1), client, USER, &["hunter2"]), pop3_logins(pop3(1), client, USER, &[PASSWORD])];
            [imap, pop3].map(|s| s.map(|r| r.ok().and_then(|v| v.first().copied())))
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
    let expected = [Some(Login::Refused), Some(Login::Ok)];
    assert_eq!(typo, [expected, expected], "{}", report("the client's logins"));

    // 2. The guessers: 4 sessions of 3 wrong passwords each, at once
    // (Dovecot's auth penalty delays an address's failures up to 15 s each;
    // threads inherit the attacker namespace).
    let guessing_at = Instant::now();
    let guesses = fleet
        .in_attacker(move || {
            let wrong = ["123456", "password", "qwerty"];
            std::thread::scope(|s| {
                let mut sessions = Vec::new();
                for _ in 0..4 {
                    sessions.push(s.spawn(move || imap_logins(imap(0), imap_attacker, USER, &wrong)));
                    sessions.push(s.spawn(move || pop3_logins(pop3(1), pop3_attacker, USER, &wrong)));
                }
                sessions
                    .into_iter()
                    .filter_map(|h| h.join().ok().and_then(Result::ok))
                    .flatten()
                    .filter(|outcome| *outcome == Login::Refused)
                    .count()
            })
        })
        .unwrap_or_else(|error| panic!("{error:#}"));
    // Every guess was answered: Dovecot logs a session's failures when it
    // ends, so the block comes after the sessions.
    assert_eq!(guesses, 24, "{}", report(&format!("only {guesses} guesses were refused")));

    // 3. Both guessers blocked on both hosts (at most 20 s). The sessions
    // have ended, so Dovecot has written their lines: from here to each
    // host's nft set is the end-to-end latency (log line → local block on
    // the guessed host, → fleet block on the other).
    let lines_written = Instant::now();
    let mut seen: [[Option<Duration>; 2]; 2] = [[None; 2]; 2];
    let blocked = fleet::wait_until(Duration::from_secs(20), || {
        for (a, attacker) in [imap_attacker, pop3_attacker].into_iter().enumerate() {
            for (i, slot) in seen[a].iter_mut().enumerate() {
                if slot.is_none() && nft_holds(&fleet, i, attacker) {
                    *slot = Some(lines_written.elapsed());
                }
            }
        }
        seen.iter().flatten().all(Option::is_some)
    });
    assert!(blocked, "{}", report("the guessers were not blocked on both hosts within 20 s"));
    let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis());
    eprintln!(
        "guessing took {} ms (Dovecot's auth penalty); after the last session ended: IMAP guesser in mx1 (local) \
         {} ms, mx2 (fleet) {} ms; POP3 guesser in mx2 (local) {} ms, mx1 (fleet) {} ms",
        (lines_written - guessing_at).as_millis(),
        ms(seen[0][0]),
        ms(seen[0][1]),
        ms(seen[1][1]),
        ms(seen[1][0]),
    );
    let mx2_log = fleet.hosts[1].dovecot.as_ref().map(|d| d.log_text()).unwrap_or_default();
    for attacker in [imap_attacker, pop3_attacker] {
        assert!(fleet.live_block(attacker).ok().flatten().is_some(), "{}", report(&format!("no block of {attacker}")));
    }
    let refused = fleet
        .in_attacker(move || fleet::connect(imap(0), Some(imap_attacker), Duration::from_secs(1)).is_err())
        .unwrap_or(false);
    assert!(refused, "{}", report("the blocked IMAP guesser still reaches mx1's IMAP port"));
    let kinds = stored(&fleet, imap_attacker);
    assert!(
        kinds.iter().any(|(k, s)| k == "auth_failed" && s.as_deref() == Some("imap")),
        "{}",
        report(&format!("the IMAP guesses are not stored as imap auth_failed: {kinds:?}"))
    );
    let kinds = stored(&fleet, pop3_attacker);
    assert!(
        kinds.iter().any(|(k, s)| k == "auth_failed" && s.as_deref() == Some("pop3")),
        "{}",
        report(&format!("the POP3 guesses are not stored as pop3 auth_failed: {kinds:?}"))
    );

    // The client: its lines were read before the guessers' on each host, so
    // they were judged before the blocks; it is blocked nowhere.
    let seen = fleet::wait_until(Duration::from_secs(10), || {
        let k = stored(&fleet, client);
        ["imap", "pop3"].iter().all(|svc| {
            k.iter().any(|(kind, s)| kind == "login" && s.as_deref() == Some(*svc))
                && k.iter().any(|(kind, s)| kind == "auth_failed" && s.as_deref() == Some(*svc))
        })
    });
    assert!(seen, "{}", report(&format!("the client's lines were not all stored: {:?}", stored(&fleet, client))));
    for i in 0..2 {
        assert!(!nft_holds(&fleet, i, client), "{}", report(&format!("the client is blocked on mx{}", i + 1)));
    }
    assert!(fleet.live_block(client).ok().flatten().is_none(), "{}", report("the client has a fleet block"));

    // The real log reads back through the parser: every auth failure of the
    // guessers with its attempts, the client's typo and login.
    let log = fleet.hosts[0].dovecot.as_ref().map(|d| d.log_text()).unwrap_or_default();
    let mut parser = Parser::for_kind(LogKind::Dovecot, Timezone::Utc);
    let events: Vec<_> =
        log.lines().filter_map(|l| parser.feed(l.as_bytes()).map(|e| (e.kind, e.ip, e.service, e.attempts))).collect();
    let failures = events
        .iter()
        .filter(|e| e.0 == EventKind::AuthFailed && e.1 == imap_attacker && e.2 == Service::Imap)
        .map(|e| e.3)
        .sum::<u32>();
    assert!(failures >= 10, "{}", report(&format!("parsed {failures} IMAP guesses from mx1's log: {events:?}")));
    assert!(events.contains(&(EventKind::Login, client, Service::Imap, 0)), "{events:?}");
    assert!(events.contains(&(EventKind::AuthFailed, client, Service::Imap, 1)), "{events:?}");
    if let Some(copy) = std::env::var_os("FLEETBAN_DOVECOT_LOG_COPY") {
        std::fs::write(copy, format!("{log}{mx2_log}")).unwrap_or_else(|error| panic!("copying the log: {error}"));
    }
}
