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

use super::{Event, EventKind, MAX_LINE_BYTES, ParseStats, Parser, Timezone, format_rfc3339_ms};

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
}

/// The JSON form of an event (one object per line).
#[derive(Debug, Serialize)]
struct JsonEvent<'a> {
    ts: String,
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
}

impl<'a> From<&Event<'a>> for JsonEvent<'a> {
    fn from(e: &Event<'a>) -> Self {
        JsonEvent {
            ts: format_rfc3339_ms(e.time_ms),
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

/// Per-kind counts and per-kind address counts, for the summary.
#[derive(Debug, Default)]
struct Summary {
    by_kind: HashMap<EventKind, u64>,
    by_addr: HashMap<(EventKind, IpAddr), u64>,
}

/// Parses every path in order and writes JSON lines or a summary to `out`.
/// Returns the counters; the caller prints [`stats_line`] on stderr.
pub fn run(paths: &[PathBuf], opts: &ParseOptions, out: &mut impl Write) -> Result<ParseStats, ReportError> {
    let mut parser = Parser::new(opts.tz.clone());
    let mut summary = Summary::default();
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
                *summary.by_kind.entry(ev.kind).or_default() += 1;
                *summary.by_addr.entry((ev.kind, ev.ip)).or_default() += 1;
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
    for kind in EventKind::ALL {
        if let Some(n) = s.by_kind.get(&kind) {
            writeln!(out, "  {:<24}{n:>10}", kind.as_str())?;
        }
    }
    writeln!(out, "top addresses by kind:")?;
    for kind in EventKind::ALL {
        let mut addrs: Vec<(IpAddr, u64)> =
            s.by_addr.iter().filter(|((k, _), _)| *k == kind).map(|((_, ip), n)| (*ip, *n)).collect();
        if addrs.is_empty() {
            continue;
        }
        addrs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        writeln!(out, "  {}:", kind.as_str())?;
        for (ip, n) in addrs.iter().take(10) {
            writeln!(out, "    {:<40}{n:>10}", ip.to_string())?;
        }
    }
    Ok(())
}

/// The one-line summary printed on stderr: `lines=N events=M ignored=K`.
pub fn stats_line(stats: &ParseStats) -> String {
    format!("lines={} events={} ignored={}", stats.lines, stats.events, stats.ignored)
}
