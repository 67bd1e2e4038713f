//! The fleet simulator (`fleetban-bench fleet`): thousands of simulated
//! hosts with realistic log rates against the real `fleetban-server serve`
//! binary, and what it costs the server and Postgres.
//!
//! ```text
//! fleetban-bench fleet ──Postgres (embedded, or DATABASE_URL)
//!   │  enrolls H agents (auth::enroll_agent), writes server.toml
//!   ├─ fleetban-server serve --config server.toml      (its own process)
//!   └─ fleetban-bench fleet-agents --first I --count N  (one per N hosts)
//!        each host: traffic model → 100 ms batches → spool → Connect session
//! ```
//!
//! The server and the agents are separate processes because one process may
//! hold at most 20,000 descriptors here; each simulator process raises its
//! soft limit to the hard one and serves `agents_per_process` hosts, each
//! from its own loopback source address (`agents::source_address`).
//!
//! The run, every step bounded in time:
//! 1. the server starts; its RSS is sampled; the H agents connect idle
//!    (spread over `ramp_secs`); RSS again: the memory of one session;
//! 2. traffic on; after the warm-up, the measured window: stored rows (the
//!    insert counters of `events` and of every table), events offered vs.
//!    acknowledged, the oldest unacknowledged batch, server and Postgres
//!    CPU (`/proc/PID/stat`) and the time their threads waited for a CPU
//!    (`/proc/PID/task/TID/schedstat`), server RSS (`/proc/PID/status`), database
//!    and table sizes; meanwhile a block is committed every
//!    `block_interval_ms` and each simulator reports when its last agent got
//!    the block's delta (monotonic clock, shared by the processes);
//! 3. the reconnect storm: the server is killed (`SIGKILL`, or `SIGTERM`)
//!    and started again; the time until every agent has a new session and
//!    the session attempts per second;
//! 4. traffic off, the spools drain, and the stored events of the run's
//!    agents are counted against the acknowledged ones (exactly once).
//!
//! It prints one table and a `fleet-json:` line with the same figures.
//!
//! # Layout
//!
//! - `traffic`: the hosts' traffic model and the output step of a flush.
//! - `agents`: one simulator process (the hidden `fleet-agents` command).
//! - `probe`: `/proc` and Postgres measurements.

pub mod agents;
pub mod probe;
pub mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fleetban_server::{auth, db};
use serde::Serialize;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use uuid::Uuid;

use agents::Report;
use probe::Sample;
use traffic::ContextMode;

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the run.
pub fn mono_ns() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct passed and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// How the server is stopped for the reconnect storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StormSignal {
    /// `kill -9`: no goodbye to any agent.
    Kill,
    /// `SIGTERM`: the server's graceful shutdown.
    Term,
}

/// Options of `fleetban-bench fleet`.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Simulated hosts.
    #[arg(long, default_value_t = 10_000)]
    pub hosts: usize,
    /// Measured window with traffic, seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Traffic before the window, seconds.
    #[arg(long, default_value_t = 10)]
    pub warmup_secs: u64,
    /// What hosts send for context events.
    #[arg(long, value_enum, default_value_t = ContextMode::Individual)]
    pub context: ContextMode,
    /// Mean context lines per second per host.
    #[arg(long, default_value_t = 30.0)]
    pub context_per_sec: f64,
    /// Share of hosts under attack, percent.
    #[arg(long, default_value_t = 10)]
    pub attacked_percent: u32,
    /// Highest abuse rate of an attacked host's burst, lines per second.
    #[arg(long, default_value_t = 1000.0)]
    pub burst_max: f64,
    /// Hosts per simulator process.
    #[arg(long, default_value_t = 2500)]
    pub agents_per_process: usize,
    /// Seed of the traffic model.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Blocks committed with every agent connected and no traffic.
    #[arg(long, default_value_t = 20)]
    pub idle_blocks: u32,
    /// Interval between the blocks committed, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub block_interval_ms: u64,
    /// Spread of the agents' first connections, seconds (default: one
    /// second per 500 hosts).
    #[arg(long)]
    pub ramp_secs: Option<u64>,
    /// Longest wait for all H agents to connect, seconds.
    #[arg(long, default_value_t = 180)]
    pub connect_timeout_secs: u64,
    /// How the server is stopped for the reconnect storm.
    #[arg(long, value_enum, default_value_t = StormSignal::Kill)]
    pub storm_signal: StormSignal,
    /// Longest wait for every agent to be back after the restart, seconds.
    #[arg(long, default_value_t = 180)]
    pub storm_timeout_secs: u64,
    /// No reconnect storm.
    #[arg(long)]
    pub skip_storm: bool,
    /// Longest wait for the spools to drain at the end, seconds.
    #[arg(long, default_value_t = 120)]
    pub drain_secs: u64,
    /// Simulated agents do not answer deltas with `Applied` (the agent
    /// does): a diagnostic of what those reports cost propagation.
    #[arg(long)]
    pub skip_applied: bool,
    /// Nice value of the simulator processes (0 to 19). They do the work of
    /// 10,000 hosts (rendering and aggregating every host's lines, each
    /// agent's session), which in a fleet runs on the hosts themselves; a
    /// positive value lets the server and Postgres go first on this
    /// machine's cores. The lines the hosts still generate are reported.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub simulator_nice: i32,
    /// Database pool of the server, connections.
    #[arg(long, default_value_t = 32)]
    pub pool: u32,
    /// The `fleetban-server` binary (default: `$FLEETBAN_BIN_DIR`, else next
    /// to this binary).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
}

