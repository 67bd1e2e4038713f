//! One simulator process: `count` simulated agents, each with its own
//! connection to the server, driven by the parent over stdin and reporting
//! on stdout (`fleetban-bench fleet-agents`, never run by hand).
//!
//! Each agent behaves as `fleetban-agent` does on the wire:
//!
//! - every `batch_age` (the agent's default, 100 ms) a generator thread
//!   takes what each host logged meanwhile into the host's pending batch,
//!   and cuts it, as the agent's batcher does, when it got an abuse line,
//!   when its first content is `context_batch_age` (1 s) old, or at
//!   `batch_events` (1000) events; batches go to the host's spool with the
//!   next seq; a host with nothing pending makes no batch;
//! - a session (`Connect`, `Hello` with the next seq and the blocklist
//!   version held, `Welcome`) sends spooled batches in seq order, at most
//!   [`UPLINK_WINDOW`] unacked; an `Ack` removes its batch, `Welcome`'s
//!   `last_acked_seq` those up to it; a new session resends the rest, so the
//!   server stores each batch once;
//! - deltas and snapshots are answered with one `Applied` after the agent's
//!   jittered delay (`fleetban_agent::uplink::applied_delay`), covering every
//!   change applied meanwhile; heartbeats go out at the `Welcome`'s interval;
//! - a session that ends is reopened after `fleetban_agent::uplink::backoff`
//!   (the agent's own jittered exponential backoff), reset by a `Welcome`.
//!
//! In `--context individual` the spool keeps `(seq, time, context count,
//! abuse count)` per batch and regenerates the events when it sends (see
//! [`super::traffic`]). In `--context summarised` each host's lines go
//! through the agent's aggregator as the agent's pipeline feeds it
//! ([`SummarisingHost`]): the individual events and summaries it lets
//! through go into the pending batch, and the spool keeps each batch's
//! content as it was cut (the aggregator is stateful: regenerating would
//! not give the same batch), so a resend is the same batch. Summaries of an
//! ended interval are held for the host's own
//! `fleetban_agent::pipeline::summary_delay` (0–30 s, picked at start), as
//! the agent holds them. On `traffic off`
//! the open summaries and the pending batch are flushed, as the agent does
//! when it shuts down. Either spool holds at most [`SPOOL_MAX_BATCHES`] (and
//! [`SPOOL_MAX_CONTENT_BYTES`] of content) per host and drops the oldest
//! beyond, counted.
//!
//! Commands on stdin, one per line: `traffic on`, `traffic off`, `stop`.
//! Reports on stdout, one JSON object per line ([`Report`]). Each agent's
//! connection comes from its own loopback source address `127.0.0.x`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use fleetban_agent::aggregate::AggregateConfig;
use fleetban_agent::pipeline::{PipelineOptions, summary_delay};
use fleetban_agent::service::UPLINK_WINDOW;
use fleetban_agent::uplink::applied_delay;
use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_client::AgentServiceClient;
use fleetban_proto::v1::server_frame::Frame as In;
use fleetban_proto::v1::{AgentFrame, Applied, ContextSummary, EventBatch, EventKind, Heartbeat, Hello};
use fleetban_server::session::{AGENT_ID_HEADER, AGENT_SECRET_HEADER};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::mono_ns;
use super::traffic::{ContextMode, FleetModel, Flushed, HostOutput, HostProfile, SummarisingHost, summary_lines};

/// Most batches a simulated spool holds; the oldest beyond are dropped and
/// counted, as the agent's bounded spool does.
pub const SPOOL_MAX_BATCHES: usize = 6_000;

/// Most bytes of batch content (summarised mode: events and summaries as
/// encoded) a simulated spool holds; beyond, the oldest batches are dropped
/// and counted. 256 KiB per host bounds a simulator of 2,500 hosts to about
/// 640 MB of spooled content when the server falls behind.
pub const SPOOL_MAX_CONTENT_BYTES: usize = 256 * 1024;

/// Longest wait for a connection, then for the `Welcome`.
const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the process reports.
const REPORT_INTERVAL: Duration = Duration::from_millis(500);

/// Arguments of one simulator process.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentsArgs {
    /// The server's gRPC address.
    #[arg(long)]
    pub server: SocketAddr,
    /// File of `agent_id secret` lines, one per host of the fleet.
    #[arg(long)]
    pub credentials: PathBuf,
    /// Index of this process's first host.
    #[arg(long)]
    pub first: usize,
    /// Hosts of this process.
    #[arg(long)]
    pub count: usize,
    /// Hosts in the fleet.
    #[arg(long)]
    pub hosts: usize,
    /// Seed of the traffic model.
    #[arg(long)]
    pub seed: u64,
    /// Mean context lines per second per host.
    #[arg(long)]
    pub context_per_sec: f64,
    /// Share of attacked hosts, percent.
    #[arg(long)]
    pub attacked_percent: u32,
    /// Highest burst rate of an attacked host, lines per second.
    #[arg(long)]
    pub burst_max: f64,
    /// What hosts send for context events.
    #[arg(long, value_enum)]
    pub context: ContextMode,
    /// Spread of the first connections, milliseconds.
    #[arg(long)]
    pub ramp_ms: u64,
    /// Do not answer deltas and snapshots with `Applied` (the agent does;
    /// a diagnostic of what those reports cost the server).
    #[arg(long)]
    pub skip_applied: bool,
    /// Longest life of the process, seconds (it stops by itself then).
    #[arg(long)]
    pub max_secs: u64,
}

