//! Property tests: arbitrary bytes never panic, mutated lines never yield an
//! address the line does not contain, and every kind round-trips through
//! the renderer (render -> parse gives the same fields) for IPv4 and IPv6
//! and every prefix variant.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::civil::Civil;
use super::render::{self, MsgId, Style, Wrap};
use super::*;

/// An event with owned text, from which an `Event` can borrow.
#[derive(Debug, Clone)]
struct Owned {
    time_ms: i64,
    kind: EventKind,
    ip: IpAddr,
    port: Option<u16>,
    local: Option<(IpAddr, u16)>,
    count: Option<u32>,
    user: Option<String>,
    helo: Option<String>,
    detail: Option<String>,
    duration_ms: Option<u64>,
}

impl Owned {
    fn event(&self) -> Event<'_> {
        Event {
            time_ms: self.time_ms,
            kind: self.kind,
            ip: self.ip,
            port: self.port,
            local_ip: self.local.map(|l| l.0),
            local_port: self.local.map(|l| l.1),
            count: self.count,
            user: self.user.as_deref(),
            helo: self.helo.as_deref(),
            detail: self.detail.as_deref(),
            duration_ms: self.duration_ms,
            host_name: None,
            service: super::Service::Smtp,
            attempts: 0,
            raw: b"",
        }
    }
}

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        // Any IPv6 address except the IPv4-mapped ones, which parse as IPv4.
        any::<[u16; 8]>().prop_filter_map("mapped", |s| {
            let v6 = Ipv6Addr::from(s);
            v6.to_ipv4_mapped().is_none().then_some(IpAddr::V6(v6))
        }),
    ]
}

fn arb_port() -> impl Strategy<Value = u16> {
    1u16..=65535
}

fn arb_helo() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof!["[a-zA-Z0-9][a-zA-Z0-9.-]{0,20}", "\\[192\\.0\\.2\\.[0-9]{1,2}\\]",])
}

