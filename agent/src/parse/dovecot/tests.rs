//! Dovecot lines in every accepted shape, the kinds, and the injection
//! cases of the attribution rule.

use std::net::IpAddr;

use super::super::{EventKind, LogKind, Parser, Service, Timezone, parse_line_as};

fn p(line: &str) -> Option<super::super::Event<'_>> {
    parse_line_as(LogKind::Dovecot, line.as_bytes())
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const KV: &str =
    "user=<alice>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, mpid=24606, secured, session=<prhPjlZhWLF/AAAB>";

#[test]
fn log_path_lines_of_dovecot_2_3() {
    let cases = [
        (
            "Nov 28 13:57:22 imap-login: Info: Disconnected: Aborted login by logging out (auth failed, 3 attempts in 9 secs): user=<alice>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, secured, session=<oD6+jVZhWqh/AAAB>",
            EventKind::AuthFailed,
            Service::Imap,
            3,
            Some("alice"),
        ),
        (
            "Nov 28 13:57:22 imap-login: Info: Disconnected: Aborted login by logging out (no auth attempts in 0 secs): user=<>, rip=203.0.113.7, lip=192.0.2.10, secured, session=<7HxPjlZhTrF/AAAB>",
            EventKind::NoAuthAttempts,
            Service::Imap,
            0,
            None,
        ),
        (
            "Nov 28 13:57:26 imap-login: Info: Login: user=<alice>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, mpid=24606, secured, session=<prhPjlZhWLF/AAAB>",
            EventKind::Login,
            Service::Imap,
            0,
            Some("alice"),
        ),
        (
            "Nov 28 13:57:27 pop3-login: Info: Disconnected: Aborted login by logging out (auth failed, 1 attempts in 1 secs): user=<alice>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, secured, session=<QCWNjlZh0pJ/AAAB>",
            EventKind::AuthFailed,
            Service::Pop3,
            1,
            Some("alice"),
        ),
        (
            "Nov 28 13:57:31 pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, mpid=24812, secured, session=<+uGUjlZh1pJ/AAAB>",
            EventKind::Login,
            Service::Pop3,
            0,
            Some("alice"),
        ),
        (
            "Nov 28 13:57:31 imap-login: Info: Disconnected: Too many invalid commands (no auth attempts in 0 secs): user=<>, rip=203.0.113.7, lip=192.0.2.10, secured, session=<B2jSjlZhKth/AAAB>",
            EventKind::TooManyUnrecognized,
            Service::Imap,
            0,
            None,
        ),
        (
            "Nov 28 13:57:32 pop3-login: Info: Disconnected: Disconnected: Too many bad commands (no auth attempts in 0 secs): user=<>, rip=203.0.113.7, lip=192.0.2.10, secured, session=<G0jajlZh5pJ/AAAB>",
            EventKind::TooManyUnrecognized,
            Service::Pop3,
            0,
            None,
        ),
        (
            "Nov 28 13:57:32 imap-login: Info: Disconnected: Connection closed (auth failed, 1 attempts in 0 secs): user=<alice>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, secured, session=<rSvajlZhLth/AAAB>",
            EventKind::AuthFailed,
            Service::Imap,
            1,
            Some("alice"),
        ),
        (
            "Nov 28 13:57:32 imap-login: Info: Disconnected: Connection closed: SSL_accept() failed: error:14094416:SSL routines:ssl3_read_bytes:sslv3 alert certificate unknown: SSL alert number 46 (no auth attempts in 0 secs): user=<>, rip=203.0.113.7, lip=192.0.2.10, TLS handshaking: SSL_accept() failed: error:14094416:SSL routines:ssl3_read_bytes:sslv3 alert certificate unknown: SSL alert number 46, session=<Ab4ljlZhYth/AAAB>",
            EventKind::TlsError,
            Service::Imap,
            0,
            None,
        ),
        (
            "Nov 28 13:57:32 imap-login: Info: Disconnected (no auth attempts in 0 secs): user=<>, rip=203.0.113.7, lip=192.0.2.10, TLS handshaking failed: Connection closed, session=<Ab4ljlZhYth/AAAB>",
            EventKind::TlsError,
            Service::Imap,
            0,
            None,
        ),
    ];
    for (line, kind, service, attempts, user) in cases {
        let e = p(line).unwrap_or_else(|| panic!("no event: {line}"));
        assert_eq!(e.kind, kind, "{line}");
        assert_eq!(e.service, service, "{line}");
        assert_eq!(e.attempts, attempts, "{line}");
        assert_eq!(e.user, user, "{line}");
        assert_eq!(e.ip, ip("203.0.113.7"), "{line}");
        assert_eq!(e.local_ip, Some(ip("192.0.2.10")), "{line}");
        assert_eq!(e.raw, line.as_bytes());
    }
}

