//! The spool: an append-only on-disk log of event batches.
//!
//! Everything the agent parsed goes through here before it may be sent, so a
//! crash, a server outage or a network partition loses nothing. The spool is
//! a directory of segment files (`<id>.seg`, ids increasing). Each segment
//! starts with an 8-byte magic and holds records:
//!
//! ```text
//! u32 LE payload length | u32 LE CRC32C of payload | payload (prost `EventBatch`)
//! ```
//!
//! A record is either a *batch* (non-empty `events` or context `summaries`,
//! a new strictly increasing `seq`) or a *position* record (neither, `seq`
//! equal to the last batch seq) that only moves a source's checkpoint forward
//! when lines produced nothing to send. Every record carries the
//! [`SourcePosition`] its source had reached after the last line it covers,
//! so the newest record of a source is that source's checkpoint: a restart
//! resumes there, never re-reading what was spooled and never skipping what
//! was not. With aggregation the position also says from which line the
//! context still held in open summaries was read (`open_from`), and the
//! pipeline re-counts those lines' context after a restart. Records of older
//! agents have neither field and read as before.
//!
//! Invariants:
//! - Records are only appended; [`Spool::sync`] makes everything appended so
//!   far durable (group commit), and only durable batches are offered to the
//!   uplink ([`Spool::read_batches`]).
//! - On open, every segment is scanned; the first record whose length or
//!   CRC does not check out (a torn write or bit rot) is cut off together
//!   with everything after it in that segment, and reported.
//! - The newest segment is never deleted, so the newest checkpoint survives;
//!   before an older segment is deleted (acked or dropped), the checkpoints
//!   it holds that are not repeated later are re-appended.
//! - Size is bounded by `max_bytes`: when it is exceeded the oldest segment is
//!   dropped and its unacknowledged batches and events are counted as lost,
//!   logged, and kept in the persistent loss counters until reported.
//! - A seq is never used twice: the state file reserves seqs ahead of the
//!   batches that take them (`seq_reserved`), and a reopened spool starts
//!   after the reservation, whatever was lost from the segments.
//! - One process owns a spool at a time (an exclusive lock on `lock`);
//!   [`inspect`] reads it without the lock and without changing it.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fleetban_proto::v1::{ContextSummary, Event, EventBatch, SourcePosition};
use prost::Message;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// First bytes of every segment file.
const MAGIC: &[u8; 8] = b"FBSPOOL1";
/// Size of a record header: length and CRC32C.
const HEADER_BYTES: usize = 8;
/// Records larger than this are treated as corrupt (a batch of 1000 events
/// is well below 1 MiB).
pub const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;
/// Positions under this path prefix record imports (`backfill`), not live
/// sources: they are not checkpoints and are not carried forward.
pub const BACKFILL_PREFIX: &str = "backfill:";
const STATE_FILE: &str = "state.json";
const STATE_TMP: &str = "state.json.tmp";
const LOCK_FILE: &str = "lock";

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// An I/O operation on a spool file failed.
    #[error("spool I/O on {path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Another process holds the spool.
    #[error("spool {0} is in use by another fleetban-agent process")]
    Locked(PathBuf),
    /// A batch is too large to be one record.
    #[error("batch of {0} bytes exceeds the record limit")]
    TooLarge(usize),
    /// The state file was written by a newer agent.
    #[error(
        "spool state {path} is format {found}, written by a newer fleetban-agent; this one reads up to format \
         {supported}: upgrade the agent (the spool is left as it is)"
    )]
    Format {
        /// The state file.
        path: PathBuf,
        /// Its format.
        found: u32,
        /// The newest this agent reads.
        supported: u32,
    },
}

/// Format of the spool's `state.json` this agent writes and the newest it
/// reads (0 = written before formats were numbered; read as 1).
const STATE_FORMAT: u32 = 1;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.to_owned(), error: source }
}

/// An fsync prepared by [`Spool::prepare_sync`], run without the spool.
#[derive(Debug)]
pub struct SyncTicket {
    /// A second handle of the active segment (the same open file).
    file: File,
    path: PathBuf,
    /// The newest seq written when it was prepared.
    seq: u64,
    writes: u64,
}

impl SyncTicket {
    /// Makes the segment's data durable (one fsync).
    pub fn run(&self) -> Result<(), SpoolError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// Size limits of a spool.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// Upper bound of all segments together, in bytes.
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_bytes: u64,
}

impl SpoolOptions {
    /// Options for a bound of `max_bytes`; segments are a sixteenth of it,
    /// between 64 KiB and 32 MiB, so dropping one loses a small share.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self { max_bytes, segment_bytes: (max_bytes / 16).clamp(64 * 1024, 32 * 1024 * 1024) }
    }
}

