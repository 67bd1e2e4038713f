//! Unit tests of the line parser: one test per behaviour a caller relies on.

use std::net::IpAddr;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn parse(s: &str) -> Event<'_> {
    parse_line(s.as_bytes()).unwrap_or_else(|| panic!("no event: {s}"))
}

#[test]
fn connect_with_count_and_interface() {
    let e = parse(
        "2026-11-27 01:57:47.118 [7954] SMTP connection from [192.0.2.100]:47487 I=[192.0.2.10]:25 (TCP/IP connection count = 17)",
    );
    assert_eq!(e.kind, EventKind::Connect);
    assert_eq!(e.ip, ip("192.0.2.100"));
    assert_eq!(e.port, Some(47487));
    assert_eq!(e.local_ip, Some(ip("192.0.2.10")));
    assert_eq!(e.local_port, Some(25));
    assert_eq!(e.count, Some(17));
    assert_eq!(e.time_ms, 1_795_744_667_118);
}

#[test]
fn refusals() {
    let e = parse(
        "2026-11-27 01:57:47.336 [7954] Connection from [192.0.2.100]:58745 I=[192.0.2.10]:25 refused: too many connections",
    );
    assert_eq!((e.kind, e.ip, e.local_ip), (EventKind::RefusedTooMany, ip("192.0.2.100"), Some(ip("192.0.2.10"))));
    let e =
        parse("2026-11-27 01:57:47 Connection from [192.0.2.7]:1 refused: too many connections from that IP address");
    assert_eq!((e.kind, e.ip), (EventKind::RefusedPerHost, ip("192.0.2.7")));
    let e = parse("2026-11-27 01:57:47 Connection from [2001:db8::7] refused: load average = 12.34");
    assert_eq!((e.kind, e.ip, e.detail), (EventKind::RefusedLoad, ip("2001:db8::7"), Some("load average = 12.34")));
}

#[test]
fn auth_failure_old_and_new_format() {
    let e = parse(
        "2026-11-27 01:57:50.552 [8679] dovecot_plain authenticator failed for (scanner.invalid) [192.0.2.110]:35157 I=[192.0.2.10]:25: 535 Incorrect authentication data (set_id=admin0@example.test)",
    );
    assert_eq!(e.kind, EventKind::AuthFailed);
    assert_eq!(e.ip, ip("192.0.2.110"));
    assert_eq!(e.user, Some("admin0@example.test"));
    assert_eq!(e.helo, Some("scanner.invalid"));
    assert_eq!(e.detail, Some("dovecot_plain"));
    assert_eq!(e.local_ip, Some(ip("192.0.2.10")));
    let e = parse(
        "2026-09-19 20:54:38 dovecot_login authenticator failed for H=(72.20.167.124.adsl-pool.sx.cn) [179.185.227.77]:58062: 535 Incorrect authentication data (set_id=info@winservices.it)",
    );
    assert_eq!((e.kind, e.ip, e.user), (EventKind::AuthFailed, ip("179.185.227.77"), Some("info@winservices.it")));
}

#[test]
fn set_id_with_brackets_does_not_move_the_address() {
    let e = parse(
        "2026-01-01 10:00:00 dovecot_login authenticator failed for (helo.example) [203.0.113.5]:2525: 535 Incorrect authentication data (set_id=[192.0.2.1]:25 U=x)",
    );
    assert_eq!(e.ip, ip("203.0.113.5"));
    assert_eq!(e.user, Some("[192.0.2.1]:25 U=x"));
}

#[test]
fn temporary_auth_failure_is_not_an_attack() {
    assert!(
        parse_line(b"1999-03-02 09:44:33 defer authenticator failed for H=(test.host) [10.0.0.1] U=CALLER: 435 Unable to authenticate at present (set_id=userx): account suspended").is_none()
    );
}

