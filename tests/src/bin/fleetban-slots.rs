//! `fleetban-slots`: how fast a blocked flooder's Exim slots are free again.
//!
//! Starts a fleet of one real Exim host (`smtp_accept_max = 20`,
//! `smtp_receive_timeout = 5m`) with a real agent on nftables and local
//! detection off, then runs `--runs` cycles of tests/src/slots.rs: two
//! flooders hold every slot, a legitimate client is refused, an operator
//! blocks the flooders, the client retries every 10 ms. Prints each cycle
//! and p50/p99 of block → first `220` for the client. Needs root and
//! `exim4-daemon-heavy`; all traffic stays inside the fleet's namespaces.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser;
use fleetban_tests::exim::EximOptions;
use fleetban_tests::fleet::{self, CLIENT, Fleet, FleetOptions, Mta, att_v4};
use fleetban_tests::slots::{Cycle, manual_block_cycle, quantile};

#[derive(Debug, Parser)]
#[command(name = "fleetban-slots")]
struct Cli {
    /// Cycles to run (1 to 200).
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ensure!((1..=200).contains(&cli.runs), "--runs must be 1 to 200");
    ensure!(fleetban_tests::netns::is_root(), "fleetban-slots needs root (network namespaces, nftables)");
    let bins = fleet::binaries()?;
    let options = FleetOptions {
        hosts: 1,
        mta: Mta::Exim(EximOptions { receive_timeout_secs: 300, ..EximOptions::default() }),
        smtp_accept_max: 20,
        detect: "enabled = false".into(),
        ..FleetOptions::default()
    };
    let fleet = Fleet::start(bins, options).context("starting the fleet")?;
    let flooders = [att_v4(46), att_v4(47)];
    let cidrs: Vec<String> = flooders.iter().map(|f| format!("{f}/32")).collect();
    let mut cycles: Vec<Cycle> = Vec::new();
    for run in 0..cli.runs {
        let cycle = manual_block_cycle(&fleet, &flooders, 10, &cidrs, IpAddr::V4(CLIENT))
            .with_context(|| format!("run {run}"))?;
        println!(
            "run {run:>3}: refused {} with {} held; client 220 {:>4} ms after the block was created; {} of {} \
             flooder connections ended",
            cycle.refused_with,
            cycle.held,
            cycle.create_to_220.as_millis(),
            cycle.ended,
            cycle.held
        );
        cycles.push(cycle);
    }
    let created: Vec<Duration> = cycles.iter().map(|c| c.create_to_220).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{} runs: block created -> legitimate client's first 220: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         flooder connections ended {} of {}",
        cycles.len(),
        ms(quantile(&created, 0.5)),
        ms(quantile(&created, 0.99)),
        ms(quantile(&created, 1.0)),
        cycles.iter().map(|c| c.ended).sum::<usize>(),
        cycles.iter().map(|c| c.held).sum::<usize>(),
    );
    Ok(())
}