/// Persistent counters that live beside the segments.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
struct State {
    /// Highest batch seq the server acknowledged.
    acked_seq: u64,
    /// Events dropped because the spool was full, ever.
    dropped_events: u64,
    /// Batches dropped because the spool was full, ever.
    dropped_batches: u64,
    /// Dropped events not yet reported to the server.
    unreported_events: u64,
    /// Dropped batches not yet reported to the server.
    unreported_batches: u64,
    /// Every seq up to this one may have been handed out: written before a
    /// batch beyond it is, so a reopened spool never reuses a seq even when
    /// the records that carried it were lost after they were sent (bit rot
    /// cut off on open, a lost segment file). Absent in older state files.
    #[serde(default)]
    seq_reserved: u64,
    /// Format of the file ([`STATE_FORMAT`]); 0 in older files.
    #[serde(default)]
    format: u32,
}

/// Seqs reserved at a time ([`State::seq_reserved`]): the state file is
/// rewritten once per this many batches, and a reopened spool skips at most
/// this many seqs (the server accepts gaps up to a million).
const SEQ_RESERVE: u64 = 4096;

/// One batch record's place in a segment.
#[derive(Debug, Clone, Copy)]
struct BatchIndex {
    seq: u64,
    offset: u64,
    len: u32,
    events: u32,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    path: PathBuf,
    bytes: u64,
    batches: Vec<BatchIndex>,
}

impl Segment {
    fn last_seq(&self) -> u64 {
        self.batches.last().map_or(0, |batch| batch.seq)
    }
}

/// A damaged record found (and, when opened for writing, cut off) on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub segment: PathBuf,
    /// Offset of the first bad record; the segment now ends here.
    pub offset: u64,
    /// Bytes removed from the segment.
    pub cut_bytes: u64,
    /// What was wrong.
    pub reason: &'static str,
}

/// What opening a spool found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Damaged records that were cut off.
    pub damage: Vec<Damage>,
    /// Intact records read.
    pub records: u64,
}

/// Counters for `fleetban-agent status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpoolStatus {
    /// Batches spooled and not acknowledged.
    pub pending_batches: u64,
    /// Events in those batches.
    pub pending_events: u64,
    /// Bytes on disk (all segments).
    pub bytes: u64,
    /// Events dropped because the spool was full, since the spool was created.
    pub dropped_events: u64,
}

/// Losses to report to the server (`SpoolLoss`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loss {
    /// Events dropped since the last report.
    pub events: u64,
    /// Batches dropped since the last report.
    pub batches: u64,
}

