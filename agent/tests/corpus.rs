//! Corpus tests: every line of the real Exim 4.96 log and every fenced sample
//! of `PUBLIC_SAMPLES.md` (in `shared/corpus/exim`, next to the repository)
//! is classified, and the kind and address are checked against an oracle
//! written independently of the parser: a table of Exim phrases and a
//! plain "first bracketed address outside a HELO and not after I=" rule.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use fleetban_agent::parse::{EventKind, Parser, Timezone, parse_line};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/exim");

fn read(name: &str) -> String {
    let path = format!("{CORPUS}/{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// The kind a line reports, by phrase (first match wins).
fn oracle_kind(line: &str) -> Option<EventKind> {
    use EventKind::*;
    let has = |p: &str| line.contains(p);
    // Delivery-side and scanner-plugin lines name remote servers, not clients.
    if has(" => ") || has(" == ") || has(" ** ") || has(" SA: Action:") || has("Connection timed out") {
        return None;
    }
    let table: &[(&[&str], EventKind)] = &[
        (&["(TCP/IP connection count = "], Connect),
        (&["refused: too many connections from that IP address"], RefusedPerHost),
        (&["refused: too many connections"], RefusedTooMany),
        (&["refused: load average"], RefusedLoad),
        (&["authenticator failed for", ": 5"], AuthFailed),
        (&["rejected RCPT", "relay not permitted"], RelayDenied),
        (&["rejected RCPT", "Rejected relay attempt"], RelayDenied),
        (&["rejected RCPT", "SMTP AUTH is required"], RelayDenied),
        (&["rejected RCPT"], RcptRejected),
        (&["sender verify fail"], RcptRejected),
        (&["rejected after DATA"], RcptRejected),
        (&["rejected by local_scan"], RcptRejected),
        (&["rejected from "], RcptRejected),
        (&["synchronization error"], SyncError),
        (&["too many nonmail commands"], TooManyNonmail),
        (&["too many syntax or protocol errors"], TooManySyntax),
        (&["too many unrecognized commands"], TooManyUnrecognized),
        (&["SMTP protocol error in"], ProtocolError),
        (&["SMTP syntax error in"], SyntaxError),
        (&["no MAIL in SMTP connection"], NoMail),
        (&["ACL: forcibly dropped"], AclDropped),
        (&["dropped by 'connect' ACL"], AclDropped),
        (&["rejected connection in \"connect\" ACL"], AclRejected),
        (&["unqualified verify rejected"], AclRejected),
        (&["closed by DROP in ACL"], ClosedByDrop),
        (&["SMTP connection", " closed by QUIT"], Closed),
        (&["SMTP connection", " lost"], Lost),
        (&["SMTP command timeout on "], CommandTimeout),
        (&["SMTP data timeout "], CommandTimeout),
        (&["TLS error on connection from"], TlsError),
        (&["no host name found for IP address"], NoHostName),
        (&["no IP address found for host"], NoHostName),
        (&[" <= ", " H="], Accepted),
    ];
    table.iter().find(|(phrases, _)| phrases.iter().all(|p| has(p))).map(|(_, k)| *k)
}

/// The client address by a simple rule: the first `[addr]` that is not
/// inside `(...)` (a HELO) and not right after `I=`; or the bare address of
/// `no host name found for IP address <ip>`.
fn oracle_ip(line: &str) -> Option<IpAddr> {
    if let Some(i) = line.find("no host name found for IP address ") {
        return line[i + 34..].parse().ok();
    }
    if let Some(i) = line.find("(during SMTP connection from [") {
        let rest = &line[i + 30..];
        return rest[..rest.find(']')?].parse().ok();
    }
    let b = line.as_bytes();
    let mut depth = 0i32;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'(' => depth += 1,
            b')' => depth = (depth - 1).max(0),
            b'[' if depth == 0 && !line[..i].ends_with("I=") => {
                let close = line[i..].find(']')? + i;
                let inner = &line[i + 1..close];
                // `[pid]` and munged test-suite addresses are not addresses.
                if inner.bytes().all(|c| c.is_ascii_digit()) || inner.contains("ip4") || inner.contains("V4NET") {
                    if inner.bytes().all(|c| c.is_ascii_digit()) {
                        continue;
                    }
                    return None;
                }
                let ip: IpAddr = inner.parse().ok()?;
                return Some(match ip {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                    v4 => v4,
                });
            }
            _ => {}
        }
    }
    None
}