/// One report line of a simulator process.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Sessions that got their `Welcome` and are open.
    pub connected: u64,
    /// Sessions that got their `Welcome`, since the start.
    pub welcomes: u64,
    /// Monotonic time of the latest `Welcome`, nanoseconds.
    pub last_welcome_ns: i64,
    /// Log lines generated by the hosts, and batches spooled, since the
    /// start.
    pub generated_events: u64,
    pub generated_batches: u64,
    /// What the spooled batches carry: individual events (every line in
    /// `individual` mode), summaries and the lines those cover.
    pub batched_events: u64,
    pub batched_summaries: u64,
    pub batched_summary_lines: u64,
    /// Individual events, summaries, covered lines and batches acknowledged.
    pub acked_events: u64,
    pub acked_summaries: u64,
    pub acked_summary_lines: u64,
    pub acked_batches: u64,
    pub rejected_events: u64,
    pub nacked_batches: u64,
    /// Lines (individual events and summarised lines) of unacknowledged
    /// batches dropped from full spools.
    pub dropped_events: u64,
    /// Lines counted in the hosts' open summaries, not yet in a batch.
    pub held_lines: u64,
    /// Batches sent (resends included).
    pub sent_batches: u64,
    /// Batches spooled and not yet acknowledged.
    pub pending_batches: u64,
    /// Individual events, summaries and summarised lines of batches sent and
    /// not (yet) acknowledged: stored or not (batches a full spool dropped
    /// after they were sent included).
    pub in_flight_events: u64,
    pub in_flight_summaries: u64,
    pub in_flight_summary_lines: u64,
    /// Age of the oldest unacknowledged batch of any host, milliseconds.
    pub oldest_pending_ms: i64,
    /// Session attempts per monotonic second since the previous report.
    pub attempts: BTreeMap<i64, u64>,
    /// How late the process's event loop woke for a 10 ms timer, each
    /// sample since the previous report, milliseconds: how long a frame
    /// that arrived for one of its agents could wait before it was read.
    #[serde(default)]
    pub loop_lags_ms: Vec<u32>,
    /// Blocks whose delta reached every agent of this process since the
    /// previous report: id → (first, latest) arrival (monotonic ns).
    pub blocks: BTreeMap<i64, (i64, i64)>,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    time_ms: i64,
    context: u32,
    abuse: u32,
    /// Individual events, summaries and the lines they cover.
    events: u32,
    summaries: u32,
    summary_lines: u64,
    /// The batch's content as cut (summarised mode); `None`: regenerated
    /// from the numbers above.
    content: Option<Box<Flushed>>,
    /// Encoded size of `content`.
    bytes: usize,
    /// Sent at least once (in any session).
    was_sent: bool,
    acked: bool,
}

impl Pending {
    /// A batch regenerated from its numbers (individual mode).
    fn counted(seq: u64, time_ms: i64, context: u32, abuse: u32) -> Pending {
        Pending {
            seq,
            time_ms,
            context,
            abuse,
            events: context + abuse,
            summaries: 0,
            summary_lines: 0,
            content: None,
            bytes: 0,
            was_sent: false,
            acked: false,
        }
    }

    /// A batch whose content is kept (summarised mode).
    fn stored(seq: u64, time_ms: i64, content: Flushed) -> Pending {
        use prost::Message as _;
        let bytes = content.events.iter().map(|e| e.encoded_len()).sum::<usize>()
            + content.summaries.iter().map(|s| s.encoded_len()).sum::<usize>();
        Pending {
            seq,
            time_ms,
            context: 0,
            abuse: 0,
            events: content.events.len() as u32,
            summaries: content.summaries.len() as u32,
            summary_lines: content.summary_lines(),
            content: Some(Box::new(content)),
            bytes,
            was_sent: false,
            acked: false,
        }
    }

    /// Lines the batch carries.
    fn lines(&self) -> u64 {
        u64::from(self.events) + self.summary_lines
    }
}

#[derive(Debug, Default)]
struct Spool {
    next_seq: u64,
    /// The highest seq the current session has sent.
    sent: u64,
    pending: VecDeque<Pending>,
    /// Sum of the pending batches' `bytes`.
    bytes: usize,
}

impl Spool {
    fn push(&mut self, p: Pending) {
        self.bytes += p.bytes;
        self.pending.push_back(p);
    }

    fn pop(&mut self) -> Option<Pending> {
        let p = self.pending.pop_front()?;
        self.bytes -= p.bytes;
        Some(p)
    }

    fn mark_sent(&mut self, seq: u64) {
        let i = self.pending.partition_point(|p| p.seq < seq);
        if let Some(p) = self.pending.get_mut(i).filter(|p| p.seq == seq) {
            p.was_sent = true;
        }
    }
}

struct Host {
    profile: HostProfile,
    id: String,
    secret: String,
    source: IpAddr,
    spool: Mutex<Spool>,
    wake: Notify,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    welcomes: AtomicU64,
    last_welcome_ns: AtomicI64,
    generated_events: AtomicU64,
    generated_batches: AtomicU64,
    batched_events: AtomicU64,
    batched_summaries: AtomicU64,
    batched_summary_lines: AtomicU64,
    acked_events: AtomicU64,
    acked_summaries: AtomicU64,
    acked_summary_lines: AtomicU64,
    acked_batches: AtomicU64,
    held_lines: AtomicU64,
    rejected_events: AtomicU64,
    nacked_batches: AtomicU64,
    dropped_events: AtomicU64,
    /// What the batches dropped after they were sent carried.
    dropped_sent_events: AtomicU64,
    dropped_sent_summaries: AtomicU64,
    dropped_sent_summary_lines: AtomicU64,
    sent_batches: AtomicU64,
    attempts: Mutex<BTreeMap<i64, u64>>,
    loop_lags_ms: Mutex<Vec<u32>>,
    /// Block id → (agents that got it, first arrival, latest arrival).
    arrivals: Mutex<HashMap<i64, (usize, i64, i64)>>,
}