/// An open, writable spool. See the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    options: SpoolOptions,
    segments: VecDeque<Segment>,
    /// Append handle of the newest segment; `None` until the first append
    /// after open or after a roll.
    active: Option<File>,
    /// A roll was requested: the next append starts a new segment.
    roll: bool,
    next_seq: u64,
    durable_seq: u64,
    dirty: bool,
    /// Records written since open (a [`SyncTicket`] knows whether any came
    /// after it).
    writes: u64,
    state: State,
    /// Newest checkpoint of each source, and the segment it is stored in.
    positions: HashMap<String, (SourcePosition, u64)>,
    buffer: Vec<u8>,
    _lock: File,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, cutting off damaged
    /// records. Fails if another process holds it.
    pub fn open(dir: &Path, options: SpoolOptions) -> Result<(Self, Recovery), SpoolError> {
        // Events hold addresses and log lines: the spool is private to the agent.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked(dir.to_owned())),
            Err(std::fs::TryLockError::Error(source)) => return Err(SpoolError::Io { path: lock_path, error: source }),
        }
        let state = read_state(dir, true)?;
        let scan = scan(dir, true)?;
        for damage in &scan.recovery.damage {
            warn!(
                segment = %damage.segment.display(),
                offset = damage.offset,
                cut_bytes = damage.cut_bytes,
                reason = damage.reason,
                "Spool record damaged; cut it and everything after it in the segment."
            );
        }
        let next_seq = scan.max_seq.max(state.acked_seq).max(state.seq_reserved) + 1;
        let mut spool = Spool {
            dir: dir.to_owned(),
            options,
            segments: scan.segments,
            active: None,
            roll: false,
            next_seq,
            durable_seq: next_seq - 1,
            dirty: false,
            writes: 0,
            state,
            positions: scan.positions,
            buffer: Vec::with_capacity(64 * 1024),
            _lock: lock,
        };
        // Segments fully acknowledged before a crash may still be on disk.
        spool.delete_acked()?;
        if !spool.segments.is_empty() {
            info!(
                segments = spool.segments.len(),
                records = scan.recovery.records,
                next_seq = spool.next_seq,
                "Spool opened."
            );
        }
        Ok((spool, scan.recovery))
    }

    /// The directory of this spool.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest checkpoint of every source, by configured path.
    pub fn positions(&self) -> HashMap<String, SourcePosition> {
        self.positions.iter().map(|(path, (position, _))| (path.clone(), position.clone())).collect()
    }

    /// The seq the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Highest seq that is durable on disk (synced).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Highest seq acknowledged by the server.
    pub fn acked_seq(&self) -> u64 {
        self.state.acked_seq
    }

    /// True if records were appended since the last [`Spool::sync`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Appends one batch of events that ends at `position`; returns its seq.
    /// Not durable until [`Spool::sync`]. An empty batch is a position record.
    pub fn append(&mut self, events: &[Event], position: &SourcePosition) -> Result<u64, SpoolError> {
        self.append_batch(events, &[], position)
    }

    /// [`Spool::append`] with context summaries: a batch with events or
    /// summaries takes a seq; one with neither is a position record.
    pub fn append_batch(
        &mut self,
        events: &[Event],
        summaries: &[ContextSummary],
        position: &SourcePosition,
    ) -> Result<u64, SpoolError> {
        if events.is_empty() && summaries.is_empty() {
            self.append_position(position.clone())?;
            return Ok(self.next_seq - 1);
        }
        let seq = self.next_seq;
        if seq > self.state.seq_reserved {
            self.state.seq_reserved = seq + SEQ_RESERVE - 1;
            write_state(&self.dir, &self.state)?;
        }
        let (segment_id, offset, len) = self.write_record(seq, events, summaries, position)?;
        self.next_seq += 1;
        if let Some(segment) = self.segments.back_mut() {
            segment.batches.push(BatchIndex { seq, offset, len, events: record_items(events.len(), summaries.len()) });
        }
        self.positions.insert(position.path.clone(), (position.clone(), segment_id));
        self.enforce_bound()?;
        Ok(seq)
    }

    /// Appends a position-only record: the source reached `position` and the
    /// lines since its previous record produced no events.
    pub fn append_position(&mut self, position: SourcePosition) -> Result<(), SpoolError> {
        let (segment_id, _, _) = self.write_record(self.next_seq - 1, &[], &[], &position)?;
        self.positions.insert(position.path.clone(), (position, segment_id));
        Ok(())
    }

    /// Makes everything appended so far durable (one fsync).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if !self.dirty {
            return Ok(());
        }
        if let (Some(file), Some(segment)) = (&self.active, self.segments.back()) {
            file.sync_data().map_err(io_err(&segment.path))?;
        }
        self.dirty = false;
        self.durable_seq = self.next_seq - 1;
        Ok(())
    }

    /// Prepares an fsync of everything appended so far that runs without
    /// the spool (its lock): appends go on while the disk syncs, and
    /// [`Spool::complete_sync`] then records what became durable. `None`:
    /// nothing to sync.
    pub fn prepare_sync(&mut self) -> Result<Option<SyncTicket>, SpoolError> {
        if !self.dirty {
            return Ok(None);
        }
        let (Some(file), Some(segment)) = (&self.active, self.segments.back()) else {
            // Nothing written since the last roll (which synced).
            self.dirty = false;
            self.durable_seq = self.next_seq - 1;
            return Ok(None);
        };
        let file = file.try_clone().map_err(io_err(&segment.path))?;
        Ok(Some(SyncTicket { file, path: segment.path.clone(), seq: self.next_seq - 1, writes: self.writes }))
    }

    /// Records a [`SyncTicket`] that ran: its seq is durable, and the spool is
    /// clean unless something was written after it was prepared. (A roll in
    /// between synced the closing segment itself.)
    pub fn complete_sync(&mut self, ticket: SyncTicket) {
        self.durable_seq = self.durable_seq.max(ticket.seq);
        if self.writes == ticket.writes {
            self.dirty = false;
        }
    }

    /// Writes one record, encoded exactly as an `EventBatch` message (without
    /// copying the events into one).
    fn write_record(
        &mut self,
        seq: u64,
        events: &[Event],
        summaries: &[ContextSummary],
        position: &SourcePosition,
    ) -> Result<(u64, u64, u32), SpoolError> {
        self.buffer.clear();
        self.buffer.extend_from_slice(&[0; HEADER_BYTES]);
        // Same field numbers as `EventBatch`; encoding into a Vec cannot fail.
        if seq != 0 {
            prost::encoding::uint64::encode(1, &seq, &mut self.buffer);
        }
        prost::encoding::message::encode_repeated(2, events, &mut self.buffer);
        prost::encoding::message::encode(3, position, &mut self.buffer);
        prost::encoding::message::encode_repeated(16, summaries, &mut self.buffer);
        let len = self.buffer.len() - HEADER_BYTES;
        if len > MAX_RECORD_BYTES as usize {
            return Err(SpoolError::TooLarge(len));
        }
        let crc = crc32c::crc32c(&self.buffer[HEADER_BYTES..]);
        self.buffer[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.buffer[4..8].copy_from_slice(&crc.to_le_bytes());

        if self.active.is_none() || self.roll {
            self.start_segment()?;
        }
        let (Some(file), Some(segment)) = (self.active.as_mut(), self.segments.back_mut()) else {
            // start_segment always leaves an active segment.
            return Err(SpoolError::Io { path: self.dir.clone(), error: std::io::ErrorKind::NotFound.into() });
        };
        let offset = segment.bytes;
        if let Err(source) = file.write_all(&self.buffer) {
            // Never leave a partial record in front of later ones.
            let _ = file.set_len(offset);
            return Err(SpoolError::Io { path: segment.path.clone(), error: source });
        }
        segment.bytes += self.buffer.len() as u64;
        self.dirty = true;
        self.writes += 1;
        if segment.bytes >= self.options.segment_bytes {
            self.roll = true;
        }
        Ok((segment.id, offset, len as u32))
    }

    /// Opens the newest segment for appending, or starts a new one if a roll
    /// is due or there is none.
    fn start_segment(&mut self) -> Result<(), SpoolError> {
        if !self.roll
            && let Some(segment) = self.segments.back()
        {
            let file = OpenOptions::new().append(true).open(&segment.path).map_err(io_err(&segment.path))?;
            self.active = Some(file);
            return Ok(());
        }
        // Make the closing segment durable before it stops being the active one.
        self.sync()?;
        let id = self.segments.back().map_or(1, |segment| segment.id + 1);
        let path = self.dir.join(format!("{id:016}.seg"));
        let mut file = OpenOptions::new().create(true).truncate(true).write(true).open(&path).map_err(io_err(&path))?;
        file.write_all(MAGIC).map_err(io_err(&path))?;
        file.sync_data().map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.segments.push_back(Segment { id, path, bytes: MAGIC.len() as u64, batches: Vec::new() });
        self.active = Some(file);
        self.roll = false;
        Ok(())
    }

    /// Drops the oldest segments while the spool is over its bound.
    fn enforce_bound(&mut self) -> Result<(), SpoolError> {
        while self.total_bytes() > self.options.max_bytes && self.segments.len() > 1 {
            let Some(oldest) = self.segments.front() else { break };
            let acked = self.state.acked_seq;
            let lost: Vec<&BatchIndex> = oldest.batches.iter().filter(|batch| batch.seq > acked).collect();
            let events: u64 = lost.iter().map(|batch| u64::from(batch.events)).sum();
            let batches = lost.len() as u64;
            let segment = oldest.path.clone();
            self.remove_oldest_segment()?;
            if batches > 0 {
                self.state.dropped_events += events;
                self.state.dropped_batches += batches;
                self.state.unreported_events += events;
                self.state.unreported_batches += batches;
                write_state(&self.dir, &self.state)?;
                warn!(
                    segment = %segment.display(),
                    dropped_events = events,
                    dropped_batches = batches,
                    total_dropped_events = self.state.dropped_events,
                    "Spool full; dropped the oldest unacknowledged segment."
                );
            }
        }
        Ok(())
    }

    /// Deletes the oldest segment, first re-appending (durably) the
    /// checkpoints stored only in it.
    fn remove_oldest_segment(&mut self) -> Result<(), SpoolError> {
        let Some(oldest_id) = self.segments.front().map(|segment| segment.id) else { return Ok(()) };
        let carried: Vec<SourcePosition> = self
            .positions
            .values()
            .filter(|(position, segment)| *segment == oldest_id && !position.path.starts_with(BACKFILL_PREFIX))
            .map(|(position, _)| position.clone())
            .collect();
        for position in carried {
            self.append_position(position)?;
        }
        self.positions.retain(|_, (_, segment)| *segment != oldest_id);
        self.sync()?;
        if let Some(segment) = self.segments.pop_front() {
            std::fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
        }
        Ok(())
    }

    /// Records that the server stored every batch up to `seq`, and deletes
    /// the segments that hold nothing newer (the newest segment is kept).
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.state.acked_seq {
            return Ok(());
        }
        self.state.acked_seq = seq.min(self.durable_seq);
        write_state(&self.dir, &self.state)?;
        self.delete_acked()
    }

    fn delete_acked(&mut self) -> Result<(), SpoolError> {
        while self.segments.len() > 1
            && self.segments.front().is_some_and(|segment| segment.last_seq() <= self.state.acked_seq)
        {
            self.remove_oldest_segment()?;
        }
        Ok(())
    }

    /// Up to `max` durable batches with a seq greater than `after`, oldest
    /// first: what the uplink sends next.
    pub fn read_batches(&self, after: u64, max: usize) -> Result<Vec<EventBatch>, SpoolError> {
        let mut out = Vec::new();
        for segment in &self.segments {
            if segment.last_seq() <= after {
                continue;
            }
            let mut file = File::open(&segment.path).map_err(io_err(&segment.path))?;
            for index in segment.batches.iter().filter(|batch| batch.seq > after && batch.seq <= self.durable_seq) {
                if out.len() >= max {
                    return Ok(out);
                }
                let mut payload = vec![0; index.len as usize];
                file.seek(SeekFrom::Start(index.offset + HEADER_BYTES as u64)).map_err(io_err(&segment.path))?;
                file.read_exact(&mut payload).map_err(io_err(&segment.path))?;
                let batch = EventBatch::decode(payload.as_slice()).map_err(|error| SpoolError::Io {
                    path: segment.path.clone(),
                    error: std::io::Error::new(std::io::ErrorKind::InvalidData, error),
                })?;
                out.push(batch);
            }
        }
        Ok(out)
    }

    /// Counters for `status`.
    pub fn status(&self) -> SpoolStatus {
        status_of(&self.segments, &self.state)
    }

    /// Losses not yet reported to the server; they stay pending until
    /// [`Spool::loss_reported`] is called with the same value.
    pub fn unreported_loss(&self) -> Loss {
        Loss { events: self.state.unreported_events, batches: self.state.unreported_batches }
    }

    /// The server received the loss report `loss`.
    pub fn loss_reported(&mut self, loss: Loss) -> Result<(), SpoolError> {
        self.state.unreported_events = self.state.unreported_events.saturating_sub(loss.events);
        self.state.unreported_batches = self.state.unreported_batches.saturating_sub(loss.batches);
        write_state(&self.dir, &self.state)
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|segment| segment.bytes).sum()
    }
}

