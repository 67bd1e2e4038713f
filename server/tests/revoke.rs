//! Agent credentials ending while a session is live, end to end over gRPC
//! and HTTP on one server: `POST /api/v1/agents/{id}/revoke` closes the
//! session at once and the agent cannot reconnect; enrolling the same host
//! again (same name and host id) closes the session of the old secret, keeps
//! the agent id, and refuses the old secret; another host asking for the
//! name is refused naming the holder; an agent that sends no name or host id
//! (older versions) still enrolls and connects.

mod common;

use std::time::Duration;

use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_client::AgentServiceClient;
use fleetban_proto::v1::server_frame::Frame as Out;
use fleetban_proto::v1::{AgentFrame, EnrollRequest, Hello, IpAddress, ServerFrame};
use fleetban_server::serve::{self, Listeners, Options};
use fleetban_server::{auth, session};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, Streaming};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddress {
    s.parse::<std::net::IpAddr>().unwrap().into()
}

async fn connect(
    channel: Channel,
    id: Uuid,
    secret: &str,
) -> Result<(mpsc::Sender<AgentFrame>, Streaming<ServerFrame>), Status> {
    let (tx, rx) = mpsc::channel(16);
    let mut request = Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(session::AGENT_ID_HEADER, id.to_string().parse().unwrap());
    request.metadata_mut().insert(session::AGENT_SECRET_HEADER, secret.parse().unwrap());
    let stream = AgentServiceClient::new(channel).connect(request).await?.into_inner();
    Ok((tx, stream))
}

async fn next(stream: &mut Streaming<ServerFrame>) -> Result<Option<Out>, Status> {
    let frame = tokio::time::timeout(WAIT, stream.message()).await.expect("no frame in time")?;
    Ok(frame.and_then(|f| f.frame))
}

/// A server on loopback ports, and a channel to its gRPC listener.
struct Running {
    channel: Channel,
    http: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), serve::Error>>,
}

