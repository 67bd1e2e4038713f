//! The demo: a whole fleet on one machine, without root.
//!
//! [`run`] starts Postgres (the embedded one unless a URL is given), the
//! server (gRPC for agents, HTTP API and dashboard on 127.0.0.1), creates an
//! enrollment token, and starts [`DemoOptions::hosts`] agents (`mx1`, `mx2`,
//! ...) in this process with the real agent library: each has its own state
//! directory and Exim log, the `dry-run` firewall, enrolls through the real
//! `Enroll` RPC and streams through the real uplink. Then it replays a
//! scripted attack ([`crate::demo_script`]) against their logs while
//! legitimate mail keeps flowing, and prints a timeline: every block, the
//! hosts whose firewall state holds it and the latency from the log line
//! that triggered it; the events stored every few seconds.
//!
//! The observer reads each agent's `firewall-dryrun.json` every
//! [`POLL_INTERVAL`], so a measured latency is at most that much late.
//!
//! Everything stops when the `stop` future resolves: the script, the agents
//! (spools flushed), the server, Postgres; the temporary directory is
//! removed (unless [`DemoOptions::work_dir`] names one to keep).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleetban_agent::config::AgentConfig;
use fleetban_agent::firewall::dryrun;
use fleetban_agent::uplink::{self, ServerOptions};
use fleetban_server::{api, auth, db, pgembed, serve};
use ipnet::IpNet;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::demo_script::{self as script, Firewalls, Fleet};

