//! `fleetban-agent bench-ingest`: throughput and memory of file → parse →
//! spool, measured on the real pipeline.
//!
//! Generates a realistic Exim log with [`crate::parse::genlog`] (or takes a
//! given file), resets the process's peak-RSS counter, then runs the same
//! [`Pipeline`] as `run` (Exim parser, 1000-event batches, fsync group
//! commit) over the file from its beginning and waits until every line is
//! read and the spool is synced. Reports wall time, CPU time (all threads),
//! lines per second, and the peak RSS while ingesting. Run it under
//! `taskset -c 0` to hold it to one core.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::StartAt;
use crate::parse::{LogKind, Timezone, genlog};
use crate::pipeline::{Pipeline, PipelineError, PipelineOptions, SourceSpec};
use crate::run::LogLineParser;
use crate::spool::{Spool, SpoolError, SpoolOptions};

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Preparing the input or the directory failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The pipeline did not finish in time.
    #[error("ingest did not finish within {0:?}")]
    Timeout(Duration),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Lines to generate (ignored with `input`).
    pub lines: u64,
    /// Generator seed.
    pub seed: u64,
    /// Use this log instead of generating one.
    pub input: Option<PathBuf>,
    /// Working directory (log and spool); a temporary one by default.
    pub dir: Option<PathBuf>,
    /// Group-commit interval.
    pub fsync_interval: Duration,
}

/// The measured figures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Lines ingested.
    pub lines: u64,
    /// Bytes of log ingested.
    pub bytes: u64,
    /// Events spooled.
    pub events: u64,
    /// Batches spooled.
    pub batches: u64,
    /// fsyncs done.
    pub syncs: u64,
    /// Wall-clock seconds from start to synced spool.
    pub wall_secs: f64,
    /// CPU seconds of the whole process (all threads) in that time.
    pub cpu_secs: f64,
    /// Lines per wall-clock second.
    pub lines_per_sec: f64,
    /// Lines per CPU second (the one-core figure when not pinned).
    pub lines_per_cpu_sec: f64,
    /// Peak resident set size while ingesting, in bytes (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Bytes in the spool at the end.
    pub spool_bytes: u64,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, error: source }
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// `VmHWM` (peak RSS) of this process, in bytes.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Resets the peak-RSS counter (`/proc/self/clear_refs`, value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs the benchmark.
pub fn bench_ingest(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    let temp;
    let dir: &Path = match &options.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
            dir
        }
        None => {
            temp = tempdir()?;
            &temp.0
        }
    };
    let log = match &options.input {
        Some(input) => input.clone(),
        None => {
            let log = dir.join("exim_mainlog");
            let file = std::fs::File::create(&log).map_err(io(format!("cannot create {}", log.display())))?;
            let mut out = BufWriter::with_capacity(1 << 16, file);
            genlog::write_log(options.lines, options.seed, &mut out).map_err(io("cannot generate the log"))?;
            out.flush().map_err(io("cannot write the log"))?;
            log
        }
    };
    let bytes = std::fs::metadata(&log).map_err(io(format!("cannot stat {}", log.display())))?.len();
    let lines = match &options.input {
        Some(_) => count_lines(&log)?,
        None => options.lines,
    };
    let spool_dir = dir.join("spool");
    let _ = std::fs::remove_dir_all(&spool_dir);

    reset_peak_rss();
    let cpu_start = cpu_secs();
    let started = Instant::now();
    let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(4 << 30))?;
    let sources = [SourceSpec { path: log.clone(), start_at: StartAt::Beginning, kind: LogKind::Exim }];
    let pipeline_options =
        PipelineOptions { fsync_interval: options.fsync_interval, watch: false, ..PipelineOptions::default() };
    let pipeline =
        Pipeline::start(spool, &sources, |_| LogLineParser::new(LogKind::Exim, Timezone::Utc), pipeline_options)?;
    let limit = Duration::from_secs(600);
    while pipeline.stats().lines.load(Ordering::Relaxed) < lines {
        if started.elapsed() > limit {
            let _ = pipeline.shutdown();
            return Err(BenchError::Timeout(limit));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let spool = pipeline.spool();
    let stats = pipeline.stats();
    pipeline.shutdown()?;
    let wall_secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu_start;
    let peak_rss_bytes = peak_rss_bytes();
    let spool_bytes = spool.lock().map(|spool| spool.status().bytes).unwrap_or_default();
    Ok(BenchReport {
        lines,
        bytes,
        events: stats.events.load(Ordering::Relaxed),
        batches: stats.batches.load(Ordering::Relaxed),
        syncs: stats.syncs.load(Ordering::Relaxed),
        wall_secs,
        cpu_secs: cpu,
        lines_per_sec: lines as f64 / wall_secs,
        lines_per_cpu_sec: lines as f64 / cpu.max(1e-9),
        peak_rss_bytes,
        spool_bytes,
    })
}

fn count_lines(path: &Path) -> Result<u64, BenchError> {
    let data = std::fs::read(path).map_err(io(format!("cannot read {}", path.display())))?;
    Ok(memchr::memchr_iter(b'\n', &data).count() as u64)
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> Result<TempDir, BenchError> {
    let dir = std::env::temp_dir().join(format!("fleetban-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    Ok(TempDir(dir))
}
