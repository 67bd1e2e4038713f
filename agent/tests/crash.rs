//! Crash test: a real `fleetban-agent run` child is killed with SIGKILL at
//! random moments while lines are appended and the log is rotated (rename,
//! copytruncate, rename + gzip). After the last restart has caught up, the
//! spool must hold the event of every line exactly once, in log order.
//!
//! The seed is printed; set `FLEETBAN_CRASH_SEED` to replay a run and
//! `FLEETBAN_CRASH_ITERATIONS` to change the number of kills (default 60).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetban_agent::spool;
use fleetban_agent::tail::fingerprint_file;

struct Log {
    path: PathBuf,
    n: u64,
    expected: Vec<String>,
    rotations: [u32; 3],
}

impl Log {
    fn line(n: u64) -> String {
        let port = 1024 + n % 60000;
        format!(
            "2026-11-27 01:57:50.{:03} [{}] dovecot_plain authenticator failed for (scanner.invalid) [192.0.2.110]:{port} I=[192.0.2.10]:25: 535 Incorrect authentication data (set_id=n{n}@example.test)\n",
            n % 1000,
            1000 + n % 5000
        )
    }

    fn append(&mut self, rng: &mut fastrand::Rng, count: usize) {
        let mut file = OpenOptions::new().create(true).append(true).open(&self.path).expect("open log");
        for _ in 0..count {
            self.n += 1;
            let line = Self::line(self.n);
            self.expected.push(format!("n{}@example.test", self.n));
            if rng.u8(0..10) == 0 {
                // A line written in two parts: the reader sees it partial.
                let (head, tail) = line.split_at(rng.usize(1..line.len()));
                file.write_all(head.as_bytes()).expect("write");
                file.flush().expect("flush");
                std::thread::sleep(Duration::from_micros(rng.u64(0..2000)));
                file.write_all(tail.as_bytes()).expect("write");
            } else {
                file.write_all(line.as_bytes()).expect("write");
            }
            match rng.u8(0..8) {
                // Lines without events move the position too.
                0 => file.write_all(b"2026-11-27 01:57:51 Start queue run: pid=4242\n").expect("write"),
                1 => file.write_all(b"  a continuation line\n").expect("write"),
                _ => {}
            }
        }
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        self.path.with_file_name(format!("exim_mainlog{suffix}"))
    }

    fn rotate(&mut self, rng: &mut fastrand::Rng) {
        let kind = rng.usize(0..3);
        self.rotations[kind] += 1;
        let old_inode = inode(&self.path);
        match kind {
            0 => {
                std::fs::rename(&self.path, self.sibling(".1")).expect("rename");
                File::create(&self.path).expect("create");
                assert_ne!(inode(&self.path), old_inode, "precondition: rename rotation changes the inode");
            }
            1 => {
                std::fs::copy(&self.path, self.sibling(".1")).expect("copy");
                OpenOptions::new().write(true).open(&self.path).expect("open").set_len(0).expect("truncate");
                assert_eq!(inode(&self.path), old_inode, "precondition: copytruncate keeps the inode");
            }
            _ => {
                let plain = self.sibling(".1");
                std::fs::rename(&self.path, &plain).expect("rename");
                File::create(&self.path).expect("create");
                let content = std::fs::read(&plain).expect("read rotated");
                let gz = self.sibling(".1.gz");
                let mut encoder =
                    flate2::write::GzEncoder::new(File::create(&gz).expect("create gz"), flate2::Compression::fast());
                encoder.write_all(&content).expect("compress");
                encoder.finish().expect("finish gz");
                std::fs::remove_file(&plain).expect("remove rotated");
                assert_ne!(inode(&self.path), old_inode, "precondition: gzip rotation changes the inode");
            }
        }
    }
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").ino()
}

