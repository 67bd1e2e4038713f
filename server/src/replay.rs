//! Fleet replay: past traffic of many hosts through the real detection and
//! correlation code with a candidate policy, before it is turned on.
//!
//! `fleetban-server replay --policy FILE (--logs DIR… | --from-db --since 24h)`
//! reads every host's events (a directory of Exim logs per host, parsed by
//! `fleetban-agent parse --json`; or the `events` table), merges them in
//! time order, and replays them:
//!
//! - every host's lines go through its own [`fleetban_proto::detect::Detector`]
//!   (the code every agent runs) with the candidate's thresholds; its
//!   decisions are the agents' local blocks at the time of the line;
//! - every [`Options::step`] of log time, each host's events are stored in
//!   a scratch database through [`Ingest::store_at`] and the abuse addresses
//!   are judged by [`Correlator::evaluate`] at that time, agents' local
//!   blocks by [`correlate::judge_local`], exactly as the live server does;
//! - blocks last the policy's offence TTLs in log time, prefix escalation
//!   counts the replay's own decisions, and rules in shadow mode are
//!   reported as such.
//!
//! The scratch database is a throwaway one, created on the Postgres server
//! of `--scratch-database-url` (default: the live store's server) and
//! dropped after, never the live store itself. Context lines that cannot change a server decision
//! (connects, session ends, TLS errors, ...) go to detection but are not
//! stored; of the lines that earn good standing or carry a verified name,
//! one per address, host and step is stored.
//!
//! The result lists what would have been blocked, when, on what evidence,
//! and, run a second time with the live policy, what that did differently.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetban_proto::detect::{self, Detector, Observation, Thresholds};
use fleetban_proto::policy::Scope;
use fleetban_proto::v1::{Event, EventBatch, EventKind};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_stream::StreamExt;
use uuid::Uuid;

use crate::correlate::{
    self, CorrelateConfig, Correlator, REASON_FLEET, REASON_LOCAL, REASON_PREFIX, REASON_SINGLE_HOST,
};
use crate::ingest::{BatchError, Ingest};

/// Errors of a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A log directory or file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The path.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// `fleetban-agent parse` could not run or failed.
    #[error("{0}")]
    Parser(String),
    /// The scratch or source database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Migrations of the scratch database failed.
    #[error("scratch database: {0}")]
    Migrate(#[from] crate::db::Error),
    /// Storing a replayed batch failed.
    #[error("storing replayed events: {0}")]
    Store(#[from] BatchError),
    /// Correlation failed.
    #[error("{0}")]
    Correlate(#[from] correlate::CorrelateError),
}

/// One host's events, in time order.
#[derive(Debug, Clone, Default)]
pub struct HostEvents {
    /// The host's name (the log directory's name, or the agent's name).
    pub host: String,
    /// Its events.
    pub events: Vec<Event>,
}

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Log time between two correlation steps.
    pub step: Duration,
    /// Exim's `smtp_accept_max` on the hosts; 0 = learn it as the agents do.
    pub smtp_accept_max: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { step: Duration::from_secs(1), smtp_accept_max: 0 }
    }
}

/// One decision of a replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When (log time), unix ms.
    pub time_ms: i64,
    /// The range.
    pub cidr: IpNet,
    /// `local_block` (one host's detection), `fleet_correlation`,
    /// `single_host` or `prefix`.
    pub rule: String,
    /// The scenario or local rule (`auth`, `slot_exhaustion`, ...).
    pub detail: String,
    /// The host whose detection decided it (local blocks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A rule in shadow mode: recorded, nothing blocked.
    pub shadow: bool,
    /// The evidence in one line.
    pub evidence: String,
    /// How long the block lasts, seconds (0 for shadow decisions).
    pub ttl_secs: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Every decision, in time order.
    pub decisions: Vec<Decision>,
    /// Events replayed.
    pub events: u64,
    /// Events stored in the scratch database.
    pub stored: u64,
    /// Correlation evaluations.
    pub evaluations: u64,
    /// Local blocks the server would not make fleet blocks (protected or in
    /// good standing).
    pub spared: u64,
    /// Wall time, ms.
    pub elapsed_ms: u64,
}