struct Shared {
    model: FleetModel,
    mode: ContextMode,
    server: SocketAddr,
    stats: Stats,
    stop: watch::Receiver<bool>,
    count: usize,
    skip_applied: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Raises the soft descriptor limit to the hard limit.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// The loopback source address of host `index`: 127.0.0.2–127.0.0.201.
pub fn source_address(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (index % 200) as u8))
}

/// Runs one simulator process until `stop`, stdin's end or `max_secs`.
pub async fn run(args: AgentsArgs) -> anyhow::Result<()> {
    let nofile = raise_nofile();
    if (nofile as usize) < args.count + 64 {
        bail!("{} agents need {} descriptors; the limit is {nofile}", args.count, args.count + 64);
    }
    let text =
        std::fs::read_to_string(&args.credentials).with_context(|| format!("read {}", args.credentials.display()))?;
    let model = FleetModel {
        seed: args.seed,
        hosts: args.hosts,
        context_per_sec: args.context_per_sec,
        attacked_percent: args.attacked_percent,
        burst_max: args.burst_max,
    };
    let mut hosts = Vec::with_capacity(args.count);
    for (index, line) in text.lines().enumerate().skip(args.first).take(args.count) {
        let (id, secret) = line.split_once(' ').context("credentials line without a space")?;
        hosts.push(Arc::new(Host {
            profile: model.host(index),
            id: id.to_owned(),
            secret: secret.to_owned(),
            source: source_address(index),
            spool: Mutex::new(Spool { next_seq: 1, sent: 0, pending: VecDeque::new(), bytes: 0 }),
            wake: Notify::new(),
        }));
    }
    if hosts.len() != args.count {
        bail!("{} credentials for hosts {}..{}", hosts.len(), args.first, args.first + args.count);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        model,
        mode: args.context,
        server: args.server,
        stats: Stats::default(),
        stop: stop_rx,
        count: args.count,
        skip_applied: args.skip_applied,
    });
    let traffic = Arc::new(AtomicBool::new(false));

    let mut tasks = tokio::task::JoinSet::new();
    for host in &hosts {
        let (host, shared) = (host.clone(), shared.clone());
        let delay = Duration::from_millis(fastrand::u64(0..=args.ramp_ms));
        tasks.spawn(async move { agent(host, shared, delay).await });
    }
    let generator_stop = Arc::new(AtomicBool::new(false));
    let generator = {
        let (hosts, shared, traffic, stop) = (hosts.clone(), shared.clone(), traffic.clone(), generator_stop.clone());
        std::thread::Builder::new()
            .name("fleetsim-generator".into())
            .spawn(move || generate(hosts, shared, traffic, stop))
            .context("start the generator thread")?
    };
    let reporter = tokio::spawn(report(hosts.clone(), shared.clone()));
    let lag_probe = tokio::spawn(probe_loop_lag(shared.clone()));

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let deadline = tokio::time::sleep(Duration::from_secs(args.max_secs));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match line.trim() {
                    "traffic on" => traffic.store(true, Ordering::Relaxed),
                    "traffic off" => traffic.store(false, Ordering::Relaxed),
                    "stop" => break,
                    other => tracing::warn!(command = %other, "Unknown command."),
                },
                Ok(None) | Err(_) => break,
            },
            () = &mut deadline => {
                tracing::warn!(max_secs = args.max_secs, "The simulator's time is up; stopping.");
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    generator_stop.store(true, Ordering::Relaxed);
    if generator.join().is_err() {
        tracing::warn!("The generator thread panicked.");
    }
    let drained =
        tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    reporter.abort();
    lag_probe.abort();
    // The last report, so the parent sees the final counts.
    emit(&hosts, &shared);
    Ok(())
}

/// What a host logged and has not cut into a batch yet: the agent's pending
/// batch, cut `batch_age` after an abuse line (the generator's tick) and
/// `context_batch_age` after its first content.
#[derive(Debug, Default)]
struct OpenBatch {
    /// Wall-clock time of its first content, unix ms.
    since_ms: Option<i64>,
    /// Individual mode: lines of each class.
    context: u32,
    abuse: u32,
    /// Summarised mode: what the aggregator let through.
    content: Flushed,
    /// Summarised mode: summaries of ended intervals held for the host's
    /// `summary_delay`, and when they go out (unix ms).
    held: Vec<ContextSummary>,
    release_ms: Option<i64>,
}

impl OpenBatch {
    fn lines(&self) -> u64 {
        u64::from(self.context + self.abuse)
            + self.content.events.len() as u64
            + self.content.summary_lines()
            + summary_lines(&self.held)
    }
}

