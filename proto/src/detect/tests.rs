use super::*;
use crate::policy::RuleTable;
use crate::v1::RulePolicy;

const T0: i64 = 1_800_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn detector() -> Detector {
    Detector::new(Thresholds::default(), 100_000, vec![], Arc::default())
}

fn with(th: Thresholds) -> Detector {
    Detector::new(th, 100_000, vec![], Arc::default())
}

fn obs(kind: EventKind, addr: &str, port: u16, t: i64) -> Observation<'static> {
    Observation {
        kind,
        ip: ip(addr),
        port: (port > 0).then_some(port),
        count: None,
        user: None,
        host_name: None,
        time_ms: t,
        attempts: 0,
    }
}

fn feed(d: &mut Detector, o: Observation<'_>) -> Vec<Decision> {
    d.observe(&o, o.time_ms)
}

fn connect(d: &mut Detector, addr: &str, port: u16, count: u32, t: i64) -> Vec<Decision> {
    feed(d, Observation { count: Some(count), ..obs(EventKind::Connect, addr, port, t) })
}

fn nets(decisions: &[Decision]) -> Vec<String> {
    let mut v: Vec<String> = decisions.iter().map(|d| d.net.to_string()).collect();
    v.sort();
    v
}

/// A host with `smtp_accept_max = 20`: three flooders open and hold 6
/// sessions each while a legitimate MTA keeps connecting, saying QUIT and
/// being refused once the host is full. Only the flooders are blocked.
#[test]
fn slot_flood_blocks_only_the_holders_never_the_refused_mta() {
    let mut d = with(Thresholds { smtp_accept_max: 20, ..Thresholds::default() });
    let mut t = T0;
    let mut open = 0;
    let mut port = 40_000;
    let mut decided = Vec::new();
    let flooders = ["198.51.100.1", "198.51.100.2", "198.51.100.3"];
    let legit = "203.0.113.25";
    for round in 0..6 {
        for f in flooders {
            t += 50;
            port += 1;
            open += 1;
            decided.extend(connect(&mut d, f, port, open, t));
        }
        // The legitimate MTA: a whole session, then its end.
        t += 50;
        port += 1;
        decided.extend(connect(&mut d, legit, port, open + 1, t));
        t += 200;
        decided.extend(feed(&mut d, obs(EventKind::Closed, legit, port, t)));
        if round < 5 {
            assert!(decided.is_empty(), "round {round}: {decided:?}");
        }
    }
    // 18 open: the next flood connect reaches 19 of 20 (>= 0.9 * 20).
    t += 50;
    port += 1;
    open += 1;
    decided.extend(connect(&mut d, flooders[0], port, open, t));
    // The legitimate MTA is now refused, again and again.
    for i in 0..5 {
        t += 300;
        decided.extend(feed(&mut d, obs(EventKind::RefusedTooMany, legit, 50_000 + i, t)));
    }
    assert_eq!(nets(&decided), ["198.51.100.1/32", "198.51.100.2/32", "198.51.100.3/32"]);
    assert!(decided.iter().all(|x| x.rule == Rule::SlotExhaustion && !x.shadow));
    // The alarm came when the MTA's own connect made 19 of 20: the
    // flooders held 6 each, the MTA one.
    assert!(decided[0].evidence.contains("holds 6 of 18 open sessions (ceiling 20"), "{}", decided[0].evidence);
    assert_eq!(d.open_sessions(), 19);
}

/// An address that made many connections, each closed, holds nothing: a
/// busy legitimate sender is never a slot holder, even when the host fills
/// up with other traffic.
#[test]
fn closed_and_refused_sessions_hold_no_slot() {
    let mut d = with(Thresholds { smtp_accept_max: 20, ..Thresholds::default() });
    let mut t = T0;
    // 15 sessions from a big sender, each closed (QUIT, lost, timeout, drop, no MAIL).
    let ends =
        [EventKind::Closed, EventKind::Lost, EventKind::CommandTimeout, EventKind::NoMail, EventKind::ClosedByDrop];
    for i in 0..15u16 {
        t += 10;
        assert!(connect(&mut d, "192.0.2.25", 30_000 + i, 1, t).is_empty());
        t += 10;
        assert!(feed(&mut d, obs(ends[usize::from(i) % ends.len()], "192.0.2.25", 30_000 + i, t)).is_empty());
    }
    // Twenty one-off senders fill the host; refusals follow.
    for i in 0..20u32 {
        t += 10;
        connect(&mut d, &format!("203.0.113.{i}"), 1_000, i + 1, t);
    }
    let fired = feed(&mut d, obs(EventKind::RefusedTooMany, "192.0.2.25", 31_000, t + 1));
    assert!(fired.is_empty(), "{fired:?}");
    assert_eq!(d.open_sessions(), 20);
}

