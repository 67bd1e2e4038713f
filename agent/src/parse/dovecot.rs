//! Dovecot log lines (IMAP, POP3, ManageSieve and submission logins) to
//! typed events.
//!
//! Accepted shapes (the body is what [`classify`] sees):
//!
//! - Dovecot's own `log_path`/`info_log_path`: `Mon DD HH:MM:SS
//!   imap-login: Info: body` (the default `log_timestamp`) or `YYYY-MM-DD
//!   HH:MM:SS[.fff] imap-login: Info: body`;
//! - BSD syslog (RFC 3164), optionally with `<PRI>`: `Mon DD HH:MM:SS host
//!   dovecot[pid]: imap-login: body`; rsyslog's ISO stamps
//!   (`2026-11-28T12:00:00.123+01:00 host dovecot[pid]: ...`) likewise;
//! - RFC 5424: `<PRI>1 2026-11-28T12:00:00.003Z host dovecot pid - -
//!   imap-login: body` (structured data `-` or `[...]`).
//!
//! Only the pre-login processes (`imap-login`, `pop3-login`,
//! `managesieve-login`, `submission-login`) are read: they write one line
//! per session with the client's address, the outcome and the number of
//! authentication attempts. The `auth` process's per-attempt lines would
//! count the same guesses twice and are ignored.
//!
//! Body kinds: `Login: ...` (a successful login: good standing),
//! `... (auth failed, N attempts in S secs)` (an authentication failure
//! counting N), `Too many invalid commands` / `Too many bad commands`
//! (protocol abuse), TLS handshake failures (context) and `(no auth attempts
//! ...)` (context). Everything else is `None`.
//!
//! # Attribution
//!
//! Dovecot writes `reason: user=<name>, method=M, rip=R, lip=L, mpid=P,
//! secured, session=<S>` (`login_log_format_elements`). The reason is the
//! server's text; the user name is the client's and may hold anything,
//! including `>, rip=192.0.2.1, lip=...`. Dovecot writes `rip` after `user`,
//! so the client is the *last* `rip=` token (at a `, ` boundary): a forged
//! one inside the name always comes before it. A format that puts `rip`
//! before `user` while the line holds several `rip=` tokens cannot be told
//! apart from an injection: such a line is skipped as ambiguous. Bracketed
//! addresses are never read. The user name is the text between `user=<` and
//! the last `>` before the client's token.

use std::net::IpAddr;

use memchr::memmem;

use super::body::{Fields, Skip};
use super::host::parse_ip;
use super::prefix::{Stamp, bsd_stamp, iso_stamp};
use super::{EventKind, Service};

/// User names longer than this (bytes) are cut at a character boundary, so
/// an event is never refused by the server for a long name.
pub const MAX_USER_BYTES: usize = 256;

/// One classified Dovecot line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line<'a> {
    pub stamp: Stamp,
    pub fields: Fields<'a>,
    pub service: Service,
    pub attempts: u32,
}

/// Parses a whole line (without its terminator).
pub(crate) fn parse(b: &[u8], year_of: impl Fn(u32, u32) -> i64) -> Result<Line<'_>, Skip> {
    let (stamp, pos) = prefix(b, year_of).ok_or(Skip::Unknown)?;
    let (service, pos) = process(b, pos).ok_or(Skip::Unknown)?;
    let msg = skip_level(&b[pos..]);
    let (fields, attempts) = classify(msg)?;
    Ok(Line { stamp, fields, service, attempts })
}

/// Skips an optional `<PRI>` (1-3 digits).
fn skip_pri(b: &[u8]) -> usize {
    if b.first() != Some(&b'<') {
        return 0;
    }
    let n = b[1..].iter().take(4).take_while(|c| c.is_ascii_digit()).count();
    if (1..=3).contains(&n) && b.get(1 + n) == Some(&b'>') { n + 2 } else { 0 }
}

