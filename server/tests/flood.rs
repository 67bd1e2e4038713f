//! Connection discipline against a real server (`serve::run` on
//! 127.0.0.1:0): a bounded flood of idle connections on both listeners and
//! slowloris clients on the HTTP listener, while an enrolled agent keeps
//! streaming batches and getting acks, a new agent can still open its
//! session, and `/healthz` keeps answering within 100 ms. The attackers
//! connect from other loopback addresses (127.0.0.2 to 127.0.0.5), the
//! agents and the health checks from 127.0.0.1.
//!
//! Also: repeated failed enrollments from one address are throttled without
//! touching the database, and the refused host name is logged escaped.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_client::AgentServiceClient;
use fleetban_proto::v1::server_frame::Frame as Out;
use fleetban_proto::v1::{AgentFrame, EnrollRequest, Event, EventBatch, EventKind, Hello, IpAddress, ServerFrame};
use fleetban_server::config::LimitsConfig;
use fleetban_server::serve::{self, Listeners, Options};
use fleetban_server::session::{AGENT_ID_HEADER, AGENT_SECRET_HEADER};
use fleetban_server::{auth, tls};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Streaming};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);
/// Idle connections opened against each listener.
const FLOOD_CONNECTIONS: usize = 1_500;
/// Slowloris connections against the HTTP listener.
const SLOWLORIS_CONNECTIONS: usize = 40;
/// The longest `/healthz` may take, connect to last byte.
const HEALTH_BUDGET: Duration = Duration::from_millis(100);

/// Limits small enough to reach in a test.
fn limits() -> LimitsConfig {
    LimitsConfig {
        grpc_max_connections: 1_000,
        grpc_max_connections_per_source: 100,
        // Four attacker addresses hold at most 32: a fifth host (the new
        // agent) finds room. Many more attacker addresses could fill the
        // pool; see SECURITY.md.
        grpc_max_unauthenticated: 48,
        grpc_max_unauthenticated_per_source: 8,
        grpc_auth_timeout_secs: 2,
        http_max_connections: 400,
        http_max_connections_per_source: 64,
        http_header_timeout_secs: 1,
        http_idle_timeout_secs: 40,
        ..LimitsConfig::default()
    }
}

/// Raises the soft descriptor limit so that the bounded flood fits.
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

struct TestServer {
    grpc: SocketAddr,
    http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), serve::Error>>,
}

impl TestServer {
    async fn start(pool: PgPool, limits: LimitsConfig) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let options = Options { limits, ..Options::default() };
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve::run(pool, options, Listeners { grpc, http }, async move {
            let _ = rx.await;
        }));
        TestServer { grpc: grpc_addr, http: http_addr, stop: Some(tx), handle }
    }

    async fn start_with(pool: PgPool, options: Options) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve::run(pool, options, Listeners { grpc, http }, async move {
            let _ = rx.await;
        }));
        TestServer { grpc: grpc_addr, http: http_addr, stop: Some(tx), handle }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.grpc)).unwrap().connect().await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }
}

fn ip(s: &str) -> IpAddress {
    s.parse::<IpAddr>().unwrap().into()
}

