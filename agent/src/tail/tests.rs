//! Tailer tests: a model-based property test over generated sequences of
//! writes, rotations and restarts, plus focused cases.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;

use flate2::Compression;
use flate2::write::GzEncoder;
use proptest::prelude::*;

use super::*;

/// What happens to the log between looks of the tailer.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Append a complete line (finishing a partial one if there is one).
    Line,
    /// Append the start of a line without its newline.
    Partial,
    /// `mv log log.1`, then a new empty `log`.
    Rename,
    /// `cp log log.1`, then truncate `log` to 0 (same inode).
    CopyTruncate,
    /// `rm log`, then a new empty `log`.
    DeleteRecreate,
    /// `mv log log.1`, new `log`, then `gzip log.1` (`log.1` replaced by `log.1.gz`).
    GzipRotate,
    /// Stop the tailer; a new one resumes from its last position.
    Restart,
    /// Let the tailer read everything available.
    Poll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => Just(Op::Line),
        6 => Just(Op::Partial),
        6 => Just(Op::Rename),
        5 => Just(Op::CopyTruncate),
        4 => Just(Op::DeleteRecreate),
        4 => Just(Op::GzipRotate),
        6 => Just(Op::Restart),
        12 => Just(Op::Poll),
    ]
}

/// The world: real files on disk, the model of what they held, and the
/// tailer under test.
struct World {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// The content of every file that ever lived at `path`, oldest first.
    model: Vec<Vec<u8>>,
    counter: u64,
    tailer: Option<Tailer>,
    checkpoint: Option<Position>,
    delivered: Vec<Vec<u8>>,
    last_end: Option<Position>,
    rotated_since_poll: bool,
    /// A deleted file may hold lines only the running tailer can still read.
    deleted_since_poll: bool,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("exim_mainlog");
        File::create(&path).expect("create log");
        let mut world = World {
            _dir: dir,
            path,
            model: vec![Vec::new()],
            counter: 0,
            tailer: None,
            checkpoint: None,
            delivered: Vec::new(),
            last_end: None,
            rotated_since_poll: false,
            deleted_since_poll: false,
        };
        world.write(Op::Line);
        world.poll();
        world
    }

    fn rotated(&self, suffix: &str) -> PathBuf {
        self.path.with_file_name(format!("exim_mainlog{suffix}"))
    }

    fn append(&mut self, bytes: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(&self.path).expect("open log for append");
        file.write_all(bytes).expect("append");
        self.model.last_mut().expect("a current file").extend_from_slice(bytes);
    }

    fn write(&mut self, op: Op) {
        self.counter += 1;
        let n = self.counter;
        match op {
            // Lines of different lengths, some past the fingerprint length.
            Op::Line => {
                let pad = "x".repeat((n as usize * 37) % 1300);
                self.append(format!("2026-11-27 10:00:00 line {n} {pad}\n").as_bytes());
            }
            Op::Partial => self.append(format!("partial {n} ").as_bytes()),
            _ => unreachable!("not a write"),
        }
    }

    fn current_has_lines(&self) -> bool {
        self.model.last().is_some_and(|content| content.contains(&b'\n'))
    }

    fn position(&self) -> Option<Position> {
        self.tailer.as_ref().and_then(Tailer::position).or(self.checkpoint)
    }

    fn poll(&mut self) {
        let tailer = self.tailer.get_or_insert_with(|| {
            Tailer::new(
                self.path.clone(),
                self.checkpoint,
                TailOptions { start_at: StartAt::Beginning, max_line_bytes: 1 << 20, read_bytes: 4096 },
            )
        });
        let mut chunks = Vec::new();
        for _ in 0..10_000 {
            let progress = tailer
                .poll(&mut |chunk| {
                    chunks.push(chunk);
                    true
                })
                .expect("poll");
            if progress == Progress::Idle {
                break;
            }
        }
        for chunk in chunks {
            // Chunks of one file are contiguous.
            if let Some(end) = self.last_end
                && end.fingerprint == chunk.fingerprint
                && !chunk.data.is_empty()
            {
                assert_eq!(end.offset, chunk.offset, "gap or overlap in {:x}", chunk.fingerprint);
            }
            if !chunk.data.is_empty() || self.last_end.is_none_or(|end| end.fingerprint != chunk.fingerprint) {
                self.last_end = Some(chunk.end());
            }
            if chunk.data.is_empty() {
                continue;
            }
            assert!(chunk.data.ends_with(b"\n"));
            self.delivered.extend(chunk.data.split(|&b| b == b'\n').map(<[u8]>::to_vec));
            // `split` yields an empty piece after the final newline.
            self.delivered.pop();
        }
        self.rotated_since_poll = false;
        self.deleted_since_poll = false;
    }

    /// Rotations are only safe once the tailer has a position in the current
    /// file (see the module's guarantee); delete needs a running tailer.
    fn before_rotation(&mut self, op: Op) {
        let current_fingerprint = fingerprint_of(self.model.last().expect("current"));
        let positioned = self.position().map(|position| position.fingerprint) == current_fingerprint.map(|f| f.value);
        if self.rotated_since_poll
            || (self.current_has_lines() && !positioned)
            || (matches!(op, Op::DeleteRecreate) && self.tailer.is_none())
        {
            self.poll();
        }
    }

    fn inode(path: &Path) -> u64 {
        std::fs::metadata(path).expect("stat").ino()
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Line | Op::Partial => self.write(op),
            Op::Poll => self.poll(),
            Op::Restart => {
                // Stopping before a deleted file is drained loses its lines:
                // nothing can read them any more.
                if self.deleted_since_poll {
                    self.poll();
                }
                if let Some(tailer) = self.tailer.take() {
                    self.checkpoint = tailer.position();
                }
            }
            Op::Rename => {
                self.before_rotation(op);
                let old = Self::inode(&self.path);
                let target = self.rotated(".1");
                std::fs::rename(&self.path, &target).expect("rename");
                File::create(&self.path).expect("create");
                assert_eq!(Self::inode(&target), old, "precondition: the old file moved");
                assert_ne!(Self::inode(&self.path), old, "precondition: the inode really changed");
                self.model.push(Vec::new());
                self.rotated_since_poll = true;
            }
            Op::CopyTruncate => {
                self.before_rotation(op);
                let old = Self::inode(&self.path);
                let target = self.rotated(".1");
                std::fs::copy(&self.path, &target).expect("copy");
                OpenOptions::new().write(true).open(&self.path).expect("open").set_len(0).expect("truncate");
                assert_eq!(Self::inode(&self.path), old, "precondition: same inode after copytruncate");
                assert_eq!(std::fs::metadata(&self.path).expect("stat").len(), 0, "precondition: truncated");
                assert_eq!(&std::fs::read(&target).expect("read copy"), self.model.last().expect("current"));
                self.model.push(Vec::new());
                self.rotated_since_poll = true;
            }
            Op::DeleteRecreate => {
                self.before_rotation(op);
                std::fs::remove_file(&self.path).expect("remove");
                assert!(!self.path.exists(), "precondition: the file is gone");
                File::create(&self.path).expect("create");
                self.model.push(Vec::new());
                self.rotated_since_poll = true;
                self.deleted_since_poll = true;
            }
            Op::GzipRotate => {
                self.before_rotation(op);
                let old = Self::inode(&self.path);
                let plain = self.rotated(".1");
                let gz = self.rotated(".1.gz");
                std::fs::rename(&self.path, &plain).expect("rename");
                File::create(&self.path).expect("create");
                assert_ne!(Self::inode(&self.path), old, "precondition: the inode really changed");
                let content = std::fs::read(&plain).expect("read rotated");
                let mut encoder = GzEncoder::new(File::create(&gz).expect("create gz"), Compression::fast());
                encoder.write_all(&content).expect("compress");
                encoder.finish().expect("finish gz");
                std::fs::remove_file(&plain).expect("remove plain");
                assert!(!plain.exists() && gz.exists(), "precondition: only the .gz remains");
                self.model.push(Vec::new());
                self.rotated_since_poll = true;
            }
        }
    }

    /// Every complete line of every file, in order.
    fn expected(&self) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        for content in &self.model {
            let complete = match memchr::memrchr(b'\n', content) {
                Some(last) => &content[..last],
                None => continue,
            };
            lines.extend(complete.split(|&b| b == b'\n').map(<[u8]>::to_vec));
        }
        lines
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_complete_line_is_delivered_exactly_once_in_order(ops in prop::collection::vec(op(), 1..60)) {
        let mut world = World::new();
        for op in ops {
            world.apply(op);
        }
        if world.tailer.is_none() || world.rotated_since_poll {
            world.poll();
        }
        world.poll();
        let expected = world.expected();
        let show = |lines: &[Vec<u8>]| lines.iter().map(|l| String::from_utf8_lossy(&l[..l.len().min(40)]).into_owned()).collect::<Vec<_>>();
        prop_assert_eq!(show(&world.delivered), show(&expected));
        prop_assert_eq!(world.delivered.len(), expected.len());
    }
}

