//! Follows one log file by path through every kind of rotation.
//!
//! A file is identified by a *fingerprint*: the CRC-64 of its first line
//! (at most [`FINGERPRINT_MAX`] bytes), not by its path or inode alone. A
//! [`Position`] is a fingerprint plus the byte offset just past the last
//! complete line handed out. From it the tailer finds its place again after a
//! restart, whatever happened to the file meanwhile:
//!
//! - **rename rotation** (`mainlog` → `mainlog.1`, new `mainlog`): the open
//!   handle of the old file is read to its end, then the new file is read
//!   from its start;
//! - **copytruncate**: the file shrinks below the read position, or its first
//!   line changes; the rest of the old content is read from the copy (found by
//!   fingerprint among the rotated siblings), then the file from 0;
//! - **delete and re-create**: like rename (the open handle keeps the deleted
//!   file readable until it is drained);
//! - **compressed rotation**: a rotated sibling `*.gz` whose first line has the
//!   checkpoint's fingerprint is decompressed and read from the checkpoint's
//!   offset (this is how a restart finishes a file that was rotated and
//!   compressed while the agent was down);
//! - **partial last line**: held until its newline arrives; the unfinished
//!   tail of a file that was rotated away is discarded and counted;
//! - **missing file**: waited for, then read from its start.
//!
//! A file without a checkpoint that exists when the tailer starts is read
//! from its end or its beginning (`start_at`); a file that appears later, and
//! every file after a rotation, is read from its beginning.
//!
//! Guarantee: every complete line is handed out exactly once, in file order,
//! as long as a file is not rotated a second time before a position inside
//! its successor has been checkpointed (rotations are daily; the agent
//! checkpoints within `fsync_ms`). Rotated siblings are the files in the same
//! directory named `<name>.*`, `<name>-*` or `<name>_*`.
//!
//! The tailer itself is synchronous and allocation-light: [`Tailer::poll`]
//! hands out [`Chunk`]s of whole lines. [`Waker`] wakes a follower thread on
//! inotify events, with a poll interval of at most [`POLL_INTERVAL`] as the
//! fallback.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use flate2::read::MultiGzDecoder;
use tracing::{debug, info, warn};

use crate::config::StartAt;

/// The fingerprint covers at most this many bytes of the first line.
pub const FINGERPRINT_MAX: usize = 1024;
/// Longest wait between two looks at a file when no inotify event arrives.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors of the tailer. They are transient: the follower logs them and
/// tries again.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// Reading a file failed.
    #[error("cannot read {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file system watcher could not be set up.
    #[error("cannot watch {path}: {error}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The watcher's error.
        error: notify::Error,
    },
}

/// A place in a followed log: the file's fingerprint and the offset just
/// past the last complete line handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// CRC-64 of the file's first line.
    pub fingerprint: u64,
    /// Byte offset.
    pub offset: u64,
}

/// Whole lines read from one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Fingerprint of the file they come from.
    pub fingerprint: u64,
    /// Offset of `data[0]` in that file.
    pub offset: u64,
    /// One or more complete lines, each ending with `\n`. Empty when the
    /// chunk only announces that reading moved to a new file.
    pub data: Vec<u8>,
}

impl Chunk {
    /// Position just past the whole chunk.
    pub fn end(&self) -> Position {
        Position { fingerprint: self.fingerprint, offset: self.offset + self.data.len() as u64 }
    }
}

/// Tuning of a tailer.
#[derive(Debug, Clone, Copy)]
pub struct TailOptions {
    /// Start position in a file without a checkpoint that exists at start.
    pub start_at: StartAt,
    /// Lines longer than this are skipped (and counted).
    pub max_line_bytes: usize,
    /// Bytes read per system call, roughly the size of a chunk.
    pub read_bytes: usize,
}

impl Default for TailOptions {
    fn default() -> Self {
        Self { start_at: StartAt::End, max_line_bytes: 1024 * 1024, read_bytes: 64 * 1024 }
    }
}

/// Counters of a tailer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TailStats {
    /// Files switched to after a rotation, truncation or re-creation.
    pub rotations: u64,
    /// Bytes of unfinished last lines discarded with a rotated-away file.
    pub discarded_partial_bytes: u64,
    /// Lines skipped for exceeding `max_line_bytes`.
    pub overlong_lines: u64,
    /// Checkpointed files that could not be found again (lines may be lost).
    pub lost_files: u64,
}

