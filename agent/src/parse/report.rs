//! `fleetban-agent parse`: reads Exim logs (plain or gzip, files or stdin)
//! and prints the events as JSON lines or as a per-kind summary.
//!
//! Lines are parsed in place in a 1 MiB read buffer; a line longer than
//! [`MAX_LINE_BYTES`] is discarded as it streams past (never buffered whole)
//! and counted as ignored.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::Serialize;

use super::{Event, EventKind, LogKind, MAX_LINE_BYTES, ParseStats, Parser, Service, Timezone, format_rfc3339_ms};

/// Reading input or writing output failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// An input file could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path as given.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// An input could not be read (or decompressed).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path as given (`-` for stdin).
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The output could not be written.
    #[error("cannot write output: {0}")]
    Write(#[source] io::Error),
}

/// Options of `fleetban-agent parse`.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// One JSON object per event instead of the summary.
    pub json: bool,
    /// Zone for timestamps that carry none.
    pub tz: Timezone,
    /// The format of the files.
    pub kind: LogKind,
}

/// The JSON form of an event (one object per line).
#[derive(Debug, Serialize)]
struct JsonEvent<'a> {
    ts: String,
    time_ms: i64,
    kind: &'static str,
    ip: IpAddr,
    port: Option<u16>,
    local_ip: Option<IpAddr>,
    local_port: Option<u16>,
    count: Option<u32>,
    user: Option<&'a str>,
    helo: Option<&'a str>,
    detail: Option<&'a str>,
    duration_ms: Option<u64>,
    host_name: Option<&'a str>,
    /// The service, for Dovecot's lines only (Exim's are SMTP).
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<&'static str>,
    /// Authentication attempts, when the line reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    /// The line itself, for abuse kinds only (the evidence the agent keeps).
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> From<&Event<'a>> for JsonEvent<'a> {
    fn from(e: &Event<'a>) -> Self {
        JsonEvent {
            ts: format_rfc3339_ms(e.time_ms),
            time_ms: e.time_ms,
            kind: e.kind.as_str(),
            ip: e.ip,
            port: e.port,
            local_ip: e.local_ip,
            local_port: e.local_port,
            count: e.count,
            user: e.user,
            helo: e.helo,
            detail: e.detail,
            duration_ms: e.duration_ms,
            host_name: e.host_name,
            service: (e.service != Service::Smtp).then(|| e.service.as_str()),
            attempts: (e.attempts > 0).then_some(e.attempts),
            raw: e.kind.is_abuse().then(|| String::from_utf8_lossy(e.raw)),
        }
    }
}

/// Calls `f` with every line of `r` (without the newline), or `None` for a
/// line longer than [`MAX_LINE_BYTES`], which is skipped without buffering.
pub fn for_each_line(mut r: impl Read, mut f: impl FnMut(Option<&[u8]>) -> io::Result<()>) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let (mut start, mut end) = (0usize, 0usize);
    let mut discarding = false;
    loop {
        let n = match r.read(&mut buf[end..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if discarding {
                f(None)?;
            } else if end > start {
                f(Some(&buf[start..end]))?;
            }
            return Ok(());
        }
        end += n;
        let mut pos = start;
        while let Some(i) = memchr::memchr(b'\n', &buf[pos..end]) {
            let line = &buf[pos..pos + i];
            if discarding || line.len() > MAX_LINE_BYTES {
                discarding = false;
                f(None)?;
            } else {
                f(Some(line))?;
            }
            pos += i + 1;
        }
        start = pos;
        if discarding || end - start > MAX_LINE_BYTES {
            discarding = true;
            start = end;
        }
        if start == end {
            (start, end) = (0, 0);
        } else if end == buf.len() {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
    }
}

/// Opens a path (`-` is stdin), decompressing gzip transparently (by magic
/// number, so a rotated `.gz` and a plain file both work).
fn open(path: &Path) -> Result<Box<dyn Read>, ReportError> {
    let raw: Box<dyn Read> = if path == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(path).map_err(|source| ReportError::Open { path: path.to_owned(), source })?)
    };
    let mut reader = BufReader::with_capacity(1 << 16, raw);
    let head = reader.fill_buf().map_err(|source| ReportError::Read { path: path.to_owned(), source })?;
    if head.starts_with(&[0x1f, 0x8b]) { Ok(Box::new(MultiGzDecoder::new(reader))) } else { Ok(Box::new(reader)) }
}

