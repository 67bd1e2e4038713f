//! The agent's acting half, wired around the ingest pipeline: local
//! detection on every parsed line, the firewall thread, the uplink session,
//! the metrics endpoint and the runtime status file.
//!
//! ```text
//! parse thread ──► DetectingParser ──(proto events)──► pipeline batches ──► spool
//!                     │ decisions (try_send, never blocks parsing)
//!                     ▼
//!               firewall thread (Reconciler) ──LocalBlock──► uplink ◄── spool (durable batches)
//!                     ▲                                        │
//!                     └──────── snapshots / deltas ────────────┘
//! ```
//!
//! [`Services::start`] runs before the pipeline (its [`Services::parser`]s
//! are the pipeline's line parsers); [`Services::attach`] then starts the
//! uplink and metrics on the running pipeline's spool. Without credentials the uplink does not start
//! (the agent still detects, blocks and spools). The runtime status
//! (`state_dir/agent-status.json`) is rewritten every few seconds for
//! `fleetban-agent status`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleetban_proto::v1::{Event as ProtoEvent, LocalBlock};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::config::{AgentConfig, FirewallBackend};
use crate::detect::{DetectStats, Detector};
use crate::failover::Servers;
use crate::firewall::kill::{KillOptions, Killer};
use crate::firewall::reconcile::{FirewallStats, Reconciler};
use crate::firewall::worker::{FirewallHandle, Request, Worker, WorkerOptions};
use crate::firewall::{Entry, Exec, backend_for, now_ms};
use crate::metrics::{self, KindCounters};
use crate::parse::{LogKind, Parser, Timezone};
use crate::pipeline::{LineParser, PipelineStats, SharedSpool};
use crate::uplink::{self, Credentials, ServerOptions, UplinkContext, UplinkStats};

/// File of the runtime status inside the state directory.
pub const STATUS_FILE: &str = "agent-status.json";
/// Interval of the runtime status file.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// Batches in flight on the uplink.
pub const UPLINK_WINDOW: usize = 8;

/// Errors starting the services.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A thread could not be started.
    #[error("cannot start the firewall thread: {0}")]
    Spawn(std::io::Error),
    /// The metrics address cannot be bound.
    #[error("metrics.listen {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// Ranges never blocked: the allowlist, the own addresses and the fleet
/// server's addresses (see [`server_addresses`]).
pub fn exclusions(config: &AgentConfig, own: &[IpAddr]) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = config.allowlist.cidrs.iter().map(|entry| entry.0).collect();
    out.extend(own.iter().map(|ip| IpNet::from(*ip)));
    for url in config.server_urls() {
        out.extend(server_addresses(&url).into_iter().map(IpNet::from));
    }
    out
}

/// The addresses the uplink connects to: the host of the `server` URL, or
/// what it resolves to now. Neither detection nor the firewall ever blocks
/// them: a block of the server would cut the uplink, and with it the
/// unblock. A name that does not resolve yields nothing (and a warning).
pub fn server_addresses(server: &str) -> Vec<IpAddr> {
    let Some(authority) = server.split_once("://").map_or(Some(server), |(_, rest)| Some(rest)) else {
        return Vec::new();
    };
    let authority = authority.split(['/', '?']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else { return Vec::new() };
        (host, after.strip_prefix(':').and_then(|p| p.parse().ok()))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()),
            None => (authority, None),
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![ip.to_canonical()];
    }
    if host.is_empty() {
        return Vec::new();
    }
    match std::net::ToSocketAddrs::to_socket_addrs(&(host, port.unwrap_or(443))) {
        Ok(addrs) => {
            let mut out: Vec<IpAddr> = addrs.map(|a| a.ip().to_canonical()).collect();
            out.sort();
            out.dedup();
            out
        }
        Err(error) => {
            warn!(%error, server = %server, "Cannot resolve the server's address: it is not excluded from blocks.");
            Vec::new()
        }
    }
}

/// The ranges neither detection nor the firewall ever blocks, from their
/// three sources: the agent's own (`[allowlist]`, own addresses and the
/// server URL's addresses, see [`exclusions`]), the addresses the uplink is
/// connected to, and the fleet's allowlist. Whenever one changes, the union
/// goes to detection and the firewall thread (whose next plan drops any
/// entry inside it).
pub struct Exclusions {
    state: Mutex<ExclusionSources>,
    firewall: FirewallHandle,
    detector: Option<Arc<Mutex<Detector>>>,
}