/// Every `batch_age`, turns what each host logged meanwhile into what its
/// agent spools, on a thread of its own: the hosts' log writing and the
/// agents' parsing happen on the hosts' own CPUs, so here they must not hold
/// up the session tasks of the runtime (a tick of 2,500 hosts takes tens of
/// milliseconds). Stops when `stop` is set.
fn generate(hosts: Vec<Arc<Host>>, shared: Arc<Shared>, traffic: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let options = PipelineOptions::default();
    let max_events = options.batch_events as u32;
    let context_age_ms = i64::try_from(options.context_batch_age.max(options.batch_age).as_millis()).unwrap_or(1000);
    let mut rng = fastrand::Rng::with_seed(shared.model.seed ^ hosts.len() as u64);
    let stats = &shared.stats;
    let mut summarising: Vec<Option<SummarisingHost>> = hosts
        .iter()
        .map(|h| (shared.mode == ContextMode::Summarised).then(|| SummarisingHost::new(h.profile.index)))
        .collect();
    let mut open: Vec<OpenBatch> = hosts.iter().map(|_| OpenBatch::default()).collect();
    // Each host's agent picks its delay for ended intervals' summaries.
    let delays: Vec<i64> = hosts
        .iter()
        .map(|_| i64::try_from(summary_delay(&AggregateConfig::default()).as_millis()).unwrap_or(0))
        .collect();
    let mut last = now_ms();
    let mut next = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        next += options.batch_age;
        let now_instant = std::time::Instant::now();
        if next > now_instant {
            std::thread::sleep(next - now_instant);
        } else {
            // Behind: go on at once, and do not try to catch up.
            next = now_instant;
        }
        // The events of the time that really passed, so a late tick (a busy
        // machine) offers what the hosts wrote meanwhile, up to a second.
        let now = now_ms();
        let tick_secs = ((now - last) as f64 / 1000.0).clamp(0.0, 1.0);
        last = now;
        let on = traffic.load(Ordering::Relaxed);
        let mut held = 0u64;
        for (((host, summariser), batch), delay) in
            hosts.iter().zip(summarising.iter_mut()).zip(open.iter_mut()).zip(&delays)
        {
            let p = &host.profile;
            let (context, abuse) = if on {
                (
                    poisson(&mut rng, p.context_per_sec * tick_secs),
                    poisson(&mut rng, shared.model.abuse_per_sec(p, now) * tick_secs),
                )
            } else {
                (0, 0)
            };
            stats.generated_events.fetch_add(u64::from(context + abuse), Ordering::Relaxed);
            let abuse_now = match summariser {
                None => {
                    batch.context += context;
                    batch.abuse += abuse;
                    abuse > 0
                }
                Some(summariser) => {
                    let flushed = if on {
                        let events = shared.model.events(p, summariser.next_key(), now, context, abuse);
                        summariser.feed(&events, now)
                    } else {
                        // Traffic off: the agent's shutdown flushes what is open.
                        summariser.finish()
                    };
                    held += summariser.held_lines();
                    let abuse_now =
                        flushed.events.iter().any(|e| !EventKind::try_from(e.kind).is_ok_and(EventKind::is_summarised));
                    batch.content.events.extend(flushed.events);
                    if !flushed.summaries.is_empty() {
                        batch.release_ms.get_or_insert(now + delay);
                        batch.held.extend(flushed.summaries);
                    }
                    abuse_now
                }
            };
            // Traffic off stands for the agent's shutdown, which sends
            // everything pending and held.
            let release = !batch.held.is_empty() && (!on || batch.release_ms.is_some_and(|at| at <= now));
            if release {
                batch.content.summaries.append(&mut batch.held);
                batch.release_ms = None;
            }
            let pending = u64::from(batch.context + batch.abuse) + batch.content.events.len() as u64;
            if pending == 0 && !release {
                batch.since_ms = None;
                held += batch.lines();
                continue;
            }
            let since = *batch.since_ms.get_or_insert(now);
            let due = !on || abuse_now || release || now - since >= context_age_ms || pending >= u64::from(max_events);
            if !due {
                held += batch.lines();
                continue;
            }
            // The pending part is cut; summaries still held stay.
            let (mut context, mut abuse) = (std::mem::take(&mut batch.context), std::mem::take(&mut batch.abuse));
            let flushed = std::mem::take(&mut batch.content);
            batch.since_ms = None;
            held += batch.lines();
            let mut spool = lock(&host.spool);
            if summariser.is_none() {
                stats.batched_events.fetch_add(u64::from(context + abuse), Ordering::Relaxed);
                while context + abuse > 0 {
                    let c = context.min(max_events);
                    let a = abuse.min(max_events - c);
                    context -= c;
                    abuse -= a;
                    let seq = spool.next_seq;
                    spool.next_seq += 1;
                    spool.push(Pending::counted(seq, now, c, a));
                    stats.generated_batches.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                stats.batched_events.fetch_add(flushed.events.len() as u64, Ordering::Relaxed);
                stats.batched_summaries.fetch_add(flushed.summaries.len() as u64, Ordering::Relaxed);
                stats.batched_summary_lines.fetch_add(flushed.summary_lines(), Ordering::Relaxed);
                for content in cut(flushed, max_events as usize) {
                    let seq = spool.next_seq;
                    spool.next_seq += 1;
                    spool.push(Pending::stored(seq, now, content));
                    stats.generated_batches.fetch_add(1, Ordering::Relaxed);
                }
            }
            trim(&mut spool, stats);
            drop(spool);
            host.wake.notify_one();
        }
        stats.held_lines.store(held, Ordering::Relaxed);
    }
}

