//! A throwaway PostgreSQL cluster for the demo and for tests.
//!
//! When no database URL is given, fleetban starts its own cluster with the
//! system's `initdb` and `postgres` (found on `PATH` or in
//! `/usr/lib/postgresql/*/bin`) in a private directory under the temp dir,
//! listening on `127.0.0.1` on a free port, and removes it again when the
//! [`EmbeddedPostgres`] is dropped.
//!
//! Invariants:
//! - The `postgres` process never outlives the process that started it: it is
//!   spawned from one long-lived spawner thread with `PR_SET_PDEATHSIG`, so it
//!   is killed even if the owner is killed with SIGKILL. Directories left by
//!   such owners are swept at the next start.
//! - PostgreSQL refuses to run as root; when we are root the cluster runs as
//!   the `postgres` user if it exists, otherwise as `nobody`.
//! - The cluster trades durability for speed (`fsync=off`): it is for demos
//!   and tests, never for a fleet's data.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The database user and database name of an embedded cluster.
pub const USER: &str = "fleetban";

const DIR_PREFIX: &str = "fleetban-pg-";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an embedded cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The PostgreSQL server binaries are not installed.
    #[error(
        "PostgreSQL server binaries (initdb, postgres, createdb) not found on PATH or in /usr/lib/postgresql/*/bin; \
         install them with `apt-get install postgresql` or set DATABASE_URL to an existing server"
    )]
    BinariesMissing,
    /// An I/O step (directory, process spawn) failed.
    #[error("embedded postgres: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// `initdb` or `postgres` exited with an error.
    #[error("embedded postgres: {what} failed: {log}")]
    Failed {
        /// Which step failed.
        what: &'static str,
        /// The tail of its output.
        log: String,
    },
    /// The server did not become ready in time.
    #[error("embedded postgres did not become ready within {0:?}: {1}")]
    Timeout(Duration, String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A running throwaway PostgreSQL cluster. Dropping it stops the server and
/// deletes its directory.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl EmbeddedPostgres {
    /// Creates and starts a new cluster. Blocking; call it from
    /// `spawn_blocking` in async code.
    pub fn start() -> Result<Self, Error> {
        let bin =
            find_bin_dir(std::env::var_os("PATH"), Path::new("/usr/lib/postgresql")).ok_or(Error::BinariesMissing)?;
        sweep_stale_dirs();
        let run_as = unprivileged_user();
        let dir = make_dir(run_as)?;
        let mut pg = EmbeddedPostgres { dir, bin, port: 0, run_as, child: None };
        pg.initdb()?;
        pg.launch()?;
        pg.createdb()?;
        Ok(pg)
    }

    /// The connection URL of the cluster's `fleetban` database.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{USER}", self.port)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's private directory (data in `data/`, log in `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server with a fast shutdown, keeping the data. `start_again`
    /// brings it back on the same port (failure drills restart Postgres).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT = fast shutdown: abort sessions, checkpoint, exit.
            // SAFETY: kill(2) on a pid we own; no memory is touched.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Starts a stopped server again on the same port.
    pub fn start_again(&mut self) -> Result<(), Error> {
        if self.child.is_none() {
            self.launch()?;
        }
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn initdb(&self) -> Result<(), Error> {
        let log = fs::File::create(self.dir.join("initdb.log")).map_err(io_err("create initdb.log"))?;
        chown(&self.dir.join("initdb.log"), self.run_as);
        let mut cmd = Command::new(self.bin.join("initdb"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", USER, "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("clone log handle"))?)
            .stderr(log)
            .env("TZ", "UTC");
        drop_privileges(&mut cmd, self.run_as);
        let status = cmd.status().map_err(io_err("run initdb"))?;
        if !status.success() {
            return Err(Error::Failed { what: "initdb", log: tail(&self.dir.join("initdb.log")) });
        }
        Ok(())
    }

    /// Creates the `fleetban` database that [`EmbeddedPostgres::url`] names.
    fn createdb(&self) -> Result<(), Error> {
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, USER])
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("run createdb"))?;
        if !out.status.success() {
            return Err(Error::Failed {
                what: "createdb",
                log: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    fn launch(&mut self) -> Result<(), Error> {
        if self.port == 0 {
            self.port = free_port().map_err(io_err("pick a free port"))?;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("open postgres.log"))?;
        chown(&self.log_path(), self.run_as);
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=400", "-c", "shared_buffers=128MB"])
            .args(["-c", "timezone=UTC", "-c", "log_min_messages=warning"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("clone log handle"))?)
            .stderr(log);
        drop_privileges(&mut cmd, self.run_as);
        // SAFETY: prctl(2) and setsid(2) are async-signal-safe and touch no
        // memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_from_keeper(cmd).map_err(io_err("spawn postgres"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until `postmaster.pid` says `ready` and the port accepts.
    fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let pid_file = self.data_dir().join("postmaster.pid");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(Error::Failed {
                    what: "postgres",
                    log: format!("exited with {status}: {}", tail(&self.log_path())),
                });
            }
            let ready = fs::read_to_string(&pid_file)
                .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(READY_TIMEOUT, tail(&self.log_path())));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// For test binaries: if `DATABASE_URL` is unset, starts one embedded cluster
/// for the life of the process and sets `DATABASE_URL` to it, so that
/// `#[sqlx::test]` works on a machine where nobody set up a database.
///
/// Call it from a `#[ctor]` function, before any thread is started: it sets
/// an environment variable. Panics (test setup only) with the reason when the
/// cluster cannot be started.
pub fn ensure_test_database_url() {
    if std::env::var_os("DATABASE_URL").is_some() {
        return;
    }
    static CLUSTER: OnceLock<EmbeddedPostgres> = OnceLock::new();
    let pg = CLUSTER.get_or_init(|| match EmbeddedPostgres::start() {
        Ok(pg) => pg,
        Err(error) => panic!("{error}"),
    });
    // SAFETY: called from a constructor before main, while the process has a
    // single thread, so no other thread reads the environment concurrently.
    unsafe { std::env::set_var("DATABASE_URL", pg.url()) };
}

/// The directory holding `initdb` and `postgres`: `PATH` first, then the
/// newest `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir(path: Option<std::ffi::OsString>, lib_root: &Path) -> Option<PathBuf> {
    let has_both = |dir: &Path| ["initdb", "postgres", "createdb"].iter().all(|b| dir.join(b).is_file());
    if let Some(path) = path {
        for dir in std::env::split_paths(&path) {
            if has_both(&dir) {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(lib_root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// `Some((uid, gid))` of the user to run as when we are root.
fn unprivileged_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    for name in ["postgres", "nobody"] {
        let Ok(cname) = CString::new(name) else { continue };
        // SAFETY: getpwnam returns a pointer into static storage or null; we
        // copy the two integers out immediately and keep no reference.
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: pw is non-null and points to a valid passwd record.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid));
        }
    }
    Some((65534, 65534))
}

fn drop_privileges(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        // SAFETY: setgroups/setgid/setuid are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // The environment of root (HOME=/root) is unreadable for the user.
        cmd.env("HOME", "/tmp");
    }
}

fn chown(path: &Path, run_as: Option<(u32, u32)>) {
    if let Some((uid, gid)) = run_as {
        let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
    }
}

fn make_dir(run_as: Option<(u32, u32)>) -> Result<PathBuf, Error> {
    static COUNTER: Mutex<u32> = Mutex::new(0);
    let n = {
        let mut c = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
        *c += 1;
        *c
    };
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err("chmod cluster dir"))?;
    chown(&dir, run_as);
    Ok(dir)
}

