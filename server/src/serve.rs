//! Runs the server: the gRPC listener for agents, the HTTP listener for
//! operators, and the background tasks (block-change listener, block expiry
//! sweeper, stale-session sweep), until `shutdown` resolves.
//!
//! Shutdown is graceful: both listeners stop accepting, every agent session
//! finishes and acks the frames it already received, then closes its stream;
//! whatever has not drained within [`Options::drain_timeout`] is dropped (the
//! agents resend unacked batches to another replica or after the restart).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fleetban_proto::v1::agent_service_server::AgentServiceServer;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::ServerTlsConfig;
use tracing::warn;

use crate::api;
use crate::backlog::Backlog;
use crate::blocks;
use crate::correlate::{CorrelateConfig, Correlator};
use crate::ingest::MAX_MESSAGE_BYTES;
use crate::push::{self, Hub};
use crate::retention::{self, Retention};
use crate::session::{self, Stats};

/// Errors that end a running server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The gRPC server failed (or its TLS configuration was refused).
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// The bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC for agents.
    pub grpc: TcpListener,
    /// HTTP for operators.
    pub http: TcpListener,
}

/// How the server runs; `Options::default()` suits tests (plaintext, default
/// policy).
#[derive(Debug, Clone)]
pub struct Options {
    /// TLS of the gRPC listener; `None` = plaintext (the caller has checked
    /// that this is allowed, see [`crate::tls::server_config`]).
    pub tls: Option<ServerTlsConfig>,
    /// The correlation policy.
    pub correlate: CorrelateConfig,
    /// Heartbeat interval asked of agents.
    pub heartbeat: Duration,
    /// How long shutdown waits for sessions to drain.
    pub drain_timeout: Duration,
    /// How often expired blocks are turned into `remove` changes.
    pub expiry_interval: Duration,
    /// What the store keeps, swept at start and every `retention_interval`.
    pub retention: Retention,
    /// How often the retention sweep runs.
    pub retention_interval: Duration,
    /// Session counters (shared so that tests and metrics can read them).
    pub stats: Arc<Stats>,
    /// The push hub (shared so that tests and metrics can read it).
    pub hub: Hub,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tls: None,
            correlate: CorrelateConfig::default(),
            heartbeat: Duration::from_secs(15),
            drain_timeout: Duration::from_secs(10),
            expiry_interval: Duration::from_secs(5),
            retention: Retention {
                events: Duration::from_secs(30 * 86_400),
                change_log: Duration::from_secs(7 * 86_400),
            },
            retention_interval: Duration::from_secs(3600),
            stats: Arc::default(),
            hub: Hub::new(),
        }
    }
}

/// Serves until `shutdown` resolves, then drains and returns.
pub async fn run(
    pool: PgPool,
    options: Options,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |rx: &tokio::sync::watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let listener = tokio::spawn(push::run_listener(pool.clone(), options.hub.clone(), stopped(&stop_rx)));
    let sweeper = tokio::spawn(session::run_stale_sweeper(pool.clone(), options.heartbeat, stopped(&stop_rx)));

    let expiry = tokio::spawn(blocks::run_expiry_sweeper(pool.clone(), options.expiry_interval, stopped(&stop_rx)));
    let retention =
        tokio::spawn(retention::run(pool.clone(), options.retention, options.retention_interval, stopped(&stop_rx)));
    let correlator = Correlator::new(pool.clone(), options.correlate.clone());
    let backlog = Backlog::new();
    // The correlation worker outlives the sessions' drain, so that the last
    // batches are evaluated too.
    let (sessions_done, sessions_done_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(backlog.clone().run_worker(correlator.clone(), async move {
        let _ = sessions_done_rx.await;
    }));
    let service = session::Service::new(
        pool.clone(),
        options.hub.clone(),
        correlator,
        backlog,
        options.heartbeat,
        stop_rx.clone(),
        options.stats.clone(),
    );
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if let Some(tls) = options.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let grpc_server = builder
        .add_service(AgentServiceServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.grpc), stopped(&stop_rx));
    let drain_timeout = options.drain_timeout;
    let grpc_stop = stopped(&stop_rx);
    let grpc = async move {
        tokio::pin!(grpc_server);
        tokio::select! {
            result = &mut grpc_server => result,
            _ = async { grpc_stop.await; tokio::time::sleep(drain_timeout).await } => {
                warn!(timeout_secs = drain_timeout.as_secs(), "Agent sessions did not drain in time; closing them.");
                Ok(())
            }
        }
    };

    let app = api::router(api::AppState::new(pool, options.correlate.clone()).with_stats(options.stats.clone()));
    let http_server = axum::serve(listeners.http, app).with_graceful_shutdown(stopped(&stop_rx));

    let (grpc_result, http_result) = tokio::join!(grpc, http_server.into_future());
    let _ = sessions_done.send(());
    if tokio::time::timeout(drain_timeout, worker).await.is_err() {
        warn!("The last correlation did not finish in time.");
    }
    let _ = listener.await;
    let _ = sweeper.await;
    let _ = expiry.await;
    let _ = retention.await;
    grpc_result?;
    http_result?;
    Ok(())
}