async fn enroll(pool: &PgPool, channel: Channel, hostname: &str) -> (Uuid, String) {
    let token = auth::create_enrollment_token(pool, 1, Duration::from_secs(60), "flood test").await.unwrap();
    let response = AgentServiceClient::new(channel)
        .enroll(EnrollRequest {
            token,
            hostname: hostname.into(),
            version: "0.1.0".into(),
            addresses: vec![ip("198.51.100.200")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (response.agent_id.parse().unwrap(), response.agent_secret)
}

/// An open agent session, past Welcome/Policy/Allowlist/Snapshot.
struct Session {
    tx: mpsc::Sender<AgentFrame>,
    rx: Streaming<ServerFrame>,
}

impl Session {
    async fn open(channel: Channel, id: Uuid, secret: &str, hostname: &str) -> Session {
        let (tx, rx) = mpsc::channel(16);
        let mut request = Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(AGENT_ID_HEADER, id.to_string().parse().unwrap());
        request.metadata_mut().insert(AGENT_SECRET_HEADER, secret.parse().unwrap());
        let rx = AgentServiceClient::new(channel).connect(request).await.unwrap().into_inner();
        let mut session = Session { tx, rx };
        session
            .send(Frame::Hello(Hello {
                agent_id: id.to_string(),
                version: "0.1.0-test".into(),
                hostname: hostname.into(),
                addresses: vec![ip("198.51.100.200")],
                blocklist_version: 0,
                next_seq: 1,
            }))
            .await;
        assert!(matches!(session.next().await, Out::Welcome(_)));
        loop {
            if let Out::Snapshot(_) = session.next().await {
                return session;
            }
        }
    }

    async fn send(&self, frame: Frame) {
        self.tx.send(AgentFrame { frame: Some(frame) }).await.unwrap();
    }

    async fn next(&mut self) -> Out {
        let frame = tokio::time::timeout(WAIT, self.rx.message()).await.expect("no frame in time");
        frame.expect("stream failed").expect("stream ended").frame.expect("empty frame")
    }

    /// Sends batch `seq` and waits for its ack; returns how long that took.
    async fn batch(&mut self, seq: u64) -> Duration {
        let started = Instant::now();
        let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let event = Event {
            time_ms: now_ms,
            kind: EventKind::Connect as i32,
            remote: Some(ip("192.0.2.7")),
            remote_port: 40_000,
            local_port: 25,
            raw: "H=(x) [192.0.2.7]:40000 flood test".into(),
            ..Default::default()
        };
        self.send(Frame::Batch(EventBatch { seq, events: vec![event], position: None, summaries: Vec::new() })).await;
        loop {
            if let Out::Ack(ack) = self.next().await {
                assert_eq!(ack.seq, seq);
                return started.elapsed();
            }
        }
    }
}

/// A connection from `source` (a loopback address other than 127.0.0.1).
async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    socket.connect(to).await
}

/// `GET /healthz` on a fresh connection; the time from connect to the whole
/// answer.
async fn healthz(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.expect("connect for /healthz");
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response)).await.expect("/healthz answers").unwrap();
    assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("ok\n"), "{response}");
    started.elapsed()
}

/// Waits until the server closes `stream` (EOF or reset); how long it took.
async fn closed_within(mut stream: TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Opens `n` idle connections to `to` from the attacker addresses, at most
/// `within`; returns the ones the kernel completed.
async fn flood(to: SocketAddr, n: usize, within: Duration) -> Vec<TcpStream> {
    let deadline = Instant::now() + within;
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        if Instant::now() > deadline {
            break;
        }
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 4) as u8);
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), connect_from(source, to)).await {
            streams.push(stream);
        }
    }
    streams
}

/// A slowloris client: one header byte every `every` until the server
/// closes the connection; returns when it did, from the first byte.
async fn slowloris(source: Ipv4Addr, to: SocketAddr, every: Duration, limit: Duration) -> Option<Duration> {
    let stream = connect_from(source, to).await.ok()?;
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    let writing = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\nhost: slow.example\r\nx-pad: ".iter().chain(std::iter::repeat(&b'a')) {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok();
    writing.abort();
    closed
}

