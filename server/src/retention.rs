//! Retention: what the store forgets, and when.
//!
//! Once an hour (and at start) the server drops the day partitions of
//! `events` older than `events_retention_days`, deletes evidence rows and
//! batch records last touched before the same cutoff, and compacts the
//! blocklist change log to `change_log_retention_days` (an agent further
//! behind gets a snapshot instead of a delta).
//!
//! Invariants:
//! - Each agent's newest `agent_batches` row is kept whatever its age: it
//!   is the `last_acked_seq` a reconnecting agent is welcomed with.
//! - An `offenders` row whose address was blocked within the cutoff is kept:
//!   its `last_blocked_at` feeds the escalating TTL.
//! - Several server processes may sweep at once; every step is idempotent.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tracing::{info, warn};

use crate::blocks;

/// How long the store keeps things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events, evidence rows and batch records.
    pub events: Duration,
    /// The blocklist change log.
    pub change_log: Duration,
}

/// What one sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Names of the dropped `events` partitions.
    pub partitions: Vec<String>,
    /// `offender_hosts` rows deleted.
    pub offender_hosts: u64,
    /// `offenders` rows deleted.
    pub offenders: u64,
    /// `agent_batches` rows deleted.
    pub batches: u64,
    /// `block_changes` rows deleted.
    pub changes: u64,
    /// Rows of the evidence model deleted: `evidence_minutes` and
    /// `auth_users` older than the longest rule window allows (8 days),
    /// `sender_standing` and `shadow_decisions` older than the cutoff, and
    /// the dashboard's series older than their retention
    /// ([`crate::timeseries::sweep`]).
    pub model: u64,
}

/// Evidence-model rows older than this can no longer be in any rule's
/// window (windows are at most 7 days).
const MODEL_WINDOW_SECS: f64 = 8.0 * 86_400.0;

/// One sweep now.
pub async fn sweep(pool: &PgPool, retention: Retention) -> Result<Swept, blocks::BlockError> {
    let secs = retention.events.as_secs_f64();
    // Whole days only: a partition is dropped once every event it can hold
    // is older than the cutoff.
    let partitions: Vec<String> =
        sqlx::query_scalar("select fleetban_drop_event_partitions((now() - make_interval(secs => $1))::date)")
            .bind(secs)
            .fetch_all(pool)
            .await?;
    let offender_hosts = sqlx::query("delete from offender_hosts where last_seen < now() - make_interval(secs => $1)")
        .bind(secs)
        .execute(pool)
        .await?
        .rows_affected();
    let offenders = sqlx::query(
        "delete from offenders where last_seen < now() - make_interval(secs => $1) \
         and (last_blocked_at is null or last_blocked_at < now() - make_interval(secs => $1))",
    )
    .bind(secs)
    .execute(pool)
    .await?
    .rows_affected();
    let batches = sqlx::query(
        "delete from agent_batches b where received_at < now() - make_interval(secs => $1) \
         and seq < (select max(m.seq) from agent_batches m where m.agent_id = b.agent_id)",
    )
    .bind(secs)
    .execute(pool)
    .await?
    .rows_affected();
    let changes = blocks::compact_changes(pool, retention.change_log).await?;
    let mut model = 0;
    for (sql, cutoff) in [
        ("delete from evidence_minutes where minute < now() - make_interval(secs => $1)", MODEL_WINDOW_SECS.min(secs)),
        ("delete from auth_users where last_seen < now() - make_interval(secs => $1)", MODEL_WINDOW_SECS.min(secs)),
        ("delete from sender_standing where last_seen < now() - make_interval(secs => $1)", secs),
        ("delete from shadow_decisions where decided_at < now() - make_interval(secs => $1)", secs),
    ] {
        model += sqlx::query(sql).bind(cutoff).execute(pool).await?.rows_affected();
    }
    model += crate::timeseries::sweep(pool).await?;
    Ok(Swept { partitions, offender_hosts, offenders, batches, changes, model })
}

