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
/// [`BLOCK_WAIT`] passed; returns when the poll that saw it returned.
fn seen_at(fleet: &Fleet, i: usize, addr: IpAddr) -> Option<Instant> {
    let deadline = Instant::now() + BLOCK_WAIT;
    while Instant::now() < deadline {
        if nft_holds(fleet, i, addr) {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// One failed IMAP login from `from` on host 0, in a session of its own.
fn failed_login(fleet: &Fleet, from: IpAddr) -> anyhow::Result<()> {
    let to = SocketAddr::new(IpAddr::V4(mx_v4(0)), IMAP_PORT);
    let outcome = fleet.in_attacker(move || imap_logins(to, from, USER, &["wrong-password"]))?;
    match outcome.with_context(|| format!("IMAP session from {from}"))?.as_slice() {
        [Login::Refused] => Ok(()),
        other => bail!("IMAP login from {from} with a wrong password: {other:?}"),
    }
}

/// Run `run` (see the module docs) with the agents' `auth_failures`
/// threshold `threshold`.
pub fn run(fleet: &Fleet, run: usize, threshold: u32) -> anyhow::Result<Run> {
    ensure!(threshold >= 1, "the threshold must be at least 1");
    let from = attacker(run)?;
    fleet.attacker().ip(&["addr", "add", &format!("{from}/32"), "dev", "eth0"])?;
    for _ in 1..threshold {
        failed_login(fleet, from)?;
    }
    ensure!(
        !nft_holds(fleet, 0, from) && !nft_holds(fleet, 1, from),
        "{from} was blocked before its failed login number {threshold}: the agents' threshold is not {threshold}"
    );
    failed_login(fleet, from)?;
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
    Ok(Run { attacker: from, failed: threshold, local: local.saturating_duration_since(ended), fleet: remote.saturating_duration_since(ended) })
}
