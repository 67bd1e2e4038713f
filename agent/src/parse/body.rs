//! Classification of a line body (what follows the prefix) into an event
//! kind plus the fields that kind carries.
//!
//! Dispatch is on the first bytes of the body and then on fixed Exim
//! phrases; there is no regex and no allocation.
//!
//! # Attribution
//!
//! Exim writes the client as `[name ][(helo) ][ip]:port`, and the name
//! (reverse DNS) and the HELO are the client's text: they may hold spaces,
//! brackets and whole fake host specifications (`(x) [8.8.8.8]:25 (y)`).
//! Other client text surrounds the host in some formats: a quoted command
//! before it, a sender `<...>` before it, a `set_id`, a `next input` or a
//! last command after it. So the client is never taken from the first
//! bracket after `from`/`for`/`H=` alone; [`attribute`] looks at every
//! *host-like* address at or after the point where the host (or the client
//! text before it) begins: a bracketed address at that point, after a space
//! or after `H=`, followed by what Exim writes after a host (end of line, a
//! space, `:`, `)` or `,`).
//!
//! - The event's host is the first host-like address that the format's
//!   structure accepts: the `KEY=value` tokens and then the fixed text Exim
//!   writes after a host (`: 535 ...`, `refused: ...`, `(where): ...`,
//!   `rejected RCPT ...`).
//! - When the line holds host-like addresses that differ, the client text
//!   could have put either one there: the line is skipped as
//!   [`Skip::Ambiguous`] (and counted by the parser). The true address is
//!   always host-like, so an event names either it or nothing: a wrong
//!   address is worse than a missed event.
//!
//! Addresses in a HELO literal (`([192.0.2.1])`), after `I=`, inside a
//! sender (`<u@[192.0.2.1]>`) or glued to a quote are not host-like and
//! never matter.

use std::net::IpAddr;

use memchr::memmem;

use super::EventKind;
use super::host::{
    Host, Tail, field_key, host_terminator, parse_bracketed, parse_duration, parse_host, parse_ip, scan_tail,
};

/// The fields of an event before the timestamp and text validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fields<'a> {
    pub kind: EventKind,
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub local_ip: Option<IpAddr>,
    pub local_port: Option<u16>,
    pub count: Option<u32>,
    pub user: Option<&'a [u8]>,
    pub helo: Option<&'a [u8]>,
    pub detail: Option<&'a [u8]>,
    pub duration_ms: Option<u64>,
    pub host_name: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    fn new(kind: EventKind, host: &Host<'a>, tail: &Tail<'a>) -> Self {
        Fields {
            kind,
            ip: host.ip,
            port: host.port,
            local_ip: tail.local_ip,
            local_port: tail.local_port,
            count: None,
            user: None,
            helo: host.helo,
            detail: None,
            duration_ms: tail.duration_ms,
            host_name: host.name,
        }
    }

    fn bare(kind: EventKind, ip: IpAddr) -> Self {
        Fields {
            kind,
            ip,
            port: None,
            local_ip: None,
            local_port: None,
            count: None,
            user: None,
            helo: None,
            detail: None,
            duration_ms: None,
            host_name: None,
        }
    }

    fn detail(mut self, detail: Option<&'a [u8]>) -> Self {
        self.detail = detail.filter(|d| !d.is_empty());
        self
    }
}

/// A decimal `u32` (no sign, no leading `+`), or `None` on overflow.
fn parse_u32(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 10 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(c - b'0');
    }
    u32::try_from(v).ok()
}

fn skip_space(b: &[u8], mut pos: usize) -> usize {
    while pos < b.len() && b[pos] == b' ' {
        pos += 1;
    }
    pos
}

/// The text after the first `": "` in `s`, if any.
fn after_colon(s: &[u8]) -> Option<&[u8]> {
    memmem::find(s, b": ").map(|i| &s[i + 2..])
}

/// `s` without one pair of surrounding double quotes.
fn unquote(s: &[u8]) -> &[u8] {
    if s.len() >= 2 && s[0] == b'"' && s[s.len() - 1] == b'"' { &s[1..s.len() - 1] } else { s }
}

/// Why a body yielded no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skip {
    /// Not a line of a known kind, or a malformed one.
    Unknown,
    /// A known kind whose client text holds another host-like address, so
    /// that the client cannot be told for certain.
    Ambiguous,
}

/// The outcome of classifying one body.
pub(crate) type Parsed<'a> = Result<Fields<'a>, Skip>;