/// The stamp and the index where the process name (`imap-login:`) begins.
fn prefix(b: &[u8], year_of: impl Fn(u32, u32) -> i64) -> Option<(Stamp, usize)> {
    let start = skip_pri(b);
    // RFC 5424: `1 TIMESTAMP HOST APP PROCID MSGID SD MSG`.
    if start > 0 && b.get(start) == Some(&b'1') && b.get(start + 1) == Some(&b' ') {
        let (stamp, i) = iso_stamp(b, start + 2)?;
        if b.get(i) != Some(&b' ') {
            return None;
        }
        let host_end = token_end(b, i + 1)?;
        let app_start = host_end + 1;
        let app_end = token_end(b, app_start)?;
        if !b[app_start..app_end].starts_with(b"dovecot") {
            return None;
        }
        let procid_end = token_end(b, app_end + 1)?;
        let msgid_end = token_end(b, procid_end + 1)?;
        let sd_end = structured_data_end(b, msgid_end + 1)?;
        if b.get(sd_end) != Some(&b' ') {
            return None;
        }
        let mut pos = sd_end + 1;
        if b[pos..].starts_with("\u{feff}".as_bytes()) {
            pos += 3;
        }
        return Some((stamp, pos));
    }
    let rest = &b[start..];
    let (stamp, i) = match rest.first()? {
        c if c.is_ascii_digit() => iso_stamp(rest, 0)?,
        c if c.is_ascii_uppercase() => bsd_stamp(rest, year_of)?,
        _ => return None,
    };
    if rest.get(i) != Some(&b' ') {
        return None;
    }
    let pos = start + i + 1;
    // `log_path`: the process name follows the stamp directly.
    if login_service(b, pos).is_some() {
        return Some((stamp, pos));
    }
    // Syslog: `host dovecot[pid]: `.
    Some((stamp, syslog_tag(b, pos)?))
}

/// The index of the space ending the non-empty token at `pos`.
fn token_end(b: &[u8], pos: usize) -> Option<usize> {
    let rest = b.get(pos..)?;
    let n = memchr::memchr(b' ', rest.get(..rest.len().min(300))?)?;
    (n > 0).then_some(pos + n)
}

/// The index after RFC 5424 structured data at `pos`: `-` or one or more
/// `[...]` elements (`\]` escapes a bracket inside a value).
fn structured_data_end(b: &[u8], pos: usize) -> Option<usize> {
    match b.get(pos)? {
        b'-' => Some(pos + 1),
        b'[' => {
            let mut i = pos;
            while b.get(i) == Some(&b'[') {
                i += 1;
                loop {
                    match *b.get(i)? {
                        b'\\' => i += 2,
                        b']' => {
                            i += 1;
                            break;
                        }
                        _ => i += 1,
                    }
                }
            }
            Some(i)
        }
        _ => None,
    }
}

/// `host dovecot[pid]: ` or `host dovecot: ` at `pos`; the index after it.
fn syslog_tag(b: &[u8], pos: usize) -> Option<usize> {
    let host_end = token_end(b, pos)?;
    let tag = host_end + 1;
    let rest = b.get(tag..)?;
    if !rest.starts_with(b"dovecot") {
        return None;
    }
    let mut i = 7;
    if rest.get(i) == Some(&b'[') {
        let n = rest[i + 1..].iter().take(11).take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || rest.get(i + 1 + n) != Some(&b']') {
            return None;
        }
        i += n + 2;
    }
    if rest.get(i) != Some(&b':') || rest.get(i + 1) != Some(&b' ') {
        return None;
    }
    Some(tag + i + 2)
}

const LOGIN_PROCESSES: [(&[u8], Service); 4] = [
    (b"imap-login: ", Service::Imap),
    (b"pop3-login: ", Service::Pop3),
    (b"managesieve-login: ", Service::Managesieve),
    (b"submission-login: ", Service::Submission),
];

/// The service of a pre-login process name at `pos`, and its length.
fn login_service(b: &[u8], pos: usize) -> Option<(Service, usize)> {
    let rest = b.get(pos..)?;
    LOGIN_PROCESSES.iter().find(|(name, _)| rest.starts_with(name)).map(|(name, s)| (*s, name.len()))
}

/// The service and the index after the process name.
fn process(b: &[u8], pos: usize) -> Option<(Service, usize)> {
    login_service(b, pos).map(|(s, len)| (s, pos + len))
}

/// Skips Dovecot's level (`Info: `, `Warning: `, ...), written in its own
/// log files and, for some levels, through syslog.
fn skip_level(msg: &[u8]) -> &[u8] {
    for level in [&b"Info: "[..], b"Warning: ", b"Error: ", b"Fatal: ", b"Debug: "] {
        if let Some(rest) = msg.strip_prefix(level) {
            return rest;
        }
    }
    msg
}

/// Where the `key=value` list begins: after the reason's `: `.
fn kv_start(msg: &[u8]) -> Option<usize> {
    for key in [&b": user=<"[..], b": method=", b": rip="] {
        if let Some(i) = memmem::find(msg, key) {
            return Some(i + 2);
        }
    }
    None
}

