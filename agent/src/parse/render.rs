//! Writes events back as Exim log lines: the inverse of the parser, used by
//! the log generator (`fleetban-agent gen-log`), the benchmarks and the
//! round-trip property tests.
//!
//! Rendering is not on the hot path and allocates freely. For a rendered line
//! to parse back to the same event, the event must only carry the fields its
//! kind has in Exim's format (e.g. no HELO on a connect line); see the
//! per-kind notes on [`render`].

use std::fmt::Write as _;
use std::net::IpAddr;

use super::civil::Civil;
use super::{Event, EventKind};

/// Which message id, if any, goes before the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgId {
    /// None.
    None,
    /// The 16-character form used before Exim 4.97 (`1ahr79-0006jK-G9`).
    Old,
    /// The 23-character form of Exim 4.97+ (`1x5dJQ-00000002ksM-1pMm`).
    New,
}

/// A wrapper a log shipper puts around Exim's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrap {
    /// Exim's own file.
    None,
    /// `YYYY-MM-DD HH:MM:SS host exim[pid]: <exim line>` (rsyslog, ISO dates).
    IsoSyslog,
    /// `Mon DD HH:MM:SS host exim[pid]: <body>` (BSD syslog: no year, no
    /// milliseconds, no Exim timestamp).
    BsdSyslog,
    /// `host exim[pid]: <exim line>`.
    TagFirst,
}

/// How a line is written around its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Style {
    /// `.mmm` after the seconds (`+millisec`).
    pub millis: bool,
    /// ` +hhmm` after the time (`log_timezone`), in minutes east; the civil
    /// time is written in that offset. `None` writes UTC without a zone.
    pub zone_offset_mins: Option<i32>,
    /// `[pid] ` (`+pid`).
    pub pid: Option<u32>,
    /// Message id before the body (arrivals always get one).
    pub msgid: MsgId,
    /// Syslog or journald wrapper.
    pub wrap: Wrap,
    /// A reverse-DNS name written before the HELO in host specifications.
    pub host_name: Option<String>,
    /// `authenticator failed for H=...` as Exim 4.99 writes it.
    pub auth_h_prefix: bool,
}

impl Default for Style {
    fn default() -> Self {
        Style {
            millis: false,
            zone_offset_mins: None,
            pid: None,
            msgid: MsgId::None,
            wrap: Wrap::None,
            host_name: None,
            auth_h_prefix: false,
        }
    }
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

fn ip_str(ip: IpAddr) -> String {
    ip.to_string()
}

/// Writes an Exim duration: `3.416s` when it has milliseconds, else `2m42s`.
pub fn duration(ms: u64) -> String {
    if !ms.is_multiple_of(1000) {
        return format!("{}.{:03}s", ms / 1000, ms % 1000);
    }
    let mut s = ms / 1000;
    if s == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, len) in [('w', 604_800), ('d', 86_400), ('h', 3600), ('m', 60), ('s', 1)] {
        if s >= len {
            let _ = write!(out, "{}{unit}", s / len);
            s %= len;
        }
    }
    out
}

fn stamp(out: &mut String, time_ms: i64, style: &Style) {
    let offset_ms = i64::from(style.zone_offset_mins.unwrap_or(0)) * 60_000;
    let c = Civil::from_ms(time_ms + offset_ms);
    let _ = write!(out, "{:04}-{:02}-{:02} {:02}:{:02}:{:02}", c.year, c.month, c.day, c.hour, c.minute, c.second);
    if style.millis {
        let _ = write!(out, ".{:03}", c.millis);
    }
    if let Some(mins) = style.zone_offset_mins {
        let sign = if mins < 0 { '-' } else { '+' };
        let _ = write!(out, " {sign}{:02}{:02}", mins.abs() / 60, mins.abs() % 60);
    }
    out.push(' ');
}

fn msgid(out: &mut String, kind: MsgId, seed: i64) {
    const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut n = seed.unsigned_abs().wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut ch = || {
        n = n.rotate_left(7).wrapping_add(0x632B_E59B_D9B4_E019);
        char::from(B62[(n % 62) as usize])
    };
    let (a, b, c) = match kind {
        MsgId::None => return,
        MsgId::Old => (6, 6, 2),
        MsgId::New => (6, 11, 4),
    };
    for _ in 0..a {
        out.push(ch());
    }
    out.push('-');
    for _ in 0..b {
        out.push(ch());
    }
    out.push('-');
    for _ in 0..c {
        out.push(ch());
    }
    out.push(' ');
}