/// `Option` to [`Parsed`]-style results: `None` is an unknown line.
trait OrSkip<T> {
    fn or_skip(self) -> Result<T, Skip>;
}

impl<T> OrSkip<T> for Option<T> {
    fn or_skip(self) -> Result<T, Skip> {
        self.ok_or(Skip::Unknown)
    }
}

/// Whether `p` (which holds `[`) is where a host's address may start: at
/// `start`, after a space, or after an `H=` that is itself at `start`, at
/// the beginning or after a space.
fn host_position(b: &[u8], start: usize, p: usize) -> bool {
    if p == start {
        return true;
    }
    if p == 0 {
        return false;
    }
    if b[p - 1] == b' ' {
        return true;
    }
    p >= 2 && &b[p - 2..p] == b"H=" && (p == 2 || p - 2 == start || b[p - 3] == b' ')
}

/// The HELO and verified name of the host whose address starts at `p`, when
/// the text from the last `H=` before it (or from `start`) is a strict host
/// specification ending at `end`; a junk HELO (with spaces) is left out.
fn spec_before(b: &[u8], start: usize, p: usize, end: usize) -> (Option<&[u8]>, Option<&[u8]>) {
    let from = memmem::rfind(&b[start..p], b"H=").map_or(start, |i| start + i);
    parse_host(b, from).filter(|h| h.end == end).map_or((None, None), |h| (h.helo, h.name))
}

/// Attributes a line to its client (see the module documentation): the
/// first host-like address at or after `start` that `accept` takes (given
/// the index of its `[`, the host, its `KEY=value` tokens and the text after
/// them), unless the body holds host-like addresses that differ (before
/// `start` too: Exim's own text there never holds one).
fn attribute<'a>(
    b: &'a [u8],
    start: usize,
    mut accept: impl FnMut(usize, &Host<'a>, &Tail<'a>, &'a [u8]) -> Option<Fields<'a>>,
) -> Parsed<'a> {
    let mut chosen: Option<Fields<'a>> = None;
    let mut first_ip: Option<IpAddr> = None;
    let mut mixed = false;
    let mut from = 0;
    while let Some(i) = b.get(from..).and_then(|s| memchr::memchr(b'[', s)) {
        let p = from + i;
        from = p + 1;
        if !host_position(b, start, p) {
            continue;
        }
        let Some((ip, port, end)) = parse_bracketed(b, p) else { continue };
        if !host_terminator(b, end) {
            continue;
        }
        match first_ip {
            None => first_ip = Some(ip),
            Some(first) if first != ip => mixed = true,
            Some(_) => {}
        }
        if chosen.is_none() && p >= start {
            let (helo, name) = spec_before(b, start, p, end);
            let host = Host { ip, port, helo, name, end };
            let tail = scan_tail(b, end);
            let rest = &b[skip_space(b, tail.end)..];
            chosen = accept(p, &host, &tail, rest);
        }
    }
    match chosen {
        Some(_) if mixed => Err(Skip::Ambiguous),
        Some(f) => Ok(f),
        None => Err(Skip::Unknown),
    }
}

/// Classifies a body. `msgid` tells whether a message id preceded it.
pub(crate) fn classify(b: &[u8], msgid: bool) -> Parsed<'_> {
    let found = match b.first().or_skip()? {
        b'S' => smtp(b),
        b'C' if b.starts_with(b"Connection from ") => refused(b),
        b'H' if b.starts_with(b"H=") => h_line(b, 0),
        b'F' if b.starts_with(b"F=") => f_line(b),
        b'n' => no_lines(b),
        b'u' if b.starts_with(b"unqualified ") => unqualified(b),
        b'u' if b.starts_with(b"unexpected disconnection while reading SMTP ") => unexpected_disconnection(b),
        b'T' if b.starts_with(b"TLS error on connection from ") => tls_error(b),
        b'<' if msgid && b.starts_with(b"<= ") => accepted(b),
        b'R' if b.starts_with(b"Rejected relay attempt: '") => cpanel_relay(b).or_skip(),
        b'r' if b.starts_with(b"rejected from ") => rejected_from(b),
        _ => Err(Skip::Unknown),
    };
    match found {
        Err(Skip::Unknown) => auth_failed(b),
        other => other,
    }
}