impl Outcome {
    /// The ranges blocked (not in shadow mode), with the first time each was.
    pub fn blocked(&self) -> BTreeMap<IpNet, i64> {
        let mut out = BTreeMap::new();
        for d in self.decisions.iter().filter(|d| !d.shadow) {
            out.entry(d.cidr).or_insert(d.time_ms);
        }
        out
    }
}

/// What the candidate did differently from the live policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Difference {
    /// Ranges only the candidate blocks, with when.
    pub only_candidate: Vec<(IpNet, i64)>,
    /// Ranges only the live policy blocks, with when.
    pub only_live: Vec<(IpNet, i64)>,
    /// Ranges both block, with (candidate time − live time) in ms.
    pub both: Vec<(IpNet, i64)>,
}

impl Difference {
    /// The difference between two outcomes.
    pub fn of(candidate: &Outcome, live: &Outcome) -> Difference {
        let (c, l) = (candidate.blocked(), live.blocked());
        let mut d = Difference::default();
        for (net, t) in &c {
            match l.get(net) {
                Some(lt) => d.both.push((*net, t - lt)),
                None => d.only_candidate.push((*net, *t)),
            }
        }
        for (net, t) in &l {
            if !c.contains_key(net) {
                d.only_live.push((*net, *t));
            }
        }
        d
    }
}

/// The JSON form of one line of `fleetban-agent parse --json`.
#[derive(Debug, Deserialize)]
struct ParsedLine {
    time_ms: i64,
    kind: String,
    ip: IpAddr,
    port: Option<u16>,
    count: Option<u32>,
    user: Option<String>,
    helo: Option<String>,
    host_name: Option<String>,
    raw: Option<String>,
    /// Dovecot lines: `imap`, `pop3`, ... (absent = SMTP).
    service: Option<String>,
    /// Dovecot's authentication attempts (absent = one).
    attempts: Option<u32>,
}

impl ParsedLine {
    fn into_event(self) -> Option<Event> {
        let kind = EventKind::from_name(&self.kind)?;
        Some(Event {
            time_ms: self.time_ms,
            kind: kind as i32,
            remote: Some(self.ip.into()),
            remote_port: self.port.map_or(0, u32::from),
            connection_count: self.count.unwrap_or(0),
            auth_user: self.user.unwrap_or_default(),
            helo: self.helo.unwrap_or_default(),
            host_name: self.host_name.unwrap_or_default(),
            raw: self.raw.unwrap_or_default(),
            service: self.service.as_deref().and_then(fleetban_proto::v1::Service::from_name).map_or(0, |s| s as i32),
            attempts: self.attempts.unwrap_or(0),
            ..Event::default()
        })
    }
}

/// The log files of one host directory (or the file itself), in name order:
/// rotated files (`exim_mainlog-20261127`, `.1`) sort before the live one
/// only by name, so events are sorted by time afterwards anyway.
fn log_files(path: &Path) -> Result<Vec<PathBuf>, ReplayError> {
    let read = |error| ReplayError::Read { path: path.to_owned(), error };
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "gz" && e != "json"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ReplayError::Read {
            path: path.to_owned(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no log files in this directory"),
        });
    }
    Ok(files)
}