/// Phrases that mark a line as reporting misbehaviour.
const ABUSE_PHRASES: &[&str] = &[
    "refused",
    "rejected",
    "failed",
    "fail for",
    "dropped",
    "DROP",
    "too many",
    "error",
    "timeout",
    "lost",
    "no MAIL",
    "not permitted",
];

/// The fail2ban injection sample: the oracle's simple rule is fooled by it
/// (by design of the attack); the parser must not be.
const INJECTION: &str = "2017-11-28 14:14:32 SMTP protocol error in \"aUtH lOgIn\" H=(test) [8.8.8.8]\" H=(roxzgj) [192.0.2.6] AUTH command used when not advertised";

/// Checks one line against the oracle; returns the parsed kind.
fn check(line: &str, failures: &mut Vec<String>) -> Option<EventKind> {
    let got = parse_line(line.as_bytes());
    let want_kind = oracle_kind(line);
    let want_ip = oracle_ip(line);
    if line == INJECTION {
        let ok =
            got.is_some_and(|e| e.kind == EventKind::ProtocolError && e.ip == "192.0.2.6".parse::<IpAddr>().unwrap());
        if !ok {
            failures.push(format!("injection: got {got:?}"));
        }
        return got.map(|e| e.kind);
    }
    match (want_kind, want_ip, got) {
        (Some(kind), Some(ip), Some(e)) if e.kind == kind && e.ip == ip => {}
        (Some(_), Some(_), got) => {
            failures.push(format!("want {want_kind:?} {want_ip:?}, got {:?}: {line}", got.map(|e| (e.kind, e.ip))))
        }
        // No client address (local `U=CALLER` sessions, munged test-suite addresses) or no known phrase.
        (_, _, None) => {}
        (_, _, Some(e)) => failures.push(format!("unexpected {:?} {}: {line}", e.kind, e.ip)),
    }
    // No line that names a client address together with an abuse phrase is ignored.
    let abusive = want_ip.is_some() && ABUSE_PHRASES.iter().any(|p| line.contains(p));
    let exempt = oracle_kind(line).is_none() && (line.contains(" == ") || line.contains(" ** ") || line.contains("Connection timed out"))
        // Temporary (4xx) authentication failures: the backend is down, not the client at fault.
        || (line.contains("authenticator failed") && line.contains(": 4"));
    if abusive && !exempt && got.is_none() {
        failures.push(format!("abuse line ignored: {line}"));
    }
    got.map(|e| e.kind)
}