#[test]
fn fail2ban_injection_yields_the_real_client() {
    let e = parse(
        "2017-11-28 14:14:32 SMTP protocol error in \"aUtH lOgIn\" H=(test) [8.8.8.8]\" H=(roxzgj) [192.0.2.6] AUTH command used when not advertised",
    );
    assert_eq!(e.kind, EventKind::ProtocolError);
    assert_eq!(e.ip, ip("192.0.2.6"));
    assert_eq!(e.helo, Some("roxzgj"));
}

#[test]
fn injection_with_a_well_formed_fake_host_is_skipped_and_counted() {
    // A fake host followed by a space is host-like: the command could have
    // put either address there, so the line names nobody.
    let lines: [&[u8]; 3] = [
        b"2017-11-28 14:14:32 SMTP protocol error in \"AUTH\" H=(x) [8.8.8.8] y\" H=(roxzgj) [192.0.2.6] AUTH command used when not advertised",
        b"2017-11-28 14:14:32 SMTP syntax error in \"MAIL\" H=[8.8.8.8] x\" H=[192.0.2.6] 501 <\" H=[8.8.4.4] x>: bad",
        b"2017-11-28 14:14:32 SMTP protocol synchronization error (next input sent too soon: pipelining was not advertised): rejected \"rset\" H=[192.0.2.6] next input=\"x\" H=[8.8.8.8] q\"",
    ];
    let mut p = Parser::new(Timezone::Utc);
    for line in lines {
        assert!(parse_line(line).is_none(), "{}", String::from_utf8_lossy(line));
        assert!(p.feed(line).is_none());
    }
    assert_eq!((p.stats().ignored, p.stats().ambiguous), (3, 3));
}