fn write(path: &Path, text: &str) {
    OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
}

fn drain(tailer: &mut Tailer) -> (Vec<String>, Vec<Chunk>) {
    let mut chunks = Vec::new();
    loop {
        let progress = tailer
            .poll(&mut |chunk| {
                chunks.push(chunk);
                true
            })
            .unwrap();
        if progress == Progress::Idle {
            break;
        }
    }
    let lines = chunks
        .iter()
        .flat_map(|chunk| String::from_utf8(chunk.data.clone()).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
        .collect();
    (lines, chunks)
}

#[test]
fn start_at_end_skips_existing_lines_but_not_a_partial_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    write(&path, "one\ntwo\nthr");
    let mut tailer = Tailer::new(path.clone(), None, TailOptions::default());
    let (lines, chunks) = drain(&mut tailer);
    assert!(lines.is_empty());
    assert_eq!(chunks.len(), 1, "the start position is announced");
    assert_eq!(chunks[0].end().offset, 8);
    write(&path, "ee\nfour\n");
    assert_eq!(drain(&mut tailer).0, ["three", "four"]);
}

#[test]
fn start_at_beginning_reads_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    write(&path, "one\ntwo\n");
    let options = TailOptions { start_at: StartAt::Beginning, ..TailOptions::default() };
    let mut tailer = Tailer::new(path, None, options);
    assert_eq!(drain(&mut tailer).0, ["one", "two"]);
}