fn smtp(b: &[u8]) -> Parsed<'_> {
    if let Some(rest) = b.strip_prefix(b"SMTP connection lost after final dot H=") {
        lost_after_dot(b, b.len() - rest.len() - 2)
    } else if b.starts_with(b"SMTP connection ") {
        smtp_connection(b)
    } else if b.starts_with(b"SMTP call from ") {
        smtp_call(b)
    } else if let Some(rest) = b.strip_prefix(b"SMTP protocol error in \"") {
        quoted_error(b, b.len() - rest.len(), EventKind::ProtocolError)
    } else if let Some(rest) = b.strip_prefix(b"SMTP syntax error in \"") {
        quoted_error(b, b.len() - rest.len(), EventKind::SyntaxError)
    } else if b.starts_with(b"SMTP protocol synchronization error (") {
        sync_error(b)
    } else if let Some(rest) = b.strip_prefix(b"SMTP command timeout on ") {
        let rest = rest.strip_prefix(b"TLS ").unwrap_or(rest).strip_prefix(b"connection from ").or_skip()?;
        attribute(b, b.len() - rest.len(), |_, host, tail, _| Some(Fields::new(EventKind::CommandTimeout, host, tail)))
    } else if let Some(rest) = b.strip_prefix(b"SMTP data timeout (message abandoned) on connection from ") {
        attribute(b, b.len() - rest.len(), |_, host, tail, _| {
            Some(Fields::new(EventKind::CommandTimeout, host, tail).detail(Some(b"data timeout")))
        })
    } else {
        Err(Skip::Unknown)
    }
}

/// `SMTP connection [Ci=x ]from HOST ...`: connect, lost, closed by QUIT,
/// closed by DROP.
fn smtp_connection(b: &[u8]) -> Parsed<'_> {
    let mut pos = 16;
    // Exim 4.97+ may put `Ci=<id>` between `connection` and `from`.
    while !b[pos..].starts_with(b"from ") {
        let sp = pos + memchr::memchr(b' ', &b[pos..]).or_skip()?;
        field_key(&b[pos..sp]).or_skip()?;
        pos = sp + 1;
    }
    attribute(b, pos + 5, |_, host, tail, rest| connection_end(host, tail, rest))
}

/// What may follow the host of an `SMTP connection from` line.
fn connection_end<'a>(host: &Host<'a>, tail: &Tail<'a>, rest: &'a [u8]) -> Option<Fields<'a>> {
    if let Some(n) = rest.strip_prefix(b"(TCP/IP connection count = ") {
        let close = memchr::memchr(b')', n)?;
        let count = parse_u32(&n[..close])?;
        let mut f = Fields::new(EventKind::Connect, host, tail);
        f.count = Some(count);
        return Some(f);
    }
    if rest.starts_with(b"closed by DROP in ACL") {
        return Some(Fields::new(EventKind::ClosedByDrop, host, tail));
    }
    if rest == b"closed by QUIT" || rest.starts_with(b"closed by QUIT ") {
        return Some(Fields::new(EventKind::Closed, host, tail));
    }
    // The client went away without QUIT after a TLS failure (`closed by
    // EOF`), or Exim was told to stop (`closed after SIGTERM`; 4.97+ also
    // `closed SIGTERM` / `closed SIGINT` during DATA): the session ended.
    if matches!(rest, b"closed by EOF" | b"closed after SIGTERM" | b"closed SIGTERM" | b"closed SIGINT") {
        return Some(Fields::new(EventKind::Lost, host, tail).detail(Some(rest)));
    }
    if rest == b"lost" || rest.starts_with(b"lost ") {
        let mut f = Fields::new(EventKind::Lost, host, tail);
        let mut detail = rest.get(5..).unwrap_or_default();
        if let Some(i) = memmem::rfind(detail, b"D=").filter(|i| *i == 0 || detail[i - 1] == b' ')
            && let Some(ms) = parse_duration(&detail[i + 2..])
        {
            f.duration_ms = Some(ms);
            detail = detail[..i].trim_ascii_end();
        }
        return Some(f.detail(Some(detail)));
    }
    None
}