/// The framing vectors: client text (a HELO with spaces, a reverse-DNS name,
/// a sender, a quoted command, a `set_id`) that holds a second, well-formed
/// host. `198.51.100.x` is the real client, `8.8.8.8` the framed address.
pub(super) const FRAMING: &[&str] = &[
    // Auth failure, HELO `x) [8.8.8.8]:25 (y`.
    "2026-11-28 10:00:00 dovecot_login authenticator failed for (x) [8.8.8.8]:25 (y) [198.51.100.88]:1234: 535 Incorrect authentication data (set_id=a@b.test)",
    // ... with Exim's own structure after the fake too.
    "2026-11-28 10:00:00 dovecot_login authenticator failed for (x) [8.8.8.8]:25: 535 Incorrect authentication data (y) [198.51.100.88]:1234: 535 Incorrect authentication data (set_id=a@b.test)",
    // ... in the 4.99 `H=` form and with the interface token.
    "2026-11-28 10:00:00 dovecot_login authenticator failed for H=(x) [8.8.8.8]:25 I=[192.0.2.10]:25: 535 y) [198.51.100.88]:1234 I=[192.0.2.10]:25: 535 Incorrect authentication data",
    // ... a reverse-DNS name with spaces.
    "2026-11-28 10:00:00 dovecot_login authenticator failed for evil [8.8.8.8]:25 x.example (y) [198.51.100.88]:1234: 535 Incorrect authentication data",
    // ... the fake in the set_id, after the real host.
    "2026-11-28 10:00:00 dovecot_login authenticator failed for (y) [198.51.100.88]:1234: 535 Incorrect authentication data (set_id=u [8.8.8.8]:25: 535 v)",
    // Protocol, syntax and synchronization errors.
    "2026-11-28 10:00:00 SMTP protocol error in \"AUTH LOGIN\" H=(x) [8.8.8.8]:25 (y) [198.51.100.88]:1234 AUTH command used when not advertised",
    "2026-11-28 10:00:00 SMTP protocol error in \"AUTH LOGIN\" H=(x) [8.8.8.8]:25 AUTH command used when not advertised (y) [198.51.100.88]:1234 AUTH command used when not advertised",
    "2026-11-28 10:00:00 SMTP syntax error in \"GET / HTTP/1.1\" H=(x) [8.8.8.8]:25 unrecognized command (y) [198.51.100.88]:1234 unrecognized command",
    "2026-11-28 10:00:00 SMTP protocol synchronization error (next input sent too soon: pipelining was not advertised): rejected \"RSET\" H=(x) [8.8.8.8]:25 next input=\"z\" (y) [198.51.100.88]:1234 next input=\"QUIT\\r\\n\"",
    "2026-11-28 10:00:00 SMTP call from (x) [8.8.8.8]:25 dropped: too many nonmail commands (y) [198.51.100.88]:1234 dropped: too many nonmail commands (last was \"NOOP\")",
    // TLS error.
    "2026-11-28 10:00:00 TLS error on connection from (x) [8.8.8.8]:25 (SSL_accept): z (y) [198.51.100.88]:1234 (SSL_accept): error:0A000126:SSL routines::unexpected eof while reading",
    "2026-11-28 10:00:00 TLS error on connection from (x) [8.8.8.8]:25 (y) [198.51.100.88]:1234 (SSL_accept): error:0A000126:SSL routines::unexpected eof while reading",
    // Reverse DNS: a PTR name that carries a whole `(during ...)` clause.
    "2026-11-28 10:00:00 no IP address found for host evil (during SMTP connection from [8.8.8.8]:25) x (during SMTP connection from [198.51.100.88]:1234 I=[192.0.2.10]:25)",
    "2026-11-28 10:00:00 H=evil [8.8.8.8]:25 x.example [198.51.100.88]:1234 F=<a@b.test> rejected RCPT <c@d.test>: relay not permitted",
    // Sender verify with `<x> H=(z) [ip]` in the sender.
    "2026-11-28 10:00:00 rejected from <x> H=(z) [8.8.8.8]:25 y> H=(h) [198.51.100.83]:1234: sender verify failed",
    "2026-11-28 10:00:00 rejected from <x> H=(z) [8.8.8.8]:25: sender verify failed y> H=(h) [198.51.100.83]:1234: sender verify failed",
    "2026-11-28 10:00:00 H=(h) [198.51.100.83]:1234 sender verify fail for <x> H=(z) [8.8.8.8]:25 y>: Unrouteable address",
    "2026-11-28 10:00:00 H=(x) [8.8.8.8]:25 rejected RCPT <a@b.test>: relay not permitted (y) [198.51.100.88]:1234 F=<\"a b\"@c.test> rejected RCPT <d@e.test>: relay not permitted",
    "2026-11-28 10:00:00 1x5dJQ-00000002ksM-1pMm F=<x [8.8.8.8]:25 rejected by local_scan(): y> H=(h) [198.51.100.83]:1234 P=esmtp rejected by local_scan(): spam",
    // Connection lines: a HELO is not known yet, but a reverse-DNS name is.
    "2026-11-28 10:00:00 SMTP connection from evil [8.8.8.8]:25 (TCP/IP connection count = 1) x [198.51.100.88]:1234 (TCP/IP connection count = 1)",
    "2026-11-28 10:00:00 Connection from evil [8.8.8.8]:25 refused: too many connections x [198.51.100.88]:1234 refused: too many connections",
    // The fail2ban injection with a well-formed fake host.
    "2017-11-28 14:14:32 SMTP protocol error in \"aUtH lOgIn\" H=(test) [8.8.8.8] \" H=(roxzgj) [198.51.100.6] AUTH command used when not advertised",
];

#[test]
fn framing_vectors_never_name_the_framed_address() {
    let mut p = Parser::new(Timezone::Utc);
    let framed = ip("8.8.8.8");
    for line in FRAMING {
        if let Some(e) = parse_line(line.as_bytes()) {
            assert_ne!(e.ip, framed, "{line}");
            panic!("ambiguous line attributed to {}: {line}", e.ip);
        }
        assert!(p.feed(line.as_bytes()).is_none());
    }
    let s = p.stats();
    assert_eq!(s.ambiguous, FRAMING.len() as u64, "every framing line is counted as ambiguous");
    assert_eq!(s.ignored, FRAMING.len() as u64);
}