/// Per-kind address counts, for the summary (indexed like [`EventKind::ALL`]).
#[derive(Debug)]
struct Summary {
    by_kind: Vec<HashMap<IpAddr, u64>>,
}

impl Summary {
    fn new() -> Summary {
        Summary { by_kind: vec![HashMap::new(); EventKind::ALL.len()] }
    }

    fn add(&mut self, kind: EventKind, ip: IpAddr) {
        // `to_proto` numbers kinds 1..=ALL.len() in `ALL` order.
        let idx = kind as usize - 1;
        if let Some(map) = self.by_kind.get_mut(idx) {
            *map.entry(ip).or_default() += 1;
        }
    }
}

/// Parses every path in order and writes JSON lines or a summary to `out`.
/// Returns the counters; the caller prints [`stats_line`] on stderr.
pub fn run(paths: &[PathBuf], opts: &ParseOptions, out: &mut impl Write) -> Result<ParseStats, ReportError> {
    let mut parser = Parser::for_kind(opts.kind, opts.tz.clone());
    let mut summary = Summary::new();
    let mut json = Vec::with_capacity(512);
    for path in paths {
        let reader = open(path)?;
        let mut write_failed: Option<io::Error> = None;
        let result = for_each_line(reader, |line| {
            let Some(line) = line else {
                parser.skip_oversized();
                return Ok(());
            };
            let Some(ev) = parser.feed(line) else { return Ok(()) };
            if opts.json {
                json.clear();
                // Serialising plain fields into a Vec cannot fail.
                if serde_json::to_writer(&mut json, &JsonEvent::from(&ev)).is_ok() {
                    json.push(b'\n');
                    if let Err(e) = out.write_all(&json) {
                        write_failed = Some(e);
                        return Err(io::Error::other("output failed"));
                    }
                }
            } else {
                summary.add(ev.kind, ev.ip);
            }
            Ok(())
        });
        if let Some(e) = write_failed {
            return Err(ReportError::Write(e));
        }
        result.map_err(|source| ReportError::Read { path: path.clone(), source })?;
    }
    if !opts.json {
        write_summary(&summary, out).map_err(ReportError::Write)?;
    }
    out.flush().map_err(ReportError::Write)?;
    Ok(parser.stats())
}

fn write_summary(s: &Summary, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "events by kind:")?;
    for (kind, addrs) in EventKind::ALL.iter().zip(&s.by_kind) {
        if !addrs.is_empty() {
            writeln!(out, "  {:<24}{:>10}", kind.as_str(), addrs.values().sum::<u64>())?;
        }
    }
    writeln!(out, "top addresses by kind:")?;
    for (kind, addrs) in EventKind::ALL.iter().zip(&s.by_kind) {
        if addrs.is_empty() {
            continue;
        }
        let mut top: Vec<(IpAddr, u64)> = addrs.iter().map(|(ip, n)| (*ip, *n)).collect();
        let order = |a: &(IpAddr, u64), b: &(IpAddr, u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        if top.len() > 10 {
            top.select_nth_unstable_by(9, order);
            top.truncate(10);
        }
        top.sort_unstable_by(order);
        writeln!(out, "  {}:", kind.as_str())?;
        for (ip, n) in &top {
            writeln!(out, "    {:<40}{n:>10}", ip.to_string())?;
        }
    }
    Ok(())
}

