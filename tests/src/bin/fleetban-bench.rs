//! `fleetban-bench`: server throughput and push latency over real gRPC on
//! loopback, against Postgres (the embedded one unless `DATABASE_URL` is
//! set).
//!
//! - `ingest`: N simulated agents stream batches of events into one server;
//!   prints sustained events/s, then the rows/s of a raw `COPY` of rows of the
//!   same shape through `psql`, as the reference ratio.
//! - `propagation`: K connected agents; a block is committed and the time
//!   until its delta reached every agent is measured, p50/p99.
//! - `fleet`: thousands of simulated hosts with realistic rates against the
//!   real `fleetban-server` binary (`fleetban_tests::fleetsim`); its
//!   simulator processes run the hidden `fleet-agents` command.
//!
//! Every loop is bounded in count and time; all traffic stays on loopback.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_client::AgentServiceClient;
use fleetban_proto::v1::server_frame::Frame as Out;
use fleetban_proto::v1::{AgentFrame, EnrollRequest, Event, EventBatch, EventKind, Hello, IpAddress, ServerFrame};
use fleetban_server::session::{AGENT_ID_HEADER, AGENT_SECRET_HEADER};
use fleetban_server::{auth, db, pgembed, serve};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(name = "fleetban-bench")]
struct Cli {
    /// Postgres URL (default: a throwaway embedded cluster).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sustained ingest rate of N agents streaming batches.
    Ingest {
        /// Simulated agents.
        #[arg(long, default_value_t = 50)]
        agents: usize,
        /// Events per batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Unacknowledged batches each agent keeps in flight.
        #[arg(long, default_value_t = 2)]
        in_flight: usize,
        /// Warm-up before measuring, seconds.
        #[arg(long, default_value_t = 5)]
        warmup_secs: u64,
        /// Measured period, seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Database pool of the server, connections (the server's default
        /// `db_max_connections`; a quarter of it writes batches).
        #[arg(long, default_value_t = 32)]
        pool: u32,
        /// Rows in the reference COPY.
        #[arg(long, default_value_t = 1_000_000)]
        copy_rows: usize,
        /// Share of abuse events (evidence + correlation), percent in steps
        /// of 10.
        #[arg(long, default_value_t = 20)]
        abuse_percent: usize,
    },
    /// Time from a block's commit to its delta at every connected agent.
    Propagation {
        /// Agent counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        agents: Vec<usize>,
        /// Blocks committed per agent count.
        #[arg(long, default_value_t = 100)]
        blocks: usize,
        /// Pause between blocks, milliseconds.
        #[arg(long, default_value_t = 50)]
        pause_ms: u64,
    },
    /// A fleet of simulated hosts against the real server binary: stored
    /// rows, CPU, memory, storage per day, propagation, reconnect storm.
    Fleet(fleetban_tests::fleetsim::FleetArgs),
    /// One simulator process of `fleet` (started by it).
    #[command(hide = true)]
    FleetAgents(fleetban_tests::fleetsim::agents::AgentsArgs),
}

/// The same allocator as `fleetban-server`, so the in-process server
/// measures what the real one does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Warnings and errors of the server under test go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    if let Command::FleetAgents(args) = cli.command {
        // A simulator process: one thread, no database.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return rt.block_on(fleetban_tests::fleetsim::agents::run(args));
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(bench(cli))
}

