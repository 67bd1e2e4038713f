//! The precision benchmark, end to end: a generated fleet
//! ([`crate::traffic`]) parsed by the agent's real parser, replayed through
//! the real per-host detection and fleet correlation
//! ([`fleetban_server::replay`], in a throwaway database) with a policy, and
//! its decisions scored against the fleet's labels.
//!
//! Nothing here decides anything: the decisions are the replay's (the
//! agents' local blocks and the server's fleet, single-host and prefix
//! blocks, shadow-mode ones left out), the verdict is [`crate::traffic::score`].

use fleetban_agent::parse::{Parser, Timezone};
use fleetban_server::correlate::CorrelateConfig;
use fleetban_server::replay::{self, HostEvents, Options, Outcome, ReplayError};
use ipnet::IpNet;

use crate::traffic::{Config, Generator, Labels, Score, TrafficError, score};

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
pub enum PrecisionError {
    /// The fleet could not be generated.
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    /// The replay failed.
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
}

/// One run: the labels, what the replay did, and the verdict.
#[derive(Debug, Clone)]
pub struct Run {
    /// The fleet's labels.
    pub labels: Labels,
    /// The replay's outcome (every decision, shadow ones included).
    pub outcome: Outcome,
    /// The verdict on the non-shadow decisions.
    pub score: Score,
    /// Lines generated over the fleet.
    pub lines: u64,
}

/// Generates `config`'s fleet and parses every host's log with the agent's
/// parser (UTC), as the agents would ship it: abuse lines keep their raw
/// text as evidence.
pub fn fleet_events(config: Config) -> Result<(Vec<HostEvents>, Labels, u64), TrafficError> {
    let mut g = Generator::new(config)?;
    let mut hosts = Vec::with_capacity(g.config().hosts);
    let mut lines = 0u64;
    for h in 0..g.config().hosts {
        let log = g.generate_host(h);
        lines += log.lines.len() as u64;
        let mut parser = Parser::new(Timezone::Utc);
        let events = log
            .lines
            .iter()
            .filter_map(|l| parser.feed(l.text.as_bytes()).map(|ev| ev.to_proto(ev.kind.is_abuse())))
            .collect();
        hosts.push(HostEvents { host: log.name, events });
    }
    Ok((hosts, g.labels(), lines))
}

/// Runs the benchmark of `config` with `policy`, in a scratch database
/// created (and dropped) on the Postgres of `admin_url`.
pub async fn run(config: Config, policy: &CorrelateConfig, admin_url: &str) -> Result<Run, PrecisionError> {
    let smtp_accept_max = config.smtp_accept_max;
    let (hosts, labels, lines) = tokio::task::block_in_place(|| fleet_events(config))?;
    let options = Options { smtp_accept_max, ..Options::default() };
    let outcome = replay::run_scratch(admin_url, &hosts, policy, &options, &|_| {}).await?;
    let decisions: Vec<(IpNet, i64)> =
        outcome.decisions.iter().filter(|d| !d.shadow).map(|d| (d.cidr, d.time_ms)).collect();
    let score = score(&labels, &decisions);
    Ok(Run { labels, outcome, score, lines })
}
