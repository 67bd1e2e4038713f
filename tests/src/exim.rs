//! A real Exim daemon for tests: a self-contained configuration written to a
//! temporary directory, and `exim4 -C <conf> -bdf -oX 25` started inside a
//! network namespace the test created.
//!
//! The configuration is shaped like a cPanel host where it matters to
//! fleetban: cPanel's always-on log selectors (`+incoming_port
//! +smtp_connection +all_parents`) plus `+incoming_interface +smtp_no_mail
//! +smtp_protocol_error +smtp_syntax_error +pid +connection_reject
//! +smtp_incomplete_transaction`, a slot ceiling (`smtp_accept_max`), and
//! the main log at `<dir>/exim_mainlog` (cPanel's file name, via
//! `log_file_path = <dir>/exim_%slog`). Exim 4.96 has no `lost_after_dot`
//! selector (it refuses the configuration); the `SMTP connection lost after
//! final dot` line is written without it. Everything else keeps the test
//! hermetic: no DNS (`host_lookup` and `rfc1413_hosts` empty, no DNS lists,
//! no `dnslookup` router), no TLS (`tls_advertise_hosts` empty), UTC
//! timestamps (`timezone = UTC`), the spool and the mailbox in the temporary
//! directory, no queue runner, and a short `smtp_receive_timeout` so that a
//! held connection ends (`SMTP command timeout`) within a test.
//!
//! # Running Exim with `-C` here
//!
//! Exim honours `-C <file>` fully only for root (or the Exim user), or for
//! files listed in the build's `TRUSTED_CONFIG_LIST`; anyone else gets the
//! configuration with privileges dropped (`exim user lost privilege for
//! using -C option`) and cannot run a daemon on port 25. Debian's
//! `exim4-daemon-heavy` 4.96 has no `TRUSTED_CONFIG_LIST` (`exim4 -bV` names
//! none) and answers `exim: permission denied` to `-bd` from `nobody`; from
//! root it accepts `-C` for a root-owned file anywhere. So the tests run as
//! root (they need root for namespaces and nftables anyway), and the
//! configuration sets `exim_user = root` and
//! `exim_group = root`, so that the spool in a root-owned temporary directory
//! needs no ownership changes. Deliveries may not run as root (Debian builds
//! with `FIXED_NEVER_USERS=root`), so the local transport runs as `nobody`
//! and appends to `<dir>/mail/mailbox` in a world-writable directory.
//!
//! The daemon runs in the foreground (`-bdf`) in its own process group; its
//! per-connection children inherit the group, and [`EximDaemon`] kills the
//! whole group on drop, so no held session outlives the test.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// Why the daemon could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EximError {
    /// No Exim binary on this machine.
    #[error(
        "no Exim binary (looked for exim4 and exim on PATH, /usr/sbin/exim4, /usr/sbin/exim): install \
         exim4-daemon-heavy (Debian/Ubuntu)"
    )]
    Missing,
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `exim -bV` refused the configuration.
    #[error("exim rejected the configuration {conf}: {stderr}")]
    BadConfig {
        /// The configuration file.
        conf: PathBuf,
        /// What Exim printed.
        stderr: String,
    },
    /// The daemon did not log that it started.
    #[error("the Exim daemon did not start within {secs} s; main log: {log}; panic log: {panic}")]
    NotStarted {
        /// How long we waited.
        secs: u64,
        /// The main log's text.
        log: String,
        /// The panic log's text.
        panic: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EximError {
    let what = what.into();
    move |source| EximError::Io { what, source }
}

/// Settings of one daemon.
#[derive(Debug, Clone)]
pub struct EximOptions {
    /// `primary_hostname` (the banner's name).
    pub hostname: String,
    /// `smtp_accept_max`: the connection slots.
    pub smtp_accept_max: u32,
    /// `smtp_receive_timeout`, seconds: a silent connection is dropped
    /// (`SMTP command timeout`) after this long.
    pub receive_timeout_secs: u32,
    /// `smtp_max_synprot_errors` (Exim's default is 3).
    pub max_synprot_errors: u32,
    /// `smtp_accept_max_nonmail` (Exim's default is 10).
    pub max_nonmail: u32,
    /// Addresses the connect ACL drops (`drop hosts = ...`), for the
    /// `closed by DROP in ACL` form; empty for none.
    pub drop_hosts: Vec<String>,
}

impl Default for EximOptions {
    fn default() -> Self {
        EximOptions {
            hostname: "mx.example.net".into(),
            smtp_accept_max: 20,
            receive_timeout_secs: 10,
            max_synprot_errors: 3,
            max_nonmail: 3,
            drop_hosts: Vec::new(),
        }
    }
}

/// The Exim binary: `exim4` or `exim` on `PATH`, else `/usr/sbin/exim4` or
/// `/usr/sbin/exim`.
pub fn binary() -> Result<PathBuf, EximError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["exim4", "exim"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    for p in ["/usr/sbin/exim4", "/usr/sbin/exim"] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(EximError::Missing)
}

/// The configuration text for a daemon whose files live under `dir`.
pub fn config_text(dir: &Path, options: &EximOptions) -> String {
    let d = dir.display();
    let drop_acl = if options.drop_hosts.is_empty() {
        String::new()
    } else {
        format!("  drop hosts = <; {}\n", options.drop_hosts.join(" ; "))
    };
    format!(
        "# Written by fleetban's test harness (tests/src/exim.rs).
primary_hostname = {host}
qualify_domain = example.net
domainlist local_domains = example.net
exim_user = root
exim_group = root
keep_environment =
timezone = UTC
spool_directory = {d}/spool
log_file_path = {d}/exim_%slog
pid_file_path = {d}/exim.pid
log_selector = +all_parents +incoming_port +incoming_interface +smtp_connection +smtp_no_mail \\
  +smtp_protocol_error +smtp_syntax_error +pid +connection_reject +smtp_incomplete_transaction
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
smtp_accept_max = {max}
smtp_receive_timeout = {timeout}s
smtp_max_synprot_errors = {synprot}
smtp_accept_max_nonmail = {nonmail}
acl_smtp_connect = acl_check_connect
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_connect:
{drop_acl}  accept

acl_check_rcpt:
  accept domains = +local_domains
  deny message = relay not permitted

begin routers

local_user:
  driver = accept
  domains = +local_domains
  transport = mailbox

begin transports

mailbox:
  driver = appendfile
  file = {d}/mail/mailbox
  user = nobody
  mode = 0666

begin retry

* * F,1h,15m
",
        host = options.hostname,
        max = options.smtp_accept_max,
        timeout = options.receive_timeout_secs,
        synprot = options.max_synprot_errors,
        nonmail = options.max_nonmail,
    )
}

/// Writes the configuration and the directories it names under `dir`;
/// returns the configuration file. Checks it with `exim -bV -C`.
pub fn write_config(exim: &Path, dir: &Path, options: &EximOptions) -> Result<PathBuf, EximError> {
    for sub in ["spool", "mail"] {
        fs::create_dir_all(dir.join(sub)).map_err(io(format!("create {}/{sub}", dir.display())))?;
    }
    // The transport runs as nobody: it must reach and write the mailbox.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io(format!("chmod {}", dir.display())))?;
    fs::set_permissions(dir.join("mail"), fs::Permissions::from_mode(0o1777))
        .map_err(io(format!("chmod {}/mail", dir.display())))?;
    let conf = dir.join("exim.conf");
    fs::write(&conf, config_text(dir, options)).map_err(io(format!("write {}", conf.display())))?;
    // The main log exists before the daemon starts, so a tailer can open it.
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("exim_mainlog"))
        .map_err(io("create exim_mainlog"))?;
    let out =
        Command::new(exim).arg("-C").arg(&conf).arg("-bV").output().map_err(io(format!("{} -bV", exim.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("configuration error") {
        return Err(EximError::BadConfig { conf, stderr: stderr.trim().to_owned() });
    }
    Ok(conf)
}

/// A running daemon; dropping it kills it and every session it forked.
#[derive(Debug)]
pub struct EximDaemon {
    child: Option<Child>,
    dir: PathBuf,
}

impl EximDaemon {
    /// Writes the configuration under `dir` and starts `exim -C conf -bdf
    /// -oX port` inside `ns`; returns once the main log says the daemon
    /// listens (at most 10 s).
    pub fn start(ns: &Netns, dir: &Path, port: u16, options: &EximOptions) -> Result<EximDaemon, EximError> {
        let exim = binary()?;
        let conf = write_config(&exim, dir, options)?;
        let out = fs::File::create(dir.join("exim.out")).map_err(io("create exim.out"))?;
        let err = out.try_clone().map_err(io("dup exim.out"))?;
        let mut cmd = ns.command(exim.to_str().unwrap_or("exim4"));
        cmd.arg("-C").arg(&conf).args(["-bdf", "-oX", &port.to_string()]);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().map_err(io(format!("start {}", exim.display())))?;
        let daemon = EximDaemon { child: Some(child), dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if daemon.main_log_text().contains("daemon started") {
                return Ok(daemon);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(EximError::NotStarted {
            secs: 10,
            log: daemon.main_log_text(),
            panic: fs::read_to_string(dir.join("exim_paniclog")).unwrap_or_default(),
        })
    }

    /// The main log (`<dir>/exim_mainlog`).
    pub fn main_log(&self) -> PathBuf {
        self.dir.join("exim_mainlog")
    }

    /// The main log's text so far (empty if unreadable).
    pub fn main_log_text(&self) -> String {
        fs::read_to_string(self.main_log()).unwrap_or_default()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the daemon and its sessions (`SIGKILL` to its process group)
    /// and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The daemon leads its own process group (`process_group(0)`);
            // its sessions are in it.
            // SAFETY: kill(2) on the process group of a child we own.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EximDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One SMTP client session (a test's side of the dialogue).
#[derive(Debug)]
pub struct Session {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Session {
    /// Connects to `to` from `from` (any port), waiting at most `timeout`
    /// for the connection and for each reply afterwards.
    pub fn connect(to: SocketAddr, from: IpAddr, timeout: Duration) -> std::io::Result<Session> {
        let stream = crate::sock::connect(to, Some(from), timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Session { stream, reader })
    }

    /// The client's own port (what Exim logs as `[ip]:port`).
    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map_or(0, |a| a.port())
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Reads one (possibly multi-line) reply: its code and its last line.
    /// End of stream is an `UnexpectedEof` error.
    pub fn reply(&mut self) -> std::io::Result<(u16, String)> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
            let Some(code) = code else {
                return Err(std::io::Error::other(format!("not an SMTP reply: {line:?}")));
            };
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line.trim_end().to_owned()));
            }
        }
    }

    /// Sends `line` (without CRLF) and reads the reply.
    pub fn command(&mut self, line: &str) -> std::io::Result<(u16, String)> {
        self.send(line)?;
        self.reply()
    }

    /// Sends `line` followed by CRLF without reading a reply.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(format!("{line}\r\n").as_bytes())
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }
}

/// How a polite session (banner, `EHLO`, `QUIT`) went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polite {
    /// `220` banner, `250` to EHLO, `221` to QUIT.
    Completed,
    /// The connection was accepted but the banner was not 220 (e.g. `421`
    /// while the host is full).
    Refused(u16),
    /// No TCP connection, or a broken dialogue.
    Failed(String),
}

/// One polite session from `from` to `to`, `helo` as the EHLO name.
pub fn polite_session(to: SocketAddr, from: IpAddr, helo: &str, timeout: Duration) -> Polite {
    let run = || -> std::io::Result<Polite> {
        let mut s = Session::connect(to, from, timeout)?;
        let (code, _) = s.reply()?;
        if code != 220 {
            return Ok(Polite::Refused(code));
        }
        let (code, text) = s.command(&format!("EHLO {helo}"))?;
        if code != 250 {
            return Ok(Polite::Failed(format!("EHLO answered {text}")));
        }
        let (code, text) = s.command("QUIT")?;
        if code != 221 {
            return Ok(Polite::Failed(format!("QUIT answered {text}")));
        }
        Ok(Polite::Completed)
    };
    run().unwrap_or_else(|error| Polite::Failed(error.to_string()))
}

/// The process ids of `pid`'s children (Exim's per-connection processes,
/// for a daemon's pid): every process in `/proc` whose parent is `pid`.
/// (`/proc/<pid>/task/<pid>/children` is not reliable while the children
/// run, so it is not used.)
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// The process of `daemon_pid` that serves the session from client port
/// `client_port`: the child holding the socket whose remote port it is
/// (from the daemon's network namespace's `/proc/<pid>/net/tcp{,6}`).
pub fn session_pid(daemon_pid: u32, client_port: u16) -> Option<u32> {
    let port = format!(":{client_port:04X}");
    let mut inodes = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{daemon_pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[2].ends_with(&port) && f[1].ends_with(":0019") {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    children(daemon_pid).into_iter().find(|child| {
        fs::read_dir(format!("/proc/{child}/fd")).into_iter().flatten().flatten().any(|fd| {
            fs::read_link(fd.path()).is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
        })
    })
}
