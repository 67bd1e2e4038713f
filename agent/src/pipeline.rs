//! Wires the agent's steps together with bounded channels.
//!
//! ```text
//! per source:  tail thread ──chunks──► parse+batch thread ─┐
//!                                                          ├─batches──► spool thread ──► Spool (fsync group commit)
//! per source:  tail thread ──chunks──► parse+batch thread ─┘
//! ```
//!
//! - The **tail** thread follows one path ([`crate::tail::Tailer`]), woken by
//!   inotify or every [`crate::tail::POLL_INTERVAL`], and sends chunks of
//!   whole lines.
//! - The **parse** thread turns lines into events and cuts a batch after
//!   `batch_events` events, when its first abuse event is `batch_age` old,
//!   when its first event is `context_batch_age` old (a batch of context
//!   only, which no decision waits for; see
//!   [`PipelineOptions::context_batch_age`]), or when held summaries are due
//!   ([`PipelineOptions::summary_delay`]). A
//!   batch carries the position just past the last line it covers (lines
//!   without events included); when lines yield no events at all, the
//!   position alone is sent on.
//! - The **spool** thread appends batches, writes position records for quiet
//!   sources, and fsyncs at most every `fsync_interval` (group commit). Only
//!   then is the durable seq published to the uplink.
//!
//! Exactly-once: a source's read position is advanced durably only by a
//! spool record, written after every line before it was turned into events
//! in that record or an earlier one. A restart opens the spool and resumes
//! each tailer at the position of its newest record, so no line is read
//! twice into the spool and none is skipped. Every channel is bounded: a
//! slow disk slows the tailer, never grows memory.
//!
//! Aggregation (`[aggregate]`, [`crate::aggregate`]): the parse thread
//! counts context events into per-address summaries of the current
//! interval; the summaries of an ended interval are held for this agent's
//! `summary_delay` (so a fleet's agents, which end an interval together, do
//! not all send theirs at once) and then go into the next batch, so they
//! take a seq and are exactly-once like events. Until then the counted
//! context exists only in memory, so every record also carries `open_from`:
//! the offset of the first line whose context the aggregator or the held
//! summaries count (absent when none; the aggregator always flushes
//! everything at once, and a change of file flushes and sends everything,
//! so this is one offset in the record's file). A restart resumes the tailer at `open_from` and re-reads
//! up to the record's offset in *replay*: those lines' individual events
//! were spooled already and are dropped (and detection does not see them a
//! second time, [`LineParser::reparse_line`]); only their summarised kinds
//! are counted again. After a kill -9 the summaries therefore hold every
//! context line exactly once. A shutdown flushes the open summaries.
//!
//! The uplink (a later step) reads durable batches from the [`SharedSpool`]
//! (`read_batches` after its last sent seq, woken by [`Pipeline::durable`])
//! and acknowledges them with `ack`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetban_proto::v1::{ContextSummary, Event, EventKind, SourcePosition};
use tracing::{error, info, warn};

use crate::aggregate::{AggregateConfig, AggregateStats, Aggregator};
use crate::config::StartAt;
use crate::parse::LogKind;
use crate::spool::{Spool, SpoolError};
use crate::tail::{Chunk, Position, Progress, TailOptions, Tailer, Waker};

/// The spool, shared by the spool thread and the uplink.
pub type SharedSpool = Arc<Mutex<Spool>>;

/// Errors of the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A thread could not be started.
    #[error("cannot start pipeline thread: {0}")]
    Spawn(std::io::Error),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// A pipeline thread panicked.
    #[error("pipeline thread `{0}` panicked")]
    Panicked(String),
}

/// Turns one log line into a wire event, or nothing.
pub trait LineParser: Send + 'static {
    /// Parses one line (with its `\n`).
    fn parse_line(&mut self, line: &[u8]) -> Option<Event>;

    /// Parses a line read a second time after a restart (its events were
    /// spooled already; only its context is counted again): without side
    /// effects such as detection or per-kind counters.
    fn reparse_line(&mut self, line: &[u8]) -> Option<Event> {
        self.parse_line(line)
    }
}

impl<F> LineParser for F
where
    F: FnMut(&[u8]) -> Option<Event> + Send + 'static,
{
    fn parse_line(&mut self, line: &[u8]) -> Option<Event> {
        self(line)
    }
}

/// One followed source.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// Path of the live log file, as configured (the key of its checkpoint).
    pub path: PathBuf,
    /// The log's format (which parser reads it).
    pub kind: LogKind,
    /// Start position in a file never seen before.
    pub start_at: StartAt,
}

/// Tuning of the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct PipelineOptions {
    /// A batch is cut after this many events.
    pub batch_events: usize,
    /// ... or when its first abuse event (any kind that is not summarised
    /// context, [`EventKind::is_summarised`]) is this old ...
    pub batch_age: Duration,
    /// ... or when its first event is this old (never sooner than
    /// `batch_age`). The server decides on abuse events only; context
    /// (good standing, the dashboard's series) is read as counts, and an
    /// address's standing is judged over days. A host's context lines
    /// therefore wait up to this long, and a busy host sends a batch about
    /// this often instead of every `batch_age`. An abuse line cuts the
    /// batch `batch_age` after it with every standing line before it, so
    /// the server never sees a host's abuse before the same host's earlier
    /// accepted mail or login.
    pub context_batch_age: Duration,
    /// How long summaries of an ended interval are held before they go out
    /// (this agent's offset in `[aggregate] spread_secs`, see
    /// [`summary_delay`]): every agent of a fleet ends its intervals at the
    /// same wall-clock moment, and their summaries would all arrive at once.
    /// Held summaries stay covered by `open_from`, so a kill -9 loses none.
    pub summary_delay: Duration,
    /// Group-commit interval of the spool.
    pub fsync_interval: Duration,
    /// Use inotify (otherwise poll every `poll_interval`).
    pub watch: bool,
    /// Longest wait between two looks at a file.
    pub poll_interval: Duration,
    /// Chunks in flight between a tailer and its parser.
    pub chunk_queue: usize,
    /// Batches in flight between the parsers and the spool.
    pub batch_queue: usize,
    /// Context aggregation (`[aggregate]`).
    pub aggregate: AggregateConfig,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            batch_events: 1000,
            batch_age: Duration::from_millis(100),
            context_batch_age: DEFAULT_CONTEXT_BATCH_AGE,
            summary_delay: Duration::ZERO,
            fsync_interval: Duration::from_millis(100),
            watch: true,
            poll_interval: crate::tail::POLL_INTERVAL,
            chunk_queue: 4,
            batch_queue: 4,
            aggregate: AggregateConfig::default(),
        }
    }
}