/// Reads each host directory's logs through `fleetban-agent parse --json`
/// (`agent_bin`), zone-less stamps in `tz`.
pub fn load_logs(dirs: &[PathBuf], agent_bin: &Path, tz: &str) -> Result<Vec<HostEvents>, ReplayError> {
    let mut hosts = Vec::new();
    let mut names = HashSet::new();
    for dir in dirs {
        let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        if !names.insert(name.clone()) {
            return Err(ReplayError::Parser(format!("two hosts are named {name:?}: give each host its own directory")));
        }
        let mut events = Vec::new();
        for file in log_files(dir)? {
            let mut child = Command::new(agent_bin)
                .args(["parse", "--json", "--tz", tz])
                .arg(&file)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| {
                    ReplayError::Parser(format!(
                        "cannot run {} (the agent's parser; --agent-bin names it): {e}",
                        agent_bin.display()
                    ))
                })?;
            let stdout = child.stdout.take().ok_or_else(|| ReplayError::Parser("no parser output".into()))?;
            let mut bad = 0u64;
            for line in BufReader::new(stdout).lines() {
                let line = line.map_err(|error| ReplayError::Read { path: file.clone(), error })?;
                match serde_json::from_str::<ParsedLine>(&line).ok().and_then(ParsedLine::into_event) {
                    Some(event) => events.push(event),
                    None => bad += 1,
                }
            }
            let out = child.wait_with_output().map_err(|e| ReplayError::Parser(e.to_string()))?;
            if !out.status.success() {
                return Err(ReplayError::Parser(format!(
                    "{} parse {}: {}",
                    agent_bin.display(),
                    file.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            if bad > 0 {
                tracing::warn!(path = %file.display(), lines = bad, "Parser output lines not understood were skipped.");
            }
        }
        events.sort_by_key(|e| e.time_ms);
        hosts.push(HostEvents { host: name, events });
    }
    Ok(hosts)
}

/// Reads the live store's events of the last `since`, per agent.
pub async fn load_db(pool: &PgPool, since: Duration) -> Result<Vec<HostEvents>, ReplayError> {
    type Row = (
        String,
        OffsetDateTime,
        String,
        IpAddr,
        Option<i32>,
        Option<i32>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let mut rows = sqlx::query_as::<_, Row>(
        "select a.name, e.time, e.kind, e.remote, e.remote_port, e.connection_count, e.auth_user, e.host_name, e.raw \
         from events e join agents a on a.id = e.agent_id \
         where e.time >= now() - make_interval(secs => $1) order by e.time",
    )
    .bind(since.as_secs_f64())
    .fetch(pool);
    let mut by_host: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    while let Some(row) = rows.next().await {
        let (host, time, kind, remote, port, count, user, host_name, raw) = row?;
        let Some(kind) = EventKind::from_name(&kind) else { continue };
        by_host.entry(host).or_default().push(Event {
            time_ms: (time.unix_timestamp_nanos() / 1_000_000) as i64,
            kind: kind as i32,
            remote: Some(remote.into()),
            remote_port: port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            connection_count: count.and_then(|c| u32::try_from(c).ok()).unwrap_or(0),
            auth_user: user.unwrap_or_default(),
            host_name: host_name.unwrap_or_default(),
            raw: raw.unwrap_or_default(),
            ..Event::default()
        });
    }
    // Context summaries carry what good standing needs: one accepted line at
    // the time of the last accepted mail or login (with the verified name),
    // or, without one, the verified name alone. Per-line context (connects
    // for the slot and rate rules) is not in them: replay logs, or run the
    // agents with `[aggregate] enabled = false`, to replay those rules.
    type SummaryRow = (String, IpAddr, OffsetDateTime, Option<OffsetDateTime>, i32, Option<String>);
    let mut summaries = sqlx::query_as::<_, SummaryRow>(
        "select a.name, s.remote, s.last_seen, s.last_standing, s.standing, s.host_name \
         from context_summaries s join agents a on a.id = s.agent_id \
         where s.last_seen >= now() - make_interval(secs => $1) \
           and s.interval_start >= now() - make_interval(secs => $1) - interval '1 hour' \
           and (s.standing > 0 or s.host_name is not null)",
    )
    .bind(since.as_secs_f64())
    .fetch(pool);
    let mut added = false;
    while let Some(row) = summaries.next().await {
        let (host, remote, last_seen, last_standing, standing, host_name) = row?;
        // Without standing only the name matters: a context kind that
        // neither earns standing nor counts as evidence carries it.
        let (kind, time) = match last_standing.filter(|_| standing > 0) {
            Some(at) => (EventKind::Accepted, at),
            None if host_name.is_some() => (EventKind::Closed, last_seen),
            None => continue,
        };
        by_host.entry(host).or_default().push(Event {
            time_ms: (time.unix_timestamp_nanos() / 1_000_000) as i64,
            kind: kind as i32,
            remote: Some(remote.into()),
            host_name: host_name.unwrap_or_default(),
            ..Event::default()
        });
        added = true;
    }
    if added {
        for events in by_host.values_mut() {
            events.sort_by_key(|e| e.time_ms);
        }
    }
    Ok(by_host.into_iter().map(|(host, events)| HostEvents { host, events }).collect())
}

/// The per-host detection thresholds a correlation policy implies: its
/// scenario rules, protected domains, good standing, IPv6 prefix and shadow
/// flags, the agents' defaults for the rest.
pub fn detect_thresholds(policy: &CorrelateConfig, smtp_accept_max: u32) -> Thresholds {
    Thresholds {
        smtp_accept_max,
        rules: policy.resolved_rules(),
        good_standing_ms: i64::try_from(policy.good_standing_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        protected_domains: policy.protected_domains(),
        ipv6_block_prefix: policy.ipv6_block_prefix,
        slot_shadow: policy.is_shadow(detect::Rule::SlotExhaustion.as_str()),
        conn_rate_shadow: policy.is_shadow(detect::Rule::ConnRate.as_str()),
        ..Thresholds::default()
    }
}

/// A block the replay holds, in log time.
#[derive(Debug, Clone, Copy)]
struct Held {
    cidr: IpNet,
    time_ms: i64,
    expires_ms: i64,
    escalates: bool,
}

/// The replay's own blocklist.
#[derive(Debug, Default)]
struct Blocklist {
    held: Vec<Held>,
    shadow_seen: HashMap<(IpNet, String), i64>,
}

impl Blocklist {
    fn covered(&self, net: IpNet, now_ms: i64) -> bool {
        self.held.iter().any(|h| h.cidr.contains(&net) && h.expires_ms > now_ms)
    }

    fn offences(&self, net: IpNet, now_ms: i64, window_ms: i64) -> i64 {
        self.held
            .iter()
            .filter(|h| (h.cidr.contains(&net) || net.contains(&h.cidr)) && now_ms - h.time_ms < window_ms)
            .count() as i64
    }

    /// Whether a shadow decision about `net` under `rule` is new (once an hour).
    fn shadow_is_new(&mut self, net: IpNet, rule: &str, now_ms: i64) -> bool {
        match self.shadow_seen.get(&(net, rule.to_owned())) {
            Some(t) if now_ms - t < 3_600_000 => false,
            _ => {
                self.shadow_seen.insert((net, rule.to_owned()), now_ms);
                true
            }
        }
    }
}

/// A pending local block of one step.
struct Local {
    host: usize,
    decision: detect::Decision,
}

/// Replays `hosts` with `policy` in the (empty, migrated) scratch database
/// `scratch`; `progress` is told the events done so far.
pub async fn run(
    scratch: &PgPool,
    hosts: &[HostEvents],
    policy: &CorrelateConfig,
    options: &Options,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Outcome, ReplayError> {
    let started = Instant::now();
    let correlator = Correlator::new(scratch.clone(), policy.clone());
    let ingest = Ingest::new(scratch.clone());
    let thresholds = detect_thresholds(policy, options.smtp_accept_max);
    let mut agents = Vec::with_capacity(hosts.len());
    let mut detectors = Vec::with_capacity(hosts.len());
    for h in hosts {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, $2, $2, '\\x00')")
            .bind(id)
            .bind(&h.host)
            .execute(scratch)
            .await?;
        agents.push(id);
        detectors.push(Detector::new(thresholds.clone(), 100_000, Vec::new(), Arc::default()));
    }
    let mut seqs = vec![0u64; hosts.len()];
    let mut cursor = vec![0usize; hosts.len()];
    let step_ms = i64::try_from(options.step.as_millis()).unwrap_or(1_000).max(1);
    let offence_ms = i64::try_from(policy.offence_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let prefix_ms = i64::try_from(policy.prefix_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut out = Outcome::default();
    let mut list = Blocklist::default();

    // Each step starts at the earliest unread event.
    while let Some(start) = hosts.iter().zip(&cursor).filter_map(|(h, c)| h.events.get(*c).map(|e| e.time_ms)).min() {
        let end = start + step_ms;
        let mut locals: Vec<Local> = Vec::new();
        // Per host: the step's events to store; per target: the host and
        // time of its latest abuse line.
        let mut batches: Vec<Vec<Event>> = vec![Vec::new(); hosts.len()];
        let mut touched: BTreeMap<IpNet, i64> = BTreeMap::new();
        for (i, h) in hosts.iter().enumerate() {
            let mut standing_seen: HashSet<IpAddr> = HashSet::new();
            while let Some(e) = h.events.get(cursor[i]).filter(|e| e.time_ms < end) {
                cursor[i] += 1;
                out.events += 1;
                let Some(o) = Observation::from_proto(e) else { continue };
                for decision in detectors[i].observe(&o, e.time_ms) {
                    locals.push(Local { host: i, decision });
                }
                if o.kind.is_abuse() {
                    batches[i].push(e.clone());
                    let t = touched.entry(correlator.target(o.ip)).or_insert(e.time_ms);
                    *t = (*t).max(e.time_ms);
                } else if (o.kind.earns_standing() || o.host_name.is_some()) && standing_seen.insert(o.ip) {
                    batches[i].push(e.clone());
                }
            }
        }
        let now = OffsetDateTime::from_unix_timestamp_nanos(i128::from(end) * 1_000_000)
            .map_err(|e| ReplayError::Parser(format!("event time out of range: {e}")))?;
        for (i, batch) in batches.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            seqs[i] += 1;
            let stored = ingest
                .store_at(
                    agents[i],
                    EventBatch { seq: seqs[i], events: batch, position: None, summaries: Vec::new() },
                    now,
                )
                .await?;
            out.stored += u64::from(stored.stored);
        }
        // The agents' local blocks, then the server's own judgement.
        for local in locals {
            let d = local.decision;
            let host = hosts[local.host].host.clone();
            let rule = d.rule.as_str().to_owned();
            if d.shadow || policy.is_shadow(REASON_LOCAL) {
                if list.shadow_is_new(d.net, &rule, d.time_ms) {
                    out.decisions.push(Decision {
                        time_ms: d.time_ms,
                        cidr: d.net,
                        rule: REASON_LOCAL.into(),
                        detail: rule,
                        host: Some(host),
                        shadow: true,
                        evidence: d.evidence,
                        ttl_secs: 0,
                    });
                }
                continue;
            }
            // The agent blocks on its own host at once, whatever the server
            // makes of it.
            out.decisions.push(Decision {
                time_ms: d.time_ms,
                cidr: d.net,
                rule: REASON_LOCAL.into(),
                detail: rule.clone(),
                host: Some(host),
                shadow: false,
                evidence: d.evidence.clone(),
                ttl_secs: u64::from(d.ttl_secs),
            });
            if list.covered(d.net, d.time_ms) || correlator.never_blocked(d.net) {
                continue;
            }
            let assessment = {
                let mut conn = scratch.acquire().await?;
                correlator.assess(&mut conn, d.net, now).await?
            };
            out.evaluations += 1;
            if correlate::judge_local(&assessment.tally, &rule).is_err() {
                out.spared += 1;
                // Held on that host only, for the agent's TTL.
                list.held.push(Held {
                    cidr: d.net,
                    time_ms: d.time_ms,
                    expires_ms: d.time_ms + i64::from(d.ttl_secs) * 1000,
                    escalates: false,
                });
                continue;
            }
            let earlier = list.offences(d.net, d.time_ms, offence_ms);
            let ttl = correlator.ttl(earlier).max(Duration::from_secs(u64::from(d.ttl_secs)));
            list.held.push(Held {
                cidr: d.net,
                time_ms: d.time_ms,
                expires_ms: d.time_ms + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                escalates: !assessment.tally.good_standing,
            });
            escalate(&correlator, policy, &mut list, &mut out, d.net, d.time_ms, prefix_ms, offence_ms);
        }
        let touched_all = touched.clone();
        for (target, time_ms) in touched {
            if correlator.never_blocked(target) || list.covered(target, time_ms) {
                continue;
            }
            let finding = {
                let mut conn = scratch.acquire().await?;
                correlator.evaluate(&mut conn, target, now).await?
            };
            out.evaluations += 1;
            let Some(f) = finding else { continue };
            let rule = if f.verdict.scope == Scope::Fleet { REASON_FLEET } else { REASON_SINGLE_HOST };
            if f.verdict.shadow {
                if list.shadow_is_new(target, f.verdict.scenario.as_str(), time_ms) {
                    out.decisions.push(Decision {
                        time_ms,
                        cidr: target,
                        rule: rule.into(),
                        detail: f.verdict.scenario.as_str().into(),
                        host: None,
                        shadow: true,
                        evidence: f.evidence.verdict,
                        ttl_secs: 0,
                    });
                }
                continue;
            }
            let earlier = list.offences(target, time_ms, offence_ms);
            let ttl = correlator.ttl(earlier);
            list.held.push(Held {
                cidr: target,
                time_ms,
                expires_ms: time_ms + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                escalates: f.evidence.escalates,
            });
            out.decisions.push(Decision {
                time_ms,
                cidr: target,
                rule: rule.into(),
                detail: f.verdict.scenario.as_str().into(),
                host: None,
                shadow: false,
                evidence: f.evidence.verdict,
                ttl_secs: ttl.as_secs(),
            });
            escalate(&correlator, policy, &mut list, &mut out, target, time_ms, prefix_ms, offence_ms);
        }
        // Campaigns of small abusers, judged per prefix.
        let mut prefixes: BTreeMap<IpNet, (u8, i64)> = BTreeMap::new();
        for (target, time_ms) in &touched_all {
            if let Some((prefix, unit)) = correlate::escalation_prefix(*target) {
                let e = prefixes.entry(prefix).or_insert((unit, *time_ms));
                e.1 = e.1.max(*time_ms);
            }
        }
        for (prefix, (unit, time_ms)) in prefixes {
            if correlator.never_blocked(prefix) || list.covered(prefix, time_ms) {
                continue;
            }
            let finding = {
                let mut conn = scratch.acquire().await?;
                correlator.evaluate_campaign(&mut conn, prefix, unit, now).await?
            };
            out.evaluations += 1;
            let Some(f) = finding else { continue };
            let shadow = f.verdict.shadow || policy.is_shadow(REASON_PREFIX);
            if shadow && !list.shadow_is_new(prefix, REASON_PREFIX, time_ms) {
                continue;
            }
            let ttl = if shadow { Duration::ZERO } else { correlator.ttl(list.offences(prefix, time_ms, offence_ms)) };
            if !shadow {
                list.held.push(Held {
                    cidr: prefix,
                    time_ms,
                    expires_ms: time_ms + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                    escalates: false,
                });
            }
            out.decisions.push(Decision {
                time_ms,
                cidr: prefix,
                rule: REASON_PREFIX.into(),
                detail: f.verdict.scenario.as_str().into(),
                host: None,
                shadow,
                evidence: f.evidence.verdict,
                ttl_secs: ttl.as_secs(),
            });
        }
        progress(out.events);
    }
    out.decisions.sort_by_key(|d| d.time_ms);
    out.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(out)
}

/// Prefix escalation over the replay's own blocks, as
/// [`Correlator`]'s escalation does over the live blocklist.
#[allow(clippy::too_many_arguments)]
fn escalate(
    correlator: &Correlator,
    policy: &CorrelateConfig,
    list: &mut Blocklist,
    out: &mut Outcome,
    blocked: IpNet,
    now_ms: i64,
    prefix_ms: i64,
    offence_ms: i64,
) {
    let Some((prefix, unit)) = correlate::escalation_prefix(blocked) else { return };
    if list.covered(prefix, now_ms) || correlator.never_blocked(prefix) {
        return;
    }
    let units: BTreeSet<IpNet> = list
        .held
        .iter()
        .filter(|h| h.escalates && prefix.contains(&h.cidr) && h.cidr != prefix && now_ms - h.time_ms < prefix_ms)
        .filter_map(|h| IpNet::new(h.cidr.addr(), unit).ok().map(|n| n.trunc()))
        .collect();
    if units.len() < usize::try_from(policy.prefix_min_addresses).unwrap_or(usize::MAX) {
        return;
    }
    let evidence = format!("{} blocked ranges inside within {} s", units.len(), policy.prefix_window_secs);
    if policy.is_shadow(REASON_PREFIX) {
        if list.shadow_is_new(prefix, REASON_PREFIX, now_ms) {
            out.decisions.push(Decision {
                time_ms: now_ms,
                cidr: prefix,
                rule: REASON_PREFIX.into(),
                detail: REASON_PREFIX.into(),
                host: None,
                shadow: true,
                evidence,
                ttl_secs: 0,
            });
        }
        return;
    }
    let ttl = correlator.ttl(list.offences(prefix, now_ms, offence_ms));
    list.held.push(Held {
        cidr: prefix,
        time_ms: now_ms,
        expires_ms: now_ms + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        escalates: false,
    });
    out.decisions.push(Decision {
        time_ms: now_ms,
        cidr: prefix,
        rule: REASON_PREFIX.into(),
        detail: REASON_PREFIX.into(),
        host: None,
        shadow: false,
        evidence,
        ttl_secs: ttl.as_secs(),
    });
}

/// A throwaway database for one replay run: created in the cluster at
/// `admin_url` (whose user may create databases), migrated, dropped by
/// [`Scratch::drop_now`].
#[derive(Debug)]
pub struct Scratch {
    admin: PgPool,
    name: String,
    /// The pool on the scratch database.
    pub pool: PgPool,
}

impl Scratch {
    /// Creates and migrates a fresh database.
    pub async fn create(admin_url: &str) -> Result<Scratch, ReplayError> {
        let admin = crate::db::connect(admin_url, 2).await?;
        let name = format!("fleetban_replay_{}_{}", std::process::id(), Uuid::new_v4().simple());
        sqlx::query(&format!("create database {name}")).execute(&admin).await?;
        let mut options: sqlx::postgres::PgConnectOptions = admin_url.parse()?;
        options = options.database(&name);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect_with(options).await?;
        crate::db::migrate(&pool).await?;
        Ok(Scratch { admin, name, pool })
    }

    /// Closes and drops the database.
    pub async fn drop_now(self) -> Result<(), ReplayError> {
        self.pool.close().await;
        sqlx::query(&format!("drop database if exists {} with (force)", self.name)).execute(&self.admin).await?;
        Ok(())
    }
}

/// Runs one replay in a fresh scratch database of `admin_url`.
pub async fn run_scratch(
    admin_url: &str,
    hosts: &[HostEvents],
    policy: &CorrelateConfig,
    options: &Options,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Outcome, ReplayError> {
    let scratch = Scratch::create(admin_url).await?;
    let result = run(&scratch.pool, hosts, policy, options, progress).await;
    scratch.drop_now().await?;
    result
}

/// A human-readable report of a candidate's outcome and its difference
/// from the live policy.
pub fn render(candidate: &Outcome, live: &Outcome, diff: &Difference) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let t = |ms: i64| {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| ms.to_string())
    };
    let blocked = candidate.decisions.iter().filter(|d| !d.shadow).count();
    let shadow = candidate.decisions.len() - blocked;
    let _ = writeln!(
        s,
        "replayed {} events ({} stored, {} evaluations) in {:.1} s: {} blocks, {} shadow decisions, {} local blocks the server spared",
        candidate.events,
        candidate.stored,
        candidate.evaluations,
        candidate.elapsed_ms as f64 / 1000.0,
        blocked,
        shadow,
        candidate.spared
    );
    let _ = writeln!(s, "\ncandidate policy decisions:");
    let _ = writeln!(s, "  {:<24} {:<20} {:<18} {:<16} {:<8} evidence", "time", "range", "rule", "detail", "host");
    for d in &candidate.decisions {
        let _ = writeln!(
            s,
            "  {:<24} {:<20} {:<18} {:<16} {:<8} {}{}",
            t(d.time_ms),
            d.cidr.to_string(),
            d.rule,
            d.detail,
            d.host.as_deref().unwrap_or("-"),
            if d.shadow { "[shadow] " } else { "" },
            crate::text::Escaped(&d.evidence)
        );
    }
    let _ = writeln!(
        s,
        "\ncompared with the live policy ({} blocks): {} ranges only the candidate blocks, {} only the live policy, {} both",
        live.decisions.iter().filter(|d| !d.shadow).count(),
        diff.only_candidate.len(),
        diff.only_live.len(),
        diff.both.len()
    );
    for (net, time) in &diff.only_candidate {
        let _ = writeln!(s, "  + {:<20} from {}", net.to_string(), t(*time));
    }
    for (net, time) in &diff.only_live {
        let _ = writeln!(s, "  - {:<20} from {} (live policy only)", net.to_string(), t(*time));
    }
    for (net, delta) in diff.both.iter().filter(|(_, d)| *d != 0) {
        let _ = writeln!(s, "  ~ {:<20} {:+.1} s against the live policy", net.to_string(), *delta as f64 / 1000.0);
    }
    s
}

#[cfg(test)]
mod tests;