#[test]
fn sessions_without_an_end_age_out() {
    let mut d = with(Thresholds { smtp_accept_max: 20, session_timeout_ms: 300_000, ..Thresholds::default() });
    for i in 0..10u16 {
        connect(&mut d, "198.51.100.9", 20_000 + i, 1 + u32::from(i), T0 + i64::from(i));
    }
    assert_eq!(d.open_sessions(), 10);
    // Ten minutes later the host fills with others: the old ones are gone.
    let t = T0 + 600_000;
    for i in 0..19u32 {
        connect(&mut d, &format!("203.0.113.{i}"), 2_000, i + 1, t + i64::from(i));
    }
    assert_eq!(d.open_sessions(), 19);
    assert!(feed(&mut d, obs(EventKind::RefusedTooMany, "192.0.2.1", 1, t + 100)).is_empty());
}

#[test]
fn without_ports_sessions_are_matched_by_address() {
    let mut d = with(Thresholds { smtp_accept_max: 10, ..Thresholds::default() });
    let mut t = T0;
    for i in 0..5 {
        t += 10;
        connect(&mut d, "198.51.100.4", 0, i + 1, t);
    }
    for _ in 0..4 {
        t += 10;
        feed(&mut d, obs(EventKind::Closed, "198.51.100.4", 0, t));
    }
    assert_eq!(d.open_sessions(), 1);
    for i in 0..4 {
        t += 10;
        connect(&mut d, "198.51.100.5", 0, i + 2, t);
    }
    // 5 open of 10, no alarm yet; a refusal raises it: .5 holds 4, .4 holds 1.
    let fired = feed(&mut d, obs(EventKind::RefusedTooMany, "192.0.2.7", 0, t + 1));
    assert_eq!(nets(&fired), ["198.51.100.5/32"]);
}

#[test]
fn ceiling_is_learned_from_the_global_refusal() {
    let mut d = detector();
    let mut t = T0;
    // A 20-slot host whose config is not known: two flooders, 10 each.
    for i in 0..20u32 {
        t += 10;
        let who = if i % 2 == 0 { "198.51.100.10" } else { "198.51.100.11" };
        assert!(connect(&mut d, who, 10_000 + i as u16, i + 1, t).is_empty(), "20 of an assumed 100 is no alarm");
    }
    assert_eq!(d.ceiling(), DEFAULT_SLOT_CEILING);
    let fired = feed(&mut d, obs(EventKind::RefusedTooMany, "203.0.113.3", 9, t + 5));
    assert_eq!(d.ceiling(), 20);
    assert_eq!(nets(&fired), ["198.51.100.10/32", "198.51.100.11/32"]);
}

#[test]
fn stale_refusals_raise_no_alarm() {
    let mut d = with(Thresholds { smtp_accept_max: 20, ..Thresholds::default() });
    let old = T0 - 600_000;
    for i in 0..19u32 {
        d.observe(
            &Observation { count: Some(i + 1), ..obs(EventKind::Connect, "198.51.100.12", 1 + i as u16, old) },
            T0,
        );
    }
    let fired = d.observe(&obs(EventKind::RefusedTooMany, "203.0.113.1", 5, old + 1), T0);
    assert!(fired.is_empty(), "a backlog ten minutes old describes slots long gone");
}

#[test]
fn conn_rate_fires_at_30_within_60_s_and_good_standing_doubles_it() {
    let mut d = detector();
    for i in 0..30 {
        assert!(connect(&mut d, "192.0.2.1", 1, 1, T0 + i * 2_100).is_empty(), "fired at {i}");
    }
    let mut d = detector();
    for i in 0..29 {
        assert!(connect(&mut d, "192.0.2.1", i as u16, 1, T0 + i * 1_000).is_empty());
    }
    let fired = connect(&mut d, "192.0.2.1", 99, 1, T0 + 29_000);
    assert_eq!(fired.len(), 1);
    assert_eq!((fired[0].rule, fired[0].ttl_secs), (Rule::ConnRate, 3600));
    // A sender that delivers: 45 connects a minute are not enough.
    let mut d = detector();
    feed(&mut d, obs(EventKind::Accepted, "192.0.2.2", 1, T0));
    for i in 0..59 {
        assert!(connect(&mut d, "192.0.2.2", i as u16, 1, T0 + i * 1_000).is_empty(), "{i}");
    }
    assert_eq!(connect(&mut d, "192.0.2.2", 99, 1, T0 + 59_500).len(), 1);
}