/// The fields a kind carries (see `render::body`), the others `None`.
fn arb_owned() -> impl Strategy<Value = Owned> {
    let base = (
        // Exim's kinds: logins and sessions without authentication are
        // Dovecot's (`dovecot/proptests.rs`).
        proptest::sample::select(
            EventKind::ALL
                .into_iter()
                .filter(|k| !matches!(k, EventKind::Login | EventKind::NoAuthAttempts))
                .collect::<Vec<_>>(),
        ),
        arb_ip(),
        prop::option::of(arb_port()),
        prop::option::of((arb_ip(), arb_port())),
        arb_helo(),
        prop::option::of("[a-z0-9][a-z0-9@._-]{0,24}"),
        prop::option::of(0u64..100_000_000),
        any::<u32>(),
        // 2000-01-01 .. 2090-01-01, milliseconds.
        946_684_800_000i64..3_786_912_000_000,
    );
    (base, any::<u8>(), "[a-z][a-z0-9_]{0,12}", "[A-Za-z][A-Za-z /.]{0,15}", "[a-z]{1,8}@[a-z]{1,8}\\.test").prop_map(
        |((kind, ip, port, local, helo, user, duration, count, time_ms), pick, driver, cmd, sender)| {
            let choose = |items: &[&str]| items[usize::from(pick) % items.len()].to_owned();
            let mut o = Owned {
                time_ms,
                kind,
                ip,
                port,
                local,
                count: None,
                user: None,
                helo: None,
                detail: None,
                duration_ms: None,
            };
            match kind {
                EventKind::Connect => o.count = Some(count),
                EventKind::RefusedTooMany | EventKind::RefusedPerHost => {}
                EventKind::RefusedLoad => o.detail = Some(format!("load average = {}.{:02}", pick / 10, pick % 100)),
                EventKind::AuthFailed => {
                    o.helo = helo;
                    o.user = user;
                    o.detail = Some(driver);
                }
                EventKind::RelayDenied => {
                    o.helo = helo;
                    o.detail = Some(choose(&[
                        "relay not permitted",
                        "Rejected relay attempt: '192.0.2.1'",
                        "SMTP AUTH is required for message submission on port 587",
                    ]));
                }
                EventKind::RcptRejected => {
                    o.helo = helo;
                    o.detail = Some(choose(&[
                        "Unrouteable address",
                        "Unknown user",
                        "Sender verify failed",
                        "No Such User Here",
                    ]));
                }
                EventKind::SyncError => {
                    o.helo = helo;
                    o.detail = Some(choose(&[
                        "input sent without waiting for greeting",
                        "next input sent too soon: pipelining was not advertised",
                        "next input sent too soon: pipelining was advertised",
                    ]));
                }
                EventKind::TooManyNonmail | EventKind::TooManySyntax | EventKind::TooManyUnrecognized => {
                    o.helo = helo;
                    o.detail = Some(cmd);
                }
                EventKind::ProtocolError | EventKind::SyntaxError => {
                    o.helo = helo;
                    o.detail = Some(choose(&[
                        "AUTH command used when not advertised",
                        "unrecognized command",
                        "LOGIN authentication mechanism not supported",
                    ]));
                }
                EventKind::NoMail => {
                    o.helo = helo;
                    o.duration_ms = duration;
                    o.detail =
                        (pick % 3 != 0).then(|| choose(&["EHLO,AUTH,QUIT", "EHLO", "EHLO,STARTTLS,EHLO,AUTH,QUIT"]));
                }
                EventKind::AclRejected => {
                    o.helo = helo;
                    o.detail = Some(choose(&[
                        "Host is ratelimited (1.9/1h max:1.2)",
                        "Host is banned",
                        "550 client disliked",
                    ]));
                }
                EventKind::AclDropped => {
                    o.helo = helo;
                    o.detail = Some(choose(&["Country is banned", "Host is banned"]));
                }
                EventKind::ClosedByDrop => o.helo = helo,
                EventKind::Closed => {
                    o.helo = helo;
                    o.duration_ms = duration;
                }
                EventKind::Unspecified | EventKind::Login | EventKind::NoAuthAttempts => {}
                EventKind::Lost => {
                    o.helo = helo;
                    o.duration_ms = duration;
                    o.detail = (pick % 3 != 0).then(|| {
                        choose(&[
                            "(error: Connection reset by peer)",
                            "while reading message data",
                            "while reading message data (header)",
                            "unexpected disconnection while reading SMTP command",
                            "unexpected disconnection while reading SMTP data (header)",
                            "after final dot",
                            "closed by EOF",
                            "closed after SIGTERM",
                            "closed SIGTERM",
                            "closed SIGINT",
                        ])
                    });
                    if o.detail.as_deref() == Some("after final dot") {
                        o.duration_ms = None;
                    }
                }
                EventKind::CommandTimeout => {
                    o.helo = helo;
                    o.duration_ms = duration;
                    o.detail = (pick % 2 == 0).then(|| "data timeout".to_owned());
                }
                EventKind::TlsError => {
                    o.helo = helo;
                    o.detail = Some(choose(&[
                        "(tls lib accept fn): timed out",
                        "(recv): A TLS fatal alert has been received: Certificate is bad",
                    ]));
                }
                EventKind::NoHostName => {
                    if pick % 2 == 0 {
                        o.detail = Some(format!("host{pick}.example.net"));
                    } else {
                        o.port = None;
                        o.local = None;
                    }
                }
                EventKind::Accepted => {
                    o.helo = helo;
                    o.user = user;
                    o.detail = Some(sender);
                }
            }
            o
        },
    )
}

fn arb_style() -> impl Strategy<Value = Style> {
    (
        any::<bool>(),
        prop::option::of((-48i32..=56).prop_map(|q| q * 15)),
        prop::option::of(1u32..4_000_000),
        prop::sample::select(vec![MsgId::None, MsgId::Old, MsgId::New]),
        prop::sample::select(vec![Wrap::None, Wrap::IsoSyslog, Wrap::BsdSyslog, Wrap::TagFirst]),
        prop::option::of("[a-z][a-z0-9-]{0,10}(\\.[a-z0-9-]{1,10}){0,3}"),
        any::<bool>(),
    )
        .prop_map(|(millis, zone, pid, msgid, wrap, host_name, auth_h_prefix)| Style {
            millis,
            zone_offset_mins: zone,
            pid,
            msgid,
            wrap,
            host_name,
            auth_h_prefix,
        })
}

/// Whether some `[...]` in `line` holds `ip` (mapped forms as IPv4).
fn bracketed(line: &[u8], ip: IpAddr) -> bool {
    let mut rest = line;
    while let Some(open) = memchr::memchr(b'[', rest) {
        rest = &rest[open + 1..];
        let Some(close) = memchr::memchr(b']', rest) else { break };
        if host::parse_ip(&rest[..close]) == Some(ip) {
            return true;
        }
    }
    false
}

