//! Exim and Dovecot log lines to typed events.
//!
//! [`parse_line`] turns one line of `exim_mainlog` into an [`Event`] or
//! `None` ([`parse_line_as`] one line of either [`LogKind`]; Dovecot's
//! formats are in `dovecot`); [`Parser`] wraps it with what needs state:
//! continuation lines, the configured time zone for zone-less timestamps,
//! and counters. The hot
//! path has no regex and does not allocate: an `Event` borrows its text from
//! the line, and only [`Event::to_proto`] copies, when an event is kept.
//!
//! Invariants:
//! - The address of an event is the remote client's bracketed address, read
//!   from its fixed position in Exim's format (after `H=`, `from` or `for`);
//!   never the `I=` local interface, never a bracket inside a HELO name or a
//!   quoted command. A line whose client text holds a second host-like
//!   address is skipped and counted ([`ParseStats::ambiguous`]) rather than
//!   attributed to a guess (see `body` for the rules).
//! - Anything that is not a well-formed line of a known kind (garbage,
//!   invalid UTF-8 where an address should be, impossible dates or
//!   addresses, lines over [`MAX_LINE_BYTES`]) yields `None`; nothing here
//!   panics on any input.
//! - Optional text fields that are not valid UTF-8 are `None`; the event is
//!   still produced.

mod body;
mod civil;
pub mod dovecot;
pub mod genlog;
mod host;
mod prefix;
pub mod render;
pub mod report;
mod tz;

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use fleetban_proto::v1;

pub use civil::format_rfc3339_ms;
pub use tz::{Timezone, TimezoneError};

/// Lines longer than this (in bytes, without the newline) are skipped.
/// Exim's own log buffer is far smaller, so such a line is never genuine.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// What a log line reports: the wire enum, whose names and evidence value
/// are defined once in `fleetban_proto::kind`.
pub use fleetban_proto::v1::EventKind;

/// Which service a line came from: the wire enum, named in
/// `fleetban_proto::kind`.
pub use fleetban_proto::v1::Service;

/// One parsed line, borrowing its text from the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// When the line was written, unix milliseconds UTC.
    pub time_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// The remote client's address (`::ffff:` mapped addresses as IPv4).
    pub ip: IpAddr,
    /// The remote port, when logged (`+incoming_port`).
    pub port: Option<u16>,
    /// The local interface address (`I=`, `+incoming_interface`).
    pub local_ip: Option<IpAddr>,
    /// The local port (`I=[..]:port`).
    pub local_port: Option<u16>,
    /// `TCP/IP connection count = N` on connect lines.
    pub count: Option<u32>,
    /// `set_id` on authentication failures; the authenticated id on arrivals.
    pub user: Option<&'a str>,
    /// The HELO/EHLO name the client gave.
    pub helo: Option<&'a str>,
    /// Kind-specific text: the authenticator driver, the rejection reason,
    /// the ACL message, the `C=` command list, the envelope sender of an
    /// arrival, ...
    pub detail: Option<&'a str>,
    /// The session duration (`D=`), in milliseconds.
    pub duration_ms: Option<u64>,
    /// The verified reverse-DNS name (`H=name`, outside the parentheses).
    pub host_name: Option<&'a str>,
    /// The service the line is from (SMTP for Exim lines).
    pub service: Service,
    /// Authentication attempts the line reports (Dovecot's `auth failed, N
    /// attempts`); 0 = one, as on every Exim line.
    pub attempts: u32,
    /// The whole line, without its line terminator.
    pub raw: &'a [u8],
}

impl Event<'_> {
    /// The wire form; `keep_raw` keeps the original line as evidence
    /// (invalid UTF-8 replaced by U+FFFD).
    pub fn to_proto(&self, keep_raw: bool) -> v1::Event {
        v1::Event {
            time_ms: self.time_ms,
            kind: self.kind as i32,
            remote: Some(self.ip.into()),
            remote_port: self.port.map_or(0, u32::from),
            local_port: self.local_port.map_or(0, u32::from),
            connection_count: self.count.unwrap_or(0),
            auth_user: self.user.unwrap_or_default().to_owned(),
            helo: self.helo.unwrap_or_default().to_owned(),
            raw: if keep_raw { String::from_utf8_lossy(self.raw).into_owned() } else { String::new() },
            local: self.local_ip.map(Into::into),
            detail: self.detail.unwrap_or_default().to_owned(),
            duration_ms: self.duration_ms.unwrap_or(0),
            host_name: self.host_name.unwrap_or_default().to_owned(),
            service: self.service as i32,
            attempts: self.attempts,
        }
    }
}

