//! The real agent uplink (`fleetban_agent::uplink::run`, spool, dry-run
//! firewall) keeps streaming into the real server (`serve::run` on
//! 127.0.0.1:0) while idle connections flood both listeners and slowloris
//! clients trickle headers into the HTTP listener: every batch is acked,
//! `/healthz` answers within 100 ms, and the server closes every attacking
//! connection. Attackers connect from 127.0.0.2 to 127.0.0.5, the agent and
//! the health checks from 127.0.0.1. Bounded: 1,200 idle connections per
//! listener, 20 slowloris clients, 30 batches, at most a minute.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetban_agent::firewall::dryrun::{DryRun, FILE_NAME};
use fleetban_agent::firewall::reconcile::{FirewallStats, Reconciler};
use fleetban_agent::firewall::worker::{Worker, WorkerOptions};
use fleetban_agent::spool::{Spool, SpoolOptions};
use fleetban_agent::uplink::{self, ServerOptions, UplinkContext, UplinkStats};
use fleetban_proto::v1::{Event, EventKind, SourcePosition};
use fleetban_server::config::LimitsConfig;
use fleetban_server::{auth, serve};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};

const WAIT: Duration = Duration::from_secs(30);
const FLOOD_CONNECTIONS: usize = 1_200;
const SLOWLORIS_CONNECTIONS: usize = 20;
const BATCHES: usize = 30;
const HEALTH_BUDGET: Duration = Duration::from_millis(100);

fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            let raised = libc::rlimit { rlim_cur: wanted.min(limit.rlim_max), rlim_max: limit.rlim_max };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raised), 0);
            limit.rlim_cur = raised.rlim_cur;
        }
    }
    assert!(limit.rlim_cur >= wanted, "the test needs {wanted} descriptors; the hard limit is {}", limit.rlim_max);
}

async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(to).await
}

fn attacker(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i % 4) as u8)
}

async fn flood(to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() > deadline {
            break;
        }
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), connect_from(attacker(i), to)).await {
            streams.push(stream);
        }
    }
    streams
}