/// Result of one [`Tailer::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Data was read or the file changed; poll again right away.
    Busy,
    /// Nothing new; wait for a wake-up.
    Idle,
    /// The sink refused a chunk (its receiver is gone).
    Closed,
}

/// The fingerprint of a first line (or of its first [`FINGERPRINT_MAX`]
/// bytes), and how many bytes it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    value: u64,
    len: usize,
}

/// Computes the fingerprint from the start of a file's content, if enough
/// of it is there (a whole first line or [`FINGERPRINT_MAX`] bytes).
fn fingerprint_of(head: &[u8]) -> Option<Fingerprint> {
    let window = &head[..head.len().min(FINGERPRINT_MAX)];
    let len = match memchr::memchr(b'\n', window) {
        Some(newline) => newline,
        None if head.len() >= FINGERPRINT_MAX => FINGERPRINT_MAX,
        None => return None,
    };
    Some(Fingerprint { value: CRC64.checksum(&head[..len]), len })
}

/// The fingerprint of a file (plain or `.gz`), if it has a first line.
pub fn fingerprint_file(path: &Path) -> Option<u64> {
    head_fingerprint(path).ok().flatten().map(|fingerprint| fingerprint.value)
}

fn read_head(reader: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(FINGERPRINT_MAX + 1);
    reader.take(FINGERPRINT_MAX as u64 + 1).read_to_end(&mut head)?;
    Ok(head)
}

fn head_fingerprint(path: &Path) -> std::io::Result<Option<Fingerprint>> {
    let file = File::open(path)?;
    let head =
        if is_gz(path) { read_head(&mut MultiGzDecoder::new(BufReader::new(file)))? } else { pread_head(&file)? };
    Ok(fingerprint_of(&head))
}

fn pread_head(file: &File) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0; FINGERPRINT_MAX + 1];
    let mut filled = 0;
    while filled < head.len() {
        match file.read_at(&mut head[filled..], filled as u64)? {
            0 => break,
            n => filled += n,
        }
    }
    head.truncate(filled);
    Ok(head)
}

fn is_gz(path: &Path) -> bool {
    path.extension().is_some_and(|extension| extension == "gz")
}

enum Reader {
    Plain(File),
    Gz(Box<MultiGzDecoder<BufReader<File>>>),
}

impl Reader {
    fn read_into(&mut self, buffer: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
        let start = buffer.len();
        buffer.resize(start + max, 0);
        let result = match self {
            Reader::Plain(file) => file.read(&mut buffer[start..]),
            Reader::Gz(decoder) => decoder.read(&mut buffer[start..]),
        };
        let n = *result.as_ref().unwrap_or(&0);
        buffer.truncate(start + n);
        result
    }
}

/// The file currently being read.
struct Current {
    reader: Reader,
    /// Where the file came from (for messages).
    source: PathBuf,
    /// `(dev, inode)` when this is the file at the followed path; `None` for
    /// a rotated sibling, which is read to its end and then left.
    identity: Option<(u64, u64)>,
    fingerprint: Option<Fingerprint>,
    /// Offset just past the last byte handed out (or skipped).
    offset: u64,
    /// Bytes read past `offset` and not yet handed out: a partial line (or,
    /// while the fingerprint is unknown, everything read so far).
    pending: Vec<u8>,
    /// Inside an overlong line that is being skipped.
    skipping: bool,
    /// The file and its start position were handed to the sink.
    announced: bool,
}

impl Current {
    fn read_offset(&self) -> u64 {
        self.offset + self.pending.len() as u64
    }

    fn position(&self) -> Option<Position> {
        self.fingerprint.map(|fingerprint| Position { fingerprint: fingerprint.value, offset: self.offset })
    }
}

/// Follows one path. See the module documentation.
pub struct Tailer {
    path: PathBuf,
    options: TailOptions,
    checkpoint: Option<Position>,
    /// The first look at the path has been taken.
    started: bool,
    current: Option<Current>,
    /// The file at the path, opened at start together with a rotated
    /// sibling that holds the checkpoint; read once the sibling is done.
    successor: Option<Current>,
    stats: TailStats,
}

impl std::fmt::Debug for Tailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tailer").field("path", &self.path).field("position", &self.position()).finish()
    }
}

impl Tailer {
    /// A tailer for `path` that resumes at `checkpoint` (the position of the
    /// last line durably handed off), or starts per `options.start_at`.
    pub fn new(path: PathBuf, checkpoint: Option<Position>, options: TailOptions) -> Self {
        Self { path, options, checkpoint, started: false, current: None, successor: None, stats: TailStats::default() }
    }