/// `name (helo) [ip]:port`, with the parts the event and style have.
fn host(ev: &Event<'_>, style: &Style, with_helo: bool) -> String {
    let mut s = String::new();
    if with_helo {
        if let Some(name) = &style.host_name {
            s.push_str(name);
            s.push(' ');
        }
        if let Some(helo) = ev.helo {
            let _ = write!(s, "({helo}) ");
        }
    }
    let _ = write!(s, "[{}]", ip_str(ev.ip));
    if let Some(p) = ev.port {
        let _ = write!(s, ":{p}");
    }
    if let Some(l) = ev.local_ip {
        let _ = write!(s, " I=[{}]", ip_str(l));
        if let Some(p) = ev.local_port {
            let _ = write!(s, ":{p}");
        }
    }
    s
}

fn dur(ev: &Event<'_>) -> String {
    ev.duration_ms.map(|d| format!(" D={}", duration(d))).unwrap_or_default()
}

/// The body Exim writes for an event. Fields each kind carries (others must
/// be `None` for a faithful round trip):
///
/// - connect: port, local, count (required); refused_*: port, local
///   (refused_load: detail `load average = N`);
/// - auth_failed: helo, user, detail = driver (required);
/// - accepted: helo, user (authenticated id), detail = sender (required);
/// - no_host_name: detail = host name (optional, selects the
///   `no IP address found` form; then port and local too);
/// - lost, no_mail, command_timeout: duration; no_mail: detail = `C=` list;
///   command_timeout: detail `data timeout` selects the data form; lost:
///   detail `unexpected disconnection while reading SMTP command` (or `data
///   (header)`), `after final dot` (no duration) and `closed by EOF` /
///   `closed after SIGTERM` / `closed SIGTERM` / `closed SIGINT` select
///   those forms;
/// - every other kind: helo, detail (required for relay, rcpt, sync, the
///   `too_many_*` (last command), protocol/syntax errors, ACL, TLS kinds).
pub fn body(ev: &Event<'_>, style: &Style) -> String {
    let d = ev.detail.unwrap_or("");
    let h = host(ev, style, true);
    match ev.kind {
        EventKind::Connect => {
            format!(
                "SMTP connection from {} (TCP/IP connection count = {})",
                host(ev, style, false),
                ev.count.unwrap_or(0)
            )
        }
        EventKind::RefusedTooMany => {
            format!("Connection from {} refused: too many connections", host(ev, style, false))
        }
        EventKind::RefusedPerHost => {
            format!("Connection from {} refused: too many connections from that IP address", host(ev, style, false))
        }
        EventKind::RefusedLoad => format!("Connection from {} refused: {d}", host(ev, style, false)),
        EventKind::AuthFailed => {
            let hp = if style.auth_h_prefix { "H=" } else { "" };
            let set_id = ev.user.map(|u| format!(" (set_id={u})")).unwrap_or_default();
            format!("{d} authenticator failed for {hp}{h}: 535 Incorrect authentication data{set_id}")
        }
        EventKind::RelayDenied | EventKind::RcptRejected => {
            format!("H={h} F=<sender@example.net> rejected RCPT <rcpt@example.org>: {d}")
        }
        EventKind::SyncError if d == "input sent without waiting for greeting" => {
            format!(
                "SMTP protocol synchronization error ({d}): rejected connection from H={h} input=\"GET / HTTP/1.1\\r\\n\""
            )
        }
        EventKind::SyncError => {
            format!("SMTP protocol synchronization error ({d}): rejected \"RSET\" H={h} next input=\"QUIT\\r\\n\"")
        }
        EventKind::TooManyNonmail => {
            format!("SMTP call from {h} dropped: too many nonmail commands (last was \"{d}\")")
        }
        EventKind::TooManySyntax => {
            format!("SMTP call from {h} dropped: too many syntax or protocol errors (last command was \"{d}\")")
        }
        EventKind::TooManyUnrecognized => {
            format!("SMTP call from {h} dropped: too many unrecognized commands (last was \"{d}\")")
        }
        EventKind::ProtocolError => format!("SMTP protocol error in \"AUTH LOGIN\" H={h} {d}"),
        EventKind::SyntaxError => format!("SMTP syntax error in \"GET / HTTP/1.1\" H={h} {d}"),
        EventKind::NoMail => {
            let c = ev.detail.map(|c| format!(" C={c}")).unwrap_or_default();
            format!("no MAIL in SMTP connection from {h}{}{c}", dur(ev))
        }
        EventKind::AclRejected => format!("H={h} rejected connection in \"connect\" ACL: \"{d}\""),
        EventKind::AclDropped => format!("H={h} dropped by 'connect' ACL: {d}"),
        EventKind::ClosedByDrop => format!("SMTP connection from {h} closed by DROP in ACL"),
        EventKind::Closed => format!("SMTP connection from {h}{} closed by QUIT", dur(ev)),
        // Never produced by the Exim parser (logins and sessions without
        // authentication are Dovecot's).
        EventKind::Unspecified | EventKind::Login | EventKind::NoAuthAttempts => String::new(),
        EventKind::Lost if d.starts_with("unexpected disconnection while reading SMTP ") => {
            format!("{d} from {h}{}", dur(ev))
        }
        EventKind::Lost if d == "after final dot" => {
            format!("SMTP connection lost after final dot H={h} P=esmtp")
        }
        EventKind::Lost if d.starts_with("closed ") => format!("SMTP connection from {h}{} {d}", dur(ev)),
        EventKind::Lost => {
            let why = ev.detail.map(|w| format!(" {w}")).unwrap_or_default();
            format!("SMTP connection from {h} lost{why}{}", dur(ev))
        }
        EventKind::CommandTimeout if d == "data timeout" => {
            format!("SMTP data timeout (message abandoned) on connection from {h} F=<sender@example.net>{}", dur(ev))
        }
        EventKind::CommandTimeout => format!("SMTP command timeout on connection from {h}{}", dur(ev)),
        EventKind::TlsError => format!("TLS error on connection from {h} {d}"),
        EventKind::NoHostName => match ev.detail {
            Some(name) => {
                format!("no IP address found for host {name} (during SMTP connection from {})", host(ev, style, false))
            }
            None => format!("no host name found for IP address {}", ip_str(ev.ip)),
        },
        EventKind::Accepted => {
            let auth = ev.user.map(|u| format!(" A=dovecot_login:{u}")).unwrap_or_default();
            let proto = if ev.user.is_some() { "esmtpa" } else { "esmtp" };
            format!("<= {d} H={h} P={proto}{auth} S=2048 id=msg@example.net")
        }
    }
}