/// `unexpected disconnection while reading SMTP command from HOST [I=..]
/// [(error: ...)] [D=..]`: the client dropped the connection in the middle
/// of a transaction (after `MAIL`); Exim 4.96 writes it instead of `lost`
/// then, older releases with the reason after the host, and old ones also
/// `... while reading SMTP data (header) from HOST`. The detail is the
/// phrase before `from` (the reason Exim may add stays in the raw line).
fn unexpected_disconnection(b: &[u8]) -> Parsed<'_> {
    let lead = b"unexpected disconnection while reading SMTP ".len();
    let what = &b[lead..];
    let phrase_end = if what.starts_with(b"command from ") {
        lead + 7
    } else if what.starts_with(b"data (header) from ") {
        lead + 13
    } else {
        return Err(Skip::Unknown);
    };
    attribute(b, phrase_end + 6, |_, host, tail, rest| {
        let mut f = Fields::new(EventKind::Lost, host, tail).detail(Some(&b[..phrase_end]));
        if f.duration_ms.is_none()
            && let Some(i) = memmem::rfind(rest, b"D=").filter(|i| *i == 0 || rest[i - 1] == b' ')
        {
            f.duration_ms = parse_duration(&rest[i + 2..]);
        }
        Some(f)
    })
}

/// `[msgid] SMTP connection lost after final dot H=HOST [I=..] P=..`: the
/// client sent the message and dropped the connection before Exim could
/// answer; Exim discards the message.
fn lost_after_dot(b: &[u8], h: usize) -> Parsed<'_> {
    attribute(b, h, |_, host, tail, _| Some(Fields::new(EventKind::Lost, host, tail).detail(Some(b"after final dot"))))
}

/// `Connection from HOST refused: ...`.
fn refused(b: &[u8]) -> Parsed<'_> {
    attribute(b, 16, |_, host, tail, rest| {
        let reason = rest.strip_prefix(b"refused: ")?;
        let f = |kind| Fields::new(kind, host, tail);
        match reason {
            b"too many connections" => Some(f(EventKind::RefusedTooMany)),
            b"too many connections from that IP address" => Some(f(EventKind::RefusedPerHost)),
            _ if reason.starts_with(b"load average") => Some(f(EventKind::RefusedLoad).detail(Some(reason))),
            _ => None,
        }
    })
}

/// `SMTP call from HOST dropped: too many ... (last was "X")`.
fn smtp_call(b: &[u8]) -> Parsed<'_> {
    attribute(b, 15, |_, host, tail, rest| {
        let what = rest.strip_prefix(b"dropped: too many ")?;
        let kind = if what.starts_with(b"nonmail commands") {
            EventKind::TooManyNonmail
        } else if what.starts_with(b"syntax or protocol errors") {
            EventKind::TooManySyntax
        } else if what.starts_with(b"unrecognized commands") {
            EventKind::TooManyUnrecognized
        } else {
            return None;
        };
        let detail = if let Some(i) = memmem::rfind(what, b",  C=") {
            let list = &what[i + 5..];
            Some(list.strip_suffix(b")").unwrap_or(list))
        } else {
            memmem::find(what, b"was \"").and_then(|i| {
                let cmd = &what[i + 5..];
                let end = memmem::rfind(cmd, b"\")")?;
                Some(&cmd[..end])
            })
        };
        Some(Fields::new(kind, host, tail).detail(detail))
    })
}

/// `SMTP protocol|syntax error in "<cmd>" H=... <message>`: the command
/// (from `start`) is the client's, so the host must follow a `" H=`.
fn quoted_error(b: &[u8], start: usize, kind: EventKind) -> Parsed<'_> {
    attribute(b, start, |p, host, tail, rest| {
        let after_command = memmem::find(&b[start..p], b"\" H=").is_some();
        (after_command && !rest.is_empty()).then(|| Fields::new(kind, host, tail).detail(Some(rest)))
    })
}

/// `SMTP protocol synchronization error (<why>): rejected ...`.
fn sync_error(b: &[u8]) -> Parsed<'_> {
    let start = 37;
    let close = start + memmem::find(&b[start..], b"): ").or_skip()?;
    let reason = &b[start..close];
    let after = close + 3;
    let (from, next) = if b[after..].starts_with(b"rejected connection from H=") {
        (after + 25, &b"input=\""[..])
    } else if b[after..].starts_with(b"rejected \"") {
        (after + 10, &b"next input=\""[..])
    } else {
        return Err(Skip::Unknown);
    };
    attribute(b, from, |_, host, tail, rest| {
        rest.starts_with(next).then(|| Fields::new(EventKind::SyncError, host, tail).detail(Some(reason)))
    })
}

/// Lines that start with `H=` (from `start`): RCPT/MAIL/DATA rejections,
/// sender verify, connect-ACL rejections and drops.
fn h_line(b: &[u8], start: usize) -> Parsed<'_> {
    attribute(b, start, |_, host, tail, rest| h_rest(host, tail, rest))
}