struct Agent {
    config: PathBuf,
    spool: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn spawn(&self) -> Child {
        Command::new(env!("CARGO_BIN_EXE_fleetban-agent"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn agent")
    }

    /// The durable checkpoint of the log.
    fn checkpoint(&self) -> Option<(u64, u64)> {
        let snapshot = spool::inspect(&self.spool).ok()?;
        let position = snapshot.positions.get(self.log.to_str()?)?;
        Some((position.fingerprint, position.offset))
    }

    /// Rotating again is safe once the agent has checkpointed the current file.
    fn in_current_file(&self) -> bool {
        let current = fingerprint_file(&self.log);
        current.is_some() && self.checkpoint().map(|(fingerprint, _)| fingerprint) == current
    }

    fn caught_up(&self) -> bool {
        let len = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        self.in_current_file() && self.checkpoint().map(|(_, offset)| offset) == Some(len)
    }
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let seed = std::env::var("FLEETBAN_CRASH_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let iterations: usize = std::env::var("FLEETBAN_CRASH_ITERATIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(60);
    println!("FLEETBAN_CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("exim_mainlog");
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"http://127.0.0.1:9\"\nstate_dir = \"{}\"\ntimezone = \"UTC\"\n\n[[source]]\npath = \"{}\"\nstart_at = \"beginning\"\n\n[spool]\nfsync_ms = 20\n\n[firewall]\nbackend = \"dry-run\"\n",
            state.display(),
            log_path.display()
        ),
    )
    .expect("write config");
    let agent = Agent { config, spool: state.join("spool"), log: log_path.clone() };
    let mut log = Log { path: log_path, n: 0, expected: Vec::new(), rotations: [0; 3] };
    log.append(&mut rng, 5);

    let started = Instant::now();
    for _ in 0..iterations {
        let mut child = agent.spawn();
        let run_for = Duration::from_millis(rng.u64(5..250));
        let rotate_at = rng.bool().then(|| Duration::from_millis(rng.u64(0..250)));
        let began = Instant::now();
        let mut rotated = false;
        while began.elapsed() < run_for {
            let count = rng.usize(1..40);
            log.append(&mut rng, count);
            if !rotated && rotate_at.is_some_and(|at| began.elapsed() >= at) && agent.in_current_file() {
                log.rotate(&mut rng);
                rotated = true;
            }
            std::thread::sleep(Duration::from_millis(rng.u64(0..5)));
        }
        child.kill().expect("SIGKILL the agent");
        child.wait().expect("reap the agent");
        if rng.bool() {
            // Lines written while no agent runs.
            let count = rng.usize(1..40);
            log.append(&mut rng, count);
        }
    }

    // The final run must catch up with everything, then stop cleanly. The
    // current file gets lines first: a rotation just before the last kill
    // can leave it empty, and an empty file has no fingerprint to be caught
    // up with.
    log.append(&mut rng, 5);
    let mut child = agent.spawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !agent.caught_up() {
        assert!(Instant::now() < deadline, "agent did not catch up (seed {seed})");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = child.wait().expect("reap the agent");
    assert!(status.success(), "graceful stop failed: {status}");

    let spooled: Vec<String> = spool::read_all(&agent.spool)
        .expect("read spool")
        .into_iter()
        .flat_map(|batch| batch.events)
        .map(|event| event.auth_user)
        .collect();
    println!(
        "{iterations} kills in {:?}, {} lines, rotations (rename, copytruncate, gzip) = {:?}",
        started.elapsed(),
        log.expected.len(),
        log.rotations
    );
    assert!(log.rotations.iter().sum::<u32>() > 0, "the run rotated the log");
    if spooled != log.expected {
        let missing: Vec<_> = log.expected.iter().filter(|line| !spooled.contains(line)).take(10).collect();
        let mut seen = std::collections::HashSet::new();
        let doubled: Vec<_> = spooled.iter().filter(|line| !seen.insert(*line)).take(10).collect();
        panic!(
            "seed {seed}: spool holds {} events, {} lines written; missing {missing:?}; doubled {doubled:?}",
            spooled.len(),
            log.expected.len()
        );
    }
}
