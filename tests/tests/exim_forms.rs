//! Every way a real Exim daemon ends an SMTP session, read back by the
//! agent's parser: a real `exim4` (tests/src/exim.rs) in a network
//! namespace, a client namespace that opens sessions and ends each one a
//! different way, and the daemon's own main log parsed line by line.
//!
//! For each session the test knows its source port, so it checks that the
//! line ending it has the expected kind and the client's `ip:port` (what
//! detection needs to match an end to its `SMTP connection from [ip]:port
//! (TCP/IP connection count = N)` open), that every open has an end, and
//! that refused connections never appear as opens.
//!
//! `daemon_session_ends_parse_with_kind_and_ip_port` needs root (namespaces)
//! and Exim (`exim4-daemon-heavy`); without either it fails and says so.
//! With `FLEETBAN_EXIM_CAPTURE=<file>` it copies the daemon's log there:
//! `tests/fixtures/exim-4.96-session-ends.log` was captured that way, and
//! `captured_log_pairs_every_open_with_an_end` checks it without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use fleetban_agent::parse::{EventKind, parse_line};
use fleetban_tests::exim::{self, EximDaemon, EximOptions, Session};
use fleetban_tests::netns::{Segment, is_root, unique_tag};

const MX: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const MX6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const DROPPED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/exim-4.96-session-ends.log");

/// One session the client ended a known way: its source, and the kind (and
/// detail, when it names the form) of the line that must end it.
#[derive(Debug, Clone)]
struct Expect {
    what: &'static str,
    from: IpAddr,
    port: u16,
    kind: EventKind,
    detail: Option<&'static str>,
}

fn mx() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(MX), 25)
}

const T: Duration = Duration::from_secs(5);

fn open(from: IpAddr, to: SocketAddr) -> std::io::Result<Session> {
    let mut s = Session::connect(to, from, T)?;
    let (code, text) = s.reply()?;
    if code != 220 {
        return Err(std::io::Error::other(format!("banner {text}")));
    }
    Ok(s)
}

fn ehlo(s: &mut Session, name: &str) -> std::io::Result<()> {
    let (code, text) = s.command(&format!("EHLO {name}"))?;
    if code != 250 {
        return Err(std::io::Error::other(format!("EHLO answered {text}")));
    }
    Ok(())
}

fn transaction(s: &mut Session) -> std::io::Result<()> {
    ehlo(s, "client.example.org")?;
    s.command("MAIL FROM:<sender@example.org>")?;
    let (code, text) = s.command("RCPT TO:<user@example.net>")?;
    if code != 250 {
        return Err(std::io::Error::other(format!("RCPT answered {text}")));
    }
    Ok(())
}

fn reset(s: Session) {
    // SO_LINGER 0: close sends a reset.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a valid linger struct on an open socket.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s.stream()),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(s);
}

