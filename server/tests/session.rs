//! The agent session over real loopback gRPC: enrollment, authentication,
//! exactly-once ingest, refused frames, blocklist catch-up and push across
//! two server processes, graceful shutdown, TLS.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_client::AgentServiceClient;
use fleetban_proto::v1::server_frame::Frame as Out;
use fleetban_proto::v1::{
    AgentFrame, EnrollRequest, Event, EventBatch, EventKind, Heartbeat, Hello, IpAddress, LocalBlock, ServerFrame,
};
use fleetban_server::correlate::CorrelateConfig;
use fleetban_server::push::Hub;
use fleetban_server::serve::{self, Listeners, Options};
use fleetban_server::session::{AGENT_ID_HEADER, AGENT_SECRET_HEADER, Stats};
use fleetban_server::{auth, blocks, tls};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status, Streaming};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

struct TestServer {
    addr: SocketAddr,
    stats: Arc<Stats>,
    hub: Hub,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), serve::Error>>,
}

impl TestServer {
    async fn start(pool: PgPool) -> Self {
        Self::start_with(pool, Options::default()).await
    }

    async fn start_with(pool: PgPool, options: Options) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let (stats, hub) = (options.stats.clone(), options.hub.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve::run(pool, options, Listeners { grpc, http }, async move {
            let _ = rx.await;
        }));
        TestServer { addr, stats, hub, stop: Some(tx), handle }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.handle).await.expect("server stops in time").unwrap().unwrap();
    }
}

/// A simulated agent: an open `Connect` stream.
struct Agent {
    tx: mpsc::Sender<AgentFrame>,
    rx: Streaming<ServerFrame>,
    /// `Policy` frames received so far (kept aside so that tests can read
    /// the other frames in order).
    policies: Vec<fleetban_proto::v1::Policy>,
    /// `Allowlist` frames received so far, likewise.
    allowlists: Vec<fleetban_proto::v1::Allowlist>,
}

impl Agent {
    async fn connect(channel: Channel, id: &str, secret: &str) -> Result<Agent, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut request = Request::new(ReceiverStream::new(rx));
        if !id.is_empty() {
            request.metadata_mut().insert(AGENT_ID_HEADER, id.parse().unwrap());
        }
        if !secret.is_empty() {
            request.metadata_mut().insert(AGENT_SECRET_HEADER, secret.parse().unwrap());
        }
        let rx = AgentServiceClient::new(channel).connect(request).await?.into_inner();
        Ok(Agent { tx, rx, policies: Vec::new(), allowlists: Vec::new() })
    }

    async fn send(&self, frame: Frame) {
        self.tx.send(AgentFrame { frame: Some(frame) }).await.unwrap();
    }

    async fn hello(&mut self, id: Uuid, version: u64) -> u64 {
        self.send(Frame::Hello(Hello {
            agent_id: id.to_string(),
            version: "0.1.0-test".into(),
            hostname: "mx.test".into(),
            addresses: vec![ip("198.51.100.200")],
            blocklist_version: version,
            next_seq: 1,
        }))
        .await;
        let last_acked = match self.next().await {
            Out::Welcome(w) => w.last_acked_seq,
            other => panic!("expected Welcome, got {other:?}"),
        };
        // The fleet's IPv6 block prefix follows the Welcome, before any
        // blocklist frame.
        match tokio::time::timeout(WAIT, self.rx.message()).await.expect("no frame in time") {
            Ok(Some(ServerFrame { frame: Some(Out::Policy(p)) })) => {
                assert_eq!(p.ipv6_block_prefix, 64, "the server's default ipv6_block_prefix");
                assert_eq!(p.conn_rate, 0, "thresholds the server does not set stay zero (keep the agent's)");
                self.policies.push(p);
            }
            other => panic!("expected Policy after Welcome, got {other:?}"),
        }
        // Then the fleet's allowlist, still before any blocklist frame.
        match tokio::time::timeout(WAIT, self.rx.message()).await.expect("no frame in time") {
            Ok(Some(ServerFrame { frame: Some(Out::Allowlist(a)) })) => self.allowlists.push(a),
            other => panic!("expected Allowlist after Policy, got {other:?}"),
        }
        last_acked
    }

    /// Skips pushed frames until an ack; returns its seq.
    async fn until_ack(&mut self) -> u64 {
        loop {
            if let Out::Ack(a) = self.next().await {
                return a.seq;
            }
        }
    }

    async fn next(&mut self) -> Out {
        self.try_next().await.unwrap_or_else(|s| panic!("stream failed: {s:?}")).expect("stream ended")
    }

    async fn try_next(&mut self) -> Result<Option<Out>, Status> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.rx.message()).await.expect("no frame in time")?;
            match frame.map(|f| f.frame.expect("empty server frame")) {
                Some(Out::Policy(p)) => self.policies.push(p),
                Some(Out::Allowlist(a)) => self.allowlists.push(a),
                other => return Ok(other),
            }
        }
    }

    /// Waits for a delta or snapshot that reaches `version`; returns the
    /// block ids added on the way.
    async fn until_version(&mut self, version: u64) -> Vec<i64> {
        let mut added = Vec::new();
        loop {
            match self.next().await {
                Out::Delta(d) => {
                    added.extend(d.added.iter().map(|e| e.block_id));
                    if d.to_version >= version {
                        return added;
                    }
                }
                Out::Snapshot(s) => {
                    added.extend(s.entries.iter().map(|e| e.block_id));
                    if s.version >= version {
                        return added;
                    }
                }
                _ => {}
            }
        }
    }
}