async fn bench(cli: Cli) -> anyhow::Result<()> {
    let mut embedded = None;
    let url = match cli.database_url {
        Some(url) => url,
        None => {
            let pg = tokio::task::spawn_blocking(pgembed::EmbeddedPostgres::start).await??;
            let url = pg.url();
            embedded = Some(pg);
            url
        }
    };
    match cli.command {
        Command::Ingest { agents, batch, in_flight, warmup_secs, seconds, pool, copy_rows, abuse_percent } => {
            let abuse_tenths = (abuse_percent / 10).min(10);
            let cfg = IngestConfig { agents, batch, in_flight, warmup_secs, seconds, pool, copy_rows, abuse_tenths };
            ingest(&url, cfg).await?;
        }
        Command::Propagation { agents, blocks, pause_ms } => {
            for n in agents {
                propagation(&url, n, blocks, Duration::from_millis(pause_ms)).await?;
            }
        }
        Command::Fleet(args) => {
            let result = fleetban_tests::fleetsim::run(&url, args).await?;
            fleetban_tests::fleetsim::print(&result);
        }
        Command::FleetAgents(_) => bail!("fleet-agents runs in its own process"),
    }
    drop(embedded);
    Ok(())
}

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), serve::Error>>,
}

async fn start_server(pool: PgPool) -> anyhow::Result<Server> {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let (stop, rx) = oneshot::channel::<()>();
    // Every simulated agent connects from 127.0.0.1: the per-source limits,
    // meant for real hosts, are lifted.
    let limits = fleetban_server::config::LimitsConfig {
        grpc_max_connections_per_source: 16_384,
        grpc_max_unauthenticated: 4_096,
        grpc_max_unauthenticated_per_source: 4_096,
        ..Default::default()
    };
    let options = serve::Options { heartbeat: Duration::from_secs(300), limits, ..Default::default() };
    let handle = tokio::spawn(serve::run(pool, options, serve::Listeners { grpc, http }, async move {
        let _ = rx.await;
    }));
    Ok(Server { addr, stop, handle })
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.connect().await?)
}

/// Enrolls `n` agents through the `Enroll` RPC.
async fn enroll(pool: &PgPool, addr: SocketAddr, n: usize) -> anyhow::Result<Vec<(Uuid, String)>> {
    let token = auth::create_enrollment_token(pool, n as u32, Duration::from_secs(3600), "bench").await?;
    let mut client = AgentServiceClient::new(channel(addr).await?);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = client
            .enroll(EnrollRequest {
                token: token.clone(),
                hostname: format!("bench-{i}.example"),
                version: "bench".into(),
                addresses: vec![],
                ..Default::default()
            })
            .await?
            .into_inner();
        out.push((r.agent_id.parse()?, r.agent_secret));
    }
    Ok(out)
}

struct Session {
    tx: mpsc::Sender<AgentFrame>,
    rx: Streaming<ServerFrame>,
}

/// Opens a session on its own connection and completes the Hello exchange
/// (Welcome, Policy and the initial snapshot or delta).
async fn open(addr: SocketAddr, id: Uuid, secret: &str) -> anyhow::Result<Session> {
    let (tx, rx) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(AGENT_ID_HEADER, id.to_string().parse()?);
    request.metadata_mut().insert(AGENT_SECRET_HEADER, secret.parse()?);
    let mut rx = AgentServiceClient::new(channel(addr).await?).connect(request).await?.into_inner();
    let hello =
        Hello { agent_id: id.to_string(), version: "bench".into(), hostname: "bench".into(), ..Default::default() };
    tx.send(AgentFrame { frame: Some(Frame::Hello(hello)) }).await?;
    // Welcome, Policy, Allowlist, then the snapshot or delta that brings the agent
    // up to date.
    loop {
        match rx.message().await?.and_then(|f| f.frame) {
            Some(Out::Welcome(_)) | Some(Out::Policy(_)) | Some(Out::Allowlist(_)) => {}
            Some(Out::Snapshot(_)) | Some(Out::Delta(_)) => break,
            other => bail!("unexpected reply to Hello: {other:?}"),
        }
    }
    Ok(Session { tx, rx })
}

// ---------------------------------------------------------------------------
// ingest
// ---------------------------------------------------------------------------

struct IngestConfig {
    agents: usize,
    batch: usize,
    in_flight: usize,
    warmup_secs: u64,
    seconds: u64,
    pool: u32,
    copy_rows: usize,
    abuse_tenths: usize,
}

