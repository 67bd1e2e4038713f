//! Classification of a line body (what follows the prefix) into an event
//! kind plus the fields that kind carries.
//!
//! Dispatch is on the first bytes of the body and then on fixed Exim
//! phrases; there is no regex and no allocation. The remote address is
//! always taken from a fixed position in Exim's format (right after `from`,
//! `for` or a leading `H=`), never found by searching, except in the three
//! formats where Exim writes client-controlled text *before* the host
//! (`SMTP protocol error in "<cmd>" H=...`, `SMTP syntax error in ...` and
//! `synchronization error ... rejected "<cmd>" H=...`). There every
//! candidate `" H=` is parsed strictly; a protocol error takes the last one
//! (its tail is Exim's own text), the other two take a candidate only when
//! all candidates agree, and otherwise the line is skipped: a wrong address
//! is worse than a missed event.

use std::net::IpAddr;

use memchr::memmem;

use super::EventKind;
use super::host::{Host, Tail, field_key, parse_duration, parse_host, parse_ip, scan_tail};

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

/// Parses a host at `pos` and the tokens after it; returns them and the rest
/// of the line after the tokens (leading spaces removed).
fn host_and_rest(b: &[u8], pos: usize) -> Option<(Host<'_>, Tail<'_>, &[u8])> {
    let host = parse_host(b, pos)?;
    let tail = scan_tail(b, host.end);
    let rest = &b[skip_space(b, tail.end)..];
    Some((host, tail, rest))
}

/// Classifies a body. `msgid` tells whether a message id preceded it.
pub(crate) fn classify(b: &[u8], msgid: bool) -> Option<Fields<'_>> {
    let found = match b.first()? {
        b'S' => smtp(b),
        b'C' if b.starts_with(b"Connection from ") => refused(b),
        b'H' if b.starts_with(b"H=") => h_line(b, 0),
        b'F' if b.starts_with(b"F=") => f_line(b),
        b'n' => no_lines(b),
        b'u' if b.starts_with(b"unqualified ") => unqualified(b),
        b'u' if b.starts_with(b"unexpected disconnection while reading SMTP ") => unexpected_disconnection(b),
        b'T' if b.starts_with(b"TLS error on connection from ") => tls_error(b),
        b'<' if msgid && b.starts_with(b"<= ") => accepted(b),
        b'R' if b.starts_with(b"Rejected relay attempt: '") => cpanel_relay(b),
        b'r' if b.starts_with(b"rejected from ") => rejected_from(b),
        _ => None,
    };
    found.or_else(|| auth_failed(b))
}

fn smtp(b: &[u8]) -> Option<Fields<'_>> {
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
        let rest = rest.strip_prefix(b"TLS ").unwrap_or(rest).strip_prefix(b"connection from ")?;
        let (host, tail, _) = host_and_rest(b, b.len() - rest.len())?;
        Some(Fields::new(EventKind::CommandTimeout, &host, &tail))
    } else if let Some(rest) = b.strip_prefix(b"SMTP data timeout (message abandoned) on connection from ") {
        let (host, tail, _) = host_and_rest(b, b.len() - rest.len())?;
        Some(Fields::new(EventKind::CommandTimeout, &host, &tail).detail(Some(b"data timeout")))
    } else {
        None
    }
}

