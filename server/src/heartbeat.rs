//! Heartbeats of a server's sessions, written together.
//!
//! Every heartbeat marks its agent connected and seen and checks that the
//! agent was neither revoked, removed nor re-enrolled (its secret replaced)
//! since its session authenticated. One `UPDATE` per heartbeat made 667
//! statements a second at 10,000 agents and a 15 s interval. Sessions now
//! queue their heartbeat ([`Heartbeats::beat`]) and wait for its answer; the
//! first heartbeat queued while no writer runs starts one, on a task of its
//! own (so a session that goes away never cancels the others' answers). The
//! writer waits [`GATHER`] for company, writes every heartbeat queued by
//! then in one statement, and goes on while more are queued.
//!
//! Invariants:
//! - Each heartbeat is answered for its own agent and secret: an agent is in
//!   a statement at most once, so a second session of the same agent (an old
//!   one with a replaced secret beside the new one) waits for the next
//!   statement instead of sharing a row.
//! - Rows are locked in agent-id order, the order of the reports' flush
//!   (`crate::applied`), and a deadlock or serialization failure is retried.
//! - A failed statement fails every heartbeat in it; their sessions end with
//!   `UNAVAILABLE`, as a failed single update did.
//! - One writer at a time: "queue empty, writer stops" and "queued, writer
//!   running" are decided under one lock, so no heartbeat is left unanswered.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

/// How long the writer waits for more heartbeats before it writes.
pub const GATHER: Duration = Duration::from_millis(10);
/// Most heartbeats in one statement.
pub const MAX_GROUP: usize = 2_000;
/// Attempts of a statement that hit a deadlock or serialization failure.
const MAX_ATTEMPTS: u32 = 3;

/// One queued heartbeat and where its answer goes.
#[derive(Debug)]
struct Pending {
    agent_id: Uuid,
    secret_hash: Vec<u8>,
    reply: oneshot::Sender<Result<bool, String>>,
}

/// The heartbeat writer of a server; cheap to clone.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    pool: PgPool,
    queue: Arc<Mutex<Queue>>,
    counters: Arc<HeartbeatStats>,
}

#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// A writer task runs.
    writing: bool,
}

/// Counters of [`Heartbeats`].
#[derive(Debug, Default)]
pub struct HeartbeatStats {
    /// Heartbeats answered from the database.
    pub beats: AtomicU64,
    /// Statements that wrote them.
    pub statements: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Heartbeats {
    /// A writer on `pool`.
    pub fn new(pool: PgPool) -> Self {
        Heartbeats { pool, queue: Arc::default(), counters: Arc::default() }
    }

    /// `(heartbeats, statements)` so far.
    pub fn stats(&self) -> (u64, u64) {
        (self.counters.beats.load(Ordering::Relaxed), self.counters.statements.load(Ordering::Relaxed))
    }

    /// Marks `agent_id` connected and seen now. `Ok(true)` while the agent
    /// is not revoked and `secret_hash` is still its secret; `Ok(false)` when
    /// it was revoked, removed or re-enrolled; `Err` with the database's
    /// error when the statement failed.
    pub async fn beat(&self, agent_id: Uuid, secret_hash: &[u8]) -> Result<bool, String> {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut queue = lock(&self.queue);
            queue.pending.push_back(Pending { agent_id, secret_hash: secret_hash.to_vec(), reply });
            !std::mem::replace(&mut queue.writing, true)
        };
        if start {
            let this = self.clone();
            tokio::spawn(async move { this.run_writer().await });
        }
        outcome.await.unwrap_or_else(|_| Err("the heartbeat writer stopped".to_owned()))
    }

    /// Writes queued heartbeats until none is left.
    async fn run_writer(&self) {
        loop {
            tokio::time::sleep(GATHER).await;
            let group = self.take_group();
            if group.is_empty() {
                return;
            }
            self.write(group).await;
        }
    }

    /// The oldest queued heartbeats, each agent once, up to [`MAX_GROUP`],
    /// in agent-id order; a later heartbeat of an agent already taken stays
    /// queued in order. With nothing queued, the writer stops.
    fn take_group(&self) -> Vec<Pending> {
        let mut queue = lock(&self.queue);
        if queue.pending.is_empty() {
            queue.writing = false;
            return Vec::new();
        }
        let mut agents = HashSet::new();
        let mut group = Vec::new();
        let mut rest = VecDeque::new();
        while let Some(p) = queue.pending.pop_front() {
            if group.len() < MAX_GROUP && agents.insert(p.agent_id) {
                group.push(p);
            } else {
                rest.push_back(p);
            }
        }
        queue.pending = rest;
        group.sort_unstable_by_key(|p| p.agent_id);
        group
    }

