//! Runs the server: the gRPC listener for agents, the HTTP listener for
//! operators, and the background tasks (block-change listener, block expiry
//! sweeper, stale-session sweep, feed refresher), until `shutdown` resolves.
//!
//! Any number of servers may run on one database ([`crate::replica`]). Per
//! replica: the listeners and agent sessions, the block-change listener
//! (LISTEN/NOTIFY: a change committed through any replica reaches the
//! agents of every one), the correlation worker (the batches its own
//! sessions stored), the feed refresher (each list under its own advisory
//! lock, so one replica refreshes it) and the notification dispatcher
//! (routing `skip locked`, composing under a per-channel lock, claiming
//! messages `for update skip locked`: replicas share the work, none repeats
//! it). On the leader only (advisory-lock leadership, handed over when the
//! leader stops or dies): the stale-session sweep, block expiry, retention
//! and the alert monitor.
//!
//! Shutdown is graceful: both listeners stop accepting, every agent session
//! finishes and acks the frames it already received, then closes its stream;
//! whatever has not drained within [`Options::drain_timeout`] is dropped (the
//! agents resend unacked batches to another replica or after the restart).
//!
//! Both listeners accept through [`crate::conn`] (connection caps in total
//! and per source, handshake and idle deadlines, TCP keepalive; `[limits]` in
//! `server.toml`). The gRPC service sits behind [`crate::guard`] (throttle of
//! failed authentication, marking of authenticated connections); the HTTP
//! side is served by hyper with a header-read timeout, which `axum::serve`
//! does not set.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fleetban_proto::v1::agent_service_server::AgentServiceServer;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tonic::transport::ServerTlsConfig;
use tracing::{debug, info, warn};

use crate::alerts;
use crate::api;
use crate::backlog::Backlog;
use crate::blocks;
use crate::config::LimitsConfig;
use crate::conn::{Gate, GateLimits, GatedListener, Listener};
use crate::correlate::{CorrelateConfig, Correlator};
use crate::guard::{AgentGuardLayer, AuthThrottle};
use crate::ingest::MAX_MESSAGE_BYTES;
use crate::push::{self, Hub};
use crate::replica::{Replica, while_leader};
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
    /// Connection discipline and the throttle of failed authentication.
    pub limits: LimitsConfig,
    /// Balancers whose gRPC connections start with a PROXY header.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Events older than this are rejected by ingest (`max_event_age_days`).
    pub max_event_age: Duration,
    /// Blocklist feeds and ASN block rules, refreshed in the background.
    pub feeds: Arc<crate::feeds::Feeds>,
    /// ASN/country evidence multipliers of the correlation.
    pub geo: Arc<crate::geo::GeoPolicy>,
    /// Notification channels (`[[notify]]`).
    pub channels: alerts::Channels,
    /// When the server raises its own events and how often it dispatches.
    pub alerts: alerts::AlertsConfig,
    /// This replica: its name (`replica_name`) and leadership.
    pub replica: Replica,
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
            limits: LimitsConfig::default(),
            proxy_protocol_from: Vec::new(),
            max_event_age: crate::ingest::DEFAULT_MAX_EVENT_AGE,
            feeds: Arc::default(),
            geo: Arc::default(),
            channels: alerts::Channels::default(),
            alerts: alerts::AlertsConfig::default(),
            replica: Replica::default(),
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

    let replica = options.replica.clone();
    info!(replica = %replica.name(), replica_id = %replica.id(), "Server replica starting.");
    let leadership =
        tokio::spawn(crate::replica::run(pool.clone(), replica.clone(), options.heartbeat, stopped(&stop_rx)));
    let listener = tokio::spawn(push::run_listener(pool.clone(), options.hub.clone(), stopped(&stop_rx)));
    // The fleet-wide sweeps run on the leader only.
    let sweeper = tokio::spawn(while_leader(replica.clone(), stop_rx.clone(), {
        let (pool, heartbeat) = (pool.clone(), options.heartbeat);
        move |stop| session::run_stale_sweeper(pool.clone(), heartbeat, stop)
    }));
    let expiry = tokio::spawn(while_leader(replica.clone(), stop_rx.clone(), {
        let (pool, interval) = (pool.clone(), options.expiry_interval);
        move |stop| blocks::run_expiry_sweeper(pool.clone(), interval, stop)
    }));
    let retention = tokio::spawn(while_leader(replica.clone(), stop_rx.clone(), {
        let (pool, keep, interval) = (pool.clone(), options.retention, options.retention_interval);
        move |stop| retention::run(pool.clone(), keep, interval, stop)
    }));
    let feed_policy: Arc<dyn blocks::BlockPolicy> = Arc::new(options.correlate.clone());
    let feeds =
        tokio::spawn(options.feeds.clone().run(pool.clone(), feed_policy, crate::feeds::TICK, stopped(&stop_rx)));
    let notifications = spawn_notifications(&pool, &options, &stop_rx);
    let correlator = Correlator::new(pool.clone(), options.correlate.clone()).with_geo(options.geo.clone());
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
        options.max_event_age,
    )
    .with_replica(replica.id());
    // The agents' reports are stored after the last session ended.
    let (reports_done, reports_done_rx) = tokio::sync::oneshot::channel::<()>();
    let reports = tokio::spawn(service.reports().run(pool.clone(), crate::applied::FLUSH_INTERVAL, async move {
        let _ = reports_done_rx.await;
    }));
    let grpc_limits = GateLimits::grpc(&options.limits);
    let auth_timeout = grpc_limits.first_deadline;
    let grpc_gate = Gate::new(Listener::Grpc, grpc_limits);
    let throttle =
        Arc::new(AuthThrottle::new(options.limits.auth_failure_burst, options.limits.auth_failures_per_minute));
    // TCP keepalive is set by the gate on every accepted socket.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = options.tls.clone() {
        builder = builder.tls_config(tls.timeout(auth_timeout))?;
    }
    let grpc_server = builder
        .layer(AgentGuardLayer::new(throttle, Some(grpc_gate.clone())))
        .add_service(AgentServiceServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(
            GatedListener::new(listeners.grpc, grpc_gate).with_proxies(options.proxy_protocol_from.clone()),
            stopped(&stop_rx),
        );
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

    let app = api::router(
        api::AppState::new(pool, options.correlate.clone())
            .with_stats(options.stats.clone())
            .with_feeds(options.feeds.clone())
            .with_geo(options.geo.clone())
            .with_channels(options.channels.clone())
            .with_replica(replica.clone()),
    );
    let http_gate = Gate::new(Listener::Http, GateLimits::http(&options.limits));
    let http_server = serve_http(
        GatedListener::new(listeners.http, http_gate),
        app,
        Duration::from_secs(options.limits.http_header_timeout_secs),
        stopped(&stop_rx),
    );

    let (grpc_result, http_result) = tokio::join!(grpc, http_server);
    let _ = sessions_done.send(());
    let _ = reports_done.send(());
    let _ = reports.await;
    if tokio::time::timeout(drain_timeout, worker).await.is_err() {
        warn!("The last correlation did not finish in time.");
    }
    let _ = listener.await;
    let _ = sweeper.await;
    let _ = expiry.await;
    let _ = retention.await;
    let _ = feeds.await;
    for task in notifications {
        let _ = task.await;
    }
    // Last: the leadership is given up (and the replica's row deleted) once
    // the leader-only tasks have stopped.
    let _ = leadership.await;
    grpc_result?;
    http_result?;
    Ok(())
}