/// Everything the run measured; printed as a table and as JSON.
#[derive(Debug, Default, Serialize)]
pub struct FleetResult {
    pub hosts: usize,
    pub attacked_hosts: usize,
    pub context: String,
    pub processes: usize,
    pub load_before: String,
    pub window_secs: f64,
    pub connect_all_secs: f64,
    pub rss_before_kb: u64,
    pub rss_idle_kb: u64,
    pub kb_per_session: f64,
    pub offered_events_per_sec: f64,
    pub acked_events_per_sec: f64,
    pub stored_event_rows_per_sec: f64,
    pub stored_rows_all_tables_per_sec: f64,
    /// Summaries: offered (in spooled batches), acknowledged, stored rows;
    /// and the lines they cover, offered and acknowledged.
    pub offered_summaries_per_sec: f64,
    pub acked_summaries_per_sec: f64,
    pub stored_summary_rows_per_sec: f64,
    pub offered_summary_lines_per_sec: f64,
    pub acked_summary_lines_per_sec: f64,
    /// Individual events in spooled batches (every line in `individual`
    /// mode).
    pub offered_individual_events_per_sec: f64,
    pub offered_batches_per_sec: f64,
    pub acked_batches_per_sec: f64,
    pub pending_batches_end: u64,
    pub oldest_pending_ms_end: i64,
    pub dropped_events: u64,
    pub server_cpu_percent: f64,
    pub postgres_cpu_percent: Option<f64>,
    pub simulators_cpu_percent: f64,
    /// Time the processes' threads were ready to run but waited for a CPU
    /// (run queue, `/proc/PID/task/TID/schedstat`), % of one core: how
    /// much the processes competed for this machine's cores.
    pub server_cpu_wait_percent: f64,
    pub postgres_cpu_wait_percent: Option<f64>,
    pub simulators_cpu_wait_percent: f64,
    pub server_rss_mean_kb: u64,
    pub server_rss_max_kb: u64,
    pub db_bytes_growth: i64,
    pub event_bytes_per_row: f64,
    pub summary_bytes_per_row: f64,
    pub db_bytes_per_stored_event: f64,
    pub db_bytes_per_day_at_stored_rate: f64,
    pub db_bytes_per_day_at_offered_rate: f64,
    pub db_bytes_per_host_day_at_offered_rate: f64,
    pub table_growth: Vec<(String, i64, i64)>,
    pub blocks_committed: usize,
    pub blocks_incomplete: usize,
    pub propagation_p50_ms: f64,
    pub propagation_p99_ms: f64,
    pub propagation_max_ms: f64,
    /// Commit to the first agent that got the block, p50 / p99 over blocks.
    pub propagation_first_p50_ms: f64,
    pub propagation_first_p99_ms: f64,
    pub storm_signal: String,
    pub storm_skipped: bool,
    pub skip_applied: bool,
    pub simulator_nice: i32,
    pub storm_restart_ms: f64,
    pub storm_all_back_ms: Option<f64>,
    pub storm_attempts_per_sec: Vec<u64>,
    /// How late the simulators' event loops woke for a 10 ms timer during
    /// the measured window (p50 / p99 / max, ms): the share of an agent's
    /// propagation time the simulated agent itself adds.
    pub simulator_loop_lag_p50_ms: f64,
    pub simulator_loop_lag_p99_ms: f64,
    pub simulator_loop_lag_max_ms: f64,
    pub final_stored_events: i64,
    pub final_acked_events: u64,
    pub final_generated_events: u64,
    /// Events sent but unacknowledged when the simulators stopped: stored or
    /// not, so `acked <= stored <= acked + in flight` holds exactly once.
    pub final_in_flight_events: u64,
    /// Summary rows stored / acknowledged / in flight at stop, and the lines
    /// they cover (`sum(lines)` of the stored rows).
    pub final_stored_summaries: i64,
    pub final_acked_summaries: u64,
    pub final_in_flight_summaries: u64,
    pub final_stored_summary_lines: i64,
    pub final_acked_summary_lines: u64,
    pub final_in_flight_summary_lines: u64,
    /// Whether the stored counts (events, summaries, summarised lines) are
    /// each within those bounds.
    pub exactly_once: bool,
    /// Propagation with every agent connected and no traffic.
    pub idle_propagation_p50_ms: f64,
    pub idle_propagation_p99_ms: f64,
    pub idle_propagation_max_ms: f64,
    pub idle_propagation_first_p50_ms: f64,
    pub idle_propagation_first_p99_ms: f64,
    pub idle_blocks_incomplete: usize,
    pub drained: bool,
}