fn status_of(segments: &VecDeque<Segment>, state: &State) -> SpoolStatus {
    let mut status = SpoolStatus { dropped_events: state.dropped_events, ..SpoolStatus::default() };
    for segment in segments {
        status.bytes += segment.bytes;
        for batch in segment.batches.iter().filter(|batch| batch.seq > state.acked_seq) {
            status.pending_batches += 1;
            status.pending_events += u64::from(batch.events);
        }
    }
    status
}

/// A read-only view of a spool, for `status` while the agent may be running.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Counters.
    pub status: SpoolStatus,
    /// Newest checkpoint of each source.
    pub positions: HashMap<String, SourcePosition>,
    /// Highest acknowledged seq.
    pub acked_seq: u64,
    /// Highest seq on disk.
    pub last_seq: u64,
    /// Damaged records seen (not cut: the snapshot changes nothing).
    pub damage: Vec<Damage>,
}

/// Reads a spool without locking or changing it. A torn record at the very
/// end may be a write in progress and is ignored.
pub fn inspect(dir: &Path) -> Result<Snapshot, SpoolError> {
    let state = read_state(dir, false)?;
    let scan = scan(dir, false)?;
    Ok(Snapshot {
        status: status_of(&scan.segments, &state),
        positions: scan.positions.into_iter().map(|(path, (position, _))| (path, position)).collect(),
        acked_seq: state.acked_seq,
        last_seq: scan.max_seq,
        damage: scan.recovery.damage,
    })
}

