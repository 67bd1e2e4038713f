//! Fan-out of blocklist changes to the agents connected to this server.
//!
//! Every block change is a row of `block_changes` whose insert notifies
//! `fleetban_blocks` with its version when the transaction commits. Each
//! server process runs one [`run_listener`] task that LISTENs on that channel,
//! reads the changes since the last version it fanned out (one query for all
//! agents), and offers the resulting delta to every connected session through
//! a per-agent bounded channel.
//!
//! Invariants:
//! - A slow agent never delays the others: deltas are offered with
//!   `try_send`; when an agent's channel is full it is marked lagged and
//!   receives a full snapshot as soon as it drains, instead of the deltas it
//!   missed.
//! - The common case costs no hop through the session's task: while a
//!   session's *gate* is open (it has no push waiting and is not bringing its
//!   agent up to date itself), a delta that starts at the version the agent
//!   holds, revocations and the allowlist go straight onto the session's
//!   outbound stream, and the gate's version moves with the delta. Anything
//!   else (a gap, a resync, a revocation of the agent, a full outbound
//!   stream) closes the gate and is queued for the session's task, which
//!   handles it and every push behind it in order and reopens the gate only
//!   when its queue is empty. The gate's lock makes "queue empty" and
//!   "version" one decision, so a push never overtakes an earlier one.
//! - The listener reads changes over a connection of its own, outside the
//!   pool: under a fleet's ingest the pool can be busy to its last
//!   connection, and a block must not wait behind batches for one.
//! - Nothing is lost when the LISTEN connection drops: the listener
//!   reconnects with backoff and then catches up from the version it had
//!   fanned out, and a slow poll of the current version backs up
//!   notifications in any case.
//! - A session applies a delta only if it starts at the version the agent
//!   holds; otherwise it reads the missing changes itself (or sends a
//!   snapshot when they were compacted away). Versions become visible in
//!   commit order (see the `block_changes` trigger), so "since version N" is
//!   exact.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetban_proto::v1::server_frame::Frame as Out;
use fleetban_proto::v1::{Allowlist, BlocklistDelta, Revocations, ServerFrame};
use ipnet::IpNet;
use sqlx::postgres::PgListener;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::blocks;

/// The notification channel block changes are announced on.
pub const CHANNEL: &str = "fleetban_blocks";
/// The notification channel allowlist changes are announced on (a trigger on
/// `allowlist`).
pub const ALLOWLIST_CHANNEL: &str = "fleetban_allowlist";
/// The notification channel revoked agents' ids are announced on (a trigger
/// on `agents`).
pub const REVOKED_CHANNEL: &str = "fleetban_revoked";
/// Deltas queued per agent before it is considered lagged.
pub const AGENT_QUEUE: usize = 64;
/// How often the listener compares its version with the database's, as a
/// backstop for notifications.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// What a session is told by the hub.
#[derive(Debug, Clone)]
pub enum Push {
    /// Changes every agent on this server should apply.
    Delta(Arc<BlocklistDelta>),
    /// Blocks an operator revoked, sent ahead of the delta up to
    /// `to_version` that removes them (agents drop their own local blocks of
    /// these ranges). A session whose agent already holds `to_version` (it
    /// got them with its catch-up) skips them.
    Revocations {
        /// The revoked blocks.
        revoked: Arc<Revocations>,
        /// The version of the delta they come with.
        to_version: u64,
    },
    /// The change log cannot serve a delta; send a snapshot.
    Resync,
    /// The fleet's live allowlist changed; send it.
    Allowlist(Arc<Allowlist>),
    /// The agent was revoked; end its session.
    Revoked,
}

/// What became of one push offered to one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offered {
    /// Written onto the session's stream.
    Direct,
    /// Queued for the session's task.
    Queued,
    /// Not needed (the agent holds it), or dropped for a session already
    /// marked lagged.
    Skipped,
    /// Dropped; the session was marked lagged and sends a snapshot.
    Lagged,
    /// The session is ending.
    Gone,
}