fn auth_fail(d: &mut Detector, addr: &str, user: &'static str, t: i64) -> Vec<Decision> {
    feed(d, Observation { user: Some(user), ..obs(EventKind::AuthFailed, addr, 1, t) })
}

#[test]
fn auth_brute_force_blocks_and_legitimate_lookalikes_do_not() {
    // Brute force: 10 failures of one user within the hour.
    let mut d = detector();
    for i in 0..9 {
        assert!(auth_fail(&mut d, "192.0.2.5", "info@example.com", T0 + i * 60_000).is_empty());
    }
    let fired = auth_fail(&mut d, "192.0.2.5", "info@example.com", T0 + 540_000);
    assert_eq!(fired.iter().map(|f| f.rule).collect::<Vec<_>>(), [Rule::Scenario(Scenario::Auth)]);
    // Password spraying: 5 distinct users.
    let users = ["a", "b", "c", "d", "e"];
    for (i, u) in users.iter().enumerate() {
        let fired = auth_fail(&mut d, "192.0.2.6", u, T0 + i as i64 * 1_000);
        assert_eq!(fired.len(), usize::from(i == 4), "{u}");
    }
    // A phone retrying a stale password every 10 minutes: 6 an hour, never.
    let mut d = detector();
    for i in 0..48 {
        assert!(auth_fail(&mut d, "198.51.100.70", "me@example.org", T0 + i * 600_000).is_empty(), "{i}");
    }
    // An office NAT: typos now and then, logins that succeed in between.
    let mut d = detector();
    let users = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"];
    for (i, u) in users.iter().enumerate() {
        let t = T0 + i as i64 * 120_000;
        assert!(auth_fail(&mut d, "203.0.113.80", u, t).is_empty(), "{u}");
        feed(&mut d, Observation { user: Some(u), ..obs(EventKind::Accepted, "203.0.113.80", 2, t + 30_000) });
    }
}

#[test]
fn unknown_recipients_from_a_delivering_sender_are_not_a_dictionary_attack() {
    let mut d = detector();
    feed(&mut d, obs(EventKind::Accepted, "192.0.2.40", 1, T0));
    for i in 0..500 {
        assert!(feed(&mut d, obs(EventKind::RcptRejected, "192.0.2.40", 1, T0 + i * 100)).is_empty());
    }
    let mut fired = Vec::new();
    for i in 0..30 {
        fired.extend(feed(&mut d, obs(EventKind::RcptRejected, "198.51.100.40", 1, T0 + i * 100)));
    }
    assert_eq!(nets(&fired), ["198.51.100.40/32"]);
    assert_eq!(fired[0].rule, Rule::Scenario(Scenario::Dictionary));
}

#[test]
fn protected_senders_are_never_blocked_locally() {
    let mut d = with(Thresholds { smtp_accept_max: 20, ..Thresholds::default() });
    let google = Some("mail-wr1-f45.google.com");
    let mut t = T0;
    for i in 0..19u32 {
        t += 10;
        let o = Observation {
            count: Some(i + 1),
            host_name: google,
            ..obs(EventKind::Connect, "209.85.221.45", 1 + i as u16, t)
        };
        assert!(feed(&mut d, o).is_empty());
    }
    for _ in 0..100 {
        t += 10;
        assert!(feed(&mut d, obs(EventKind::SyncError, "209.85.221.45", 7, t)).is_empty());
    }
    assert!(feed(&mut d, obs(EventKind::RefusedTooMany, "203.0.113.1", 5, t)).is_empty());
    assert!(d.stats().protected_spared.load(Ordering::Relaxed) > 0);
    // A look-alike name outside the domain is not protected.
    let mut fired = Vec::new();
    for i in 0..10 {
        let o = Observation {
            host_name: Some("mail.evilgoogle.com"),
            ..obs(EventKind::SyncError, "198.51.100.45", 7, t + i)
        };
        fired.extend(feed(&mut d, o));
    }
    assert_eq!(nets(&fired), ["198.51.100.45/32"]);
}