impl Running {
    async fn start(pool: &PgPool) -> Running {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve::run(pool.clone(), Options::default(), Listeners { grpc, http }, async move {
            let _ = stopped.await;
        }));
        let channel = Endpoint::from_shared(format!("http://{grpc_addr}")).unwrap().connect().await.unwrap();
        Running { channel, http: http_addr, stop, server }
    }

    /// Stops the server and waits for it to finish cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.server).await.unwrap().unwrap().unwrap();
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn revoked_agent_is_cut_off_and_cannot_reconnect(pool: PgPool) {
    let running = Running::start(&pool).await;
    let (channel, http_addr) = (running.channel.clone(), running.http);
    let t = common::tokens(&pool).await;

    // Enroll and open a session.
    let token = auth::create_enrollment_token(&pool, 1, Duration::from_secs(60), "test").await.unwrap();
    let enrolled = AgentServiceClient::new(channel.clone())
        .enroll(EnrollRequest {
            token,
            hostname: "mx-revoke.example.net".into(),
            version: "0.1.0".into(),
            addresses: vec![ip("192.0.2.30")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id: Uuid = enrolled.agent_id.parse().unwrap();
    let (tx, mut stream) = connect(channel.clone(), id, &enrolled.agent_secret).await.unwrap();
    let hello = Hello {
        agent_id: id.to_string(),
        version: "0.1.0".into(),
        hostname: "mx-revoke.example.net".into(),
        addresses: vec![ip("192.0.2.30")],
        blocklist_version: 0,
        next_seq: 1,
    };
    tx.send(AgentFrame { frame: Some(Frame::Hello(hello)) }).await.unwrap();
    assert!(matches!(next(&mut stream).await.unwrap(), Some(Out::Welcome(_))));

    // The API shows it online; an admin revokes it.
    let api = reqwest::Client::new();
    let base = format!("http://{http_addr}");
    let agent: serde_json::Value =
        api.get(format!("{base}/api/v1/agents/{id}")).bearer_auth(&t.read).send().await.unwrap().json().await.unwrap();
    assert_eq!(agent["connected"], true, "{agent}");
    let revoked = api.post(format!("{base}/api/v1/agents/{id}/revoke")).bearer_auth(&t.admin).send().await.unwrap();
    assert_eq!(revoked.status(), reqwest::StatusCode::NO_CONTENT);

    // The live session ends at once, without waiting for the agent's next
    // report (its heartbeat interval is 15 s; WAIT is 10 s).
    let status = loop {
        match next(&mut stream).await {
            Ok(Some(_)) => continue, // a snapshot or ack already in flight
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // It cannot reconnect, and the API shows it revoked and offline.
    let again = connect(channel, id, &enrolled.agent_secret).await;
    assert_eq!(again.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let agent: serde_json::Value =
        api.get(format!("{base}/api/v1/agents/{id}")).bearer_auth(&t.read).send().await.unwrap().json().await.unwrap();
    assert_eq!(agent["connected"], false, "{agent}");
    assert!(agent["revoked_at"].is_string(), "{agent}");

    running.stop().await;
}

fn hello(id: Uuid, hostname: &str) -> AgentFrame {
    let hello = Hello {
        agent_id: id.to_string(),
        version: "0.2.0".into(),
        hostname: hostname.into(),
        addresses: vec![],
        blocklist_version: 0,
        next_seq: 1,
    };
    AgentFrame { frame: Some(Frame::Hello(hello)) }
}

async fn until_status(stream: &mut Streaming<ServerFrame>) -> Status {
    loop {
        match next(stream).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn re_enrolling_a_host_replaces_its_credentials_and_closes_the_old_session(pool: PgPool) {
    let running = Running::start(&pool).await;
    let channel = running.channel.clone();
    let token = auth::create_enrollment_token(&pool, 10, Duration::from_secs(60), "test").await.unwrap();
    let request = |name: &str, host_id: &str| EnrollRequest {
        token: token.clone(),
        hostname: "mx1.example.net".into(),
        version: "0.2.0".into(),
        addresses: vec![ip("192.0.2.31")],
        name: name.into(),
        host_id: host_id.into(),
    };
    let mut client = AgentServiceClient::new(channel.clone());

    let first = client.enroll(request("mx1", "host-a")).await.unwrap().into_inner();
    assert!(!first.reenrolled);
    let id: Uuid = first.agent_id.parse().unwrap();
    let (tx, mut stream) = connect(channel.clone(), id, &first.agent_secret).await.unwrap();
    tx.send(hello(id, "mx1.example.net")).await.unwrap();
    assert!(matches!(next(&mut stream).await.unwrap(), Some(Out::Welcome(_))));
    // Some evidence of this agent, which must stay attached.
    sqlx::query(
        "insert into offender_hosts (address, agent_id, kind, first_seen, last_seen, events, sample_raw) \
         values ('203.0.113.7', $1, 'auth_failed', now(), now(), 3, 'x')",
    )
    .bind(id)
    .execute(&pool)
    .await
    .unwrap();

    // The same host enrolls again: same id, new secret, the old session ends.
    let again = client.enroll(request("mx1", "host-a")).await.unwrap().into_inner();
    assert!(again.reenrolled);
    assert_eq!(again.agent_id, first.agent_id);
    assert_ne!(again.agent_secret, first.agent_secret);
    let status = until_status(&mut stream).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let old = connect(channel.clone(), id, &first.agent_secret).await;
    assert_eq!(old.err().map(|s| s.code()), Some(Code::Unauthenticated), "the old secret no longer works");
    let (tx, mut stream) = connect(channel.clone(), id, &again.agent_secret).await.unwrap();
    tx.send(hello(id, "mx1.example.net")).await.unwrap();
    assert!(matches!(next(&mut stream).await.unwrap(), Some(Out::Welcome(_))));
    let (agents, evidence): (i64, i64) = sqlx::query_as(
        "select (select count(*) from agents), (select count(*) from offender_hosts where agent_id = $1)",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((agents, evidence), (1, 1), "one agent, its evidence still attached");

    // Another host wanting the name: refused, naming the agent that holds it.
    let taken = client.enroll(request("mx1", "host-b")).await.unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(taken.message().contains(&id.to_string()) && taken.message().contains("mx1"), "{taken:?}");
    // An agent that sends neither name nor host id enrolls and connects.
    let legacy = client
        .enroll(EnrollRequest {
            token: token.clone(),
            hostname: "mx-old.example.net".into(),
            version: "0.1.0".into(),
            addresses: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let legacy_id: Uuid = legacy.agent_id.parse().unwrap();
    let (ltx, mut lstream) = connect(channel.clone(), legacy_id, &legacy.agent_secret).await.unwrap();
    ltx.send(hello(legacy_id, "mx-old.example.net")).await.unwrap();
    assert!(matches!(next(&mut lstream).await.unwrap(), Some(Out::Welcome(_))));
    let name: String =
        sqlx::query_scalar("select name from agents where id = $1").bind(legacy_id).fetch_one(&pool).await.unwrap();
    assert_eq!(name, "mx-old.example.net");
    // ... but cannot take a name that is held, not even its own hostname's.
    let dup = client
        .enroll(EnrollRequest { token, hostname: "mx-old.example.net".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");

    // A notice for an agent whose credentials are current does not end its
    // session: announce mx1, then revoke the legacy agent; once the legacy
    // session has ended, the notice before it was handled too.
    sqlx::query("select pg_notify('fleetban_revoked', $1)").bind(id.to_string()).execute(&pool).await.unwrap();
    sqlx::query("update agents set revoked_at = now() where id = $1").bind(legacy_id).execute(&pool).await.unwrap();
    assert_eq!(until_status(&mut lstream).await.code(), Code::Unauthenticated);
    // Frames already sent (policy, allowlist, snapshot) may still be queued.
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            Err(_) => break,
            Ok(Ok(Some(_))) => continue,
            Ok(other) => panic!("the session of the current secret must stay open: {other:?}"),
        }
    }
    let connected: bool =
        sqlx::query_scalar("select connected from agents where id = $1").bind(id).fetch_one(&pool).await.unwrap();
    assert!(connected);
    drop((tx, ltx));
    running.stop().await;
}

/// A secret replaced without any notification (another replica's
/// re-enrollment whose notification was lost, a restore of `agents`) is
/// still caught: the next heartbeat of the old session ends it, while a
/// heartbeat of a valid agent in the same moment keeps its session.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_heartbeat_ends_the_session_of_a_replaced_secret_and_keeps_the_others(pool: PgPool) {
    let running = Running::start(&pool).await;
    let channel = running.channel.clone();
    let token = auth::create_enrollment_token(&pool, 10, Duration::from_secs(60), "test").await.unwrap();
    let mut client = AgentServiceClient::new(channel.clone());
    let mut sessions = Vec::new();
    for i in 0..3 {
        let name = format!("mx{i}.example.net");
        let enrolled = client
            .enroll(EnrollRequest {
                token: token.clone(),
                hostname: name.clone(),
                version: "0.2.0".into(),
                addresses: vec![ip("192.0.2.31")],
                name: name.clone(),
                host_id: format!("host-{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        let id: Uuid = enrolled.agent_id.parse().unwrap();
        let (tx, mut stream) = connect(channel.clone(), id, &enrolled.agent_secret).await.unwrap();
        tx.send(hello(id, &name)).await.unwrap();
        assert!(matches!(next(&mut stream).await.unwrap(), Some(Out::Welcome(_))));
        sessions.push((id, tx, stream));
    }
    let replaced = sessions[0].0;
    sqlx::query("update agents set secret_hash = '\\x00' where id = $1").bind(replaced).execute(&pool).await.unwrap();
    let beat = AgentFrame {
        frame: Some(Frame::Heartbeat(fleetban_proto::v1::Heartbeat {
            blocklist_version: 0,
            firewall_entries: 0,
            pending_batches: 0,
        })),
    };
    for (_, tx, _) in &sessions {
        tx.send(beat.clone()).await.unwrap();
    }
    let (_, _, stream) = &mut sessions[0];
    let status = until_status(stream).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // The others are still served: a second heartbeat each, then a block
    // reaches them.
    for (_, tx, _) in &sessions[1..] {
        tx.send(beat.clone()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let connected: Vec<bool> = sqlx::query_scalar("select connected from agents where id = any($1) order by name")
        .bind(sessions.iter().map(|(id, ..)| *id).collect::<Vec<_>>())
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(connected, [false, true, true], "only the replaced secret's session ended");
    for (_, _, stream) in &mut sessions[1..] {
        // Whatever the session sent after Welcome (policy, allowlist), its
        // stream neither ended nor carried an error.
        while let Ok(frame) = tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
            assert!(matches!(frame, Ok(Some(_))), "a valid session stays open: {frame:?}");
        }
    }
    running.stop().await;
}
