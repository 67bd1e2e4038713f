//! A real Dovecot (IMAP and POP3) for tests: a throwaway configuration in a
//! temporary directory, `dovecot -F -c <conf>` started inside a network
//! namespace the test created, and minimal IMAP/POP3 clients.
//!
//! The configuration is self-contained: `base_dir` and `state_dir` under the
//! directory, one `passwd-file` user ([`USER`], password [`PASSWORD`]),
//! plaintext logins allowed without TLS (`ssl = no`), IMAP on 143 and POP3
//! on 110 of the given address, and Dovecot's own `log_path` (the default
//! `log_timestamp`, `Mon DD HH:MM:SS`) at `<dir>/dovecot.log`, the file the
//! agent tails as a `dovecot` source. `auth_failure_delay = 0` keeps a test
//! short; Dovecot still writes one line per session with the number of
//! failed attempts.
//!
//! The master runs in the foreground in its own process group, its
//! children inherit it, and [`DovecotDaemon`] kills the whole group on drop.
//! Needs root (the login processes chroot and drop to `dovenull`).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// The one mailbox user.
pub const USER: &str = "alice";
/// Its password.
pub const PASSWORD: &str = "correct-horse";
/// IMAP port.
pub const IMAP_PORT: u16 = 143;
/// POP3 port.
pub const POP3_PORT: u16 = 110;

/// Why the daemon could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DovecotError {
    /// No Dovecot binary on this machine.
    #[error("no dovecot binary (/usr/sbin/dovecot): install dovecot-imapd and dovecot-pop3d")]
    Missing,
    /// A file or process operation failed.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        error: std::io::Error,
    },
    /// The daemon did not start listening in time.
    #[error("dovecot did not listen on {addr} within {secs} s; its log:\n{log}")]
    NotStarted {
        /// The address it should listen on.
        addr: SocketAddr,
        /// The wait.
        secs: u64,
        /// Its log so far.
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DovecotError {
    let what = what.into();
    move |error| DovecotError::Io { what, error }
}

/// The Dovecot binary.
pub fn binary() -> Result<PathBuf, DovecotError> {
    ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or(DovecotError::Missing)
}

/// The configuration text for a daemon under `dir` listening on `listen`.
pub fn config_text(dir: &Path, listen: IpAddr) -> String {
    let d = dir.display();
    format!(
        "base_dir = {d}/dovecot-run\nstate_dir = {d}/dovecot-state\n\
         log_path = {d}/dovecot.log\ninfo_log_path = {d}/dovecot.log\n\
         protocols = imap pop3\nlisten = {listen}\nssl = no\ndisable_plaintext_auth = no\n\
         auth_mechanisms = plain login\nauth_failure_delay = 0\n\
         mail_location = maildir:{d}/dovecot-mail/%u\n\
         passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {d}/dovecot-passwd\n}}\n\
         userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={d}/dovecot-mail/%u\n}}\n\
         service imap-login {{\n  inet_listener imap {{\n    port = {IMAP_PORT}\n  }}\n  inet_listener imaps {{\n    port = 0\n  }}\n}}\n\
         service pop3-login {{\n  inet_listener pop3 {{\n    port = {POP3_PORT}\n  }}\n  inet_listener pop3s {{\n    port = 0\n  }}\n}}\n\
         service anvil {{\n  chroot =\n}}\n"
    )
}

/// A running Dovecot; dropping it kills it and its children.
#[derive(Debug)]
pub struct DovecotDaemon {
    child: Option<Child>,
    dir: PathBuf,
}

impl DovecotDaemon {
    /// Writes the configuration under `dir` (with `extra` lines appended)
    /// and starts Dovecot inside `ns` on `listen`; returns once IMAP answers
    /// (at most 10 s).
    pub fn start(ns: &Netns, dir: &Path, listen: IpAddr, extra: &str) -> Result<DovecotDaemon, DovecotError> {
        let bin = binary()?;
        for sub in ["dovecot-run", "dovecot-state", "dovecot-mail"] {
            fs::create_dir_all(dir.join(sub)).map_err(io(format!("create {sub}")))?;
        }
        fs::set_permissions(dir.join("dovecot-mail"), fs::Permissions::from_mode(0o777))
            .map_err(io("chmod dovecot-mail"))?;
        fs::write(dir.join("dovecot-passwd"), format!("{USER}:{{PLAIN}}{PASSWORD}\n"))
            .map_err(io("write dovecot-passwd"))?;
        let conf = dir.join("dovecot.conf");
        fs::write(&conf, format!("{}{extra}\n", config_text(dir, listen))).map_err(io("write dovecot.conf"))?;
        let out = fs::File::create(dir.join("dovecot.out")).map_err(io("create dovecot.out"))?;
        let err = out.try_clone().map_err(io("dup dovecot.out"))?;
        let mut cmd = ns.command(bin.to_str().unwrap_or("dovecot"));
        cmd.arg("-F").arg("-c").arg(&conf);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().map_err(io(format!("start {}", bin.display())))?;
        let daemon = DovecotDaemon { child: Some(child), dir: dir.to_path_buf() };
        let addr = SocketAddr::new(listen, IMAP_PORT);
        let up = ns
            .spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                false
            })
            .join()
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if !up {
            let log =
                format!("{}{}", daemon.log_text(), fs::read_to_string(dir.join("dovecot.out")).unwrap_or_default());
            return Err(DovecotError::NotStarted { addr, secs: 10, log });
        }
        Ok(daemon)
    }

    /// Dovecot's log (`<dir>/dovecot.log`).
    pub fn log(&self) -> PathBuf {
        self.dir.join("dovecot.log")
    }

    /// The log's text so far (empty if unreadable).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Kills the master and its children (`SIGKILL` to the process group).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the process group of a child we own
            // (`process_group(0)` made it the leader).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DovecotDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The longest wait for one reply: Dovecot's auth penalty delays an