/// Which program wrote a log: the parser to use for a source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogKind {
    /// Exim's `exim_mainlog` (or syslog carrying it): SMTP.
    #[default]
    Exim,
    /// Dovecot's `log_path` or syslog (`/var/log/maillog`): IMAP, POP3,
    /// ManageSieve and submission logins.
    Dovecot,
}

impl LogKind {
    /// Every kind.
    pub const ALL: [LogKind; 2] = [LogKind::Exim, LogKind::Dovecot];

    /// The name used in config and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogKind::Exim => "exim",
            LogKind::Dovecot => "dovecot",
        }
    }
}

impl std::fmt::Display for LogKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A log kind name that is neither `exim` nor `dovecot`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log kind {0:?} (expected \"exim\" or \"dovecot\")")]
pub struct UnknownLogKind(pub String);

impl std::str::FromStr for LogKind {
    type Err = UnknownLogKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LogKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownLogKind(s.to_owned()))
    }
}

/// Strips one trailing `\n` and then one `\r`.
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The year for a BSD syslog stamp (which has none): this year, or last year
/// when that would put the stamp more than two days in the future (29
/// February: the latest leap year).
fn syslog_year(month: u32, day: u32) -> i64 {
    let now_days = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (mut year, _, _) = civil::civil_from_days(now_days);
    let clamped = day.min(civil::days_in_month(year, month));
    if civil::days_from_civil(year, month, clamped) > now_days + 2 {
        year -= 1;
    }
    // 29 February happens only in leap years: it is from the latest one.
    while month == 2 && day == 29 && !civil::is_leap(year) {
        year -= 1;
    }
    year
}

/// The parts of a line: its stamp, fields, service and attempts.
type Parts<'a> = (prefix::Stamp, body::Fields<'a>, Service, u32);

/// Parses the parts of a line of `kind`.
fn parse_parts(kind: LogKind, line: &[u8]) -> Result<Parts<'_>, body::Skip> {
    if line.len() > MAX_LINE_BYTES {
        return Err(body::Skip::Unknown);
    }
    match kind {
        LogKind::Exim => {
            let pre = prefix::parse_prefix(line, syslog_year).ok_or(body::Skip::Unknown)?;
            let fields = body::classify(&line[pre.body..], pre.msgid)?;
            Ok((pre.stamp, fields, Service::Smtp, 0))
        }
        LogKind::Dovecot => {
            let l = dovecot::parse(line, syslog_year)?;
            Ok((l.stamp, l.fields, l.service, l.attempts))
        }
    }
}

fn text(b: Option<&[u8]>) -> Option<&str> {
    b.filter(|b| !b.is_empty()).and_then(|b| std::str::from_utf8(b).ok())
}

fn build<'a>(time_ms: i64, (_, f, service, attempts): Parts<'a>, raw: &'a [u8]) -> Event<'a> {
    Event {
        time_ms,
        kind: f.kind,
        ip: f.ip,
        port: f.port,
        local_ip: f.local_ip,
        local_port: f.local_port,
        count: f.count,
        user: text(f.user),
        helo: text(f.helo),
        detail: text(f.detail),
        duration_ms: f.duration_ms,
        host_name: text(f.host_name),
        service,
        attempts,
        raw,
    }
}

/// Parses one line (with or without its line terminator). Zone-less
/// timestamps are taken as UTC; use [`Parser`] to apply a zone and to skip
/// continuation lines.
pub fn parse_line(line: &[u8]) -> Option<Event<'_>> {
    parse_line_as(LogKind::Exim, line)
}