/// This agent's [`PipelineOptions::summary_delay`]: uniformly random in
/// `[0, spread_secs)`, at most half the interval, chosen once per start so a
/// fleet's agents send their summaries spread over that time.
pub fn summary_delay(aggregate: &AggregateConfig) -> Duration {
    let spread_ms = u64::from(aggregate.spread_secs.min(aggregate.interval_secs / 2)) * 1000;
    if spread_ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(fastrand::u64(0..spread_ms))
}

/// Default [`PipelineOptions::context_batch_age`].
pub const DEFAULT_CONTEXT_BATCH_AGE: Duration = Duration::from_secs(1);

/// Counters of a running pipeline.
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Lines read.
    pub lines: AtomicU64,
    /// Events parsed.
    pub events: AtomicU64,
    /// Batches appended to the spool.
    pub batches: AtomicU64,
    /// fsyncs of the spool.
    pub syncs: AtomicU64,
    /// Context summaries sent instead of single events.
    pub aggregate: Arc<AggregateStats>,
}

/// What a parse thread hands to the spool thread.
enum Item {
    /// A batch of events and summaries ending at a position.
    Batch(Vec<Event>, Vec<ContextSummary>, SourcePosition),
    /// A source advanced without events.
    Position(SourcePosition),
}

/// A running pipeline; stop it with [`Pipeline::shutdown`].
pub struct Pipeline {
    stop: Arc<AtomicBool>,
    /// Stop without flushing what the parse threads hold (a simulated
    /// kill -9, for tests).
    killed: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<()>)>,
    spool_thread: Option<JoinHandle<Result<(), SpoolError>>>,
    spool: SharedSpool,
    durable: tokio::sync::watch::Receiver<u64>,
    stats: Arc<PipelineStats>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").field("threads", &self.threads.len()).finish()
    }
}

impl Pipeline {
    /// Starts following `sources` into `spool`, resuming each at its newest
    /// spooled position. `parser` makes one parser per source, for its
    /// kind; sources of different kinds share the spool and its guarantees.
    pub fn start<P: LineParser>(
        spool: Spool,
        sources: &[SourceSpec],
        mut parser: impl FnMut(&SourceSpec) -> P,
        options: PipelineOptions,
    ) -> Result<Pipeline, PipelineError> {
        let checkpoints = spool.positions();
        let (durable_tx, durable) = tokio::sync::watch::channel(spool.durable_seq());
        let spool = Arc::new(Mutex::new(spool));
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PipelineStats::default());
        let (batch_tx, batch_rx) = sync_channel(options.batch_queue);
        let mut threads = Vec::new();

        for source in sources {
            let key = source.path.to_string_lossy().into_owned();
            let spooled = checkpoints.get(&key);
            let checkpoint =
                spooled.map(|position| Position { fingerprint: position.fingerprint, offset: position.offset });
            // Context held in open summaries when the record was written is
            // counted again from `open_from` (see the module documentation).
            let replay_from = spooled
                .and_then(|position| position.open_from.filter(|from| *from < position.offset))
                .map(|from| Position { fingerprint: spooled.map_or(0, |p| p.fingerprint), offset: from });
            let tail_options = TailOptions { start_at: source.start_at, ..TailOptions::default() };
            let tailer = Tailer::new(source.path.clone(), replay_from.or(checkpoint), tail_options);
            let (chunk_tx, chunk_rx) = sync_channel(options.chunk_queue);

            let waker = if options.watch {
                Waker::new(&source.path, options.poll_interval)
            } else {
                Waker::polling(options.poll_interval)
            };
            let thread_stop = stop.clone();
            let name = format!("tail {key}");
            let handle = std::thread::Builder::new()
                .name("fleetban-tail".into())
                .spawn(move || tail_loop(tailer, waker, chunk_tx, thread_stop))
                .map_err(PipelineError::Spawn)?;
            threads.push((name, handle));

            let mut batcher = Batcher::new(key.clone(), batch_tx.clone(), options, stats.clone());
            batcher.resume(checkpoint, replay_from.and(checkpoint));
            batcher.killed = killed.clone();
            let mut line_parser = parser(source);
            let name = format!("parse {key}");
            let handle = std::thread::Builder::new()
                .name("fleetban-parse".into())
                .spawn(move || batcher.run(chunk_rx, &mut line_parser))
                .map_err(PipelineError::Spawn)?;
            threads.push((name, handle));
        }
        drop(batch_tx);