/// How often the observer reads the agents' firewall state.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long a block may take to reach every host before it is printed with
/// the hosts it reached so far.
const SPREAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors that stop the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded Postgres cannot start.
    #[error(transparent)]
    Postgres(#[from] pgembed::Error),
    /// The database cannot be reached or migrated.
    #[error(transparent)]
    Database(#[from] db::Error),
    /// A query failed.
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    /// An enrollment token could not be created.
    #[error("enrollment token: {0}")]
    Token(#[from] auth::AuthError),
    /// The admin API token could not be created.
    #[error("API token: {0}")]
    ApiToken(#[from] api::auth::TokenError),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// An agent's configuration was refused.
    #[error("agent config: {0}")]
    Config(#[from] fleetban_agent::config::ConfigError),
    /// An agent could not enroll.
    #[error("enrollment of {host}: {source}")]
    Enroll {
        /// The host.
        host: String,
        /// The error.
        source: uplink::UplinkError,
    },
    /// The server failed.
    #[error("server: {0}")]
    Server(#[from] serve::Error),
    /// A task panicked.
    #[error("{0} panicked")]
    Panicked(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// How the demo runs.
#[derive(Clone)]
pub struct DemoOptions {
    /// Simulated hosts (at least 2). Default 4.
    pub hosts: usize,
    /// Postgres URL; `None` = an embedded cluster, removed at the end.
    pub database_url: Option<String>,
    /// Directory for the agents' state and logs, kept at the end; `None` =
    /// a temporary directory, removed at the end.
    pub work_dir: Option<PathBuf>,
    /// Preferred HTTP address (a free port is taken when it is busy).
    pub http_listen: SocketAddr,
    /// Preferred gRPC address (a free port is taken when it is busy).
    pub grpc_listen: SocketAddr,
    /// Interval of the legitimate deliveries (round-robin over the hosts).
    pub legit_every: Duration,
    /// Stop on its own this long after the scripted attack ran (tests);
    /// `None` = only when `stop` resolves.
    pub exit_after_script: Option<Duration>,
    /// Where the timeline goes.
    pub out: Arc<Mutex<dyn std::io::Write + Send>>,
}

impl std::fmt::Debug for DemoOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoOptions")
            .field("hosts", &self.hosts)
            .field("work_dir", &self.work_dir)
            .field("http_listen", &self.http_listen)
            .field("grpc_listen", &self.grpc_listen)
            .finish_non_exhaustive()
    }
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            hosts: 4,
            database_url: None,
            work_dir: None,
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            legit_every: Duration::from_millis(250),
            exit_after_script: None,
            out: Arc::new(Mutex::new(std::io::stdout())),
        }
    }
}

/// One block as the timeline saw it.
#[derive(Debug, Clone)]
pub struct BlockSeen {
    /// The range.
    pub net: IpNet,
    /// The reason recorded in the first host's firewall entry.
    pub reason: String,
    /// What the triggering line was part of, and on which host.
    pub trigger: Option<(&'static str, String)>,
    /// Per host (by name): latency from the triggering line, ms.
    pub reached: BTreeMap<String, f64>,
}

/// What the demo did, for tests and the summary.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// Host names, in order.
    pub hosts: Vec<String>,
    /// State directories, in host order (gone unless `work_dir` was set).
    pub state_dirs: Vec<PathBuf>,
    /// Every block seen, in the order it first appeared.
    pub blocks: Vec<BlockSeen>,
    /// Script counters.
    pub lines_written: u64,
    /// Attack lines the hosts' firewalls dropped.
    pub attack_dropped: u64,
    /// Legitimate lines the hosts' firewalls dropped (false positives).
    pub legit_dropped: u64,
    /// Events the server stored.
    pub events_stored: u64,
    /// Whether every scripted attack step ran (the stop came after it).
    pub script_completed: bool,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Prints one line of the timeline.
#[derive(Clone)]
struct Printer {
    out: Arc<Mutex<dyn std::io::Write + Send>>,
    t0: Instant,
}

impl Printer {
    fn line(&self, text: &str) {
        let secs = self.t0.elapsed().as_secs_f64();
        let mut out = lock(&self.out);
        let _ = writeln!(out, "[{secs:6.2}s] {text}");
        let _ = out.flush();
    }

    fn raw(&self, text: &str) {
        let mut out = lock(&self.out);
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// Binds `preferred`, or a free port on its address when it is taken.
async fn bind(preferred: SocketAddr) -> Result<tokio::net::TcpListener, DemoError> {
    match tokio::net::TcpListener::bind(preferred).await {
        Ok(listener) => Ok(listener),
        Err(_) => tokio::net::TcpListener::bind(SocketAddr::new(preferred.ip(), 0))
            .await
            .map_err(io_err(format!("bind {}", preferred.ip()))),
    }
}

/// Per host index: when a range was first seen there, and its reason.
type SeenOn = HashMap<usize, (Instant, String)>;

/// The firewall state of every host: first-seen times per range.
#[derive(Debug, Default)]
struct Observed {
    /// net -> host -> (first seen, reason).
    seen: HashMap<IpNet, SeenOn>,
    /// Order in which nets first appeared.
    order: Vec<IpNet>,
}

/// Reads every host's dry-run file every [`POLL_INTERVAL`] until `stop`.
fn observe(
    files: Vec<PathBuf>,
    firewalls: Firewalls,
    observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for (host, file) in files.iter().enumerate() {
                let Ok(bytes) = std::fs::read(file) else { continue };
                let Ok(records) = serde_json::from_slice::<Vec<dryrun::Record>>(&bytes) else { continue };
                let now = Instant::now();
                let nets: Vec<(IpNet, String)> =
                    records.into_iter().filter_map(|r| Some((r.cidr.parse::<IpNet>().ok()?, r.reason))).collect();
                {
                    let mut obs = lock(&observed);
                    for (net, reason) in &nets {
                        if !obs.seen.contains_key(net) {
                            obs.order.push(*net);
                        }
                        obs.seen.entry(*net).or_default().entry(host).or_insert((now, reason.clone()));
                    }
                }
                if let Some(slot) = lock(&firewalls).get_mut(host) {
                    *slot = nets.into_iter().map(|(net, _)| net).collect();
                }
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    })
}

/// The timeline's view of blocks: prints each one when it has reached every
/// host (or after [`SPREAD_TIMEOUT`]).
struct Timeline {
    printer: Printer,
    hosts: Vec<String>,
    observed: Arc<Mutex<Observed>>,
    fleet: Arc<Fleet>,
    printed: Vec<IpNet>,
    report: Vec<BlockSeen>,
}

impl Timeline {
    fn block_seen(&self, net: IpNet, seen: &SeenOn) -> BlockSeen {
        let first = seen.values().map(|(at, _)| *at).min();
        let first_host = seen.iter().min_by_key(|(_, (at, _))| *at).map(|(h, _)| *h);
        let writes = self.fleet.writes();
        let trigger = first.and_then(|first| {
            writes.iter().filter(|w| net.contains(&w.sender) && w.at <= first).max_by_key(|w| w.at).cloned()
        });
        let mut reached = BTreeMap::new();
        for (host, (at, _)) in seen {
            if let (Some(name), Some(t)) = (self.hosts.get(*host), &trigger) {
                reached.insert(name.clone(), at.saturating_duration_since(t.at).as_secs_f64() * 1000.0);
            }
        }
        BlockSeen {
            net,
            reason: first_host.and_then(|h| seen.get(&h)).map(|(_, r)| r.clone()).unwrap_or_default(),
            trigger: trigger.map(|t| (t.label, self.hosts.get(t.host).cloned().unwrap_or_default())),
            reached,
        }
    }

    /// Prints the blocks that are complete (or overdue); with `all`, every
    /// block not printed yet.
    fn poll(&mut self, all: bool) {
        let pending: Vec<(IpNet, SeenOn)> = {
            let obs = lock(&self.observed);
            obs.order
                .iter()
                .filter(|net| !self.printed.contains(net))
                .filter_map(|net| obs.seen.get(net).map(|s| (*net, s.clone())))
                .collect()
        };
        for (net, seen) in pending {
            let first = seen.values().map(|(at, _)| *at).min();
            let complete = seen.len() >= self.hosts.len();
            let overdue = first.is_some_and(|f| f.elapsed() >= SPREAD_TIMEOUT);
            if !(complete || overdue || all) {
                continue;
            }
            self.printed.push(net);
            let block = self.block_seen(net, &seen);
            let mut text = format!("BLOCK {net} ({})", block.reason);
            match &block.trigger {
                Some((label, host)) => {
                    let _ = write!(text, " <- {label} on {host}; reached, ms after the triggering line:");
                }
                None => text.push_str(" (no triggering line written by the demo); reached:"),
            }
            let mut order: Vec<(&String, &f64)> = block.reached.iter().collect();
            order.sort_by(|a, b| a.1.total_cmp(b.1));
            for (host, ms) in order {
                let _ = write!(text, " {host} {ms:.0}");
            }
            let missing: Vec<&str> =
                self.hosts.iter().enumerate().filter(|(i, _)| !seen.contains_key(i)).map(|(_, h)| h.as_str()).collect();
            if !missing.is_empty() {
                let _ = write!(text, "; NOT on {}", missing.join(", "));
            }
            self.printer.line(&text);
            self.report.push(block);
        }
    }
}

/// Waits until every host's firewall holds a range containing `ip`, or
/// `timeout`; returns whether it did.
async fn wait_blocked_everywhere(firewalls: &Firewalls, ip: IpAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let done = lock(firewalls).iter().all(|set| set.iter().any(|net| net.contains(&ip)));
        if done {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Events stored per agent name.
async fn event_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "select a.name, (select count(*) from events e where e.agent_id = a.id) from agents a order by a.name",
    )
    .fetch_all(pool)
    .await
}

/// The scripted attack; returns when every step ran.
async fn attack(fleet: Arc<Fleet>, firewalls: Firewalls, printer: Printer) {
    let wait = Duration::from_secs(5);
    let hosts = fleet.hosts();
    tokio::time::sleep(Duration::from_secs(3)).await;
    script::legit_typo(&fleet);
    printer.line(&format!(
        "ATTACK 1: slot-exhaustion flood on mx1 from {}: connection count 2..{}, then `refused: too many connections`",
        script::FLOOD_SOURCE,
        script::SMTP_ACCEPT_MAX
    ));
    script::flood(&fleet);
    if !wait_blocked_everywhere(&firewalls, script::FLOOD_SOURCE, wait).await {
        printer.line("  the flood source is not blocked on every host yet; going on");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    printer.line(&format!(
        "ATTACK 2: distributed AUTH brute force from {}: 4 failed logins (4 users) on mx2, then mx3, ... \
         (each host's own threshold: 10 failures or 5 users; the fleet's: 15 failures or 7 users)",
        script::BRUTE_SOURCE
    ));
    let users = [
        ["admin@example.com", "info@example.com", "sales@example.com", "office@example.com"],
        ["billing@example.com", "support@example.com", "hr@example.com", "ceo@example.com"],
    ];
    for (step, host) in (1..hosts).chain(std::iter::once(0)).enumerate() {
        script::brute_force(&fleet, host, &users[step % 2]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    if !wait_blocked_everywhere(&firewalls, script::BRUTE_SOURCE, wait).await {
        printer.line("  the brute-force source is not blocked on every host yet; going on");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    printer.line(&format!(
        "ATTACK 3: campaign from {}: 4 relay attempts from each of 4 addresses on two hosts, \
         each address under every threshold",
        script::CAMPAIGN_PREFIX
    ));
    for (i, ip) in script::CAMPAIGN.iter().take(4).enumerate() {
        for round in 0..4 {
            script::campaign(&fleet, i % hosts, *ip, (i * 8 + round) as u64);
            script::campaign(&fleet, (i + 1) % hosts, *ip, (i * 8 + 4 + round) as u64);
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // The fifth address has not been seen: only the prefix covers it.
    if !wait_blocked_everywhere(&firewalls, IpAddr::V4(script::CAMPAIGN[4]), wait).await {
        printer.line(&format!("  {} is not blocked on every host yet; going on", script::CAMPAIGN_PREFIX));
    }
    let fifth = script::CAMPAIGN[4];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = script::campaign(&fleet, 1 % hosts, fifth, 99);
    if written == 0 {
        printer.line(&format!("  {fifth}, never seen before, tries mx2: dropped by the prefix block"));
    } else {
        printer.line(&format!("  {fifth}, never seen before, reached mx2's log: the prefix is not blocked there"));
    }
    printer.line("script done; legitimate mail keeps flowing (Ctrl-C to stop)");
}

/// Runs the demo until `stop` resolves.
pub async fn run(
    options: DemoOptions,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<DemoReport, DemoError> {
    let hosts = options.hosts.max(2);
    let printer = Printer { out: options.out.clone(), t0: Instant::now() };

    // Postgres.
    let pg = match &options.database_url {
        Some(_) => None,
        None => Some(
            tokio::task::spawn_blocking(pgembed::EmbeddedPostgres::start)
                .await
                .map_err(|_| DemoError::Panicked("embedded postgres start"))??,
        ),
    };
    let url = match (&options.database_url, &pg) {
        (Some(url), _) => url.clone(),
        (None, Some(pg)) => pg.url(),
        (None, None) => return Err(DemoError::Panicked("postgres")),
    };
    let pool = db::connect(&url, 32).await?;
    db::migrate(&pool).await?;

    // Server.
    let grpc = bind(options.grpc_listen).await?;
    let http = bind(options.http_listen).await?;
    let grpc_addr = grpc.local_addr().map_err(io_err("gRPC address"))?;
    let http_addr = http.local_addr().map_err(io_err("HTTP address"))?;
    let server_options = serve::Options::default();
    let stats = server_options.stats.clone();
    let (server_stop_tx, mut server_stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve::run(pool.clone(), server_options, serve::Listeners { grpc, http }, async move {
        let _ = server_stop_rx.wait_for(|s| *s).await;
    }));

    // Work directory.
    let temp = match &options.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
            None
        }
        None => Some(
            tempfile::Builder::new()
                .prefix("fleetban-demo-")
                .tempdir()
                .map_err(io_err("create a temporary directory"))?,
        ),
    };
    let work: PathBuf = match (&options.work_dir, &temp) {
        (Some(dir), _) => dir.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => return Err(DemoError::Panicked("work dir")),
    };

    // Agents: enroll through the real RPC, then run.
    let names: Vec<String> = (1..=hosts).map(|i| format!("mx{i}")).collect();
    let admin = api::auth::create_token(&pool, api::auth::Role::Admin, Some("demo-admin")).await?;
    let token = auth::create_enrollment_token(&pool, hosts as u32, Duration::from_secs(600), "demo").await?;
    let server_url = format!("http://{grpc_addr}");
    let (agents_stop_tx, agents_stop_rx) = watch::channel(false);
    let mut agents = Vec::new();
    let mut logs = Vec::new();
    let mut state_dirs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let state_dir = work.join(name);
        std::fs::create_dir_all(&state_dir).map_err(io_err(format!("create {}", state_dir.display())))?;
        let log = state_dir.join("exim_mainlog");
        std::fs::File::create(&log).map_err(io_err(format!("create {}", log.display())))?;
        let config = AgentConfig::from_toml(
            &agent_toml(&server_url, &state_dir, &log, script::host_address(i)),
            &state_dir.join("agent.toml"),
        )?;
        let server = ServerOptions { server: server_url.clone(), ca_file: None, insecure: false };
        let credentials = uplink::enroll(&server, &token, name, &[script::host_address(i)])
            .await
            .map_err(|source| DemoError::Enroll { host: name.clone(), source })?;
        credentials.store(&state_dir).map_err(io_err(format!("store credentials of {name}")))?;
        let mut stop = agents_stop_rx.clone();
        agents.push(tokio::spawn(fleetban_agent::run::run(config, async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
        logs.push(log);
        state_dirs.push(state_dir);
    }

    printer.raw(&banner(&url, options.database_url.is_none(), grpc_addr, http_addr, &names, &work, temp.is_some()));
    printer.raw(&format!("  admin token {}  (paste it into the dashboard, or: curl -H 'Authorization: Bearer {}' http://{http_addr}/api/v1/blocks)\n", admin.token, admin.token));

    // Wait for every agent's session.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connected: i64 = sqlx::query_scalar("select count(*) from agents where connected").fetch_one(&pool).await?;
        if connected as usize >= hosts || Instant::now() > deadline {
            printer.line(&format!("{connected} of {hosts} agents enrolled and connected"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Observer, traffic, script.
    let firewalls: Firewalls = Arc::new(Mutex::new(vec![Vec::new(); hosts]));
    let observed = Arc::new(Mutex::new(Observed::default()));
    let observer_stop = Arc::new(AtomicBool::new(false));
    let observer = observe(
        state_dirs.iter().map(|d| d.join(dryrun::FILE_NAME)).collect(),
        firewalls.clone(),
        observed.clone(),
        observer_stop.clone(),
    );
    let fleet = Arc::new(Fleet::open(&logs, firewalls.clone()).map_err(io_err("open the demo logs"))?);
    let (traffic_stop_tx, traffic_stop_rx) = watch::channel(false);
    let traffic = tokio::spawn(script::legit_traffic(fleet.clone(), options.legit_every, traffic_stop_rx));
    printer.line(&format!(
        "legitimate mail: one delivery every {} ms, round-robin over the hosts, from {} senders",
        options.legit_every.as_millis(),
        script::legit_senders().len()
    ));
    let mut script_task = tokio::spawn(attack(fleet.clone(), firewalls.clone(), printer.clone()));
    let mut script_completed = false;
    let mut timeline = Timeline {
        printer: printer.clone(),
        hosts: names.clone(),
        observed: observed.clone(),
        fleet: fleet.clone(),
        printed: Vec::new(),
        report: Vec::new(),
    };

    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut last_counts = Instant::now();
    let mut exit_at: Option<Instant> = None;
    loop {
        if exit_at.is_some_and(|at| Instant::now() >= at) {
            break;
        }
        tokio::select! {
            () = &mut stop => break,
            result = &mut script_task, if !script_completed => {
                script_completed = result.is_ok();
                if !script_completed { break; }
                exit_at = options.exit_after_script.map(|after| Instant::now() + after);
            }
            _ = tick.tick() => {
                timeline.poll(false);
                if last_counts.elapsed() >= Duration::from_secs(5) {
                    last_counts = Instant::now();
                    print_counts(&printer, &pool, &fleet, &stats).await;
                }
            }
        }
    }

    // Stop: script and traffic, then let the last blocks settle in the
    // report, then agents, server, Postgres.
    script_task.abort();
    let _ = traffic_stop_tx.send(true);
    let _ = traffic.await;
    timeline.poll(true);
    print_counts(&printer, &pool, &fleet, &stats).await;
    let _ = agents_stop_tx.send(true);
    for agent in agents {
        match agent.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "A demo agent stopped with an error."),
            Err(_) => tracing::warn!("A demo agent task panicked."),
        }
    }
    observer_stop.store(true, Ordering::Relaxed);
    let _ = observer.join();
    let events_stored: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await?;
    let _ = server_stop_tx.send(true);
    match server.await {
        Ok(result) => result?,
        Err(_) => return Err(DemoError::Panicked("server")),
    }
    pool.close().await;
    let counts = fleet.counts();
    let report = DemoReport {
        hosts: names,
        state_dirs,
        blocks: timeline.report,
        lines_written: counts.lines,
        attack_dropped: counts.attack_dropped,
        legit_dropped: counts.legit_dropped,
        events_stored: u64::try_from(events_stored).unwrap_or(0),
        script_completed,
    };
    printer.line(&summary(&report));
    drop(pg);
    if let Some(temp) = temp {
        let path = temp.path().display().to_string();
        temp.close().map_err(io_err(format!("remove {path}")))?;
    }
    printer.line("stopped; agents, server and Postgres shut down, temporary files removed");
    Ok(report)
}

async fn print_counts(printer: &Printer, pool: &PgPool, fleet: &Fleet, stats: &fleetban_server::session::Stats) {
    let counts = fleet.counts();
    let per_agent = match event_counts(pool).await {
        Ok(rows) => rows.iter().map(|(name, n)| format!("{name} {n}")).collect::<Vec<_>>().join(", "),
        Err(error) => format!("unavailable ({error})"),
    };
    let live: i64 = sqlx::query_scalar(
        "select count(*) from blocks where revoked_at is null and (expires_at is null or expires_at > now())",
    )
    .fetch_one(pool)
    .await
    .unwrap_or(-1);
    printer.line(&format!(
        "events stored {} ({per_agent}); log lines written {}; attack lines dropped by firewalls {}; \
         legitimate lines dropped {}; live fleet blocks {live}",
        fleetban_server::session::Stats::get(&stats.events_stored),
        counts.lines,
        counts.attack_dropped,
        counts.legit_dropped,
    ));
}

fn summary(report: &DemoReport) -> String {
    let mut text = String::from("summary:");
    for block in &report.blocks {
        let worst = block.reached.values().copied().fold(0.0f64, f64::max);
        let _ = write!(
            text,
            "\n    {:<18} on {} of {} hosts, slowest {worst:.0} ms",
            block.net,
            block.reached.len(),
            report.hosts.len()
        );
    }
    let _ = write!(
        text,
        "\n    {} events stored; {} legitimate lines dropped by a firewall",
        report.events_stored, report.legit_dropped
    );
    text
}

fn banner(
    url: &str,
    embedded: bool,
    grpc: SocketAddr,
    http: SocketAddr,
    names: &[String],
    work: &Path,
    temp: bool,
) -> String {
    let pg = if embedded { format!("{url} (embedded, removed at exit)") } else { url.to_owned() };
    let work = if temp { format!("{} (removed at exit)", work.display()) } else { work.display().to_string() };
    format!(
        "fleetban demo\n\
         \x20 postgres    {pg}\n\
         \x20 agents gRPC http://{grpc}\n\
         \x20 dashboard   http://{http}/\n\
         \x20 API         http://{http}/api/v1/  health http://{http}/healthz\n\
         \x20 hosts       {} (in-process agents, dry-run firewall, smtp_accept_max = {})\n\
         \x20 state       {work}",
        names.join(" "),
        script::SMTP_ACCEPT_MAX
    )
}

/// The agent configuration of one demo host.
fn agent_toml(server: &str, state_dir: &Path, log: &Path, address: IpAddr) -> String {
    format!(
        "server = \"{server}\"\n\
         state_dir = \"{}\"\n\
         timezone = \"UTC\"\n\
         addresses = [\"{address}\"]\n\
         [[source]]\n\
         path = \"{}\"\n\
         start_at = \"beginning\"\n\
         [firewall]\n\
         backend = \"dry-run\"\n\
         reconcile_secs = 30\n\
         [detect]\n\
         smtp_accept_max = {}\n",
        state_dir.display(),
        log.display(),
        script::SMTP_ACCEPT_MAX
    )
}
