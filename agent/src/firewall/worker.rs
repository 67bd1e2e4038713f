//! The firewall thread: owns the [`Reconciler`] and serialises every change
//! to the backend (firewall commands are blocking and must not interleave).
//!
//! Requests arrive on a bounded channel from detection (local blocks, sent
//! without waiting), from the uplink (snapshots and deltas, answered through
//! a oneshot so the uplink can report `Applied`), and from the wiring
//! (exclusions, stop). Between requests the thread runs the full reconcile
//! every `reconcile_interval` and persists the blocklist. A local block is
//! applied first and then reported to the server as `LocalBlock`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetban_proto::v1::{Applied, BlocklistDelta, BlocklistSnapshot, LocalBlock};
use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::reconcile::{DeltaOutcome, FirewallStats, Reconciler};
use super::{Entry, now_ms};

/// Requests queued towards the firewall thread.
const QUEUE: usize = 4096;

/// What the uplink learns from a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaReply {
    /// Applied: report this.
    Applied(Applied),
    /// Already held.
    Stale,
    /// Not at the delta's base version: resynchronise.
    Gap,
    /// The firewall failed; the message says why.
    Failed(String),
}

/// A request to the firewall thread.
#[derive(Debug)]
pub enum Request {
    /// Replace the fleet blocklist.
    Snapshot(BlocklistSnapshot, oneshot::Sender<Result<Applied, String>>),
    /// Apply a delta.
    Delta(BlocklistDelta, oneshot::Sender<DeltaReply>),
    /// Block locally now, then report `report` to the server.
    Local(Entry, Option<LocalBlock>),
    /// A shadow-mode decision: block nothing, only report it to the server.
    Report(LocalBlock),
    /// Operators revoked blocks `(range, revoked at, unix ms)`: drop the
    /// local blocks made before (see [`Reconciler::revoke_local`]).
    Revoke(Vec<(IpNet, i64)>),
    /// Replace the never-blocked ranges.
    Exclusions(Vec<IpNet>),
    /// Run a full reconcile now.
    Reconcile(oneshot::Sender<Result<usize, String>>),
}

/// A cheap, cloneable handle to the firewall thread.
#[derive(Debug, Clone)]
pub struct FirewallHandle {
    tx: SyncSender<Request>,
    stats: Arc<FirewallStats>,
    /// Local blocks dropped because the queue was full.
    pub dropped: Arc<AtomicU64>,
}

impl FirewallHandle {
    /// Queues a request without waiting; `false` (and counted) when the
    /// queue is full or the thread is gone.
    pub fn try_send(&self, request: Request) -> bool {
        match self.tx.try_send(request) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues a request, waiting for room (from async code).
    pub async fn send(&self, request: Request) -> bool {
        match self.tx.try_send(request) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(request)) => {
                let tx = self.tx.clone();
                tokio::task::spawn_blocking(move || tx.send(request).is_ok()).await.unwrap_or(false)
            }
        }
    }

    /// Applies a snapshot and waits for the outcome.
    pub async fn snapshot(&self, snapshot: BlocklistSnapshot) -> Result<Applied, String> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Request::Snapshot(snapshot, reply)).await {
            return Err("the firewall thread is gone".into());
        }
        rx.await.unwrap_or_else(|_| Err("the firewall thread is gone".into()))
    }

    /// Applies a delta and waits for the outcome.
    pub async fn delta(&self, delta: BlocklistDelta) -> DeltaReply {
        let (reply, rx) = oneshot::channel();
        if !self.send(Request::Delta(delta, reply)).await {
            return DeltaReply::Failed("the firewall thread is gone".into());
        }
        rx.await.unwrap_or_else(|_| DeltaReply::Failed("the firewall thread is gone".into()))
    }

    /// Runs a full reconcile and waits for it.
    pub async fn reconcile(&self) -> Result<usize, String> {
        let (reply, rx) = oneshot::channel();
        if !self.send(Request::Reconcile(reply)).await {
            return Err("the firewall thread is gone".into());
        }
        rx.await.unwrap_or_else(|_| Err("the firewall thread is gone".into()))
    }

    /// The blocklist version the firewall holds.
    pub fn version(&self) -> u64 {
        self.stats.version.load(Ordering::Relaxed)
    }

    /// Entries the firewall holds.
    pub fn entries(&self) -> u64 {
        self.stats.entries.load(Ordering::Relaxed)
    }

    /// The counters.
    pub fn stats(&self) -> Arc<FirewallStats> {
        self.stats.clone()
    }
}

/// Options of the firewall thread.
#[derive(Debug)]
pub struct WorkerOptions {
    /// Interval of the full reconcile.
    pub reconcile_interval: Duration,
    /// Where local blocks are reported (the uplink); `None` = nowhere.
    pub reports: Option<mpsc::Sender<LocalBlock>>,
    /// Told the range of every local block once its commit returned (for
    /// benchmarks and tests).
    pub applied: Option<std::sync::mpsc::Sender<(IpNet, Instant)>>,
    /// Told the outcome of the reconcile at start (changes made, or why it
    /// failed) as soon as it returns; the agent reports itself ready to
    /// systemd only then.
    pub started: Option<oneshot::Sender<Result<usize, String>>>,
}

