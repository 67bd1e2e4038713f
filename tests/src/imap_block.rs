//! Failed IMAP logins against real Dovecot until the guesser is blocked on
//! its host and fleet-wide: the run `fleetban-imap-block` measures.
//!
//! One run on a [`Fleet`] of two mail hosts with real Dovecot
//! ([`FleetOptions::dovecot`](crate::fleet::FleetOptions::dovecot)): a fresh
//! attacker address (198.51.100.x, added to the attacker namespace for the
//! run) opens IMAP sessions on `mx1`, each with one wrong password and a
//! `LOGOUT`, one after the other. Dovecot writes one line per session when
//! it ends (`Aborted login (auth failed, 1 attempts …)`), so each session is
//! one failed login for the agent's `auth` rule. The session that brings
//! the count to the threshold is the one that crosses it; before it starts
//! the address must be in no nft set (otherwise the threshold is not what
//! the run assumes, and the run fails).
//!
//! Measured from the end of that session (the client has read the tagged
//! reply to its `LOGOUT`) to the moment a poll of `nft list table inet
//! fleetban` first shows the address: on `mx1` (the local block) and on
//! `mx2` (the fleet block, through the server). Each host is polled by its
//! own thread every 2 ms; a poll is a `nft` process and takes a few
//! milliseconds, which bounds the resolution (the time is taken when the
//! poll that saw it returned, so it is an upper bound).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::dovecot::{IMAP_PORT, Login, USER, imap_logins};
use crate::fleet::{Fleet, mx_v4};

/// The first attacker address's last octet: 198.51.100.(FIRST + run).
/// Above every address [`crate::fleet::ATTACKER_V4_LAST`] names.
pub const FIRST_LAST_OCTET: u8 = 100;

/// The most runs one fleet can do (one fresh address each).
pub const MAX_RUNS: usize = 150;

/// The longest wait for the blocks after the deciding session.
pub const BLOCK_WAIT: Duration = Duration::from_secs(10);

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Run {
    /// The guessing address.
    pub attacker: IpAddr,
    /// Failed logins made (the threshold).
    pub failed: u32,
    /// End of the deciding session → address in `mx1`'s nft set.
    pub local: Duration,
    /// End of the deciding session → address in `mx2`'s nft set.
    pub fleet: Duration,
    /// How long the polls that saw the address took (`mx1`, `mx2`): the
    /// resolution of [`Run::local`] and [`Run::fleet`].
    pub poll: [Duration; 2],
    /// From the first failed login's session start to the end of the
    /// deciding one (Dovecot's pace, not fleetban's).
    pub guessing: Duration,
    /// Sessions Dovecot reset before any login, retried.
    pub resets: usize,
}

/// The attacker address of run `run` (0-based).
pub fn attacker(run: usize) -> anyhow::Result<IpAddr> {
    ensure!(run < MAX_RUNS, "run {run}: at most {MAX_RUNS} runs");
    let last = u8::try_from(usize::from(FIRST_LAST_OCTET) + run).context("attacker address")?;
    Ok(IpAddr::V4(Ipv4Addr::new(198, 51, 100, last)))
}

fn nft_holds(fleet: &Fleet, i: usize, addr: IpAddr) -> bool {
    fleet.nft_entries(i).unwrap_or_default().contains(&addr.to_string())
}

/// Polls host `i`'s nft set every 2 ms until it holds `addr` or
/// [`BLOCK_WAIT`] passed; returns when the poll that saw it returned and
/// how long that poll took.
fn seen_at(fleet: &Fleet, i: usize, addr: IpAddr) -> Option<(Instant, Duration)> {
    let deadline = Instant::now() + BLOCK_WAIT;
    while Instant::now() < deadline {
        let started = Instant::now();
        if nft_holds(fleet, i, addr) {
            let at = Instant::now();
            return Some((at, at - started));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Attempts at one session: a session whose connection was reset made no
/// login and is retried; each run reports how many were.
const SESSION_ATTEMPTS: usize = 3;

/// One failed IMAP login from `from` on host 0, in a session of its own;
/// returns the sessions reset before it.
fn failed_login(fleet: &Fleet, from: IpAddr) -> anyhow::Result<usize> {
    let to = SocketAddr::new(IpAddr::V4(mx_v4(0)), IMAP_PORT);
    let dovecot_log = || {
        let text = fleet.hosts[0].dovecot.as_ref().map(|d| d.log_text()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    for attempt in 0..SESSION_ATTEMPTS {
        match fleet.in_attacker(move || imap_logins(to, from, USER, &["wrong-password"]))? {
            Ok(outcome) => match outcome.as_slice() {
                [Login::Refused] => return Ok(attempt),
                other => bail!("IMAP login from {from} with a wrong password: {other:?}"),
            },
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset && attempt + 1 < SESSION_ATTEMPTS => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => {
                bail!("IMAP session from {from}: {error}; mx1's Dovecot log:\n{}", dovecot_log())
            }
        }
    }
    bail!("IMAP sessions from {from} were reset {SESSION_ATTEMPTS} times")
}

/// Run `run` (see the module docs) with the agents' `auth_failures`
/// threshold `threshold`.
pub fn run(fleet: &Fleet, run: usize, threshold: u32) -> anyhow::Result<Run> {
    ensure!(threshold >= 1, "the threshold must be at least 1");
    let from = attacker(run)?;
    fleet.attacker().ip(&["addr", "add", &format!("{from}/32"), "dev", "eth0"])?;
    let started = Instant::now();
    let mut resets = 0;
    for _ in 1..threshold {
        resets += failed_login(fleet, from)?;
    }
    ensure!(
        !nft_holds(fleet, 0, from) && !nft_holds(fleet, 1, from) && fleet.live_block(from)?.is_none(),
        "{from} was blocked before its failed login number {threshold}: the agents' threshold is not {threshold}"
    );
    resets += failed_login(fleet, from)?;
    let ended = Instant::now();
    let (local, remote) = std::thread::scope(|s| {
        let local = s.spawn(|| seen_at(fleet, 0, from));
        let remote = s.spawn(|| seen_at(fleet, 1, from));
        (local.join().ok().flatten(), remote.join().ok().flatten())
    });
    let report = |what: &str| {
        format!(
            "{what}\nmx1 agent:\n{}\nmx2 agent:\n{}\nserver:\n{}",
            fleet.agent_log_tail(0),
            fleet.agent_log_tail(1),
            fleet.server_log_tail()
        )
    };
    let Some(local) = local else {
        bail!(report(&format!("{from} was not in mx1's nft set within {} s", BLOCK_WAIT.as_secs())));
    };
    let Some(remote) = remote else {
        bail!(report(&format!("{from} was not in mx2's nft set within {} s", BLOCK_WAIT.as_secs())));
    };
    Ok(Run {
        attacker: from,
        failed: threshold,
        local: local.0.saturating_duration_since(ended),
        fleet: remote.0.saturating_duration_since(ended),
        poll: [local.1, remote.1],
        guessing: ended - started,
        resets,
    })
}