#[test]
fn older_and_newer_phrasings() {
    for line in [
        // 2.2
        "Nov 28 12:00:00 imap-login: Info: Aborted login (auth failed, 2 attempts in 12 secs): user=<bob>, method=PLAIN, rip=198.51.100.4, lip=192.0.2.10, session=<x>",
        "Nov 28 12:00:00 imap-login: Info: Disconnected (auth failed, 2 attempts in 12 secs): user=<bob>, method=LOGIN, rip=198.51.100.4, lip=192.0.2.10, TLS, session=<x>",
        // 2.3.21+ / 2.4
        "Nov 28 12:00:00 imap-login: Info: Login aborted: Connection closed (auth failed, 2 attempts in 12 secs) (auth_failed): user=<bob>, method=PLAIN, rip=198.51.100.4, lip=192.0.2.10, TLS, session=<x>",
    ] {
        let e = p(line).unwrap_or_else(|| panic!("{line}"));
        assert_eq!((e.kind, e.attempts, e.user), (EventKind::AuthFailed, 2, Some("bob")), "{line}");
        assert_eq!(e.ip, ip("198.51.100.4"));
    }
    let e = p("Nov 28 12:00:00 imap-login: Info: Disconnected (auth failed): user=<bob>, rip=198.51.100.4").unwrap();
    assert_eq!(e.attempts, 1);
}

#[test]
fn every_prefix_shape() {
    let body = format!("imap-login: Login: {KV}");
    let info = format!("imap-login: Info: Login: {KV}");
    let lines = [
        format!("Nov 28 12:00:00 {info}"),
        format!("Nov  2 12:00:00 {info}"),
        format!("2026-11-28 12:00:00 {info}"),
        format!("2026-11-28 12:00:00.123 {info}"),
        format!("Nov 28 12:00:00 mail dovecot[812]: {body}"),
        format!("Nov 28 12:00:00 mail dovecot: {body}"),
        format!("Nov 28 12:00:00 mail dovecot[812]: {info}"),
        format!("<22>Nov 28 12:00:00 mail dovecot[812]: {body}"),
        format!("2026-11-28T12:00:00.123456+01:00 mail dovecot[812]: {body}"),
        format!("2026-11-28 12:00:00 mail.example.com dovecot[812]: {body}"),
        format!("<22>1 2026-11-28T12:00:00.003Z mail dovecot 812 - - {body}"),
        format!("<22>1 2026-11-28T12:00:00Z mail dovecot 812 - [meta sequenceId=\"1\\]\"][x a=\"b\"] {body}"),
        format!("<22>1 2026-11-28T12:00:00Z mail dovecot - - - \u{feff}{body}"),
    ];
    for line in &lines {
        let e = p(line).unwrap_or_else(|| panic!("no event: {line}"));
        assert_eq!(e.kind, EventKind::Login, "{line}");
        assert_eq!(e.ip, ip("203.0.113.7"), "{line}");
    }
    assert_eq!(p(&lines[2]).unwrap().time_ms, 1_795_867_200_000);
    assert_eq!(p(&lines[3]).unwrap().time_ms, 1_795_867_200_123);
    assert_eq!(p(&lines[8]).unwrap().time_ms, 1_795_867_200_123 - 3_600_000);
    assert_eq!(p(&lines[10]).unwrap().time_ms, 1_795_867_200_003);
    for line in [
        format!("Nov 28 12:00:00 mail exim[812]: {body}"),
        "Nov 28 12:00:00 auth: Info: passwd-file(alice,203.0.113.7): unknown user".to_owned(),
        "Nov 28 12:00:00 imap(alice)<1><x>: Info: Disconnected: Logged out in=12 out=477".to_owned(),
        format!("Nov 31 12:00:00 {info}"),
        format!("2026-11-28 25:00:00 {info}"),
        format!("<22>1 - mail dovecot 812 - - {body}"),
        format!("<22>1 2026-11-28T12:00:00Z mail postfix 812 - - {body}"),
        format!("<22>1 2026-11-28T12:00:00Z mail dovecot 812 - [unterminated {body}"),
        "Nov 28 12:00:00 imap-login: Info: Login: user=<alice>, method=PLAIN".to_owned(),
        "Nov 28 12:00:00 imap-login: Info: Login: user=<alice>, rip=999.1.1.1".to_owned(),
        "Nov 28 12:00:00 imap-login: Info: Disconnected: Logged out: user=<a>, rip=203.0.113.7".to_owned(),
        "Nov 28 12:00:00 imap-login: Info: Maximum number of connections from user+IP exceeded (mail_max_userip_connections=10): user=<a>, rip=203.0.113.7".to_owned(),
        String::new(),
    ] {
        assert!(p(&line).is_none(), "{line}");
    }
}