#[derive(Default)]
struct ExclusionSources {
    local: Vec<IpNet>,
    server: Vec<IpNet>,
    fleet: Vec<IpNet>,
}

impl std::fmt::Debug for Exclusions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exclusions").finish_non_exhaustive()
    }
}

impl Exclusions {
    /// Exclusions starting from `local`, applied to `firewall` and
    /// `detector`.
    pub fn new(local: Vec<IpNet>, firewall: FirewallHandle, detector: Option<Arc<Mutex<Detector>>>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ExclusionSources { local, ..ExclusionSources::default() }),
            firewall,
            detector,
        })
    }

    /// The union of every source now.
    pub fn current(&self) -> Vec<IpNet> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all = state.local.clone();
        all.extend(state.server.iter().copied());
        all.extend(state.fleet.iter().copied());
        all
    }

    fn apply(&self) {
        let exclude = self.current();
        if let Some(detector) = &self.detector {
            detector.lock().unwrap_or_else(PoisonError::into_inner).set_exclusions(exclude.clone());
        }
        if !self.firewall.try_send(Request::Exclusions(exclude)) {
            warn!("The exclusions were not applied: the firewall queue is full; they are sent again on reconnect.");
        }
    }

    /// What to do with the fleet's allowlist when the server pushes it.
    pub fn allowlist_handler(self: &Arc<Self>) -> uplink::OnAllowlist {
        let this = self.clone();
        Box::new(move |fleet| {
            this.state.lock().unwrap_or_else(PoisonError::into_inner).fleet = fleet.to_vec();
            this.apply();
        })
    }

    /// What to do with the address of each connection the uplink opens: a
    /// new one is never blocked from then on.
    pub fn server_address_handler(self: &Arc<Self>) -> uplink::OnServerAddress {
        let this = self.clone();
        Arc::new(move |address| {
            let net = IpNet::from(address);
            {
                let mut state = this.state.lock().unwrap_or_else(PoisonError::into_inner);
                if state.server.contains(&net) || state.local.contains(&net) {
                    return;
                }
                state.server.push(net);
            }
            info!(%address, "The uplink's server address is excluded from blocks.");
            this.apply();
        })
    }
}

/// What to do with the fleet's allowlist when the server pushes it: the
/// never-blocked ranges become `local` (the agent's own `[allowlist]` and
/// addresses) plus the fleet's ranges (see [`Exclusions`]).
pub fn allowlist_handler(
    local: Vec<IpNet>,
    firewall: FirewallHandle,
    detector: Option<Arc<Mutex<Detector>>>,
) -> uplink::OnAllowlist {
    Exclusions::new(local, firewall, detector).allowlist_handler()
}

/// The Exim parser as a pipeline step, with detection on every event:
/// decisions go to the firewall thread without waiting, the event goes on to
/// the spool (raw line kept only for abuse kinds).
pub struct DetectingParser {
    parser: Parser,
    detector: Option<Arc<Mutex<Detector>>>,
    firewall: FirewallHandle,
    kinds: Arc<KindCounters>,
}

impl std::fmt::Debug for DetectingParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DetectingParser").finish_non_exhaustive()
    }
}

impl DetectingParser {
    /// A parser of `kind` logs for `timezone` feeding `detector` (none =
    /// detection off).
    pub fn new(
        kind: LogKind,
        timezone: Timezone,
        detector: Option<Arc<Mutex<Detector>>>,
        firewall: FirewallHandle,
        kinds: Arc<KindCounters>,
    ) -> Self {
        Self { parser: Parser::for_kind(kind, timezone), detector, firewall, kinds }
    }
}

impl LineParser for DetectingParser {
    fn reparse_line(&mut self, line: &[u8]) -> Option<ProtoEvent> {
        // Detection and the per-kind counters saw this line before the
        // restart.
        let event = self.parser.feed(line)?;
        Some(event.to_proto(event.kind.is_abuse()))
    }

