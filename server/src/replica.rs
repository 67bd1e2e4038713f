//! Server replicas on one Postgres, and the leadership of the fleet-wide
//! sweeps.
//!
//! Any number of `fleetban-server serve` processes may share one database.
//! Most of their work is per process and needs no coordination: each serves
//! its own agent sessions, ingests their batches (exactly-once by `(agent_id,
//! seq)` in the database, whichever replica stores the batch), LISTENs for
//! block changes and pushes them to its own agents. What must happen once
//! for the whole fleet runs on the **leader** only: the stale-session sweep,
//! block expiry, retention and the alert monitor (see `serve::run`).
//!
//! Leadership is a session-level `pg_try_advisory_lock(`[`LEADER_LOCK`]`)`
//! held on a dedicated connection (not one of the pool's). Every replica
//! tries to take it every [`BEAT`]; the holder checks its connection at the
//! same rate. When the leader dies, even by `kill -9`, Postgres ends its
//! session when the connection closes and drops the lock with it, and the
//! next replica to try takes over within a beat or two. A leader that cannot
//! reach its connection steps down at once (and drops the connection, so
//! the lock is released). Postgres is the only arbiter: fleetban adds no
//! consensus of its own. A handover can let the old and the new leader
//! overlap for less than a beat; every leader-only task is safe to run twice
//! at once (row locks with `skip locked`, idempotent deletes), leadership
//! only keeps them from doing the same work on every replica.
//!
//! Each replica also keeps a row in `replicas` (its id, [`Replica::name`],
//! version, heartbeat, the backend pid of its leadership connection, so
//! that `pg_locks` tells who leads), refreshed every [`BEAT`] and
//! deleted at a clean stop; `GET /api/v1/replicas` and `/metrics` show them.
//! An agent's row names the replica serving its session (`agents.replica_id`,
//! set with `session_id` at `Hello`; a session's end clears `connected` only
//! while `session_id` is still its own, so a late end on the replica an agent
//! left cannot undo the replica it moved to). The stale-session sweep marks
//! an agent disconnected when its replica is gone (no row refreshed within
//! [`REPLICA_TIMEOUT`]) or when the agent itself has been silent for three of
//! its replica's heartbeat intervals; agents of another live replica that
//! heartbeat are never touched.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::watch;
use tracing::{info, warn};
use uuid::Uuid;

/// The advisory lock the leader holds for its whole session (`fleetldr` in
/// ASCII; [`crate::auth::ENROLL_LOCK`] is another key).
pub const LEADER_LOCK: i64 = 0x666c_6565_746c_6472;
/// How often a replica refreshes its row, tries to take the leadership, and
/// (when it leads) checks the connection that holds it.
pub const BEAT: Duration = Duration::from_secs(1);
/// A replica whose row was not refreshed for this long is gone.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for one statement on the leadership connection; a slower
/// answer counts as a lost connection.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Rows of replicas gone for this long are deleted by the leader.
const FORGET_AFTER: Duration = Duration::from_secs(86_400);

/// This replica: its identity and whether it leads now.
#[derive(Debug, Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: Uuid,
    name: String,
    leader: watch::Sender<bool>,
}

impl Replica {
    /// A replica named `name` (see [`default_name`]) with a new id, not
    /// leading.
    pub fn new(name: impl Into<String>) -> Self {
        let (leader, _) = watch::channel(false);
        Replica { inner: Arc::new(Inner { id: Uuid::new_v4(), name: name.into(), leader }) }
    }

    /// The id of this process's run (a restart is a new replica).
    pub fn id(&self) -> Uuid {
        self.inner.id
    }

    /// The configured `replica_name`, or [`default_name`].
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Whether this replica holds the leadership now.
    pub fn is_leader(&self) -> bool {
        *self.inner.leader.borrow()
    }

    /// Follows the leadership.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.inner.leader.subscribe()
    }

    fn set_leader(&self, leader: bool) {
        self.inner.leader.send_if_modified(|held| std::mem::replace(held, leader) != leader);
    }
}

impl Default for Replica {
    fn default() -> Self {
        Replica::new(default_name())
    }
}