/// What may follow the host of an `H=` line.
fn h_rest<'a>(host: &Host<'a>, tail: &Tail<'a>, rest: &'a [u8]) -> Option<Fields<'a>> {
    let f = |kind| Fields::new(kind, host, tail);
    let (temporary, verb) = match rest.strip_prefix(b"temporarily ") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if let Some(r) = verb.strip_prefix(b"rejected RCPT ") {
        let reason = after_colon(r);
        let relay = !temporary
            && reason.is_some_and(|r| {
                let r = unquote(r);
                r.starts_with(b"relay not permitted")
                    || r.starts_with(b"Rejected relay attempt")
                    || r.starts_with(b"SMTP AUTH is required")
            });
        let kind = if relay { EventKind::RelayDenied } else { EventKind::RcptRejected };
        return Some(f(kind).detail(reason));
    }
    if verb.starts_with(b"rejected MAIL ")
        || verb.starts_with(b"rejected after DATA")
        || verb.starts_with(b"rejected by local_scan()")
    {
        return Some(f(EventKind::RcptRejected).detail(after_colon(verb)));
    }
    if let Some(r) = rest.strip_prefix(b"sender verify ") {
        if r.starts_with(b"fail for ") || r.starts_with(b"defer for ") {
            return Some(f(EventKind::RcptRejected).detail(after_colon(r)));
        }
        return None;
    }
    if let Some(r) = verb.strip_prefix(b"rejected connection in \"connect\" ACL") {
        let msg = r.strip_prefix(b": ").map(unquote);
        let kind = if msg == Some(b"forcibly dropped") { EventKind::AclDropped } else { EventKind::AclRejected };
        return Some(f(kind).detail(msg));
    }
    if rest.starts_with(b"dropped by '") {
        return Some(f(EventKind::AclDropped).detail(after_colon(rest).map(unquote)));
    }
    if verb.starts_with(b"rejected ") {
        return Some(f(EventKind::AclRejected).detail(Some(after_colon(verb).map_or(verb, unquote))));
    }
    None
}

/// `F=<sender> H=... P=... rejected by local_scan(): ...` (after a message
/// id). The sender is the client's text, so attribution starts at it.
fn f_line(b: &[u8]) -> Parsed<'_> {
    h_line(b, 2)
}

/// `no MAIL in SMTP connection from ...`, `no host name found for IP address
/// <ip>`, `no IP address found for host <name> (during SMTP connection from
/// [ip]...)`.
fn no_lines(b: &[u8]) -> Parsed<'_> {
    if let Some(rest) = b.strip_prefix(b"no MAIL in SMTP connection from ") {
        return attribute(b, b.len() - rest.len(), |_, host, tail, _| {
            Some(Fields::new(EventKind::NoMail, host, tail).detail(tail.commands))
        });
    }
    if let Some(rest) = b.strip_prefix(b"no host name found for IP address ") {
        return Ok(Fields::bare(EventKind::NoHostName, parse_ip(rest).or_skip()?));
    }
    if let Some(rest) = b.strip_prefix(b"no IP address found for host ") {
        // The name comes from reverse DNS, which the client's owner controls.
        const DURING: &[u8] = b" (during SMTP connection from ";
        let start = b.len() - rest.len();
        return attribute(b, start, |p, host, tail, rest| {
            let name = b[start..p].strip_suffix(DURING)?;
            let closed = rest == b")" || (rest.is_empty() && b.ends_with(b")"));
            (closed && !name.is_empty()).then(|| Fields::new(EventKind::NoHostName, host, tail).detail(Some(name)))
        });
    }
    Err(Skip::Unknown)
}

/// `unqualified sender|recipient|verify rejected: <addr> H=...`. The
/// address is the client's text; the host follows a `> H=`.
fn unqualified(b: &[u8]) -> Parsed<'_> {
    let what = &b[12..];
    let kind = if what.starts_with(b"verify rejected: <") {
        EventKind::AclRejected
    } else if what.starts_with(b"sender rejected: <") || what.starts_with(b"recipient rejected: <") {
        EventKind::RcptRejected
    } else {
        return Err(Skip::Unknown);
    };
    let colon = memchr::memchr(b':', b).or_skip()?;
    attribute(b, colon + 2, |p, host, tail, _| {
        memmem::find(&b[colon..p], b"> H=").is_some().then(|| Fields::new(kind, host, tail).detail(Some(&b[..colon])))
    })
}