/// The running firewall thread.
#[derive(Debug)]
pub struct Worker {
    handle: FirewallHandle,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread: a full reconcile first, then requests.
    pub fn start(reconciler: Reconciler, options: WorkerOptions) -> std::io::Result<Worker> {
        let (tx, rx) = sync_channel(QUEUE);
        let stats = reconciler.stats();
        let thread = std::thread::Builder::new()
            .name("fleetban-firewall".into())
            .spawn(move || worker_loop(reconciler, rx, options))?;
        Ok(Worker { handle: FirewallHandle { tx, stats, dropped: Arc::default() }, thread: Some(thread) })
    }

    /// A handle for senders.
    pub fn handle(&self) -> FirewallHandle {
        self.handle.clone()
    }

    /// Stops the thread once every handle is dropped and the queue is
    /// drained; entries stay in the firewall.
    pub fn join(mut self) {
        drop(self.handle);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("The firewall thread panicked.");
        }
    }
}

fn worker_loop(mut reconciler: Reconciler, rx: Receiver<Request>, mut options: WorkerOptions) {
    let backend = reconciler.backend_name();
    let outcome = match reconciler.reconcile(now_ms()) {
        Ok(changes) => {
            info!(backend, changes, entries = reconciler.entries(), "Firewall reconciled at start.");
            Ok(changes)
        }
        Err(error) => {
            error!(%error, backend, "Cannot reconcile the firewall at start; retrying periodically.");
            Err(error.to_string())
        }
    };
    if let Some(started) = options.started.take() {
        let _ = started.send(outcome);
    }
    let mut next_reconcile = Instant::now() + options.reconcile_interval;
    loop {
        let wait = next_reconcile.saturating_duration_since(Instant::now()).min(Duration::from_secs(1));
        match rx.recv_timeout(wait) {
            Ok(request) => handle(&mut reconciler, request, &options),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if Instant::now() >= next_reconcile {
            let now = now_ms();
            reconciler.expire(now);
            if let Err(error) = reconciler.reconcile(now) {
                error!(%error, backend, "Firewall reconcile failed.");
            }
            next_reconcile = Instant::now() + options.reconcile_interval;
        }
        reconciler.persist(false);
    }
    if let Err(error) = reconciler.shutdown() {
        warn!(%error, backend, "Firewall shutdown failed.");
    }
    info!(backend, entries = reconciler.entries(), "Firewall thread stopped; entries left in place.");
}

fn handle(reconciler: &mut Reconciler, request: Request, options: &WorkerOptions) {
    let applied = |r: &Reconciler| Applied { blocklist_version: r.version(), firewall_entries: r.entries() as u64 };
    match request {
        Request::Snapshot(snapshot, reply) => {
            let result = reconciler.apply_snapshot(&snapshot, now_ms()).map(|_| applied(reconciler));
            let _ = reply.send(result.map_err(|error| error.to_string()));
        }
        Request::Delta(delta, reply) => {
            let result = match reconciler.apply_delta(&delta, now_ms()) {
                Ok(DeltaOutcome::Applied) => DeltaReply::Applied(applied(reconciler)),
                Ok(DeltaOutcome::Stale) => DeltaReply::Stale,
                Ok(DeltaOutcome::Gap) => DeltaReply::Gap,
                Err(error) => DeltaReply::Failed(error.to_string()),
            };
            let _ = reply.send(result);
        }
        Request::Local(entry, report) => {
            let net = entry.net;
            let reason = entry.reason.clone();
            match reconciler.add_local(entry, now_ms()) {
                Ok(_) => info!(%net, %reason, "Blocked locally."),
                Err(error) => error!(%error, %net, "Cannot apply a local block."),
            }
            if let Some(applied) = &options.applied {
                let _ = applied.send((net, Instant::now()));
            }
            if let (Some(report), Some(reports)) = (report, &options.reports)
                && reports.try_send(report).is_err()
            {
                warn!(%net, "Local block not reported: the uplink queue is full.");
            }
        }
        Request::Report(report) => {
            if let Some(reports) = &options.reports
                && reports.try_send(report).is_err()
            {
                warn!("Shadow decision not reported: the uplink queue is full.");
            }
        }
        Request::Revoke(revoked) => match reconciler.revoke_local(&revoked, now_ms()) {
            Ok(dropped) => {
                for entry in dropped {
                    info!(net = %entry.net, reason = %entry.reason, "Local block dropped: an operator revoked it.");
                }
            }
            Err(error) => error!(%error, "Cannot drop revoked local blocks."),
        },
        Request::Exclusions(exclude) => {
            if let Err(error) = reconciler.set_exclusions(exclude, now_ms()) {
                error!(%error, "Cannot apply the new exclusions.");
            }
        }
        Request::Reconcile(reply) => {
            let now = now_ms();
            reconciler.expire(now);
            let _ = reply.send(reconciler.reconcile(now).map_err(|error| error.to_string()));
        }
    }
}