fn ip(s: &str) -> IpAddress {
    s.parse::<std::net::IpAddr>().unwrap().into()
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn event(kind: EventKind, remote: &str) -> Event {
    Event {
        time_ms: now_ms(),
        kind: kind as i32,
        remote: Some(ip(remote)),
        remote_port: 40_000,
        local_port: 25,
        raw: format!("H=(x) [{remote}]:40000 test line"),
        ..Default::default()
    }
}

fn batch(seq: u64, events: Vec<Event>) -> Frame {
    Frame::Batch(EventBatch { seq, events, position: None, summaries: Vec::new() })
}

/// Enrolls an agent through the `Enroll` RPC, as a host of its own (a name
/// and host id of its own: names are unique in the fleet).
async fn enroll(pool: &PgPool, channel: Channel) -> (Uuid, String) {
    let token = auth::create_enrollment_token(pool, 1, Duration::from_secs(60), "test").await.unwrap();
    let host = Uuid::new_v4().simple().to_string();
    let response = AgentServiceClient::new(channel)
        .enroll(EnrollRequest {
            token,
            hostname: "mx.test".into(),
            version: "0.1.0".into(),
            addresses: vec![ip("198.51.100.200")],
            name: format!("mx-{host}"),
            host_id: host,
        })
        .await
        .unwrap()
        .into_inner();
    (response.agent_id.parse().unwrap(), response.agent_secret)
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Creates a manual block through the blocklist store; returns (block id,
/// version).
async fn add_block(pool: &PgPool, cidr: &str) -> (i64, u64) {
    let new = blocks::NewBlock {
        cidr: cidr.parse().unwrap(),
        reason: "manual".into(),
        source: blocks::BlockSource::Manual,
        evidence: serde_json::json!({}),
        ttl: Some(Duration::from_secs(3600)),
        created_by: Some("test".into()),
        force: false,
    };
    let block = blocks::create(pool, &CorrelateConfig::default(), new).await.unwrap();
    (block.id, blocks::current_version(pool).await.unwrap())
}

async fn remove_block(pool: &PgPool, id: i64) -> u64 {
    blocks::revoke(pool, id, "test").await.unwrap().expect("block existed");
    blocks::current_version(pool).await.unwrap()
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn enrolled_agent_batches_are_acked_and_stored_exactly_once(pool: PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    assert_eq!(agent.hello(id, 0).await, 0);
    assert!(matches!(agent.next().await, Out::Snapshot(s) if s.version == 0 && s.entries.is_empty()));

    let mut events = vec![event(EventKind::AuthFailed, "192.0.2.7"), event(EventKind::Connect, "192.0.2.8")];
    events.push(Event { time_ms: now_ms() + 3_600_000, ..event(EventKind::Connect, "192.0.2.9") });
    agent.send(batch(1, events.clone())).await;
    // The agent is told why: one event an hour ahead of the server's clock.
    let Out::Ack(ack) = agent.next().await else { panic!("expected an Ack") };
    assert_eq!((ack.seq, ack.rejected_events), (1, 1));
    let reasons: Vec<(&str, u32)> = ack.rejections.iter().map(|r| (r.reason.as_str(), r.events)).collect();
    assert_eq!(reasons, [("in_future", 1)], "{ack:?}");
    assert!(ack.rejections[0].detail.contains("clock"), "{ack:?}");
    // The ack was "lost": the agent resends the same batch.
    agent.send(batch(1, events)).await;
    assert!(matches!(agent.next().await, Out::Ack(a) if a.seq == 1));
    // A batch invalid as a whole is refused, and the session goes on.
    agent.send(batch(2, vec![event(EventKind::Connect, "192.0.2.1"); 10_001])).await;
    assert!(matches!(agent.next().await, Out::Nack(n) if n.seq == 2 && n.reason.contains("10000")));
    agent.send(batch(3, vec![event(EventKind::Lost, "2001:db8::5")])).await;
    assert!(matches!(agent.next().await, Out::Ack(a) if a.seq == 3 && a.rejected_events == 0));
    agent.send(Frame::Heartbeat(Heartbeat { blocklist_version: 0, firewall_entries: 7, pending_batches: 0 })).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(&pool, "select firewall_entries from agents").await != 7 {
        assert!(tokio::time::Instant::now() < deadline, "heartbeat not recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    assert_eq!(count(&pool, "select count(*) from events").await, 3, "the resent batch was stored twice");
    assert_eq!(count(&pool, "select count(*) from agent_batches").await, 2);
    assert_eq!(count(&pool, "select count(*) from offender_hosts where address = '192.0.2.7'").await, 1);
    assert_eq!(Stats::get(&server.stats.batches_duplicate), 1);
    assert_eq!(Stats::get(&server.stats.events_rejected), 1);
    assert_eq!(Stats::get(&server.stats.batches_refused), 1);

    // Reconnecting: the Welcome says what is stored, the row says connected.
    drop(agent);
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    assert_eq!(agent.hello(id, 0).await, 3);
    let (connected, version, entries): (bool, String, i64) =
        sqlx::query_as("select connected, version, firewall_entries from agents where id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(connected);
    assert_eq!((version.as_str(), entries), ("0.1.0-test", 7));
    drop(agent);
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(&pool, "select count(*) from agents where connected").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "a closed session left the agent connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn unauthenticated_wrong_secret_and_revoked_agents_are_refused(pool: PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    let refused = |r: Result<Agent, Status>| match r {
        Ok(_) => panic!("session accepted"),
        Err(status) => {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert!(!status.message().contains(&secret), "secret echoed");
        }
    };
    refused(Agent::connect(server.channel().await, "", "").await);
    refused(Agent::connect(server.channel().await, &id.to_string(), "").await);
    refused(Agent::connect(server.channel().await, "not-a-uuid", &secret).await);
    refused(Agent::connect(server.channel().await, &id.to_string(), "fbs_wrong").await);
    refused(Agent::connect(server.channel().await, &Uuid::new_v4().to_string(), &secret).await);
    let bad_token = AgentServiceClient::new(server.channel().await)
        .enroll(EnrollRequest { token: "fbe_nope".into(), hostname: "h".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), Code::Unauthenticated);

    // A live session of an agent that gets revoked ends at its next report.
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    agent.next().await; // snapshot
    sqlx::query("update agents set revoked_at = now()").execute(&pool).await.unwrap();
    // The revocation may already have closed the session (its notification
    // ends it at once); then the heartbeat finds the stream gone.
    let _ = agent.tx.send(AgentFrame { frame: Some(Frame::Heartbeat(Heartbeat::default())) }).await;
    let status = agent.try_next().await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    refused(Agent::connect(server.channel().await, &id.to_string(), &secret).await);
    assert_eq!(Stats::get(&server.stats.auth_refused), 7);
    server.stop().await;
}

/// Sends raw bytes as request messages, to forge frames no honest client
/// would encode.
#[derive(Debug, Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct FrameDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for FrameDecoder {
    type Item = ServerFrame;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<ServerFrame>, Status> {
        use prost::Message;
        ServerFrame::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ServerFrame;
    type Encoder = RawEncoder;
    type Decoder = FrameDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> FrameDecoder {
        FrameDecoder
    }
}

/// Opens a session that sends `frames` as raw bytes; returns how the server
/// ended it.
async fn raw_session(channel: Channel, id: Uuid, secret: &str, frames: Vec<Vec<u8>>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = Request::new(tokio_stream::iter(frames).chain(tokio_stream::pending()));
    request.metadata_mut().insert(AGENT_ID_HEADER, id.to_string().parse().unwrap());
    request.metadata_mut().insert(AGENT_SECRET_HEADER, secret.parse().unwrap());
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/fleetban.v1.AgentService/Connect");
    let mut rx = grpc.streaming(request, path, RawCodec).await.unwrap().into_inner();
    loop {
        match tokio::time::timeout(WAIT, rx.message()).await.expect("server did not end the session") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("session ended without an error status"),
            Err(status) => return status,
        }
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn oversized_and_malformed_frames_are_refused_while_a_good_agent_goes_on(pool: PgPool) {
    use prost::Message;
    let server = TestServer::start(pool.clone()).await;
    let (good_id, good_secret) = enroll(&pool, server.channel().await).await;
    let (bad_id, bad_secret) = enroll(&pool, server.channel().await).await;
    let mut good = Agent::connect(server.channel().await, &good_id.to_string(), &good_secret).await.unwrap();
    good.hello(good_id, 0).await;
    good.next().await;
    good.send(batch(1, vec![event(EventKind::AuthFailed, "192.0.2.7")])).await;
    assert!(matches!(good.next().await, Out::Ack(a) if a.seq == 1));

    let hello = AgentFrame {
        frame: Some(Frame::Hello(Hello { agent_id: bad_id.to_string(), hostname: "bad".into(), ..Default::default() })),
    }
    .encode_to_vec();
    // Over 4 MiB: 300 events with 15 KiB raw lines each.
    let big_event = Event { raw: "x".repeat(15 * 1024), ..event(EventKind::Connect, "192.0.2.1") };
    let oversized = AgentFrame { frame: Some(batch(1, vec![big_event; 300])) }.encode_to_vec();
    assert!(oversized.len() > 4 * 1024 * 1024);
    let status = raw_session(server.channel().await, bad_id, &bad_secret, vec![hello.clone(), oversized]).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Not a protobuf message at all (a truncated length-delimited field).
    let garbage = vec![0x12, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3];
    let status = raw_session(server.channel().await, bad_id, &bad_secret, vec![hello, garbage]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(Stats::get(&server.stats.frames_rejected), 2);

    // A local block with an impossible range is refused with a Nack only.
    good.send(Frame::LocalBlock(LocalBlock {
        cidr: Some(fleetban_proto::v1::Cidr { address: Some(ip("192.0.2.1")), prefix_len: 40 }),
        ..Default::default()
    }))
    .await;
    assert!(matches!(good.next().await, Out::Nack(n) if n.reason.contains("cidr")));
    good.send(batch(2, vec![event(EventKind::AuthFailed, "192.0.2.7")])).await;
    assert!(matches!(good.next().await, Out::Ack(a) if a.seq == 2));
    assert_eq!(count(&pool, "select count(*) from events").await, 2);
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn reconnecting_agent_gets_exactly_the_missing_delta_or_a_snapshot(pool: PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    let (b1, v1) = add_block(&pool, "192.0.2.1/32").await;
    let (b2, _) = add_block(&pool, "192.0.2.2/32").await;
    let (b3, _) = add_block(&pool, "2001:db8:1::/64").await;
    let v4 = remove_block(&pool, b1).await;

    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, v1).await;
    // The operator's removal of b1 is announced ahead of the delta, so the
    // agent drops its own local block of that range too.
    let revoked_ids = |frame: Out| match frame {
        Out::Revocations(r) => r.revocations.iter().map(|r| r.block_id).collect::<Vec<_>>(),
        other => panic!("expected revocations, got {other:?}"),
    };
    assert_eq!(revoked_ids(agent.next().await), vec![b1]);
    match agent.next().await {
        Out::Delta(d) => {
            assert_eq!((d.from_version, d.to_version), (v1, v4));
            let mut added: Vec<i64> = d.added.iter().map(|e| e.block_id).collect();
            added.sort();
            assert_eq!(added, vec![b2, b3]);
            assert_eq!(d.removed, vec![b1]);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    drop(agent);

    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    assert_eq!(revoked_ids(agent.next().await), vec![b1], "a snapshot brings recent revocations along");
    match agent.next().await {
        Out::Snapshot(s) => {
            assert_eq!(s.version, v4);
            let mut ids: Vec<i64> = s.entries.iter().map(|e| e.block_id).collect();
            ids.sort();
            assert_eq!(ids, vec![b2, b3]);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    // Up to date: nothing is sent, then live changes arrive as deltas.
    let (b5, v5) = add_block(&pool, "203.0.113.0/25").await;
    match agent.next().await {
        Out::Delta(d) => {
            assert_eq!((d.from_version, d.to_version), (v4, v5));
            assert_eq!(d.added.iter().map(|e| e.block_id).collect::<Vec<_>>(), vec![b5]);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    // A live revocation: announced, then the delta that removes the block.
    let v6 = remove_block(&pool, b5).await;
    assert_eq!(revoked_ids(agent.next().await), vec![b5]);
    match agent.next().await {
        Out::Delta(d) => assert_eq!((d.to_version, d.removed.clone()), (v6, vec![b5])),
        other => panic!("expected a delta, got {other:?}"),
    }
    server.stop().await;
}

/// Reads frames until an `Allowlist` that differs from `previous` arrives
/// (the listener sends the unchanged list once more after it starts
/// listening, to cover changes it may have missed); returns its ranges.
async fn next_allowlist(agent: &mut Agent, previous: &[&str]) -> Vec<String> {
    loop {
        let frame = tokio::time::timeout(WAIT, agent.rx.message()).await.expect("no allowlist in time").unwrap();
        if let Some(ServerFrame { frame: Some(Out::Allowlist(a)) }) = frame {
            let ranges: Vec<String> = a.ranges.iter().map(|c| ipnet::IpNet::try_from(c).unwrap().to_string()).collect();
            if ranges != previous {
                return ranges;
            }
        }
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn agents_receive_the_allowlist_at_hello_and_on_every_change(pool: PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    sqlx::query("insert into allowlist (cidr, note) values ('198.51.100.0/25', 'partner')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "insert into allowlist (cidr, note, expires_at) values ('192.0.2.0/24', 'old', now() - interval '1 hour')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    let at_hello: Vec<String> =
        agent.allowlists[0].ranges.iter().map(|c| ipnet::IpNet::try_from(c).unwrap().to_string()).collect();
    assert_eq!(at_hello, ["198.51.100.0/25"], "live entries only");

    sqlx::query("insert into allowlist (cidr, note) values ('2001:db8:a::/48', 'office')")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(next_allowlist(&mut agent, &["198.51.100.0/25"]).await, ["198.51.100.0/25", "2001:db8:a::/48"]);
    sqlx::query("delete from allowlist where cidr = '198.51.100.0/25'").execute(&pool).await.unwrap();
    assert_eq!(next_allowlist(&mut agent, &["198.51.100.0/25", "2001:db8:a::/48"]).await, ["2001:db8:a::/48"]);
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn block_through_one_server_reaches_agents_of_another_across_listener_loss(pool: PgPool) {
    // Two server processes: separate pools (so separate LISTEN connections)
    // on one database.
    let other_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let one = TestServer::start(pool.clone()).await;
    let two = TestServer::start(other_pool.clone()).await;
    let (id_a, secret_a) = enroll(&pool, one.channel().await).await;
    let (id_b, secret_b) = enroll(&pool, two.channel().await).await;
    let mut a = Agent::connect(one.channel().await, &id_a.to_string(), &secret_a).await.unwrap();
    let mut b = Agent::connect(two.channel().await, &id_b.to_string(), &secret_b).await.unwrap();
    a.hello(id_a, 0).await;
    b.hello(id_b, 0).await;
    a.next().await;
    b.next().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while one.hub.stats().listens < 1 || two.hub.stats().listens < 1 {
        assert!(tokio::time::Instant::now() < deadline, "listeners did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (b1, v1) = add_block(&other_pool, "192.0.2.10/32").await;
    assert_eq!(a.until_version(v1).await, vec![b1]);
    assert_eq!(b.until_version(v1).await, vec![b1]);

    // Kill both LISTEN connections, and change the blocklist while they are
    // gone.
    let killed: i64 = count(
        &pool,
        "select count(pg_terminate_backend(pid)) from pg_stat_activity \
         where datname = current_database() and query ilike 'listen%' and pid <> pg_backend_pid()",
    )
    .await;
    assert_eq!(killed, 2, "expected one LISTEN connection per server");
    let (b2, v2) = add_block(&pool, "192.0.2.11/32").await;
    let started = tokio::time::Instant::now();
    assert_eq!(a.until_version(v2).await, vec![b2]);
    assert_eq!(b.until_version(v2).await, vec![b2]);
    assert!(started.elapsed() < fleetban_server::push::POLL_INTERVAL, "caught up only by the slow poll");
    let deadline = tokio::time::Instant::now() + WAIT;
    while one.hub.stats().listens < 2 || two.hub.stats().listens < 2 {
        assert!(tokio::time::Instant::now() < deadline, "listeners did not reconnect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // After the reconnection, notifications flow again.
    let (b3, v3) = add_block(&other_pool, "203.0.113.0/24").await;
    assert_eq!(a.until_version(v3).await, vec![b3]);
    assert_eq!(b.until_version(v3).await, vec![b3]);
    one.stop().await;
    two.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn shutdown_acks_in_flight_batches_and_closes_sessions(pool: PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    agent.next().await;
    for seq in 1..=5 {
        agent.send(batch(seq, vec![event(EventKind::Connect, "192.0.2.1"); 100])).await;
    }
    let TestServer { stop, handle, .. } = server;
    stop.unwrap().send(()).unwrap();
    let mut acked = Vec::new();
    while let Some(frame) = agent.try_next().await.unwrap() {
        if let Out::Ack(a) = frame {
            acked.push(a.seq);
        }
    }
    tokio::time::timeout(WAIT, handle).await.expect("server stops").unwrap().unwrap();
    assert_eq!(acked, vec![1, 2, 3, 4, 5], "in-flight batches must be stored and acked before closing");
    assert_eq!(count(&pool, "select count(*) from events").await, 500);
    assert_eq!(count(&pool, "select count(*) from agents where connected").await, 0);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn tls_listener_serves_agents_that_trust_the_pki_ca(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let files = tls::pki_init(dir.path(), "localhost").unwrap();
    let config = fleetban_server::config::TlsConfig {
        cert_file: files.server_cert.clone(),
        key_file: files.server_key.clone(),
        client_ca_file: None,
    };
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let tls = tls::server_config(Some(&config), any, false).unwrap();
    let server = TestServer::start_with(pool.clone(), Options { tls, ..Default::default() }).await;
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(&files.ca_cert).unwrap());
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (id, secret) = enroll(&pool, channel.clone()).await;
    let mut agent = Agent::connect(channel, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    // A plaintext client cannot talk to the TLS listener.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await;
    if let Ok(plain) = plain {
        let r = AgentServiceClient::new(plain).enroll(EnrollRequest::default()).await;
        assert!(r.is_err());
    }
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn local_blocks_and_fleet_evidence_become_fleet_blocks_pushed_to_agents(pool: PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (id_a, secret_a) = enroll(&pool, server.channel().await).await;
    let (id_b, secret_b) = enroll(&pool, server.channel().await).await;
    let mut a = Agent::connect(server.channel().await, &id_a.to_string(), &secret_a).await.unwrap();
    let mut b = Agent::connect(server.channel().await, &id_b.to_string(), &secret_b).await.unwrap();
    a.hello(id_a, 0).await;
    b.hello(id_b, 0).await;
    a.next().await;
    b.next().await;

    // Agent A saw slot exhaustion and blocked an address itself.
    let cidr: ipnet::IpNet = "203.0.113.66/32".parse().unwrap();
    a.send(Frame::LocalBlock(LocalBlock {
        cidr: Some(cidr.into()),
        reason: "slot_exhaustion".into(),
        evidence: "held 60 of 100 slots".into(),
        time_ms: now_ms(),
        ttl_secs: 600,
        shadow: false,
    }))
    .await;
    let entry = loop {
        if let Out::Delta(d) = b.next().await
            && let Some(e) = d.added.into_iter().next()
        {
            break e;
        }
    };
    assert_eq!(ipnet::IpNet::try_from(entry.cidr.as_ref().unwrap()).unwrap(), cidr);
    let source: String = sqlx::query_scalar("select source from blocks where id = $1")
        .bind(entry.block_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(source, "agent");

    // Both agents see a distributed brute force from one address, below
    // each host's own threshold (10) but above the fleet's (15): a fleet
    // block. (One failure on each, an office NAT's typos, would not be.)
    let failures = || (0..8).map(|_| event(EventKind::AuthFailed, "198.51.100.9")).collect::<Vec<_>>();
    a.send(batch(1, failures())).await;
    assert_eq!(a.until_ack().await, 1);
    b.send(batch(1, failures())).await;
    let fleet: ipnet::IpNet = "198.51.100.9/32".parse().unwrap();
    loop {
        if let Out::Delta(d) = a.next().await
            && d.added.iter().any(|e| ipnet::IpNet::try_from(e.cidr.as_ref().unwrap()).unwrap() == fleet)
        {
            break;
        }
    }
    let source: String =
        sqlx::query_scalar("select source from blocks where cidr = '198.51.100.9/32'").fetch_one(&pool).await.unwrap();
    assert_eq!(source, "auto");
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn silent_session_is_detected_and_cleaned_up(pool: PgPool) {
    let options = Options { heartbeat: Duration::from_secs(1), ..Default::default() };
    let server = TestServer::start_with(pool.clone(), options).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    agent.next().await;
    assert_eq!(count(&pool, "select count(*) from agents where connected").await, 1);
    // The agent keeps its stream open but sends nothing: after three
    // heartbeat intervals the server ends the session.
    let started = tokio::time::Instant::now();
    let status = agent.try_next().await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_secs(2), "ended too early: {:?}", started.elapsed());
    let deadline = tokio::time::Instant::now() + WAIT;
    while count(&pool, "select count(*) from agents where connected").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "a dead session left the agent connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(Stats::get(&server.stats.sessions_open), 0);
    server.stop().await;
}

fn local_block(cidr: &str, ttl_secs: u32) -> Frame {
    let cidr: ipnet::IpNet = cidr.parse().unwrap();
    Frame::LocalBlock(LocalBlock {
        cidr: Some(cidr.into()),
        reason: "conn_rate".into(),
        evidence: "forged".into(),
        time_ms: now_ms(),
        ttl_secs,
        shadow: false,
    })
}

async fn block_count(pool: &PgPool, cidr: &str) -> i64 {
    sqlx::query_scalar("select count(*) from blocks where cidr = $1::cidr").bind(cidr).fetch_one(pool).await.unwrap()
}

/// An agent whose credentials were stolen is trusted only within limits: it
/// cannot block ranges, set TTLs, exempt arbitrary addresses from blocks, or
/// make the server acknowledge the real agent's spool.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_hostile_agent_is_held_to_the_trust_limits(pool: PgPool) {
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;

    // The real agent stores batches 1..=3.
    let mut real = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    assert_eq!(real.hello(id, 0).await, 0);
    for seq in 1..=3 {
        real.send(batch(seq, vec![event(EventKind::Connect, "192.0.2.7")])).await;
        assert_eq!(real.until_ack().await, seq);
    }
    drop(real);

    // The hostile agent declares 1,024 addresses of its choosing.
    let mut hostile = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    let mut addresses: Vec<IpAddress> = Vec::new();
    for net in ["198.51.100", "203.0.113", "192.0.2"] {
        addresses.extend((0..=255).map(|i| ip(&format!("{net}.{i}"))));
    }
    addresses.extend((0..256).map(|i| ip(&format!("2001:db8::{:x}", i + 1))));
    assert_eq!(addresses.len(), 1024);
    hostile
        .send(Frame::Hello(Hello {
            agent_id: id.to_string(),
            version: "0.1.0-test".into(),
            hostname: "mx.test".into(),
            addresses,
            blocklist_version: 0,
            next_seq: 1,
        }))
        .await;
    assert!(matches!(hostile.next().await, Out::Welcome(w) if w.last_acked_seq == 3));
    let own = count(&pool, &format!("select count(*) from agent_addresses where agent_id = '{id}'")).await;
    assert_eq!(own, fleetban_server::session::MAX_OWN_ADDRESSES as i64, "the addresses are trimmed");
    assert_eq!(Stats::get(&server.stats.addresses_dropped), 1024 - 16);
    assert_eq!(
        count(&pool, "select count(*) from agent_addresses where address = '2001:db8::1'").await,
        0,
        "addresses beyond the limit are dropped"
    );

    // Ranges, a forged TTL, a fleet-own address, and a /48 and a /64 that
    // policy refuses anyway (an allowlisted host inside).
    for cidr in ["2001:db8:bad::25/128", "2001:db8:1::25/128"] {
        sqlx::query("insert into allowlist (cidr, note) values ($1::cidr, 'partner')")
            .bind(cidr)
            .execute(&pool)
            .await
            .unwrap();
    }
    for frame in [
        local_block("198.51.0.0/16", 3600),
        local_block("203.0.113.0/24", 3600),
        local_block("2001:db8:bad::/48", 3600),
        local_block("192.0.2.77/32", u32::MAX),
        local_block("198.51.100.6/32", 3600),
        local_block("2001:db8:1::/64", 3600),
    ] {
        hostile.send(frame).await;
    }
    // A seq far beyond the last stored one: refused, not stored, not acked.
    hostile.send(batch(i64::MAX as u64, vec![event(EventKind::AuthFailed, "192.0.2.8")])).await;
    let nack = loop {
        match hostile.next().await {
            Out::Nack(n) => break n,
            Out::Ack(a) => panic!("the seq jump was acked: {a:?}"),
            _ => {}
        }
    };
    assert_eq!(nack.seq, i64::MAX as u64);
    assert_eq!(Stats::get(&server.stats.seq_jumps_refused), 1);
    // Frames are handled in order: the ack of a resent batch means every
    // frame before it is done.
    hostile.send(batch(3, vec![event(EventKind::Connect, "192.0.2.7")])).await;
    assert_eq!(hostile.until_ack().await, 3);

    assert_eq!(block_count(&pool, "198.51.0.0/16").await, 0, "a /16 local block is refused");
    assert_eq!(block_count(&pool, "203.0.113.0/24").await, 0, "a /24 local block is refused");
    assert_eq!(block_count(&pool, "2001:db8:bad::/48").await, 0, "a /48 local block is refused");
    assert_eq!(block_count(&pool, "2001:db8:bad::/128").await, 0, "no /128 is invented for a refused /48");
    assert_eq!(block_count(&pool, "198.51.100.6/32").await, 0, "a fleet-own address vetoes an agent block");
    assert_eq!(block_count(&pool, "2001:db8:1::/64").await, 0);
    assert_eq!(block_count(&pool, "2001:db8:1::/128").await, 0, "no /128 is invented for a refused /64");
    let ttl: f64 = sqlx::query_scalar(
        "select extract(epoch from expires_at - created_at)::float8 from blocks where cidr = '192.0.2.77/32'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let policy_ttl = CorrelateConfig::default().ttl_secs[0] as f64;
    assert!((ttl - policy_ttl).abs() < 2.0, "TTL {ttl} s is the policy's {policy_ttl} s, not 2^32-1 s");
    assert_eq!(count(&pool, &format!("select count(*) from agent_batches where agent_id = '{id}'")).await, 3);

    // A manual block of an address the hostile agent declared its own.
    let (manual, _) = add_block(&pool, "198.51.100.5/32").await;
    assert!(manual > 0);
    assert_eq!(block_count(&pool, "198.51.100.5/32").await, 1, "own addresses never veto a manual block");
    drop(hostile);

    // The real agent comes back: its spool is not acknowledged beyond what
    // was stored.
    let mut real = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    assert_eq!(real.hello(id, 0).await, 3);
    server.stop().await;
}

/// Waits until `ready` holds, polling the database.
async fn until(what: &str, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ready().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_block_reaches_an_agent_that_always_has_a_batch_ready(pool: PgPool) {
    // Without a backlog a block takes milliseconds; an agent's backlog must
    // not hold it back (at most the batch in hand does).
    const BOUND: Duration = Duration::from_secs(2);
    const MAX_BATCHES: u64 = 200_000;
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    assert!(matches!(agent.next().await, Out::Snapshot(_)));

    // The agent streams batches as fast as the server takes them, so that a
    // next frame is always waiting, until the block arrives or 15 s pass.
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (done, done_rx) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn({
        let (tx, sent) = (agent.tx.clone(), sent.clone());
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            for seq in 1..=MAX_BATCHES {
                if *done_rx.borrow() || tokio::time::Instant::now() >= deadline {
                    break;
                }
                let frame = AgentFrame { frame: Some(batch(seq, vec![event(EventKind::Connect, "192.0.2.8")])) };
                if tx.send(frame).await.is_err() {
                    break;
                }
                sent.store(seq, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let mut acked = 0u64;
    while acked < 50 {
        if let Out::Ack(a) = agent.next().await {
            acked = a.seq;
        }
    }
    let (block_id, version) = add_block(&pool, "203.0.113.0/24").await;
    let committed = tokio::time::Instant::now();
    let added = loop {
        match agent.next().await {
            Out::Ack(a) => acked = a.seq,
            Out::Delta(d) if d.to_version >= version => break d.added,
            Out::Snapshot(s) if s.version >= version => break s.entries,
            _ => {}
        }
    };
    let took = committed.elapsed();
    let sent_then = sent.load(std::sync::atomic::Ordering::Relaxed);
    let _ = done.send(true);
    sender.await.unwrap();
    assert!(added.iter().any(|e| e.block_id == block_id));
    assert!(took < BOUND, "the block took {took:?} to reach an agent with a backlog (bound {BOUND:?})");
    assert!(
        sent_then > acked + 1,
        "the agent had batches waiting when the block arrived (sent {sent_then}, acked {acked})"
    );
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_block_reaches_an_agent_whose_batch_waits_for_the_database(pool: PgPool) {
    // A batch that cannot be stored yet (here: another transaction holds
    // `agent_batches`; in a large fleet: every writer slot is busy) must not
    // hold back the agent's blocks, and it is acked once stored.
    const BOUND: Duration = Duration::from_secs(2);
    let server = TestServer::start(pool.clone()).await;
    let (id, secret) = enroll(&pool, server.channel().await).await;
    let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
    agent.hello(id, 0).await;
    assert!(matches!(agent.next().await, Out::Snapshot(_)));
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("lock table agent_batches in exclusive mode").execute(&mut *holder).await.unwrap();
    agent.send(batch(1, vec![event(EventKind::Connect, "192.0.2.8")])).await;
    until("the batch waits for the lock", async || {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity where wait_event_type = 'Lock' and query ilike '%agent_batches%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    let (block_id, version) = add_block(&pool, "203.0.113.0/24").await;
    let committed = tokio::time::Instant::now();
    let added = loop {
        let out = tokio::time::timeout(BOUND, agent.next())
            .await
            .unwrap_or_else(|_| panic!("no delta within {BOUND:?} while the agent's batch waited for the database"));
        match out {
            Out::Delta(d) if d.to_version >= version => break d.added,
            Out::Snapshot(s) if s.version >= version => break s.entries,
            Out::Ack(a) => panic!("batch {} acked while its table was locked", a.seq),
            _ => {}
        }
    };
    assert!(added.iter().any(|e| e.block_id == block_id));
    assert!(committed.elapsed() < BOUND);
    holder.rollback().await.unwrap();
    loop {
        if let Out::Ack(a) = agent.next().await {
            assert_eq!(a.seq, 1);
            break;
        }
    }
    let stored: i64 = sqlx::query_scalar("select count(*) from agent_batches where agent_id = $1 and seq = 1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    server.stop().await;
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn applied_reports_of_many_sessions_reach_the_rows_within_the_interval_in_few_statements(pool: PgPool) {
    const AGENTS: usize = 20;
    let server = TestServer::start(pool.clone()).await;
    let mut agents = Vec::new();
    for _ in 0..AGENTS {
        let (id, secret) = enroll(&pool, server.channel().await).await;
        let mut agent = Agent::connect(server.channel().await, &id.to_string(), &secret).await.unwrap();
        agent.hello(id, 0).await;
        assert!(matches!(agent.next().await, Out::Snapshot(_)));
        agents.push((id, agent));
    }
    let reports = &server.stats.reports;
    let recorded = Stats::get(&reports.recorded);
    let flushes = Stats::get(&reports.flushes);
    for (i, (_, agent)) in agents.iter().enumerate() {
        let applied = fleetban_proto::v1::Applied { blocklist_version: 0, firewall_entries: 1_000 + i as u64 };
        agent.send(Frame::Applied(applied)).await;
    }
    until("every session recorded its report", async || Stats::get(&reports.recorded) >= recorded + AGENTS as u64)
        .await;
    let all_recorded = tokio::time::Instant::now();
    until("every report on its agent's row", async || {
        count(&pool, "select count(*) from agents where firewall_entries >= 1000").await == AGENTS as i64
    })
    .await;
    let took = all_recorded.elapsed();
    // One interval, plus the statement and this test's polling.
    let bound = fleetban_server::applied::FLUSH_INTERVAL + Duration::from_millis(500);
    assert!(took < bound, "reports took {took:?} to reach the rows (bound {bound:?})");
    for (i, (id, _)) in agents.iter().enumerate() {
        let entries: i64 = sqlx::query_scalar("select firewall_entries from agents where id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(entries, 1_000 + i as i64);
    }
    let statements = Stats::get(&reports.flushes) - flushes;
    assert!(
        (1..=3).contains(&statements),
        "{AGENTS} sessions' reports took {statements} statements; they are written together"
    );

    // A report made just before shutdown is stored at shutdown.
    let (id, agent) = &agents[0];
    agent.send(Frame::Applied(fleetban_proto::v1::Applied { blocklist_version: 0, firewall_entries: 7 })).await;
    let recorded = Stats::get(&reports.recorded);
    let stats = server.stats.clone();
    until("the last report recorded", async || Stats::get(&stats.reports.recorded) > recorded).await;
    server.stop().await;
    let entries: i64 = sqlx::query_scalar("select firewall_entries from agents where id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(entries, 7, "the last report was lost at shutdown");
}