/// Runs `fleetban-bench fleet` against the Postgres at `url`.
pub async fn run(url: &str, args: FleetArgs) -> anyhow::Result<FleetResult> {
    if args.hosts == 0 || args.agents_per_process == 0 {
        bail!("--hosts and --agents-per-process must be at least 1");
    }
    let server_bin = match &args.server_bin {
        Some(path) => path.clone(),
        None => default_server_bin()?,
    };
    let mut result = FleetResult {
        hosts: args.hosts,
        context: args.context.to_string(),
        load_before: std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned(),
        storm_signal: format!("{:?}", args.storm_signal).to_lowercase(),
        skip_applied: args.skip_applied,
        simulator_nice: args.simulator_nice,
        storm_skipped: args.skip_storm,
        ..Default::default()
    };
    let pool = db::connect(url, 4).await?;
    db::migrate(&pool).await?;
    let dir = tempfile::Builder::new().prefix("fleetban-fleet-").tempdir()?;
    println!("fleet: enrolling {} agents", args.hosts);
    let started = Instant::now();
    let ids = enroll(&pool, args.hosts, &dir.path().join("credentials")).await?;
    println!("fleet: enrolled in {:.1} s", started.elapsed().as_secs_f64());
    let model = traffic::FleetModel {
        seed: args.seed,
        hosts: args.hosts,
        context_per_sec: args.context_per_sec,
        attacked_percent: args.attacked_percent,
        burst_max: args.burst_max,
    };
    result.attacked_hosts = (0..args.hosts).filter(|i| model.host(*i).attacked).count();

    let grpc = free_port()?;
    let http = free_port()?;
    let config = dir.path().join("server.toml");
    std::fs::write(&config, server_toml(url, grpc, http, args.pool, args.hosts))?;
    let log = dir.path().join("server.log");
    let mut server = Server::start(&server_bin, &config, &log, grpc).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    result.rss_before_kb = probe::rss_kb(server.pid()).unwrap_or(0);

    // 1. H idle sessions.
    let ramp_secs = args.ramp_secs.unwrap_or((args.hosts as u64 / 500).max(1));
    let state = Arc::new(Mutex::new(FleetState::default()));
    let mut sims = Vec::new();
    let processes = args.hosts.div_ceil(args.agents_per_process);
    result.processes = processes;
    let max_secs =
        600 + args.connect_timeout_secs + args.warmup_secs + args.seconds + args.storm_timeout_secs + args.drain_secs;
    for p in 0..processes {
        let first = p * args.agents_per_process;
        let count = args.agents_per_process.min(args.hosts - first);
        sims.push(Sim::spawn(
            p,
            &args,
            grpc,
            &dir.path().join("credentials"),
            first,
            count,
            ramp_secs,
            max_secs,
            state.clone(),
        )?);
    }
    let started = Instant::now();
    wait_for(&state, Duration::from_secs(args.connect_timeout_secs), "every agent connected", |t| {
        t.connected as usize >= args.hosts
    })
    .await?;
    result.connect_all_secs = started.elapsed().as_secs_f64();
    println!("fleet: {} agents connected in {:.1} s", args.hosts, result.connect_all_secs);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(probe::rss_kb(server.pid()).unwrap_or(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    result.rss_idle_kb = idle.iter().sum::<u64>() / idle.len() as u64;
    result.kb_per_session = (result.rss_idle_kb as f64 - result.rss_before_kb as f64) / args.hosts as f64;

    // Propagation to H idle agents.
    let run_group = 0xf000 | fastrand::u16(..0x1000);
    let interval = Duration::from_millis(args.block_interval_ms.max(10));
    let mut idle_blocks = Vec::new();
    for i in 0..args.idle_blocks {
        let cidr = format!("2001:db8:{:x}:{:x}::/64", run_group, 0x8000 + i);
        idle_blocks.push(probe::commit_block(&pool, &cidr).await?);
        tokio::time::sleep(interval).await;
    }
    let idle = propagation(&state, &idle_blocks, processes).await;
    (result.idle_propagation_p50_ms, result.idle_propagation_p99_ms, result.idle_propagation_max_ms) =
        (idle.p50, idle.p99, idle.max);
    (result.idle_propagation_first_p50_ms, result.idle_propagation_first_p99_ms) = (idle.first_p50, idle.first_p99);
    result.idle_blocks_incomplete = idle.incomplete;

    // 2. Traffic: warm-up, then the measured window with blocks.
    for sim in &mut sims {
        sim.command("traffic on").await?;
    }
    println!("fleet: traffic on; warm-up {} s, then {} s measured", args.warmup_secs, args.seconds);
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    let sim_pids: Vec<u32> = sims.iter().filter_map(|s| s.child.id()).collect();
    let pg_root = probe::postgres_root(&pool).await;
    let before = Sample::take(&pool, server.pid(), pg_root, &sim_pids, totals(&state)).await?;
    lock(&state).loop_lags_ms.clear();
    let window = Duration::from_secs(args.seconds);
    let mut committed: Vec<(i64, i64)> = Vec::new();
    let mut rss = Vec::new();
    let (t0, mut next_block, mut next_rss) = (Instant::now(), Instant::now(), Instant::now());
    while t0.elapsed() < window {
        let now = Instant::now();
        if now >= next_block {
            // Distinct /64s of 2001:db8::/32, another third group each run.
            let cidr = format!("2001:db8:{:x}:{:x}::/64", run_group, committed.len() & 0xffff);
            committed.push(probe::commit_block(&pool, &cidr).await?);
            next_block += interval;
        }
        if now >= next_rss {
            if let Some(kb) = probe::rss_kb(server.pid()) {
                rss.push(kb);
            }
            next_rss += Duration::from_secs(1);
        }
        let until = next_block.min(next_rss).min(t0 + window);
        tokio::time::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(100))).await;
    }
    let after = Sample::take(&pool, server.pid(), pg_root, &sim_pids, totals(&state)).await?;
    fill_window(&mut result, &before, &after, args.hosts);
    let mut lags: Vec<f64> = std::mem::take(&mut lock(&state).loop_lags_ms).into_iter().map(f64::from).collect();
    lags.sort_by(f64::total_cmp);
    (result.simulator_loop_lag_p50_ms, result.simulator_loop_lag_p99_ms, result.simulator_loop_lag_max_ms) =
        (percentile(&lags, 0.50), percentile(&lags, 0.99), lags.last().copied().unwrap_or(0.0));
    result.server_rss_mean_kb = if rss.is_empty() { 0 } else { rss.iter().sum::<u64>() / rss.len() as u64 };
    result.server_rss_max_kb = rss.iter().copied().max().unwrap_or(0);

    // Propagation: each block's time until the last agent had its delta.
    let loaded = propagation(&state, &committed, processes).await;
    result.blocks_committed = committed.len();
    (result.propagation_p50_ms, result.propagation_p99_ms, result.propagation_max_ms) =
        (loaded.p50, loaded.p99, loaded.max);
    (result.propagation_first_p50_ms, result.propagation_first_p99_ms) = (loaded.first_p50, loaded.first_p99);
    result.blocks_incomplete = loaded.incomplete;

    // 3. The reconnect storm.
    if !args.skip_storm {
        let welcomes_before = totals(&state).welcomes;
        let kill_ns = mono_ns();
        server.signal(args.storm_signal).await?;
        server = Server::start(&server_bin, &config, &log, grpc).await?;
        result.storm_restart_ms = (mono_ns() - kill_ns) as f64 / 1e6;
        println!(
            "fleet: server stopped ({}), started again and listening after {:.0} ms",
            result.storm_signal, result.storm_restart_ms
        );
        let back = wait_for(&state, Duration::from_secs(args.storm_timeout_secs), "every agent back", |t| {
            t.connected as usize >= args.hosts && t.welcomes >= welcomes_before + args.hosts as u64
        })
        .await;
        let t = totals(&state);
        if back.is_ok() {
            result.storm_all_back_ms = Some((t.last_welcome_ns - kill_ns) as f64 / 1e6);
        } else {
            println!("fleet: only {} of {} agents back within {} s", t.connected, args.hosts, args.storm_timeout_secs);
        }
        // Attempts per second from the kill, until the last one back.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let s = lock(&state);
        let first = kill_ns / 1_000_000_000;
        let last = s.attempts.keys().next_back().copied().unwrap_or(first).max(first);
        result.storm_attempts_per_sec =
            (first..=last.min(first + 300)).map(|sec| s.attempts.get(&sec).copied().unwrap_or(0)).collect();
    }

    // 4. Drain and count.
    for sim in &mut sims {
        sim.command("traffic off").await?;
    }
    // Batches made just before the command still count: wait a tick.
    tokio::time::sleep(Duration::from_millis(300)).await;
    result.drained = wait_for(&state, Duration::from_secs(args.drain_secs), "the spools drained", |t| {
        t.pending_batches == 0 && t.held_lines == 0
    })
    .await
    .is_ok();
    for sim in &mut sims {
        let _ = sim.command("stop").await;
    }
    for sim in sims {
        sim.finish().await;
    }
    let t = totals(&state);
    result.final_acked_events = t.acked_events;
    result.final_generated_events = t.generated_events;
    result.final_in_flight_events = t.in_flight_events;
    result.dropped_events = t.dropped_events;
    result.final_stored_events =
        sqlx::query_scalar("select count(*) from events where agent_id = any($1)").bind(&ids).fetch_one(&pool).await?;
    let (summaries, lines): (i64, Option<i64>) =
        sqlx::query_as("select count(*), sum(lines)::int8 from context_summaries where agent_id = any($1)")
            .bind(&ids)
            .fetch_one(&pool)
            .await?;
    result.final_stored_summaries = summaries;
    result.final_stored_summary_lines = lines.unwrap_or(0);
    result.final_acked_summaries = t.acked_summaries;
    result.final_in_flight_summaries = t.in_flight_summaries;
    result.final_acked_summary_lines = t.acked_summary_lines;
    result.final_in_flight_summary_lines = t.in_flight_summary_lines;
    let within = |stored: i64, acked: u64, in_flight: u64| {
        let stored = u64::try_from(stored).unwrap_or(0);
        acked <= stored && stored <= acked + in_flight
    };
    result.exactly_once = within(result.final_stored_events, t.acked_events, t.in_flight_events)
        && within(summaries, t.acked_summaries, t.in_flight_summaries)
        && within(result.final_stored_summary_lines, t.acked_summary_lines, t.in_flight_summary_lines);
    server.signal(StormSignal::Term).await?;
    Ok(result)
}