    fn parse_line(&mut self, line: &[u8]) -> Option<ProtoEvent> {
        let ambiguous = self.parser.stats().ambiguous;
        let Some(event) = self.parser.feed(line) else {
            if self.parser.stats().ambiguous > ambiguous {
                self.kinds.ambiguous.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        };
        self.kinds.add(event.kind);
        if let Some(detector) = &self.detector {
            let now = now_ms();
            let decisions = detector.lock().unwrap_or_else(PoisonError::into_inner).observe_event(&event, now);
            for decision in decisions {
                let expires_at_ms = decision.time_ms + i64::from(decision.ttl_secs) * 1000;
                let report = LocalBlock {
                    shadow: decision.shadow,
                    cidr: Some(decision.net.into()),
                    reason: decision.rule.as_str().to_owned(),
                    evidence: format!("{}; last line: {}", decision.evidence, String::from_utf8_lossy(event.raw)),
                    time_ms: decision.time_ms,
                    ttl_secs: decision.ttl_secs,
                };
                if decision.shadow {
                    info!(net = %decision.net, rule = decision.rule.as_str(), evidence = %decision.evidence, "Shadow decision: not blocking.");
                    if !self.firewall.try_send(Request::Report(report)) {
                        warn!(net = %decision.net, "Shadow decision dropped: the firewall queue is full.");
                    }
                    continue;
                }
                let entry = Entry {
                    net: decision.net,
                    expires_at_ms: Some(expires_at_ms),
                    reason: decision.rule.as_str().into(),
                };
                if !self.firewall.try_send(Request::Local(entry, Some(report))) {
                    warn!(net = %decision.net, "Local block dropped: the firewall queue is full.");
                }
            }
        }
        Some(event.to_proto(event.kind.is_abuse()))
    }
}

/// Test and benchmark hooks.
#[derive(Debug, Default)]
pub struct ServiceOptions {
    /// Run firewall commands in this network namespace.
    pub netns: Option<String>,
    /// Told every local block once applied.
    pub applied: Option<std::sync::mpsc::Sender<(IpNet, Instant)>>,
    /// Allow `http://` to a non-loopback server.
    pub insecure: bool,
}

/// The runtime status written for `fleetban-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuntimeStatus {
    /// When it was written (RFC 3339).
    pub updated_at: String,
    /// The agent's process id.
    pub pid: u32,
    /// Uplink state.
    pub uplink: RuntimeUplink,
    /// Firewall state.
    pub firewall: RuntimeFirewall,
}

/// Uplink part of [`RuntimeStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuntimeUplink {
    /// The configured server URLs, comma-separated.
    pub server: String,
    /// The server of the open (or last) session, with the address dialled
    /// (see [`UplinkStats::server`]); empty before the first session.
    #[serde(default)]
    pub connected_to: String,
    /// Whether credentials exist (otherwise the uplink is off).
    pub enrolled: bool,
    /// A session is open.
    pub connected: bool,
    /// Sessions opened.
    pub sessions: u64,
    /// Reconnects.
    pub reconnects: u64,
    /// Batches sent.
    pub batches_sent: u64,
    /// Local blocks reported.
    pub local_blocks_sent: u64,
}

/// Firewall part of [`RuntimeStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuntimeFirewall {
    /// Entries held.
    pub entries: u64,
    /// Blocklist version applied.
    pub blocklist_version: u64,
    /// Last full reconcile (RFC 3339); `None` = never.
    pub last_reconcile: Option<String>,
    /// Full reconciles run.
    pub reconciles: u64,
    /// Entries repaired because the firewall drifted.
    pub drift_repaired: u64,
    /// Failed commits.
    pub errors: u64,
    /// Local blocks applied.
    pub local_blocks: u64,
    /// Established connections of blocked ranges ended.
    #[serde(default)]
    pub connections_killed: u64,
    /// Connections a dry run would have ended.
    #[serde(default)]
    pub connections_would_kill: u64,
    /// How connections of blocked ranges are ended (or why they cannot be).
    #[serde(default)]
    pub connection_kill: String,
}

fn rfc3339(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms).ok().map(|at| at.to_string())
}