#[test]
fn framing_vectors_parse_without_the_fake() {
    // The same lines with the fake host taken out of the client text parse
    // to the real client: the anchors do not lose legitimate lines.
    let clean = [
        "2026-11-28 10:00:00 dovecot_login authenticator failed for (y) [198.51.100.88]:1234: 535 Incorrect authentication data (set_id=a@b.test)",
        "2026-11-28 10:00:00 dovecot_login authenticator failed for H=(x) [198.51.100.88]:1234 I=[192.0.2.10]:25: 535 Incorrect authentication data",
        "2026-11-28 10:00:00 dovecot_login authenticator failed for x.example (y) [198.51.100.88]:1234: 535 Incorrect authentication data",
        "2026-11-28 10:00:00 SMTP protocol error in \"AUTH LOGIN\" H=(y) [198.51.100.88]:1234 AUTH command used when not advertised",
        "2026-11-28 10:00:00 SMTP syntax error in \"GET / HTTP/1.1\" H=(y) [198.51.100.88]:1234 unrecognized command",
        "2026-11-28 10:00:00 SMTP protocol synchronization error (next input sent too soon: pipelining was not advertised): rejected \"RSET\" H=(y) [198.51.100.88]:1234 next input=\"QUIT\\r\\n\"",
        "2026-11-28 10:00:00 TLS error on connection from (y) [198.51.100.88]:1234 (SSL_accept): error:0A000126:SSL routines::unexpected eof while reading",
        "2026-11-28 10:00:00 no IP address found for host x (during SMTP connection from [198.51.100.88]:1234 I=[192.0.2.10]:25)",
        "2026-11-28 10:00:00 rejected from <x@y.test> H=(h) [198.51.100.88]:1234: sender verify failed",
        "2026-11-28 10:00:00 H=(h) [198.51.100.88]:1234 sender verify fail for <x@y.test>: Unrouteable address",
        "2026-11-28 10:00:00 1x5dJQ-00000002ksM-1pMm F=<x@y.test> H=(h) [198.51.100.88]:1234 P=esmtp rejected by local_scan(): spam",
        "2026-11-28 10:00:00 H=(a b) [198.51.100.88]:1234 F=<a@b.test> rejected RCPT <c@d.test>: relay not permitted",
    ];
    for line in clean {
        let e = parse(line);
        assert_eq!(e.ip, ip("198.51.100.88"), "{line}");
    }
}

#[test]
fn helo_brackets_and_local_interface_are_never_the_client() {
    let e = parse(
        "2013-08-20 23:30:05 plain authenticator failed for ([192.168.2.102]) [91.218.72.71]: 535 Incorrect authentication data",
    );
    assert_eq!(e.ip, ip("91.218.72.71"));
    assert_eq!(e.helo, Some("[192.168.2.102]"));
    let e =
        parse("2016-03-21 06:57:36 [5908] no MAIL in SMTP connection from [122.165.71.116] I=[172.89.0.6]:25 D=10s");
    assert_eq!(e.ip, ip("122.165.71.116"));
    assert_eq!(e.local_ip, Some(ip("172.89.0.6")));
    assert_eq!(e.duration_ms, Some(10_000));
}

#[test]
fn mapped_ipv6_is_normalised() {
    let e = parse("2026-01-01 00:00:00 SMTP connection from [::ffff:192.0.2.9]:4000 (TCP/IP connection count = 3)");
    assert_eq!(e.ip, ip("192.0.2.9"));
}

#[test]
fn lost_and_no_mail_keep_duration_and_commands() {
    let e = parse(
        "2026-11-27 01:57:50.547 [8585] SMTP connection from [192.0.2.101]:58557 I=[192.0.2.10]:25 lost (error: Connection reset by peer) D=3.416s",
    );
    assert_eq!(
        (e.kind, e.duration_ms, e.detail),
        (EventKind::Lost, Some(3416), Some("(error: Connection reset by peer)"))
    );
    let e = parse(
        "2026-11-27 01:57:50.752 [8679] no MAIL in SMTP connection from (scanner.invalid) [192.0.2.110]:35157 I=[192.0.2.10]:25 D=0.201s C=EHLO,AUTH,QUIT",
    );
    assert_eq!((e.kind, e.duration_ms, e.detail), (EventKind::NoMail, Some(201), Some("EHLO,AUTH,QUIT")));
}