/// Attacker addresses: the three IPv4 documentation ranges and some
/// 2001:db8::/32 hosts.
fn remote(i: usize) -> std::net::IpAddr {
    let n = i % 1024;
    match n % 4 {
        0 => std::net::IpAddr::from([192, 0, 2, (n / 4) as u8]),
        1 => std::net::IpAddr::from([198, 51, 100, (n / 4) as u8]),
        2 => std::net::IpAddr::from([203, 0, 113, (n / 4) as u8]),
        _ => std::net::IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, (n / 4) as u16]),
    }
}

/// One event of the mix: `abuse_tenths` tenths abuse (auth failures and
/// relay attempts), then 10 % accepted and 10 % lost, the rest connects.
fn bench_event(agent: usize, i: usize, time_ms: i64, abuse_tenths: usize) -> Event {
    let addr = remote(agent * 7919 + i * 31);
    let slot = i % 10;
    let slot = if slot < abuse_tenths { slot % 2 } else { 2 + (slot - abuse_tenths) % 8 };
    let (kind, text) = match slot {
        0 => (
            EventKind::AuthFailed,
            "dovecot_login authenticator failed for (User) [{a}]:51234: 535 Incorrect authentication data (set_id=info@example.com)",
        ),
        1 => (
            EventKind::RelayDenied,
            "H=(User) [{a}]:51234 F=<spam@example.net> rejected RCPT <x@example.org>: relay not permitted",
        ),
        2 => (
            EventKind::Accepted,
            "1abcDE-000123-AB <= sender@example.net H=mail.example.net [{a}]:51234 P=esmtps S=2048",
        ),
        3 => (EventKind::Lost, "SMTP connection from (User) [{a}]:51234 lost D=5s"),
        _ => (EventKind::Connect, "SMTP connection from [{a}]:51234 (TCP/IP connection count = 42)"),
    };
    let body = text.replace("{a}", &addr.to_string());
    Event {
        time_ms,
        kind: kind as i32,
        remote: Some(IpAddress::from(addr)),
        remote_port: 51234,
        local_port: 25,
        connection_count: if kind == EventKind::Connect { 42 } else { 0 },
        raw: format!("2026-11-27 10:00:00 [12345] {body}"),
        ..Default::default()
    }
}