/// Parses one line of a `kind` log, like [`parse_line`].
pub fn parse_line_as(kind: LogKind, line: &[u8]) -> Option<Event<'_>> {
    let line = trim_eol(line);
    let parts = parse_parts(kind, line).ok()?;
    let stamp = parts.0;
    let time_ms = (stamp.civil_secs - i64::from(stamp.offset_secs.unwrap_or(0))) * 1000 + i64::from(stamp.millis);
    Some(build(time_ms, parts, line))
}

/// Counters of a [`Parser`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseStats {
    /// Lines fed.
    pub lines: u64,
    /// Lines that produced an event.
    pub events: u64,
    /// Lines that produced none (`lines - events`), continuation lines included.
    pub ignored: u64,
    /// Continuation lines (starting with whitespace), part of `ignored`.
    pub continuations: u64,
    /// Lines longer than [`MAX_LINE_BYTES`], part of `ignored`.
    pub oversized: u64,
    /// Lines of a known kind skipped because the client's text (a HELO, a
    /// sender, a quoted command, ...) holds a second host-like address, so
    /// that the client cannot be told for certain; part of `ignored`.
    pub ambiguous: u64,
}

/// The stateful line parser: applies the configured time zone to zone-less
/// timestamps, skips continuation lines, and counts.
#[derive(Debug, Clone)]
pub struct Parser {
    kind: LogKind,
    tz: Timezone,
    /// Quarter hour of wall-clock time whose offset is cached.
    cached_block: i64,
    cached_offset: i32,
    stats: ParseStats,
}

/// Offsets are cached per this many seconds of wall-clock time. Every zone
/// in use today changes offset on a quarter-hour boundary.
const OFFSET_BLOCK_SECS: i64 = 900;

impl Parser {
    /// An Exim parser that reads zone-less timestamps in `tz`.
    pub fn new(tz: Timezone) -> Parser {
        Parser::for_kind(LogKind::Exim, tz)
    }

    /// A parser of `kind` logs that reads zone-less timestamps in `tz`.
    pub fn for_kind(kind: LogKind, tz: Timezone) -> Parser {
        Parser { kind, tz, cached_block: i64::MIN, cached_offset: 0, stats: ParseStats::default() }
    }

    /// The kind of log this parser reads.
    pub fn kind(&self) -> LogKind {
        self.kind
    }

    /// Parses the next line of a log. Continuation lines (starting with a
    /// space or tab) belong to the previous entry and yield `None`.
    pub fn feed<'a>(&mut self, line: &'a [u8]) -> Option<Event<'a>> {
        self.stats.lines += 1;
        let line = trim_eol(line);
        let parsed = match line.first() {
            Some(b' ' | b'\t') => {
                self.stats.continuations += 1;
                Err(body::Skip::Unknown)
            }
            _ if line.len() > MAX_LINE_BYTES => {
                self.stats.oversized += 1;
                Err(body::Skip::Unknown)
            }
            _ => parse_parts(self.kind, line),
        };
        let parts = match parsed {
            Ok(parts) => parts,
            Err(skip) => {
                self.stats.ignored += 1;
                if skip == body::Skip::Ambiguous {
                    self.stats.ambiguous += 1;
                }
                return None;
            }
        };
        let stamp = parts.0;
        let offset = match stamp.offset_secs {
            Some(o) => o,
            None => self.offset_at(stamp.civil_secs),
        };
        self.stats.events += 1;
        let time_ms = (stamp.civil_secs - i64::from(offset)) * 1000 + i64::from(stamp.millis);
        Some(build(time_ms, parts, line))
    }

    /// Counts a line that was skipped before parsing (e.g. oversized lines
    /// that the reader discarded).
    pub fn skip_oversized(&mut self) {
        self.stats.lines += 1;
        self.stats.ignored += 1;
        self.stats.oversized += 1;
    }

    /// The counters so far.
    pub fn stats(&self) -> ParseStats {
        self.stats
    }

    fn offset_at(&mut self, civil_secs: i64) -> i32 {
        if matches!(self.tz, Timezone::Utc) {
            return 0;
        }
        let block = civil_secs.div_euclid(OFFSET_BLOCK_SECS);
        if block != self.cached_block {
            self.cached_offset = self.tz.offset_at_civil(block * OFFSET_BLOCK_SECS);
            self.cached_block = block;
        }
        self.cached_offset
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