/// Removes cluster directories whose owning process no longer exists.
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        // SAFETY: kill(pid, 0) only checks for existence.
        let alive =
            unsafe { libc::kill(pid, 0) } == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not the process; spawning from a short-lived thread (a test thread, a
/// blocking-pool thread) would kill the server early.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("fleetban-pg-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static, so this loop never ends and
                // the thread stays alive until the process exits.
            })
            .map(|_| ())
            .unwrap_or(());
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("spawner thread is gone"))?;
    reply_rx.recv().map_err(|_| io::Error::other("spawner thread is gone"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_accepts_connections_restarts_and_cleans_up() {
        let mut pg = EmbeddedPostgres::start().expect("embedded postgres starts");
        let dir = pg.dir().to_path_buf();
        let port = pg.port();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        pg.stop();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "stopped server still accepts");
        pg.start_again().expect("restarts");
        assert_eq!(pg.port(), port);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(pg);
        assert!(!dir.exists(), "cluster directory {} left behind", dir.display());
    }

    #[test]
    fn binaries_are_found_on_path_then_newest_lib_dir_else_clear_error() {
        let root = std::env::temp_dir().join(format!("fleetban-pgbin-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for v in ["9", "15", "16"] {
            let bin = root.join("lib").join(v).join("bin");
            fs::create_dir_all(&bin).unwrap();
            for b in ["initdb", "postgres", "createdb"] {
                fs::write(bin.join(b), "").unwrap();
            }
        }
        // A lib dir without `postgres` does not count.
        fs::create_dir_all(root.join("lib/17/bin")).unwrap();
        fs::write(root.join("lib/17/bin/initdb"), "").unwrap();
        let empty_path = Some(std::ffi::OsString::from(root.join("nothing-here")));
        assert_eq!(find_bin_dir(empty_path.clone(), &root.join("lib")), Some(root.join("lib/16/bin")));
        assert_eq!(find_bin_dir(empty_path, &root.join("missing")), None);
        let on_path = Some(std::env::join_paths([root.join("lib/9/bin")]).unwrap());
        assert_eq!(find_bin_dir(on_path, &root.join("lib")), Some(root.join("lib/9/bin")));
        fs::remove_dir_all(&root).unwrap();

        let msg = Error::BinariesMissing.to_string();
        assert!(msg.contains("apt-get install postgresql") && !msg.contains('\n'), "{msg}");
    }
}
