//! `fleetban-traffic`: the precision benchmark's generator and scorer.
//!
//! - `generate --out DIR [--small] [--seed N] [--hosts N] [--hours H]
//!   [--start RFC3339]`: writes `DIR/<host>/exim_mainlog` for each host and
//!   `DIR/labels.json` (see `fleetban_tests::traffic` for what is in them),
//!   and prints the volume.
//! - `score --labels DIR/labels.json --decisions FILE [--json]`: scores a
//!   detector's decisions (a JSON array of `{"range": "198.19.77.0/24",
//!   "time_ms": 1793580000000}`) against the labels.
//! - `bench [--small] [--seed N] [--policy server.toml]`: the benchmark:
//!   generates a fleet in memory, replays it through the real per-host
//!   detection and fleet correlation (`fleetban_server::replay`, in a
//!   throwaway database on the Postgres of `DATABASE_URL`, or an embedded
//!   one) and scores the decisions.
//! - `local [--small] [--seed N]`: a baseline, not the benchmark's figure:
//!   generates a fleet in memory, runs each host's log through the per-host
//!   detector alone (`fleetban_proto::detect` at its default thresholds,
//!   with the fleet's `smtp_accept_max`; no server correlation) and scores
//!   its decisions.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetban_agent::parse::{Parser as LogParser, Timezone};
use fleetban_proto::detect::{DetectStats, Detector, Observation, Thresholds};
use fleetban_tests::traffic::{self, Config, Decision, Generator, Labels};
use ipnet::IpNet;