#[test]
fn missing_file_is_waited_for_and_read_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut tailer = Tailer::new(path.clone(), None, TailOptions::default());
    assert!(drain(&mut tailer).0.is_empty());
    write(&path, "first\n");
    assert_eq!(drain(&mut tailer).0, ["first"]);
}

#[test]
fn partial_line_is_held_until_its_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    write(&path, "head\n");
    let options = TailOptions { start_at: StartAt::Beginning, ..TailOptions::default() };
    let mut tailer = Tailer::new(path.clone(), None, options);
    assert_eq!(drain(&mut tailer).0, ["head"]);
    write(&path, "half a li");
    assert!(drain(&mut tailer).0.is_empty());
    assert_eq!(tailer.position().unwrap().offset, 5, "position stays before the partial line");
    write(&path, "ne\n");
    assert_eq!(drain(&mut tailer).0, ["half a line"]);
}

#[test]
fn overlong_lines_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    write(&path, &format!("head\n{}\nafter\n", "y".repeat(10_000)));
    let options = TailOptions { start_at: StartAt::Beginning, max_line_bytes: 2000, read_bytes: 1024 };
    let mut tailer = Tailer::new(path, None, options);
    assert_eq!(drain(&mut tailer).0, ["head", "after"]);
    assert_eq!(tailer.stats().overlong_lines, 1);
}