/// Starts the notification dispatcher (always: it also routes and ages out
/// events when no channel is configured) and, with channels, the monitor.
fn spawn_notifications(
    pool: &PgPool,
    options: &Options,
    stop_rx: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let stopped = || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks = Vec::new();
    let retention = Duration::from_secs(u64::from(options.alerts.retention_days) * 86_400);
    match alerts::dispatch::Dispatcher::new(pool.clone(), options.channels.clone()) {
        Ok(dispatcher) => {
            let interval = Duration::from_millis(options.alerts.dispatch_interval_ms);
            tasks.push(tokio::spawn(dispatcher.run(interval, retention, stopped())));
        }
        Err(error) => warn!(%error, "Cannot build the notification HTTP client; notifications stay queued."),
    }
    if !options.channels.all().is_empty() {
        let (pool, config) = (pool.clone(), options.alerts.clone());
        tasks.push(tokio::spawn(while_leader(options.replica.clone(), stop_rx.clone(), move |stop| {
            alerts::monitor::run(pool.clone(), config.clone(), stop)
        })));
    }
    tasks
}

/// Serves `app` on `listener` until `shutdown`, then lets every connection
/// finish its request and waits for them (the caller bounds the wait).
///
/// Like `axum::serve`, but hyper gets a timer, so that its HTTP/1 header-read
/// timeout (`header_timeout`, from accept and between requests) is enforced:
/// a client that trickles its headers is closed.
async fn serve_http(
    mut listener: GatedListener,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), std::io::Error> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    // Every connection task holds a receiver; `closed` resolves when all are gone.
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            stream = listener.accept() => stream,
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let mut close_rx = close_rx.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            debug!(error = %error, "HTTP connection ended with an error.");
                        }
                        break;
                    }
                    changed = close_rx.changed(), if !draining => {
                        // Sent at shutdown (or the sender is gone): finish the
                        // request in hand and close.
                        let _ = changed;
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(close_rx);
        });
    }
    // Stop accepting (the listener closes), ask connections to finish.
    drop(listener);
    drop(close_rx);
    let _ = close_tx.send(());
    close_tx.closed().await;
    Ok(())
}