impl RuntimeStatus {
    fn collect(server: &str, enrolled: bool, uplink: &UplinkStats, firewall: &FirewallStats) -> Self {
        let last = firewall.last_reconcile_ms.load(Ordering::Relaxed);
        RuntimeStatus {
            updated_at: rfc3339(now_ms()).unwrap_or_default(),
            pid: std::process::id(),
            uplink: RuntimeUplink {
                server: server.to_owned(),
                connected_to: uplink.server(),
                enrolled,
                connected: uplink.connected.load(Ordering::Relaxed),
                sessions: uplink.sessions.load(Ordering::Relaxed),
                reconnects: uplink.reconnects.load(Ordering::Relaxed),
                batches_sent: uplink.batches_sent.load(Ordering::Relaxed),
                local_blocks_sent: uplink.local_blocks_sent.load(Ordering::Relaxed),
            },
            firewall: RuntimeFirewall {
                entries: firewall.entries.load(Ordering::Relaxed),
                blocklist_version: firewall.version.load(Ordering::Relaxed),
                last_reconcile: if last > 0 { rfc3339(last) } else { None },
                reconciles: firewall.reconciles.load(Ordering::Relaxed),
                drift_repaired: firewall.drift_repaired.load(Ordering::Relaxed),
                errors: firewall.errors.load(Ordering::Relaxed),
                local_blocks: firewall.local_blocks.load(Ordering::Relaxed),
                connections_killed: firewall.connections_killed.load(Ordering::Relaxed),
                connections_would_kill: firewall.connections_would_kill.load(Ordering::Relaxed),
                connection_kill: crate::firewall::kill::describe(firewall.kill_support.load(Ordering::Relaxed))
                    .to_owned(),
            },
        }
    }

    /// Reads the runtime status from `state_dir`, if any.
    pub fn load(state_dir: &Path) -> Option<RuntimeStatus> {
        serde_json::from_slice(&std::fs::read(state_dir.join(STATUS_FILE)).ok()?).ok()
    }
}

