//! The gRPC `AgentService`: enrollment and the long-lived agent session.
//!
//! `Connect` authenticates the agent from request metadata
//! (`x-fleetban-agent-id`, `x-fleetban-agent-secret`) before anything else;
//! every failure is `UNAUTHENTICATED`. A session is one spawned task that owns
//! the inbound stream and feeds the outbound stream through a bounded channel
//! (a failed send means the agent is gone). It:
//!
//! - expects `Hello` first, records the agent's version, addresses (at most
//!   [`MAX_OWN_ADDRESSES`] unicast hosts; the rest is dropped, warned about
//!   and counted) and blocklist version, answers `Welcome`, then brings the
//!   agent's blocklist up to date (the delta since its version, or a
//!   snapshot);
//! - refuses (`Nack`, not stored) a batch whose seq is more than
//!   [`MAX_SEQ_JUMP`] beyond the agent's highest stored seq, so that a forged
//!   seq cannot make `Welcome.last_acked_seq` acknowledge the real agent's
//!   spool;
//! - stores each `EventBatch` through [`crate::ingest`] and acks it after the
//!   commit (`Ack.rejected_events` counts invalid events; a batch invalid as a
//!   whole gets a `Nack`, and the session goes on), then hands the batch's
//!   abuse addresses to the correlation [`crate::backlog`];
//! - turns `LocalBlock` frames into fleet blocks, records heartbeats on the
//!   agent's row and hands `Applied` reports (and the blocklist version of
//!   heartbeats) to the batched writer of [`crate::applied`];
//! - lets [`crate::push`] write deltas that continue the agent's version,
//!   revocations and the allowlist straight onto its outbound stream while
//!   this task has nothing of its own to send (see the gate there), and
//!   handles what the hub queues for it instead (gaps, resyncs, its agent's
//!   revocation, a full stream): before the agent's
//!   next frame (an agent with a backlog always has one), but at most
//!   [`PUSH_BURST`] in a row while a frame waits, and also while a batch
//!   waits to be stored (the store is polled beside the pushes, not awaited;
//!   the next frame is read only after its ack, so acks stay in seq order).
//!
//! A frame that cannot be decoded (malformed or larger than
//! [`crate::ingest::MAX_MESSAGE_BYTES`]) corrupts the stream: it is counted
//! and the session ends with an error status; other agents are unaffected.
//! A session that receives nothing for three heartbeat intervals is dead and
//! is cleaned up; on server shutdown each session finishes the frame in hand,
//! acks it and closes its stream.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetban_proto::text::{LOCAL_BLOCK_MAX_EVIDENCE_BYTES, LOCAL_BLOCK_MAX_REASON_BYTES, truncate};
use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_server::AgentService;
use fleetban_proto::v1::server_frame::Frame as Out;
use fleetban_proto::v1::{
    Ack, AgentFrame, Applied, EnrollRequest, EnrollResponse, Heartbeat, Hello, LocalBlock, Nack, Rejection,
    ServerFrame, Welcome,
};
use futures_util::FutureExt;
use ipnet::IpNet;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::applied::Reports;
use crate::auth::{self, AuthError};
use crate::backlog::Backlog;
use crate::blocks;
use crate::correlate::Correlator;
use crate::heartbeat::Heartbeats;
use crate::ingest::{BatchError, Ingest, Outcome};
use crate::push::{Hub, Push, Subscription};
use crate::text::Escaped;

/// The addresses an agent may declare its own: unicast host addresses
/// (not unspecified, multicast or IPv4 broadcast), without repeats, at most
/// [`MAX_OWN_ADDRESSES`]. They veto automatic blocks of the ranges holding
/// them, so the rest is dropped with a warning and counted.
fn own_addresses(stats: &Stats, agent_id: Option<Uuid>, hostname: &str, addresses: Vec<IpAddr>) -> Vec<IpAddr> {
    let offered = addresses.len();
    let mut kept: Vec<IpAddr> = Vec::with_capacity(offered.min(MAX_OWN_ADDRESSES));
    let mut not_host = 0usize;
    for address in addresses {
        let address = address.to_canonical();
        let host = !address.is_unspecified()
            && !address.is_multicast()
            && !matches!(address, IpAddr::V4(v4) if v4.is_broadcast());
        if !host {
            not_host += 1;
        } else if !kept.contains(&address) && kept.len() < MAX_OWN_ADDRESSES {
            kept.push(address);
        }
    }
    let dropped = offered - kept.len();
    if dropped > 0 {
        Stats::add(&stats.addresses_dropped, dropped as u64);
        metrics::counter!(TRUST_REFUSED, "limit" => "own_addresses").increment(dropped as u64);
        warn!(
            agent_id = ?agent_id, hostname = %Escaped(hostname), offered, kept = kept.len(), not_host, max = MAX_OWN_ADDRESSES,
            "Agent's own addresses trimmed: only unicast hosts, at most the limit, are kept."
        );
    }
    kept
}