#[derive(Debug, Parser)]
#[command(name = "fleetban-traffic")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a labelled fleet of Exim logs.
    Generate {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The CI size: 5 hosts, 2 hours from 12:00 UTC, smtp_accept_max 20.
        #[arg(long)]
        small: bool,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Hosts (default 20, or 5 with --small).
        #[arg(long)]
        hosts: Option<usize>,
        /// Hours (default 24, or 2 with --small).
        #[arg(long)]
        hours: Option<u32>,
        /// Start of the run, RFC 3339 (default 2026-11-02T00:00:00Z, or 12:00 with --small).
        #[arg(long)]
        start: Option<String>,
        /// Exim's smtp_accept_max on every host (default 100, or 20 with --small).
        #[arg(long)]
        smtp_accept_max: Option<u32>,
        /// Exim's smtp_receive_timeout, seconds.
        #[arg(long, default_value_t = 300)]
        receive_timeout_secs: u32,
        /// Write +millisec timestamps.
        #[arg(long)]
        millisec: bool,
    },
    /// Scores decisions against a fleet's labels.
    Score {
        /// The fleet's labels.json.
        #[arg(long)]
        labels: PathBuf,
        /// JSON array of {"range": CIDR, "time_ms": unix ms}.
        #[arg(long)]
        decisions: PathBuf,
        /// Print the score as JSON instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// The benchmark: replays a generated fleet through detection and
    /// correlation and scores the decisions.
    Bench {
        /// The CI size.
        #[arg(long)]
        small: bool,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// A server config whose `[correlate]` policy is replayed (default:
        /// the built-in defaults).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// A Postgres URL whose user may create databases (default: an
        /// embedded cluster).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
        /// Print the score as JSON instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Scores the per-host detector alone (no correlation) on a fleet.
    Local {
        /// The CI size.
        #[arg(long)]
        small: bool,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the score as JSON instead of the report.
        #[arg(long)]
        json: bool,
    },
}

/// Every non-shadow decision of a per-host detector over each host's log.
fn local_decisions(config: Config) -> anyhow::Result<(Labels, Vec<(IpNet, i64)>)> {
    let max = config.smtp_accept_max;
    let mut g = Generator::new(config)?;
    let mut decisions = Vec::new();
    for host in 0..g.config().hosts {
        let log = g.generate_host(host);
        let mut parser = LogParser::new(Timezone::Utc);
        let thresholds = Thresholds { smtp_accept_max: max, ..Thresholds::default() };
        let mut detector = Detector::new(thresholds, 1_000_000, Vec::new(), Arc::new(DetectStats::default()));
        for line in &log.lines {
            let Some(ev) = parser.feed(line.text.as_bytes()) else { continue };
            let o = Observation {
                kind: ev.kind,
                ip: ev.ip,
                port: ev.port,
                count: ev.count,
                user: ev.user,
                host_name: ev.host_name,
                time_ms: ev.time_ms,
                attempts: ev.attempts,
            };
            for d in detector.observe(&o, ev.time_ms) {
                if !d.shadow {
                    decisions.push((d.net, d.time_ms));
                }
            }
        }
    }
    Ok((g.labels(), decisions))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Written through a handle so that a closed pipe is an error, not a panic.
    let mut stdout = std::io::stdout().lock();
    match Cli::parse().command {
        Command::Generate {
            out,
            small,
            seed,
            hosts,
            hours,
            start,
            smtp_accept_max,
            receive_timeout_secs,
            millisec,
        } => {
            let mut config = if small { Config::small(seed) } else { Config::full(seed) };
            if let Some(h) = hosts {
                config.hosts = h;
            }
            if let Some(h) = hours {
                config.hours = h;
            }
            if let Some(start) = start {
                let ts: jiff::Timestamp =
                    start.parse().with_context(|| format!("--start {start:?} is not RFC 3339"))?;
                config.start_ms = ts.as_millisecond();
            }
            if let Some(m) = smtp_accept_max {
                config.smtp_accept_max = m;
            }
            config.receive_timeout_secs = receive_timeout_secs;
            config.millisec = millisec;
            let began = Instant::now();
            let summary = traffic::write_fleet(config.clone(), &out)?;
            writeln!(
                stdout,
                "{} hosts, {} h, smtp_accept_max {}, seed {} -> {}",
                config.hosts,
                config.hours,
                config.smtp_accept_max,
                config.seed,
                out.display()
            )?;
            writeln!(stdout, "host   lines      sessions  refused  peak-open")?;
            for (name, lines, sessions, refused, peak) in &summary.hosts {
                writeln!(stdout, "{name:<6} {lines:<10} {sessions:<9} {refused:<8} {peak}")?;
            }
            writeln!(
                stdout,
                "total {} lines, {:.1} MB, {:.0} lines/host/hour; {} legitimate and {} attack sources; {:.1} s",
                summary.lines,
                summary.bytes as f64 / 1e6,
                summary.lines_per_host_hour,
                summary.legit_sources,
                summary.attack_sources,
                began.elapsed().as_secs_f64()
            )?;
        }
        Command::Score { labels, decisions, json } => {
            let labels = Labels::read(&labels)?;
            let text = std::fs::read(&decisions).with_context(|| format!("reading {}", decisions.display()))?;
            let decisions: Vec<Decision> =
                serde_json::from_slice(&text).with_context(|| format!("parsing {}", decisions.display()))?;
            let pairs: Vec<(IpNet, i64)> = decisions.iter().map(Decision::pair).collect();
            let score = traffic::score(&labels, &pairs);
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&score)?)?;
            } else {
                write!(stdout, "{score}")?;
            }
        }
        Command::Bench { small, seed, policy, database_url, json } => {
            let config = if small { Config::small(seed) } else { Config::full(seed) };
            let policy = match policy {
                Some(path) => {
                    fleetban_server::config::ServerConfig::load(&path)
                        .with_context(|| format!("--policy {}", path.display()))?
                        .correlate
                }
                None => fleetban_server::correlate::CorrelateConfig::default(),
            };
            // The embedded cluster lives as long as this arm.
            let (_embedded, url) = match database_url {
                Some(url) => (None, url),
                None => {
                    let pg = tokio::task::spawn_blocking(fleetban_server::pgembed::EmbeddedPostgres::start)
                        .await?
                        .context("no DATABASE_URL and no embedded Postgres")?;
                    let url = pg.url();
                    (Some(pg), url)
                }
            };
            let began = Instant::now();
            let run = fleetban_tests::precision::run(config, &policy, &url).await?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&run.score)?)?;
            } else {
                writeln!(
                    stdout,
                    "{} lines, {} events replayed, {} decisions, {:.1} s\n",
                    run.lines,
                    run.outcome.events,
                    run.outcome.decisions.len(),
                    began.elapsed().as_secs_f64()
                )?;
                write!(stdout, "{}", run.score)?;
            }
        }
        Command::Local { small, seed, json } => {
            let config = if small { Config::small(seed) } else { Config::full(seed) };
            let (labels, decisions) = local_decisions(config)?;
            let score = traffic::score(&labels, &decisions);
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&score)?)?;
            } else {
                write!(stdout, "{score}")?;
            }
        }
    }
    Ok(())
}
