//! Runs the server: the gRPC listener for agents and the HTTP listener for
//! operators, until `shutdown` resolves.

use std::future::Future;

use fleetban_proto::v1::agent_service_server::AgentServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api;
use crate::session;

/// Errors that end a running server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` resolves, then
/// drains both and returns.
pub async fn run(
    pool: PgPool,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let mut grpc_stop = stop_rx.clone();
    let grpc_server = tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(session::Service::new(pool.clone())))
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        });

    let mut http_stop = stop_rx;
    let app = api::router(api::AppState::new(pool, crate::correlate::CorrelateConfig::default()));
    let http_server = axum::serve(http, app).with_graceful_shutdown(async move {
        let _ = http_stop.wait_for(|stop| *stop).await;
    });

    let (grpc_result, http_result) = tokio::join!(grpc_server, http_server.into_future());
    grpc_result?;
    http_result?;
    Ok(())
}