pub use fleetban_proto::{AGENT_ID_HEADER, AGENT_SECRET_HEADER};
/// Frames queued towards one agent.
const OUTBOUND_QUEUE: usize = 64;
/// Pushes a session forwards in a row before it handles a frame the agent
/// already sent (pushes go first, but cannot starve the agent's frames).
const PUSH_BURST: usize = 16;

/// A batch being stored: its seq and the store's result.
type Storing = Pin<Box<dyn std::future::Future<Output = (u64, Result<Outcome, BatchError>)> + Send>>;
/// How long a new session may take to send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// At shutdown, a session stops draining when the agent sends nothing for
/// this long, or after [`DRAIN_LIMIT`].
const DRAIN_PAUSE: Duration = Duration::from_millis(200);
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// Most addresses an agent may declare its own (`Hello.addresses`,
/// `EnrollRequest.addresses`); the rest are dropped.
pub const MAX_OWN_ADDRESSES: usize = 16;
/// Largest step a batch seq may take beyond the agent's highest stored seq;
/// a batch further ahead is refused, so that a forged seq cannot make the
/// server acknowledge the real agent's whole spool.
pub const MAX_SEQ_JUMP: u64 = 1_000_000;
/// Counter of agent input dropped or refused by the trust model, by `limit`.
pub const TRUST_REFUSED: &str = "fleetban_agent_trust_refused_total";

/// Counters of every session of a server, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions open now.
    pub sessions_open: AtomicU64,
    /// `Connect` or `Enroll` calls refused for bad credentials.
    pub auth_refused: AtomicU64,
    /// Batches stored.
    pub batches_stored: AtomicU64,
    /// Batches recognised as already stored and acked again.
    pub batches_duplicate: AtomicU64,
    /// Batches refused as a whole (`Nack`).
    pub batches_refused: AtomicU64,
    /// Events stored.
    pub events_stored: AtomicU64,
    /// Events rejected as invalid.
    pub events_rejected: AtomicU64,
    /// Frames that could not be decoded (malformed or oversized).
    pub frames_rejected: AtomicU64,
    /// Frames that decoded but made no sense (empty, second Hello, bad
    /// LocalBlock).
    pub frames_invalid: AtomicU64,
    /// Events agents reported dropped from their spools.
    pub spool_lost_events: AtomicU64,
    /// Own addresses dropped from `Hello`/`EnrollRequest` (over the limit, or
    /// not a host's unicast address).
    pub addresses_dropped: AtomicU64,
    /// Batches refused because their seq jumped too far ahead.
    pub seq_jumps_refused: AtomicU64,
    /// Agents' reports and how they were stored ([`crate::applied`]).
    pub reports: crate::applied::ReportStats,
}

impl Stats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Everything a session needs, shared by all sessions of a server.
#[derive(Debug)]
struct Shared {
    pool: PgPool,
    ingest: Ingest,
    hub: Hub,
    correlator: Correlator,
    backlog: Backlog,
    heartbeat: Duration,
    stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
    /// The replica serving the sessions (`agents.replica_id`).
    replica_id: Option<Uuid>,
    reports: Reports,
    /// Heartbeats of all sessions, written together.
    heartbeats: Heartbeats,
}

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    /// A service on `pool`; sessions end when `stop` becomes true. Abuse
    /// addresses of stored batches go to `backlog`; local blocks go to
    /// `correlator` at once. Events older than `max_event_age` are rejected.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: PgPool,
        hub: Hub,
        correlator: Correlator,
        backlog: Backlog,
        heartbeat: Duration,
        stop: watch::Receiver<bool>,
        stats: Arc<Stats>,
        max_event_age: Duration,
    ) -> Self {
        let ingest = Ingest::new(pool.clone()).with_max_event_age(max_event_age);
        let reports = Reports::new(stats.clone());
        let heartbeats = Heartbeats::new(pool.clone());
        Service {
            shared: Arc::new(Shared {
                pool,
                ingest,
                hub,
                correlator,
                backlog,
                heartbeat,
                stop,
                stats,
                replica_id: None,
                reports,
                heartbeats,
            }),
        }
    }

    /// Records `replica` as the server of this service's sessions
    /// (`agents.replica_id`, read by the stale-session sweep). Call before
    /// the service is cloned; later calls change nothing.
    pub fn with_replica(mut self, replica: Uuid) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.replica_id = Some(replica),
            None => warn!("The replica id was set after the service was shared; sessions do not record it."),
        }
        self
    }

    /// The agents' pending reports; the server runs their writer
    /// ([`Reports::run`]).
    pub fn reports(&self) -> Reports {
        self.shared.reports.clone()
    }

    /// The database pool.
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<ServerFrame, Status>> + Send + 'static>>;