#[test]
fn restart_finishes_a_file_rotated_and_compressed_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exim_mainlog");
    write(&path, "a1\na2\n");
    let options = TailOptions { start_at: StartAt::Beginning, ..TailOptions::default() };
    let mut tailer = Tailer::new(path.clone(), None, options);
    assert_eq!(drain(&mut tailer).0, ["a1", "a2"]);
    let checkpoint = tailer.position();
    drop(tailer);
    write(&path, "a3\na4\n");
    let content = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut encoder =
        GzEncoder::new(File::create(dir.path().join("exim_mainlog-20261127.gz")).unwrap(), Compression::fast());
    encoder.write_all(&content).unwrap();
    encoder.finish().unwrap();
    write(&path, "b1\n");
    let mut tailer = Tailer::new(path, checkpoint, options);
    assert_eq!(drain(&mut tailer).0, ["a3", "a4", "b1"]);
}

#[test]
fn copytruncate_while_running_reads_the_rest_from_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exim_mainlog");
    write(&path, "a1\n");
    let options = TailOptions { start_at: StartAt::Beginning, ..TailOptions::default() };
    let mut tailer = Tailer::new(path.clone(), None, options);
    assert_eq!(drain(&mut tailer).0, ["a1"]);
    write(&path, "a2\na3\n");
    std::fs::copy(&path, dir.path().join("exim_mainlog.1")).unwrap();
    OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    // Regrow past the old read position before the tailer looks.
    write(&path, "b1 is long enough to pass the old offset\n");
    assert_eq!(drain(&mut tailer).0, ["a2", "a3", "b1 is long enough to pass the old offset"]);
}

#[test]
fn checkpoint_of_a_deleted_file_falls_back_to_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    write(&path, "a1\n");
    let options = TailOptions { start_at: StartAt::Beginning, ..TailOptions::default() };
    let mut tailer = Tailer::new(path.clone(), None, options);
    drain(&mut tailer);
    let checkpoint = tailer.position();
    drop(tailer);
    std::fs::remove_file(&path).unwrap();
    write(&path, "b1\n");
    let mut tailer = Tailer::new(path, checkpoint, TailOptions::default());
    assert_eq!(drain(&mut tailer).0, ["b1"], "a rotated successor is read from its start, not from start_at");
    assert_eq!(tailer.stats().lost_files, 1);
}

#[test]
fn a_broken_gz_remainder_does_not_stall_the_live_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("exim_mainlog");
    write(&path, "a1\n");
    let options = TailOptions { start_at: StartAt::Beginning, ..TailOptions::default() };
    let mut tailer = Tailer::new(path.clone(), None, options);
    drain(&mut tailer);
    let checkpoint = tailer.position();
    drop(tailer);
    write(&path, &"a2 more lines\n".repeat(2000));
    let content = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let gz = dir.path().join("exim_mainlog.1.gz");
    let mut encoder = GzEncoder::new(File::create(&gz).unwrap(), Compression::fast());
    encoder.write_all(&content).unwrap();
    encoder.finish().unwrap();
    // Cut the compressed file in half: its header (and first line) survive.
    let bytes = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    write(&path, "b1\n");
    let mut tailer = Tailer::new(path, checkpoint, options);
    let lines = drain(&mut tailer).0;
    assert_eq!(lines.last().map(String::as_str), Some("b1"));
    assert_eq!(tailer.stats().lost_files, 1);
}

#[test]
fn waker_wakes_on_a_change_before_the_poll_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let waker = Waker::new(&path, POLL_INTERVAL);
    // Drain wake-ups from setting up.
    while waker.events.try_recv().is_ok() {}
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            write(&path, "x\n");
        })
    };
    let started = std::time::Instant::now();
    waker.wait();
    writer.join().unwrap();
    assert!(started.elapsed() < POLL_INTERVAL, "woken by inotify, not by the poll timeout: {:?}", started.elapsed());
}