/// A session's outbound stream, as the hub writes to it directly.
pub type Outbound = mpsc::Sender<Result<ServerFrame, Status>>;

/// Whether the hub may write to a session's outbound stream itself.
#[derive(Debug)]
struct Gate {
    /// The session has nothing queued and is not sending blocklist frames of
    /// its own.
    open: bool,
    /// The blocklist version the agent holds; valid while `open`, and what
    /// the session resumes from when the hub closes the gate.
    version: u64,
}

/// What the hub and one session share.
#[derive(Debug)]
struct Shared {
    gate: Mutex<Gate>,
    lagged: AtomicBool,
    out: Outbound,
}

#[derive(Debug)]
struct Registered {
    session: u64,
    tx: mpsc::Sender<Push>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: Mutex<HashMap<Uuid, Registered>>,
    next_session: AtomicU64,
    /// Highest version fanned out by the listener.
    version: AtomicU64,
    /// Deltas fanned out.
    deltas: AtomicU64,
    /// Agents marked lagged because their queue was full.
    lagged: AtomicU64,
    /// Pushes written straight onto a session's outbound stream.
    direct: AtomicU64,
    /// Pushes queued for a session's task.
    queued: AtomicU64,
    /// Times the LISTEN connection was (re)established.
    listens: AtomicU64,
}

/// The registry of connected sessions; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// A session's registration; dropping it unregisters the session (unless a
/// newer session of the same agent replaced it).
#[derive(Debug)]
pub struct Subscription {
    hub: Hub,
    agent_id: Uuid,
    session: u64,
    /// Pushes the hub could not deliver itself; the gate is closed while
    /// any wait here.
    pub rx: mpsc::Receiver<Push>,
    shared: Arc<Shared>,
    /// The session opened the gate since it last resumed.
    handed_over: bool,
}

impl Subscription {
    /// True once if the agent's queue overflowed since the last call: it
    /// must get a snapshot.
    pub fn take_lagged(&self) -> bool {
        self.shared.lagged.swap(false, Ordering::AcqRel)
    }

    /// The version the agent holds, for a session that received a queued
    /// push and held `version` when it last called [`Subscription::open`]:
    /// the gate's version if the gate was open since (the hub moved it with
    /// every delta it sent; it closed the gate when it queued the push, so
    /// it no longer moves), else `version`.
    pub fn resume(&mut self, version: u64) -> u64 {
        if std::mem::take(&mut self.handed_over) { lock(&self.shared.gate).version } else { version }
    }

    /// Hands delivery back to the hub, the agent holding `version`, unless a
    /// push is waiting in [`Subscription::rx`] (then the session handles it
    /// first and calls this again). Returns whether the gate is open.
    pub fn open(&mut self, version: u64) -> bool {
        let mut gate = lock(&self.shared.gate);
        if !self.rx.is_empty() {
            return false;
        }
        gate.version = version;
        gate.open = true;
        self.handed_over = true;
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut sessions = lock(&self.hub.inner.sessions);
        if sessions.get(&self.agent_id).is_some_and(|r| r.session == self.session) {
            sessions.remove(&self.agent_id);
        }
    }
}

