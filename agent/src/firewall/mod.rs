//! The local firewall: backends that hold blocked ranges in the kernel (or in
//! CSF), and the [`reconcile::Reconciler`] that keeps them equal to the
//! desired set.
//!
//! Every backend implements [`Backend`]: it creates what it owns without
//! touching entries ([`Backend::setup`]), reads its real contents back
//! ([`Backend::read`]), stages additions and removals and applies them in one
//! batch ([`Backend::commit`]), leaves its entries in place on
//! [`Backend::shutdown`] (they expire by their own timeouts) and removes
//! everything it owns only on [`Backend::flush`]
//! (`fleetban-agent firewall flush`).
//!
//! Backends: [`nftables`] (own `table inet fleetban`), [`ipset`] (`hash:net`
//! sets plus one iptables rule per family), [`csf`] (`csf -td`/`-d`, only
//! entries carrying the `fleetban:` comment prefix), [`dryrun`] (writes the
//! set it would hold to a JSON file).
//!
//! Invariant shared by all backends: the entries staged for one commit are
//! disjoint CIDRs (the reconciler's [`plan`] makes them so), each with the
//! absolute expiry it must carry; a backend turns that into the remaining
//! timeout at commit time.

pub mod csf;
pub mod dryrun;
pub mod inspect;
pub mod ipset;
pub mod kill;
pub mod lengths;
pub mod nftables;
pub mod plan;
pub mod reconcile;
pub mod state;
pub mod worker;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use crate::config::{AgentConfig, FirewallBackend, FirewallScope};

pub use crate::config::SMTP_PORTS;

/// Errors of a firewall backend.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// A command could not be started (not installed, not on `PATH`).
    #[error("cannot run `{program}`: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A command exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line (arguments only, never stdin).
        command: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr (truncated).
        stderr: String,
    },
    /// A command's output could not be understood.
    #[error("cannot understand the output of `{program}`: {message}")]
    Parse {
        /// The program.
        program: String,
        /// What was wrong.
        message: String,
    },
    /// A state file could not be read or written.
    #[error("firewall state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One blocked range, desired or read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The range (host bits zero).
    pub net: IpNet,
    /// Absolute expiry, unix milliseconds; `None` = never.
    pub expires_at_ms: Option<i64>,
    /// Why (a rule name or the server's reason); empty when read back from a
    /// backend that does not keep it.
    pub reason: String,
}

impl Entry {
    /// The remaining lifetime at `now_ms`, in whole seconds rounded up, at
    /// least 1; `None` = permanent.
    pub fn remaining_secs(&self, now_ms: i64) -> Option<u64> {
        self.expires_at_ms.map(|at| (at.saturating_sub(now_ms).max(1) as u64).div_ceil(1000))
    }
}

/// A firewall backend. See the module documentation.
pub trait Backend: Send {
    /// Short name for logs and status (`nftables`, `ipset`, `csf`, `dry-run`).
    fn name(&self) -> &'static str;
    /// Creates the tables, sets and rules the backend owns if they are
    /// missing, and makes the rules match the scope. Never removes entries.
    fn setup(&mut self) -> Result<(), FirewallError>;
    /// Reads the entries the backend really holds (only its own).
    fn read(&mut self, now_ms: i64) -> Result<Vec<Entry>, FirewallError>;
    /// The backend's staging area, which [`Backend::commit`] empties.
    fn staged(&mut self) -> &mut Staged;
    /// Stages an addition (or a new expiry, after a staged removal of the
    /// same range).
    fn stage_add(&mut self, entry: Entry) {
        self.staged().adds.push(entry);
    }
    /// Stages a removal of an entry the backend holds.
    fn stage_remove(&mut self, entry: Entry) {
        self.staged().removes.push(entry);
    }
    /// Applies everything staged, removals first, as one batch where the
    /// backend allows; the staging area is empty afterwards, whatever the
    /// outcome.
    fn commit(&mut self, now_ms: i64) -> Result<(), FirewallError>;
    /// The agent stops: entries stay in place and expire by their timeouts.
    fn shutdown(&mut self) -> Result<(), FirewallError> {
        Ok(())
    }
    /// Removes every entry, set, table and rule the backend owns.
    fn flush(&mut self) -> Result<(), FirewallError>;
}