/// `SMTP connection [Ci=x ]from HOST ...`: connect, lost, closed by QUIT,
/// closed by DROP.
fn smtp_connection(b: &[u8]) -> Option<Fields<'_>> {
    let mut pos = 16;
    // Exim 4.97+ may put `Ci=<id>` between `connection` and `from`.
    while !b[pos..].starts_with(b"from ") {
        let sp = pos + memchr::memchr(b' ', &b[pos..])?;
        field_key(&b[pos..sp])?;
        pos = sp + 1;
    }
    let (host, tail, rest) = host_and_rest(b, pos + 5)?;
    if let Some(n) = rest.strip_prefix(b"(TCP/IP connection count = ") {
        let close = memchr::memchr(b')', n)?;
        let count = parse_u32(&n[..close])?;
        let mut f = Fields::new(EventKind::Connect, &host, &tail);
        f.count = Some(count);
        return Some(f);
    }
    if rest.starts_with(b"closed by DROP in ACL") {
        return Some(Fields::new(EventKind::ClosedByDrop, &host, &tail));
    }
    if rest == b"closed by QUIT" || rest.starts_with(b"closed by QUIT ") {
        return Some(Fields::new(EventKind::Closed, &host, &tail));
    }
    // The client went away without QUIT after a TLS failure (`closed by
    // EOF`), or Exim was told to stop (`closed after SIGTERM`; 4.97+ also
    // `closed SIGTERM` / `closed SIGINT` during DATA): the session ended.
    if matches!(rest, b"closed by EOF" | b"closed after SIGTERM" | b"closed SIGTERM" | b"closed SIGINT") {
        return Some(Fields::new(EventKind::Lost, &host, &tail).detail(Some(rest)));
    }
    if rest == b"lost" || rest.starts_with(b"lost ") {
        let mut f = Fields::new(EventKind::Lost, &host, &tail);
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
fn unexpected_disconnection(b: &[u8]) -> Option<Fields<'_>> {
    let lead = b"unexpected disconnection while reading SMTP ".len();
    let what = &b[lead..];
    let phrase_end = if what.starts_with(b"command from ") {
        lead + 7
    } else if what.starts_with(b"data (header) from ") {
        lead + 13
    } else {
        return None;
    };
    let (host, tail, rest) = host_and_rest(b, phrase_end + 6)?;
    let mut f = Fields::new(EventKind::Lost, &host, &tail).detail(Some(&b[..phrase_end]));
    if f.duration_ms.is_none()
        && let Some(i) = memmem::rfind(rest, b"D=").filter(|i| *i == 0 || rest[i - 1] == b' ')
    {
        f.duration_ms = parse_duration(&rest[i + 2..]);
    }
    Some(f)
}

/// `[msgid] SMTP connection lost after final dot H=HOST [I=..] P=..`: the
/// client sent the message and dropped the connection before Exim could
/// answer; Exim discards the message.
fn lost_after_dot(b: &[u8], h: usize) -> Option<Fields<'_>> {
    let (host, tail, _) = host_and_rest(b, h)?;
    Some(Fields::new(EventKind::Lost, &host, &tail).detail(Some(b"after final dot")))
}

/// `Connection from HOST refused: ...`.
fn refused(b: &[u8]) -> Option<Fields<'_>> {
    let (host, tail, rest) = host_and_rest(b, 16)?;
    let reason = rest.strip_prefix(b"refused: ")?;
    let f = |kind| Fields::new(kind, &host, &tail);
    match reason {
        b"too many connections" => Some(f(EventKind::RefusedTooMany)),
        b"too many connections from that IP address" => Some(f(EventKind::RefusedPerHost)),
        _ if reason.starts_with(b"load average") => Some(f(EventKind::RefusedLoad).detail(Some(reason))),
        _ => None,
    }
}

/// `SMTP call from HOST dropped: too many ... (last was "X")`.
fn smtp_call(b: &[u8]) -> Option<Fields<'_>> {
    let (host, tail, rest) = host_and_rest(b, 15)?;
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
    Some(Fields::new(kind, &host, &tail).detail(detail))
}

/// Every strictly valid host spec that follows a `" H=` at or after `from`.
fn quoted_candidates(b: &[u8], from: usize) -> impl Iterator<Item = Host<'_>> {
    candidates(b, from, b"\" H=")
}

/// Every strictly valid host spec that follows `sep` (which ends in ` H=`)
/// at or after `from`.
fn candidates<'a>(b: &'a [u8], from: usize, sep: &'static [u8]) -> impl Iterator<Item = Host<'a>> {
    memmem::find_iter(&b[from..], sep).filter_map(move |i| parse_host(b, from + i + sep.len() - 2))
}

