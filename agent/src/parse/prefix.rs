//! The line prefix: timestamp, optional zone, optional `[pid]`, optional
//! message id, and syslog/journald wrappers.
//!
//! Accepted shapes (`body` is what the classifier sees):
//!
//! - `YYYY-MM-DD HH:MM:SS[.mmm][ +hhmm] [[pid] ][msgid ]body` (Exim's own);
//! - `YYYY-MM-DDTHH:MM:SS[.fff](Z|+hh:mm) host exim[pid]: ...` and
//!   `YYYY-MM-DD HH:MM:SS host exim[pid]: ...` (rsyslog, ISO dates);
//! - `Mon DD HH:MM:SS host exim[pid]: ...` (BSD syslog, no year: the year is
//!   inferred so that the time is not more than two days in the future);
//! - `host exim[pid]: YYYY-MM-DD ...` (a wrapper in front of Exim's stamp).
//!
//! When a wrapper encloses a full Exim timestamp, Exim's own stamp wins.
//! Impossible dates (month 13, 31 April, hour 24, ...) make the line invalid.

use super::civil::{days_from_civil, days_in_month};

/// When a line was written, as read from the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// Wall-clock seconds since 1970-01-01 as if the wall clock were UTC.
    pub civil_secs: i64,
    /// Milliseconds within the second.
    pub millis: u32,
    /// The UTC offset written on the line, in seconds east, if any.
    pub offset_secs: Option<i32>,
}

/// A parsed prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prefix {
    pub stamp: Stamp,
    /// Whether a message id preceded the body.
    pub msgid: bool,
    /// Index of the first byte of the body.
    pub body: usize,
}

fn digits(b: &[u8], pos: usize, n: usize) -> Option<u32> {
    let s = b.get(pos..pos + n)?;
    let mut v = 0u32;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

fn civil_secs(year: i64, month: u32, day: u32, h: u32, m: u32, s: u32) -> Option<i64> {
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) || h > 23 || m > 59 || s > 59 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + i64::from(h * 3600 + m * 60 + s))
}

/// Parses `HH:MM:SS` at `pos`.
fn hms(b: &[u8], pos: usize) -> Option<(u32, u32, u32)> {
    if b.get(pos + 2) != Some(&b':') || b.get(pos + 5) != Some(&b':') {
        return None;
    }
    Some((digits(b, pos, 2)?, digits(b, pos + 3, 2)?, digits(b, pos + 6, 2)?))
}

