//! The agent's uplink against the real fleetban-server (in-process, over
//! loopback gRPC, with a throwaway Postgres): enrollment, batches acked and
//! deleted from the spool and stored once, a block pushed as a delta and
//! applied, a server restart after which only unacked batches are sent, and
//! a snapshot that replaces a stale blocklist.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetban_agent::firewall::dryrun::{DryRun, FILE_NAME, Record};
use fleetban_agent::firewall::reconcile::{FirewallStats, Reconciler};
use fleetban_agent::firewall::worker::{Worker, WorkerOptions};
use fleetban_agent::spool::{Spool, SpoolOptions};
use fleetban_agent::uplink::{self, ServerOptions, UplinkContext, UplinkStats};
use fleetban_proto::v1::{BlockEntry, BlocklistSnapshot, Event, EventKind, SourcePosition};
use fleetban_server::blocks::{self, BlockSource, NewBlock};
use fleetban_server::correlate::CorrelateConfig;
use fleetban_server::{auth, serve};
use sqlx::PgPool;
use tokio::sync::{oneshot, watch};

const WAIT: Duration = Duration::from_secs(30);

struct Server {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), serve::Error>>,
}

async fn start_server(pool: PgPool, grpc: SocketAddr) -> (Server, SocketAddr) {
    let grpc = tokio::net::TcpListener::bind(grpc).await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let options = serve::Options { heartbeat: Duration::from_secs(5), ..Default::default() };
    let handle = tokio::spawn(serve::run(pool, options, serve::Listeners { grpc, http }, async move {
        let _ = rx.await;
    }));
    (Server { stop, handle }, addr)
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.handle).await.expect("server stops").unwrap().unwrap();
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn now_ms() -> i64 {
    fleetban_agent::firewall::now_ms()
}