    /// Writes `group` in one statement and answers each heartbeat.
    async fn write(&self, group: Vec<Pending>) {
        let (mut ids, mut secrets, mut replies) = (Vec::new(), Vec::new(), Vec::new());
        for Pending { agent_id, secret_hash, reply } in group {
            ids.push(agent_id);
            secrets.push(secret_hash);
            replies.push(reply);
        }
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let result: Result<Vec<(Uuid, bool)>, sqlx::Error> = sqlx::query_as(
                "update agents a set last_seen = now(), connected = true \
                 from unnest($1::uuid[], $2::bytea[]) as u(id, secret_hash) \
                 where a.id = u.id \
                 returning a.id, a.revoked_at is null and a.secret_hash = u.secret_hash",
            )
            .bind(&ids)
            .bind(&secrets)
            .fetch_all(&self.pool)
            .await;
            self.counters.statements.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::telemetry::HEARTBEAT_STATEMENTS).increment(1);
            match result {
                Err(error) if attempt < MAX_ATTEMPTS && crate::db::is_conflict(&error) => continue,
                other => break other,
            }
        };
        match result {
            Ok(rows) => {
                let valid: HashSet<Uuid> = rows.into_iter().filter(|(_, ok)| *ok).map(|(id, _)| id).collect();
                self.counters.beats.fetch_add(ids.len() as u64, Ordering::Relaxed);
                metrics::counter!(crate::telemetry::HEARTBEATS).increment(ids.len() as u64);
                for (id, reply) in ids.iter().zip(replies) {
                    let _ = reply.send(Ok(valid.contains(id)));
                }
            }
            Err(error) => {
                let error = error.to_string();
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn agent(pool: &PgPool, secret: &[u8]) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, $2, $2, $3)")
            .bind(id)
            .bind(id.to_string())
            .bind(secret)
            .execute(pool)
            .await
            .unwrap();
        id
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn concurrent_heartbeats_share_statements_and_each_gets_its_own_verdict(pool: PgPool) {
        let heartbeats = Heartbeats::new(pool.clone());
        let mut fine = Vec::new();
        for _ in 0..60 {
            fine.push(agent(&pool, b"good").await);
        }
        let revoked = agent(&pool, b"good").await;
        sqlx::query("update agents set revoked_at = now() where id = $1").bind(revoked).execute(&pool).await.unwrap();
        let reenrolled = agent(&pool, b"new").await;
        let removed = Uuid::new_v4();

        let mut tasks = tokio::task::JoinSet::new();
        for (id, secret, expected) in fine
            .iter()
            .map(|id| (*id, b"good".to_vec(), true))
            .chain([(revoked, b"good".to_vec(), false), (reenrolled, b"old".to_vec(), false)])
            .chain([(removed, b"good".to_vec(), false)])
            // The re-enrolled agent's new session beats beside its old one.
            .chain([(reenrolled, b"new".to_vec(), true)])
        {
            let heartbeats = heartbeats.clone();
            tasks.spawn(async move { (id, expected, heartbeats.beat(id, &secret).await) });
        }
        let mut answered = 0;
        while let Some(done) = tasks.join_next().await {
            let (id, expected, verdict) = done.unwrap();
            assert_eq!(verdict, Ok(expected), "agent {id}");
            answered += 1;
        }
        assert_eq!(answered, 64);
        let (beats, statements) = heartbeats.stats();
        assert_eq!(beats, 64);
        assert!(statements >= 2, "the two sessions of one agent never share a statement");
        assert!(statements <= 8, "64 concurrent heartbeats took {statements} statements");

        let connected: i64 = sqlx::query_scalar(
            "select count(*) from agents where id = any($1) and connected and last_seen > now() - interval '1 minute'",
        )
        .bind(&fine)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(connected, 60);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn a_lone_heartbeat_is_written_at_once_and_a_failed_statement_answers_with_its_error(pool: PgPool) {
        let heartbeats = Heartbeats::new(pool.clone());
        let id = agent(&pool, b"s").await;
        let started = std::time::Instant::now();
        assert_eq!(heartbeats.beat(id, b"s").await, Ok(true));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(heartbeats.stats(), (1, 1));
        pool.close().await;
        let error = heartbeats.beat(id, b"s").await.expect_err("the pool is closed");
        assert!(!error.is_empty());
    }
}