/// Parses an ISO/Exim timestamp at `pos`; returns it and the index after it
/// (before the separating space).
pub(crate) fn iso_stamp(b: &[u8], pos: usize) -> Option<(Stamp, usize)> {
    let year = digits(b, pos, 4)?;
    if b.get(pos + 4) != Some(&b'-') || b.get(pos + 7) != Some(&b'-') {
        return None;
    }
    let month = digits(b, pos + 5, 2)?;
    let day = digits(b, pos + 8, 2)?;
    let t_sep = *b.get(pos + 10)?;
    if t_sep != b' ' && t_sep != b'T' {
        return None;
    }
    let (h, m, s) = hms(b, pos + 11)?;
    let civil = civil_secs(i64::from(year), month, day, h, m, s)?;
    let mut i = pos + 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        let mut scale = 100;
        while i < b.len() && b[i].is_ascii_digit() && i - start < 9 {
            millis += u32::from(b[i] - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let mut offset_secs = None;
    if t_sep == b'T' {
        // RFC 3339: `Z`, `+hh:mm` or `+hhmm`, glued to the time.
        match b.get(i) {
            Some(b'Z' | b'z') => {
                offset_secs = Some(0);
                i += 1;
            }
            Some(&sign @ (b'+' | b'-')) => {
                let hh = digits(b, i + 1, 2)?;
                let (mm, len) =
                    if b.get(i + 3) == Some(&b':') { (digits(b, i + 4, 2)?, 6) } else { (digits(b, i + 3, 2)?, 5) };
                offset_secs = Some(offset(sign, hh, mm)?);
                i += len;
            }
            _ => {}
        }
    } else if b.get(i) == Some(&b' ')
        && matches!(b.get(i + 1), Some(b'+' | b'-'))
        && b.get(i + 6).is_none_or(|c| *c == b' ')
    {
        // Exim's `log_timezone`: ` +hhmm`.
        if let (Some(hh), Some(mm)) = (digits(b, i + 2, 2), digits(b, i + 4, 2)) {
            offset_secs = Some(offset(b[i + 1], hh, mm)?);
            i += 6;
        }
    }
    Some((Stamp { civil_secs: civil, millis, offset_secs }, i))
}

fn offset(sign: u8, hh: u32, mm: u32) -> Option<i32> {
    if hh > 15 || mm > 59 {
        return None;
    }
    let secs = (hh * 3600 + mm * 60) as i32;
    Some(if sign == b'-' { -secs } else { secs })
}

const MONTHS: [&[u8; 3]; 12] =
    [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];

/// Parses a BSD syslog stamp `Mon DD HH:MM:SS` (day may be space-padded).
pub(crate) fn bsd_stamp(b: &[u8], year_of: impl Fn(u32, u32) -> i64) -> Option<(Stamp, usize)> {
    let mon = b.get(..3)?;
    let month = MONTHS.iter().position(|m| &m[..] == mon)? as u32 + 1;
    if b.get(3) != Some(&b' ') {
        return None;
    }
    let day = match (b.get(4), b.get(5)) {
        (Some(b' '), Some(d @ b'1'..=b'9')) => u32::from(d - b'0'),
        (Some(d1), Some(d2)) if d1.is_ascii_digit() && d2.is_ascii_digit() => {
            u32::from(d1 - b'0') * 10 + u32::from(d2 - b'0')
        }
        _ => return None,
    };
    if b.get(6) != Some(&b' ') {
        return None;
    }
    let (h, m, s) = hms(b, 7)?;
    let year = year_of(month, day);
    let civil = civil_secs(year, month, day, h, m, s)?;
    Some((Stamp { civil_secs: civil, millis: 0, offset_secs: None }, 15))
}

/// If `b[pos..]` is `host tag: ` where the tag is `exim…[pid]:` or `exim…:`,
/// returns the index after `: `.
fn syslog_tag(b: &[u8], pos: usize) -> Option<usize> {
    let rest = b.get(pos..)?;
    let sp = memchr::memchr(b' ', rest.get(..rest.len().min(256))?)?;
    if sp == 0 {
        return None;
    }
    let tag_start = sp + 1;
    if !rest[tag_start..].starts_with(b"exim") {
        return None;
    }
    let colon = tag_start + memchr::memchr(b':', rest.get(tag_start..(tag_start + 40).min(rest.len()))?)?;
    let tag = &rest[tag_start + 4..colon];
    let name_len = tag.iter().take_while(|c| c.is_ascii_alphanumeric() || **c == b'_' || **c == b'-').count();
    let pid = &tag[name_len..];
    let pid_ok = pid.is_empty()
        || (pid.len() >= 3
            && pid[0] == b'['
            && pid[pid.len() - 1] == b']'
            && pid[1..pid.len() - 1].iter().all(u8::is_ascii_digit));
    if !pid_ok || rest.get(colon + 1) != Some(&b' ') {
        return None;
    }
    Some(pos + colon + 2)
}

/// Skips `[pid] ` and a message id at `pos`; returns (msgid present, body index).
fn pid_and_msgid(b: &[u8], mut pos: usize) -> (bool, usize) {
    if b.get(pos) == Some(&b'[') {
        let digits = b[pos + 1..].iter().take(10).take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 && b.get(pos + 1 + digits) == Some(&b']') && b.get(pos + 2 + digits) == Some(&b' ') {
            pos += digits + 3;
        }
    }
    let msgid = is_msgid(b, pos);
    if let Some(len) = msgid {
        pos += len + 1;
    }
    (msgid.is_some(), pos)
}

/// Recognises a message id at `pos` followed by a space: `XXXXXX-XXXXXX-XX`
/// (before 4.97) or `XXXXXX-XXXXXXXXXXX-XXXX` (4.97+). Returns its length.
pub(crate) fn is_msgid(b: &[u8], pos: usize) -> Option<usize> {
    if b.get(pos + 6) != Some(&b'-') {
        return None;
    }
    let shape = |len: usize, d1: usize, d2: usize| {
        let s = b.get(pos..pos + len)?;
        if b.get(pos + len) != Some(&b' ') {
            return None;
        }
        for (i, &c) in s.iter().enumerate() {
            let ok = if i == d1 || i == d2 { c == b'-' } else { c.is_ascii_alphanumeric() };
            if !ok {
                return None;
            }
        }
        Some(len)
    };
    shape(16, 6, 13).or_else(|| shape(23, 6, 18))
}

/// Parses the prefix of `b`. `year_of(month, day)` supplies the year for
/// BSD syslog stamps, which carry none.
pub(crate) fn parse_prefix(b: &[u8], year_of: impl Fn(u32, u32) -> i64) -> Option<Prefix> {
    let first = *b.first()?;
    let (stamp, after) = if first.is_ascii_digit() {
        let (stamp, i) = iso_stamp(b, 0)?;
        if b.get(i) != Some(&b' ') {
            return None;
        }
        let mut pos = i + 1;
        if let Some(inner) = syslog_tag(b, pos) {
            pos = inner;
            if let Some((exim_stamp, j)) = iso_stamp(b, pos).filter(|(_, j)| b.get(*j) == Some(&b' ')) {
                return finish(b, exim_stamp, j + 1);
            }
        }
        (stamp, pos)
    } else if first.is_ascii_uppercase() && b.get(3) == Some(&b' ') && MONTHS.iter().any(|m| b.starts_with(&m[..])) {
        let (stamp, i) = bsd_stamp(b, year_of)?;
        if b.get(i) != Some(&b' ') {
            return None;
        }
        let pos = syslog_tag(b, i + 1)?;
        if let Some((exim_stamp, j)) = iso_stamp(b, pos).filter(|(_, j)| b.get(*j) == Some(&b' ')) {
            return finish(b, exim_stamp, j + 1);
        }
        (stamp, pos)
    } else {
        // `host exim[pid]: YYYY-MM-DD ...`: the wrapper carries no time.
        let pos = syslog_tag(b, 0)?;
        let (stamp, j) = iso_stamp(b, pos)?;
        if b.get(j) != Some(&b' ') {
            return None;
        }
        (stamp, j + 1)
    };
    finish(b, stamp, after)
}

fn finish(b: &[u8], stamp: Stamp, pos: usize) -> Option<Prefix> {
    let (msgid, body) = pid_and_msgid(b, pos);
    if body >= b.len() {
        return None;
    }
    Some(Prefix { stamp, msgid, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<Prefix> {
        parse_prefix(s.as_bytes(), |_, _| 2022)
    }

    fn body(s: &str) -> &str {
        &s[p(s).unwrap().body..]
    }

    #[test]
    fn exim_prefixes() {
        let s = "2026-11-27 01:57:34.409 [7954] SMTP connection";
        let pr = p(s).unwrap();
        assert_eq!(pr.stamp.millis, 409);
        assert_eq!(pr.stamp.offset_secs, None);
        assert_eq!(body(s), "SMTP connection");
        let s = "2003-04-25 11:17:07 +0100 Start queue run: pid=12762";
        assert_eq!(p(s).unwrap().stamp.offset_secs, Some(3600));
        assert_eq!(body(s), "Start queue run: pid=12762");
        let s = "2016-03-21 04:07:49 [25874] 1ahr79-0006jK-G9 SMTP connection";
        assert!(p(s).unwrap().msgid);
        assert_eq!(body(s), "SMTP connection");
        let s = "2026-09-13 08:03:35 1x5dJQ-00000002ksM-1pMm <= a@b";
        assert!(p(s).unwrap().msgid);
        assert_eq!(body(s), "<= a@b");
    }

    #[test]
    fn wrappers() {
        assert_eq!(body("Jun 29 14:33:43 server exim[1234]: H=x [1.2.3.4]"), "H=x [1.2.3.4]");
        assert_eq!(body("2019-10-22 03:39:17 mx1.fqdn.local exim[29786]: dovecot_login x"), "dovecot_login x");
        assert_eq!(body("2016-04-01 11:08:00 info exim[8003]: [8003] SMTP x"), "SMTP x");
        let s = "mail.example.com exim[3751842]: 2021-07-17 23:20:49 plain_server x";
        assert_eq!(body(s), "plain_server x");
        let s = "2026-11-27T01:57:33.123456+01:00 mx exim4[9]: SMTP x";
        assert_eq!(p(s).unwrap().stamp.offset_secs, Some(3600));
        assert_eq!(p(s).unwrap().stamp.millis, 123);
        assert_eq!(body(s), "SMTP x");
    }

    #[test]
    fn impossible_dates() {
        for s in [
            "2026-13-01 00:00:00 x",
            "2026-04-31 00:00:00 x",
            "2026-02-29 00:00:00 x",
            "2026-01-01 24:00:00 x",
            "2026-01-01 00:60:00 x",
            "2026-01-01 00:00:60 x",
            "2026-01-01 00:00:00",
            "2026-01-01 00:00:00 ",
            "Foo 29 14:33:43 server exim[1]: x",
            "Jun 31 14:33:43 server exim[1]: x",
        ] {
            assert!(p(s).is_none(), "{s}");
        }
        assert!(p("2024-02-29 00:00:00 x").is_some());
    }
}