#[test]
fn zones_and_prefix_variants() {
    let utc = parse("2026-11-27 01:57:34 SMTP connection from [192.0.2.1] (TCP/IP connection count = 1)").time_ms;
    let plus =
        parse("2026-11-27 02:57:34 +0100 SMTP connection from [192.0.2.1] (TCP/IP connection count = 1)").time_ms;
    assert_eq!(utc, plus);
    let e = parse(
        "2016-03-21 04:07:49 [25874] 1ahr79-0006jK-G9 SMTP connection from (voyeur.webair.com) [174.137.147.204]:44884 I=[172.89.0.6]:25 closed by DROP in ACL",
    );
    assert_eq!((e.kind, e.ip), (EventKind::ClosedByDrop, ip("174.137.147.204")));
    let e = parse(
        "2026-09-13 08:03:35 1x5dJQ-00000002ksM-1pMm <= a@b.test H=x.test ([127.0.0.1]) [78.47.94.167]:59324 P=esmtpsa A=dovecot_login:a@b.test S=2",
    );
    assert_eq!(
        (e.kind, e.ip, e.user, e.detail),
        (EventKind::Accepted, ip("78.47.94.167"), Some("a@b.test"), Some("a@b.test"))
    );
}

#[test]
fn parser_applies_zone_and_skips_continuations() {
    let mut p = Parser::new(Timezone::from_config("Europe/Berlin").unwrap());
    let line = b"2026-07-15 14:00:00 SMTP connection from [192.0.2.1] (TCP/IP connection count = 1)\n";
    let e = p.feed(line).unwrap();
    assert_eq!(e.time_ms, 1_784_116_800_000, "14:00 CEST is 12:00 UTC");
    assert!(p.feed(b" H=[192.0.2.9] rejected RCPT <a@b>: relay not permitted").is_none());
    assert!(
        p.feed(b"2026-07-15 14:00:00 +0000 SMTP connection from [192.0.2.1] (TCP/IP connection count = 1)").is_some()
    );
    let s = p.stats();
    assert_eq!((s.lines, s.events, s.ignored, s.continuations), (3, 2, 1, 1));
}

#[test]
fn bad_input_is_skipped() {
    let long = format!(
        "2026-01-01 00:00:00 SMTP connection from [192.0.2.1] (TCP/IP connection count = 1){}",
        " ".repeat(MAX_LINE_BYTES)
    );
    for bad in [
        &b""[..],
        b"\xff\xfe\x00garbage",
        b"2026-02-30 00:00:00 SMTP connection from [192.0.2.1] (TCP/IP connection count = 1)",
        b"2026-01-01 00:00:00 SMTP connection from [192.0.2.256] (TCP/IP connection count = 1)",
        b"2026-01-01 00:00:00 SMTP connection from [192.0.2.1",
        b"2026-01-01 00:00:00 SMTP connection from [192.0.2.1]:70000 (TCP/IP connection count = 1)",
        b"2026-01-01 00:00:00 SMTP connection from [192.0.2.1] (TCP/IP connection count = 99999999999)",
        b"2026-01-01 00:00:00 SMTP connection from [\xff\xfe::1] (TCP/IP connection count = 1)",
        long.as_bytes(),
    ] {
        assert!(parse_line(bad).is_none(), "{}", String::from_utf8_lossy(&bad[..bad.len().min(120)]));
    }
}

#[test]
fn invalid_utf8_in_text_fields_keeps_the_event() {
    let e = parse_line(b"2026-01-01 00:00:00 login authenticator failed for (\xff\xfe) [192.0.2.1]: 535 Incorrect authentication data (set_id=\xc3)").unwrap();
    assert_eq!((e.kind, e.ip, e.helo, e.user), (EventKind::AuthFailed, ip("192.0.2.1"), None, None));
}