/// Time from commit to the last agent, over blocks.
struct Propagation {
    p50: f64,
    p99: f64,
    max: f64,
    /// Time from commit to the first agent: what the fan-out does not cost.
    first_p50: f64,
    first_p99: f64,
    /// Blocks some agent had not received within the wait.
    incomplete: usize,
}

/// Waits up to [`PROPAGATION_WAIT`] for every agent to report each of
/// `blocks` `(id, committed at)`, then summarises.
async fn propagation(state: &Mutex<FleetState>, blocks: &[(i64, i64)], processes: usize) -> Propagation {
    let limit = Instant::now() + PROPAGATION_WAIT;
    loop {
        let done = {
            let s = lock(state);
            blocks.iter().all(|(id, _)| s.blocks.get(id).is_some_and(|(n, ..)| *n >= processes))
        };
        if done || Instant::now() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut delays, mut firsts) = (Vec::new(), Vec::new());
    let mut incomplete = 0;
    {
        let s = lock(state);
        for (id, at) in blocks {
            match s.blocks.get(id) {
                Some((n, first, last)) if *n >= processes => {
                    delays.push((last - at) as f64 / 1e6);
                    firsts.push((first - at) as f64 / 1e6);
                }
                _ => incomplete += 1,
            }
        }
    }
    delays.sort_by(f64::total_cmp);
    firsts.sort_by(f64::total_cmp);
    Propagation {
        p50: percentile(&delays, 0.5),
        p99: percentile(&delays, 0.99),
        max: percentile(&delays, 1.0),
        first_p50: percentile(&firsts, 0.5),
        first_p99: percentile(&firsts, 0.99),
        incomplete,
    }
}