/// The default replica name: the host name and the process id
/// (`mail-central-1-4711`).
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "fleetban".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Keeps this replica's row and competes for the leadership until
/// `shutdown` resolves; then gives the leadership up and deletes the row.
pub async fn run(pool: PgPool, replica: Replica, heartbeat: Duration, shutdown: impl Future<Output = ()>) {
    replica.set_leader(false);
    // However this loop ends (a stop, or the task dropped), the replica no
    // longer leads: leader-only tasks stop.
    let _step_down = StepDown(replica.clone());
    let mut lock: LockConn = None;
    let mut tick = tokio::time::interval(BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        let leading = match hold_or_take(&pool, &mut lock).await {
            Ok(leading) => leading,
            Err(error) => {
                if replica.is_leader() {
                    warn!(%error, replica = %replica.name(), "Lost the leadership connection; stepping down.");
                }
                // Dropping the connection closes it: Postgres releases a lock
                // it may still hold.
                lock = None;
                false
            }
        };
        if leading != replica.is_leader() {
            if leading {
                info!(replica = %replica.name(), "This replica leads the fleet-wide sweeps.");
            } else {
                info!(replica = %replica.name(), "This replica no longer leads.");
            }
            replica.set_leader(leading);
        }
        let pid = lock.as_ref().map(|(_, pid, _)| *pid);
        if let Err(error) = beat(&pool, &replica, heartbeat, pid).await {
            warn!(%error, replica = %replica.name(), "Cannot refresh this replica's row.");
        }
    }
    replica.set_leader(false);
    if let Some((mut conn, _, _)) = lock.take() {
        let _ = tokio::time::timeout(
            STATEMENT_TIMEOUT,
            sqlx::query("select pg_advisory_unlock($1)").bind(LEADER_LOCK).execute(&mut conn),
        )
        .await;
        let _ = tokio::time::timeout(STATEMENT_TIMEOUT, conn.close()).await;
    }
    let gone = sqlx::query("delete from replicas where id = $1").bind(replica.id()).execute(&pool).await;
    if let Err(error) = gone {
        warn!(%error, "Cannot delete this replica's row; it ages out.");
    }
}

/// Sets the replica not leading when dropped.
struct StepDown(Replica);

impl Drop for StepDown {
    fn drop(&mut self) {
        self.0.set_leader(false);
    }
}

/// The connection for the leadership, its backend pid, and whether it
/// holds the lock.
type LockConn = Option<(PgConnection, i32, bool)>;

/// With a connection holding the lock: checks that it still answers (the
/// lock lives as long as its session). Without: opens one if needed and
/// tries to take the lock. Returns whether the lock is held now.
async fn hold_or_take(pool: &PgPool, lock: &mut LockConn) -> Result<bool, sqlx::Error> {
    let timeout = |_| sqlx::Error::PoolTimedOut;
    if lock.is_none() {
        let options = pool.connect_options();
        let mut conn =
            tokio::time::timeout(STATEMENT_TIMEOUT, PgConnection::connect_with(&options)).await.map_err(timeout)??;
        let pid: i32 =
            tokio::time::timeout(STATEMENT_TIMEOUT, sqlx::query_scalar("select pg_backend_pid()").fetch_one(&mut conn))
                .await
                .map_err(timeout)??;
        *lock = Some((conn, pid, false));
    }
    let Some((conn, _, held)) = lock.as_mut() else { return Ok(false) };
    if *held {
        tokio::time::timeout(STATEMENT_TIMEOUT, sqlx::query("select 1").execute(&mut *conn))
            .await
            .map_err(timeout)??;
    } else {
        *held = tokio::time::timeout(
            STATEMENT_TIMEOUT,
            sqlx::query_scalar("select pg_try_advisory_lock($1)").bind(LEADER_LOCK).fetch_one(&mut *conn),
        )
        .await
        .map_err(timeout)??;
    }
    Ok(*held)
}

