//! `DELETE /api/v1/agents/{id}` end to end: an enrolled agent with a live
//! session is revoked through the HTTP API of the same server; the session
//! is closed at once and the agent cannot reconnect.

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

#[ctor::ctor]
fn init() {
    fleetban_server::pgembed::ensure_test_database_url();
}

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

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn revoked_agent_is_cut_off_and_cannot_reconnect(pool: PgPool) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::run(pool.clone(), Options::default(), Listeners { grpc, http }, async move {
        let _ = stopped.await;
    }));
    let channel = Endpoint::from_shared(format!("http://{grpc_addr}")).unwrap().connect().await.unwrap();
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
    let revoked = api.delete(format!("{base}/api/v1/agents/{id}")).bearer_auth(&t.admin).send().await.unwrap();
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

    let _ = stop.send(());
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap().unwrap();
}