/// Longest wait for the last agent to get a block after the window.
const PROPAGATION_WAIT: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn fill_window(r: &mut FleetResult, a: &Sample, b: &Sample, hosts: usize) {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    r.window_secs = secs;
    let per = |x: f64| x / secs;
    r.offered_events_per_sec = per((b.fleet.generated_events - a.fleet.generated_events) as f64);
    r.acked_events_per_sec = per((b.fleet.acked_events - a.fleet.acked_events) as f64);
    r.offered_batches_per_sec = per((b.fleet.generated_batches - a.fleet.generated_batches) as f64);
    r.acked_batches_per_sec = per((b.fleet.acked_batches - a.fleet.acked_batches) as f64);
    r.pending_batches_end = b.fleet.pending_batches;
    r.oldest_pending_ms_end = b.fleet.oldest_pending_ms;
    let stored_events = (b.event_rows - a.event_rows) as f64;
    let stored_summaries = (b.summary_rows - a.summary_rows) as f64;
    let stored_rows = stored_events + stored_summaries;
    r.stored_event_rows_per_sec = per(stored_events);
    r.stored_summary_rows_per_sec = per(stored_summaries);
    r.offered_summaries_per_sec = per((b.fleet.batched_summaries - a.fleet.batched_summaries) as f64);
    r.acked_summaries_per_sec = per((b.fleet.acked_summaries - a.fleet.acked_summaries) as f64);
    r.offered_summary_lines_per_sec = per((b.fleet.batched_summary_lines - a.fleet.batched_summary_lines) as f64);
    r.acked_summary_lines_per_sec = per((b.fleet.acked_summary_lines - a.fleet.acked_summary_lines) as f64);
    r.offered_individual_events_per_sec = per((b.fleet.batched_events - a.fleet.batched_events) as f64);
    r.stored_rows_all_tables_per_sec = per((b.all_rows - a.all_rows) as f64);
    let ticks = probe::clock_ticks() * secs / 100.0;
    r.server_cpu_percent = (b.server_ticks.saturating_sub(a.server_ticks)) as f64 / ticks;
    r.postgres_cpu_percent = match (a.postgres_ticks, b.postgres_ticks) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / ticks),
        _ => None,
    };
    r.simulators_cpu_percent = b.sim_ticks.saturating_sub(a.sim_ticks) as f64 / ticks;
    let waited = |x: u64, y: u64| y.saturating_sub(x) as f64 / 1e7 / secs;
    r.server_cpu_wait_percent = waited(a.server_wait_ns, b.server_wait_ns);
    r.postgres_cpu_wait_percent = match (a.postgres_wait_ns, b.postgres_wait_ns) {
        (Some(x), Some(y)) => Some(waited(x, y)),
        _ => None,
    };
    r.simulators_cpu_wait_percent = waited(a.sim_wait_ns, b.sim_wait_ns);
    r.db_bytes_growth = b.db_bytes - a.db_bytes;
    r.event_bytes_per_row =
        if stored_events > 0.0 { (b.event_bytes - a.event_bytes) as f64 / stored_events } else { f64::NAN };
    r.summary_bytes_per_row =
        if stored_summaries > 0.0 { (b.summary_bytes - a.summary_bytes) as f64 / stored_summaries } else { f64::NAN };
    // Per stored row: events and summaries.
    r.db_bytes_per_stored_event = if stored_rows > 0.0 { r.db_bytes_growth as f64 / stored_rows } else { f64::NAN };
    r.db_bytes_per_day_at_stored_rate = per(r.db_bytes_growth as f64) * 86_400.0;
    // Rows the hosts offer: individual events and summaries.
    r.db_bytes_per_day_at_offered_rate =
        r.db_bytes_per_stored_event * (r.offered_individual_events_per_sec + r.offered_summaries_per_sec) * 86_400.0;
    r.db_bytes_per_host_day_at_offered_rate = r.db_bytes_per_day_at_offered_rate / hosts as f64;
    let mut growth: Vec<(String, i64, i64)> = b
        .tables
        .iter()
        .map(|(name, (rows, bytes))| {
            let (r0, b0) = a.tables.get(name).copied().unwrap_or((0, 0));
            (name.clone(), rows - r0, bytes - b0)
        })
        .filter(|(_, rows, bytes)| *rows > 0 || *bytes > 0)
        .collect();
    growth.sort_by_key(|(_, _, bytes)| std::cmp::Reverse(*bytes));
    growth.truncate(12);
    r.table_growth = growth;
}