/// Counters of the hub, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Sessions registered now.
    pub sessions: usize,
    /// Highest version fanned out.
    pub version: u64,
    /// Deltas fanned out.
    pub deltas: u64,
    /// Times an agent was marked lagged.
    pub lagged: u64,
    /// Pushes written by the hub straight onto a session's stream.
    pub direct: u64,
    /// Pushes queued for a session's task.
    pub queued: u64,
    /// Times the LISTEN connection was established (1 + reconnections).
    pub listens: u64,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Hub::default()
    }

    /// Registers a session of `agent_id` writing to `out`, replacing (and so
    /// ending) an older session of the same agent on this server. The gate
    /// starts closed: pushes are queued until the session has welcomed its
    /// agent and calls [`Subscription::open`].
    pub fn subscribe(&self, agent_id: Uuid, out: Outbound) -> Subscription {
        let session = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(AGENT_QUEUE);
        let shared = Arc::new(Shared {
            gate: Mutex::new(Gate { open: false, version: 0 }),
            lagged: AtomicBool::new(false),
            out,
        });
        let registered = Registered { session, tx, shared: shared.clone() };
        let old = lock(&self.inner.sessions).insert(agent_id, registered);
        if old.is_some() {
            info!(%agent_id, "A new session of the agent replaces its previous one.");
        }
        Subscription { hub: self.clone(), agent_id, session, rx, shared, handed_over: false }
    }

    /// The hub's counters.
    pub fn stats(&self) -> HubStats {
        HubStats {
            sessions: lock(&self.inner.sessions).len(),
            version: self.inner.version.load(Ordering::Relaxed),
            deltas: self.inner.deltas.load(Ordering::Relaxed),
            lagged: self.inner.lagged.load(Ordering::Relaxed),
            direct: self.inner.direct.load(Ordering::Relaxed),
            queued: self.inner.queued.load(Ordering::Relaxed),
            listens: self.inner.listens.load(Ordering::Relaxed),
        }
    }

    /// Ends the session of `agent_id` on this server, if it has one. Sent
    /// without waiting; a session whose queue is full is cut off by its
    /// next heartbeat instead (the session checks revocation there too).
    pub fn revoke(&self, agent_id: Uuid) -> bool {
        let offered = lock(&self.inner.sessions).get(&agent_id).map(|r| self.offer(&agent_id, r, &Push::Revoked));
        self.count([offered.unwrap_or(Offered::Gone)]);
        offered == Some(Offered::Queued)
    }

    /// Offers `push` to every session without waiting for any.
    fn fan_out(&self, push: Push) {
        let sessions = lock(&self.inner.sessions);
        self.count(sessions.iter().map(|(agent_id, r)| self.offer(agent_id, r, &push)));
    }

    /// Adds what became of pushes to the hub's counters and the metrics
    /// (once per fan-out, not per session: the metrics are looked up by name).
    fn count(&self, offered: impl IntoIterator<Item = Offered>) {
        let (mut direct, mut queued, mut lagged) = (0u64, 0u64, 0u64);
        for o in offered {
            match o {
                Offered::Direct => direct += 1,
                Offered::Queued => queued += 1,
                Offered::Lagged => lagged += 1,
                Offered::Skipped | Offered::Gone => {}
            }
        }
        self.inner.direct.fetch_add(direct, Ordering::Relaxed);
        self.inner.queued.fetch_add(queued, Ordering::Relaxed);
        self.inner.lagged.fetch_add(lagged, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::PUSH_DELIVERIES, "path" => "direct").increment(direct);
        metrics::counter!(crate::telemetry::PUSH_DELIVERIES, "path" => "queued").increment(queued);
        metrics::counter!(crate::telemetry::PUSH_LAGGED).increment(lagged);
    }

    /// Delivers `push` to one session: straight onto its stream while its
    /// gate is open and the push needs nothing of the session, otherwise
    /// through its queue (closing the gate, so later pushes queue behind).
    fn offer(&self, agent_id: &Uuid, r: &Registered, push: &Push) -> Offered {
        let mut gate = lock(&r.shared.gate);
        if gate.open {
            let frame = match push {
                Push::Delta(delta) if delta.to_version <= gate.version => return Offered::Skipped,
                Push::Delta(delta) if delta.from_version == gate.version => Some(Out::Delta((**delta).clone())),
                Push::Revocations { to_version, .. } if *to_version <= gate.version => return Offered::Skipped,
                Push::Revocations { revoked, .. } => Some(Out::Revocations((**revoked).clone())),
                Push::Allowlist(list) => Some(Out::Allowlist((**list).clone())),
                Push::Delta(_) | Push::Resync | Push::Revoked => None,
            };
            if let Some(frame) = frame
                && r.shared.out.try_send(Ok(ServerFrame { frame: Some(frame) })).is_ok()
            {
                if let Push::Delta(delta) = push {
                    gate.version = delta.to_version;
                }
                return Offered::Direct;
            }
            gate.open = false;
        }
        match r.tx.try_send(push.clone()) {
            Ok(()) => Offered::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !r.shared.lagged.swap(true, Ordering::AcqRel) {
                    debug!(%agent_id, "Agent's push queue is full; it will get a snapshot.");
                    return Offered::Lagged;
                }
                Offered::Skipped
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offered::Gone,
        }
    }
}