/// `TLS error on connection from HOST (where): what`.
fn tls_error(b: &[u8]) -> Parsed<'_> {
    attribute(b, 29, |_, host, tail, rest| {
        let close = memmem::find(rest, b"): ")?;
        let where_ = rest.get(1..close)?;
        let plain = rest[0] == b'(' && !where_.iter().any(|c| matches!(c, b'(' | b')' | b'['));
        plain.then(|| Fields::new(EventKind::TlsError, host, tail).detail(Some(rest)))
    })
}

/// `<= sender [R=..] [U=..] H=HOST [I=..] P=.. [X=..] [A=driver:user] S=..`.
fn accepted(b: &[u8]) -> Parsed<'_> {
    let start = 3;
    let sp = start + memchr::memchr(b' ', &b[start..]).or_skip()?;
    let sender = &b[start..sp];
    if sender.contains(&b'"') {
        return Err(Skip::Unknown);
    }
    let mut pos = sp;
    loop {
        if b.get(pos) != Some(&b' ') {
            return Err(Skip::Unknown);
        }
        let tok = pos + 1;
        if b[tok..].starts_with(b"H=") {
            return attribute(b, tok, |_, host, tail, _| {
                let mut f = Fields::new(EventKind::Accepted, host, tail).detail(Some(sender));
                f.user = tail.auth.and_then(|a| memchr::memchr(b':', a).map(|i| &a[i + 1..])).filter(|u| !u.is_empty());
                Some(f)
            });
        }
        let stop = memchr::memchr(b' ', &b[tok..]).map_or(b.len(), |i| tok + i);
        field_key(&b[tok..stop]).or_skip()?;
        pos = stop;
    }
}

/// cPanel's ACL message `Rejected relay attempt: '<ip>' From: ... To: ...`.
fn cpanel_relay(b: &[u8]) -> Option<Fields<'_>> {
    let rest = &b[25..];
    let q = memchr::memchr(b'\'', rest)?;
    let ip = parse_ip(&rest[..q])?;
    let detail = rest[q + 1..].trim_ascii();
    Some(Fields::bare(EventKind::RelayDenied, ip).detail(Some(detail)))
}

/// `rejected from [ip] (ident): <why>` and `rejected from <sender> H=...:
/// <why>`; the ident and the sender are the client's text.
fn rejected_from(b: &[u8]) -> Parsed<'_> {
    let sender = b.get(14) == Some(&b'<');
    attribute(b, 14, |p, host, tail, _| {
        let placed = if sender { memmem::find(&b[14..p], b"> H=").is_some() } else { p == 14 };
        if !placed {
            return None;
        }
        let why = after_colon(&b[host.end..])?;
        Some(Fields::new(EventKind::RcptRejected, host, tail).detail(Some(why)))
    })
}

/// `<driver> authenticator failed for [H=]HOST [I=..] [Ci=..]: 5xx ... (set_id=<user>)`.
///
/// Temporary (4xx) failures are skipped: they mean the authentication
/// backend is down, not that the client guessed wrong.
fn auth_failed(b: &[u8]) -> Parsed<'_> {
    let sp = memchr::memchr(b' ', b.get(..b.len().min(64)).or_skip()?).or_skip()?;
    let after = b[sp..].strip_prefix(b" authenticator failed for ").or_skip()?;
    let driver = &b[..sp];
    attribute(b, b.len() - after.len(), |_, host, tail, rest| {
        // The `:` before the code follows the host or the last token, and
        // may be glued to it (`I=[ip]:25:`).
        let glued = tail.end > host.end && b[tail.end - 1] == b':';
        let msg = if glued && b.get(tail.end) == Some(&b' ') { rest } else { b[tail.end..].strip_prefix(b": ")? };
        if msg.first().is_none_or(|c| *c != b'5') {
            return None;
        }
        let mut f = Fields::new(EventKind::AuthFailed, host, tail).detail(Some(driver));
        if let Some(i) = memmem::find(msg, b"(set_id=") {
            let v = &msg[i + 8..];
            let end = if v.ends_with(b")") { Some(v.len() - 1) } else { memmem::rfind(v, b"): ") };
            f.user = end.map(|e| &v[..e]).filter(|u| !u.is_empty());
        }
        Some(f)
    })
}
