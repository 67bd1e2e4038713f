//! Corpus tests of the Dovecot parser on real logs
//! (`agent/tests/data/dovecot/`, see its README): every line is classified,
//! and the kind, service, attempts and address of each are checked against
//! an oracle written independently of the parser (Dovecot's phrases and the
//! `rip=` text of the line).

use std::net::IpAddr;

use fleetban_agent::parse::{EventKind, LogKind, Parser, Service, Timezone};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/dovecot");

fn read(name: &str) -> String {
    let path = format!("{DATA}/{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// (kind, service, attempts, client) by phrase; `None` for lines that are
/// not about a client's login.
fn oracle(line: &str) -> Option<(EventKind, Service, u32, IpAddr)> {
    let service = if line.contains(" imap-login: ") {
        Service::Imap
    } else if line.contains(" pop3-login: ") {
        Service::Pop3
    } else {
        return None;
    };
    let rip: IpAddr = line.split(", rip=").nth(1)?.split(',').next()?.parse().ok()?;
    let (kind, attempts) = if line.contains(" Login: ") {
        (EventKind::Login, 0)
    } else if let Some(rest) = line.split("(auth failed, ").nth(1) {
        (EventKind::AuthFailed, rest.split(' ').next()?.parse().ok()?)
    } else if line.contains("Too many invalid commands") || line.contains("Too many bad commands") {
        (EventKind::TooManyUnrecognized, 0)
    } else if line.contains("(no auth attempts") {
        (EventKind::NoAuthAttempts, 0)
    } else {
        return None;
    };
    Some((kind, service, attempts, rip))
}

fn check(name: &str) -> Vec<(EventKind, Service, u32, IpAddr)> {
    let text = read(name);
    let mut parser = Parser::for_kind(LogKind::Dovecot, Timezone::Utc);
    let mut events = Vec::new();
    for line in text.lines() {
        let got = parser.feed(line.as_bytes()).map(|e| (e.kind, e.service, e.attempts, e.ip));
        assert_eq!(got, oracle(line), "{name}: {line}");
        events.extend(got);
    }
    assert_eq!(parser.stats().ambiguous, 0);
    events
}

#[test]
fn the_logins_of_the_end_to_end_test() {
    let events = check("dovecot-2.3.19-logins.log");
    let guesses = |ip: &str, service| {
        let ip: IpAddr = ip.parse().unwrap();
        events.iter().filter(|e| e.0 == EventKind::AuthFailed && e.3 == ip && e.1 == service).map(|e| e.2).sum::<u32>()
    };
    assert_eq!(guesses("198.51.100.40", Service::Imap), 12);
    assert_eq!(guesses("198.51.100.41", Service::Pop3), 12);
    let client: IpAddr = "203.0.113.50".parse().unwrap();
    for service in [Service::Imap, Service::Pop3] {
        assert!(events.contains(&(EventKind::AuthFailed, service, 1, client)));
        assert!(events.contains(&(EventKind::Login, service, 0, client)));
    }
}

#[test]
fn the_protocol_log() {
    let events = check("dovecot-2.3.19-protocol.log");
    let count = |kind| events.iter().filter(|e| e.0 == kind).count();
    assert_eq!(count(EventKind::AuthFailed), 3);
    assert_eq!(count(EventKind::Login), 2);
    assert_eq!(count(EventKind::NoAuthAttempts), 3);
    assert_eq!(count(EventKind::TooManyUnrecognized), 2);
    assert!(events.iter().any(|e| e.0 == EventKind::TooManyUnrecognized && e.1 == Service::Pop3));
}

#[test]
fn the_agent_cli_parses_a_dovecot_log() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fleetban-agent"))
        .args(["parse", "--json", "--tz", "UTC", "--kind", "dovecot"])
        .arg(format!("{DATA}/dovecot-2.3.19-logins.log"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12, "{text}");
    assert!(lines.iter().any(|l| l["kind"] == "auth_failed" && l["service"] == "imap" && l["attempts"] == 3));
    assert!(lines.iter().any(|l| l["kind"] == "login" && l["service"] == "pop3"));
}