/// One flush's output as batches of at most `max_events` events, the
/// summaries in the first (the agent cuts at `batch_events` events; the
/// summaries flushed so far ride along).
fn cut(flushed: Flushed, max_events: usize) -> Vec<Flushed> {
    let Flushed { mut events, summaries } = flushed;
    let mut out = Vec::new();
    let rest = events.split_off(events.len().min(max_events));
    out.push(Flushed { events, summaries });
    for chunk in rest.chunks(max_events.max(1)) {
        out.push(Flushed { events: chunk.to_vec(), summaries: Vec::new() });
    }
    out
}

/// Drops the oldest batches beyond [`SPOOL_MAX_BATCHES`] or
/// [`SPOOL_MAX_CONTENT_BYTES`], counted.
fn trim(spool: &mut Spool, stats: &Stats) {
    while spool.pending.len() > SPOOL_MAX_BATCHES || (spool.bytes > SPOOL_MAX_CONTENT_BYTES && spool.pending.len() > 1)
    {
        if let Some(old) = spool.pop()
            && !old.acked
        {
            stats.dropped_events.fetch_add(old.lines(), Ordering::Relaxed);
            if old.was_sent {
                // Sent and never acknowledged: the server may hold it.
                stats.dropped_sent_events.fetch_add(u64::from(old.events), Ordering::Relaxed);
                stats.dropped_sent_summaries.fetch_add(u64::from(old.summaries), Ordering::Relaxed);
                stats.dropped_sent_summary_lines.fetch_add(old.summary_lines, Ordering::Relaxed);
            }
        }
    }
}

/// A Poisson draw of mean `mean` (normal approximation above 30).
fn poisson(rng: &mut fastrand::Rng, mean: f64) -> u32 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 30.0 {
        // Box–Muller.
        let (u, v) = (rng.f64().max(f64::MIN_POSITIVE), rng.f64());
        let z = (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos();
        return (mean + z * mean.sqrt()).round().max(0.0) as u32;
    }
    let limit = (-mean).exp();
    let (mut k, mut p) = (0u32, rng.f64());
    while p > limit && k < 1000 {
        k += 1;
        p *= rng.f64();
    }
    k
}

/// Samples how late the event loop wakes for a 10 ms timer.
async fn probe_loop_lag(shared: Arc<Shared>) {
    const PERIOD: Duration = Duration::from_millis(10);
    let mut due = tokio::time::Instant::now() + PERIOD;
    loop {
        tokio::time::sleep_until(due).await;
        let now = tokio::time::Instant::now();
        let lag = now.saturating_duration_since(due).as_millis();
        lock(&shared.stats.loop_lags_ms).push(u32::try_from(lag).unwrap_or(u32::MAX));
        due = now + PERIOD;
    }
}

/// Writes a report line every [`REPORT_INTERVAL`].
async fn report(hosts: Vec<Arc<Host>>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    loop {
        tick.tick().await;
        emit(&hosts, &shared);
    }
}

fn emit(hosts: &[Arc<Host>], shared: &Shared) {
    let s = &shared.stats;
    let now = now_ms();
    let (mut pending, mut oldest) = (0u64, 0i64);
    // Batches dropped from a full spool after they were sent are in flight
    // for good: stored or not, never acknowledged.
    let (mut in_flight, mut in_flight_summaries, mut in_flight_summary_lines) = (
        s.dropped_sent_events.load(Ordering::Relaxed),
        s.dropped_sent_summaries.load(Ordering::Relaxed),
        s.dropped_sent_summary_lines.load(Ordering::Relaxed),
    );
    for host in hosts {
        let spool = lock(&host.spool);
        // The head of a spool is never acknowledged (acknowledged heads are
        // dropped at once), and the batches sent come first: the few
        // acknowledged out of order in the middle count as pending here.
        pending += spool.pending.len() as u64;
        if let Some(first) = spool.pending.front() {
            oldest = oldest.max(now - first.time_ms);
        }
        for p in spool.pending.iter().take_while(|p| p.seq <= spool.sent).filter(|p| !p.acked) {
            in_flight += u64::from(p.events);
            in_flight_summaries += u64::from(p.summaries);
            in_flight_summary_lines += p.summary_lines;
        }
    }
    let blocks = {
        let mut arrivals = lock(&s.arrivals);
        let done: Vec<i64> = arrivals.iter().filter(|(_, (n, ..))| *n >= shared.count).map(|(id, _)| *id).collect();
        done.into_iter().filter_map(|id| arrivals.remove(&id).map(|(_, first, last)| (id, (first, last)))).collect()
    };
    let report = Report {
        connected: s.connected.load(Ordering::Relaxed),
        welcomes: s.welcomes.load(Ordering::Relaxed),
        last_welcome_ns: s.last_welcome_ns.load(Ordering::Relaxed),
        generated_events: s.generated_events.load(Ordering::Relaxed),
        generated_batches: s.generated_batches.load(Ordering::Relaxed),
        batched_events: s.batched_events.load(Ordering::Relaxed),
        batched_summaries: s.batched_summaries.load(Ordering::Relaxed),
        batched_summary_lines: s.batched_summary_lines.load(Ordering::Relaxed),
        acked_events: s.acked_events.load(Ordering::Relaxed),
        acked_summaries: s.acked_summaries.load(Ordering::Relaxed),
        acked_summary_lines: s.acked_summary_lines.load(Ordering::Relaxed),
        acked_batches: s.acked_batches.load(Ordering::Relaxed),
        rejected_events: s.rejected_events.load(Ordering::Relaxed),
        nacked_batches: s.nacked_batches.load(Ordering::Relaxed),
        dropped_events: s.dropped_events.load(Ordering::Relaxed),
        held_lines: s.held_lines.load(Ordering::Relaxed),
        sent_batches: s.sent_batches.load(Ordering::Relaxed),
        pending_batches: pending,
        in_flight_events: in_flight,
        in_flight_summaries,
        in_flight_summary_lines,
        oldest_pending_ms: oldest,
        attempts: std::mem::take(&mut *lock(&s.attempts)),
        loop_lags_ms: std::mem::take(&mut *lock(&s.loop_lags_ms)),
        blocks,
    };
    if let Ok(line) = serde_json::to_string(&report) {
        println!("{line}");
    }
}