/// The running services; stop them with [`Services::shutdown`].
pub struct Services {
    worker: Option<Worker>,
    firewall: FirewallHandle,
    detector: Option<Arc<Mutex<Detector>>>,
    detect_stats: Arc<DetectStats>,
    firewall_stats: Arc<FirewallStats>,
    uplink_stats: Arc<UplinkStats>,
    kinds: Arc<KindCounters>,
    timezone: Timezone,
    config: AgentConfig,
    own: Vec<IpAddr>,
    insecure: bool,
    reports: Option<mpsc::Receiver<LocalBlock>>,
    started: Option<oneshot::Receiver<Result<usize, String>>>,
    backend_name: &'static str,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    status_path: PathBuf,
    status: Arc<dyn Fn() -> RuntimeStatus + Send + Sync>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("tasks", &self.tasks.len()).finish_non_exhaustive()
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

impl Services {
    /// Starts the firewall thread (reconciling at once), detection and the
    /// status writer. The uplink and the metrics endpoint start with
    /// [`Services::attach`], once the pipeline runs.
    pub fn start(config: &AgentConfig, timezone: Timezone, options: ServiceOptions) -> Result<Services, ServiceError> {
        let own = crate::host::own_addresses(Some(config));
        let exclude = exclusions(config, &own);
        let firewall_stats = Arc::new(FirewallStats::default());
        let backend = backend_for(config, Exec { netns: options.netns.clone() });
        let backend_name = backend.name();
        let mut reconciler =
            Reconciler::new(backend, exclude.clone(), Some(config.state_dir.clone()), firewall_stats.clone());
        if config.firewall.end_connections {
            let options = KillOptions {
                scope: config.firewall.scope,
                ports: config.covered_ports(),
                dry_run: config.firewall.backend == FirewallBackend::DryRun,
                netns: options.netns.clone(),
            };
            reconciler = reconciler.with_killer(Killer::new(options, firewall_stats.clone()));
        }
        let (report_tx, report_rx) = mpsc::channel::<LocalBlock>(1024);
        let (started_tx, started_rx) = oneshot::channel();
        let worker = Worker::start(
            reconciler,
            WorkerOptions {
                reconcile_interval: Duration::from_secs(config.firewall.reconcile_secs),
                reports: Some(report_tx),
                applied: options.applied,
                started: Some(started_tx),
            },
        )
        .map_err(ServiceError::Spawn)?;
        let firewall = worker.handle();
        let detect_stats = Arc::new(DetectStats::default());
        let detector = config
            .detect
            .enabled
            .then(|| Arc::new(Mutex::new(Detector::new(&config.detect, exclude, detect_stats.clone()))));
        let uplink_stats = Arc::new(UplinkStats::default());
        let (stop, stop_rx) = watch::channel(false);
        let enrolled = Credentials::path(&config.state_dir).exists();
        let server = config.server_urls().join(", ");
        let (status_uplink, status_firewall) = (uplink_stats.clone(), firewall_stats.clone());
        let status: Arc<dyn Fn() -> RuntimeStatus + Send + Sync> =
            Arc::new(move || RuntimeStatus::collect(&server, enrolled, &status_uplink, &status_firewall));
        let status_path = config.state_dir.join(STATUS_FILE);
        let mut tasks = Vec::new();
        {
            let status = status.clone();
            let path = status_path.clone();
            let mut stop_rx = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    write_status(&path, &status());
                    tokio::select! {
                        () = tokio::time::sleep(STATUS_INTERVAL) => {}
                        _ = stop_rx.wait_for(|stop| *stop) => return,
                    }
                }
            }));
        }
        info!(backend = ?config.firewall.backend, detect = config.detect.enabled, "Agent firewall and detection started.");
        Ok(Services {
            worker: Some(worker),
            firewall,
            detector,
            detect_stats,
            firewall_stats,
            uplink_stats,
            kinds: Arc::new(KindCounters::default()),
            timezone,
            config: config.clone(),
            own,
            insecure: options.insecure,
            reports: Some(report_rx),
            started: Some(started_rx),
            backend_name,
            stop,
            tasks,
            status_path,
            status,
        })
    }

    /// Starts the uplink (when enrolled) and the metrics endpoint (when
    /// configured) on the running pipeline's spool.
    pub async fn attach(
        &mut self,
        spool: SharedSpool,
        durable: watch::Receiver<u64>,
        pipeline: Option<Arc<PipelineStats>>,
    ) -> Result<(), ServiceError> {
        let stop_rx = self.stop.subscribe();
        match (Credentials::load(&self.config.state_dir), self.reports.take()) {
            (Ok(credentials), Some(reports)) => {
                let policy_detector = self.detector.clone();
                let revoked_detector = self.detector.clone();
                let excluded =
                    Exclusions::new(exclusions(&self.config, &self.own), self.firewall.clone(), self.detector.clone());
                let urls = self.config.server_urls();
                let servers = Servers::new(urls.clone(), &credentials.agent_id);
                let ctx = UplinkContext {
                    server: ServerOptions {
                        server: urls.first().cloned().unwrap_or_default(),
                        ca_file: self.config.ca_file.clone(),
                        insecure: self.insecure,
                    },
                    credentials,
                    hostname: crate::host::hostname(),
                    addresses: self.own.clone(),
                    spool: spool.clone(),
                    durable,
                    firewall: self.firewall.clone(),
                    local_blocks: reports,
                    on_policy: Box::new(move |policy| {
                        if let Some(detector) = &policy_detector {
                            detector.lock().unwrap_or_else(PoisonError::into_inner).set_policy(policy);
                        }
                    }),
                    on_allowlist: excluded.allowlist_handler(),
                    on_revoked: Box::new(move |revoked| {
                        if let Some(detector) = &revoked_detector {
                            let now = crate::firewall::now_ms();
                            detector.lock().unwrap_or_else(PoisonError::into_inner).forget_revoked(revoked, now);
                        }
                    }),
                    on_server_address: excluded.server_address_handler(),
                    window: UPLINK_WINDOW,
                    stats: self.uplink_stats.clone(),
                };
                self.tasks.push(tokio::spawn(uplink::run_with(ctx, servers, stopped(stop_rx.clone()))));
            }
            (Err(error), _) => {
                warn!(%error, "Not enrolled: events are spooled and local blocks applied, but nothing is sent.");
            }
            (Ok(_), None) => warn!("The uplink is already running."),
        }
        if let Some(addr) = self.config.metrics.listen {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| ServiceError::Metrics { addr, source })?;
            let sources = metrics::Sources {
                pipeline,
                kinds: Some(self.kinds.clone()),
                detect: Some(self.detect_stats.clone()),
                firewall: Some(self.firewall_stats.clone()),
                uplink: Some(self.uplink_stats.clone()),
                spool: Some(spool),
            };
            self.tasks.push(tokio::spawn(metrics::serve(listener, sources, stopped(stop_rx))));
        }
        Ok(())
    }

    /// Waits for the firewall's reconcile at start and returns its outcome:
    /// the changes it made, or why it failed (the firewall thread retries at
    /// every periodic reconcile). Later calls return at once with the first
    /// call's answer lost: `Ok(0)`.
    pub async fn first_reconcile(&mut self) -> Result<usize, String> {
        match self.started.take() {
            Some(started) => started.await.unwrap_or_else(|_| Err("the firewall thread is gone".into())),
            None => Ok(0),
        }
    }

    /// Name of the firewall backend (`nftables`, `ipset`, `csf`, `dry-run`).
    pub fn backend_name(&self) -> &'static str {
        self.backend_name
    }

    /// A line parser for one pipeline source of `kind`.
    pub fn parser(&self, kind: LogKind) -> DetectingParser {
        DetectingParser::new(
            kind,
            self.timezone.clone(),
            self.detector.clone(),
            self.firewall.clone(),
            self.kinds.clone(),
        )
    }

    /// The firewall thread.
    pub fn firewall(&self) -> FirewallHandle {
        self.firewall.clone()
    }

    /// Stops the uplink (waiting for in-flight acks), the metrics endpoint
    /// and the firewall thread (entries stay in place). Call after the
    /// pipeline has stopped, so that no parser holds a firewall handle.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        write_status(&self.status_path, &(self.status)());
        drop(self.detector.take());
        let worker = self.worker.take();
        let firewall = self.firewall.clone();
        drop(self);
        drop(firewall);
        if let Some(worker) = worker {
            let (done_tx, done_rx) = oneshot::channel();
            std::thread::spawn(move || {
                worker.join();
                let _ = done_tx.send(());
            });
            let _ = done_rx.await;
        }
    }
}