    /// The followed path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Position just past the last line handed out; `None` before the first
    /// line of a file has been seen.
    pub fn position(&self) -> Option<Position> {
        self.current.as_ref().and_then(Current::position).or(self.checkpoint)
    }

    /// Counters.
    pub fn stats(&self) -> TailStats {
        self.stats
    }

    /// Reads what is new and hands it to `sink` in chunks of whole lines,
    /// following rotations. `sink` returns `false` when it can take no more.
    pub fn poll(&mut self, sink: &mut dyn FnMut(Chunk) -> bool) -> Result<Progress, TailError> {
        if !self.started {
            self.started = true;
            self.open_initial()?;
        }
        if self.current.is_none() {
            match self.open_path()? {
                Some(current) => {
                    debug!(path = %self.path.display(), "Log file appeared.");
                    self.current = Some(current);
                }
                None => return Ok(Progress::Idle),
            }
        }
        self.check_truncation()?;
        let mut budget = 64;
        loop {
            let Some(current) = self.current.as_mut() else { return Ok(Progress::Idle) };
            let n = match current.reader.read_into(&mut current.pending, self.options.read_bytes) {
                Ok(n) => n,
                Err(error) if current.identity.is_none() => {
                    // A damaged rotated file (say, a broken .gz) must not stall
                    // the live log: give up on its rest and move on.
                    warn!(%error, rotated = %current.source.display(), "Cannot read the rest of a rotated log file; skipping it.");
                    self.stats.lost_files += 1;
                    if let Some(current) = self.current.as_mut() {
                        current.pending.clear();
                    }
                    self.finish_current();
                    self.current = match self.successor.take() {
                        Some(successor) => Some(successor),
                        None => self.open_path()?,
                    };
                    continue;
                }
                Err(source) => return Err(TailError::Io { path: current.source.clone(), error: source }),
            };
            // At the end of the current file: has it been replaced?
            let switched = n == 0 && self.check_rotation()?;
            if !self.emit(sink) {
                return Ok(Progress::Closed);
            }
            if n == 0 && !switched {
                return Ok(Progress::Idle);
            }
            budget -= 1;
            if budget == 0 {
                return Ok(Progress::Busy);
            }
        }
    }

    /// Hands out the complete lines in `pending`.
    fn emit(&mut self, sink: &mut dyn FnMut(Chunk) -> bool) -> bool {
        let max_line = self.options.max_line_bytes;
        let Some(current) = self.current.as_mut() else { return true };
        if current.fingerprint.is_none() {
            match fingerprint_of(&current.pending) {
                Some(fingerprint) => current.fingerprint = Some(fingerprint),
                None => return true,
            }
        }
        if !current.announced {
            // Announce the file and where reading starts, so that the position
            // can be checkpointed before any of its lines produce events.
            current.announced = true;
            let Some(fingerprint) = current.fingerprint else { return true };
            if !sink(Chunk { fingerprint: fingerprint.value, offset: current.offset, data: Vec::new() }) {
                return false;
            }
        }
        if current.skipping {
            match memchr::memchr(b'\n', &current.pending) {
                Some(newline) => {
                    current.pending.drain(..=newline);
                    current.offset += newline as u64 + 1;
                    current.skipping = false;
                }
                None => {
                    current.offset += current.pending.len() as u64;
                    current.pending.clear();
                    return true;
                }
            }
        }
        match memchr::memrchr(b'\n', &current.pending) {
            Some(last) => {
                let rest = current.pending[last + 1..].to_vec();
                let mut data = std::mem::replace(&mut current.pending, rest);
                data.truncate(last + 1);
                let Some(fingerprint) = current.fingerprint else { return true };
                let chunk = Chunk { fingerprint: fingerprint.value, offset: current.offset, data };
                current.offset += chunk.data.len() as u64;
                if !sink(chunk) {
                    return false;
                }
            }
            None if current.pending.len() > max_line => {
                warn!(path = %current.source.display(), offset = current.offset, max_line_bytes = max_line, "Skipping an overlong line.");
                self.stats.overlong_lines += 1;
                current.offset += current.pending.len() as u64;
                current.pending.clear();
                current.skipping = true;
            }
            None => {}
        }
        true
    }