        let thread_spool = spool.clone();
        let thread_stats = stats.clone();
        let fsync_interval = options.fsync_interval;
        let spool_thread = std::thread::Builder::new()
            .name("fleetban-spool".into())
            .spawn(move || spool_loop(thread_spool, batch_rx, fsync_interval, durable_tx, thread_stats))
            .map_err(PipelineError::Spawn)?;
        info!(sources = sources.len(), "Pipeline started.");
        Ok(Pipeline { stop, killed, threads, spool_thread: Some(spool_thread), spool, durable, stats })
    }

    /// The spool, for the uplink and for status.
    pub fn spool(&self) -> SharedSpool {
        self.spool.clone()
    }

    /// The highest durable seq, updated after every group commit.
    pub fn durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.durable.clone()
    }

    /// Counters (they stay readable after shutdown).
    pub fn stats(&self) -> Arc<PipelineStats> {
        self.stats.clone()
    }

    /// Stops like a kill -9 between two spool records: what the parse
    /// threads hold (pending events, open summaries) is dropped, what the
    /// spool thread received is written. For crash tests.
    pub fn kill(self) -> Result<(), PipelineError> {
        self.killed.store(true, Ordering::SeqCst);
        self.shutdown()
    }

    /// Stops reading, flushes every pending batch into the spool and syncs
    /// it. Returns the first failure of any thread.
    pub fn shutdown(mut self) -> Result<(), PipelineError> {
        self.stop.store(true, Ordering::SeqCst);
        let mut result = Ok(());
        for (name, handle) in self.threads.drain(..) {
            if handle.join().is_err() && result.is_ok() {
                result = Err(PipelineError::Panicked(name));
            }
        }
        if let Some(handle) = self.spool_thread.take() {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => result = result.and(Err(error.into())),
                Err(_) => result = result.and(Err(PipelineError::Panicked("spool".into()))),
            }
        }
        info!("Pipeline stopped; spool flushed.");
        result
    }
}

fn tail_loop(mut tailer: Tailer, waker: Waker, chunks: SyncSender<Chunk>, stop: Arc<AtomicBool>) {
    let mut failing = false;
    while !stop.load(Ordering::SeqCst) {
        match tailer.poll(&mut |chunk| chunks.send(chunk).is_ok()) {
            Ok(Progress::Busy) => {
                failing = false;
                continue;
            }
            Ok(Progress::Idle) => failing = false,
            Ok(Progress::Closed) => return,
            Err(error) => {
                if !failing {
                    warn!(%error, path = %tailer.path().display(), "Cannot read log file; retrying.");
                }
                failing = true;
            }
        }
        waker.wait();
    }
}

/// Turns chunks of one source into batches.
struct Batcher {
    path: String,
    out: SyncSender<Item>,
    options: PipelineOptions,
    stats: Arc<PipelineStats>,
    events: Vec<Event>,
    /// Flushed summaries held for a later batch.
    summaries: Vec<ContextSummary>,
    /// Offset of the first line the held summaries count: records written
    /// while they are held carry it as `open_from`, so a restart counts
    /// those lines again (`None`: not covered, they go out at once).
    summaries_from: Option<u64>,
    /// When the held summaries go out.
    release_at: Option<Instant>,
    /// When the oldest pending event was added.
    first_event_at: Option<Instant>,
    /// When the oldest pending abuse event was added.
    first_abuse_at: Option<Instant>,
    /// Position just past the last line turned into events (or none).
    position: Option<Position>,
    /// The last position handed on (in a batch or alone).
    sent: Option<Position>,
    /// The last `open_from` handed on.
    sent_open_from: Option<u64>,
    /// Open summaries of this source.
    aggregator: Aggregator,
    /// The file the aggregator's lines come from.
    aggregator_file: Option<u64>,
    /// Offset of the first line whose context the aggregator holds.
    open_from: Option<u64>,
    /// Lines before this position were spooled before a restart: only
    /// their context is counted again.
    replay_until: Option<Position>,
    /// Set by [`Pipeline::kill`].
    killed: Arc<AtomicBool>,
}

impl Batcher {
    fn new(path: String, out: SyncSender<Item>, options: PipelineOptions, stats: Arc<PipelineStats>) -> Self {
        let aggregator = Aggregator::new(&options.aggregate, stats.aggregate.clone());
        Self {
            path,
            out,
            options,
            stats,
            events: Vec::with_capacity(options.batch_events),
            summaries: Vec::new(),
            summaries_from: None,
            release_at: None,
            first_event_at: None,
            first_abuse_at: None,
            position: None,
            sent: None,
            sent_open_from: None,
            aggregator,
            aggregator_file: None,
            open_from: None,
            replay_until: None,
            killed: Arc::default(),
        }
    }

    /// Starts from the spooled `checkpoint`; with `replay_until`, the
    /// tailer starts earlier and the lines up to it are replayed.
    fn resume(&mut self, checkpoint: Option<Position>, replay_until: Option<Position>) {
        self.position = checkpoint;
        self.sent = checkpoint;
        self.replay_until = replay_until;
    }