/// The changes a backend has staged for its next commit.
#[derive(Debug, Clone, Default)]
pub struct Staged {
    adds: Vec<Entry>,
    removes: Vec<Entry>,
}

impl Staged {
    /// Takes everything staged as `(removals, additions)`, leaving the
    /// staging area empty.
    pub fn take(&mut self) -> (Vec<Entry>, Vec<Entry>) {
        (std::mem::take(&mut self.removes), std::mem::take(&mut self.adds))
    }

    /// Like [`Staged::take`], `None` when nothing is staged (a backend
    /// whose tool runs one script per commit then runs nothing).
    pub fn take_batch(&mut self) -> Option<(Vec<Entry>, Vec<Entry>)> {
        let batch = self.take();
        (!batch.0.is_empty() || !batch.1.is_empty()).then_some(batch)
    }
}

/// How backends run their commands: directly, or inside a network namespace
/// (`ip netns exec NAME ...`, used by the tests and benchmarks).
#[derive(Debug, Clone, Default)]
pub struct Exec {
    /// Network namespace to run in; `None` = the agent's own.
    pub netns: Option<String>,
}

impl Exec {
    /// Runs `program args`, feeding `stdin`, and returns stdout.
    pub fn run(&self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, FirewallError> {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns, program]);
                command
            }
            None => Command::new(program),
        };
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child =
            command.spawn().map_err(|source| FirewallError::Spawn { program: program.to_owned(), source })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A write error shows up as the command's failure below.
            let _ = pipe.write_all(input);
        }
        let output =
            child.wait_with_output().map_err(|source| FirewallError::Spawn { program: program.to_owned(), source })?;
        if output.status.success() {
            Ok(output.stdout)
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let stderr = fleetban_proto::text::truncate(stderr.trim(), 2000).to_owned();
            Err(FirewallError::Failed {
                command: format!("{program} {}", args.join(" ")),
                status: output.status.to_string(),
                stderr,
            })
        }
    }
}

/// Builds the configured backend.
pub fn backend_for(config: &AgentConfig, exec: Exec) -> Box<dyn Backend> {
    let ports = config.covered_ports();
    match config.firewall.backend {
        FirewallBackend::Nftables => Box::new(nftables::Nftables::new(config.firewall.scope, exec).with_ports(ports)),
        FirewallBackend::Ipset => Box::new(ipset::Ipset::new(config.firewall.scope, exec).with_ports(ports)),
        kind => backend_of(kind, config.firewall.scope, config.state_dir.clone(), exec),
    }
}

/// Builds a backend by kind, covering the default SMTP ports in the `smtp`
/// scope.
pub fn backend_of(kind: FirewallBackend, scope: FirewallScope, state_dir: PathBuf, exec: Exec) -> Box<dyn Backend> {
    match kind {
        FirewallBackend::Nftables => Box::new(nftables::Nftables::new(scope, exec)),
        FirewallBackend::Ipset => Box::new(ipset::Ipset::new(scope, exec)),
        FirewallBackend::Csf => Box::new(csf::Csf::new(csf::CsfOptions::default())),
        FirewallBackend::DryRun => Box::new(dryrun::DryRun::new(state_dir.join(dryrun::FILE_NAME))),
    }
}

/// The current time, unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// Formats a range the way firewall tools print it: a host without `/32`
/// or `/128`.
pub fn display_net(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() { net.addr().to_string() } else { net.to_string() }
}

/// Parses `a.b.c.d`, `a.b.c.d/n`, `v6` or `v6/n` into a range, refusing host
/// bits.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(text.parse::<std::net::IpAddr>().ok()?),
    };
    (net.trunc() == net).then_some(net)
}