/// Runs the sessions that end at once; returns what each must log.
fn quick_sessions(daemon_pid: u32) -> std::io::Result<Vec<Expect>> {
    let me = IpAddr::V4(CLIENT);
    let mut out = Vec::new();
    let mut expect = |what, port, kind, detail| out.push(Expect { what, from: me, port, kind, detail });

    // Banner, EHLO, QUIT.
    let mut s = open(me, mx())?;
    ehlo(&mut s, "legit.example.org")?;
    s.command("QUIT")?;
    expect("QUIT", s.local_port(), EventKind::Closed, None);

    // A whole message, then QUIT.
    let mut s = open(me, mx())?;
    transaction(&mut s)?;
    s.command("DATA")?;
    let (code, text) = s.command("Subject: test\r\n\r\nhello\r\n.")?;
    if code != 250 {
        return Err(std::io::Error::other(format!("end of data answered {text}")));
    }
    s.command("QUIT")?;
    expect("message then QUIT", s.local_port(), EventKind::Closed, None);
    expect("message then QUIT", s.local_port(), EventKind::Accepted, None);

    // Close (FIN) after EHLO.
    let mut s = open(me, mx())?;
    ehlo(&mut s, "client.example.org")?;
    expect("close after EHLO", s.local_port(), EventKind::Lost, None);
    drop(s);

    // Reset after EHLO.
    let mut s = open(me, mx())?;
    ehlo(&mut s, "client.example.org")?;
    expect("reset after EHLO", s.local_port(), EventKind::Lost, Some("(error: Connection reset by peer)"));
    reset(s);

    // Close after MAIL and RCPT (a transaction is open).
    let mut s = open(me, mx())?;
    transaction(&mut s)?;
    expect(
        "close after RCPT",
        s.local_port(),
        EventKind::Lost,
        Some("unexpected disconnection while reading SMTP command"),
    );
    drop(s);

    // Close in the middle of DATA.
    let mut s = open(me, mx())?;
    transaction(&mut s)?;
    s.command("DATA")?;
    s.send_raw(b"Subject: test\r\n\r\nhalf a mess")?;
    std::thread::sleep(Duration::from_millis(100));
    expect("close during DATA", s.local_port(), EventKind::Lost, Some("while reading message data"));
    drop(s);

    // The final dot and the close in one go: Exim sees the end of input
    // before it answers.
    let mut s = open(me, mx())?;
    transaction(&mut s)?;
    s.command("DATA")?;
    s.send_raw(b"Subject: test\r\n\r\nhello\r\n.\r\n")?;
    s.stream().shutdown(std::net::Shutdown::Write)?;
    expect("close right after the final dot", s.local_port(), EventKind::Lost, Some("after final dot"));
    let _ = s.reply();
    drop(s);

    // Too many nonmail commands (smtp_accept_max_nonmail = 3).
    let mut s = open(me, mx())?;
    ehlo(&mut s, "client.example.org")?;
    for _ in 0..10 {
        match s.command("NOOP") {
            Ok((250, _)) => {}
            _ => break,
        }
    }
    expect("too many NOOPs", s.local_port(), EventKind::TooManyNonmail, None);
    drop(s);

    // Too many syntax errors (smtp_max_synprot_errors = 3).
    let mut s = open(me, mx())?;
    ehlo(&mut s, "client.example.org")?;
    for _ in 0..10 {
        match s.command("MAIL FROM:<<<bad") {
            Ok((code, _)) if code != 421 => {}
            _ => break,
        }
    }
    expect("too many syntax errors", s.local_port(), EventKind::TooManySyntax, None);
    drop(s);

    // Too many unrecognized commands.
    let mut s = open(me, mx())?;
    for _ in 0..10 {
        match s.command("GARBAGE") {
            Ok((code, _)) if code != 421 => {}
            _ => break,
        }
    }
    expect("too many unknown commands", s.local_port(), EventKind::TooManyUnrecognized, None);
    drop(s);

    // Exim is told to stop the session (SIGTERM to its process).
    let mut s = open(me, mx())?;
    ehlo(&mut s, "client.example.org")?;
    // The session's own process: the daemon's child holding its socket.
    let Some(session) = exim::session_pid(daemon_pid, s.local_port()) else {
        return Err(std::io::Error::other(format!(
            "no process of the daemon holds the session from port {}; children {:?}",
            s.local_port(),
            exim::children(daemon_pid)
        )));
    };
    // SAFETY: kill(2) on a process of the daemon this test started.
    if unsafe { libc::kill(session as libc::pid_t, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    expect("SIGTERM", s.local_port(), EventKind::Lost, Some("closed after SIGTERM"));
    // Exim answers 421 and closes; the client waits for that (closing
    // first would race the signal and log `lost`).
    let _ = s.reply();
    drop(s);

    // IPv6.
    let me6 = IpAddr::V6(CLIENT6);
    let mut s = open(me6, SocketAddr::new(IpAddr::V6(MX6), 25))?;
    ehlo(&mut s, "v6.example.org")?;
    s.command("QUIT")?;
    out.push(Expect { what: "QUIT over IPv6", from: me6, port: s.local_port(), kind: EventKind::Closed, detail: None });

    // Dropped by the connect ACL.
    let s = Session::connect(mx(), IpAddr::V4(DROPPED), T)?;
    out.push(Expect {
        what: "connect ACL drop",
        from: IpAddr::V4(DROPPED),
        port: s.local_port(),
        kind: EventKind::ClosedByDrop,
        detail: None,
    });
    drop(s);
    Ok(out)
}

/// Holds three sessions silent (before EHLO, after EHLO, inside DATA) until
/// `smtp_receive_timeout` ends them; returns what each must log.
fn held_sessions(timeout: Duration) -> std::io::Result<Vec<Expect>> {
    let me = IpAddr::V4(CLIENT);
    let before = open(me, mx())?;
    let mut after = open(me, mx())?;
    ehlo(&mut after, "client.example.org")?;
    let mut data = open(me, mx())?;
    transaction(&mut data)?;
    data.command("DATA")?;
    data.send_raw(b"Subject: held\r\n")?;
    let out = vec![
        Expect {
            what: "silent before EHLO",
            from: me,
            port: before.local_port(),
            kind: EventKind::CommandTimeout,
            detail: None,
        },
        Expect {
            what: "silent after EHLO",
            from: me,
            port: after.local_port(),
            kind: EventKind::CommandTimeout,
            detail: None,
        },
        Expect {
            what: "silent in DATA",
            from: me,
            port: data.local_port(),
            kind: EventKind::CommandTimeout,
            detail: Some("data timeout"),
        },
    ];
    // Exim answers each with 421 when its timer fires; wait for all three.
    let deadline = Instant::now() + timeout;
    for mut s in [before, after, data] {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        s.stream().set_read_timeout(Some(left))?;
        let _ = s.reply();
    }
    Ok(out)
}

/// Fills every slot from the client, then opens three more: those are
/// refused (`421`, `refused: too many connections`) and must never look
/// like opens. Returns the refused ports and what the held ones log when
/// the client closes them.
fn full_house(max: u32) -> std::io::Result<(Vec<u16>, Vec<Expect>)> {
    let me = IpAddr::V4(CLIENT);
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..max + 10 {
        if refused.len() == 3 {
            break;
        }
        let mut s = Session::connect(mx(), me, T)?;
        let (code, _) = s.reply()?;
        if code == 220 {
            held.push(s);
        } else {
            refused.push(s.local_port());
        }
    }
    let ends = held
        .iter()
        .map(|s| Expect {
            what: "held, then closed",
            from: me,
            port: s.local_port(),
            kind: EventKind::Lost,
            detail: None,
        })
        .collect();
    drop(held);
    Ok((refused, ends))
}

/// What the parser made of a log: per (ip, port), the events in order.
type Parsed = BTreeMap<(IpAddr, u16), Vec<(EventKind, Option<String>)>>;

fn parse_log(text: &str) -> Parsed {
    let mut out: Parsed = BTreeMap::new();
    for line in text.lines() {
        if let Some(e) = parse_line(line.as_bytes())
            && let Some(port) = e.port
        {
            out.entry((e.ip, port)).or_default().push((e.kind, e.detail.map(str::to_owned)));
        }
    }
    out
}

/// Every connection that opened has an end line with its ip:port; refused
/// ones have no open. Returns a description of each violation.
fn unmatched(parsed: &Parsed) -> Vec<String> {
    let mut bad = Vec::new();
    for ((ip, port), events) in parsed {
        let opened = events.iter().any(|(k, _)| *k == EventKind::Connect);
        let ended = events.iter().any(|(k, _)| k.ends_session());
        let refused = events.iter().any(|(k, _)| matches!(k, EventKind::RefusedTooMany | EventKind::RefusedPerHost));
        if opened && !ended {
            bad.push(format!("[{ip}]:{port} opened and never ended: {events:?}"));
        }
        if ended && !opened {
            bad.push(format!("[{ip}]:{port} ended without an open: {events:?}"));
        }
        if refused && opened {
            bad.push(format!("[{ip}]:{port} refused and opened: {events:?}"));
        }
    }
    bad
}

#[test]
fn daemon_session_ends_parse_with_kind_and_ip_port() {
    assert!(is_root(), "this test needs root (network namespaces); run it as root");
    let exim_bin = exim::binary().unwrap_or_else(|error| panic!("{error}"));
    let tag = unique_tag();
    let dir = tempfile::Builder::new().prefix("fleetban-exim-forms-").tempdir().expect("temp dir");
    let mut segment = Segment::create(&tag).expect("bridge namespace");
    let mx_idx = segment.add_machine("mx", &[IpAddr::V4(MX), IpAddr::V6(MX6)]).expect("mx namespace");
    let cli_idx = segment
        .add_machine("cli", &[IpAddr::V4(CLIENT), IpAddr::V4(DROPPED), IpAddr::V6(CLIENT6)])
        .expect("client namespace");
    let options = EximOptions {
        hostname: "mx.example.net".into(),
        smtp_accept_max: 20,
        receive_timeout_secs: 3,
        drop_hosts: vec![DROPPED.to_string()],
        ..EximOptions::default()
    };
    let mut daemon = EximDaemon::start(segment.machine(mx_idx), dir.path(), 25, &options)
        .unwrap_or_else(|error| panic!("starting {}: {error}", exim_bin.display()));
    let pid = daemon.pid().expect("daemon pid");

    let cli = segment.machine(cli_idx);
    let quick = cli.spawn(move || quick_sessions(pid)).join().expect("client thread").expect("namespace");
    let quick = quick.unwrap_or_else(|error| panic!("a session failed: {error}\n{}", daemon.main_log_text()));
    let held = cli
        .spawn(|| held_sessions(Duration::from_secs(10)))
        .join()
        .expect("client thread")
        .expect("namespace")
        .unwrap_or_else(|error| panic!("a held session failed: {error}"));
    let (refused, held_ends) =
        cli.spawn(|| full_house(20)).join().expect("client thread").expect("namespace").expect("filling the slots");
    assert_eq!(refused.len(), 3, "three connections beyond smtp_accept_max were refused");

    let mut expected: Vec<Expect> = quick.into_iter().chain(held).chain(held_ends).collect();
    expected.sort_by_key(|e| e.port);
    // Positive signal: wait until the log holds an end for every session
    // (Exim writes some ends after the client is gone), at most 15 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    let parsed = loop {
        let parsed = parse_log(&daemon.main_log_text());
        let all = expected
            .iter()
            .all(|e| parsed.get(&(e.from, e.port)).is_some_and(|evs| evs.iter().any(|(k, _)| *k == e.kind)))
            && refused.iter().all(|p| parsed.contains_key(&(IpAddr::V4(CLIENT), *p)));
        if all || Instant::now() > deadline {
            break parsed;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = daemon.main_log_text();
    if let Some(path) = std::env::var_os("FLEETBAN_EXIM_CAPTURE") {
        std::fs::write(&path, &log).expect("write the captured log");
    }
    daemon.kill();

    let mut failures = Vec::new();
    for e in &expected {
        let events = parsed.get(&(e.from, e.port)).cloned().unwrap_or_default();
        let hit = events.iter().any(|(k, d)| *k == e.kind && e.detail.is_none_or(|want| d.as_deref() == Some(want)));
        if !hit {
            failures.push(format!(
                "{}: [{}]:{} wanted {} {:?}, parsed {events:?}",
                e.what, e.from, e.port, e.kind, e.detail
            ));
        }
    }
    for port in &refused {
        let events = parsed.get(&(IpAddr::V4(CLIENT), *port)).cloned().unwrap_or_default();
        if events.iter().map(|(k, _)| *k).collect::<Vec<_>>() != vec![EventKind::RefusedTooMany] {
            failures.push(format!("refused [{CLIENT}]:{port}: parsed {events:?}"));
        }
    }
    failures.extend(unmatched(&parsed));
    assert!(failures.is_empty(), "{}\n\nmain log:\n{log}", failures.join("\n"));
    println!(
        "exim forms: {} sessions ended {} ways, {} refusals; every open matched to its end by ip:port",
        expected.len(),
        expected.iter().map(|e| (e.kind, e.detail)).collect::<BTreeSet<_>>().len(),
        refused.len()
    );
    drop(segment);
}

/// The log captured from the daemon (see the module docs): every session
/// that opened is ended by a line with the same ip:port, refusals are never
/// opens, and each end form the daemon wrote is there.
#[test]
fn captured_log_pairs_every_open_with_an_end() {
    let text = std::fs::read_to_string(Path::new(FIXTURE)).expect("the captured fixture");
    let parsed = parse_log(&text);
    let bad = unmatched(&parsed);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    let opens = parsed.values().filter(|evs| evs.iter().any(|(k, _)| *k == EventKind::Connect)).count();
    assert!(opens >= 30, "the fixture holds {opens} sessions");
    let mut forms = BTreeSet::new();
    for events in parsed.values() {
        for (k, d) in events {
            if k.ends_session() {
                forms.insert((*k, d.clone().filter(|_| *k == EventKind::Lost || *k == EventKind::CommandTimeout)));
            }
        }
    }
    for want in [
        (EventKind::Closed, None),
        (EventKind::Lost, None),
        (EventKind::Lost, Some("(error: Connection reset by peer)".to_owned())),
        (EventKind::Lost, Some("unexpected disconnection while reading SMTP command".to_owned())),
        (EventKind::Lost, Some("while reading message data".to_owned())),
        (EventKind::Lost, Some("after final dot".to_owned())),
        (EventKind::Lost, Some("closed after SIGTERM".to_owned())),
        (EventKind::CommandTimeout, None),
        (EventKind::CommandTimeout, Some("data timeout".to_owned())),
        (EventKind::TooManyNonmail, None),
        (EventKind::TooManySyntax, None),
        (EventKind::TooManyUnrecognized, None),
        (EventKind::ClosedByDrop, None),
        (EventKind::NoMail, None),
    ] {
        assert!(forms.contains(&want), "the fixture has no {want:?}; it has {forms:?}");
    }
    let refusals = parsed.values().filter(|evs| evs.iter().any(|(k, _)| *k == EventKind::RefusedTooMany)).count();
    assert_eq!(refusals, 3, "three refusals at smtp_accept_max");
}