async fn ingest(url: &str, cfg: IngestConfig) -> anyhow::Result<()> {
    let pool = db::connect(url, cfg.pool).await?;
    db::migrate(&pool).await?;
    let server = start_server(pool.clone()).await?;
    let creds = enroll(&pool, server.addr, cfg.agents).await?;
    // Open every session first, so that all agents stream for the whole
    // measured period.
    let mut sessions = Vec::with_capacity(creds.len());
    for (id, secret) in creds {
        sessions.push(open(server.addr, id, &secret).await?);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(cfg.warmup_secs + cfg.seconds);
    let mut tasks = Vec::new();
    for (n, session) in sessions.into_iter().enumerate() {
        let acked = acked.clone();
        let (batch_size, in_flight, abuse) = (cfg.batch, cfg.in_flight, cfg.abuse_tenths);
        tasks.push(tokio::spawn(async move {
            agent_stream(session, n, batch_size, in_flight, abuse, deadline, acked).await
        }));
    }
    println!(
        "ingest: {} agents, batches of {} events ({} % abuse), {} in flight per agent, server pool {} connections",
        cfg.agents,
        cfg.batch,
        cfg.abuse_tenths * 10,
        cfg.in_flight,
        cfg.pool
    );
    tokio::time::sleep(Duration::from_secs(cfg.warmup_secs)).await;
    let (start_events, start) = (acked.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(cfg.seconds)).await;
    let (end_events, elapsed) = (acked.load(Ordering::Relaxed), start.elapsed());
    let rate = (end_events - start_events) as f64 / elapsed.as_secs_f64();
    println!(
        "ingest: {} events acked in {:.1} s after {} s warm-up: {:.0} events/s",
        end_events - start_events,
        elapsed.as_secs_f64(),
        cfg.warmup_secs,
        rate
    );
    for t in tasks {
        t.await??;
    }
    let _ = server.stop.send(());
    server.handle.await??;
    let stored: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await?;
    println!("ingest: {stored} events stored in total");

    let copy_rate = copy_reference(url, &pool, cfg.copy_rows, cfg.abuse_tenths).await?;
    println!("reference: raw COPY via psql of {} rows of the same shape: {:.0} rows/s", cfg.copy_rows, copy_rate);
    println!("ratio: gRPC ingest reaches {:.0} % of raw COPY", 100.0 * rate / copy_rate);
    Ok(())
}

/// Streams batches until `deadline`, keeping `in_flight` unacked.
async fn agent_stream(
    mut s: Session,
    agent: usize,
    batch_size: usize,
    in_flight: usize,
    abuse_tenths: usize,
    deadline: Instant,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut seq = 0u64;
    let mut pending = 0usize;
    // Generated once: the simulated agent's cost per batch is a clone, not
    // formatting a thousand log lines, so the client steals little CPU from
    // the server it measures.
    let template: Vec<Event> = (0..batch_size).map(|i| bench_event(agent, i, 0, abuse_tenths)).collect();
    loop {
        while pending < in_flight && Instant::now() < deadline {
            seq += 1;
            let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
            let mut events = template.clone();
            for e in &mut events {
                e.time_ms = now;
            }
            let frame = Frame::Batch(EventBatch { seq, events, position: None, summaries: Vec::new() });
            s.tx.send(AgentFrame { frame: Some(frame) }).await?;
            pending += 1;
        }
        if pending == 0 {
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(60), s.rx.message()).await?? {
            Some(ServerFrame { frame: Some(Out::Ack(ack)) }) => {
                pending -= 1;
                acked.fetch_add((batch_size as u64).saturating_sub(u64::from(ack.rejected_events)), Ordering::Relaxed);
            }
            Some(ServerFrame { frame: Some(Out::Nack(nack)) }) => bail!("batch {} refused: {}", nack.seq, nack.reason),
            Some(_) => {}
            None => bail!("session closed"),
        }
    }
}

/// Writes `rows` events of the bench's shape as CSV and times `\copy` of
/// them into `events` through psql; returns rows/s.
async fn copy_reference(url: &str, pool: &PgPool, rows: usize, abuse_tenths: usize) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("fleetban-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("events.csv");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let agent = Uuid::new_v4();
        let now = time::OffsetDateTime::now_utc();
        let ts = now.format(&time::format_description::well_known::Rfc3339)?;
        for i in 0..rows {
            let e = bench_event(i % 50, i, 0, abuse_tenths);
            let kind = EventKind::try_from(e.kind)?.as_str();
            let remote = std::net::IpAddr::try_from(e.remote.as_ref().context("remote")?)?;
            let cc = if e.connection_count > 0 { e.connection_count.to_string() } else { String::new() };
            writeln!(
                out,
                "{agent},{},{},{ts},{kind},{remote},{},{},{cc},\"{}\"",
                i / 1000 + 1,
                i % 1000,
                e.remote_port,
                e.local_port,
                e.raw.replace('"', "\"\"")
            )?;
        }
        out.flush()?;
    }
    // The partition for today exists already (the ingest run created it).
    let _: Option<String> =
        sqlx::query_scalar("select fleetban_ensure_event_partition(current_date)").fetch_one(pool).await?;
    // Make psql's file readable whoever runs the cluster.
    let copy = format!(
        "\\copy events (agent_id, batch_seq, batch_index, time, kind, remote, remote_port, local_port, connection_count, raw) from '{}' with (format csv)",
        path.display()
    );
    let started = Instant::now();
    let status = tokio::process::Command::new("psql")
        .args([url, "-q", "-v", "ON_ERROR_STOP=1", "-c", &copy])
        .status()
        .await
        .context("run psql (install postgresql-client)")?;
    let elapsed = started.elapsed();
    std::fs::remove_dir_all(&dir)?;
    if !status.success() {
        bail!("psql \\copy failed: {status}");
    }
    Ok(rows as f64 / elapsed.as_secs_f64())
}