#[test]
fn shadow_rules_decide_but_say_so() {
    let mut th = Thresholds { conn_rate: 3, conn_rate_shadow: true, ..Thresholds::default() };
    th.rules.set(
        Scenario::Relay,
        RuleTable { per_host: Some(2), enforce: Some(false), ..RuleTable::default() }.resolve(Scenario::Relay),
    );
    let mut d = with(th);
    let mut fired = Vec::new();
    for i in 0..3 {
        fired.extend(connect(&mut d, "192.0.2.60", i, 1, T0 + i64::from(i)));
    }
    fired.extend(feed(&mut d, obs(EventKind::RelayDenied, "192.0.2.61", 1, T0)));
    fired.extend(feed(&mut d, obs(EventKind::RelayDenied, "192.0.2.61", 1, T0 + 1)));
    assert_eq!(fired.len(), 2);
    assert!(fired.iter().all(|f| f.shadow), "{fired:?}");
    let stats = d.stats();
    assert_eq!(stats.shadow_decisions[Rule::ConnRate.index()].load(Ordering::Relaxed), 1);
    assert_eq!(stats.decisions[Rule::ConnRate.index()].load(Ordering::Relaxed), 0);
}

#[test]
fn policy_changes_thresholds_rules_and_ipv6_prefix() {
    let mut d = detector();
    d.set_policy(&Policy {
        conn_rate: 3,
        ipv6_block_prefix: 48,
        local_block_ttl_secs: 60,
        rules: vec![
            RulePolicy { name: "slot_exhaustion".into(), shadow: true, ..RulePolicy::default() },
            RulePolicy {
                name: "relay".into(),
                per_host: 2,
                window_secs: 60,
                good_standing_factor: 5,
                ..RulePolicy::default()
            },
            RulePolicy { name: "from_a_newer_server".into(), per_host: 1, ..RulePolicy::default() },
        ],
        protected_domains: vec!["example.net".into()],
        protected_domains_set: true,
        ..Policy::default()
    });
    assert!(d.thresholds().slot_shadow);
    assert_eq!(d.thresholds().rules.get(Scenario::Relay).per_host, 2);
    assert_eq!(d.thresholds().protected_domains, ["example.net"]);
    connect(&mut d, "2001:db8:1:2::1", 1, 1, T0);
    connect(&mut d, "2001:db8:1:3::1", 1, 1, T0 + 1);
    let fired = connect(&mut d, "2001:db8:1:4::1", 1, 1, T0 + 2);
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].net.to_string(), "2001:db8:1::/48");
    assert_eq!(fired[0].ttl_secs, 60);
    d.set_policy(&Policy::default());
    assert_eq!(d.thresholds().conn_rate, 3, "zero fields keep the local values");
}

#[test]
fn excluded_and_stale_events_never_block() {
    let mut d = Detector::new(Thresholds::default(), 100_000, vec!["192.0.2.0/24".parse().unwrap()], Arc::default());
    for i in 0..100 {
        assert!(connect(&mut d, "192.0.2.1", i, 1, T0 + i64::from(i)).is_empty());
    }
    let old = T0 - 7_200_000;
    for i in 0..100 {
        let o = Observation { count: Some(1), ..obs(EventKind::Connect, "198.51.100.1", 1, old + i) };
        assert!(d.observe(&o, T0).is_empty());
    }
    assert_eq!(d.stats().stale_skipped.load(Ordering::Relaxed), 100);
}

#[test]
fn memory_is_bounded_and_evictions_counted() {
    let mut d = Detector::new(Thresholds::default(), 1000, vec![], Arc::default());
    for i in 0..5000u32 {
        let addr = std::net::Ipv4Addr::from(0xC633_6400 + i);
        let t = T0 + i64::from(i);
        d.observe(&Observation { count: Some(1), ..obs(EventKind::Connect, &addr.to_string(), 1, t) }, t);
    }
    assert_eq!(d.tracked(), 1000);
    assert_eq!(d.stats().evictions.load(Ordering::Relaxed), 4000);
    assert!(d.lru.len() <= 2 * 1000 + 64);
    assert!(d.open_sessions() <= 1000);
    assert!(d.open_order.len() <= 2 * 1000 + 64);
}