/// The start of every `key=` token in `kv` (at the start or after `, `).
fn token_positions<'k>(kv: &'k [u8], key: &'k [u8]) -> impl Iterator<Item = usize> + 'k {
    memmem::find_iter(kv, key).filter(move |&i| i == 0 || kv[..i].ends_with(b", "))
}

/// The value of a `key=value` token starting at `i` (up to `,` or the end).
fn value_at(kv: &[u8], i: usize, key_len: usize) -> &[u8] {
    let v = &kv[i + key_len..];
    &v[..memchr::memchr(b',', v).unwrap_or(v.len())]
}

/// Parses `N` in `auth failed, N attempts`; one when not written.
fn attempts(reason: &[u8], at: usize) -> u32 {
    let rest = &reason[at + b"auth failed".len()..];
    let Some(rest) = rest.strip_prefix(b", ") else { return 1 };
    let n = rest.iter().take(10).take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || !rest[n..].starts_with(b" attempt") {
        return 1;
    }
    rest[..n].iter().fold(0u32, |v, d| v.saturating_mul(10).saturating_add(u32::from(d - b'0'))).max(1)
}

fn is_tls_failure(text: &[u8]) -> bool {
    [&b"SSL_accept() failed"[..], b"TLS handshaking failed", b"TLS handshaking: ", b"TLS handshake failed"]
        .iter()
        .any(|p| memmem::find(text, p).is_some())
}

/// Cuts `user` to [`MAX_USER_BYTES`] at a character boundary.
fn cap_user(user: &[u8]) -> &[u8] {
    if user.len() <= MAX_USER_BYTES {
        return user;
    }
    let mut end = MAX_USER_BYTES;
    // Back off continuation bytes (10xxxxxx) to the start of a character.
    while end > 0 && user[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    &user[..end]
}

/// Classifies the message after the process name and level.
fn classify(msg: &[u8]) -> Result<(Fields<'_>, u32), Skip> {
    let (kind, reason, kv, n) = if let Some(kv) = msg.strip_prefix(b"Login: ") {
        (EventKind::Login, &b""[..], kv, 0)
    } else {
        let start = kv_start(msg).ok_or(Skip::Unknown)?;
        let (reason, kv) = (&msg[..start - 2], &msg[start..]);
        if let Some(at) = memmem::find(reason, b"auth failed") {
            (EventKind::AuthFailed, reason, kv, attempts(reason, at))
        } else if memmem::find(reason, b"Too many invalid").is_some()
            || memmem::find(reason, b"Too many bad commands").is_some()
        {
            (EventKind::TooManyUnrecognized, reason, kv, 0)
        } else if is_tls_failure(reason) || is_tls_failure(kv) {
            (EventKind::TlsError, reason, kv, 0)
        } else if memmem::find(reason, b"no auth attempts").is_some() {
            (EventKind::NoAuthAttempts, reason, kv, 0)
        } else {
            return Err(Skip::Unknown);
        }
    };
    let rips: (Option<usize>, Option<usize>, usize) =
        token_positions(kv, b"rip=").fold((None, None, 0), |(first, _, n), i| (first.or(Some(i)), Some(i), n + 1));
    let (Some(first_rip), Some(rip), count) = rips else { return Err(Skip::Unknown) };
    let user_at = token_positions(kv, b"user=<").next();
    if count > 1 && user_at.is_none_or(|u| first_rip < u) {
        // `rip` before `user` (or no user field) with several `rip=`
        // tokens: the client's text may have written either.
        return Err(Skip::Ambiguous);
    }
    let ip: IpAddr = parse_ip(value_at(kv, rip, 4)).ok_or(Skip::Unknown)?;
    let local_ip = token_positions(&kv[rip..], b"lip=").next().and_then(|i| parse_ip(value_at(&kv[rip..], i, 4)));
    let user = user_at.and_then(|u| {
        let value = u + b"user=<".len();
        let end = memchr::memrchr(b'>', &kv[..rip])?;
        (end >= value).then(|| cap_user(&kv[value..end]))
    });
    let detail = (!reason.is_empty()).then_some(reason);
    let fields = Fields {
        kind,
        ip,
        port: None,
        local_ip,
        local_port: None,
        count: None,
        user: user.filter(|u| !u.is_empty()),
        helo: None,
        detail,
        duration_ms: None,
        host_name: None,
    };
    Ok((fields, n))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