fn unavailable(error: impl std::fmt::Display, what: &str) -> Status {
    error!(%error, "{what}");
    Status::unavailable("the server's database is unavailable; retry later")
}

/// The agent id and secret of a `Connect` call.
fn credentials<T>(request: &Request<T>) -> Result<(Uuid, &str), Status> {
    let md = request.metadata();
    let id = md
        .get(AGENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v.trim()).ok())
        .ok_or_else(|| Status::unauthenticated(format!("missing or malformed {AGENT_ID_HEADER}")))?;
    let secret = md
        .get(AGENT_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Status::unauthenticated(format!("missing {AGENT_SECRET_HEADER}")))?;
    Ok((id, secret))
}

#[tonic::async_trait]
impl AgentService for Service {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let req = request.into_inner();
        let mut addresses = Vec::with_capacity(req.addresses.len());
        for a in &req.addresses {
            addresses.push(IpAddr::try_from(a).map_err(|e| Status::invalid_argument(format!("addresses: {e}")))?);
        }
        let addresses = own_addresses(&self.shared.stats, None, &req.hostname, addresses);
        let enrollment = auth::Enrollment {
            token: &req.token,
            name: Some(req.name.as_str()),
            host_id: Some(req.host_id.as_str()),
            hostname: &req.hostname,
            version: &req.version,
            addresses: &addresses,
        };
        match auth::enroll_agent(&self.shared.pool, &enrollment).await {
            Ok(enrolled) => {
                info!(
                    agent_id = %enrolled.agent_id, name = %Escaped(&enrolled.name), hostname = %Escaped(&req.hostname),
                    version = %Escaped(&req.version), reenrolled = enrolled.reenrolled,
                    "Agent enrolled."
                );
                Ok(Response::new(EnrollResponse {
                    agent_id: enrolled.agent_id.to_string(),
                    agent_secret: enrolled.secret,
                    policy: None,
                    reenrolled: enrolled.reenrolled,
                }))
            }
            Err(AuthError::Database(error)) => Err(unavailable(error, "Enrollment failed.")),
            Err(AuthError::BadRequest(msg)) => Err(Status::invalid_argument(msg)),
            Err(
                error @ (AuthError::NameTaken { .. } | AuthError::HostEnrolled { .. } | AuthError::AgentRevoked { .. }),
            ) => {
                warn!(hostname = %Escaped(&req.hostname), error = %Escaped(&error.to_string()), "Enrollment refused.");
                let status = if matches!(error, AuthError::AgentRevoked { .. }) {
                    Status::permission_denied(error.to_string())
                } else {
                    Status::already_exists(error.to_string())
                };
                Err(status)
            }
            Err(error) => {
                Stats::add(&self.shared.stats.auth_refused, 1);
                warn!(hostname = %Escaped(&req.hostname), %error, "Enrollment refused.");
                Err(Status::unauthenticated(error.to_string()))
            }
        }
    }

    type ConnectStream = FrameStream;

    async fn connect(&self, request: Request<Streaming<AgentFrame>>) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request.remote_addr();
        let (agent_id, secret) = credentials(&request).inspect_err(|_| {
            Stats::add(&self.shared.stats.auth_refused, 1);
        })?;
        match auth::authenticate(&self.shared.pool, agent_id, secret).await {
            Ok(()) => {}
            Err(AuthError::Database(error)) => return Err(unavailable(error, "Cannot authenticate an agent.")),
            Err(error) => {
                Stats::add(&self.shared.stats.auth_refused, 1);
                warn!(%agent_id, peer = ?peer, %error, "Agent session refused.");
                return Err(Status::unauthenticated(error.to_string()));
            }
        }
        let secret_hash = auth::hash_credential(secret);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let session = Session {
            shared: self.shared.clone(),
            agent_id,
            session_id: Uuid::new_v4(),
            secret_hash,
            tx,
            version: 0,
            last_seq: 0,
            last_touch: Instant::now(),
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Why a session ends.
#[derive(Debug)]
enum End {
    /// The agent closed its stream or went away.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// End with this status to the agent.
    Status(Status),
}

struct Session {
    shared: Arc<Shared>,
    agent_id: Uuid,
    session_id: Uuid,
    /// The hash of the secret this session authenticated with; a
    /// re-enrollment replaces the stored one and ends the session.
    secret_hash: Vec<u8>,
    tx: mpsc::Sender<Result<ServerFrame, Status>>,
    /// The blocklist version the agent holds (as far as we have sent).
    version: u64,
    /// The agent's highest stored batch seq (from `Hello` on).
    last_seq: u64,
    last_touch: Instant,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<AgentFrame>) {
        let stats = self.shared.stats.clone();
        Stats::add(&stats.sessions_open, 1);
        let end = self.serve(&mut inbound).await;
        stats.sessions_open.fetch_sub(1, Ordering::Relaxed);
        let agent_id = self.agent_id;
        match &end {
            End::Closed => info!(%agent_id, "Agent session closed."),
            End::Shutdown => info!(%agent_id, "Agent session closed for server shutdown."),
            End::Status(status) => {
                warn!(%agent_id, code = ?status.code(), message = status.message(), "Agent session ended with an error.")
            }
        }
        if let End::Status(status) = end {
            let _ = self.tx.send(Err(status)).await;
        }
        let result =
            sqlx::query("update agents set connected = false, last_seen = now() where id = $1 and session_id = $2")
                .bind(self.agent_id)
                .bind(self.session_id)
                .execute(&self.shared.pool)
                .await;
        if let Err(error) = result {
            warn!(%error, %agent_id, "Cannot mark the agent disconnected; the stale-session sweep will.");
        }
    }

    async fn send(&self, frame: Out) -> Result<(), End> {
        self.tx.send(Ok(ServerFrame { frame: Some(frame) })).await.map_err(|_| End::Closed)
    }

    /// Reads one frame, counting a frame that cannot be decoded.
    fn inbound_error(&self, status: Status) -> End {
        // The client cancelling or resetting its stream is a normal way to go.
        if matches!(status.code(), Code::Cancelled) || is_transport_error(&status) {
            return End::Closed;
        }
        Stats::add(&self.shared.stats.frames_rejected, 1);
        let message = format!("frame refused: {}", status.message());
        match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => End::Status(Status::resource_exhausted(message)),
            Code::Internal | Code::InvalidArgument | Code::DataLoss => End::Status(Status::invalid_argument(message)),
            _ => End::Closed,
        }
    }

    async fn serve(&mut self, inbound: &mut Streaming<AgentFrame>) -> End {
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Err(_) => return End::Status(Status::deadline_exceeded("no Hello received")),
            Ok(None) => return End::Closed,
            Ok(Some(Err(status))) => return self.inbound_error(status),
            Ok(Some(Ok(frame))) => frame,
        };
        let Some(Frame::Hello(hello)) = first.frame else {
            Stats::add(&self.shared.stats.frames_invalid, 1);
            return End::Status(Status::failed_precondition("the first frame of a session must be Hello"));
        };
        let mut sub = match self.hello(hello).await {
            Ok(sub) => sub,
            Err(end) => return end,
        };

        let idle = self.shared.heartbeat * 3;
        let mut stop = self.shared.stop.clone();
        // Pushes go first: an agent with a backlog always has a next batch,
        // and its blocks must not wait behind it. The hub bounds an agent's
        // queued pushes, but they may keep coming; after PUSH_BURST pushes
        // in a row, a frame the agent already sent is handled first.
        let mut pushes_in_row = 0usize;
        // The batch being stored, if any. It is polled here beside the pushes
        // instead of awaited, so that a session waiting for one of ingest's
        // writer slots (seconds when the fleet offers more batches than the
        // database stores) still forwards blocks. The agent's next frame is
        // read only once it is stored and acked, so acks stay in seq order.
        let mut storing: Option<Storing> = None;
        loop {
            if storing.is_none() && pushes_in_row >= PUSH_BURST {
                pushes_in_row = 0;
                if let Some(frame) = inbound.next().now_or_never()
                    && let Err(end) = self.take(frame, &mut storing).await
                {
                    return end;
                }
            }
            tokio::select! {
                biased;
                _ = wait_stop(&mut stop) => {
                    if let Some(store) = storing.take() {
                        let (seq, result) = store.await;
                        if let Err(end) = self.batch_done(seq, result).await {
                            return end;
                        }
                    }
                    return self.drain(inbound).await;
                }
                push = sub.rx.recv() => match push {
                    Some(push) => {
                        pushes_in_row += 1;
                        self.version = sub.resume(self.version);
                        if let Err(end) = self.push(&sub, push).await {
                            return end;
                        }
                        sub.open(self.version);
                    }
                    None => return End::Status(Status::aborted("replaced by a newer session of the same agent")),
                },
                (seq, result) = async {
                    match storing.as_mut() {
                        Some(store) => store.await,
                        None => std::future::pending().await,
                    }
                }, if storing.is_some() => {
                    storing = None;
                    if let Err(end) = self.batch_done(seq, result).await {
                        return end;
                    }
                }
                frame = tokio::time::timeout(idle, inbound.next()), if storing.is_none() => {
                    pushes_in_row = 0;
                    let Ok(frame) = frame else {
                        return End::Status(Status::deadline_exceeded(format!(
                            "no frame for {} s; heartbeat every {} s",
                            idle.as_secs(),
                            self.shared.heartbeat.as_secs()
                        )));
                    };
                    if let Err(end) = self.take(frame, &mut storing).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Handles what the inbound stream yielded; a batch is not awaited but
    /// starts storing in `storing` (see [`Session::serve`]).
    async fn take(
        &mut self,
        frame: Option<Result<AgentFrame, Status>>,
        storing: &mut Option<Storing>,
    ) -> Result<(), End> {
        match frame {
            Some(Ok(AgentFrame { frame: Some(Frame::Batch(batch)) })) => {
                if let Some(batch) = self.admit_batch(batch).await? {
                    let shared = self.shared.clone();
                    let agent_id = self.agent_id;
                    let seq = batch.seq;
                    *storing = Some(Box::pin(async move { (seq, shared.ingest.store(agent_id, batch).await) }));
                }
                Ok(())
            }
            other => self.inbound(other).await,
        }
    }

    /// Handles what the inbound stream yielded.
    async fn inbound(&mut self, frame: Option<Result<AgentFrame, Status>>) -> Result<(), End> {
        match frame {
            None => Err(End::Closed),
            Some(Err(status)) => Err(self.inbound_error(status)),
            Some(Ok(frame)) => self.frame(frame).await,
        }
    }

    /// At shutdown: handles (and acks) the frames the agent already sent,
    /// until it pauses or [`DRAIN_LIMIT`] passes.
    async fn drain(&mut self, inbound: &mut Streaming<AgentFrame>) -> End {
        let deadline = Instant::now() + DRAIN_LIMIT;
        while Instant::now() < deadline {
            match tokio::time::timeout(DRAIN_PAUSE, inbound.next()).await {
                Ok(Some(Ok(frame))) => {
                    if let Err(end) = self.frame(frame).await {
                        return end;
                    }
                }
                Ok(Some(Err(status))) => return self.inbound_error(status),
                Ok(None) => return End::Closed,
                Err(_) => break,
            }
        }
        End::Shutdown
    }

    /// Records the agent, registers for pushes, welcomes it and brings its
    /// blocklist up to date.
    async fn hello(&mut self, hello: Hello) -> Result<Subscription, End> {
        let agent_id = self.agent_id;
        if !hello.agent_id.is_empty() && Uuid::parse_str(&hello.agent_id).ok() != Some(agent_id) {
            Stats::add(&self.shared.stats.frames_invalid, 1);
            return Err(End::Status(Status::unauthenticated("Hello.agent_id does not match the credentials")));
        }
        let mut addresses = Vec::with_capacity(hello.addresses.len());
        for a in &hello.addresses {
            match IpAddr::try_from(a) {
                Ok(ip) => addresses.push(ip),
                Err(error) => {
                    Stats::add(&self.shared.stats.frames_invalid, 1);
                    return Err(End::Status(Status::invalid_argument(format!("Hello.addresses: {error}"))));
                }
            }
        }
        if let Err(error) = auth::check_host_fields(&hello.hostname, &hello.version, addresses.len()) {
            Stats::add(&self.shared.stats.frames_invalid, 1);
            return Err(End::Status(Status::invalid_argument(format!("Hello: {error}"))));
        }
        let addresses = own_addresses(&self.shared.stats, Some(agent_id), &hello.hostname, addresses);
        let last_acked = self
            .record_hello(&hello, &addresses)
            .await
            .map_err(|error| End::Status(unavailable(error, "Cannot record an agent's Hello.")))?;
        self.last_seq = last_acked;
        // Register before reading the version, so that no change committed
        // from here on can be missed.
        let mut sub = self.shared.hub.subscribe(agent_id, self.tx.clone());
        info!(
            %agent_id, hostname = %Escaped(&hello.hostname), version = %Escaped(&hello.version),
            blocklist_version = hello.blocklist_version, last_acked, "Agent session open."
        );
        self.send(Out::Welcome(Welcome {
            server_version: crate::VERSION.to_owned(),
            last_acked_seq: last_acked,
            heartbeat_secs: self.shared.heartbeat.as_secs().max(1) as u32,
        }))
        .await?;
        // The agent's local IPv6 blocks must cover the same prefix the fleet
        // blocks; the rules the operator configured and the shadow flags go
        // along; every other threshold stays the agent's own (zero = keep).
        self.send(Out::Policy(self.shared.correlator.config().agent_policy())).await?;
        self.send_allowlist().await?;
        self.version = hello.blocklist_version;
        let current = blocks::current_version(&self.shared.pool)
            .await
            .map_err(|error| End::Status(unavailable(error, "Cannot read the blocklist version.")))?;
        if self.version == 0 || self.version > current {
            self.send_snapshot().await?;
        } else if self.version < current {
            self.catch_up().await?;
        }
        // From here the hub sends the agent what needs nothing of this task.
        sub.open(self.version);
        Ok(sub)
    }

    /// Stores the Hello on the agent's row; returns the highest stored seq.
    async fn record_hello(&self, hello: &Hello, addresses: &[IpAddr]) -> Result<u64, sqlx::Error> {
        let mut tx = self.shared.pool.begin().await?;
        sqlx::query(
            "update agents set connected = true, last_seen = now(), version = $2, hostname = $3, \
             blocklist_version = $4, session_id = $5, replica_id = $6 where id = $1",
        )
        .bind(self.agent_id)
        .bind(&hello.version)
        .bind(&hello.hostname)
        .bind(i64::try_from(hello.blocklist_version).unwrap_or(i64::MAX))
        .bind(self.session_id)
        .bind(self.shared.replica_id)
        .execute(&mut *tx)
        .await?;
        auth::replace_addresses(&mut tx, self.agent_id, addresses).await?;
        let last: Option<i64> = sqlx::query_scalar("select max(seq) from agent_batches where agent_id = $1")
            .bind(self.agent_id)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(last.unwrap_or(0).max(0) as u64)
    }

    async fn send_snapshot(&mut self) -> Result<(), End> {
        // The agent may have missed the deltas that carried recent
        // revocations; they go first, so its own local blocks of those
        // ranges are dropped together with the snapshot.
        let revoked = blocks::recent_revocations(&self.shared.pool)
            .await
            .map_err(|error| End::Status(unavailable(error, "Cannot read revoked blocks.")))?;
        if !revoked.revocations.is_empty() {
            self.send(Out::Revocations(revoked)).await?;
        }
        let snapshot = blocks::snapshot(&self.shared.pool)
            .await
            .map_err(|error| End::Status(unavailable(error, "Cannot read the blocklist snapshot.")))?;
        self.version = snapshot.version;
        debug!(agent_id = %self.agent_id, version = snapshot.version, entries = snapshot.entries.len(), "Sending a blocklist snapshot.");
        self.send(Out::Snapshot(snapshot)).await
    }

    /// Sends the changes since the agent's version, or a snapshot when the
    /// change log no longer reaches back that far.
    async fn catch_up(&mut self) -> Result<(), End> {
        let delta = blocks::changes_since(&self.shared.pool, self.version, None)
            .await
            .map_err(|error| End::Status(unavailable(error, "Cannot read block changes.")))?;
        match delta {
            Some(delta) if delta.from_version == self.version => {
                if delta.to_version > self.version {
                    let revoked = blocks::revocations_between(&self.shared.pool, self.version, delta.to_version)
                        .await
                        .map_err(|error| End::Status(unavailable(error, "Cannot read revoked blocks.")))?;
                    if !revoked.revocations.is_empty() {
                        self.send(Out::Revocations(revoked)).await?;
                    }
                    self.version = delta.to_version;
                    self.send(Out::Delta(delta)).await?;
                }
                Ok(())
            }
            _ => self.send_snapshot().await,
        }
    }

    /// The fleet's live allowlist, read now.
    async fn send_allowlist(&mut self) -> Result<(), End> {
        let ranges = crate::push::live_allowlist(&self.shared.pool)
            .await
            .map_err(|error| End::Status(unavailable(error, "Cannot read the allowlist.")))?;
        self.send(Out::Allowlist(crate::push::allowlist_frame(&ranges))).await
    }

    async fn push(&mut self, sub: &Subscription, push: Push) -> Result<(), End> {
        if sub.take_lagged() {
            // Pushes were dropped for this agent: the allowlist may have been
            // among them.
            self.send_allowlist().await?;
            return self.send_snapshot().await;
        }
        match push {
            Push::Allowlist(list) => self.send(Out::Allowlist((*list).clone())).await,
            Push::Revoked => self.check_credentials().await,
            Push::Resync => self.send_snapshot().await,
            // Applying a revocation twice changes nothing on the agent.
            Push::Revocations { to_version, .. } if to_version <= self.version => Ok(()),
            Push::Revocations { revoked, .. } => self.send(Out::Revocations((*revoked).clone())).await,
            Push::Delta(delta) if delta.to_version <= self.version => Ok(()),
            Push::Delta(delta) if delta.from_version == self.version => {
                self.version = delta.to_version;
                self.send(Out::Delta((*delta).clone())).await
            }
            Push::Delta(_) => self.catch_up().await,
        }
    }

    async fn frame(&mut self, frame: AgentFrame) -> Result<(), End> {
        match frame.frame {
            None => {
                Stats::add(&self.shared.stats.frames_invalid, 1);
                self.send(Out::Nack(Nack { seq: 0, reason: "empty frame".into() })).await
            }
            Some(Frame::Hello(_)) => {
                Stats::add(&self.shared.stats.frames_invalid, 1);
                self.send(Out::Nack(Nack { seq: 0, reason: "Hello is only valid as the first frame".into() })).await
            }
            Some(Frame::Batch(batch)) => self.batch(batch).await,
            Some(Frame::LocalBlock(block)) => self.local_block(block).await,
            Some(Frame::Heartbeat(Heartbeat { blocklist_version, firewall_entries, pending_batches })) => {
                debug!(agent_id = %self.agent_id, blocklist_version, firewall_entries, pending_batches, "Heartbeat.");
                self.record(blocklist_version, firewall_entries);
                self.heartbeat().await
            }
            Some(Frame::Applied(Applied { blocklist_version, firewall_entries })) => {
                self.record(blocklist_version, firewall_entries);
                Ok(())
            }
            Some(Frame::SpoolLoss(loss)) => {
                Stats::add(&self.shared.stats.spool_lost_events, loss.dropped_events);
                warn!(
                    agent_id = %self.agent_id, dropped_events = loss.dropped_events,
                    dropped_batches = loss.dropped_batches, "Agent's spool overflowed: events were lost on the host."
                );
                Ok(())
            }
        }
    }

    async fn batch(&mut self, batch: fleetban_proto::v1::EventBatch) -> Result<(), End> {
        let Some(batch) = self.admit_batch(batch).await? else {
            return Ok(());
        };
        let seq = batch.seq;
        let result = self.shared.ingest.store(self.agent_id, batch).await;
        self.batch_done(seq, result).await
    }

    /// Refuses (with a `Nack`) a batch whose seq jumps too far; returns the
    /// batch to store otherwise.
    async fn admit_batch(
        &mut self,
        batch: fleetban_proto::v1::EventBatch,
    ) -> Result<Option<fleetban_proto::v1::EventBatch>, End> {
        let seq = batch.seq;
        let stats = &self.shared.stats;
        if seq > self.last_seq.saturating_add(MAX_SEQ_JUMP) {
            Stats::add(&stats.seq_jumps_refused, 1);
            metrics::counter!(TRUST_REFUSED, "limit" => "seq_jump").increment(1);
            warn!(
                agent_id = %self.agent_id, seq, last_seq = self.last_seq, max_jump = MAX_SEQ_JUMP,
                "Batch refused: its seq jumps too far beyond the agent's last stored batch."
            );
            let reason = format!("seq {seq} is more than {MAX_SEQ_JUMP} beyond the last stored seq {}", self.last_seq);
            self.send(Out::Nack(Nack { seq, reason })).await?;
            return Ok(None);
        }
        Ok(Some(batch))
    }

    /// Acks (or refuses) batch `seq` once its store finished.
    async fn batch_done(&mut self, seq: u64, result: Result<Outcome, BatchError>) -> Result<(), End> {
        let stats = self.shared.stats.clone();
        match result {
            Ok(outcome) => {
                self.last_seq = self.last_seq.max(seq);
                if outcome.duplicate {
                    Stats::add(&stats.batches_duplicate, 1);
                    debug!(agent_id = %self.agent_id, seq, "Duplicate batch acked again.");
                } else {
                    Stats::add(&stats.batches_stored, 1);
                    Stats::add(&stats.events_stored, u64::from(outcome.stored));
                    Stats::add(&stats.events_rejected, u64::from(outcome.rejected));
                }
                let rejections = outcome
                    .rejections
                    .iter()
                    .map(|r| Rejection { reason: r.reason.to_owned(), events: r.events, detail: r.detail.clone() })
                    .collect();
                self.send(Out::Ack(Ack { seq, rejected_events: outcome.rejected, rejections })).await?;
                self.shared.backlog.add(self.agent_id, &outcome.abuse_addresses);
                self.touch();
                Ok(())
            }
            Err(BatchError::Invalid(reason)) => {
                Stats::add(&stats.batches_refused, 1);
                warn!(agent_id = %self.agent_id, seq, reason = %Escaped(&reason), "Batch refused.");
                self.send(Out::Nack(Nack { seq, reason })).await
            }
            Err(BatchError::Database(error)) => Err(End::Status(unavailable(error, "Cannot store a batch."))),
        }
    }

    async fn local_block(&mut self, block: LocalBlock) -> Result<(), End> {
        let cidr = match block.cidr.as_ref().map(IpNet::try_from) {
            Some(Ok(cidr)) => cidr,
            Some(Err(error)) => return self.refuse_frame(format!("LocalBlock.cidr: {error}")).await,
            None => return self.refuse_frame("LocalBlock without cidr".into()).await,
        };
        let reason = truncate(&block.reason, LOCAL_BLOCK_MAX_REASON_BYTES);
        let evidence = truncate(&block.evidence, LOCAL_BLOCK_MAX_EVIDENCE_BYTES);
        if block.shadow {
            info!(agent_id = %self.agent_id, %cidr, reason, "Agent reported a shadow decision.");
            if let Err(error) =
                self.shared.correlator.on_shadow_local_block(self.agent_id, cidr, reason, evidence).await
            {
                warn!(%error, agent_id = %self.agent_id, %cidr, "Cannot record a shadow decision.");
            }
            return Ok(());
        }
        info!(agent_id = %self.agent_id, %cidr, reason, ttl_secs = block.ttl_secs, "Agent reported a local block.");
        self.correlate_local_block(cidr, reason, evidence, block.ttl_secs).await;
        Ok(())
    }

    /// Lets the fleet policy turn an agent's local block into a fleet block.
    async fn correlate_local_block(&self, cidr: IpNet, reason: &str, evidence: &str, ttl_secs: u32) {
        match self.shared.correlator.on_local_block(self.agent_id, cidr, reason, evidence, ttl_secs).await {
            Ok(Some(block)) => {
                info!(agent_id = %self.agent_id, cidr = %block.cidr, block_id = block.id, "Local block made a fleet block.");
            }
            Ok(None) => debug!(agent_id = %self.agent_id, %cidr, "Local block not made a fleet block."),
            Err(error) => warn!(%error, agent_id = %self.agent_id, %cidr, "Correlation of a local block failed."),
        }
    }

    async fn refuse_frame(&self, reason: String) -> Result<(), End> {
        Stats::add(&self.shared.stats.frames_invalid, 1);
        warn!(agent_id = %self.agent_id, reason = %Escaped(&reason), "Frame refused.");
        self.send(Out::Nack(Nack { seq: 0, reason })).await
    }

    /// After the agent's id was announced on the revocation channel (revoked,
    /// removed or re-enrolled): ends the session unless the agent is still
    /// valid with the secret this session authenticated with.
    async fn check_credentials(&self) -> Result<(), End> {
        let valid: Option<bool> =
            sqlx::query_scalar("select revoked_at is null and secret_hash = $2 from agents where id = $1")
                .bind(self.agent_id)
                .bind(&self.secret_hash)
                .fetch_optional(&self.shared.pool)
                .await
                .map_err(|error| End::Status(unavailable(error, "Cannot check an agent's credentials.")))?;
        match valid {
            Some(true) => Ok(()),
            _ => Err(End::Status(Status::unauthenticated("agent revoked, removed or re-enrolled"))),
        }
    }

    /// Records what the agent reports it applied; the row follows within
    /// [`crate::applied::FLUSH_INTERVAL`] without this session waiting.
    fn record(&mut self, blocklist_version: u64, firewall_entries: u64) {
        self.shared.reports.record(self.agent_id, self.session_id, blocklist_version, firewall_entries);
        self.last_touch = Instant::now();
    }

    /// Records a heartbeat: the agent is connected; a revoked agent, or one
    /// whose credentials were replaced by a re-enrollment, is cut off.
    async fn heartbeat(&mut self) -> Result<(), End> {
        let valid = self
            .shared
            .heartbeats
            .beat(self.agent_id, &self.secret_hash)
            .await
            .map_err(|error| End::Status(unavailable(error, "Cannot record a heartbeat.")))?;
        self.last_touch = Instant::now();
        if valid { Ok(()) } else { Err(End::Status(Status::unauthenticated("agent revoked, removed or re-enrolled"))) }
    }

    /// Keeps `last_seen` current while batches flow (at most once per
    /// heartbeat interval; stored with the agents' reports).
    fn touch(&mut self) {
        if self.last_touch.elapsed() < self.shared.heartbeat {
            return;
        }
        self.last_touch = Instant::now();
        self.shared.reports.seen(self.agent_id, self.session_id);
    }
}

/// Resolves once the server stops.
async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Marks agents whose sessions died with their server as disconnected
/// ([`crate::replica::sweep_stale_sessions`]: their replica is gone, or
/// they were silent for three of its heartbeat intervals), every
/// `heartbeat` until `shutdown`. One replica runs it, the leader.
pub async fn run_stale_sweeper(pool: PgPool, heartbeat: Duration, shutdown: impl std::future::Future<Output = ()>) {
    crate::periodic::every(heartbeat, shutdown, || async {
        match crate::replica::sweep_stale_sessions(&pool, heartbeat).await {
            Ok(0) => {}
            Ok(agents) => info!(agents, "Marked agents of silent sessions or gone replicas disconnected."),
            Err(error) => warn!(%error, "Cannot sweep stale agent sessions."),
        }
    })
    .await;
}

/// Whether an inbound stream error is the HTTP/2 transport's (a reset, a
/// GOAWAY, the connection lost): tonic keeps the `h2::Error` as the
/// status's source.
fn is_transport_error(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.downcast_ref::<h2::Error>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_errors_are_told_by_their_type_not_their_text() {
        let reset = Status::from_error(Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)));
        assert!(is_transport_error(&reset), "{reset:?}");
        let lookalike = Status::invalid_argument("h2 protocol error: not really");
        assert!(!is_transport_error(&lookalike));
        assert!(!is_transport_error(&Status::internal("decode error")));
    }
}