/// The whole line (without a newline) for an event in a style.
pub fn render(ev: &Event<'_>, style: &Style) -> String {
    let body = body(ev, style);
    let mut out = String::with_capacity(body.len() + 64);
    let pid = style.pid.unwrap_or(1);
    match style.wrap {
        Wrap::None => {}
        Wrap::IsoSyslog => {
            // The wrapper's own stamp; Exim's inside it wins.
            stamp(&mut out, ev.time_ms, &Style { millis: false, zone_offset_mins: None, ..Style::default() });
            let _ = write!(out, "mx.example.net exim[{pid}]: ");
        }
        Wrap::TagFirst => {
            let _ = write!(out, "mx.example.net exim[{pid}]: ");
        }
        Wrap::BsdSyslog => {
            let c = Civil::from_ms(ev.time_ms + i64::from(style.zone_offset_mins.unwrap_or(0)) * 60_000);
            let _ = write!(
                out,
                "{} {:>2} {:02}:{:02}:{:02} mx.example.net exim[{pid}]: ",
                MONTHS[(c.month - 1) as usize],
                c.day,
                c.hour,
                c.minute,
                c.second
            );
        }
    }
    if style.wrap != Wrap::BsdSyslog {
        stamp(&mut out, ev.time_ms, style);
        if let Some(pid) = style.pid {
            let _ = write!(out, "[{pid}] ");
        }
    }
    let id = if ev.kind == EventKind::Accepted && style.msgid == MsgId::None { MsgId::New } else { style.msgid };
    msgid(&mut out, id, ev.time_ms);
    out.push_str(&body);
    out
}