    /// Opens the file at the path fresh, reading from offset 0.
    fn open_path(&self) -> Result<Option<Current>, TailError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TailError::Io { path: self.path.clone(), error: source }),
        };
        let metadata = file.metadata().map_err(|source| TailError::Io { path: self.path.clone(), error: source })?;
        Ok(Some(Current {
            reader: Reader::Plain(file),
            source: self.path.clone(),
            identity: Some((metadata.dev(), metadata.ino())),
            fingerprint: None,
            offset: 0,
            pending: Vec::new(),
            skipping: false,
            announced: false,
        }))
    }

    /// First look at the path: resume at the checkpoint or apply `start_at`.
    fn open_initial(&mut self) -> Result<(), TailError> {
        let Some(mut path_file) = self.open_path()? else {
            // Nothing at the path: finish the checkpointed file if it was
            // rotated away, then wait for the path.
            if let Some(checkpoint) = self.checkpoint {
                self.current = self.open_rotated(checkpoint, None)?;
                if self.current.is_none() {
                    self.lost(checkpoint);
                }
            }
            return Ok(());
        };
        let head = match &path_file.reader {
            Reader::Plain(file) => {
                pread_head(file).map_err(|source| TailError::Io { path: self.path.clone(), error: source })?
            }
            Reader::Gz(_) => Vec::new(),
        };
        let fingerprint = fingerprint_of(&head);
        let size = self.size_of(&path_file)?;
        match self.checkpoint {
            None => {
                if self.options.start_at == StartAt::End
                    && let Some(fingerprint) = fingerprint
                {
                    let offset = self.end_of_last_line(&path_file, size)?;
                    self.seek(&mut path_file, offset)?;
                    path_file.fingerprint = Some(fingerprint);
                    path_file.offset = offset;
                    info!(path = %self.path.display(), offset, "Following new log file from its end.");
                } else {
                    info!(path = %self.path.display(), "Following log file from its beginning.");
                }
                self.current = Some(path_file);
            }
            Some(checkpoint) if fingerprint.is_some_and(|f| f.value == checkpoint.fingerprint) => {
                if size >= checkpoint.offset {
                    self.seek(&mut path_file, checkpoint.offset)?;
                    path_file.fingerprint = fingerprint;
                    path_file.offset = checkpoint.offset;
                    info!(path = %self.path.display(), offset = checkpoint.offset, "Resuming log file.");
                    self.current = Some(path_file);
                } else {
                    // Truncated in place while we were away (copytruncate).
                    let identity = path_file.identity;
                    self.current = self.open_rotated(checkpoint, identity)?;
                    if self.current.is_some() {
                        self.successor = Some(path_file);
                    } else {
                        self.lost(checkpoint);
                        self.current = Some(path_file);
                    }
                }
            }
            Some(checkpoint) => {
                // The path holds another file: the checkpointed one was rotated.
                self.current = self.open_rotated(checkpoint, None)?;
                if self.current.is_some() {
                    self.successor = Some(path_file);
                } else {
                    self.lost(checkpoint);
                    self.current = Some(path_file);
                }
            }
        }
        Ok(())
    }

    fn lost(&mut self, checkpoint: Position) {
        self.stats.lost_files += 1;
        warn!(
            path = %self.path.display(),
            fingerprint = checkpoint.fingerprint,
            offset = checkpoint.offset,
            "The checkpointed log file is gone (not found among rotated files); lines after the checkpoint may be lost."
        );
    }

    fn size_of(&self, current: &Current) -> Result<u64, TailError> {
        match &current.reader {
            Reader::Plain(file) => file
                .metadata()
                .map(|m| m.len())
                .map_err(|source| TailError::Io { path: self.path.clone(), error: source }),
            Reader::Gz(_) => Ok(0),
        }
    }

    fn seek(&self, current: &mut Current, offset: u64) -> Result<(), TailError> {
        let path = current.source.clone();
        match &mut current.reader {
            Reader::Plain(file) => file.seek(SeekFrom::Start(offset)).map(|_| ()),
            Reader::Gz(decoder) => std::io::copy(&mut decoder.as_mut().take(offset), &mut std::io::sink()).map(|_| ()),
        }
        .map_err(|source| TailError::Io { path, error: source })
    }

    /// Offset just past the last newline of the file (0 if none).
    fn end_of_last_line(&self, current: &Current, size: u64) -> Result<u64, TailError> {
        let Reader::Plain(file) = &current.reader else { return Ok(0) };
        let mut end = size;
        let mut block = vec![0; 64 * 1024];
        while end > 0 {
            let start = end.saturating_sub(block.len() as u64);
            let len = (end - start) as usize;
            file.read_exact_at(&mut block[..len], start)
                .map_err(|source| TailError::Io { path: self.path.clone(), error: source })?;
            if let Some(newline) = memchr::memrchr(b'\n', &block[..len]) {
                return Ok(start + newline as u64 + 1);
            }
            end = start;
        }
        Ok(0)
    }

    /// Finds the rotated sibling holding the checkpointed file and opens it at
    /// the checkpoint. `exclude` is the identity of the file at the path.
    fn open_rotated(&self, checkpoint: Position, exclude: Option<(u64, u64)>) -> Result<Option<Current>, TailError> {
        let Some(found) = find_rotated(&self.path, checkpoint, exclude) else { return Ok(None) };
        let file = File::open(&found).map_err(|source| TailError::Io { path: found.clone(), error: source })?;
        let reader = if is_gz(&found) {
            Reader::Gz(Box::new(MultiGzDecoder::new(BufReader::new(file))))
        } else {
            Reader::Plain(file)
        };
        let mut current = Current {
            reader,
            source: found.clone(),
            identity: None,
            fingerprint: None,
            offset: checkpoint.offset,
            pending: Vec::new(),
            skipping: false,
            announced: false,
        };
        // The fingerprint matched; record it with its real length.
        current.fingerprint = head_fingerprint(&found).ok().flatten();
        self.seek(&mut current, checkpoint.offset)?;
        info!(
            path = %self.path.display(),
            rotated = %found.display(),
            offset = checkpoint.offset,
            "Finishing rotated log file from the checkpoint."
        );
        Ok(Some(current))
    }

    /// At the end of the current file: moves on if it was rotated, replaced
    /// or truncated. Returns true if it switched files.
    fn check_rotation(&mut self) -> Result<bool, TailError> {
        let Some(current) = self.current.as_ref() else { return Ok(false) };
        let Some(identity) = current.identity else {
            // A rotated sibling is done once its end is reached.
            let source = current.source.clone();
            self.finish_current();
            self.current = match self.successor.take() {
                Some(successor) => Some(successor),
                None => self.open_path()?,
            };
            debug!(rotated = %source.display(), "Finished rotated log file.");
            return Ok(true);
        };
        let metadata = match std::fs::metadata(&self.path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(TailError::Io { path: self.path.clone(), error: source }),
        };
        if (metadata.dev(), metadata.ino()) != identity {
            // Rotated or re-created: drain what the old file still holds.
            let mut drained = false;
            if let Some(current) = self.current.as_mut() {
                loop {
                    let n = current
                        .reader
                        .read_into(&mut current.pending, self.options.read_bytes)
                        .map_err(|source| TailError::Io { path: self.path.clone(), error: source })?;
                    if n == 0 {
                        break;
                    }
                    drained = true;
                }
            }
            if drained {
                // Hand out the drained lines first; the switch happens at the
                // next end of file.
                return Ok(true);
            }
            info!(path = %self.path.display(), "Log file was rotated; following the new file.");
            self.finish_current();
            self.current = self.open_path()?;
            return Ok(true);
        }
        if self.truncated(metadata.len())? {
            self.switch_after_truncation(identity)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Before reading on: if the file at the path is still the current one
    /// but was truncated (or rewritten from the start), switch to the copy.
    fn check_truncation(&mut self) -> Result<(), TailError> {
        let Some(identity) = self.current.as_ref().and_then(|current| current.identity) else { return Ok(()) };
        let metadata = match std::fs::metadata(&self.path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(TailError::Io { path: self.path.clone(), error: source }),
        };
        if (metadata.dev(), metadata.ino()) == identity && self.truncated(metadata.len())? {
            self.switch_after_truncation(identity)?;
        }
        Ok(())
    }

    /// The current file was truncated in place: finish its old content from
    /// the copy, if one is found among the rotated files, then read it anew.
    fn switch_after_truncation(&mut self, identity: (u64, u64)) -> Result<(), TailError> {
        let Some(current) = self.current.as_ref() else { return Ok(()) };
        warn!(path = %self.path.display(), offset = current.read_offset(), "Log file was truncated.");
        let position = current.position();
        // Lines already read but not handed out are read again from the copy.
        if let Some(current) = self.current.as_mut()
            && position.is_some()
        {
            current.pending.clear();
        }
        self.finish_current();
        if let Some(position) = position {
            self.current = self.open_rotated(position, Some(identity))?;
        }
        match self.current {
            Some(_) => self.successor = self.open_path()?,
            None => self.current = self.open_path()?,
        }
        Ok(())
    }

    /// Whether the file at the path (same inode as the current one) no longer
    /// holds what was read from it.
    fn truncated(&self, size: u64) -> Result<bool, TailError> {
        let Some(current) = self.current.as_ref() else { return Ok(false) };
        if size < current.read_offset() {
            return Ok(true);
        }
        let Reader::Plain(file) = &current.reader else { return Ok(false) };
        let io = |source| TailError::Io { path: self.path.clone(), error: source };
        match current.fingerprint {
            Some(fingerprint) => {
                let head = pread_head(file).map_err(io)?;
                Ok(fingerprint_of(&head) != Some(fingerprint))
            }
            None => {
                // Everything read so far is still pending from offset 0.
                let mut head = vec![0; current.pending.len()];
                file.read_exact_at(&mut head, 0).map_err(io)?;
                Ok(head != current.pending)
            }
        }
    }

    /// Leaves the current file, counting an unfinished last line.
    fn finish_current(&mut self) {
        if let Some(current) = self.current.take() {
            if !current.pending.is_empty() {
                self.stats.discarded_partial_bytes += current.pending.len() as u64;
                warn!(
                    path = %current.source.display(),
                    bytes = current.pending.len(),
                    "Rotated-away log file ended in an unfinished line; discarded it."
                );
            }
            self.stats.rotations += 1;
            // Keep the checkpoint at the end of the finished file until the
            // next file has a fingerprint.
            if let Some(position) = current.position() {
                self.checkpoint = Some(position);
            }
        }
    }
}

/// The rotated sibling of `path` whose first line has the checkpoint's
/// fingerprint. Plain files (which must be at least as long as the
/// checkpoint offset) are preferred over `.gz` ones, which may still be
/// being written while the plain file exists.
pub fn find_rotated(path: &Path, checkpoint: Position, exclude: Option<(u64, u64)>) -> Option<PathBuf> {
    let dir = path.parent()?;
    let name = path.file_name()?.to_str()?;
    let mut plain = Vec::new();
    let mut gz = Vec::new();
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let file_name = entry.file_name();
        let Some(entry_name) = file_name.to_str() else { continue };
        let Some(suffix) = entry_name.strip_prefix(name) else { continue };
        if !suffix.starts_with(['.', '-', '_']) {
            continue;
        }
        let candidate = entry.path();
        let Ok(metadata) = std::fs::metadata(&candidate) else { continue };
        if !metadata.is_file() || exclude == Some((metadata.dev(), metadata.ino())) {
            continue;
        }
        if fingerprint_file(&candidate) != Some(checkpoint.fingerprint) {
            continue;
        }
        if is_gz(&candidate) {
            gz.push(candidate);
        } else if metadata.len() >= checkpoint.offset {
            plain.push((metadata.len(), candidate));
        }
    }
    plain.sort();
    plain.pop().map(|(_, path)| path).or_else(|| {
        gz.sort();
        gz.pop()
    })
}