#[test]
fn wire_events_become_observations() {
    let event = v1::Event {
        time_ms: T0,
        kind: EventKind::Connect as i32,
        remote: Some("::ffff:192.0.2.9".parse::<IpAddr>().unwrap().into()),
        remote_port: 25_000,
        connection_count: 7,
        host_name: "mx.example.net".into(),
        ..v1::Event::default()
    };
    let o = Observation::from_proto(&event).unwrap();
    assert_eq!((o.ip, o.port, o.count, o.host_name), (ip("192.0.2.9"), Some(25_000), Some(7), Some("mx.example.net")));
    assert!(Observation::from_proto(&v1::Event { kind: 0, ..event.clone() }).is_none());
    assert!(Observation::from_proto(&v1::Event { remote: None, ..event }).is_none());
}

/// After an operator's revocation, only evidence seen after it counts: the
/// failures before it (even just short of the threshold) are forgotten, the
/// earlier decision no longer holds back a new one, and the address's open
/// sessions no longer make it a slot holder.
#[test]
fn forget_drops_the_evidence_before_a_revocation() {
    let mut d = detector();
    let need = d.thresholds().rules.get(Scenario::Auth).per_host as i64;
    assert!(need >= 2);
    let mut t = T0;
    // One full burst: blocked.
    let mut decided = Vec::new();
    for _ in 0..need {
        t += 100;
        decided.extend(auth_fail(&mut d, "198.51.100.5", "info", t));
    }
    assert_eq!(nets(&decided), ["198.51.100.5/32"]);
    // The attacker goes on, just short of a second burst.
    for _ in 0..need - 1 {
        t += 100;
        assert!(auth_fail(&mut d, "198.51.100.5", "info", t).is_empty());
    }
    // Without a revocation one more failure would only be held back by the
    // standing decision; the operator unblocks instead.
    t += 100;
    assert_eq!(d.forget("198.51.100.5/32".parse().unwrap(), t), 2, "the evidence and the decision");
    t += 100;
    assert!(auth_fail(&mut d, "198.51.100.5", "info", t).is_empty(), "old evidence must not re-block");
    let mut again = Vec::new();
    for _ in 1..need {
        t += 100;
        again.extend(auth_fail(&mut d, "198.51.100.5", "info", t));
    }
    assert_eq!(nets(&again), ["198.51.100.5/32"], "new evidence after the revocation blocks again");
    // A neighbour's evidence is untouched by the revocation.
    let mut other = detector();
    for _ in 0..need - 1 {
        t += 100;
        other.observe(&Observation { user: Some("x"), ..obs(EventKind::AuthFailed, "198.51.100.6", 1, t) }, t);
    }
    assert_eq!(other.forget("198.51.100.5/32".parse().unwrap(), t + 1), 0);
    t += 100;
    assert_eq!(nets(&auth_fail(&mut other, "198.51.100.6", "x", t)), ["198.51.100.6/32"]);
}

/// Sessions opened before the revocation are not slot evidence afterwards.
#[test]
fn forget_drops_open_sessions_opened_before_it() {
    let mut d = with(Thresholds { smtp_accept_max: 20, ..Thresholds::default() });
    let mut t = T0;
    for port in 0..6u16 {
        t += 10;
        connect(&mut d, "198.51.100.7", 40_000 + port, u32::from(port) + 1, t);
    }
    assert_eq!(d.open_sessions(), 6);
    t += 10;
    d.forget("198.51.100.0/24".parse().unwrap(), t);
    assert_eq!(d.open_sessions(), 0);
    // The host fills up with others: the forgiven address holds nothing.
    let mut decided = Vec::new();
    for i in 0..18u16 {
        t += 10;
        decided.extend(connect(&mut d, "203.0.113.9", 41_000 + i, 19, t));
    }
    assert!(!nets(&decided).contains(&"198.51.100.7/32".to_owned()), "{decided:?}");
}

/// Revocations too old to matter are skipped; recent ones are applied.
#[test]
fn forget_revoked_skips_revocations_older_than_any_window() {
    let mut d = detector();
    let need = d.thresholds().rules.get(Scenario::Auth).per_host as i64;
    let mut t = T0;
    for _ in 0..need - 1 {
        t += 100;
        auth_fail(&mut d, "198.51.100.5", "info", t);
    }
    let range: IpNet = "198.51.100.5/32".parse().unwrap();
    let week_ago = t - 7 * 86_400_000;
    assert_eq!(d.forget_revoked(&[(range, week_ago)], t), 0);
    assert_eq!(d.forget_revoked(&[(range, week_ago), (range, t)], t), 1);
    t += 100;
    assert!(auth_fail(&mut d, "198.51.100.5", "info", t).is_empty(), "the recent revocation was applied");
}