#[test]
fn kinds_have_stable_names_and_proto_values() {
    for (i, kind) in EventKind::ALL.into_iter().enumerate() {
        assert_eq!(kind as usize, i + 1, "{kind}");
        assert_eq!(EventKind::from_name(kind.as_str()), Some(kind));
    }
    assert!(EventKind::AuthFailed.is_abuse());
    assert!(!EventKind::Connect.is_abuse());
}

#[test]
fn to_proto_copies_every_field() {
    let e = parse(
        "2026-11-27 01:57:50.552 [8679] dovecot_plain authenticator failed for (scanner.invalid) [192.0.2.110]:35157 I=[192.0.2.10]:25: 535 Incorrect authentication data (set_id=admin0@example.test)",
    );
    let p = e.to_proto(true);
    assert_eq!(p.kind, fleetban_proto::v1::EventKind::AuthFailed as i32);
    assert_eq!(IpAddr::try_from(p.remote.as_ref().unwrap()).unwrap(), e.ip);
    assert_eq!(IpAddr::try_from(p.local.as_ref().unwrap()).unwrap(), ip("192.0.2.10"));
    assert_eq!((p.remote_port, p.local_port, p.time_ms), (35157, 25, e.time_ms));
    assert_eq!(
        (p.auth_user.as_str(), p.helo.as_str(), p.detail.as_str()),
        ("admin0@example.test", "scanner.invalid", "dovecot_plain")
    );
    assert_eq!(p.raw.as_bytes(), e.raw);
    assert!(e.to_proto(false).raw.is_empty());
}