/// One host out of the candidates: the last when `trust_last`, otherwise
/// only when all candidates name the same address.
fn pick<'a>(mut it: impl Iterator<Item = Host<'a>>, trust_last: bool) -> Option<Host<'a>> {
    let mut chosen = it.next()?;
    for h in it {
        if !trust_last && h.ip != chosen.ip {
            return None;
        }
        chosen = h;
    }
    Some(chosen)
}

/// `SMTP protocol|syntax error in "<cmd>" H=... <message>`.
fn quoted_error(b: &[u8], start: usize, kind: EventKind) -> Option<Fields<'_>> {
    let host = pick(quoted_candidates(b, start), kind == EventKind::ProtocolError)?;
    let tail = scan_tail(b, host.end);
    let rest = &b[skip_space(b, tail.end)..];
    Some(Fields::new(kind, &host, &tail).detail(Some(rest)))
}

/// `SMTP protocol synchronization error (<why>): rejected ...`.
fn sync_error(b: &[u8]) -> Option<Fields<'_>> {
    let start = 37;
    let close = start + memmem::find(&b[start..], b"): ")?;
    let reason = &b[start..close];
    let after = close + 3;
    let host = if b[after..].starts_with(b"rejected connection from H=") {
        parse_host(b, after + 25)?
    } else if b[after..].starts_with(b"rejected \"") {
        pick(quoted_candidates(b, after + 10), false)?
    } else {
        return None;
    };
    let tail = scan_tail(b, host.end);
    Some(Fields::new(EventKind::SyncError, &host, &tail).detail(Some(reason)))
}

/// Lines that start with `H=`: RCPT/MAIL/DATA rejections, sender verify,
/// connect-ACL rejections and drops.
fn h_line(b: &[u8], pos: usize) -> Option<Fields<'_>> {
    let (host, tail, rest) = host_and_rest(b, pos)?;
    let f = |kind| Fields::new(kind, &host, &tail);
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

/// `F=<sender> H=... P=... rejected by local_scan(): ...` (after a message id).
fn f_line(b: &[u8]) -> Option<Fields<'_>> {
    let sp = memchr::memchr(b' ', b)?;
    if b[..sp].contains(&b'"') || !b[sp..].starts_with(b" H=") {
        return None;
    }
    h_line(b, sp + 1)
}

/// `no MAIL in SMTP connection from ...`, `no host name found for IP address
/// <ip>`, `no IP address found for host <name> (during SMTP connection from
/// [ip]...)`.
fn no_lines(b: &[u8]) -> Option<Fields<'_>> {
    if let Some(rest) = b.strip_prefix(b"no MAIL in SMTP connection from ") {
        let (host, tail, _) = host_and_rest(b, b.len() - rest.len())?;
        return Some(Fields::new(EventKind::NoMail, &host, &tail).detail(tail.commands));
    }
    if let Some(rest) = b.strip_prefix(b"no host name found for IP address ") {
        return Some(Fields::bare(EventKind::NoHostName, parse_ip(rest)?));
    }
    if let Some(rest) = b.strip_prefix(b"no IP address found for host ") {
        let sp = memchr::memchr(b' ', rest)?;
        let name = &rest[..sp];
        let during = rest[sp..].strip_prefix(b" (during SMTP connection from ")?;
        let (host, tail, _) = host_and_rest(b, b.len() - during.len())?;
        return Some(Fields::new(EventKind::NoHostName, &host, &tail).detail(Some(name)));
    }
    None
}