/// Wakes a follower when the followed file's directory changes, and at the
/// latest after [`POLL_INTERVAL`].
pub struct Waker {
    _watcher: Option<notify::RecommendedWatcher>,
    events: mpsc::Receiver<()>,
    interval: Duration,
}

impl Waker {
    /// Watches the directory of `path` (non-recursively). If inotify is not
    /// available the waker falls back to polling only.
    pub fn new(path: &Path, interval: Duration) -> Self {
        let (sender, events) = mpsc::sync_channel(1);
        let watcher = match Self::watch(path, sender) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                warn!(%error, path = %path.display(), "File watching unavailable; polling instead.");
                None
            }
        };
        Self { _watcher: watcher, events, interval: interval.min(POLL_INTERVAL) }
    }

    /// A waker that only polls.
    pub fn polling(interval: Duration) -> Self {
        let (_, events) = mpsc::sync_channel(1);
        Self { _watcher: None, events, interval: interval.min(POLL_INTERVAL) }
    }

    fn watch(path: &Path, sender: mpsc::SyncSender<()>) -> Result<notify::RecommendedWatcher, TailError> {
        use notify::Watcher;
        let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
            // A full channel already holds a wake-up.
            let _ = sender.try_send(());
        })
        .map_err(|source| TailError::Watch { path: dir.to_owned(), error: source })?;
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|source| TailError::Watch { path: dir.to_owned(), error: source })?;
        Ok(watcher)
    }

    /// Blocks until a change is seen or the poll interval passes.
    pub fn wait(&self) {
        let _ = self.events.recv_timeout(self.interval);
    }
}

#[cfg(test)]
mod tests;
