//! The uplink against an in-process gRPC server that speaks the session
//! protocol and keeps its "store" across restarts: batches are acked and
//! their spool segments deleted; after a server restart only the unacked
//! batches are sent again; a delta is applied and reported; a snapshot
//! replaces the firewall's state. (The same flows against the real
//! fleetban-server live in the workspace `tests/` crate.)

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetban_agent::firewall::dryrun::{DryRun, FILE_NAME, Record};
use fleetban_agent::firewall::reconcile::{FirewallStats, Reconciler};
use fleetban_agent::firewall::worker::{Worker, WorkerOptions};
use fleetban_agent::spool::{Spool, SpoolOptions};
use fleetban_agent::uplink::{self, Credentials, ServerOptions, TlsProblem, UplinkContext, UplinkError, UplinkStats};
use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use fleetban_proto::v1::server_frame::Frame as Out;
use fleetban_proto::v1::{
    Ack, AgentFrame, Allowlist, BlockEntry, BlocklistDelta, BlocklistSnapshot, EnrollRequest, EnrollResponse, Event,
    Hello, LocalBlock, ServerFrame, SourcePosition, Welcome,
};
use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(20);

/// What the fake server has seen and stored; survives restarts.
#[derive(Default)]
struct Store {
    stored: BTreeSet<u64>,
    received: Vec<u64>,
    hellos: Vec<Hello>,
    applied: Vec<(u64, u64)>,
    local_blocks: Vec<LocalBlock>,
    /// Ack batches (otherwise they are received and forgotten).
    ack: bool,
    /// Frames to push to the open session.
    push: Option<mpsc::Sender<Result<ServerFrame, Status>>>,
}