/// Appends `n` batches of 4 valid events each.
fn append(spool: &Arc<Mutex<Spool>>, durable: &watch::Sender<u64>, n: usize) {
    let mut spool = spool.lock().unwrap();
    for i in 0..n {
        let events: Vec<Event> = (0..4)
            .map(|j| Event {
                time_ms: now_ms(),
                kind: EventKind::Connect as i32,
                remote: Some(format!("198.51.100.{}", 10 + j).parse::<std::net::IpAddr>().unwrap().into()),
                remote_port: 40_000,
                local_port: 25,
                connection_count: 3,
                raw: format!("test line {i}/{j} {}", "x".repeat(200)),
                ..Event::default()
            })
            .collect();
        let position =
            SourcePosition { path: "/var/log/exim_mainlog".into(), fingerprint: 7, offset: i as u64, open_from: None };
        spool.append(&events, &position).unwrap();
    }
    spool.sync().unwrap();
    durable.send_replace(spool.durable_seq());
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

fn held(dir: &std::path::Path) -> Vec<String> {
    let records: Vec<Record> = serde_json::from_slice(&std::fs::read(dir.join(FILE_NAME)).unwrap()).unwrap();
    records.into_iter().map(|r| r.cidr).collect()
}

fn segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
        .count()
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn uplink_against_the_real_server(pool: PgPool) {
    let (server, addr) = start_server(pool.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let server_options = ServerOptions { server: format!("http://{addr}"), ca_file: None, insecure: false };

    // Enrollment through the agent's own client.
    let token = auth::create_enrollment_token(&pool, 1, Duration::from_secs(60), "test").await.unwrap();
    let credentials =
        uplink::enroll(&server_options, &token, "mx.test", &["198.51.100.200".parse().unwrap()]).await.unwrap();
    assert!(uplink::enroll(&server_options, &token, "mx.test", &[]).await.is_err(), "a one-use token works once");

    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let (spool, _) = Spool::open(&spool_dir, SpoolOptions { max_bytes: 1 << 22, segment_bytes: 512 }).unwrap();
    let spool = Arc::new(Mutex::new(spool));
    let (durable_tx, durable) = watch::channel(0u64);
    append(&spool, &durable_tx, 5);
    assert!(segments(&spool_dir) >= 5);

    // The agent holds a stale blocklist at a version the server never had:
    // the server answers with a snapshot that replaces it.
    let mut reconciler = Reconciler::new(
        Box::new(DryRun::new(dir.path().join(FILE_NAME))),
        vec![],
        Some(dir.path().into()),
        Arc::new(FirewallStats::default()),
    );
    let stale = BlockEntry {
        block_id: 77,
        cidr: Some("203.0.113.0/24".parse::<ipnet::IpNet>().unwrap().into()),
        expires_at_ms: 0,
        reason: "stale".into(),
    };
    reconciler.apply_snapshot(&BlocklistSnapshot { version: 999, entries: vec![stale] }, now_ms()).unwrap();
    assert_eq!(held(dir.path()), ["203.0.113.0/24"]);
    let worker = Worker::start(
        reconciler,
        WorkerOptions { reconcile_interval: Duration::from_secs(60), reports: None, applied: None, started: None },
    )
    .unwrap();
    let firewall = worker.handle();
    let (_reports_tx, reports_rx) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(UplinkStats::default());
    let ctx = UplinkContext {
        server: server_options,
        credentials,
        hostname: "mx.test".into(),
        addresses: vec!["198.51.100.200".parse().unwrap()],
        spool: spool.clone(),
        durable,
        firewall: firewall.clone(),
        local_blocks: reports_rx,
        on_policy: Box::new(|_| {}),
        on_allowlist: Box::new(|_| {}),
        on_revoked: Box::new(|_| {}),
        on_server_address: Arc::new(|_| {}),
        window: 2,
        stats: stats.clone(),
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let uplink = tokio::spawn(uplink::run(ctx, async {
        let _ = stop_rx.await;
    }));

    // Snapshot replaces the stale state; batches are acked, stored once and
    // their segments deleted.
    wait_until("snapshot applied", || firewall.version() == 0 && held(dir.path()).is_empty()).await;
    wait_until("5 batches acked", || spool.lock().unwrap().acked_seq() == 5).await;
    assert_eq!(segments(&spool_dir), 1);
    assert_eq!(count(&pool, "select count(*) from agent_batches").await, 5);
    assert_eq!(count(&pool, "select count(*) from events").await, 20);

    // A block decided on the server reaches the agent as a delta.
    let block = blocks::create(
        &pool,
        &CorrelateConfig::default(),
        NewBlock {
            cidr: "192.0.2.0/24".parse().unwrap(),
            reason: "manual".into(),
            source: BlockSource::Manual,
            evidence: serde_json::json!({}),
            ttl: Some(Duration::from_secs(3600)),
            created_by: Some("test".into()),
            force: false,
        },
    )
    .await
    .unwrap();
    wait_until("delta applied", || held(dir.path()) == ["192.0.2.0/24"]).await;
    let version = firewall.version();
    assert!(version > 0);
    wait_until("Applied recorded", || stats.blocklists_applied.load(Ordering::Relaxed) >= 2).await;

    // Server restart: batches spooled while it is down are sent after, and
    // only those.
    server.stop().await;
    append(&spool, &durable_tx, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (server, _) = start_server(pool.clone(), addr).await;
    wait_until("8 batches acked", || spool.lock().unwrap().acked_seq() == 8).await;
    assert_eq!(count(&pool, "select count(*) from agent_batches").await, 8);
    assert_eq!(count(&pool, "select count(*) from events").await, 32, "nothing stored twice");
    assert_eq!(stats.batches_sent.load(Ordering::Relaxed), 8, "acked batches were not sent again");
    assert!(stats.sessions.load(Ordering::Relaxed) >= 2);

    // After the reconnect the agent reported the version it holds and got
    // nothing it already had; revoking the block removes the entry.
    blocks::revoke(&pool, block.id, "test").await.unwrap();
    wait_until("removal applied", || held(dir.path()).is_empty()).await;
    assert!(firewall.version() > version);

    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, uplink).await.expect("uplink stops").unwrap();
    drop(firewall);
    worker.join();
    server.stop().await;
}

/// `fleetban-agent enroll`'s identity against the real server: the host id
/// kept in the state directory makes a second enrollment of the same host
/// replace its credentials (same agent id), while another host (its own
/// state directory) asking for the same name is refused, naming the agent.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn enrolling_again_replaces_and_another_host_is_refused(pool: PgPool) {
    let (server, addr) = start_server(pool.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let server_options = ServerOptions { server: format!("http://{addr}"), ca_file: None, insecure: false };
    let token = auth::create_enrollment_token(&pool, 5, Duration::from_secs(60), "test").await.unwrap();
    let (host_a, host_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let enroll = |state_dir: std::path::PathBuf| {
        let (server_options, token) = (server_options.clone(), token.clone());
        async move {
            let host_id = fleetban_agent::host::host_id(&state_dir).unwrap();
            let enrollment = uplink::Enrollment {
                token: &token,
                name: Some("mx1"),
                host_id: Some(&host_id),
                hostname: "mx1.example.net",
                addresses: &[],
            };
            uplink::enroll_as(&server_options, &enrollment).await
        }
    };
    let first = enroll(host_a.path().to_owned()).await.unwrap();
    assert!(!first.reenrolled);
    assert!(host_a.path().join(fleetban_agent::host::HOST_ID_FILE).is_file());
    let again = enroll(host_a.path().to_owned()).await.unwrap();
    assert!(again.reenrolled);
    assert_eq!(again.credentials.agent_id, first.credentials.agent_id);
    assert_ne!(again.credentials.agent_secret, first.credentials.agent_secret);
    let other = enroll(host_b.path().to_owned()).await.unwrap_err();
    let uplink::UplinkError::Status(status) = &other else { panic!("{other:?}") };
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains(&first.credentials.agent_id), "{status:?}");
    let agents: i64 = sqlx::query_scalar("select count(*) from agents").fetch_one(&pool).await.unwrap();
    assert_eq!(agents, 1);
    server.stop().await;
}