#[test]
fn ipv6_and_mapped_addresses() {
    let e = p("Nov 28 12:00:00 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<a>, method=PLAIN, rip=2001:db8::7, lip=2001:db8::1, session=<x>").unwrap();
    assert_eq!((e.ip, e.local_ip), (ip("2001:db8::7"), Some(ip("2001:db8::1"))));
    let e = p("Nov 28 12:00:00 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<a>, method=PLAIN, rip=::ffff:198.51.100.9, lip=::ffff:192.0.2.1, session=<x>").unwrap();
    assert_eq!(e.ip, ip("198.51.100.9"));
}

#[test]
fn a_user_name_never_names_the_client() {
    let injected = [
        "rip=198.51.100.66",
        "x, rip=198.51.100.66",
        "x>, method=PLAIN, rip=198.51.100.66, lip=192.0.2.10, mpid=1, session=<y",
        "x>, rip=198.51.100.66, lip=192.0.2.10, session=<y>, x=<",
        "[198.51.100.66]",
        "x [198.51.100.66]:993",
        "a>, method=PLAIN, rip=198.51.100.66, lip=192.0.2.10): user=<b",
        "Login: user=<x>, rip=198.51.100.66",
    ];
    for user in injected {
        for reason in ["Disconnected (auth failed, 2 attempts in 3 secs)", "Login"] {
            let line = format!(
                "Nov 28 12:00:00 imap-login: Info: {reason}: user=<{user}>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, mpid=2, TLS, session=<z>"
            );
            let e = p(&line).unwrap_or_else(|| panic!("no event: {line}"));
            assert_eq!(e.ip, ip("203.0.113.7"), "{line}");
            assert_eq!(e.local_ip, Some(ip("192.0.2.10")), "{line}");
            assert_eq!(e.user, Some(user), "{line}");
        }
    }
    // A reason cannot be written by a user name: one that claims a failure
    // after the list starts is not read.
    let line = "Nov 28 12:00:00 imap-login: Info: Disconnected (no auth attempts in 0 secs): user=<(auth failed, 99 attempts)>, rip=203.0.113.7, lip=192.0.2.10";
    assert_eq!(p(line).unwrap().kind, EventKind::NoAuthAttempts);
}

#[test]
fn rip_before_user_with_several_rips_is_ambiguous() {
    let line = "Nov 28 12:00:00 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): rip=203.0.113.7, user=<x, rip=198.51.100.66>";
    let mut parser = Parser::for_kind(LogKind::Dovecot, Timezone::Utc);
    assert!(parser.feed(line.as_bytes()).is_none());
    assert_eq!(parser.stats().ambiguous, 1);
    // One rip before the user is still read.
    let line =
        "Nov 28 12:00:00 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): rip=203.0.113.7, user=<x>";
    assert_eq!(p(line).unwrap().ip, ip("203.0.113.7"));
}

#[test]
fn long_user_names_are_cut_at_a_character_boundary() {
    let name = "é".repeat(200);
    let line = format!(
        "Nov 28 12:00:00 imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<{name}>, method=PLAIN, rip=203.0.113.7"
    );
    let user = p(&line).unwrap().user.unwrap();
    assert!(user.len() <= super::MAX_USER_BYTES && user.len() >= super::MAX_USER_BYTES - 1);
    assert!(name.starts_with(user));
}

#[test]
fn zone_less_stamps_take_the_configured_zone() {
    let line = format!("2026-11-28 12:00:00 imap-login: Info: Login: {KV}");
    let tz = Timezone::from_config("Etc/GMT-2").unwrap();
    let mut parser = Parser::for_kind(LogKind::Dovecot, tz);
    let e = parser.feed(line.as_bytes()).unwrap();
    assert_eq!(e.time_ms, 1_795_867_200_000 - 7_200_000);
    assert_eq!(parser.stats().events, 1);
}

#[test]
fn kinds_parse_by_name() {
    assert_eq!("dovecot".parse::<LogKind>().unwrap(), LogKind::Dovecot);
    assert_eq!("exim".parse::<LogKind>().unwrap(), LogKind::Exim);
    assert!("postfix".parse::<LogKind>().is_err());
    // An Exim parser does not read Dovecot lines, nor the other way round.
    let line = format!("Nov 28 12:00:00 mail dovecot[1]: imap-login: Login: {KV}");
    assert!(parse_line_as(LogKind::Exim, line.as_bytes()).is_none());
    let exim = "2026-11-28 12:00:00 dovecot_login authenticator failed for (x) [203.0.113.7]:5 I=[192.0.2.1]:587: 535 Incorrect authentication data (set_id=a)";
    assert!(parse_line_as(LogKind::Exim, exim.as_bytes()).is_some());
    assert!(p(exim).is_none());
}