/// One agent: sessions, reopened after the agent's backoff, until stop.
async fn agent(host: Arc<Host>, shared: Arc<Shared>, first_delay: Duration) {
    let mut stop = shared.stop.clone();
    tokio::select! {
        () = tokio::time::sleep(first_delay) => {}
        () = stopped(&mut stop) => return,
    }
    let mut view = View::default();
    let mut attempt = 0u32;
    loop {
        *lock(&shared.stats.attempts).entry(mono_ns() / 1_000_000_000).or_default() += 1;
        let mut welcomed = false;
        let result = session(&host, &shared, &mut view, &mut welcomed).await;
        if *stop.borrow() {
            return;
        }
        if let Err(error) = result {
            tracing::debug!(error = %error, host = host.profile.index, "Session ended.");
        }
        if welcomed {
            attempt = 0;
        }
        let delay = fleetban_agent::uplink::backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// What one agent's firewall holds of the fleet's blocklist.
#[derive(Debug, Default)]
struct View {
    version: u64,
    /// Blocks it has received (each counted once per agent).
    seen: std::collections::HashSet<i64>,
}

impl View {
    /// Records the blocks of a delta or snapshot that are new to this agent.
    fn arrived(&mut self, blocks: impl Iterator<Item = i64>, stats: &Stats) {
        let at = mono_ns();
        let mut arrivals = lock(&stats.arrivals);
        for id in blocks {
            if self.seen.insert(id) {
                let e = arrivals.entry(id).or_insert((0, at, at));
                e.0 += 1;
                e.1 = e.1.min(at);
                e.2 = e.2.max(at);
            }
        }
    }
}

/// Resolves once the process stops.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Counts a connected session while it lives.
struct Connected<'a>(&'a Stats);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connect(source: IpAddr, server: SocketAddr) -> anyhow::Result<Channel> {
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
    });
    let endpoint = Endpoint::from_shared(format!("http://{server}"))?;
    Ok(tokio::time::timeout(SESSION_TIMEOUT, endpoint.connect_with_connector(connector)).await??)
}