/// LISTENs for block changes and fans them out until `shutdown` resolves,
/// reconnecting whenever the LISTEN connection is lost.
pub async fn run_listener(pool: PgPool, hub: Hub, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(50);
    let mut version = loop {
        tokio::select! {
            _ = &mut shutdown => return,
            v = blocks::current_version(&pool) => match v {
                Ok(v) => break v,
                Err(error) => {
                    warn!(%error, "Cannot read the blocklist version; retrying.");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    };
    hub.inner.version.store(version, Ordering::Relaxed);
    backoff = Duration::from_millis(50);
    let mut reader = Reader::new(pool.clone());
    // Opened now, so the first catch-up after LISTEN does not wait for it.
    let _ = reader.conn().await;
    // The allowlist last fanned out; `None` until read once.
    let mut allowlist: Option<Vec<IpNet>> = None;
    loop {
        let listener = tokio::select! {
            _ = &mut shutdown => return,
            l = listen(&pool) => l,
        };
        let mut listener = match listener {
            Ok(l) => {
                backoff = Duration::from_millis(50);
                hub.inner.listens.fetch_add(1, Ordering::Relaxed);
                l
            }
            Err(error) => {
                warn!(%error, retry_ms = backoff.as_millis() as u64, "Cannot LISTEN for block changes; retrying.");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Changes committed while we were not listening.
        catch_up(&mut reader, &hub, &mut version).await;
        refresh_allowlist(&mut reader, &hub, &mut allowlist, true).await;
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                n = listener.try_recv() => match n {
                    Ok(Some(notification)) => {
                        let (mut newest, mut allowlist_changed) = (0, false);
                        for n in std::iter::once(notification).chain(std::iter::from_fn(|| listener.next_buffered())) {
                            if n.channel() == ALLOWLIST_CHANNEL {
                                allowlist_changed = true;
                            } else if n.channel() == REVOKED_CHANNEL {
                                if let Ok(agent_id) = n.payload().parse::<Uuid>()
                                    && hub.revoke(agent_id)
                                {
                                    info!(%agent_id, "Closing the session of a revoked agent.");
                                }
                            } else {
                                newest = newest.max(n.payload().parse::<u64>().unwrap_or(u64::MAX));
                            }
                        }
                        if newest > version {
                            catch_up(&mut reader, &hub, &mut version).await;
                        }
                        if allowlist_changed {
                            refresh_allowlist(&mut reader, &hub, &mut allowlist, false).await;
                        }
                    }
                    Ok(None) => {
                        warn!("The LISTEN connection for block changes was lost; reconnecting.");
                        break;
                    }
                    Err(error) => {
                        warn!(%error, "The LISTEN connection for block changes failed; reconnecting.");
                        break;
                    }
                },
                _ = poll.tick() => {
                    let current = match reader.conn().await {
                        Ok(conn) => blocks::current_version(conn).await.ok(),
                        Err(_) => None,
                    };
                    if let Some(current) = current && current > version {
                        debug!(current, version, "Block changes found by polling.");
                        catch_up(&mut reader, &hub, &mut version).await;
                    }
                    // Also how entries that expire reach the agents.
                    refresh_allowlist(&mut reader, &hub, &mut allowlist, false).await;
                }
            }
        }
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all([CHANNEL, ALLOWLIST_CHANNEL, REVOKED_CHANNEL]).await?;
    Ok(listener)
}

/// The listener's own database connection, opened with the pool's options
/// on first use and again after any error.
struct Reader {
    pool: PgPool,
    conn: Option<PgConnection>,
}

impl Reader {
    fn new(pool: PgPool) -> Reader {
        Reader { pool, conn: None }
    }

    /// The connection, opened if needed.
    async fn conn(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => PgConnection::connect_with(&self.pool.connect_options()).await.inspect_err(|error| {
                warn!(%error, "Cannot open the connection that reads block changes; the next change retries.");
            })?,
        };
        Ok(self.conn.insert(conn))
    }

    /// Drops the connection after an error; the next use opens a new one.
    fn reset(&mut self) {
        self.conn = None;
    }
}

/// The live allowlist entries, in address order.
pub async fn live_allowlist(db: impl sqlx::PgExecutor<'_>) -> Result<Vec<IpNet>, sqlx::Error> {
    sqlx::query_scalar("select cidr from live_allowlist order by cidr").fetch_all(db).await
}

/// The allowlist as the agents receive it.
pub fn allowlist_frame(ranges: &[IpNet]) -> Allowlist {
    Allowlist { ranges: ranges.iter().map(|r| (*r).into()).collect() }
}

/// Re-reads the live allowlist and fans it out when it differs from `last`
/// (or always, with `force`: after a reconnect notifications may have been
/// missed).
async fn refresh_allowlist(reader: &mut Reader, hub: &Hub, last: &mut Option<Vec<IpNet>>, force: bool) {
    let Ok(conn) = reader.conn().await else { return };
    let read = live_allowlist(conn).await;
    if read.is_err() {
        reader.reset();
    }
    match read {
        Ok(ranges) => {
            if force || last.as_ref() != Some(&ranges) {
                hub.fan_out(Push::Allowlist(Arc::new(allowlist_frame(&ranges))));
                *last = Some(ranges);
            }
        }
        Err(error) => warn!(%error, "Cannot read the allowlist; the next notification or poll retries."),
    }
}

/// The changes after `version`: from the change log, or (from version 0,
/// which the log does not serve) the whole blocklist as additions.
async fn changes_after(conn: &mut PgConnection, version: u64) -> Result<Option<BlocklistDelta>, blocks::BlockError> {
    if version > 0 {
        return blocks::changes_since(conn, version, None).await;
    }
    let snapshot = blocks::snapshot(conn).await?;
    Ok(Some(BlocklistDelta { from_version: 0, to_version: snapshot.version, added: snapshot.entries, removed: vec![] }))
}

/// Reads the changes after `version` and fans them out.
async fn catch_up(reader: &mut Reader, hub: &Hub, version: &mut u64) {
    let Ok(conn) = reader.conn().await else { return };
    if !catch_up_on(conn, hub, version).await {
        reader.reset();
    }
}

/// [`catch_up`] over `conn`; false when a query failed.
async fn catch_up_on(conn: &mut PgConnection, hub: &Hub, version: &mut u64) -> bool {
    match changes_after(conn, *version).await {
        Ok(Some(delta)) => {
            if delta.to_version > *version {
                let from = *version;
                if from > 0 {
                    match blocks::revocations_between(&mut *conn, from, delta.to_version).await {
                        Ok(revoked) if !revoked.revocations.is_empty() => {
                            hub.fan_out(Push::Revocations { revoked: Arc::new(revoked), to_version: delta.to_version });
                        }
                        Ok(_) => {}
                        // The agents still get the delta; a snapshot or a
                        // reconnect carries the revocations later.
                        Err(error) => warn!(%error, "Cannot read revoked blocks."),
                    }
                }
                *version = delta.to_version;
                hub.inner.version.store(*version, Ordering::Relaxed);
                hub.inner.deltas.fetch_add(1, Ordering::Relaxed);
                hub.fan_out(Push::Delta(Arc::new(delta)));
                record_push_lag(conn, from, *version).await;
            }
            true
        }
        Ok(None) => {
            // The change log no longer reaches back to our version.
            match blocks::current_version(conn).await {
                Ok(current) => {
                    *version = current;
                    hub.inner.version.store(current, Ordering::Relaxed);
                    hub.fan_out(Push::Resync);
                    true
                }
                Err(error) => {
                    warn!(%error, "Cannot read the blocklist version.");
                    false
                }
            }
        }
        Err(error) => {
            warn!(%error, version = *version, "Cannot read block changes; the next notification retries.");
            false
        }
    }
}

/// Records `fleetban_push_lag_seconds`: from the oldest change of a delta
/// (its `changed_at`, by the database clock) to its fan-out to the sessions.
async fn record_push_lag(conn: &mut PgConnection, from: u64, to: u64) {
    let lag: Result<Option<f64>, sqlx::Error> = sqlx::query_scalar(
        "select extract(epoch from clock_timestamp() - min(changed_at))::float8 from block_changes \
         where version > $1 and version <= $2",
    )
    .bind(i64::try_from(from).unwrap_or(i64::MAX))
    .bind(i64::try_from(to).unwrap_or(i64::MAX))
    .fetch_one(conn)
    .await;
    match lag {
        Ok(Some(secs)) => metrics::histogram!(crate::telemetry::PUSH_LAG).record(secs.max(0.0)),
        Ok(None) => {}
        Err(error) => debug!(%error, "Cannot measure the push lag."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(from: u64) -> Push {
        Push::Delta(Arc::new(BlocklistDelta { from_version: from, to_version: from + 1, ..Default::default() }))
    }

    fn outbound(capacity: usize) -> (Outbound, mpsc::Receiver<Result<ServerFrame, Status>>) {
        mpsc::channel(capacity)
    }

    /// The version range of the delta `frame` carries.
    fn sent_delta(frame: Option<Result<ServerFrame, Status>>) -> (u64, u64) {
        match frame {
            Some(Ok(ServerFrame { frame: Some(Out::Delta(d)) })) => (d.from_version, d.to_version),
            other => panic!("expected a delta on the stream, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_open_gate_sends_continuing_deltas_straight_to_the_stream() {
        let hub = Hub::new();
        let (out, mut stream) = outbound(16);
        let mut sub = hub.subscribe(Uuid::new_v4(), out);
        // Closed until the session opens it: queued.
        hub.fan_out(delta(5));
        assert!(matches!(sub.rx.try_recv(), Ok(Push::Delta(d)) if d.from_version == 5));
        assert!(stream.try_recv().is_err(), "nothing may reach the stream past a closed gate");
        assert!(sub.open(6));
        for v in 6..10 {
            hub.fan_out(delta(v));
        }
        // A delta the agent already holds is skipped.
        hub.fan_out(delta(3));
        for v in 6..10 {
            assert_eq!(sent_delta(stream.try_recv().ok()), (v, v + 1));
        }
        assert!(stream.try_recv().is_err());
        assert!(sub.rx.is_empty(), "the session's task is not involved");
        assert_eq!(sub.resume(0), 10, "the session resumes from what the hub sent");
        let stats = hub.stats();
        assert_eq!((stats.direct, stats.queued), (4, 1));
    }

    #[tokio::test]
    async fn a_gap_closes_the_gate_and_later_pushes_queue_behind_it_in_order() {
        let hub = Hub::new();
        let (out, mut stream) = outbound(16);
        let mut sub = hub.subscribe(Uuid::new_v4(), out);
        assert!(sub.open(10));
        hub.fan_out(delta(12)); // a gap: 10 → 12
        hub.fan_out(delta(13)); // would continue 12 → 13, but must not overtake
        hub.fan_out(Push::Allowlist(Arc::new(Allowlist::default())));
        assert!(stream.try_recv().is_err(), "nothing overtakes a queued push");
        assert!(matches!(sub.rx.try_recv(), Ok(Push::Delta(d)) if d.from_version == 12));
        assert!(!sub.open(11), "the gate stays closed while pushes wait");
        assert!(matches!(sub.rx.try_recv(), Ok(Push::Delta(d)) if d.from_version == 13));
        assert!(matches!(sub.rx.try_recv(), Ok(Push::Allowlist(_))));
        // The session caught up to 14 itself; the gate reopens there.
        assert_eq!(sub.resume(10), 10, "the gate was never handed over since the session's own version");
        assert!(sub.open(14));
        hub.fan_out(delta(14));
        assert_eq!(sent_delta(stream.try_recv().ok()), (14, 15));
    }

    #[tokio::test]
    async fn revocations_go_ahead_of_their_delta_and_a_revoked_agent_is_queued() {
        let hub = Hub::new();
        let agent = Uuid::new_v4();
        let (out, mut stream) = outbound(16);
        let mut sub = hub.subscribe(agent, out);
        assert!(sub.open(1));
        let revoked = Arc::new(Revocations::default());
        hub.fan_out(Push::Revocations { revoked: revoked.clone(), to_version: 1 });
        hub.fan_out(Push::Revocations { revoked, to_version: 2 });
        hub.fan_out(delta(1));
        assert!(matches!(stream.try_recv(), Ok(Ok(ServerFrame { frame: Some(Out::Revocations(_)) }))));
        assert_eq!(sent_delta(stream.try_recv().ok()), (1, 2));
        assert!(stream.try_recv().is_err(), "revocations up to a version the agent holds are skipped");
        assert!(hub.revoke(agent));
        hub.fan_out(delta(2));
        assert!(matches!(sub.rx.try_recv(), Ok(Push::Revoked)));
        assert!(matches!(sub.rx.try_recv(), Ok(Push::Delta(d)) if d.from_version == 2));
        assert!(stream.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_full_stream_falls_back_to_the_queue_and_an_overflow_to_a_snapshot() {
        let hub = Hub::new();
        let (slow_out, mut slow_stream) = outbound(2);
        let (fast_out, mut fast_stream) = outbound(1);
        let mut slow = hub.subscribe(Uuid::new_v4(), slow_out);
        let mut fast = hub.subscribe(Uuid::new_v4(), fast_out);
        assert!(slow.open(0) && fast.open(0));
        for v in 0..(AGENT_QUEUE as u64 + 10) {
            hub.fan_out(delta(v));
            // The fast agent's session keeps its queue empty and reopens.
            assert_eq!(sent_delta(fast_stream.recv().await), (v, v + 1));
            assert!(fast.rx.is_empty());
        }
        assert_eq!(fast.resume(0), AGENT_QUEUE as u64 + 10);
        // The slow one: two deltas on its stream, the queue filled, then lagged.
        assert_eq!(sent_delta(slow_stream.try_recv().ok()), (0, 1));
        assert_eq!(sent_delta(slow_stream.try_recv().ok()), (1, 2));
        assert_eq!(slow.rx.len(), AGENT_QUEUE);
        assert!(slow.take_lagged(), "an overflowing agent must be resynchronised with a snapshot");
        assert!(!slow.take_lagged(), "the flag is taken once");
        assert!(!fast.take_lagged());
        assert_eq!(slow.resume(0), 2, "the session continues from the last delta on its stream");
        assert_eq!(hub.stats().lagged, 1);
        assert_eq!(hub.stats().sessions, 2);
    }

    #[tokio::test]
    async fn newer_session_replaces_older_and_survives_its_drop() {
        let hub = Hub::new();
        let agent = Uuid::new_v4();
        let mut old = hub.subscribe(agent, outbound(1).0);
        let new = hub.subscribe(agent, outbound(1).0);
        assert!(old.rx.recv().await.is_none(), "the replaced session's channel closes");
        drop(old);
        assert_eq!(hub.stats().sessions, 1, "dropping the old session must not unregister the new one");
        drop(new);
        assert_eq!(hub.stats().sessions, 0);
    }
}
