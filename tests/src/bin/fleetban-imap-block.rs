//! `fleetban-imap-block`: how fast failed IMAP logins against real Dovecot
//! get the guesser blocked, on its host and fleet-wide.
//!
//! Starts a fleet of two mail hosts (`mx1`, `mx2`), each with a real
//! Dovecot 2.3 tailed by its agent as a `dovecot` source (nftables, the
//! agents' `[detect] auth_failures = 10`), and a server on the embedded
//! Postgres; then runs `--runs` runs of tests/src/imap_block.rs, each from a
//! fresh attacker address. Prints each run and p50/p99/max of the end of the
//! failed login that crossed the threshold → the address in `mx1`'s nft set
//! (local) and in `mx2`'s (fleet). Needs root and `dovecot-imapd`; all
//! traffic stays inside the fleet's namespaces.
//!
//! Dovecot's configuration is the tests' (tests/src/dovecot.rs:
//! `auth_failure_delay = 0`) plus `login_trusted_networks` covering the
//! attacker's range, for which Dovecot 2.3's login processes ask the auth
//! process to skip its per-address auth penalty (2.3 has no setting that
//! turns the penalty off). Even so, Dovecot's log shows the second to fifth
//! session of each new address taking 4–5 s, so the ten failed logins of a
//! run take about 21 s; that is Dovecot's pace before the deciding login and
//! not part of the measured latency. The server's `prefix_min_addresses` is
//! set above the number of runs, so the runs' addresses (all in
//! 198.51.100.0/24) are never escalated to a block of their prefix.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser;
use fleetban_tests::fleet::{self, Fleet, FleetOptions};
use fleetban_tests::imap_block::{self, MAX_RUNS, Run};
use fleetban_tests::slots::quantile;

/// The agents' `auth_failures`.
const THRESHOLD: u32 = 10;

#[derive(Debug, Parser)]
#[command(name = "fleetban-imap-block")]
struct Cli {
    /// Runs, each from a fresh attacker address (1 to 150).
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ensure!((1..=MAX_RUNS).contains(&cli.runs), "--runs must be 1 to {MAX_RUNS}");
    ensure!(fleetban_tests::netns::is_root(), "fleetban-imap-block needs root (network namespaces, nftables)");
    fleetban_tests::dovecot::binary()?;
    let bins = fleet::binaries()?;
    let options = FleetOptions {
        hosts: 2,
        dovecot: true,
        dovecot_extra: "login_trusted_networks = 198.51.100.0/24".into(),
        detect: format!("auth_failures = {THRESHOLD}"),
        // Every run's address is in 198.51.100.0/24: no escalation of the
        // blocked addresses to a block of the prefix.
        correlate: format!("prefix_min_addresses = {}", MAX_RUNS + 1),
        ..FleetOptions::default()
    };
    let fleet = Fleet::start(bins, options).context("starting the fleet")?;
    let mut runs: Vec<Run> = Vec::new();
    for run in 0..cli.runs {
        let r = imap_block::run(&fleet, run, THRESHOLD).with_context(|| format!("run {run}"))?;
        println!(
            "run {run:>3}: {} failed {} IMAP logins on mx1; in mx1's nft set {:>6.1} ms, in mx2's {:>6.1} ms after \
             the last one ended (polls {:.1} / {:.1} ms; guessing took {:.1} s, {} reset sessions retried)",
            r.attacker,
            r.failed,
            ms(r.local),
            ms(r.fleet),
            ms(r.poll[0]),
            ms(r.poll[1]),
            r.guessing.as_secs_f64(),
            r.resets
        );
        runs.push(r);
    }
    let local: Vec<Duration> = runs.iter().map(|r| r.local).collect();
    let remote: Vec<Duration> = runs.iter().map(|r| r.fleet).collect();
    let polls: Vec<Duration> = runs.iter().flat_map(|r| r.poll).collect();
    for (what, values) in [
        ("failed IMAP login -> mx1's nft set (local)", &local),
        ("failed IMAP login -> mx2's nft set (fleet)", &remote),
        ("the poll that saw it (resolution)", &polls),
    ] {
        println!(
            "{} runs: {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            runs.len(),
            ms(quantile(values, 0.5)),
            ms(quantile(values, 0.99)),
            ms(quantile(values, 1.0)),
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