/// Prints the result as a table and as one `fleet-json:` line.
pub fn print(r: &FleetResult) {
    let mb = |kb: u64| kb as f64 / 1024.0;
    let gb = |b: f64| b / 1e9;
    let rows: Vec<(String, String)> = vec![
        ("hosts (attacked)".into(), format!("{} ({}), {} simulator processes", r.hosts, r.attacked_hosts, r.processes)),
        (
            "context mode".into(),
            format!(
                "{}{}{}",
                r.context,
                if r.skip_applied { " (agents do not send Applied)" } else { "" },
                if r.simulator_nice > 0 { format!(", simulators at nice {}", r.simulator_nice) } else { String::new() }
            ),
        ),
        ("load average before".into(), r.load_before.clone()),
        ("all agents connected after".into(), format!("{:.1} s", r.connect_all_secs)),
        (
            "server RSS before agents / with all idle".into(),
            format!("{:.1} MB / {:.1} MB", mb(r.rss_before_kb), mb(r.rss_idle_kb)),
        ),
        ("memory per connected session".into(), format!("{:.1} KB", r.kb_per_session)),
        ("measured window".into(), format!("{:.1} s", r.window_secs)),
        (
            "lines offered (generated) / individual events acked".into(),
            format!("{:.0} / {:.0} events/s", r.offered_events_per_sec, r.acked_events_per_sec),
        ),
        (
            "batches offered / acked".into(),
            format!("{:.0} / {:.0} batches/s", r.offered_batches_per_sec, r.acked_batches_per_sec),
        ),
        (
            "stored rows: events / all tables".into(),
            format!("{:.0} / {:.0} rows/s", r.stored_event_rows_per_sec, r.stored_rows_all_tables_per_sec),
        ),
        (
            "individual events offered (in batches)".into(),
            format!("{:.0} events/s", r.offered_individual_events_per_sec),
        ),
        (
            "summaries offered / acked / stored".into(),
            format!(
                "{:.0} / {:.0} / {:.0} rows/s",
                r.offered_summaries_per_sec, r.acked_summaries_per_sec, r.stored_summary_rows_per_sec
            ),
        ),
        (
            "lines covered by summaries offered / acked".into(),
            format!("{:.0} / {:.0} lines/s", r.offered_summary_lines_per_sec, r.acked_summary_lines_per_sec),
        ),
        (
            "unacked at window end".into(),
            format!("{} batches, oldest {:.1} s", r.pending_batches_end, r.oldest_pending_ms_end as f64 / 1000.0),
        ),
        ("server CPU".into(), format!("{:.0} % of one core", r.server_cpu_percent)),
        (
            "Postgres CPU".into(),
            r.postgres_cpu_percent.map_or_else(|| "n/a (not local)".into(), |p| format!("{p:.0} % of one core")),
        ),
        ("simulators CPU".into(), format!("{:.0} % of one core", r.simulators_cpu_percent)),
        (
            "waiting for a CPU: server / Postgres / simulators".into(),
            format!(
                "{:.0} / {} / {:.0} % of one core",
                r.server_cpu_wait_percent,
                r.postgres_cpu_wait_percent.map_or_else(|| "n/a".into(), |p| format!("{p:.0}")),
                r.simulators_cpu_wait_percent
            ),
        ),
        (
            "server RSS mean / max".into(),
            format!("{:.1} / {:.1} MB", mb(r.server_rss_mean_kb), mb(r.server_rss_max_kb)),
        ),
        ("database growth".into(), format!("{:.1} MB in the window", r.db_bytes_growth as f64 / 1e6)),
        (
            "bytes per row: events / context_summaries / whole database per stored row".into(),
            format!(
                "{:.0} / {:.0} / {:.0} B",
                r.event_bytes_per_row, r.summary_bytes_per_row, r.db_bytes_per_stored_event
            ),
        ),
        ("database per day at the stored rate".into(), format!("{:.1} GB", gb(r.db_bytes_per_day_at_stored_rate))),
        (
            "database per day at the offered rate (per host)".into(),
            format!(
                "{:.1} GB ({:.1} MB)",
                gb(r.db_bytes_per_day_at_offered_rate),
                r.db_bytes_per_host_day_at_offered_rate / 1e6
            ),
        ),
        (
            "propagation to all idle agents p50 / p99 / max".into(),
            format!(
                "{:.1} / {:.1} / {:.1} ms ({} incomplete)",
                r.idle_propagation_p50_ms,
                r.idle_propagation_p99_ms,
                r.idle_propagation_max_ms,
                r.idle_blocks_incomplete
            ),
        ),
        (
            "idle: commit to the first agent p50 / p99".into(),
            format!("{:.1} / {:.1} ms", r.idle_propagation_first_p50_ms, r.idle_propagation_first_p99_ms),
        ),
        (
            "propagation to all agents under traffic p50 / p99 / max".into(),
            format!(
                "{:.1} / {:.1} / {:.1} ms ({} blocks, {} incomplete)",
                r.propagation_p50_ms,
                r.propagation_p99_ms,
                r.propagation_max_ms,
                r.blocks_committed,
                r.blocks_incomplete
            ),
        ),
        (
            "simulators' event loop late under traffic p50 / p99 / max".into(),
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                r.simulator_loop_lag_p50_ms, r.simulator_loop_lag_p99_ms, r.simulator_loop_lag_max_ms
            ),
        ),
        (
            "under traffic: commit to the first agent p50 / p99".into(),
            format!("{:.1} / {:.1} ms", r.propagation_first_p50_ms, r.propagation_first_p99_ms),
        ),
        (
            format!("reconnect storm ({}): restart / all back", r.storm_signal),
            if r.storm_skipped {
                "skipped".to_owned()
            } else {
                format!(
                    "{:.0} ms / {}",
                    r.storm_restart_ms,
                    r.storm_all_back_ms.map_or_else(|| "not all".into(), |ms| format!("{:.1} s", ms / 1000.0))
                )
            },
        ),
        ("session attempts per second after the kill".into(), format!("{:?}", r.storm_attempts_per_sec)),
        (
            "events generated / acked / stored / in flight at stop".into(),
            format!(
                "{} / {} / {} / {} (drained: {}, acked <= stored <= acked + in flight: {})",
                r.final_generated_events,
                r.final_acked_events,
                r.final_stored_events,
                r.final_in_flight_events,
                r.drained,
                r.exactly_once
            ),
        ),
        (
            "summaries acked / stored / in flight at stop".into(),
            format!("{} / {} / {}", r.final_acked_summaries, r.final_stored_summaries, r.final_in_flight_summaries),
        ),
        (
            "summarised lines acked / stored / in flight at stop".into(),
            format!(
                "{} / {} / {}",
                r.final_acked_summary_lines, r.final_stored_summary_lines, r.final_in_flight_summary_lines
            ),
        ),
        ("lines dropped by full simulated spools".into(), r.dropped_events.to_string()),
    ];
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    for (k, v) in &rows {
        println!("fleet: {k:<width$}  {v}");
    }
    for (table, rows, bytes) in &r.table_growth {
        println!("fleet: table {table:<28} +{rows} rows, +{:.1} MB", *bytes as f64 / 1e6);
    }
    if let Ok(json) = serde_json::to_string(r) {
        println!("fleet-json: {json}");
    }
}

