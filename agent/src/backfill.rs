//! `fleetban-agent backfill`: imports old logs (plain or `.gz`) into the spool.
//!
//! Each file is read from its start, parsed line by line, and appended to the
//! spool in batches like live events, with group commit. Its records carry
//! the position `backfill:<path>` so they never move a live source's
//! checkpoint. Progress goes to stderr: an `indicatif` bar on a terminal,
//! plain lines (about one per second and one per file) otherwise.
//!
//! The spool is held exclusively, so backfill runs while the agent is stopped
//! (it says so if the agent holds the spool).

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flate2::read::MultiGzDecoder;
use fleetban_proto::v1::{ContextSummary, Event, SourcePosition};
use indicatif::{ProgressBar, ProgressStyle};

use crate::aggregate::{AggregateConfig, Aggregator};
use crate::pipeline::LineParser;
use crate::spool::{BACKFILL_PREFIX, Spool, SpoolError};

/// Errors of a backfill.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// A log file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Totals of a backfill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillStats {
    /// Files read.
    pub files: u64,
    /// Lines read.
    pub lines: u64,
    /// Events spooled.
    pub events: u64,
    /// Batches spooled.
    pub batches: u64,
    /// Context summaries spooled (with `[aggregate]` on).
    pub summaries: u64,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A progress bar (stderr is a terminal).
    Bar,
    /// Plain lines on stderr.
    Lines,
    /// Nothing (tests).
    Quiet,
}

impl ProgressMode {
    /// A bar on a terminal, plain lines otherwise.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() { ProgressMode::Bar } else { ProgressMode::Lines }
    }
}

/// Counts bytes read from the underlying file (compressed bytes for `.gz`).
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn is_gzip(path: &Path) -> Result<bool, std::io::Error> {
    let mut magic = [0; 2];
    let mut file = File::open(path)?;
    let n = file.read(&mut magic)?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

/// Imports `files` into `spool`, every line as an event; `fsync_interval`
/// is the group-commit interval. Every batch is durable when this returns.
pub fn backfill(
    spool: &mut Spool,
    files: &[PathBuf],
    parser: &mut dyn LineParser,
    batch_events: usize,
    fsync_interval: Duration,
    mode: ProgressMode,
) -> Result<BackfillStats, BackfillError> {
    let off = AggregateConfig { enabled: false, ..AggregateConfig::default() };
    backfill_with(spool, files, parser, batch_events, fsync_interval, mode, &off)
}

/// [`backfill`] with context aggregated as `aggregate` says, like `run`
/// does: context lines go into summaries per address and interval, flushed
/// when a newer interval begins and at the end of each file. (A backfill
/// that stops half way is run again from the start of its files, as
/// before: nothing is resumed.)
pub fn backfill_with(
    spool: &mut Spool,
    files: &[PathBuf],
    parser: &mut dyn LineParser,
    batch_events: usize,
    fsync_interval: Duration,
    mode: ProgressMode,
    aggregate: &AggregateConfig,
) -> Result<BackfillStats, BackfillError> {
    let mut aggregator = Aggregator::new(aggregate, Arc::default());
    let mut summaries: Vec<ContextSummary> = Vec::new();
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BackfillError::Read { path, error: source }
    };
    let total: u64 = files
        .iter()
        .map(|path| std::fs::metadata(path).map(|m| m.len()).map_err(read_err(path)))
        .sum::<Result<_, _>>()?;
    let bar = match mode {
        ProgressMode::Bar => {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Some(bar)
        }
        _ => None,
    };
    let mut stats = BackfillStats::default();
    let mut done_bytes = 0;
    let mut last_sync = Instant::now();
    let mut last_report = Instant::now();
    for path in files {
        let count = Arc::new(AtomicU64::new(0));
        let file = File::open(path).map_err(read_err(path))?;
        let counting = Counting { inner: file, count: count.clone() };
        let reader: Box<dyn Read> = if is_gzip(path).map_err(read_err(path))? {
            Box::new(MultiGzDecoder::new(BufReader::with_capacity(256 * 1024, counting)))
        } else {
            Box::new(counting)
        };
        let mut reader = BufReader::with_capacity(256 * 1024, reader);
        let key = format!("{BACKFILL_PREFIX}{}", path.display());
        let mut fingerprint = 0;
        let mut offset = 0u64;
        let mut line = Vec::with_capacity(4096);
        let mut events: Vec<Event> = Vec::with_capacity(batch_events);
        if let Some(bar) = &bar {
            bar.set_message(path.display().to_string());
        }
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(read_err(path))?;
            if n == 0 {
                break;
            }
            if offset == 0 {
                fingerprint = crate::tail::fingerprint_file(path).unwrap_or_default();
            }
            offset += n as u64;
            stats.lines += 1;
            if let Some(event) = parser.parse_line(&line) {
                let event =
                    if aggregate.enabled { aggregator.observe(event, &line, &mut summaries) } else { Some(event) };
                events.extend(event);
            }
            if events.len() >= batch_events || summaries.len() >= batch_events {
                flush(spool, &mut events, &mut summaries, &key, fingerprint, offset, &mut stats)?;
                if last_sync.elapsed() >= fsync_interval {
                    spool.sync()?;
                    last_sync = Instant::now();
                }
            }
            if stats.lines % 4096 == 0 {
                let read = done_bytes + count.load(Ordering::Relaxed);
                match (&bar, mode) {
                    (Some(bar), _) => bar.set_position(read),
                    (None, ProgressMode::Lines) if last_report.elapsed() >= Duration::from_secs(1) => {
                        report_line(path, read, total, &stats);
                        last_report = Instant::now();
                    }
                    _ => {}
                }
            }
        }
        summaries.extend(aggregator.flush());
        flush(spool, &mut events, &mut summaries, &key, fingerprint, offset, &mut stats)?;
        spool.sync()?;
        last_sync = Instant::now();
        stats.files += 1;
        done_bytes += count.load(Ordering::Relaxed);
        match &bar {
            Some(bar) => bar.set_position(done_bytes),
            None if mode == ProgressMode::Lines => report_line(path, done_bytes, total, &stats),
            None => {}
        }
    }
    if let Some(bar) = bar {
        bar.finish_with_message("done");
    }
    Ok(stats)
}