async fn session(host: &Host, shared: &Shared, view: &mut View, welcomed: &mut bool) -> anyhow::Result<()> {
    let stats = &shared.stats;
    let mut stop = shared.stop.clone();
    let channel = connect(host.source, shared.server).await?;
    let (tx, rx) = mpsc::channel::<AgentFrame>(UPLINK_WINDOW + 16);
    let next_seq = lock(&host.spool).next_seq;
    let hello = Hello {
        agent_id: host.id.clone(),
        version: "fleetsim".into(),
        hostname: format!("sim-{}.example", host.profile.index),
        addresses: vec![],
        blocklist_version: view.version,
        next_seq,
    };
    tx.send(AgentFrame { frame: Some(Frame::Hello(hello)) }).await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(AGENT_ID_HEADER, host.id.parse()?);
    request.metadata_mut().insert(AGENT_SECRET_HEADER, host.secret.parse()?);
    let mut inbound =
        tokio::time::timeout(SESSION_TIMEOUT, AgentServiceClient::new(channel).connect(request)).await??.into_inner();
    let welcome = match tokio::time::timeout(SESSION_TIMEOUT, inbound.message()).await?? {
        Some(frame) => match frame.frame {
            Some(In::Welcome(w)) => w,
            other => bail!("expected Welcome, got {other:?}"),
        },
        None => bail!("stream closed before Welcome"),
    };
    *welcomed = true;
    stats.connected.fetch_add(1, Ordering::Relaxed);
    stats.welcomes.fetch_add(1, Ordering::Relaxed);
    let _connected = Connected(stats);
    stats.last_welcome_ns.fetch_max(mono_ns(), Ordering::Relaxed);
    let mut output = HostOutput::new(host.profile.index);
    // Batches up to the server's last stored seq are done; the rest are
    // (re)sent from the oldest.
    let mut sent = {
        let mut spool = lock(&host.spool);
        ack_through(&mut spool, welcome.last_acked_seq, stats);
        spool.sent = spool.pending.front().map_or(welcome.last_acked_seq, |p| p.seq.saturating_sub(1));
        spool.sent
    };
    let mut in_flight = 0usize;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(u64::from(welcome.heartbeat_secs.max(1))));
    heartbeat.reset();
    // As the agent: what was applied is reported once, after
    // `fleetban_agent::uplink::applied_delay`, for every change applied
    // meanwhile.
    let mut applied: Option<Applied> = None;
    let applied_due = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(applied_due);
    loop {
        // Fill the window, regenerating each batch's events or taking its
        // stored content.
        while in_flight < UPLINK_WINDOW {
            let batch = {
                let mut spool = lock(&host.spool);
                let Some(batch) = next_batch(&spool, sent, &shared.model, &host.profile, &mut output) else {
                    break;
                };
                // Marked before it goes out: a batch dropped from a full
                // spool after this may have been stored.
                spool.mark_sent(batch.seq);
                batch
            };
            let seq = batch.seq;
            tx.send(AgentFrame { frame: Some(Frame::Batch(batch)) }).await?;
            stats.sent_batches.fetch_add(1, Ordering::Relaxed);
            sent = seq;
            lock(&host.spool).sent = seq;
            in_flight += 1;
        }
        tokio::select! {
            biased;
            () = stopped(&mut stop) => return Ok(()),
            () = &mut applied_due, if applied.is_some() => {
                if let Some(report) = applied.take() {
                    tx.send(AgentFrame { frame: Some(Frame::Applied(report)) }).await?;
                }
            }
            frame = inbound.message() => {
                let Some(frame) = frame? else { bail!("server closed the stream") };
                match frame.frame {
                    Some(In::Ack(ack)) => {
                        in_flight = in_flight.saturating_sub(1);
                        stats.rejected_events.fetch_add(u64::from(ack.rejected_events), Ordering::Relaxed);
                        ack_one(&mut lock(&host.spool), ack.seq, u64::from(ack.rejected_events), stats);
                    }
                    Some(In::Nack(nack)) => {
                        in_flight = in_flight.saturating_sub(1);
                        stats.nacked_batches.fetch_add(1, Ordering::Relaxed);
                        // Refused as a whole: dropped, as the agent does.
                        let mut spool = lock(&host.spool);
                        if let Some(p) = spool.pending.iter_mut().find(|p| p.seq == nack.seq) {
                            p.acked = true;
                        }
                        while spool.pending.front().is_some_and(|p| p.acked) {
                            spool.pop();
                        }
                    }
                    Some(In::Delta(delta)) => {
                        view.arrived(delta.added.iter().map(|e| e.block_id), stats);
                        view.version = delta.to_version;
                        let report = Applied { blocklist_version: view.version, firewall_entries: 0 };
                        if !shared.skip_applied && applied.replace(report).is_none() {
                            applied_due.as_mut().reset(tokio::time::Instant::now() + applied_delay());
                        }
                    }
                    Some(In::Snapshot(snapshot)) => {
                        // A lagging session gets a snapshot instead of the
                        // deltas it missed: its blocks arrive with it.
                        view.arrived(snapshot.entries.iter().map(|e| e.block_id), stats);
                        view.version = snapshot.version;
                        let entries = snapshot.entries.len() as u64;
                        let report = Applied { blocklist_version: view.version, firewall_entries: entries };
                        if !shared.skip_applied && applied.replace(report).is_none() {
                            applied_due.as_mut().reset(tokio::time::Instant::now() + applied_delay());
                        }
                    }
                    _ => {}
                }
            }
            () = host.wake.notified(), if in_flight < UPLINK_WINDOW => {}
            _ = heartbeat.tick() => {
                let pending = lock(&host.spool).pending.len() as u64;
                let beat = Heartbeat { blocklist_version: view.version, firewall_entries: 0, pending_batches: pending };
                tx.send(AgentFrame { frame: Some(Frame::Heartbeat(beat)) }).await?;
            }
        }
    }
}

/// The first unacknowledged batch after `sent`, as it goes out: regenerated
/// (individual mode) or as stored (summarised mode), the same each time.
fn next_batch(
    spool: &Spool,
    sent: u64,
    model: &FleetModel,
    profile: &HostProfile,
    output: &mut HostOutput,
) -> Option<EventBatch> {
    let p = spool.pending.iter().find(|p| p.seq > sent && !p.acked)?;
    Some(match &p.content {
        Some(content) => EventBatch {
            seq: p.seq,
            events: content.events.clone(),
            summaries: content.summaries.clone(),
            position: None,
        },
        None => output.flush(p.seq, &model.events(profile, p.seq, p.time_ms, p.context, p.abuse)),
    })
}

/// Counts batch `p` acknowledged.
fn count_acked(p: &Pending, rejected: u64, stats: &Stats) {
    stats.acked_events.fetch_add(u64::from(p.events).saturating_sub(rejected), Ordering::Relaxed);
    stats.acked_summaries.fetch_add(u64::from(p.summaries), Ordering::Relaxed);
    stats.acked_summary_lines.fetch_add(p.summary_lines, Ordering::Relaxed);
    stats.acked_batches.fetch_add(1, Ordering::Relaxed);
}

/// Marks batch `seq` stored and drops the acknowledged head of the spool.
fn ack_one(spool: &mut Spool, seq: u64, rejected: u64, stats: &Stats) {
    if let Some(p) = spool.pending.iter_mut().find(|p| p.seq == seq && !p.acked) {
        p.acked = true;
        count_acked(p, rejected, stats);
    }
    while spool.pending.front().is_some_and(|p| p.acked) {
        spool.pop();
    }
}

