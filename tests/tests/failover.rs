//! One server name with several addresses is several servers: the agent's
//! uplink (in-process, with a resolver hook that answers two loopback
//! addresses for `fleet.test`) connects over TLS verified against the name,
//! moves to the other address when its server stops, and every batch is
//! stored once across the two replicas (the server stores `(agent_id,
//! seq)`, and `Welcome.last_acked_seq` comes from the database: batches a
//! replica stored without its ack reaching the agent are not sent again).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetban_agent::failover::{Resolver, Servers};
use fleetban_agent::firewall::dryrun::{DryRun, FILE_NAME};
use fleetban_agent::firewall::reconcile::{FirewallStats, Reconciler};
use fleetban_agent::firewall::worker::{Worker, WorkerOptions};
use fleetban_agent::spool::{Spool, SpoolOptions};
use fleetban_agent::uplink::{self, ServerOptions, UplinkContext, UplinkStats};
use fleetban_proto::v1::{Event, EventKind, SourcePosition};
use fleetban_server::config::TlsConfig;
use fleetban_server::{auth, serve, tls};
use sqlx::PgPool;
use tokio::sync::{oneshot, watch};

const WAIT: Duration = Duration::from_secs(30);

struct Server {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), serve::Error>>,
}

async fn start_server(pool: PgPool, grpc: tokio::net::TcpListener, tls: &TlsConfig) -> Server {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = grpc.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let options = serve::Options {
        heartbeat: Duration::from_secs(5),
        tls: tls::server_config(Some(tls), listen, false).unwrap(),
        ..Default::default()
    };
    let handle = tokio::spawn(serve::run(pool, options, serve::Listeners { grpc, http }, async move {
        let _ = rx.await;
    }));
    Server { stop, handle }
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

/// Two listeners on one port: 127.0.0.1 and 127.0.0.2.
async fn two_addresses() -> (tokio::net::TcpListener, tokio::net::TcpListener) {
    for _ in 0..50 {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = a.local_addr().unwrap().port();
        if let Ok(b) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await {
            return (a, b);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// Appends `n` batches of 3 events each, each event its own remote port.
fn append(spool: &Arc<Mutex<Spool>>, durable: &watch::Sender<u64>, n: usize, first_port: u32) {
    let mut spool = spool.lock().unwrap();
    for i in 0..n {
        let events: Vec<Event> = (0..3)
            .map(|j| Event {
                time_ms: fleetban_agent::firewall::now_ms(),
                kind: EventKind::Connect as i32,
                remote: Some("198.51.100.10".parse::<std::net::IpAddr>().unwrap().into()),
                remote_port: first_port + (i * 3 + j) as u32,
                local_port: 25,
                connection_count: 1,
                raw: String::new(),
                ..Event::default()
            })
            .collect();
        let position = SourcePosition {
            path: "/var/log/exim_mainlog".into(),
            fingerprint: 7,
            offset: i as u64,
            ..Default::default()
        };
        spool.append(&events, &position).unwrap();
    }
    spool.sync().unwrap();
    durable.send_replace(spool.durable_seq());
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn one_name_with_two_addresses_is_two_servers(pool: PgPool) {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = tls::pki_init(pki_dir.path(), "fleet.test").unwrap();
    let tls_config = TlsConfig { cert_file: pki.server_cert, key_file: pki.server_key, client_ca_file: None };
    let (one, two) = two_addresses().await;
    let port = one.local_addr().unwrap().port();
    let addrs: Vec<SocketAddr> = vec![one.local_addr().unwrap(), two.local_addr().unwrap()];
    let mut servers = vec![
        Some(start_server(pool.clone(), one, &tls_config).await),
        Some(start_server(pool.clone(), two, &tls_config).await),
    ];

    // `fleet.test` resolves to both, at every attempt.
    let lookups = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let resolver: Resolver = {
        let (addrs, lookups) = (addrs.clone(), lookups.clone());
        Arc::new(move |host, _port| {
            let addrs = addrs.clone();
            lookups.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if host == "fleet.test" {
                    Ok(addrs)
                } else {
                    Err(std::io::Error::new(std::io::ErrorKind::NotFound, "unknown name"))
                }
            })
        })
    };
    let url = format!("https://fleet.test:{port}");
    let server_options = ServerOptions { server: url.clone(), ca_file: Some(pki.ca_cert.clone()), insecure: false };

    let token = auth::create_enrollment_token(&pool, 1, Duration::from_secs(60), "test").await.unwrap();
    // The agent's identity, straight from the store (enrollment is not what
    // this test is about).
    let enrolled = auth::enroll_agent(
        &pool,
        &auth::Enrollment {
            token: &token,
            name: Some("mx-failover"),
            host_id: None,
            hostname: "mx.test",
            version: "test",
            addresses: &[],
        },
    )
    .await
    .unwrap();
    let credentials = uplink::Credentials { agent_id: enrolled.agent_id.to_string(), agent_secret: enrolled.secret };

    let dir = tempfile::tempdir().unwrap();
    let (spool, _) =
        Spool::open(&dir.path().join("spool"), SpoolOptions { max_bytes: 1 << 22, segment_bytes: 4096 }).unwrap();
    let spool = Arc::new(Mutex::new(spool));
    let (durable_tx, durable) = watch::channel(0u64);
    append(&spool, &durable_tx, 4, 10_000);
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
    // A replica stored batches 1 and 2 and died before its acks reached
    // the agent: they are still unacked in the spool.
    let ingest = fleetban_server::ingest::Ingest::new(pool.clone());
    let agent_uuid: uuid::Uuid = credentials.agent_id.parse().unwrap();
    let stored = spool.lock().unwrap().read_batches(0, 2).unwrap();
    for batch in stored {
        ingest.store(agent_uuid, batch).await.unwrap();
    }
    assert_eq!(spool.lock().unwrap().acked_seq(), 0);
    let (_reports_tx, reports_rx) = tokio::sync::mpsc::channel(8);
    let stats = Arc::new(UplinkStats::default());
    let ring = Servers::new(vec![url.clone()], &credentials.agent_id).with_resolver(resolver);
    let ctx = UplinkContext {
        server: server_options,
        credentials,
        hostname: "mx.test".into(),
        addresses: vec![],
        spool: spool.clone(),
        durable,
        firewall: worker.handle(),
        local_blocks: reports_rx,
        on_policy: Box::new(|_| {}),
        on_allowlist: Box::new(|_| {}),
        on_revoked: Box::new(|_| {}),
        on_server_address: Arc::new(|_| {}),
        window: 2,
        stats: stats.clone(),
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let uplink = tokio::spawn(uplink::run_with(ctx, ring, async {
        let _ = stop_rx.await;
    }));

    wait_until("4 batches acked", || spool.lock().unwrap().acked_seq() == 4).await;
    assert!(stats.connected.load(Ordering::Relaxed));
    // Whichever replica it reached read the stored seq from the database
    // (`Welcome.last_acked_seq`): only batches 3 and 4 were sent.
    assert_eq!(stats.batches_sent.load(Ordering::Relaxed), 2);
    let rows: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 12);
    let first = stats.server();
    let on = addrs.iter().position(|a| first.contains(&a.to_string())).expect("the session names its address");
    assert!(first.starts_with(&url), "{first}");

    // Its server stops: the uplink moves to the name's other address.
    servers[on].take().unwrap().stop().await;
    append(&spool, &durable_tx, 4, 20_000);
    wait_until("the other address", || {
        stats.connected.load(Ordering::Relaxed) && stats.server().contains(&addrs[1 - on].to_string())
    })
    .await;
    wait_until("8 batches acked", || spool.lock().unwrap().acked_seq() == 8).await;
    assert!(lookups.load(Ordering::SeqCst) >= 2, "the name is resolved again at reconnects");

    // Exactly once across the two replicas.
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("select count(*), count(distinct remote_port) from events").fetch_one(&pool).await.unwrap();
    assert_eq!((rows, distinct), (24, 24));
    let batches: i64 = sqlx::query_scalar("select count(*) from agent_batches").fetch_one(&pool).await.unwrap();
    assert_eq!(batches, 8);

    // Back to the first: its Welcome's last_acked_seq comes from the
    // database, so the batches acked by the other replica are not resent.
    let sent_before = stats.batches_sent.load(Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind(addrs[on]).await.unwrap();
    servers[on] = Some(start_server(pool.clone(), listener, &tls_config).await);
    servers[1 - on].take().unwrap().stop().await;
    wait_until("the first address again", || {
        stats.connected.load(Ordering::Relaxed) && stats.server().contains(&addrs[on].to_string())
    })
    .await;
    append(&spool, &durable_tx, 1, 30_000);
    wait_until("9 batches acked", || spool.lock().unwrap().acked_seq() == 9).await;
    assert_eq!(stats.batches_sent.load(Ordering::Relaxed), sent_before + 1, "only the new batch was sent");
    let rows: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await.unwrap();
    assert_eq!(rows, 27);

    let _ = stop_tx.send(());
    uplink.await.unwrap();
    for server in servers.into_iter().flatten() {
        server.stop().await;
    }
}