// ---------------------------------------------------------------------------
// propagation
// ---------------------------------------------------------------------------

async fn propagation(url: &str, agents: usize, blocks: usize, pause: Duration) -> anyhow::Result<()> {
    let pool = db::connect(url, 16).await?;
    db::migrate(&pool).await?;
    let server = start_server(pool.clone()).await?;
    let creds = enroll(&pool, server.addr, agents).await?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(i64, Instant)>();
    let mut tasks = Vec::new();
    for (id, secret) in creds {
        let mut s = open(server.addr, id, &secret).await?;
        let seen = seen_tx.clone();
        tasks.push(tokio::spawn(async move {
            // Keep the request stream open for the whole run.
            let _tx = s.tx;
            while let Ok(Some(frame)) = s.rx.message().await {
                let at = Instant::now();
                if let Some(Out::Delta(d)) = frame.frame {
                    for e in d.added {
                        let _ = seen.send((e.block_id, at));
                    }
                }
            }
        }));
    }
    drop(seen_tx);
    println!("propagation: {agents} agents connected, {blocks} blocks");

    let mut to_all = Vec::with_capacity(blocks);
    let mut per_agent = Vec::with_capacity(blocks * agents);
    let mut early: HashMap<i64, Vec<Instant>> = HashMap::new();
    for i in 0..blocks {
        // Distinct /64s in the documentation range 2001:db8::/32.
        let cidr = format!("2001:db8:{:x}:{:x}::/64", agents & 0xffff, i & 0xffff);
        let (id, committed) = commit_block(&pool, &cidr).await?;
        let mut arrivals = early.remove(&id).unwrap_or_default();
        let limit = Instant::now() + Duration::from_secs(10);
        while arrivals.len() < agents {
            let Ok(Some((block, at))) = tokio::time::timeout_at(limit.into(), seen_rx.recv()).await else {
                bail!("block {id}: only {} of {agents} agents received it within 10 s", arrivals.len());
            };
            if block == id {
                arrivals.push(at);
            } else {
                early.entry(block).or_default().push(at);
            }
        }
        let latest = arrivals.iter().max().copied().unwrap_or(committed);
        to_all.push(latest.saturating_duration_since(committed));
        per_agent.extend(arrivals.iter().map(|a| a.saturating_duration_since(committed)));
        tokio::time::sleep(pause).await;
    }
    let _ = server.stop.send(());
    server.handle.await??;
    for t in tasks {
        let _ = t.await;
    }
    report("every agent", &mut to_all, agents);
    report("each agent", &mut per_agent, agents);
    sqlx::query("delete from block_changes").execute(&pool).await?;
    sqlx::query("delete from blocks").execute(&pool).await?;
    Ok(())
}

/// Commits a manual block and its `add` change; returns its id and the
/// instant just before the commit was sent.
async fn commit_block(pool: &PgPool, cidr: &str) -> anyhow::Result<(i64, Instant)> {
    let mut tx = pool.begin().await?;
    let id = fleetban_tests::fleetsim::probe::stage_block(&mut tx, cidr, "bench").await?;
    let committed = Instant::now();
    tx.commit().await?;
    Ok((id, committed))
}

fn report(what: &str, samples: &mut [Duration], agents: usize) {
    samples.sort();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples.get(i).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)
    };
    println!(
        "propagation: {agents} agents, commit -> delta at {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        pct(0.5),
        pct(0.99),
        pct(1.0),
        samples.len()
    );
}