/// Whether every host-like `[addr]` of `line` (after a space or `H=`,
/// followed by the end, a space, `:`, `)` or `,`) holds `ip`; written apart
/// from the parser's own scan.
fn host_like_all(line: &[u8], ip: IpAddr) -> bool {
    let mut i = 0;
    while let Some(open) = memchr::memchr(b'[', &line[i..]) {
        let p = i + open;
        i = p + 1;
        let after_space = p > 0 && line[p - 1] == b' ';
        let after_h = p >= 2 && &line[p - 2..p] == b"H=" && (p == 2 || line[p - 3] == b' ');
        let Some(close) = memchr::memchr(b']', &line[p..]).map(|c| p + c) else { break };
        let Some(found) = host::parse_ip(&line[p + 1..close]) else { continue };
        let mut end = close + 1;
        if line.get(end) == Some(&b':') && line.get(end + 1).is_some_and(u8::is_ascii_digit) {
            let digits = line[end + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
            let port: u32 =
                std::str::from_utf8(&line[end + 1..end + 1 + digits]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            if digits > 5 || port == 0 || port > 65_535 {
                continue;
            }
            end += 1 + digits;
        }
        let terminated = matches!(line.get(end), None | Some(b' ' | b':' | b')' | b','));
        if (after_space || after_h) && terminated && found != ip {
            return false;
        }
    }
    true
}

/// Only two formats name the client outside brackets; the others name the
/// one host-like address of the line.
fn address_is_in_line(ev: &Event<'_>, line: &[u8]) -> bool {
    matches!(ev.kind, EventKind::NoHostName | EventKind::RelayDenied)
        || (bracketed(line, ev.ip) && host_like_all(line, ev.ip))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Some(ev) = parse_line(&bytes) {
            prop_assert!(address_is_in_line(&ev, &bytes));
        }
        let mut p = Parser::new(Timezone::Utc);
        let _ = p.feed(&bytes);
    }

    #[test]
    fn render_then_parse_round_trips(o in arb_owned(), mut style in arb_style()) {
        let mut o = o;
        if style.wrap == Wrap::BsdSyslog {
            // BSD syslog has no zone and no milliseconds.
            style.zone_offset_mins = None;
            style.millis = false;
        }
        o.time_ms = if style.millis { o.time_ms } else { o.time_ms - o.time_ms.rem_euclid(1000) };
        let mut want = o.event();
        let line = render::render(&want, &style);
        // A host name the style writes before the HELO is the verified
        // reverse-DNS name, for the kinds whose host carries one.
        if style.host_name.as_deref().is_some_and(|n| {
            ["H=", "from ", "for "].iter().any(|before| {
                line.contains(&format!("{before}{n} (")) || line.contains(&format!("{before}{n} ["))
            })
        }) {
            want.host_name = style.host_name.as_deref();
        }
        let got = parse_line(line.as_bytes());
        prop_assert!(got.is_some(), "no event from {line}");
        let got = got.unwrap_or(want);
        if style.wrap == Wrap::BsdSyslog {
            // The year is inferred; month, day and time must match.
            let (a, b) = (Civil::from_ms(got.time_ms), Civil::from_ms(want.time_ms));
            prop_assert_eq!((a.month, a.day, a.hour, a.minute, a.second), (b.month, b.day, b.hour, b.minute, b.second));
        } else {
            prop_assert_eq!(got.time_ms, want.time_ms, "{}", line);
        }
        prop_assert_eq!(Event { time_ms: 0, raw: b"", ..got }, Event { time_ms: 0, ..want }, "{}", line);
        prop_assert_eq!(got.raw, line.as_bytes());
    }

    #[test]
    fn mutated_lines_never_invent_an_address(
        o in arb_owned(),
        style in arb_style(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut line = render::render(&o.event(), &style).into_bytes();
        for (at, byte, op) in edits {
            if line.is_empty() {
                break;
            }
            let i = at.index(line.len());
            match op {
                0 => line[i] = byte,
                1 => line.truncate(i),
                _ => line.insert(i, byte),
            }
        }
        if let Some(ev) = parse_line(&line) {
            prop_assert!(address_is_in_line(&ev, &line), "{} from {}", ev.ip, String::from_utf8_lossy(&line));
        }
    }
}

/// Client text (a HELO, a reverse-DNS name, a sender, a command, a
/// `set_id`) built from fragments of Exim's own structure, brackets and
/// spaces.
fn arb_client_text() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("[8.8.8.8]".to_owned()),
        Just("[8.8.8.8]:25".to_owned()),
        Just("[2001:db8::8]:25".to_owned()),
        Just(" ".to_owned()),
        Just("(".to_owned()),
        Just(")".to_owned()),
        Just("\"".to_owned()),
        Just("<".to_owned()),
        Just(">".to_owned()),
        Just("H=".to_owned()),
        Just(": 535 ".to_owned()),
        Just(": ".to_owned()),
        Just(" I=[192.0.2.10]:25".to_owned()),
        Just(" (SSL_accept): ".to_owned()),
        Just(" refused: too many connections".to_owned()),
        Just(" AUTH command used when not advertised".to_owned()),
        Just(" rejected RCPT <a@b.test>: relay not permitted".to_owned()),
        Just(" next input=\"".to_owned()),
        Just(" (during SMTP connection from ".to_owned()),
        Just(" dropped: too many nonmail commands".to_owned()),
        "[ -~]{0,6}",
    ];
    prop::collection::vec(fragment, 0..8).prop_map(|parts| parts.concat())
}