fn write_status(path: &Path, status: &RuntimeStatus) {
    let Ok(json) = serde_json::to_vec_pretty(status) else { return };
    if let Err(error) = crate::fsutil::write_atomic(path, &json, 0o644) {
        warn!(%error, path = %path.display(), "Cannot write the runtime status.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_server_address_is_taken_from_the_url() {
        assert_eq!(server_addresses("https://192.0.2.5:50051"), vec![ip("192.0.2.5")]);
        assert_eq!(server_addresses("http://[2001:db8::5]:50051/"), vec![ip("2001:db8::5")]);
        assert_eq!(server_addresses("https://[::ffff:192.0.2.6]"), vec![ip("192.0.2.6")]);
        assert!(server_addresses("https://localhost:50051").contains(&ip("127.0.0.1")));
        assert!(server_addresses("https://name.invalid:50051").is_empty());
        assert!(server_addresses("").is_empty());
    }

    #[test]
    fn the_server_is_excluded_from_detection_and_the_firewall_plan() {
        let config = AgentConfig::from_toml("server = \"https://192.0.2.5:50051\"\n", Path::new("agent.toml")).unwrap();
        let exclude = exclusions(&config, &[ip("198.51.100.1")]);
        assert!(exclude.contains(&"192.0.2.5/32".parse().unwrap()), "{exclude:?}");
        // The reconciler's plan never holds an excluded address, even when
        // the fleet blocklist names it.
        let entry =
            |net: &str| crate::firewall::Entry { net: net.parse().unwrap(), expires_at_ms: None, reason: "t".into() };
        let fleet = [entry("192.0.2.5/32"), entry("192.0.2.0/24"), entry("203.0.113.9/32")];
        let plan = crate::firewall::plan::desired(&fleet, &exclude, 0);
        assert!(plan.keys().all(|net| !net.contains(&ip("192.0.2.5"))), "{plan:?}");
        assert!(plan.contains_key(&"203.0.113.9/32".parse::<IpNet>().unwrap()));
        assert!(plan.contains_key(&"192.0.2.4/32".parse::<IpNet>().unwrap()), "the rest of the /24 stays blocked");
    }
}