/// Refreshes this replica's row; the leader also forgets replicas long gone.
async fn beat(pool: &PgPool, replica: &Replica, heartbeat: Duration, lock_pid: Option<i32>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into replicas (id, name, version, heartbeat_secs, lock_pid) values ($1, $2, $3, $4, $5) \
         on conflict (id) do update set last_seen = now(), lock_pid = excluded.lock_pid, name = excluded.name",
    )
    .bind(replica.id())
    .bind(replica.name())
    .bind(crate::VERSION)
    .bind(i32::try_from(heartbeat.as_secs().max(1)).unwrap_or(i32::MAX))
    .bind(lock_pid)
    .execute(pool)
    .await?;
    if replica.is_leader() {
        sqlx::query("delete from replicas where last_seen < now() - make_interval(secs => $1)")
            .bind(FORGET_AFTER.as_secs_f64())
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Runs `task` while this replica leads: started when it becomes leader,
/// told to stop (its argument resolves) when it loses the leadership or the
/// server stops, started again at the next leadership. Returns when
/// `stop` becomes true.
pub async fn while_leader<F, Fut>(replica: Replica, mut stop: watch::Receiver<bool>, mut task: F)
where
    F: FnMut(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut leadership = replica.leadership();
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return,
            changed = leadership.wait_for(|leading| *leading) => if changed.is_err() { return },
        }
        let mut lost = replica.leadership();
        let mut stopping = stop.clone();
        let end = Box::pin(async move {
            tokio::select! {
                _ = lost.wait_for(|leading| !*leading) => {}
                _ = stopping.wait_for(|stop| *stop) => {}
            }
        });
        task(end).await;
        if *stop.borrow() {
            return;
        }
        // The task ended because the leadership was lost (or by itself):
        // wait for the next leadership.
        let _ = leadership.wait_for(|leading| !*leading).await;
    }
}

/// One replica as `GET /api/v1/replicas` shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReplicaRow {
    /// The replica's id (new at every start).
    pub id: Uuid,
    /// Its `replica_name`.
    pub name: String,
    /// Its version.
    pub version: String,
    /// When it started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: time::OffsetDateTime,
    /// When it last refreshed its row.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: time::OffsetDateTime,
    /// It refreshed its row within [`REPLICA_TIMEOUT`].
    pub alive: bool,
    /// It leads now: it is alive and the connection it named at its last
    /// refresh holds the leadership lock (read from `pg_locks`).
    pub leader: bool,
    /// Agents it serves now.
    pub agents_connected: i64,
}

/// The replicas with a row, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<ReplicaRow>, sqlx::Error> {
    sqlx::query_as(
        "select r.id, r.name, r.version, r.started_at, r.last_seen, \
                r.last_seen > now() - make_interval(secs => $1) as alive, \
                r.last_seen > now() - make_interval(secs => $1) and exists (select 1 from pg_locks l \
                  where l.locktype = 'advisory' and l.granted and l.pid = r.lock_pid \
                    and l.database = (select oid from pg_database where datname = current_database()) \
                    and l.classid = ($2 >> 32)::oid and l.objid = ($2 & 4294967295)::oid and l.objsubid = 1) \
                  as leader, \
                (select count(*) from agents a where a.replica_id = r.id and a.connected) as agents_connected \
           from replicas r order by r.started_at desc, r.id",
    )
    .bind(REPLICA_TIMEOUT.as_secs_f64())
    .bind(LEADER_LOCK)
    .fetch_all(pool)
    .await
}

/// The stale-session sweep (one pass): marks disconnected the agents whose
/// replica is gone, and those silent for three of their replica's heartbeat
/// intervals (`heartbeat` for an agent no replica claims, e.g. one of an
/// older server version). Returns how many.
pub async fn sweep_stale_sessions(pool: &PgPool, heartbeat: Duration) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "update agents a set connected = false \
          where a.connected and case \
            when a.replica_id is null then a.last_seen < now() - make_interval(secs => $1) \
            else not exists (select 1 from replicas r where r.id = a.replica_id \
                   and r.last_seen > now() - make_interval(secs => $2) \
                   and a.last_seen > now() - make_interval(secs => 3 * r.heartbeat_secs)) \
          end",
    )
    .bind((heartbeat * 3).as_secs_f64())
    .bind(REPLICA_TIMEOUT.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