/// Every intact record of a spool in order (batches and position records),
/// for tests and tools. Reads without locking; stops at the first bad record
/// of each segment.
pub fn read_all(dir: &Path) -> Result<Vec<EventBatch>, SpoolError> {
    let mut out = Vec::new();
    for (_, path) in list_segments(dir)? {
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let mut offset = MAGIC.len();
        while let Ok((batch, next)) = decode_record(&bytes, offset) {
            out.push(batch);
            offset = next;
        }
    }
    Ok(out)
}

struct Scan {
    segments: VecDeque<Segment>,
    positions: HashMap<String, (SourcePosition, u64)>,
    max_seq: u64,
    recovery: Recovery,
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(SpoolError::Io { path: dir.to_owned(), error: source }),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name.strip_suffix(".seg").and_then(|stem| stem.parse::<u64>().ok()) {
            out.push((id, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Decodes the record at `offset`; returns it and the offset after it.
fn decode_record(bytes: &[u8], offset: usize) -> Result<(EventBatch, usize), &'static str> {
    let rest = &bytes[offset.min(bytes.len())..];
    if rest.is_empty() {
        return Err("end");
    }
    if rest.len() < HEADER_BYTES {
        return Err("truncated record header");
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len > MAX_RECORD_BYTES {
        return Err("record length out of range");
    }
    let end = HEADER_BYTES + len as usize;
    if rest.len() < end {
        return Err("truncated record");
    }
    let payload = &rest[HEADER_BYTES..end];
    if crc32c::crc32c(payload) != crc {
        return Err("CRC mismatch");
    }
    let batch = EventBatch::decode(payload).map_err(|_| "undecodable record")?;
    Ok((batch, offset + end))
}

fn scan(dir: &Path, repair: bool) -> Result<Scan, SpoolError> {
    let mut scan =
        Scan { segments: VecDeque::new(), positions: HashMap::new(), max_seq: 0, recovery: Recovery::default() };
    let listed = list_segments(dir)?;
    let count = listed.len();
    for (index, (id, path)) in listed.into_iter().enumerate() {
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            // A segment whose creation was interrupted, or not ours.
            if repair {
                if !bytes.is_empty() {
                    warn!(segment = %path.display(), "Spool segment has no valid header; removing it.");
                    scan.recovery.damage.push(Damage {
                        segment: path.clone(),
                        offset: 0,
                        cut_bytes: bytes.len() as u64,
                        reason: "bad segment header",
                    });
                }
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            }
            continue;
        }
        let mut segment = Segment { id, path: path.clone(), bytes: MAGIC.len() as u64, batches: Vec::new() };
        let mut offset = MAGIC.len();
        loop {
            match decode_record(&bytes, offset) {
                Ok((batch, next)) => {
                    scan.recovery.records += 1;
                    scan.max_seq = scan.max_seq.max(batch.seq);
                    if !batch.events.is_empty() || !batch.summaries.is_empty() {
                        segment.batches.push(BatchIndex {
                            seq: batch.seq,
                            offset: offset as u64,
                            len: (next - offset - HEADER_BYTES) as u32,
                            events: record_items(batch.events.len(), batch.summaries.len()),
                        });
                    }
                    if let Some(position) = batch.position {
                        scan.positions.insert(position.path.clone(), (position, id));
                    }
                    offset = next;
                }
                Err("end") => break,
                Err(reason) => {
                    let tail_in_progress = !repair && index + 1 == count;
                    if !tail_in_progress {
                        scan.recovery.damage.push(Damage {
                            segment: path.clone(),
                            offset: offset as u64,
                            cut_bytes: (bytes.len() - offset) as u64,
                            reason,
                        });
                    }
                    if repair {
                        let file = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                        file.set_len(offset as u64).map_err(io_err(&path))?;
                        file.sync_all().map_err(io_err(&path))?;
                    }
                    break;
                }
            }
        }
        segment.bytes = offset as u64;
        scan.segments.push_back(segment);
    }
    Ok(scan)
}

fn read_state(dir: &Path, repair: bool) -> Result<State, SpoolError> {
    // A complete temp file is newer than the main one (the rename did not
    // happen); a partial one is ignored.
    let tmp = dir.join(STATE_TMP);
    if let Ok(text) = std::fs::read(&tmp) {
        if let Ok(state) = serde_json::from_slice::<State>(&text) {
            check_format(&tmp, &state)?;
            if repair {
                let main = dir.join(STATE_FILE);
                std::fs::rename(&tmp, &main).map_err(io_err(&main))?;
                sync_dir(dir)?;
            }
            return Ok(state);
        }
        if repair {
            std::fs::remove_file(&tmp).map_err(io_err(&tmp))?;
        }
    }
    let main = dir.join(STATE_FILE);
    match std::fs::read(&main) {
        Ok(text) => {
            let state = serde_json::from_slice(&text).unwrap_or_else(|error| {
                warn!(%error, path = %main.display(), "Spool state file is unreadable; starting from zero counters.");
                State::default()
            });
            check_format(&main, &state)?;
            Ok(state)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(source) => Err(SpoolError::Io { path: main, error: source }),
    }
}

fn check_format(path: &Path, state: &State) -> Result<(), SpoolError> {
    if state.format > STATE_FORMAT {
        return Err(SpoolError::Format { path: path.to_owned(), found: state.format, supported: STATE_FORMAT });
    }
    Ok(())
}

fn write_state(dir: &Path, state: &State) -> Result<(), SpoolError> {
    let main = dir.join(STATE_FILE);
    let state = State { format: STATE_FORMAT, ..*state };
    // Serialising a struct of integers cannot fail.
    let text = serde_json::to_vec(&state).unwrap_or_default();
    crate::fsutil::write_atomic(&main, &text, 0o600).map_err(io_err(&main))
}

/// What a batch counts as in the spool's event counters (pending, lost):
/// its events plus its summaries, one each.
fn record_items(events: usize, summaries: usize) -> u32 {
    u32::try_from(events.saturating_add(summaries)).unwrap_or(u32::MAX)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir).and_then(|file| file.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetban_proto::v1::EventKind;

    fn event(n: u32) -> Event {
        Event {
            time_ms: i64::from(n),
            kind: EventKind::Connect as i32,
            remote_port: n,
            detail: "x".repeat(100),
            ..Event::default()
        }
    }

    fn position(offset: u64) -> SourcePosition {
        SourcePosition { path: "/var/log/exim_mainlog".into(), fingerprint: 42, offset, open_from: None }
    }

    fn small() -> SpoolOptions {
        SpoolOptions { max_bytes: 1 << 20, segment_bytes: 4096 }
    }

    fn append_batches(spool: &mut Spool, from: u32, count: u32) {
        for n in from..from + count {
            spool.append(&[event(n), event(n + 1_000_000)], &position(u64::from(n) * 10)).expect("append");
        }
        spool.sync().expect("sync");
    }

    #[test]
    fn append_reopen_resume_and_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut spool, recovery) = Spool::open(dir.path(), small()).unwrap();
            assert!(recovery.damage.is_empty());
            assert_eq!(spool.next_seq(), 1);
            append_batches(&mut spool, 1, 100);
            assert_eq!(spool.durable_seq(), 100);
            spool.append_position(position(5000)).unwrap();
            spool.sync().unwrap();
        }
        let (spool, recovery) = Spool::open(dir.path(), small()).unwrap();
        assert!(recovery.damage.is_empty());
        assert_eq!(recovery.records, 101);
        // After the reservation of the first 4096 seqs, never inside it.
        assert_eq!(spool.next_seq(), SEQ_RESERVE + 1);
        assert_eq!(spool.positions()["/var/log/exim_mainlog"].offset, 5000);
        let batches = spool.read_batches(40, 1000).unwrap();
        assert_eq!(batches.len(), 60);
        assert_eq!(batches[0].seq, 41);
        assert_eq!(batches[0].events[0].remote_port, 41);
        assert_eq!(
            spool.status(),
            SpoolStatus { pending_batches: 100, pending_events: 200, bytes: spool.total_bytes(), dropped_events: 0 }
        );
        assert!(spool.segments.len() > 2, "small segments roll over");
    }

    /// An fsync prepared under the lock and run outside it makes exactly
    /// what was written before it durable; what came after (a batch, a
    /// position) keeps the spool dirty, and a roll in between is no harm.
    #[test]
    fn a_sync_outside_the_lock_covers_what_came_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        assert!(spool.prepare_sync().unwrap().is_none(), "nothing to sync");
        spool.append(&[event(1)], &position(10)).unwrap();
        let first = spool.durable_seq() + 1;
        let ticket = spool.prepare_sync().unwrap().expect("dirty");
        spool.append(&[event(2)], &position(20)).unwrap();
        ticket.run().unwrap();
        spool.complete_sync(ticket);
        assert_eq!(spool.durable_seq(), first, "only the batch before the ticket");
        assert!(spool.is_dirty(), "the later batch is not durable yet");
        let ticket = spool.prepare_sync().unwrap().expect("dirty");
        spool.append_position(position(30)).unwrap();
        ticket.run().unwrap();
        spool.complete_sync(ticket);
        assert_eq!(spool.durable_seq(), first + 1);
        assert!(spool.is_dirty(), "a position written after the ticket still needs a sync");
        let ticket = spool.prepare_sync().unwrap().expect("dirty");
        // Enough to roll into new segments before the ticket completes.
        for n in 3..200 {
            spool.append(&[event(n)], &position(u64::from(n) * 10)).unwrap();
        }
        let rolled = spool.durable_seq();
        assert!(rolled > first + 1, "a roll synced the closing segment");
        ticket.run().unwrap();
        spool.complete_sync(ticket);
        assert_eq!(spool.durable_seq(), rolled, "a ticket never moves the durable seq back");
        spool.sync().unwrap();
        assert_eq!(spool.durable_seq(), spool.next_seq() - 1);
        assert!(!spool.is_dirty());
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Spool::open(dir.path(), small()).unwrap();
        assert!(matches!(Spool::open(dir.path(), small()), Err(SpoolError::Locked(_))));
    }