/// Lines of every format that names a host, with client text `t` (and `u`
/// where a second piece of client text follows the host), for the client
/// `[ip]:port`.
fn framed_lines(ip: IpAddr, port: u16, t: &str, u: &str) -> Vec<String> {
    let h = format!("[{ip}]:{port}");
    let p = "2026-11-28 10:00:00";
    vec![
        format!("{p} dovecot_login authenticator failed for ({t}) {h}: 535 Incorrect authentication data (set_id={u})"),
        format!(
            "{p} dovecot_login authenticator failed for H={t} ({u}) {h} I=[192.0.2.10]:25: 535 Incorrect authentication data"
        ),
        format!("{p} SMTP protocol error in \"{t}\" H=({u}) {h} AUTH command used when not advertised"),
        format!("{p} SMTP syntax error in \"{t}\" H=({u}) {h} unrecognized command"),
        format!(
            "{p} SMTP protocol synchronization error (next input sent too soon: pipelining was not advertised): rejected \"{t}\" H=({u}) {h} next input=\"{u}\""
        ),
        format!("{p} SMTP call from ({t}) {h} dropped: too many nonmail commands (last was \"{u}\")"),
        format!("{p} TLS error on connection from ({t}) {h} (SSL_accept): {u}"),
        format!("{p} no IP address found for host {t} (during SMTP connection from {h} I=[192.0.2.10]:25)"),
        format!("{p} rejected from <{t}> H=({u}) {h}: sender verify failed"),
        format!("{p} H=({t}) {h} sender verify fail for <{u}>: Unrouteable address"),
        format!("{p} H={t} ({u}) {h} F=<{u}> rejected RCPT <a@b.test>: relay not permitted"),
        format!("{p} 1x5dJQ-00000002ksM-1pMm F=<{t}> H=({u}) {h} P=esmtp rejected by local_scan(): spam"),
        format!("{p} SMTP connection from {t} {h} (TCP/IP connection count = 1)"),
        format!("{p} Connection from {t} {h} refused: too many connections"),
        format!("{p} no MAIL in SMTP connection from ({t}) {h} D=1s C={u}"),
        format!("{p} 1x5dJQ-00000002ksM-1pMm <= a@b.test H=({t}) {h} P=esmtp S=1 T=\"{u}\""),
        format!("{p} unqualified sender rejected: <{t}> H=({u}) {h}"),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Client text with arbitrary brackets and spaces never changes the
    /// attributed address: an event names the real client or there is none.
    #[test]
    fn client_text_never_moves_the_address(
        ip in arb_ip(),
        port in arb_port(),
        t in arb_client_text(),
        u in arb_client_text(),
    ) {
        for line in framed_lines(ip, port, &t, &u) {
            if let Some(ev) = parse_line(line.as_bytes()) {
                prop_assert_eq!(ev.ip, ip, "{}", line);
            }
        }
    }

    /// Without brackets in the client text, every line is attributed.
    #[test]
    fn plain_client_text_is_attributed(
        ip in arb_ip(),
        port in arb_port(),
        t in "[a-z][a-z0-9.-]{0,12}",
        u in "[a-z][a-z0-9.@-]{0,12}",
    ) {
        for line in framed_lines(ip, port, &t, &u) {
            let ev = parse_line(line.as_bytes());
            prop_assert_eq!(ev.map(|e| e.ip), Some(ip), "{}", line);
        }
    }
}
