//! The replay over hand-built fleet traffic: attackers and the legitimate
//! senders that look most like them, on three hosts.

use super::*;

use std::net::IpAddr;

use fleetban_proto::policy::RuleTable;

const T0: i64 = 1_795_000_000_000;

fn ev(t: i64, kind: EventKind, ip: &str, port: u32) -> Event {
    Event {
        time_ms: t,
        kind: kind as i32,
        remote: Some(ip.parse::<IpAddr>().unwrap().into()),
        remote_port: port,
        raw: if kind.is_abuse() { format!("line {kind} [{ip}]:{port}") } else { String::new() },
        ..Event::default()
    }
}

fn auth(t: i64, ip: &str, port: u32, user: &str) -> Event {
    Event { auth_user: user.into(), ..ev(t, EventKind::AuthFailed, ip, port) }
}

/// Three hosts: a distributed brute force (6 failures on each host, 18 in
/// all), a slot flood on mx1 (3 addresses, 6 held sessions each, 20 slots)
/// during which a legitimate MTA is refused, an office NAT with one typo
/// per host and logins that succeed, a Google relay with unknown
/// recipients.
fn fleet() -> Vec<HostEvents> {
    let mut hosts: Vec<HostEvents> =
        ["mx1", "mx2", "mx3"].iter().map(|h| HostEvents { host: (*h).into(), events: Vec::new() }).collect();
    for (h, host) in hosts.iter_mut().enumerate() {
        let base = T0 + h as i64 * 1_000;
        for i in 0..6 {
            host.events.push(auth(base + i * 20_000, "198.51.100.66", 40_000 + i as u32, &format!("u{h}{i}")));
        }
        // The office NAT: a typo, then a login that works.
        host.events.push(auth(base + 5_000, "203.0.113.80", 1_000, "carol"));
        host.events
            .push(Event { auth_user: "carol".into(), ..ev(base + 9_000, EventKind::Accepted, "203.0.113.80", 1_001) });
        // Google delivers, with a few unknown recipients.
        let google = |e: Event| Event { host_name: "mail-wr1-f45.google.com".into(), ..e };
        host.events.push(google(ev(base + 2_000, EventKind::Connect, "209.85.221.45", 2_000)));
        host.events.push(google(ev(base + 2_100, EventKind::Accepted, "209.85.221.45", 2_000)));
        for k in 0..40 {
            host.events.push(ev(base + 2_200 + k, EventKind::RcptRejected, "209.85.221.45", 2_000));
        }
        host.events.push(ev(base + 2_300, EventKind::Closed, "209.85.221.45", 2_000));
    }
    // The flood on mx1: 18 held sessions fill 20 slots, the MTA is refused.
    let mx1 = &mut hosts[0].events;
    let mut count = 0;
    for round in 0..6 {
        for f in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            count += 1;
            mx1.push(Event {
                connection_count: count,
                ..ev(T0 + 30_000 + round * 100, EventKind::Connect, f, 30_000 + count)
            });
        }
    }
    for i in 0..5 {
        mx1.push(ev(T0 + 31_000 + i * 500, EventKind::RefusedTooMany, "192.0.2.200", 50_000 + i as u32));
    }
    for host in &mut hosts {
        host.events.sort_by_key(|e| e.time_ms);
    }
    hosts
}

fn blocked(out: &Outcome) -> Vec<String> {
    out.blocked().keys().map(ToString::to_string).collect()
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn replay_blocks_the_attackers_and_no_legitimate_sender(pool: PgPool) {
    let policy = CorrelateConfig::default();
    let options = Options { smtp_accept_max: 20, ..Options::default() };
    let out = run(&pool, &fleet(), &policy, &options, &|_| {}).await.unwrap();
    assert_eq!(blocked(&out), ["192.0.2.1/32", "192.0.2.2/32", "192.0.2.3/32", "198.51.100.66/32"], "{out:#?}");
    let brute = out.decisions.iter().find(|d| d.cidr.to_string() == "198.51.100.66/32").unwrap();
    assert_eq!((brute.rule.as_str(), brute.detail.as_str(), brute.shadow), (REASON_FLEET, "auth", false));
    // Blocked at the line that tipped it, within a second of it: every
    // failure names another user, and 7 distinct users across the fleet
    // (one and a half times the per-host 5) come before 15 failures.
    let mut failures: Vec<i64> = fleet()
        .iter()
        .flat_map(|h| {
            h.events
                .iter()
                .filter(|e| e.kind == EventKind::AuthFailed as i32 && e.remote_port >= 40_000)
                .map(|e| e.time_ms)
                .collect::<Vec<_>>()
        })
        .collect();
    failures.sort();
    assert!(
        brute.time_ms >= failures[6] && brute.time_ms - failures[6] < 1_000,
        "{} vs {}",
        brute.time_ms,
        failures[6]
    );
    assert!(brute.evidence.contains("distinct users"), "{}", brute.evidence);
    let flood: Vec<&Decision> = out.decisions.iter().filter(|d| d.detail == "slot_exhaustion").collect();
    assert_eq!(flood.len(), 3);
    assert!(flood.iter().all(|d| d.host.as_deref() == Some("mx1") && d.rule == REASON_LOCAL));
    assert_eq!(out.events, fleet().iter().map(|h| h.events.len() as u64).sum::<u64>());
    assert!(out.stored < out.events, "context lines are not stored");
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn a_shadow_candidate_blocks_nothing_and_the_difference_says_so(pool: PgPool) {
    let mut candidate = CorrelateConfig { shadow_rules: vec!["slot_exhaustion".into()], ..Default::default() };
    candidate.rules.insert("auth".into(), RuleTable { enforce: Some(false), ..RuleTable::default() });
    let options = Options { smtp_accept_max: 20, ..Options::default() };
    let shadow = run(&pool, &fleet(), &candidate, &options, &|_| {}).await.unwrap();
    assert!(blocked(&shadow).is_empty(), "{shadow:#?}");
    let recorded: Vec<String> = shadow.decisions.iter().filter(|d| d.shadow).map(|d| d.cidr.to_string()).collect();
    assert_eq!(recorded.len(), 4, "{recorded:?}");
    // The live policy, replayed in a fresh database, blocks them: the
    // difference lists every one as "live only".
    let scratch =
        sqlx::postgres::PgPoolOptions::new().connect_with(pool.connect_options().as_ref().clone()).await.unwrap();
    sqlx::query("truncate agents cascade").execute(&scratch).await.unwrap();
    sqlx::query("truncate sender_standing, evidence_minutes, auth_users").execute(&scratch).await.unwrap();
    let live = run(&scratch, &fleet(), &CorrelateConfig::default(), &options, &|_| {}).await.unwrap();
    let diff = Difference::of(&shadow, &live);
    assert_eq!(diff.only_live.len(), 4);
    assert!(diff.only_candidate.is_empty() && diff.both.is_empty());
    let text = render(&shadow, &live, &diff);
    assert!(text.contains("[shadow]") && text.contains("- 198.51.100.66/32"), "{text}");
}