    fn run(&mut self, chunks: Receiver<Chunk>, parser: &mut dyn LineParser) {
        loop {
            let batch_wait = self.cut_due().map(|due| due.saturating_duration_since(Instant::now()));
            let flush_wait = match (self.replay_until, self.aggregator.deadline_ms()) {
                (None, Some(deadline)) => {
                    Some(Duration::from_millis(u64::try_from(deadline.saturating_sub(now_ms())).unwrap_or(0)))
                }
                _ => None,
            };
            let wait = match (batch_wait, flush_wait) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let received = match wait {
                Some(wait) => chunks.recv_timeout(wait),
                None => chunks.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let ok = match received {
                Ok(chunk) => self.feed(&chunk, parser),
                Err(RecvTimeoutError::Timeout) => {
                    if self.replay_until.is_none() {
                        let due = self.aggregator.flush_due(now_ms());
                        self.take_flushed(due);
                    }
                    self.cut()
                }
                Err(RecvTimeoutError::Disconnected) => {
                    if self.killed.load(Ordering::SeqCst) {
                        return;
                    }
                    // Shutdown: the open summaries go into the last batch.
                    let all = self.aggregator.flush();
                    self.take_flushed(all);
                    let _ = self.cut_with(true);
                    return;
                }
            };
            if !ok {
                return;
            }
        }
    }

    /// Summaries flushed by the aggregator: held for a later batch, and
    /// the aggregator holds nothing read before now.
    fn take_flushed(&mut self, flushed: Vec<ContextSummary>) {
        let from = self.open_from;
        if self.aggregator.is_empty() {
            self.open_from = None;
        }
        self.hold(flushed, from);
    }

    /// Holds `flushed` (counting the lines from offset `from` on) until
    /// `summary_delay` after the first of the summaries held.
    fn hold(&mut self, flushed: Vec<ContextSummary>, from: Option<u64>) {
        if flushed.is_empty() {
            return;
        }
        if self.summaries.is_empty() {
            self.summaries_from = from;
            let delay = if from.is_some() { self.options.summary_delay } else { Duration::ZERO };
            self.release_at = Some(Instant::now() + delay);
        } else if self.summaries_from.is_none() {
            // Some held summaries are not covered by `open_from`: send all
            // of them at once.
            self.release_at = Some(Instant::now());
        }
        self.summaries.extend(flushed);
    }

    /// Parses a chunk; returns false when the spool thread is gone.
    fn feed(&mut self, chunk: &Chunk, parser: &mut dyn LineParser) -> bool {
        if self.replay_until.is_some_and(|until| until.fingerprint != chunk.fingerprint) {
            // The file read before the restart is gone: nothing to replay.
            self.replay_until = None;
        }
        if self.aggregator_file.is_some_and(|file| file != chunk.fingerprint) {
            // `open_from` names one file: a rotation flushes what is held
            // and sends it before the first line of the new file.
            if !self.aggregator.is_empty() {
                let all = self.aggregator.flush();
                self.take_flushed(all);
            }
            if !self.summaries.is_empty() && !self.cut_with(true) {
                return false;
            }
        }
        let summarise = self.options.aggregate.enabled;
        let mut flushed = Vec::new();
        let mut start = 0;
        let mut lines = 0;
        for end in memchr::memchr_iter(b'\n', &chunk.data) {
            let line = &chunk.data[start..=end];
            let line_start = chunk.offset + start as u64;
            start = end + 1;
            if let Some(until) = self.replay_until {
                if line_start < until.offset {
                    // Spooled before the restart: count its context again.
                    if let Some(event) = parser.reparse_line(line)
                        && EventKind::try_from(event.kind).is_ok_and(EventKind::is_summarised)
                    {
                        self.observe(event, line, line_start, chunk.fingerprint, &mut flushed);
                    }
                    continue;
                }
                self.end_replay();
            }
            lines += 1;
            if let Some(event) = parser.parse_line(line) {
                let event = if summarise {
                    match self.observe(event, line, line_start, chunk.fingerprint, &mut flushed) {
                        Some(event) => event,
                        None => continue,
                    }
                } else {
                    event
                };
                let now = Instant::now();
                self.first_event_at.get_or_insert(now);
                if !EventKind::try_from(event.kind).is_ok_and(EventKind::is_summarised) {
                    self.first_abuse_at.get_or_insert(now);
                }
                self.events.push(event);
                if self.events.len() >= self.options.batch_events {
                    self.position =
                        Some(Position { fingerprint: chunk.fingerprint, offset: chunk.offset + start as u64 });
                    if !self.cut() {
                        return false;
                    }
                }
            }
        }
        self.stats.lines.fetch_add(lines, Ordering::Relaxed);
        if let Some(until) = self.replay_until {
            if chunk.end().offset < until.offset {
                // Still replaying: the checkpoint stays where it was.
                return true;
            }
            self.end_replay();
        }
        self.position = Some(chunk.end());
        if self.cut_due().is_some_and(|due| due <= Instant::now()) {
            return self.cut();
        }
        if self.events.is_empty()
            && self.summaries.is_empty()
            && (self.position != self.sent || self.current_open_from() != self.sent_open_from)
        {
            // Lines without events: move the checkpoint on by itself.
            let Some(position) = self.position else { return true };
            self.sent = self.position;
            self.sent_open_from = self.current_open_from();
            return self.out.send(Item::Position(self.source_position(position))).is_ok();
        }
        true
    }

    /// Counts one event in the aggregator; an event that stays individual
    /// comes back.
    fn observe(
        &mut self,
        event: Event,
        line: &[u8],
        line_start: u64,
        file: u64,
        flushed: &mut Vec<ContextSummary>,
    ) -> Option<Event> {
        let individual = self.aggregator.observe(event, line, flushed);
        if !flushed.is_empty() {
            let taken = std::mem::take(flushed);
            // A flush empties the aggregator before the line is counted.
            let from = self.open_from.take();
            self.hold(taken, from);
        }
        // Any line that changed what the aggregator holds (a count, or the
        // mark that an interval's first standing line went out alone) is
        // replayed after a crash, so the replay decides as this run did.
        if self.open_from.is_none() && !self.aggregator.is_empty() {
            self.open_from = Some(line_start);
            self.aggregator_file = Some(file);
        }
        individual
    }

    /// The replayed lines are all counted again.
    fn end_replay(&mut self) {
        self.replay_until = None;
        if !self.options.aggregate.enabled {
            // Aggregation was switched off across the restart: send what
            // the replay counted, and count nothing more.
            let all = self.aggregator.flush();
            self.take_flushed(all);
        }
    }

    /// `open_from` as it goes into a record: the first line of the held
    /// summaries, else of the open ones; none when nothing is held.
    fn current_open_from(&self) -> Option<u64> {
        if !self.summaries.is_empty()
            && let Some(from) = self.summaries_from
        {
            return Some(from);
        }
        if self.aggregator.is_empty() { None } else { self.open_from }
    }

    /// When the pending batch is to be cut: `batch_age` after its first
    /// abuse event, `context_batch_age` after its first event, or when the
    /// held summaries are due.
    fn cut_due(&self) -> Option<Instant> {
        let context_age = self.options.context_batch_age.max(self.options.batch_age);
        let context = self.first_event_at.map(|first| first + context_age);
        let abuse = self.first_abuse_at.map(|first| first + self.options.batch_age);
        [context, abuse, self.release_at].into_iter().flatten().min()
    }

    /// Sends the pending events, and the held summaries when they are due.
    fn cut(&mut self) -> bool {
        self.cut_with(false)
    }

    /// Sends the pending events, and the held summaries when they are due
    /// or `release_all`.
    fn cut_with(&mut self, release_all: bool) -> bool {
        self.first_event_at = None;
        self.first_abuse_at = None;
        let release =
            !self.summaries.is_empty() && (release_all || self.release_at.is_some_and(|at| at <= Instant::now()));
        if self.events.is_empty() && !release {
            return true;
        }
        let Some(position) = self.position else { return true };
        let events = std::mem::replace(&mut self.events, Vec::with_capacity(self.options.batch_events));
        let summaries = if release {
            self.summaries_from = None;
            self.release_at = None;
            std::mem::take(&mut self.summaries)
        } else {
            Vec::new()
        };
        self.stats.events.fetch_add(events.len() as u64, Ordering::Relaxed);
        self.sent = Some(position);
        self.sent_open_from = self.current_open_from();
        self.out.send(Item::Batch(events, summaries, self.source_position(position))).is_ok()
    }

    fn source_position(&self, position: Position) -> SourcePosition {
        // `open_from` is only meaningful in the file of `position`, and
        // only for lines before it.
        let open_from = self
            .current_open_from()
            .filter(|from| self.aggregator_file == Some(position.fingerprint) && *from < position.offset);
        SourcePosition {
            path: self.path.clone(),
            fingerprint: position.fingerprint,
            offset: position.offset,
            open_from,
        }
    }
}

/// The wall clock, unix milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn spool_loop(
    spool: SharedSpool,
    items: Receiver<Item>,
    fsync_interval: Duration,
    durable: tokio::sync::watch::Sender<u64>,
    stats: Arc<PipelineStats>,
) -> Result<(), SpoolError> {
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    // Positions of quiet sources, written at the next commit.
    let mut positions: HashMap<String, SourcePosition> = HashMap::new();
    let mut written: HashMap<String, SourcePosition> = spool.lock().unwrap_or_else(PoisonError::into_inner).positions();
    loop {
        let received = if unsynced || !positions.is_empty() {
            items.recv_timeout(fsync_interval.saturating_sub(last_sync.elapsed()))
        } else {
            items.recv().map_err(|_| RecvTimeoutError::Disconnected)
        };
        let disconnected = matches!(received, Err(RecvTimeoutError::Disconnected));
        match received {
            Ok(Item::Batch(events, summaries, position)) => {
                positions.remove(&position.path);
                written.insert(position.path.clone(), position.clone());
                with_retry(&spool, |spool| spool.append_batch(&events, &summaries, &position).map(|_| ()));
                stats.batches.fetch_add(1, Ordering::Relaxed);
                unsynced = true;
            }
            Ok(Item::Position(position)) => {
                if written.get(&position.path) != Some(&position) {
                    positions.insert(position.path.clone(), position);
                }
            }
            Err(_) => {}
        }
        if disconnected || last_sync.elapsed() >= fsync_interval {
            if unsynced || !positions.is_empty() {
                let ticket = {
                    let mut guard = spool.lock().unwrap_or_else(PoisonError::into_inner);
                    for (path, position) in positions.drain() {
                        guard.append_position(position.clone())?;
                        written.insert(path, position);
                    }
                    guard.prepare_sync()?
                };
                // The fsync runs without the lock: the uplink reads and acks
                // the spool meanwhile.
                if let Some(ticket) = &ticket {
                    ticket.run()?;
                }
                let seq = {
                    let mut guard = spool.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(ticket) = ticket {
                        guard.complete_sync(ticket);
                    }
                    guard.durable_seq()
                };
                durable.send_replace(seq);
                stats.syncs.fetch_add(1, Ordering::Relaxed);
                unsynced = false;
            }
            last_sync = Instant::now();
        }
        if disconnected {
            return Ok(());
        }
    }
}