/// Whether the server closes `stream` within `limit`.
async fn closed_within(mut stream: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Whether the server closes each of `streams` within `limit` (concurrently).
async fn all_closed(streams: Vec<TcpStream>, limit: Duration) -> Vec<bool> {
    let tasks: Vec<_> = streams.into_iter().map(|s| tokio::spawn(closed_within(s, limit))).collect();
    let mut closed = Vec::with_capacity(tasks.len());
    for task in tasks {
        closed.push(task.await.unwrap());
    }
    closed
}

/// One header byte every 250 ms until the server closes the connection;
/// whether it did within `limit`.
async fn slowloris(source: Ipv4Addr, to: SocketAddr, limit: Duration) -> bool {
    let Ok(stream) = connect_from(source, to).await else {
        return false;
    };
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\nhost: slow.example\r\nx-pad: ".iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok();
    writing.abort();
    closed
}

async fn healthz(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect for /healthz");
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.expect("/healthz answers").unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    started.elapsed()
}

fn append(spool: &Arc<Mutex<Spool>>, durable: &watch::Sender<u64>, i: usize) {
    let mut spool = spool.lock().unwrap();
    let event = Event {
        time_ms: fleetban_agent::firewall::now_ms(),
        kind: EventKind::Connect as i32,
        remote: Some("198.51.100.10".parse::<IpAddr>().unwrap().into()),
        remote_port: 40_000,
        local_port: 25,
        connection_count: 3,
        raw: format!("flood test line {i}"),
        ..Event::default()
    };
    let position =
        SourcePosition { path: "/var/log/exim_mainlog".into(), fingerprint: 7, offset: i as u64, open_from: None };
    spool.append(&[event], &position).unwrap();
    spool.sync().unwrap();
    durable.send_replace(spool.durable_seq());
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_real_agent_keeps_streaming_through_a_connection_flood(pool: PgPool) {
    raise_fd_limit(8_192);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let limits = LimitsConfig {
        grpc_max_unauthenticated: 48,
        grpc_max_unauthenticated_per_source: 8,
        grpc_auth_timeout_secs: 2,
        http_max_connections_per_source: 64,
        http_header_timeout_secs: 1,
        ..LimitsConfig::default()
    };
    let options = serve::Options { heartbeat: Duration::from_secs(5), limits, ..Default::default() };
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve::run(pool.clone(), options, serve::Listeners { grpc, http }, async move {
        let _ = server_stopped.await;
    }));

    let server_options = ServerOptions { server: format!("http://{grpc_addr}"), ca_file: None, insecure: false };
    let token = auth::create_enrollment_token(&pool, 1, Duration::from_secs(60), "flood").await.unwrap();
    let credentials =
        uplink::enroll(&server_options, &token, "mx.test", &["198.51.100.200".parse().unwrap()]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) =
        Spool::open(&dir.path().join("spool"), SpoolOptions { max_bytes: 1 << 22, segment_bytes: 4096 }).unwrap();
    let spool = Arc::new(Mutex::new(spool));
    let (durable_tx, durable) = watch::channel(0u64);
    let reconciler = Reconciler::new(
        Box::new(DryRun::new(dir.path().join(FILE_NAME))),
        vec![],
        Some(dir.path().into()),
        Arc::new(FirewallStats::default()),
    );
    let worker = Worker::start(
        reconciler,
        WorkerOptions { reconcile_interval: Duration::from_secs(60), reports: None, applied: None, started: None },
    )
    .unwrap();
    let (_reports_tx, reports_rx) = tokio::sync::mpsc::channel(8);
    let ctx = UplinkContext {
        server: server_options,
        credentials,
        hostname: "mx.test".into(),
        addresses: vec!["198.51.100.200".parse().unwrap()],
        spool: spool.clone(),
        durable,
        firewall: worker.handle(),
        local_blocks: reports_rx,
        on_policy: Box::new(|_| {}),
        on_allowlist: Box::new(|_| {}),
        on_revoked: Box::new(|_| {}),
        on_server_address: Arc::new(|_| {}),
        window: 2,
        stats: Arc::new(UplinkStats::default()),
    };
    let (stop_uplink, uplink_stopped) = oneshot::channel::<()>();
    let uplink = tokio::spawn(uplink::run(ctx, async {
        let _ = uplink_stopped.await;
    }));
    append(&spool, &durable_tx, 0);
    let deadline = Instant::now() + WAIT;
    while spool.lock().unwrap().acked_seq() < 1 {
        assert!(Instant::now() < deadline, "the first batch was never acked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The agent appends a batch every 100 ms for the whole flood.
    let feeder = {
        let spool = spool.clone();
        tokio::spawn(async move {
            for i in 1..BATCHES {
                append(&spool, &durable_tx, i);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let slow: Vec<_> = (0..SLOWLORIS_CONNECTIONS)
        .map(|i| tokio::spawn(slowloris(attacker(i), http_addr, Duration::from_secs(4))))
        .collect();
    let grpc_idle = flood(grpc_addr, FLOOD_CONNECTIONS).await;
    let http_idle = flood(http_addr, FLOOD_CONNECTIONS).await;
    let mut health = Vec::new();
    for _ in 0..10 {
        health.push(healthz(http_addr).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grpc_closed = all_closed(grpc_idle, Duration::from_secs(6)).await;
    let http_closed = all_closed(http_idle, Duration::from_secs(5)).await;
    let mut slow_closed = Vec::new();
    for task in slow {
        slow_closed.push(task.await.unwrap());
    }
    feeder.await.unwrap();
    let deadline = Instant::now() + WAIT;
    while spool.lock().unwrap().acked_seq() < BATCHES as u64 {
        assert!(Instant::now() < deadline, "batches stopped being acked during the flood");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    health.push(healthz(http_addr).await);

    assert_eq!(grpc_closed.len(), FLOOD_CONNECTIONS, "the flood opened every connection");
    assert!(grpc_closed.iter().all(|c| *c), "every idle gRPC connection was closed by the server");
    assert!(http_closed.iter().all(|c| *c), "every idle HTTP connection was closed by the server");
    assert!(slow_closed.iter().all(|c| *c), "every slowloris client was closed");
    assert!(health.iter().all(|d| *d < HEALTH_BUDGET), "/healthz within {HEALTH_BUDGET:?}: {health:?}");
    let stored: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await.unwrap();
    assert_eq!(stored, BATCHES as i64, "every batch stored once");

    stop_uplink.send(()).unwrap();
    tokio::time::timeout(WAIT, uplink).await.expect("uplink stops").unwrap();
    worker.join();
    let _ = stop_server.send(());
    tokio::time::timeout(WAIT, server).await.expect("server stops").unwrap().unwrap();
}