fn default_server_bin() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("FLEETBAN_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()?.parent().context("the bench binary has no directory")?.to_path_buf(),
    };
    let bin = dir.join("fleetban-server");
    if !bin.exists() {
        bail!("no {} (build it, or pass --server-bin)", bin.display());
    }
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The server's configuration: loopback listeners, and per-source caps
/// lifted (the simulated hosts share 200 loopback addresses; a real fleet
/// has one address per host). The global caps stay at their defaults.
fn server_toml(url: &str, grpc: u16, http: u16, pool: u32, hosts: usize) -> String {
    let max = (hosts as u32 + 1024).max(16_384);
    format!(
        "database_url = \"{url}\"\ngrpc_listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\n\
         db_max_connections = {pool}\n\n[limits]\ngrpc_max_connections = {max}\n\
         grpc_max_connections_per_source = {max}\ngrpc_max_unauthenticated_per_source = 512\n"
    )
}

/// Enrolls `n` agents through `auth::enroll_agent`; writes `id secret`
/// lines to `path` and returns the ids.
async fn enroll(pool: &PgPool, n: usize, path: &Path) -> anyhow::Result<Vec<Uuid>> {
    let token = auth::create_enrollment_token(pool, n as u32, Duration::from_secs(3600), "fleet bench").await?;
    let run = Uuid::new_v4().simple().to_string();
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..4 {
        let (pool, token, run, next) = (pool.clone(), token.clone(), run.clone(), next.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(out);
                }
                let hostname = format!("sim-{i}-{}.example", &run[..8]);
                let enrollment = auth::Enrollment {
                    token: &token,
                    name: None,
                    host_id: None,
                    hostname: &hostname,
                    version: "fleetsim",
                    addresses: &[],
                };
                let e = auth::enroll_agent(&pool, &enrollment).await?;
                out.push((i, e.agent_id, e.secret));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    all.sort_by_key(|(i, _, _)| *i);
    let text: String = all.iter().map(|(_, id, secret)| format!("{id} {secret}\n")).collect();
    std::fs::write(path, text)?;
    Ok(all.into_iter().map(|(_, id, _)| id).collect())
}

/// The server process.
struct Server {
    child: Child,
}

impl Server {
    async fn start(bin: &Path, config: &Path, log: &Path, grpc: u16) -> anyhow::Result<Server> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", std::env::var("FLEET_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = SocketAddr::from(([127, 0, 0, 1], grpc));
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the server exited at start ({status}); see its log");
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(Server { child });
            }
            if Instant::now() > deadline {
                bail!("the server did not listen on {addr} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends `signal` and waits for the exit (up to 30 s, then SIGKILL).
    async fn signal(&mut self, signal: StormSignal) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let sig = match signal {
                StormSignal::Kill => libc::SIGKILL,
                StormSignal::Term => libc::SIGTERM,
            };
            // SAFETY: kill(2) on the pid of our own child; no memory is touched.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.is_err() {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// The fleet's counts: the sum of the simulators' latest reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub connected: u64,
    pub welcomes: u64,
    pub last_welcome_ns: i64,
    pub generated_events: u64,
    pub generated_batches: u64,
    pub acked_events: u64,
    pub acked_batches: u64,
    pub batched_events: u64,
    pub batched_summaries: u64,
    pub batched_summary_lines: u64,
    pub acked_summaries: u64,
    pub acked_summary_lines: u64,
    pub held_lines: u64,
    pub in_flight_summaries: u64,
    pub in_flight_summary_lines: u64,
    pub dropped_events: u64,
    pub pending_batches: u64,
    pub in_flight_events: u64,
    pub oldest_pending_ms: i64,
}

#[derive(Default)]
struct FleetState {
    latest: HashMap<usize, Report>,
    attempts: BTreeMap<i64, u64>,
    /// The simulators' event-loop lags reported since the last take.
    loop_lags_ms: Vec<u32>,
    /// Block id → (simulators whose every agent got it, first arrival,
    /// latest arrival).
    blocks: HashMap<i64, (usize, i64, i64)>,
}

fn totals(state: &Mutex<FleetState>) -> Totals {
    let s = lock(state);
    let mut t = Totals::default();
    for r in s.latest.values() {
        t.connected += r.connected;
        t.welcomes += r.welcomes;
        t.last_welcome_ns = t.last_welcome_ns.max(r.last_welcome_ns);
        t.generated_events += r.generated_events;
        t.generated_batches += r.generated_batches;
        t.acked_events += r.acked_events;
        t.acked_batches += r.acked_batches;
        t.batched_events += r.batched_events;
        t.batched_summaries += r.batched_summaries;
        t.batched_summary_lines += r.batched_summary_lines;
        t.acked_summaries += r.acked_summaries;
        t.acked_summary_lines += r.acked_summary_lines;
        t.held_lines += r.held_lines;
        t.in_flight_summaries += r.in_flight_summaries;
        t.in_flight_summary_lines += r.in_flight_summary_lines;
        t.dropped_events += r.dropped_events;
        t.pending_batches += r.pending_batches;
        t.in_flight_events += r.in_flight_events;
        t.oldest_pending_ms = t.oldest_pending_ms.max(r.oldest_pending_ms);
    }
    t
}

async fn wait_for(
    state: &Mutex<FleetState>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Totals) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done(&totals(state)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not {what} within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One simulator process and the task reading its reports.
struct Sim {
    child: Child,
    stdin: ChildStdin,
    reader: tokio::task::JoinHandle<()>,
}

impl Sim {
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        index: usize,
        args: &FleetArgs,
        grpc: u16,
        credentials: &Path,
        first: usize,
        count: usize,
        ramp_secs: u64,
        max_secs: u64,
        state: Arc<Mutex<FleetState>>,
    ) -> anyhow::Result<Sim> {
        let mut command = Command::new(std::env::current_exe()?);
        let nice = args.simulator_nice;
        if nice > 0 {
            // SAFETY: between fork and exec the closure only calls
            // setpriority, which is async-signal-safe; every thread the
            // simulator starts inherits the value.
            unsafe {
                command.pre_exec(move || {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .arg("fleet-agents")
            .args(["--server", &format!("127.0.0.1:{grpc}")])
            .arg("--credentials")
            .arg(credentials)
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--hosts", &args.hosts.to_string(), "--seed", &args.seed.to_string()])
            .args(["--context-per-sec", &args.context_per_sec.to_string()])
            .args(["--attacked-percent", &args.attacked_percent.to_string()])
            .args(["--burst-max", &args.burst_max.to_string()])
            .args(["--context", &args.context.to_string()])
            .args(["--ramp-ms", &(ramp_secs * 1000).to_string(), "--max-secs", &max_secs.to_string()])
            .args(args.skip_applied.then_some("--skip-applied"))
            .env_remove("DATABASE_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("simulator stdin")?;
        let stdout = child.stdout.take().context("simulator stdout")?;
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(report) = serde_json::from_str::<Report>(&line) else {
                    tracing::warn!(line = %line, "Unreadable simulator report.");
                    continue;
                };
                let mut s = lock(&state);
                for (sec, n) in &report.attempts {
                    *s.attempts.entry(*sec).or_default() += n;
                }
                s.loop_lags_ms.extend_from_slice(&report.loop_lags_ms);
                for (id, (first, last)) in &report.blocks {
                    let e = s.blocks.entry(*id).or_insert((0, *first, *last));
                    e.0 += 1;
                    e.1 = e.1.min(*first);
                    e.2 = e.2.max(*last);
                }
                s.latest.insert(index, report);
            }
        });
        Ok(Sim { child, stdin, reader })
    }

    async fn command(&mut self, command: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Waits for the process to stop (it was told to), killing it after 15 s.
    async fn finish(mut self) {
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.reader).await;
    }
}