/// Every line a real Exim 4.96 daemon wrote when a session ended (captured
/// by `tests/src/exim.rs`'s harness; see `tests/tests/exim_forms.rs`), with
/// the kind and the `ip:port` that match it to its `SMTP connection from
/// [ip]:port (TCP/IP connection count = N)` open.
#[test]
fn session_ends_of_exim_4_96_carry_kind_and_ip_port() {
    let cases: &[(&str, EventKind, &str, u16)] = &[
        // Client QUIT.
        (
            "2026-11-28 08:56:54.166 [13349] SMTP connection from (legit.example.org) [198.51.100.7]:51865 I=[192.0.2.10]:25 closed by QUIT",
            EventKind::Closed,
            "198.51.100.7",
            51865,
        ),
        // Client closes after EHLO (FIN), and with a reset.
        (
            "2026-11-28 08:56:54.977 [13393] SMTP connection from (x.example.org) [198.51.100.7]:35805 I=[192.0.2.10]:25 lost D=0.000s",
            EventKind::Lost,
            "198.51.100.7",
            35805,
        ),
        (
            "2026-11-28 08:56:57.746 [13569] SMTP connection from (x.example.org) [198.51.100.7]:55333 I=[192.0.2.10]:25 lost (error: Connection reset by peer) D=0.000s",
            EventKind::Lost,
            "198.51.100.7",
            55333,
        ),
        // Client closes after MAIL / RCPT (a transaction was open).
        (
            "2026-11-28 08:56:55.595 [13437] unexpected disconnection while reading SMTP command from (x.example.org) [198.51.100.7]:39287 I=[192.0.2.10]:25 D=0.000s",
            EventKind::Lost,
            "198.51.100.7",
            39287,
        ),
        // Client closes in the middle of DATA.
        (
            "2026-11-28 08:56:57.120 [13525] SMTP connection from (x.example.org) [198.51.100.7]:47787 I=[192.0.2.10]:25 lost while reading message data",
            EventKind::Lost,
            "198.51.100.7",
            47787,
        ),
        // Client sends the final dot and closes at once.
        (
            "2026-11-28 08:58:16.666 [16756] 1xXEG8-0004MG-23 SMTP connection lost after final dot H=(legit.example.org) [198.51.100.7]:40189 I=[192.0.2.10]:25 P=esmtp",
            EventKind::Lost,
            "198.51.100.7",
            40189,
        ),
        // smtp_receive_timeout on a held connection: before EHLO, after
        // EHLO, and in DATA (no `I=` there).
        (
            "2026-11-28 08:57:15.705 [14143] SMTP command timeout on connection from [198.51.100.7]:39485 I=[192.0.2.10]:25",
            EventKind::CommandTimeout,
            "198.51.100.7",
            39485,
        ),
        (
            "2026-11-28 08:57:15.734 [14145] SMTP command timeout on connection from (x.example.org) [198.51.100.7]:35491 I=[192.0.2.10]:25",
            EventKind::CommandTimeout,
            "198.51.100.7",
            35491,
        ),
        (
            "2026-11-28 08:57:15.665 [14142] SMTP data timeout (message abandoned) on connection from (x.example.org) [198.51.100.7]:47937 F=<a@example.org>",
            EventKind::CommandTimeout,
            "198.51.100.7",
            47937,
        ),
        // Dropped by Exim for bad behaviour.
        (
            "2026-11-28 08:57:00.850 [13747] SMTP call from (x.example.org) [198.51.100.7]:39083 I=[192.0.2.10]:25 dropped: too many nonmail commands (last was \"NOOP\")",
            EventKind::TooManyNonmail,
            "198.51.100.7",
            39083,
        ),
        (
            "2026-11-28 08:57:01.444 [13791] SMTP call from (x.example.org) [198.51.100.7]:46115 I=[192.0.2.10]:25 dropped: too many syntax or protocol errors (last command was \"MAIL FROM:<<<bad\",  C=EHLO,MAIL,MAIL,MAIL,MAIL)",
            EventKind::TooManySyntax,
            "198.51.100.7",
            46115,
        ),
        (
            "2026-11-28 08:57:02.040 [13851] SMTP call from [198.51.100.7]:41405 I=[192.0.2.10]:25 dropped: too many unrecognized commands (last was \"GARBAGE\")",
            EventKind::TooManyUnrecognized,
            "198.51.100.7",
            41405,
        ),
        // Dropped by an ACL (connect, then HELO).
        (
            "2026-11-28 08:58:17.691 [16830] SMTP connection from [198.51.100.8]:48153 I=[192.0.2.10]:25 closed by DROP in ACL",
            EventKind::ClosedByDrop,
            "198.51.100.8",
            48153,
        ),
        (
            "2026-11-28 08:58:18.526 [16928] SMTP connection from (dropme.example.org) [198.51.100.7]:49827 I=[192.0.2.10]:25 closed by DROP in ACL",
            EventKind::ClosedByDrop,
            "198.51.100.7",
            49827,
        ),
        // The summary Exim adds after most ends.
        (
            "2026-11-28 08:56:54.367 [13349] no MAIL in SMTP connection from (legit.example.org) [198.51.100.7]:51865 I=[192.0.2.10]:25 D=0.200s C=EHLO,QUIT",
            EventKind::NoMail,
            "198.51.100.7",
            51865,
        ),
        // Exim told to stop while the connection was held.
        (
            "2026-11-28 08:58:37.314 [18086] SMTP connection from [198.51.100.7]:45937 I=[192.0.2.10]:25 closed after SIGTERM",
            EventKind::Lost,
            "198.51.100.7",
            45937,
        ),
        // IPv6.
        (
            "2026-11-28 08:58:19.620 [17059] SMTP connection from (v6.example.org) [2001:db8::7]:46857 I=[2001:db8::10]:25 closed by QUIT",
            EventKind::Closed,
            "2001:db8::7",
            46857,
        ),
    ];
    for &(line, kind, addr, port) in cases {
        let e = parse(line);
        assert_eq!((e.kind, e.ip, e.port), (kind, ip(addr), Some(port)), "{line}");
        assert!(e.kind.ends_session(), "{line}");
    }
    // Refusals are not opens and end nothing; the open carries the same ip:port.
    let e = parse(
        "2026-11-28 08:57:20.734 [13227] Connection from [198.51.100.7]:50112 I=[192.0.2.10]:25 refused: too many connections",
    );
    assert_eq!((e.kind, e.port), (EventKind::RefusedTooMany, Some(50112)));
    assert!(!e.kind.ends_session());
    let e = parse(
        "2026-11-28 08:56:54.165 [13227] SMTP connection from [198.51.100.7]:51865 I=[192.0.2.10]:25 (TCP/IP connection count = 1)",
    );
    assert_eq!((e.kind, e.ip, e.port, e.count), (EventKind::Connect, ip("198.51.100.7"), Some(51865), Some(1)));
}