/// The one-line summary printed on stderr: `lines=N events=M ignored=K
/// ambiguous=A` (ambiguous lines are part of the ignored ones).
pub fn stats_line(stats: &ParseStats) -> String {
    format!("lines={} events={} ignored={} ambiguous={}", stats.lines, stats.events, stats.ignored, stats.ambiguous)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    #[test]
    fn lines_over_the_limit_are_skipped_without_buffering() {
        let mut input = b"first\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 << 20));
        input.extend(b"\nsecond\n");
        input.extend(std::iter::repeat_n(b'y', MAX_LINE_BYTES + 1));
        input.extend(b"\nlast without newline");
        let mut seen = Vec::new();
        for_each_line(&input[..], |l| {
            seen.push(l.map(|l| String::from_utf8_lossy(l).into_owned()));
            Ok(())
        })
        .unwrap();
        let want = [Some("first"), None, Some("second"), None, Some("last without newline")];
        assert_eq!(seen, want.map(|s| s.map(str::to_owned)));
    }

    #[test]
    fn reads_gzip_and_writes_json_lines() {
        let log = "2026-11-27 01:57:50.552 [8679] dovecot_plain authenticator failed for (scanner.invalid) [192.0.2.110]:35157 I=[192.0.2.10]:25: 535 Incorrect authentication data (set_id=admin0@example.test)\n\
                   \x20continuation\n\
                   \x00\x01binary garbage\x7f\n\
                   2026-11-27 01:57:47 Connection from [2001:db8::1]:58745 refused: too many connections\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mainlog.1.gz");
        let mut gz = GzEncoder::new(File::create(&path).unwrap(), Compression::fast());
        gz.write_all(log.as_bytes()).unwrap();
        gz.finish().unwrap();
        let mut out = Vec::new();
        let opts = ParseOptions { json: true, tz: Timezone::Utc, kind: LogKind::Exim };
        let stats = run(&[path], &opts, &mut out).unwrap();
        assert_eq!(stats_line(&stats), "lines=4 events=2 ignored=2 ambiguous=0");
        let rows: Vec<serde_json::Value> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["ts"], "2026-11-27T01:57:50.552Z");
        assert_eq!(rows[0]["kind"], "auth_failed");
        assert_eq!(rows[0]["ip"], "192.0.2.110");
        assert_eq!(rows[0]["port"], 35157);
        assert_eq!(rows[0]["local_ip"], "192.0.2.10");
        assert_eq!(rows[0]["local_port"], 25);
        assert_eq!(rows[0]["user"], "admin0@example.test");
        assert_eq!(rows[0]["helo"], "scanner.invalid");
        assert_eq!(rows[0]["detail"], "dovecot_plain");
        assert_eq!(rows[1]["kind"], "refused_too_many");
        assert_eq!(rows[1]["ip"], "2001:db8::1");
        assert!(rows[1]["count"].is_null());
    }

    #[test]
    fn summary_counts_kinds_and_top_addresses() {
        let mut log = Vec::new();
        genlog_lines(&mut log);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mainlog");
        std::fs::write(&path, &log).unwrap();
        let mut out = Vec::new();
        let stats =
            run(&[path], &ParseOptions { json: false, tz: Timezone::Utc, kind: LogKind::Exim }, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(stats.lines, 3);
        assert!(text.contains("  connect                          2"), "{text}");
        assert!(text.contains("  connect:\n    192.0.2.1                                        2\n"), "{text}");
        assert!(text.contains("  lost:\n    192.0.2.2"), "{text}");
    }

    fn genlog_lines(out: &mut Vec<u8>) {
        out.extend(b"2026-01-01 00:00:00 SMTP connection from [192.0.2.1]:1 (TCP/IP connection count = 1)\n");
        out.extend(b"2026-01-01 00:00:01 SMTP connection from [192.0.2.1]:2 (TCP/IP connection count = 2)\n");
        out.extend(b"2026-01-01 00:00:02 SMTP connection from [192.0.2.2]:3 lost\n");
    }
}