fn flush(
    spool: &mut Spool,
    events: &mut Vec<Event>,
    summaries: &mut Vec<ContextSummary>,
    key: &str,
    fingerprint: u64,
    offset: u64,
    stats: &mut BackfillStats,
) -> Result<(), SpoolError> {
    if events.is_empty() && summaries.is_empty() {
        return Ok(());
    }
    let position = SourcePosition { path: key.to_owned(), fingerprint, offset, open_from: None };
    spool.append_batch(events, summaries, &position)?;
    stats.events += events.len() as u64;
    stats.summaries += summaries.len() as u64;
    stats.batches += 1;
    events.clear();
    summaries.clear();
    Ok(())
}

fn report_line(path: &Path, read: u64, total: u64, stats: &BackfillStats) {
    let percent = if total == 0 { 100.0 } else { read as f64 * 100.0 / total as f64 };
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(
        stderr,
        "backfill: {} {percent:.1}% ({read}/{total} bytes), {} lines, {} events",
        path.display(),
        stats.lines,
        stats.events
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{SpoolOptions, read_all};
    use flate2::Compression;
    use flate2::write::GzEncoder;

    fn parser() -> impl LineParser {
        |line: &[u8]| {
            let text = std::str::from_utf8(line).ok()?.trim_end();
            text.starts_with("ev").then(|| Event { raw: text.to_owned(), ..Event::default() })
        }
    }

    #[test]
    fn with_aggregation_context_lines_are_imported_as_summaries() {
        use fleetban_proto::v1::EventKind;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("exim_mainlog.1");
        // `c <n> <second>`: a connect from 192.0.2.<n> at that second; `a`
        // an auth failure.
        let text: String = (0..300)
            .map(|i| if i % 10 == 0 { format!("a {} {i}\n", i % 7) } else { format!("c {} {i}\n", i % 7) })
            .collect();
        std::fs::write(&log, &text).unwrap();
        let mut parser = |line: &[u8]| {
            let text = std::str::from_utf8(line).ok()?.trim_end();
            let mut words = text.split(' ');
            let kind = if words.next()? == "a" { EventKind::AuthFailed } else { EventKind::Connect };
            let remote: std::net::IpAddr = format!("192.0.2.{}", words.next()?).parse().ok()?;
            let second: i64 = words.next()?.parse().ok()?;
            Some(Event {
                kind: kind as i32,
                remote: Some(remote.into()),
                time_ms: 1_764_000_000_000 + second * 1000,
                ..Event::default()
            })
        };
        let (mut spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let aggregate = AggregateConfig::default();
        let stats = backfill_with(
            &mut spool,
            &[log],
            &mut parser,
            10,
            Duration::from_millis(50),
            ProgressMode::Quiet,
            &aggregate,
        )
        .unwrap();
        drop(spool);
        assert_eq!(stats.events, 30, "only the auth failures are single events");
        // 300 s = 5 intervals of 60 s, 7 addresses each.
        assert_eq!(stats.summaries, 35);
        let records = read_all(&dir.path().join("spool")).unwrap();
        let summarised: u32 = records.iter().flat_map(|b| &b.summaries).flat_map(|s| &s.counts).map(|c| c.lines).sum();
        assert_eq!(summarised, 270);
    }

    #[test]
    fn imports_plain_and_gz_files_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("exim_mainlog.1");
        let gz = dir.path().join("exim_mainlog.2.gz");
        let text: String = (0..25).map(|n| format!("ev {n}\nnoise\n")).collect();
        std::fs::write(&plain, &text).unwrap();
        let mut encoder = GzEncoder::new(File::create(&gz).unwrap(), Compression::fast());
        encoder.write_all(text.replace("ev ", "ev gz ").as_bytes()).unwrap();
        // No newline after the last line of a finished file: still imported.
        encoder.write_all(b"ev last").unwrap();
        encoder.finish().unwrap();

        let (mut spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let mut parser = parser();
        let stats =
            backfill(&mut spool, &[plain, gz.clone()], &mut parser, 10, Duration::from_millis(50), ProgressMode::Quiet)
                .unwrap();
        assert_eq!(stats, BackfillStats { files: 2, lines: 101, events: 51, batches: 6, summaries: 0 });
        drop(spool);
        let records = read_all(&dir.path().join("spool")).unwrap();
        let raws: Vec<String> = records.iter().flat_map(|b| b.events.iter().map(|e| e.raw.clone())).collect();
        assert_eq!(raws.len(), 51);
        assert_eq!(raws[0], "ev 0");
        assert_eq!(raws[25], "ev gz 0");
        assert_eq!(raws[50], "ev last");
        let last = records.last().unwrap().position.clone().unwrap();
        assert_eq!(last.path, format!("backfill:{}", gz.display()));
        assert_eq!(last.fingerprint, crate::tail::fingerprint_file(&gz).unwrap());
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let error = backfill(
            &mut spool,
            &[dir.path().join("nope")],
            &mut parser(),
            10,
            Duration::from_millis(50),
            ProgressMode::Quiet,
        )
        .unwrap_err();
        assert!(error.to_string().contains("nope"));
    }
}