/// address's failed logins by up to 15 s each.
const SESSION_TIMEOUT: Duration = Duration::from_secs(40);

/// How a login went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// The server accepted the password.
    Ok,
    /// The server refused it.
    Refused,
}

fn connect(to: SocketAddr, from: IpAddr, timeout: Duration) -> std::io::Result<(BufReader<TcpStream>, TcpStream)> {
    let stream = crate::sock::connect(to, Some(from), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok((BufReader::new(stream.try_clone()?), stream))
}

fn read_line(r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(line)
}

/// One IMAP session from `from`: a `LOGIN` per password, in order, then
/// `LOGOUT`. Returns each login's outcome.
pub fn imap_logins(to: SocketAddr, from: IpAddr, user: &str, passwords: &[&str]) -> std::io::Result<Vec<Login>> {
    let (mut r, mut w) = connect(to, from, SESSION_TIMEOUT)?;
    read_line(&mut r)?; // greeting
    let mut out = Vec::new();
    for (i, password) in passwords.iter().enumerate() {
        write!(w, "a{i} LOGIN \"{user}\" \"{password}\"\r\n")?;
        let tag = format!("a{i} ");
        loop {
            let line = read_line(&mut r)?;
            if let Some(rest) = line.strip_prefix(&tag) {
                out.push(if rest.starts_with("OK") { Login::Ok } else { Login::Refused });
                break;
            }
        }
        if out.last() == Some(&Login::Ok) {
            break;
        }
    }
    write!(w, "z LOGOUT\r\n")?;
    while let Ok(line) = read_line(&mut r) {
        if line.starts_with("z ") {
            break;
        }
    }
    Ok(out)
}

/// One POP3 session from `from`: `USER`/`PASS` per password, then `QUIT`.
pub fn pop3_logins(to: SocketAddr, from: IpAddr, user: &str, passwords: &[&str]) -> std::io::Result<Vec<Login>> {
    let (mut r, mut w) = connect(to, from, SESSION_TIMEOUT)?;
    read_line(&mut r)?; // greeting
    let mut out = Vec::new();
    for password in passwords {
        write!(w, "USER {user}\r\n")?;
        read_line(&mut r)?;
        write!(w, "PASS {password}\r\n")?;
        let reply = read_line(&mut r)?;
        out.push(if reply.starts_with("+OK") { Login::Ok } else { Login::Refused });
        if out.last() == Some(&Login::Ok) {
            break;
        }
    }
    write!(w, "QUIT\r\n")?;
    let _ = read_line(&mut r);
    Ok(out)
}