/// `unqualified sender|recipient|verify rejected: <addr> H=...`. The
/// address is the client's text, so the host is the last strict candidate
/// after a `> ` (Exim writes nothing but the host after it).
fn unqualified(b: &[u8]) -> Option<Fields<'_>> {
    let what = &b[12..];
    let kind = if what.starts_with(b"verify rejected: <") {
        EventKind::AclRejected
    } else if what.starts_with(b"sender rejected: <") || what.starts_with(b"recipient rejected: <") {
        EventKind::RcptRejected
    } else {
        return None;
    };
    let host = pick(candidates(b, 12, b"> H="), true)?;
    let tail = scan_tail(b, host.end);
    let colon = memchr::memchr(b':', b)?;
    Some(Fields::new(kind, &host, &tail).detail(Some(&b[..colon])))
}

/// `TLS error on connection from HOST (where): what`.
fn tls_error(b: &[u8]) -> Option<Fields<'_>> {
    let (host, tail, rest) = host_and_rest(b, 29)?;
    Some(Fields::new(EventKind::TlsError, &host, &tail).detail(Some(rest)))
}

/// `<= sender [R=..] [U=..] H=HOST [I=..] P=.. [X=..] [A=driver:user] S=..`.
fn accepted(b: &[u8]) -> Option<Fields<'_>> {
    let start = 3;
    let sp = start + memchr::memchr(b' ', &b[start..])?;
    let sender = &b[start..sp];
    if sender.contains(&b'"') {
        return None;
    }
    let mut pos = sp;
    loop {
        if b.get(pos) != Some(&b' ') {
            return None;
        }
        let tok = pos + 1;
        if b[tok..].starts_with(b"H=") {
            let (host, tail, _) = host_and_rest(b, tok)?;
            let mut f = Fields::new(EventKind::Accepted, &host, &tail).detail(Some(sender));
            f.user = tail.auth.and_then(|a| memchr::memchr(b':', a).map(|i| &a[i + 1..])).filter(|u| !u.is_empty());
            return Some(f);
        }
        let stop = memchr::memchr(b' ', &b[tok..]).map_or(b.len(), |i| tok + i);
        field_key(&b[tok..stop])?;
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

/// `rejected from [ip] (ident): <why>` and `rejected from <sender> H=...: <why>`.
fn rejected_from(b: &[u8]) -> Option<Fields<'_>> {
    let mut pos = 14;
    if b.get(pos) == Some(&b'<') {
        let sp = pos + memchr::memchr(b' ', &b[pos..])?;
        if b[pos..sp].contains(&b'"') || !b[sp..].starts_with(b" H=") {
            return None;
        }
        pos = sp + 1;
    }
    let host = parse_host(b, pos)?;
    let tail = scan_tail(b, host.end);
    Some(Fields::new(EventKind::RcptRejected, &host, &tail).detail(after_colon(&b[host.end..])))
}

/// `<driver> authenticator failed for [H=]HOST [I=..] [Ci=..]: 5xx ... (set_id=<user>)`.
///
/// Temporary (4xx) failures are skipped: they mean the authentication
/// backend is down, not that the client guessed wrong.
fn auth_failed(b: &[u8]) -> Option<Fields<'_>> {
    let sp = memchr::memchr(b' ', b.get(..b.len().min(64))?)?;
    let after = b[sp..].strip_prefix(b" authenticator failed for ")?;
    let driver = &b[..sp];
    let (host, tail, _) = host_and_rest(b, b.len() - after.len())?;
    // The `:` before the code may be glued to the last token (`I=[ip]:25:`).
    let msg = after_colon(&b[host.end..])?;
    if msg.first().is_none_or(|c| *c != b'5') {
        return None;
    }
    let mut f = Fields::new(EventKind::AuthFailed, &host, &tail).detail(Some(driver));
    if let Some(i) = memmem::find(msg, b"(set_id=") {
        let v = &msg[i + 8..];
        let end = if v.ends_with(b")") { Some(v.len() - 1) } else { memmem::rfind(v, b"): ") };
        f.user = end.map(|e| &v[..e]).filter(|u| !u.is_empty());
    }
    Some(f)
}
