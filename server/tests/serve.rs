//! `serve::run` binds both listeners, answers health checks over real
//! sockets, and returns when its shutdown future resolves.

mod common;

use std::time::Duration;

use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn serves_health_and_shuts_down(pool: PgPool) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listeners = fleetban_server::serve::Listeners { grpc, http };
    let options = fleetban_server::serve::Options::default();
    let server = tokio::spawn(fleetban_server::serve::run(pool.clone(), options, listeners, async move {
        let _ = stop_rx.await;
    }));

    let health = get(http_addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok\n"), "{health}");
    let ready = get(http_addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let missing = get(http_addr, "/nope").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    TcpStream::connect(grpc_addr).await.expect("gRPC listener accepts connections");

    // Readiness follows the database: close the pool and it reports 503.
    pool.close().await;
    let not_ready = get(http_addr, "/readyz").await;
    assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("server stops").unwrap().unwrap();
    assert!(TcpStream::connect(http_addr).await.is_err(), "HTTP listener still open after shutdown");
}