#[test]
fn real_exim_log_is_fully_classified() {
    let text = read("real-exim-4.96-full-selectors.log");
    let mut failures = Vec::new();
    let mut parser = Parser::new(Timezone::Utc);
    let mut by_kind: BTreeMap<EventKind, BTreeMap<IpAddr, u32>> = BTreeMap::new();
    let mut max_count = 0;
    for line in text.lines() {
        let stateful = parser.feed(line.as_bytes());
        if line.starts_with(' ') {
            assert!(stateful.is_none(), "continuation line parsed: {line}");
            continue;
        }
        let kind = check(line, &mut failures);
        assert_eq!(stateful.map(|e| e.kind), kind, "{line}");
        if let Some(e) = stateful {
            *by_kind.entry(e.kind).or_default().entry(e.ip).or_default() += 1;
            max_count = max_count.max(e.count.unwrap_or(0));
            if e.kind != EventKind::Accepted {
                assert!(e.local_ip.is_some(), "I= missing: {line}");
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    let stats = parser.stats();
    assert_eq!(stats.lines, text.lines().count() as u64);
    assert_eq!(stats.continuations, 2);

    // The scenario the log was recorded from (see the corpus README).
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let addrs = |k: EventKind| by_kind.get(&k).map(|m| m.keys().copied().collect::<BTreeSet<_>>()).unwrap_or_default();
    let total = |k: EventKind| by_kind.get(&k).map_or(0, |m| m.values().sum::<u32>());
    let flood: BTreeSet<IpAddr> = ["192.0.2.100", "192.0.2.101", "192.0.2.102", "192.0.2.103"].map(ip).into();
    assert_eq!(max_count, 20, "smtp_accept_max = 20 is reached");
    assert_eq!(addrs(EventKind::RefusedTooMany), flood);
    assert_eq!(total(EventKind::RefusedTooMany), 20);
    assert_eq!(addrs(EventKind::AuthFailed), [ip("192.0.2.110"), ip("2001:db8::66")].into());
    assert_eq!(total(EventKind::AuthFailed), 8);
    assert_eq!(addrs(EventKind::RelayDenied), [ip("192.0.2.111")].into());
    assert_eq!(total(EventKind::RelayDenied), 3);
    assert_eq!(addrs(EventKind::TooManyNonmail), [ip("192.0.2.113")].into());
    assert_eq!(addrs(EventKind::TooManyUnrecognized), [ip("192.0.2.114")].into());
    assert_eq!(addrs(EventKind::SyntaxError), [ip("192.0.2.114")].into());
    assert_eq!(addrs(EventKind::Accepted), [ip("192.0.2.50")].into());
    assert_eq!(total(EventKind::Accepted), 2);
    assert!(addrs(EventKind::Lost).is_superset(&[ip("192.0.2.112"), ip("192.0.2.115"), ip("192.0.2.116")].into()));
    // The local interface never shows up as a client.
    assert!(by_kind.values().all(|m| !m.contains_key(&ip("192.0.2.10")) && !m.contains_key(&ip("2001:db8::10"))));
}

/// The fenced sample lines of PUBLIC_SAMPLES.md, with their `## ` group.
fn samples() -> Vec<(String, String)> {
    let text = read("PUBLIC_SAMPLES.md");
    let mut group = String::new();
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(g) = line.strip_prefix("## ") {
            group = g.to_owned();
        } else if line.starts_with("```") {
            fenced = !fenced;
        } else if fenced && !line.trim().is_empty() {
            out.push((group.clone(), line.to_owned()));
        }
    }
    out
}

#[test]
fn public_samples_are_classified_per_group() {
    use EventKind::*;
    let samples = samples();
    assert!(samples.len() > 200, "only {} samples extracted", samples.len());
    // What each group may produce; every group must produce its main kind.
    let groups: &[(&str, &[EventKind], EventKind)] = &[
        ("Connection opened", &[Connect], Connect),
        ("Daemon-level refusals", &[RefusedTooMany], RefusedTooMany),
        ("Connect-ACL rejections", &[ClosedByDrop, AclDropped, AclRejected], AclRejected),
        ("Connection closed / lost", &[Lost, Closed], Lost),
        ("Timeouts", &[CommandTimeout], CommandTimeout),
        ("Authentication failures", &[AuthFailed], AuthFailed),
        ("Relay attempts", &[RelayDenied], RelayDenied),
        ("SMTP protocol synchronization errors", &[SyncError], SyncError),
        ("`SMTP call from", &[TooManyNonmail, TooManySyntax, TooManyUnrecognized], TooManySyntax),
        ("SMTP protocol / syntax errors", &[ProtocolError, SyntaxError], ProtocolError),
        ("`no MAIL in SMTP connection`", &[NoMail], NoMail),
        ("Host lookup failures", &[NoHostName], NoHostName),
        ("TLS errors", &[TlsError], TlsError),
        ("Other RCPT/DATA/sender-verify rejections", &[RcptRejected], RcptRejected),
        ("Message-id bearing lines", &[Accepted], Accepted),
    ];
    let mut failures = Vec::new();
    let mut seen: BTreeMap<&str, BTreeSet<EventKind>> = BTreeMap::new();
    for (group, line) in &samples {
        let (name, allowed, _) = groups
            .iter()
            .find(|(prefix, _, _)| group.starts_with(prefix))
            .unwrap_or_else(|| panic!("group without expectations: {group}"));
        if let Some(kind) = check(line, &mut failures) {
            if !allowed.contains(&kind) {
                failures.push(format!("{kind:?} not expected in group {name}: {line}"));
            }
            seen.entry(name).or_default().insert(kind);
        }
    }
    for (name, _, main) in groups {
        if !seen.get(name).is_some_and(|s| s.contains(main)) {
            failures.push(format!("group {name} produced no {main:?}"));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn fail2ban_injection_case() {
    let e = parse_line(INJECTION.as_bytes()).expect("event");
    assert_eq!(e.kind, EventKind::ProtocolError);
    assert_eq!(e.ip, "192.0.2.6".parse::<IpAddr>().unwrap());
    assert!(samples().iter().any(|(_, l)| l == INJECTION), "the sample is in the corpus");
}

/// The framing vectors: client text (a HELO with spaces, a reverse-DNS
/// name, a sender, a quoted command) that carries a second, well-formed
/// host. `8.8.8.8` is the framed address, `198.51.100.x` the real client.
const FRAMING: &[&str] = &[
    "2026-11-27 01:58:00 [9001] dovecot_login authenticator failed for (x) [8.8.8.8]:25 (y) [198.51.100.88]:1234 I=[192.0.2.10]:25: 535 Incorrect authentication data (set_id=a@b.test)",
    "2026-11-27 01:58:00 [9001] dovecot_login authenticator failed for (x) [8.8.8.8]:25: 535 Incorrect authentication data (y) [198.51.100.88]:1234: 535 Incorrect authentication data",
    "2026-11-27 01:58:00 [9001] SMTP protocol error in \"AUTH LOGIN\" H=(x) [8.8.8.8]:25 (y) [198.51.100.88]:1234 I=[192.0.2.10]:25 AUTH command used when not advertised",
    "2026-11-27 01:58:00 [9001] SMTP syntax error in \"GET / HTTP/1.1\" H=(x) [8.8.8.8]:25 (y) [198.51.100.88]:1234 I=[192.0.2.10]:25 unrecognized command",
    "2026-11-27 01:58:00 [9001] SMTP protocol synchronization error (next input sent too soon: pipelining was not advertised): rejected \"RSET\" H=(x) [8.8.8.8]:25 (y) [198.51.100.88]:1234 I=[192.0.2.10]:25 next input=\"QUIT\\r\\n\"",
    "2026-11-27 01:58:00 [9001] TLS error on connection from (x) [8.8.8.8]:25 (y) [198.51.100.88]:1234 I=[192.0.2.10]:25 (SSL_accept): error:0A000126:SSL routines::unexpected eof while reading",
    "2026-11-27 01:58:00 [9001] no IP address found for host evil (during SMTP connection from [8.8.8.8]:25) x (during SMTP connection from [198.51.100.88]:1234 I=[192.0.2.10]:25)",
    "2026-11-27 01:58:00 [9001] H=evil [8.8.8.8]:25 x.example [198.51.100.88]:1234 I=[192.0.2.10]:25 F=<a@b.test> rejected RCPT <c@d.test>: relay not permitted",
    "2026-11-27 01:58:00 [9001] rejected from <x> H=(z) [8.8.8.8]:25 y> H=(h) [198.51.100.83]:1234: sender verify failed",
    "2026-11-27 01:58:00 [9001] H=(h) [198.51.100.83]:1234 I=[192.0.2.10]:25 sender verify fail for <x> H=(z) [8.8.8.8]:25 y>: Unrouteable address",
    // fail2ban's injection with a fake host that is followed by a space.
    "2017-11-28 14:14:32 SMTP protocol error in \"aUtH lOgIn\" H=(test) [8.8.8.8] \" H=(roxzgj) [192.0.2.6] AUTH command used when not advertised",
];

#[test]
fn framing_lines_in_the_real_log_are_counted_and_change_nothing_else() {
    let text = read("real-exim-4.96-full-selectors.log");
    let tally = |lines: &mut dyn Iterator<Item = &str>| {
        let mut parser = Parser::new(Timezone::Utc);
        let mut events: BTreeMap<(EventKind, IpAddr), u32> = BTreeMap::new();
        for line in lines {
            if let Some(e) = parser.feed(line.as_bytes()) {
                *events.entry((e.kind, e.ip)).or_default() += 1;
            }
        }
        (events, parser.stats())
    };
    let (clean, clean_stats) = tally(&mut text.lines());
    assert_eq!(clean_stats.ambiguous, 0, "no line of the real log is ambiguous");
    // Twelve copies of every vector, spread through the log.
    let mut mixed: Vec<&str> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        mixed.push(line);
        if i % 10 == 0 && i / 10 < 12 {
            mixed.extend(FRAMING);
        }
    }
    let injected = 12 * FRAMING.len() as u64;
    let (framed, stats) = tally(&mut mixed.iter().copied());
    assert_eq!(framed, clean, "the legitimate lines yield the same events, the framing lines none");
    assert_eq!(stats.ambiguous, injected);
    assert_eq!(stats.events, clean_stats.events);
    assert_eq!(stats.ignored, clean_stats.ignored + injected);
    let fake: IpAddr = "8.8.8.8".parse().unwrap();
    assert!(framed.keys().all(|(_, ip)| *ip != fake));
}

#[test]
fn public_samples_have_no_ambiguous_line() {
    let mut parser = Parser::new(Timezone::Utc);
    let mut ambiguous = Vec::new();
    for (_, line) in samples() {
        let before = parser.stats().ambiguous;
        let _ = parser.feed(line.as_bytes());
        if parser.stats().ambiguous > before {
            ambiguous.push(line);
        }
    }
    assert!(ambiguous.is_empty(), "ambiguous samples: {ambiguous:#?}");
}