async fn metrics(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The value of the sample `name{labels}` in a Prometheus exposition.
fn sample(text: &str, series: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn enrolled_agents_and_health_checks_outlast_a_connection_flood(pool: PgPool) {
    raise_fd_limit(8_192);
    let limits = limits();
    let server = TestServer::start(pool.clone(), limits.clone()).await;
    let (id_a, secret_a) = enroll(&pool, server.channel().await, "mx-a.test").await;
    let (id_b, secret_b) = enroll(&pool, server.channel().await, "mx-b.test").await;
    let mut agent = Session::open(server.channel().await, id_a, &secret_a, "mx-a.test").await;
    assert!(healthz(server.http).await < Duration::from_secs(1), "healthy before the flood");

    // The agent streams batches for the whole test and records each ack's
    // latency.
    let (stop_agent, mut agent_stop) = oneshot::channel::<()>();
    let acks = Arc::new(Mutex::new(Vec::<(Instant, Duration)>::new()));
    let agent_task = {
        let acks = acks.clone();
        tokio::spawn(async move {
            let mut seq = 1;
            loop {
                let latency = agent.batch(seq).await;
                acks.lock().unwrap().push((Instant::now(), latency));
                seq += 1;
                tokio::select! {
                    _ = &mut agent_stop => return seq - 1,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };

    // The flood: idle connections on both listeners and slowloris clients.
    let flood_started = Instant::now();
    let slow = (0..SLOWLORIS_CONNECTIONS)
        .map(|i| {
            let source = Ipv4Addr::new(127, 0, 0, 2 + (i % 4) as u8);
            tokio::spawn(slowloris(source, server.http, Duration::from_millis(250), Duration::from_secs(8)))
        })
        .collect::<Vec<_>>();
    let grpc_idle = flood(server.grpc, FLOOD_CONNECTIONS, Duration::from_secs(10)).await;
    let http_idle = flood(server.http, FLOOD_CONNECTIONS, Duration::from_secs(10)).await;
    let flood_secs = flood_started.elapsed().as_secs_f64();
    assert!(grpc_idle.len() >= FLOOD_CONNECTIONS / 2 && http_idle.len() >= FLOOD_CONNECTIONS / 2);

    // While the attackers hold or retry their connections: health checks are
    // fast, and a new agent session opens.
    let mut health = Vec::new();
    for _ in 0..10 {
        health.push(healthz(server.http).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session_b = tokio::time::timeout(WAIT, Session::open(server.channel().await, id_b, &secret_b, "mx-b.test"))
        .await
        .expect("a new agent session opens during the flood");

    // Every idle connection is closed by the server: at accept when over a
    // limit, else at its deadline (2 s for gRPC without a session, 1 s for
    // HTTP without a request).
    let grpc_closed = futures_util::future::join_all(
        grpc_idle.into_iter().map(|s| closed_within(s, Duration::from_secs(limits.grpc_auth_timeout_secs + 4))),
    )
    .await;
    let http_closed = futures_util::future::join_all(
        http_idle.into_iter().map(|s| closed_within(s, Duration::from_secs(limits.http_header_timeout_secs + 4))),
    )
    .await;
    let slow_closed: Vec<Option<Duration>> =
        futures_util::future::join_all(slow).await.into_iter().map(|r| r.unwrap()).collect();
    for _ in 0..5 {
        health.push(healthz(server.http).await);
    }

    let seqs = {
        let _ = stop_agent.send(());
        tokio::time::timeout(WAIT, agent_task).await.expect("the agent task ends").unwrap()
    };
    let acks = acks.lock().unwrap().clone();
    let during: Vec<&(Instant, Duration)> = acks.iter().filter(|(at, _)| *at >= flood_started).collect();
    let worst_ack = acks.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let worst_health = health.iter().max().copied().unwrap_or_default();
    let metrics = metrics(server.http).await;
    eprintln!(
        "flood: {} + {} idle connections in {flood_secs:.2} s, {SLOWLORIS_CONNECTIONS} slowloris; \
         {seqs} batches acked ({} during the flood), worst ack {worst_ack:?}; /healthz worst {worst_health:?}",
        grpc_closed.len(),
        http_closed.len(),
        during.len()
    );

    assert!(grpc_closed.iter().all(Option::is_some), "every idle gRPC connection was closed by the server");
    assert!(http_closed.iter().all(Option::is_some), "every idle HTTP connection was closed by the server");
    let slow_max = slow_closed.iter().map(|c| c.expect("every slowloris client was closed")).max().unwrap();
    assert!(
        slow_max <= Duration::from_secs(limits.http_header_timeout_secs + 2),
        "slowloris clients are closed at the header timeout, not held: {slow_max:?}"
    );
    assert!(during.len() >= 10, "acks kept arriving during the flood: {}", during.len());
    assert!(worst_ack < Duration::from_secs(2), "acks stayed prompt: {worst_ack:?}");
    assert!(health.iter().all(|d| *d < HEALTH_BUDGET), "/healthz within {HEALTH_BUDGET:?}: {health:?}");
    for series in [
        "fleetban_connections_refused_total{listener=\"grpc\",reason=\"unauthenticated_per_source\"}",
        "fleetban_connections_refused_total{listener=\"http\",reason=\"per_source\"}",
        "fleetban_connections_timed_out_total{listener=\"grpc\",phase=\"handshake\"}",
        "fleetban_connections_timed_out_total{listener=\"http\",phase=\"header\"}",
    ] {
        assert!(sample(&metrics, series) > 0.0, "{series} counted:\n{metrics}");
    }
    assert!(metrics.contains("fleetban_connections_open{listener=\"grpc\"}"), "{metrics}");
    drop(session_b);
    server.stop().await;
}

/// Captures what `tracing` writes on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn failed_enrollments_are_throttled_and_logged_escaped(pool: PgPool) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // The test runtime is single-threaded: the server's tasks log here too.
    let _guard = tracing::subscriber::set_default(subscriber);
    let limits = LimitsConfig { auth_failure_burst: 5, auth_failures_per_minute: 1, ..LimitsConfig::default() };
    let server = TestServer::start(pool.clone(), limits).await;
    let mut client = AgentServiceClient::new(server.channel().await);
    let forged = "mx.test\n2026-11-28T00:00:00Z  INFO fleetban_server: Agent enrolled.\x1b[2J";
    let mut codes = Vec::new();
    for _ in 0..20 {
        let request = EnrollRequest {
            token: "fbe_not-a-token".into(),
            hostname: forged.into(),
            version: "0.1.0".into(),
            addresses: vec![],
            ..Default::default()
        };
        codes.push(client.enroll(request).await.unwrap_err().code());
    }
    let unauthenticated = codes.iter().filter(|c| **c == Code::Unauthenticated).count();
    let throttled = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    assert_eq!(unauthenticated, 5, "the burst is answered normally: {codes:?}");
    assert_eq!(throttled, 15, "then the source is throttled: {codes:?}");
    // A valid enrollment from the throttled source is refused too, until the
    // bucket refills; one from elsewhere is not (covered by the unit tests).
    let token = auth::create_enrollment_token(&pool, 1, Duration::from_secs(60), "t").await.unwrap();
    let request = EnrollRequest { token, hostname: "ok.test".into(), version: "0.1.0".into(), ..Default::default() };
    assert_eq!(client.enroll(request).await.unwrap_err().code(), Code::ResourceExhausted);

    let metrics = metrics(server.http).await;
    assert!(sample(&metrics, "fleetban_agent_auth_throttled_total") >= 16.0, "{metrics}");
    server.stop().await;

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("Enrollment refused.")).collect();
    assert_eq!(refused.len(), 5, "one line per refusal before the throttle, none after:\n{log}");
    for line in &refused {
        assert!(
            line.contains(r"hostname=mx.test\n2026-11-28T00:00:00Z  INFO fleetban_server: Agent enrolled.\u{1b}[2J"),
            "{line}"
        );
    }
    assert!(!log.contains('\x1b'), "no escape sequence reaches the log");
    assert!(!log.lines().any(|l| l.starts_with("2026-11-28T00:00:00Z")), "no forged line:\n{log}");
    assert_eq!(log.matches("Throttling agent authentication").count(), 1, "{log}");
}

/// With TLS, the deadline covers the handshake too: idle connections and
/// ones that stop inside their ClientHello are closed, while an agent whose
/// session was accepted keeps its connection past the deadline.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn tls_handshakes_have_a_deadline_and_sessions_do_not(pool: PgPool) {
    raise_fd_limit(4_096);
    let dir = tempfile::tempdir().unwrap();
    let files = tls::pki_init(dir.path(), "localhost").unwrap();
    let config = fleetban_server::config::TlsConfig {
        cert_file: files.server_cert.clone(),
        key_file: files.server_key.clone(),
        client_ca_file: None,
    };
    let tls = tls::server_config(Some(&config), "0.0.0.0:0".parse().unwrap(), false).unwrap();
    let limits = LimitsConfig { grpc_auth_timeout_secs: 1, ..limits() };
    let server = TestServer::start_with(pool.clone(), Options { tls, limits, ..Options::default() }).await;
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&files.ca_cert).unwrap());
    let channel = Endpoint::from_shared(format!("https://{}", server.grpc))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (id, secret) = enroll(&pool, channel.clone(), "mx-tls.test").await;
    let mut agent = Session::open(channel, id, &secret, "mx-tls.test").await;
    let opened = Instant::now();

    let idle = flood(server.grpc, 200, Duration::from_secs(5)).await;
    let mut partial = Vec::new();
    for i in 0..20u8 {
        let mut stream = connect_from(Ipv4Addr::new(127, 0, 0, 2 + i % 4), server.grpc).await.unwrap();
        // A TLS record header announcing a ClientHello that never comes.
        stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
        partial.push(stream);
    }
    let closed = futures_util::future::join_all(
        idle.into_iter().chain(partial).map(|s| closed_within(s, Duration::from_secs(4))),
    )
    .await;
    assert!(closed.iter().all(Option::is_some), "every stalled handshake was closed");
    // The session outlives the 1 s deadline: its connection still carries
    // batches well after it.
    tokio::time::sleep_until((opened + Duration::from_millis(1_500)).into()).await;
    for seq in 1..=3 {
        assert!(agent.batch(seq).await < Duration::from_secs(2));
    }
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn failed_connects_are_throttled_per_source(pool: PgPool) {
    let limits = LimitsConfig { auth_failure_burst: 3, auth_failures_per_minute: 1, ..LimitsConfig::default() };
    let server = TestServer::start(pool.clone(), limits).await;
    let (id, secret) = enroll(&pool, server.channel().await, "mx-c.test").await;
    // Failures below the burst leave a correct agent alone.
    let connect = |id: String, secret: String| {
        let channel = server.channel();
        async move {
            let (_tx, rx) = mpsc::channel::<AgentFrame>(1);
            let mut request = Request::new(ReceiverStream::new(rx));
            if !id.is_empty() {
                request.metadata_mut().insert(AGENT_ID_HEADER, id.parse().unwrap());
            }
            request.metadata_mut().insert(AGENT_SECRET_HEADER, secret.parse().unwrap());
            AgentServiceClient::new(channel.await).connect(request).await.map(|_| ()).map_err(|s| s.code())
        }
    };
    assert_eq!(connect(id.to_string(), "wrong".into()).await, Err(Code::Unauthenticated));
    assert_eq!(connect(String::new(), "wrong".into()).await, Err(Code::Unauthenticated), "missing id");
    assert_eq!(connect(id.to_string(), secret.clone()).await, Ok(()));
    assert_eq!(connect(Uuid::new_v4().to_string(), "x".into()).await, Err(Code::Unauthenticated));
    // The burst of three is spent: even the right secret waits now.
    assert_eq!(connect(id.to_string(), "wrong".into()).await, Err(Code::ResourceExhausted));
    assert_eq!(connect(id.to_string(), secret).await, Err(Code::ResourceExhausted));
    server.stop().await;
}