/// Sweeps at start and then every `every` until `shutdown` resolves.
pub async fn run(pool: PgPool, retention: Retention, every: Duration, shutdown: impl Future<Output = ()>) {
    crate::periodic::every(every.max(Duration::from_secs(1)), shutdown, || async {
        match sweep(&pool, retention).await {
            Ok(swept) if swept == Swept::default() => {}
            Ok(swept) => info!(
                partitions = ?swept.partitions,
                offender_hosts = swept.offender_hosts,
                offenders = swept.offenders,
                batches = swept.batches,
                model = swept.model,
                changes = swept.changes,
                "Retention sweep removed old data."
            ),
            Err(error) => warn!(%error, "Retention sweep failed; retrying at the next one."),
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    async fn agent(pool: &PgPool) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, 'a', 'a', '\\x00')")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        id
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn old_data_goes_and_recent_data_and_guards_stay(pool: PgPool) {
        let a = agent(&pool).await;
        for days_ago in [40, 1] {
            sqlx::query("select fleetban_ensure_event_partition((now() - make_interval(days => $1))::date)")
                .bind(days_ago)
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query(
                "insert into events (agent_id, batch_seq, batch_index, time, kind, remote) \
                 values ($1, $2, 0, now() - make_interval(days => $2), 'connect', '192.0.2.1')",
            )
            .bind(a)
            .bind(days_ago)
            .execute(&pool)
            .await
            .unwrap();
        }
        // Batch records 1 and 2 are old, 3 is old but the agent's newest.
        for seq in 1..=3 {
            sqlx::query(
                "insert into agent_batches (agent_id, seq, events, received_at) values ($1, $2, 1, now() - interval '40 days')",
            )
            .bind(a)
            .bind(seq)
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "insert into offender_hosts (address, agent_id, kind, first_seen, last_seen, events) values \
             ('192.0.2.1', $1, 'auth_failed', now() - interval '40 days', now() - interval '40 days', 1), \
             ('192.0.2.2', $1, 'auth_failed', now() - interval '1 day', now() - interval '1 day', 1)",
        )
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "insert into offenders (address, first_seen, last_seen, events, hosts, last_blocked_at) values \
             ('192.0.2.1', now() - interval '40 days', now() - interval '40 days', 1, 1, null), \
             ('192.0.2.3', now() - interval '40 days', now() - interval '40 days', 1, 1, now() - interval '2 days'), \
             ('192.0.2.2', now() - interval '1 day', now() - interval '1 day', 1, 1, null)",
        )
        .execute(&pool)
        .await
        .unwrap();

        // The evidence model: minute counts and failing users a day and ten
        // days old (the second beyond every rule window), standing and
        // shadow decisions a day and forty days old.
        sqlx::query(
            "insert into evidence_minutes (address, agent_id, kind, minute, events) values \
             ('192.0.2.1', $1, 'auth_failed', date_trunc('minute', now() - interval '10 days'), 1), \
             ('192.0.2.1', $1, 'auth_failed', date_trunc('minute', now() - interval '1 day'), 1); \
             ",
        )
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "insert into auth_users (address, agent_id, auth_user, last_seen) values \
             ('192.0.2.1', $1, 'old', now() - interval '10 days'), ('192.0.2.1', $1, 'new', now() - interval '1 day')",
        )
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "insert into sender_standing (address, last_accepted, last_seen) values \
             ('192.0.2.8', now() - interval '40 days', now() - interval '40 days'), ('192.0.2.9', now(), now())",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "insert into shadow_decisions (decided_at, cidr, rule, source) values \
             (now() - interval '40 days', '192.0.2.8/32', 'auth', 'auto'), (now(), '192.0.2.9/32', 'auth', 'auto')",
        )
        .execute(&pool)
        .await
        .unwrap();

        let retention = Retention { events: Duration::from_secs(30 * 86_400), change_log: Duration::from_secs(86_400) };
        let swept = sweep(&pool, retention).await.unwrap();
        assert_eq!(swept.model, 4, "one old row of each evidence-model table: {swept:?}");
        for table in ["evidence_minutes", "auth_users", "sender_standing", "shadow_decisions"] {
            let n: i64 = sqlx::query_scalar(&format!("select count(*) from {table}")).fetch_one(&pool).await.unwrap();
            assert_eq!(n, 1, "{table}: the recent row stays");
        }
        assert_eq!(swept.partitions.len(), 1, "{swept:?}");
        assert_eq!((swept.offender_hosts, swept.offenders, swept.batches), (1, 1, 2), "{swept:?}");
        let events: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await.unwrap();
        assert_eq!(events, 1, "yesterday's event stays");
        let seqs: Vec<i64> = sqlx::query_scalar("select seq from agent_batches").fetch_all(&pool).await.unwrap();
        assert_eq!(seqs, [3], "the agent's newest batch record stays");
        let offenders: Vec<String> =
            sqlx::query_scalar("select host(address) from offenders order by address").fetch_all(&pool).await.unwrap();
        assert_eq!(offenders, ["192.0.2.2", "192.0.2.3"], "recent, or blocked within the window");
        // A second sweep finds nothing more.
        assert_eq!(sweep(&pool, retention).await.unwrap(), Swept::default());
    }
}