#[test]
fn session_end_forms_of_other_releases() {
    // Exim 4.97+ puts D= before `closed`.
    let e = parse(
        "2026-01-01 10:00:00 SMTP connection from (helo.example) [192.0.2.5]:4100 I=[192.0.2.10]:25 D=1.250s closed by QUIT",
    );
    assert_eq!((e.kind, e.port, e.duration_ms), (EventKind::Closed, Some(4100), Some(1250)));
    let e = parse("2026-01-01 10:00:00 SMTP command timeout on connection from [192.0.2.5]:4101 D=5m");
    assert_eq!((e.kind, e.port, e.duration_ms), (EventKind::CommandTimeout, Some(4101), Some(300_000)));
    let e = parse("2026-01-01 10:00:00 SMTP connection from [192.0.2.5]:4102 I=[192.0.2.10]:25 D=3s closed SIGTERM");
    assert_eq!((e.kind, e.detail, e.duration_ms), (EventKind::Lost, Some("closed SIGTERM"), Some(3000)));
    // After a TLS failure (a public 4.7x sample, addresses replaced).
    let e = parse(
        "2010-04-30 16:05:22 [2808] SMTP connection from (mycomp) [192.0.2.66]:1185 I=[192.0.2.10]:587 closed by EOF",
    );
    assert_eq!((e.kind, e.port, e.detail), (EventKind::Lost, Some(1185), Some("closed by EOF")));
    // Older releases: the reason after the host, no port, a verified name.
    let e = parse(
        "2010-03-21 16:28:51 unexpected disconnection while reading SMTP command from (ZTZUWWCRQY) [192.0.2.77] (error: Connection reset by peer)",
    );
    assert_eq!(
        (e.kind, e.ip, e.port, e.helo, e.detail),
        (
            EventKind::Lost,
            ip("192.0.2.77"),
            None,
            Some("ZTZUWWCRQY"),
            Some("unexpected disconnection while reading SMTP command")
        )
    );
    let e = parse(
        "2020-09-30 15:39:01 unexpected disconnection while reading SMTP command from localhost ([192.168.103.193]) [2001:db8::1]",
    );
    assert_eq!((e.ip, e.helo, e.host_name), (ip("2001:db8::1"), Some("[192.168.103.193]"), Some("localhost")));
    let e = parse(
        "2012-08-09 08:07:30 SMTP connection from www.example.net [192.0.2.17] lost while reading message data (header)",
    );
    assert_eq!(
        (e.kind, e.ip, e.detail),
        (EventKind::Lost, ip("192.0.2.17"), Some("while reading message data (header)"))
    );
    let e = parse("2003-01-01 00:00:00 unexpected disconnection while reading SMTP data (header) from [192.0.2.18]");
    assert_eq!((e.kind, e.ip), (EventKind::Lost, ip("192.0.2.18")));
    // Neither a quoted bracket nor an unknown phrase is taken.
    assert!(
        parse_line(b"2026-01-01 10:00:00 unexpected disconnection while reading SMTP banner from [192.0.2.5]")
            .is_none()
    );
    assert!(parse_line(b"2026-01-01 10:00:00 SMTP connection from [192.0.2.5]:1 closed by magic").is_none());
    assert!(
        parse_line(b"2026-01-01 10:00:00 SMTP connection lost after final dot H=\"[192.0.2.5]\" P=esmtp").is_none()
    );
}