    /// A batch that was sent and then lost from the segments (the whole
    /// segment file gone, e.g. a damaged disk) never has its seq reused:
    /// the server would take the new events for a duplicate and drop them.
    #[test]
    fn a_seq_is_never_reused_after_its_records_are_lost() {
        let dir = tempfile::tempdir().unwrap();
        let position = SourcePosition { path: "/var/log/exim_mainlog".into(), offset: 1, ..Default::default() };
        let mut handed_out = Vec::new();
        for round in 0..3 {
            let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
            for n in 0..5 {
                handed_out.push(spool.append(&[event(round * 10 + n)], &position).unwrap());
            }
            spool.sync().unwrap();
            drop(spool);
            // Every segment is lost; only the state file survives.
            for entry in std::fs::read_dir(dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "seg") {
                    std::fs::remove_file(path).unwrap();
                }
            }
        }
        let mut sorted = handed_out.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), handed_out.len(), "a seq was handed out twice: {handed_out:?}");
        // And the gaps stay far below what the server accepts.
        assert!(handed_out.iter().all(|&seq| seq < 4 * SEQ_RESERVE), "{handed_out:?}");
    }

    #[test]
    fn the_state_file_carries_its_format_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let position = SourcePosition { path: "/var/log/exim_mainlog".into(), offset: 1, ..Default::default() };
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        spool.append(&[event(1)], &position).unwrap();
        drop(spool);
        let path = dir.path().join(STATE_FILE);
        let mut state: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(state["format"], 1);
        // An older file without a format opens.
        state.as_object_mut().unwrap().remove("format");
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        drop(Spool::open(dir.path(), small()).unwrap());
        // A newer one is refused, and left as it is.
        state["format"] = 2.into();
        let newer = serde_json::to_vec(&state).unwrap();
        std::fs::write(&path, &newer).unwrap();
        let error = Spool::open(dir.path(), small()).unwrap_err().to_string();
        assert!(error.contains("format 2") && error.contains("upgrade the agent"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), newer);
    }

    #[test]
    fn ack_deletes_segments_and_keeps_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        append_batches(&mut spool, 1, 100);
        let segments_before = spool.segments.len();
        spool.ack(100).unwrap();
        assert_eq!(spool.segments.len(), 1, "all but the newest segment deleted (had {segments_before})");
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);
        assert_eq!(spool.status().pending_batches, 0);
        drop(spool);
        let (spool, _) = Spool::open(dir.path(), small()).unwrap();
        assert_eq!(spool.next_seq(), SEQ_RESERVE + 1, "seq never goes back after ack");
        assert_eq!(spool.acked_seq(), 100);
        assert_eq!(spool.positions()["/var/log/exim_mainlog"].offset, 1000);
    }

    #[test]
    fn checkpoint_of_a_quiet_source_survives_deletion_of_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        let quiet = SourcePosition { path: "/quiet".into(), fingerprint: 7, offset: 77, open_from: None };
        spool.append(&[event(1)], &quiet).unwrap();
        let import =
            SourcePosition { path: format!("{BACKFILL_PREFIX}/old.gz"), fingerprint: 8, offset: 88, open_from: None };
        spool.append(&[event(1)], &import).unwrap();
        append_batches(&mut spool, 2, 100);
        spool.ack(50).unwrap();
        assert!(spool.segments.front().is_some_and(|segment| segment.id > 1));
        drop(spool);
        let (spool, _) = Spool::open(dir.path(), small()).unwrap();
        assert_eq!(spool.positions()["/quiet"].offset, 77);
        assert!(!spool.positions().keys().any(|path| path.starts_with(BACKFILL_PREFIX)), "imports are not carried");
    }

    #[test]
    fn full_spool_drops_oldest_segment_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { max_bytes: 16 * 1024, segment_bytes: 4096 };
        let (mut spool, _) = Spool::open(dir.path(), options).unwrap();
        append_batches(&mut spool, 1, 1000);
        let status = spool.status();
        assert!(status.bytes <= options.max_bytes, "bounded: {status:?}");
        assert!(status.dropped_events > 0);
        assert_eq!(status.pending_events + status.dropped_events, 2000, "every event is either kept or counted");
        let loss = spool.unreported_loss();
        assert_eq!(loss.events, status.dropped_events);
        spool.loss_reported(loss).unwrap();
        assert_eq!(spool.unreported_loss(), Loss::default());
        drop(spool);
        let snapshot = inspect(dir.path()).unwrap();
        assert_eq!(snapshot.status.dropped_events, status.dropped_events, "loss counter is persistent");
        assert_eq!(snapshot.positions["/var/log/exim_mainlog"].offset, 10_000);
    }

    fn last_segment(dir: &Path) -> PathBuf {
        list_segments(dir).unwrap().pop().unwrap().1
    }

    #[test]
    fn torn_tail_record_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut spool, _) = Spool::open(dir.path(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
            append_batches(&mut spool, 1, 10);
        }
        let path = last_segment(dir.path());
        let full = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full - 3).unwrap();
        drop(file);
        let snapshot = inspect(dir.path()).unwrap();
        assert!(snapshot.damage.is_empty(), "a torn tail may be a write in progress for a reader");
        assert_eq!(snapshot.last_seq, 9);

        let (spool, recovery) = Spool::open(dir.path(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        assert_eq!(recovery.damage.len(), 1);
        assert_eq!(recovery.damage[0].reason, "truncated record");
        // Record 10 may have been sent before it was damaged: its seq is
        // not handed out again.
        assert_eq!(spool.next_seq(), SEQ_RESERVE + 1, "records 1..=9 survive, 10 is cut");
        assert_eq!(spool.positions()["/var/log/exim_mainlog"].offset, 90);
        assert_eq!(spool.read_batches(0, 100).unwrap().len(), 9);
        let cut = std::fs::metadata(&path).unwrap().len();
        assert_eq!(cut, full - 3 - recovery.damage[0].cut_bytes);
    }

    #[test]
    fn bit_flipped_tail_record_is_cut_by_crc() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut spool, _) = Spool::open(dir.path(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
            append_batches(&mut spool, 1, 10);
        }
        let path = last_segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 5;
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let (mut spool, recovery) = Spool::open(dir.path(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        assert_eq!(recovery.damage.len(), 1);
        assert_eq!(recovery.damage[0].reason, "CRC mismatch");
        assert_eq!(spool.next_seq(), SEQ_RESERVE + 1);
        let batches = spool.read_batches(0, 100).unwrap();
        assert_eq!(batches.iter().map(|batch| batch.seq).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
        // Appending after the cut continues cleanly.
        spool.append(&[event(99)], &position(999)).unwrap();
        spool.sync().unwrap();
        drop(spool);
        let (_, recovery) = Spool::open(dir.path(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        assert!(recovery.damage.is_empty());
        assert_eq!(recovery.records, 10);
    }

    #[test]
    fn bit_flip_in_a_length_field_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut spool, _) = Spool::open(dir.path(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
            append_batches(&mut spool, 1, 3);
        }
        let path = last_segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let records = read_all(dir.path()).unwrap();
        assert_eq!(records.len(), 3);
        // Offset of the third record: magic + two records.
        let mut offset = MAGIC.len();
        for _ in 0..2 {
            offset = decode_record(&bytes, offset).unwrap().1;
        }
        bytes[offset + 3] ^= 0x80;
        std::fs::write(&path, &bytes).unwrap();
        let (spool, recovery) = Spool::open(dir.path(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        assert_eq!(recovery.damage[0].reason, "record length out of range");
        assert_eq!(spool.next_seq(), SEQ_RESERVE + 1);
    }

    #[test]
    fn only_durable_batches_are_offered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = Spool::open(dir.path(), small()).unwrap();
        spool.append(&[event(1)], &position(1)).unwrap();
        assert!(spool.read_batches(0, 10).unwrap().is_empty());
        spool.sync().unwrap();
        assert_eq!(spool.read_batches(0, 10).unwrap().len(), 1);
    }
}