/// Retries a spool write until it succeeds (a full disk must not lose the
/// batch); the pipeline behind it waits meanwhile.
fn with_retry(spool: &SharedSpool, mut write: impl FnMut(&mut Spool) -> Result<(), SpoolError>) {
    let mut failing = false;
    loop {
        let result = write(&mut spool.lock().unwrap_or_else(PoisonError::into_inner));
        match result {
            Ok(()) => return,
            Err(error) => {
                if !failing {
                    error!(%error, "Cannot write to the spool; retrying every second.");
                }
                failing = true;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{SpoolOptions, read_all};
    use std::io::Write;

    fn raw_parser() -> impl LineParser {
        |line: &[u8]| {
            let text = std::str::from_utf8(line).ok()?.trim_end();
            text.starts_with("ev").then(|| Event { raw: text.to_owned(), ..Event::default() })
        }
    }

    fn options() -> PipelineOptions {
        PipelineOptions {
            batch_events: 7,
            batch_age: Duration::from_millis(20),
            fsync_interval: Duration::from_millis(10),
            watch: false,
            poll_interval: Duration::from_millis(10),
            ..PipelineOptions::default()
        }
    }

    fn spooled_events(dir: &std::path::Path) -> Vec<String> {
        read_all(dir).unwrap().into_iter().flat_map(|batch| batch.events).map(|event| event.raw).collect()
    }

    fn wait_for(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn lines_reach_the_spool_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let spool_dir = dir.path().join("spool");
        let mut file = std::fs::File::create(&log).unwrap();
        let sources = [SourceSpec { path: log.clone(), start_at: StartAt::Beginning, kind: LogKind::Exim }];
        let mut expected = Vec::new();
        let mut n = 0;
        for round in 0..3 {
            for _ in 0..50 {
                n += 1;
                writeln!(file, "ev {n}").unwrap();
                writeln!(file, "noise {n}").unwrap();
                expected.push(format!("ev {n}"));
            }
            let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(1 << 20)).unwrap();
            let pipeline = Pipeline::start(spool, &sources, |_| raw_parser(), options()).unwrap();
            let durable = pipeline.durable();
            wait_for(|| pipeline.stats().lines.load(Ordering::Relaxed) >= 100);
            if round == 1 {
                // Lines after the last event: only a position record covers them.
                writeln!(file, "noise only").unwrap();
            }
            pipeline.shutdown().unwrap();
            assert!(*durable.borrow() > 0);
        }
        assert_eq!(spooled_events(&spool_dir), expected);
        let snapshot = crate::spool::inspect(&spool_dir).unwrap();
        let end = std::fs::metadata(&log).unwrap().len();
        assert_eq!(snapshot.positions[&log.to_string_lossy().into_owned()].offset, end);
    }

    #[test]
    fn age_cuts_a_small_batch() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "ev 1\n").unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let sources = [SourceSpec { path: log, start_at: StartAt::Beginning, kind: LogKind::Exim }];
        let options = PipelineOptions { batch_events: 1000, batch_age: Duration::from_millis(50), ..options() };
        let pipeline = Pipeline::start(spool, &sources, |_| raw_parser(), options).unwrap();
        let mut durable = pipeline.durable();
        let started = Instant::now();
        wait_for(|| *durable.borrow_and_update() >= 1);
        assert!(started.elapsed() < Duration::from_secs(2));
        let batches = pipeline.spool().lock().unwrap().read_batches(0, 10).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].events.len(), 1);
        pipeline.shutdown().unwrap();
    }

    #[test]
    fn count_cuts_batches_of_batch_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let text: String = (1..=70).map(|n| format!("ev {n}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let sources = [SourceSpec { path: log, start_at: StartAt::Beginning, kind: LogKind::Exim }];
        let options = PipelineOptions { batch_events: 7, batch_age: Duration::from_secs(60), ..options() };
        let pipeline = Pipeline::start(spool, &sources, |_| raw_parser(), options).unwrap();
        wait_for(|| pipeline.stats().batches.load(Ordering::Relaxed) >= 10);
        pipeline.shutdown().unwrap();
        let batches: Vec<_> =
            read_all(&dir.path().join("spool")).unwrap().into_iter().filter(|b| !b.events.is_empty()).collect();
        assert_eq!(batches.len(), 10);
        assert!(batches.iter().all(|batch| batch.events.len() == 7));
        assert_eq!(batches.iter().map(|b| b.seq).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    }

    /// `ctx <ip> <time_ms>` is a connect, `abuse <ip> <time_ms>` an auth
    /// failure, anything else no event.
    fn kind_parser() -> impl LineParser {
        |line: &[u8]| {
            let text = std::str::from_utf8(line).ok()?.trim_end();
            let mut words = text.split(' ');
            let kind = match words.next()? {
                "ctx" => EventKind::Connect,
                "abuse" => EventKind::AuthFailed,
                "acc" => EventKind::Accepted,
                _ => return None,
            };
            let remote: std::net::IpAddr = words.next()?.parse().ok()?;
            let time_ms: i64 = words.next()?.parse().ok()?;
            Some(Event { kind: kind as i32, remote: Some(remote.into()), time_ms, ..Event::default() })
        }
    }

    /// Per (address, kind): lines, from individual events and summaries.
    fn spooled_counts(dir: &std::path::Path) -> std::collections::BTreeMap<(String, i32), u64> {
        let mut out = std::collections::BTreeMap::new();
        for batch in read_all(dir).unwrap() {
            for event in batch.events {
                let ip = std::net::IpAddr::try_from(event.remote.as_ref().unwrap()).unwrap();
                *out.entry((ip.to_string(), event.kind)).or_default() += 1;
            }
            for summary in batch.summaries {
                let ip = std::net::IpAddr::try_from(summary.remote.as_ref().unwrap()).unwrap();
                for count in summary.counts {
                    *out.entry((ip.to_string(), count.kind)).or_default() += u64::from(count.lines);
                }
            }
        }
        out
    }

    #[test]
    fn summaries_survive_kill_9_restarts_without_loss_or_double_counting() {
        kill_9_restarts(Duration::ZERO);
    }

    /// Summaries held for the fleet's spread (here: until the shutdown) are
    /// covered by `open_from` in every record written meanwhile.
    #[test]
    fn held_summaries_survive_kill_9_restarts_without_loss_or_double_counting() {
        kill_9_restarts(Duration::from_secs(600));
    }

    fn kill_9_restarts(summary_delay: Duration) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let spool_dir = dir.path().join("spool");
        let key = log.to_string_lossy().into_owned();
        let mut file = std::fs::File::create(&log).unwrap();
        let sources = [SourceSpec { path: log.clone(), start_at: StartAt::Beginning, kind: LogKind::Exim }];
        // Times in the current and the next interval: the wall clock does
        // not flush them, so the kills find summaries open.
        let base = now_ms().div_euclid(60_000) * 60_000;
        let options = PipelineOptions { batch_events: 5, summary_delay, ..options() };
        let mut expected: std::collections::BTreeMap<(String, i32), u64> = Default::default();
        let (mut killed_open, mut killed_held) = (0, 0);
        // Where the lines of the second interval begin.
        let mut second_from = u64::MAX;
        for round in 0..6u32 {
            if round == 3 {
                second_from = std::fs::metadata(&log).unwrap().len();
            }
            let interval = if round < 3 { base } else { base + 60_000 };
            for n in 0..30u32 {
                let ip = format!("192.0.2.{}", n % 4);
                let time = interval + i64::from(round * 1000 + n);
                if n % 7 == 3 {
                    writeln!(file, "abuse {ip} {time}").unwrap();
                    *expected.entry((ip, EventKind::AuthFailed as i32)).or_default() += 1;
                } else if n % 6 == 1 {
                    // The first of an address's interval goes out alone.
                    writeln!(file, "acc {ip} {time}").unwrap();
                    *expected.entry((ip, EventKind::Accepted as i32)).or_default() += 1;
                } else {
                    writeln!(file, "ctx {ip} {time}").unwrap();
                    *expected.entry((ip, EventKind::Connect as i32)).or_default() += 1;
                }
                if n % 5 == 0 {
                    writeln!(file, "noise {n}").unwrap();
                }
            }
            let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(1 << 20)).unwrap();
            let pipeline = Pipeline::start(spool, &sources, |_| kind_parser(), options).unwrap();
            // Only new lines are counted (replayed ones are not).
            wait_for(|| pipeline.stats().lines.load(Ordering::Relaxed) >= 36);
            wait_for(|| pipeline.stats().batches.load(Ordering::Relaxed) >= 1);
            pipeline.kill().unwrap();
            let position = crate::spool::inspect(&spool_dir).unwrap().positions[&key].clone();
            if position.open_from.is_some() {
                killed_open += 1;
            }
            if position.open_from.is_some_and(|from| from < second_from) && position.offset > second_from {
                killed_held += 1;
            }
        }
        assert!(killed_open >= 3, "the kills must find open summaries to be a test ({killed_open})");
        if summary_delay > Duration::from_secs(60) {
            assert_eq!(killed_held, 3, "every kill in the second interval finds the first one's summaries held");
        }
        // Nothing was flushed at a shutdown yet: a clean stop sends the rest
        // (once the replay is through: one more line comes after it).
        writeln!(file, "ctx 192.0.2.9 {}", base + 60_000).unwrap();
        *expected.entry(("192.0.2.9".into(), EventKind::Connect as i32)).or_default() += 1;
        let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let pipeline = Pipeline::start(spool, &sources, |_| kind_parser(), options).unwrap();
        wait_for(|| pipeline.stats().lines.load(Ordering::Relaxed) >= 1);
        pipeline.shutdown().unwrap();
        assert_eq!(spooled_counts(&spool_dir), expected);
        let records = read_all(&spool_dir).unwrap();
        assert!(records.iter().any(|b| !b.summaries.is_empty()));
        if summary_delay > Duration::from_secs(60) {
            let with_summaries: Vec<u64> = records.iter().filter(|b| !b.summaries.is_empty()).map(|b| b.seq).collect();
            assert_eq!(with_summaries.len(), 1, "held until the shutdown, sent once: {with_summaries:?}");
        }
        assert!(
            records.iter().flat_map(|b| &b.events).all(|e| e.kind != EventKind::Connect as i32),
            "connects never travel as single events"
        );
        let position = crate::spool::inspect(&spool_dir).unwrap().positions[&key].clone();
        assert_eq!(position.open_from, None, "a shutdown flushes every open summary");
    }

    #[test]
    fn summaries_of_an_ended_interval_wait_for_this_agents_delay() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let spool_dir = dir.path().join("spool");
        let base = now_ms().div_euclid(60_000) * 60_000 - 60_000;
        let mut text: String = (0..10).map(|n| format!("ctx 192.0.2.{} {}\n", n % 3, base + n)).collect();
        // The next interval begins (its first line flushes the first one's
        // summaries), with an abuse line that goes out at once.
        text.push_str(&format!("ctx 192.0.2.1 {}\nabuse 203.0.113.5 {}\n", base + 60_000, base + 60_001));
        std::fs::write(&log, text).unwrap();
        let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let sources = [SourceSpec { path: log, start_at: StartAt::Beginning, kind: LogKind::Exim }];
        let delay = Duration::from_millis(1500);
        let options = PipelineOptions { summary_delay: delay, ..options() };
        let started = Instant::now();
        let pipeline = Pipeline::start(spool, &sources, |_| kind_parser(), options).unwrap();
        let batches = || pipeline.spool().lock().unwrap().read_batches(0, 10).unwrap();
        wait_for(|| !batches().is_empty());
        let first = batches();
        assert_eq!(first[0].events.len(), 1, "the abuse line");
        assert!(first[0].summaries.is_empty(), "the summaries are held");
        wait_for(|| batches().iter().any(|b| !b.summaries.is_empty()));
        assert!(started.elapsed() >= delay, "held for the delay ({:?})", started.elapsed());
        let lines: u32 = batches().iter().flat_map(|b| &b.summaries).flat_map(|s| &s.counts).map(|c| c.lines).sum();
        assert_eq!(lines, 10, "every line of the ended interval");
        pipeline.shutdown().unwrap();
    }

    #[test]
    fn the_delay_is_spread_over_at_most_half_the_interval() {
        let config = |interval_secs, spread_secs| AggregateConfig { interval_secs, spread_secs, ..Default::default() };
        let delays: Vec<Duration> = (0..200).map(|_| summary_delay(&config(60, 30))).collect();
        assert!(delays.iter().all(|d| *d < Duration::from_secs(30)));
        assert!(
            delays.iter().any(|d| *d < Duration::from_secs(10)) && delays.iter().any(|d| *d > Duration::from_secs(20))
        );
        assert!((0..50).all(|_| summary_delay(&config(10, 30)) < Duration::from_secs(5)));
        assert_eq!(summary_delay(&config(60, 0)), Duration::ZERO);
        assert_eq!(summary_delay(&config(1, 30)), Duration::ZERO);
    }

    /// A legitimate sender's accepted mail waits for the context age; when
    /// the same address then fails a login on this host (a user mistyping
    /// a password on an office NAT that also delivers mail), the abuse line
    /// is sent within `batch_age` and the standing line travels with it,
    /// ahead of it.
    #[test]
    fn context_waits_and_an_abuse_line_goes_out_at_once_behind_the_standing_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let spool_dir = dir.path().join("spool");
        std::fs::write(&log, "").unwrap();
        let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let sources = [SourceSpec { path: log.clone(), start_at: StartAt::Beginning, kind: LogKind::Exim }];
        let options = PipelineOptions {
            batch_age: Duration::from_millis(100),
            context_batch_age: Duration::from_millis(1500),
            ..options()
        };
        let pipeline = Pipeline::start(spool, &sources, |_| kind_parser(), options).unwrap();
        let batches = || pipeline.stats().batches.load(Ordering::Relaxed);
        let append = |line: String| {
            let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            writeln!(file, "{line}").unwrap();
        };

        append(format!("acc 192.0.2.7 {}", now_ms()));
        wait_for(|| pipeline.stats().lines.load(Ordering::Relaxed) >= 1);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(batches(), 0, "a batch of context only waits for the context age");
        append(format!("abuse 192.0.2.7 {}", now_ms()));
        let written = Instant::now();
        wait_for(|| batches() >= 1);
        assert!(
            written.elapsed() < Duration::from_millis(900),
            "an abuse line is sent after batch_age, not the context age ({:?})",
            written.elapsed()
        );

        append(format!("acc 198.51.100.1 {}", now_ms()));
        let written = Instant::now();
        wait_for(|| batches() >= 2);
        assert!(
            written.elapsed() >= Duration::from_millis(1300),
            "context alone is sent after the context age ({:?})",
            written.elapsed()
        );
        pipeline.shutdown().unwrap();

        let records: Vec<_> = read_all(&spool_dir).unwrap().into_iter().filter(|b| !b.events.is_empty()).collect();
        let kinds: Vec<Vec<i32>> = records.iter().map(|b| b.events.iter().map(|e| e.kind).collect()).collect();
        assert_eq!(
            kinds,
            vec![vec![EventKind::Accepted as i32, EventKind::AuthFailed as i32], vec![EventKind::Accepted as i32]],
            "the standing line goes out with the abuse line, ahead of it"
        );
    }

    #[test]
    fn without_aggregation_every_event_is_individual() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let now = now_ms();
        let text: String = (0..20).map(|n| format!("ctx 192.0.2.{} {now}\n", n % 3)).collect();
        std::fs::write(&log, text).unwrap();
        let (spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let sources = [SourceSpec { path: log, start_at: StartAt::Beginning, kind: LogKind::Exim }];
        let aggregate = AggregateConfig { enabled: false, ..AggregateConfig::default() };
        let pipeline =
            Pipeline::start(spool, &sources, |_| kind_parser(), PipelineOptions { aggregate, ..options() }).unwrap();
        wait_for(|| pipeline.stats().lines.load(Ordering::Relaxed) >= 20);
        pipeline.shutdown().unwrap();
        let records = read_all(&dir.path().join("spool")).unwrap();
        assert_eq!(records.iter().map(|b| b.events.len()).sum::<usize>(), 20);
        assert!(records.iter().all(|b| b.summaries.is_empty()));
    }

    #[test]
    fn two_sources_keep_their_own_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
        let sources: Vec<SourceSpec> = logs
            .iter()
            .map(|path| SourceSpec { path: path.clone(), start_at: StartAt::Beginning, kind: LogKind::Exim })
            .collect();
        for round in 0..2 {
            for (index, log) in logs.iter().enumerate() {
                let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
                for n in 0..20 {
                    writeln!(file, "ev {index}-{round}-{n}").unwrap();
                }
            }
            let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(1 << 20)).unwrap();
            let pipeline = Pipeline::start(spool, &sources, |_| raw_parser(), options()).unwrap();
            wait_for(|| pipeline.stats().lines.load(Ordering::Relaxed) >= 40);
            pipeline.shutdown().unwrap();
        }
        let mut events = spooled_events(&spool_dir);
        events.sort();
        let mut expected: Vec<String> = (0..2)
            .flat_map(|index| (0..2).flat_map(move |round| (0..20).map(move |n| format!("ev {index}-{round}-{n}"))))
            .collect();
        expected.sort();
        assert_eq!(events, expected);
        let positions = crate::spool::inspect(&spool_dir).unwrap().positions;
        for log in &logs {
            let key = log.to_string_lossy().into_owned();
            assert_eq!(positions[&key].offset, std::fs::metadata(log).unwrap().len());
        }
    }
}