/// Every batch up to `seq` is stored (`Welcome.last_acked_seq`).
fn ack_through(spool: &mut Spool, seq: u64, stats: &Stats) {
    while spool.pending.front().is_some_and(|p| p.seq <= seq) {
        if let Some(p) = spool.pop()
            && !p.acked
        {
            count_acked(&p, 0, stats);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_draws_have_their_mean() {
        let mut rng = fastrand::Rng::with_seed(5);
        for mean in [0.3, 3.0, 22.5, 100.0] {
            let n = 20_000;
            let sum: u64 = (0..n).map(|_| u64::from(poisson(&mut rng, mean))).sum();
            let got = sum as f64 / n as f64;
            assert!((got - mean).abs() < mean * 0.05 + 0.02, "mean {mean}: got {got}");
        }
    }

    #[test]
    fn acks_count_each_batch_once_whichever_way_they_come() {
        let stats = Stats::default();
        let mut spool = Spool { next_seq: 6, ..Spool::default() };
        for seq in 1..=5 {
            spool.push(Pending::counted(seq, 0, 10, 1));
        }
        ack_one(&mut spool, 2, 0, &stats);
        ack_one(&mut spool, 2, 0, &stats);
        assert_eq!(spool.pending.len(), 5, "2 is acked but 1 is not: the head stays");
        ack_one(&mut spool, 1, 0, &stats);
        assert_eq!(spool.pending.front().map(|p| p.seq), Some(3));
        // A new session's Welcome says 4 is stored: 3 and 4 count now, 2 not again.
        ack_through(&mut spool, 4, &stats);
        assert_eq!(spool.pending.front().map(|p| p.seq), Some(5));
        assert_eq!(stats.acked_batches.load(Ordering::Relaxed), 4);
        assert_eq!(stats.acked_events.load(Ordering::Relaxed), 44);
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_sent_ones_as_in_flight_for_good() {
        let model = FleetModel { seed: 3, hosts: 10, context_per_sec: 30.0, attacked_percent: 10, burst_max: 1000.0 };
        let profile = model.host(2);
        let mut host = SummarisingHost::new(2);
        let stats = Stats::default();
        let mut spool = Spool { next_seq: 1, ..Spool::default() };
        let start = 1_700_000_000_000;
        let mut t = 0;
        while spool.bytes <= SPOOL_MAX_CONTENT_BYTES {
            t += 1;
            let now = start + t * 100;
            let events = model.events(&profile, host.next_key(), now, 0, 40);
            let content = host.feed(&events, now);
            let seq = spool.next_seq;
            spool.next_seq += 1;
            spool.push(Pending::stored(seq, now, content));
        }
        let (first_events, total) = (u64::from(spool.pending[0].events), spool.pending.len());
        spool.mark_sent(1);
        trim(&mut spool, &stats);
        assert!(spool.bytes <= SPOOL_MAX_CONTENT_BYTES, "trimmed under the bound");
        assert_eq!(spool.pending.front().map(|p| p.seq), Some(2), "only the oldest goes ({total} were held)");
        assert_eq!(spool.bytes, spool.pending.iter().map(|p| p.bytes).sum::<usize>());
        assert_eq!(stats.dropped_events.load(Ordering::Relaxed), first_events);
        assert_eq!(stats.dropped_sent_events.load(Ordering::Relaxed), first_events, "it was sent: maybe stored");
    }

    #[test]
    fn a_summarised_batch_is_resent_as_it_was_cut_and_counted_once() {
        let model = FleetModel { seed: 3, hosts: 10, context_per_sec: 30.0, attacked_percent: 10, burst_max: 1000.0 };
        let profile = model.host(4);
        let mut host = SummarisingHost::new(4);
        let mut output = HostOutput::new(4);
        let stats = Stats::default();
        let mut spool = Spool { next_seq: 1, ..Spool::default() };
        // 40 s of a busy log: batches with individual events, and
        // the first minute's summaries in the batch cut after its end.
        let start = 1_700_000_070_000; // 30 s into a minute
        for t in 1..=400 {
            let now = start + t * 100;
            let events = model.events(&profile, host.next_key(), now, 6, 0);
            let flushed = host.feed(&events, now);
            for content in cut(flushed, 1000) {
                let seq = spool.next_seq;
                spool.next_seq += 1;
                spool.push(Pending::stored(seq, now, content));
            }
        }
        let with_summaries =
            spool.pending.iter().find(|p| p.summaries > 0).map(|p| p.seq).expect("a batch with summaries");
        let sent_before = with_summaries - 1;
        let first = next_batch(&spool, sent_before, &model, &profile, &mut output).expect("a batch");
        assert_eq!(first.seq, with_summaries);
        assert!(!first.summaries.is_empty());
        // The aggregator moves on; a resend after a reconnect is the same batch.
        let events = model.events(&profile, host.next_key(), start + 120_000, 50, 0);
        host.feed(&events, start + 120_000);
        let again = next_batch(&spool, sent_before, &model, &profile, &mut output).expect("the batch again");
        assert_eq!(first, again);
        // Acknowledged twice (an Ack, then a Welcome's last_acked_seq), counted once.
        let p = spool.pending.iter().find(|p| p.seq == with_summaries).expect("pending");
        let (events, summaries, lines) = (u64::from(p.events), u64::from(p.summaries), p.summary_lines);
        assert_eq!(lines, super::super::traffic::summary_lines(&first.summaries));
        assert_eq!(events, first.events.len() as u64);
        ack_one(&mut spool, with_summaries, 0, &stats);
        ack_through(&mut spool, with_summaries, &stats);
        // The batches before it carry no summaries: only its own count.
        assert_eq!(stats.acked_summaries.load(Ordering::Relaxed), summaries);
        assert_eq!(stats.acked_summary_lines.load(Ordering::Relaxed), lines);
        assert!(next_batch(&spool, sent_before, &model, &profile, &mut output).is_none_or(|b| b.seq > with_summaries));
    }
}