#[derive(Clone)]
struct Fake {
    store: Arc<Mutex<Store>>,
    kill: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl AgentService for Fake {
    async fn enroll(&self, _request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        // As the real server answers a bad token.
        Err(Status::unauthenticated("enrollment token is invalid, used up or expired"))
    }

    type ConnectStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Status>> + Send>>;

    async fn connect(&self, request: Request<Streaming<AgentFrame>>) -> Result<Response<Self::ConnectStream>, Status> {
        let md = request.metadata();
        if md.get(uplink::AGENT_ID_HEADER).is_none() || md.get(uplink::AGENT_SECRET_HEADER).is_none() {
            return Err(Status::unauthenticated("no credentials"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        let mut kill = self.kill.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    () = async { let _ = kill.wait_for(|k| *k).await; } => {
                        let _ = tx.send(Err(Status::unavailable("server restarting"))).await;
                        return;
                    }
                    frame = inbound.next() => frame,
                };
                let Some(Ok(frame)) = frame else { return };
                let reply = {
                    let mut store = store.lock().unwrap();
                    match frame.frame {
                        Some(Frame::Hello(hello)) => {
                            store.hellos.push(hello);
                            store.push = Some(tx.clone());
                            Some(Out::Welcome(Welcome {
                                server_version: "fake".into(),
                                last_acked_seq: store.stored.iter().next_back().copied().unwrap_or(0),
                                heartbeat_secs: 1,
                            }))
                        }
                        Some(Frame::Batch(batch)) => {
                            store.received.push(batch.seq);
                            if store.ack {
                                store.stored.insert(batch.seq);
                                Some(Out::Ack(Ack { seq: batch.seq, ..Ack::default() }))
                            } else {
                                None
                            }
                        }
                        Some(Frame::Applied(applied)) => {
                            store.applied.push((applied.blocklist_version, applied.firewall_entries));
                            None
                        }
                        Some(Frame::LocalBlock(block)) => {
                            store.local_blocks.push(block);
                            None
                        }
                        _ => None,
                    }
                };
                if let Some(reply) = reply
                    && tx.send(Ok(ServerFrame { frame: Some(reply) })).await.is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Server {
    kill: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_server(addr: SocketAddr, store: Arc<Mutex<Store>>) -> (Server, SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (kill, kill_rx) = watch::channel(false);
    let fake = Fake { store, kill: kill_rx };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (Server { kill, task }, addr)
}

impl Server {
    /// Drops every session with an error and stops listening.
    async fn crash(self) {
        let _ = self.kill.send(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn append(spool: &Arc<Mutex<Spool>>, durable: &watch::Sender<u64>, n: usize) {
    let mut spool = spool.lock().unwrap();
    for i in 0..n {
        let events: Vec<Event> =
            (0..8).map(|j| Event { raw: format!("line {i}/{j} {}", "x".repeat(600)), ..Event::default() }).collect();
        let position =
            SourcePosition { path: "/var/log/exim_mainlog".into(), fingerprint: 1, offset: i as u64, open_from: None };
        spool.append(&events, &position).unwrap();
    }
    spool.sync().unwrap();
    durable.send_replace(spool.durable_seq());
}

fn segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
        .count()
}

fn dryrun(dir: &std::path::Path) -> Vec<String> {
    let records: Vec<Record> = serde_json::from_slice(&std::fs::read(dir.join(FILE_NAME)).unwrap()).unwrap();
    records.into_iter().map(|r| r.cidr).collect()
}

fn block(id: i64, cidr: &str) -> BlockEntry {
    BlockEntry { block_id: id, cidr: Some(cidr.parse::<IpNet>().unwrap().into()), expires_at_ms: 0, reason: "t".into() }
}

async fn push(store: &Arc<Mutex<Store>>, frame: Out) {
    let tx = store.lock().unwrap().push.clone().expect("a session is open");
    tx.send(Ok(ServerFrame { frame: Some(frame) })).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_blocklists_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let (spool, _) = Spool::open(&spool_dir, SpoolOptions { max_bytes: 1 << 22, segment_bytes: 4096 }).unwrap();
    let spool = Arc::new(Mutex::new(spool));
    let (durable_tx, durable) = watch::channel(0u64);
    append(&spool, &durable_tx, 5);
    assert_eq!(segments(&spool_dir), 5);

    let store = Arc::new(Mutex::new(Store { ack: true, ..Store::default() }));
    let (server, addr) = start_server("127.0.0.1:0".parse().unwrap(), store.clone()).await;

    let firewall_stats = Arc::new(FirewallStats::default());
    let reconciler = Reconciler::new(
        Box::new(DryRun::new(dir.path().join(FILE_NAME))),
        vec![],
        Some(dir.path().into()),
        firewall_stats,
    );
    let (report_tx, report_rx) = mpsc::channel(16);
    let worker = Worker::start(
        reconciler,
        WorkerOptions {
            reconcile_interval: Duration::from_secs(60),
            reports: Some(report_tx.clone()),
            applied: None,
            started: None,
        },
    )
    .unwrap();
    let stats = Arc::new(UplinkStats::default());
    let peers: Arc<Mutex<Vec<std::net::IpAddr>>> = Arc::default();
    let excluded = fleetban_agent::service::Exclusions::new(vec![], worker.handle(), None);
    let ctx = UplinkContext {
        server: ServerOptions { server: format!("http://{addr}"), ca_file: None, insecure: false },
        credentials: Credentials {
            agent_id: "7d3b5c1e-0000-4000-8000-000000000001".into(),
            agent_secret: "secret".into(),
        },
        hostname: "mx.test".into(),
        addresses: vec!["198.51.100.200".parse().unwrap()],
        spool: spool.clone(),
        durable,
        firewall: worker.handle(),
        local_blocks: report_rx,
        on_policy: Box::new(|_| {}),
        on_allowlist: excluded.allowlist_handler(),
        on_revoked: Box::new(|_| {}),
        on_server_address: {
            let peers = peers.clone();
            let exclude = excluded.server_address_handler();
            Arc::new(move |ip| {
                peers.lock().unwrap().push(ip);
                exclude(ip);
            })
        },
        window: 3,
        stats: stats.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let uplink = tokio::spawn(uplink::run(ctx, async {
        let _ = stop_rx.await;
    }));

    // 1. Every batch is acked, in order, and the acked segments are deleted.
    wait_until("5 batches acked", || spool.lock().unwrap().acked_seq() == 5).await;
    assert_eq!(store.lock().unwrap().received, [1, 2, 3, 4, 5]);
    assert_eq!(segments(&spool_dir), 1, "acked segments are deleted (the newest is kept)");
    assert_eq!(spool.lock().unwrap().status().pending_batches, 0);
    {
        let store = store.lock().unwrap();
        let hello = &store.hellos[0];
        assert_eq!((hello.hostname.as_str(), hello.blocklist_version, hello.next_seq), ("mx.test", 0, 6));
        assert_eq!(hello.addresses.len(), 1);
    }
    // The live connection's peer is reported, to be excluded from blocks.
    assert_eq!(peers.lock().unwrap().first(), Some(&addr.ip()), "the server's address is reported");

    // 2. A snapshot is applied and reported.
    push(
        &store,
        Out::Snapshot(BlocklistSnapshot {
            version: 3,
            // The server's own address (the uplink's peer) is never applied.
            entries: vec![block(1, "192.0.2.1/32"), block(2, "192.0.2.2/32"), block(9, &format!("{}/32", addr.ip()))],
        }),
    )
    .await;
    wait_until("Applied 3", || store.lock().unwrap().applied.contains(&(3, 2))).await;
    assert_eq!(dryrun(dir.path()), ["192.0.2.1/32", "192.0.2.2/32"]);

    // 3. A delta is applied and reported.
    push(
        &store,
        Out::Delta(BlocklistDelta {
            from_version: 3,
            to_version: 4,
            added: vec![block(3, "192.0.2.3/32")],
            removed: vec![1],
        }),
    )
    .await;
    wait_until("Applied 4", || store.lock().unwrap().applied.contains(&(4, 2))).await;
    assert_eq!(dryrun(dir.path()), ["192.0.2.2/32", "192.0.2.3/32"]);

    // 3b. Deltas applied close together are reported once, with the latest
    // version, after the jittered delay (not one reply per delta).
    let reports_before = store.lock().unwrap().applied.len();
    let pushed = Instant::now();
    for (from, id) in [(4, 4), (5, 5), (6, 6)] {
        let added = vec![block(id, &format!("192.0.2.{id}/32"))];
        push(&store, Out::Delta(BlocklistDelta { from_version: from, to_version: from + 1, added, removed: vec![] }))
            .await;
    }
    wait_until("Applied 7", || store.lock().unwrap().applied.contains(&(7, 5))).await;
    assert!(pushed.elapsed() >= Duration::from_millis(300), "reported only after the delay");
    tokio::time::sleep(uplink::APPLIED_DELAY * 2).await;
    assert_eq!(
        store.lock().unwrap().applied[reports_before..],
        [(7, 5)],
        "three deltas in a row make one report of the last version"
    );

    // 4. A snapshot replaces the whole state.
    push(&store, Out::Snapshot(BlocklistSnapshot { version: 10, entries: vec![block(9, "198.51.100.0/24")] })).await;
    wait_until("Applied 10", || store.lock().unwrap().applied.contains(&(10, 1))).await;
    assert_eq!(dryrun(dir.path()), ["198.51.100.0/24"]);

    // 4b. The fleet's allowlist reaches the firewall: the part of the fleet
    // block inside it is taken out.
    push(&store, Out::Allowlist(Allowlist { ranges: vec!["198.51.100.0/25".parse::<IpNet>().unwrap().into()] })).await;
    wait_until("allowlist applied", || {
        std::fs::read(dir.path().join(FILE_NAME))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Vec<Record>>(&bytes).ok())
            .is_some_and(|records| records.iter().map(|r| r.cidr.as_str()).eq(["198.51.100.128/25"]))
    })
    .await;

    // 5. Local blocks are reported.
    report_tx
        .send(LocalBlock {
            cidr: Some("203.0.113.9/32".parse::<IpNet>().unwrap().into()),
            reason: "conn_rate".into(),
            ..LocalBlock::default()
        })
        .await
        .unwrap();
    wait_until("LocalBlock", || store.lock().unwrap().local_blocks.len() == 1).await;

    // 6. The server stops acking, receives 6..8, and crashes before storing.
    store.lock().unwrap().ack = false;
    append(&spool, &durable_tx, 3);
    wait_until("6..8 received", || store.lock().unwrap().received.ends_with(&[6, 7, 8])).await;
    assert_eq!(stats.batches_sent.load(std::sync::atomic::Ordering::Relaxed), 8);
    server.crash().await;
    {
        let mut store = store.lock().unwrap();
        store.ack = true;
        store.received.clear();
    }
    // While it is down, one more batch is spooled.
    append(&spool, &durable_tx, 1);
    let (server, _) = start_server(addr, store.clone()).await;
    wait_until("9 acked after restart", || spool.lock().unwrap().acked_seq() == 9).await;
    {
        let store = store.lock().unwrap();
        assert_eq!(store.received, [6, 7, 8, 9], "only the unacked batches are sent again");
        assert_eq!(store.hellos.last().unwrap().blocklist_version, 10, "the reconnect reports the version held");
        assert_eq!(store.stored.len(), 9);
    }
    assert!(stats.reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 1);

    stop_tx.send(()).unwrap();
    tokio::time::timeout(WAIT, uplink).await.expect("uplink stops").unwrap();
    drop(report_tx);
    drop(excluded);
    worker.join();
    server.crash().await;
}

#[tokio::test]
async fn tls_and_enrollment_errors_say_what_to_do() {
    // A server whose certificate no CA of the agent's signed.
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (certified.cert.pem(), certified.signing_key.serialize_pem());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_kill, kill_rx) = watch::channel(false);
    let fake = Fake { store: Arc::default(), kill: kill_rx };
    let tls =
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(&cert_pem, key_pem));
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(AgentServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    let url = format!("https://localhost:{port}");
    let mut options = ServerOptions { server: url.clone(), ca_file: None, insecure: false };
    let error = uplink::enroll(&options, "fbe_x", "mx.test", &[]).await.unwrap_err();
    assert!(matches!(error, UplinkError::Connect { tls: Some(TlsProblem::UnknownIssuer), .. }), "{error}");
    let hint = error.hint(&options, true).unwrap();
    assert!(hint.contains("`ca_file`") && hint.contains(&url), "{hint}");

    // With the CA that signed it the connection works, and the refused token
    // is named as such.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert_pem).unwrap();
    options.ca_file = Some(ca.clone());
    let error = uplink::enroll(&options, "fbe_x", "mx.test", &[]).await.unwrap_err();
    assert!(error.is_auth_failure(), "{error}");

    // `fleetban-agent enroll` prints the server's reason once, with the fix.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("server = \"{url}\"\nca_file = \"{}\"\nstate_dir = \"{}\"\n", ca.display(), dir.path().display()),
    )
    .unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban-agent"))
        .args(["enroll", "--token", "fbe_x", "--config", config.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(stderr.matches("enrollment token is invalid").count(), 1, "printed once: {stderr}");
    assert!(stderr.contains("fleetban-server enroll-token create"), "{stderr}");
    server.abort();
}
