//! What agents report about themselves (`Applied`, heartbeats, signs of life
//! while batches flow), written to their `agents` rows in batches.
//!
//! An agent answers every delta or snapshot with `Applied`; writing each
//! report as its own `UPDATE agents` before the session reads its next push
//! made one block cost one update per connected agent. Sessions therefore
//! only record the latest report of their agent in memory
//! ([`Reports::record`], never waiting for the database), and one writer task
//! per server process ([`Reports::run`]) stores the latest report of every
//! agent in one statement every [`FLUSH_INTERVAL`], and once more when the
//! server stops.
//!
//! Invariants:
//! - A row is at most one interval (plus the statement's time) behind the
//!   last report its session made.
//! - Only the latest report of an agent is kept; a report of a newer session
//!   replaces one of an older session, and a stored report only touches the
//!   row while the row's `session_id` is still the reporting session's (a
//!   newer session's `Hello` is not overwritten by an older one's report).
//! - A failed flush keeps its reports for the next one unless a newer report
//!   of the same agent arrived meanwhile.
//! - The writer never sets `connected`: a session's end marks its agent
//!   disconnected on its own, and a late flush must not undo that.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::PgPool;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::session::Stats;

/// How often the latest reports are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(500);

/// Counter of agent reports recorded by sessions (exported at scrape).
pub const REPORTS: &str = "fleetban_agent_reports_total";
/// Counter of statements that stored reports (exported at scrape).
pub const FLUSHES: &str = "fleetban_agent_report_flushes_total";

/// The latest report of one agent's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Report {
    session_id: Uuid,
    /// `(blocklist_version, firewall_entries)` as the agent last reported
    /// them; `None` when the session only saw the agent alive.
    applied: Option<(i64, i64)>,
}

/// Counters of the reports of a server, for metrics and tests
/// ([`Stats::reports`]).
#[derive(Debug, Default)]
pub struct ReportStats {
    /// Reports recorded by sessions.
    pub recorded: AtomicU64,
    /// Statements that stored reports (one per non-empty flush).
    pub flushes: AtomicU64,
    /// Agent rows those statements were given.
    pub rows: AtomicU64,
    /// Flushes that failed (their reports were kept for the next one).
    pub failed: AtomicU64,
}

impl ReportStats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The pending reports of a server's sessions; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Reports {
    pending: Arc<Mutex<HashMap<Uuid, Report>>>,
    stats: Arc<Stats>,
}

impl Reports {
    /// An empty set of reports counted in `stats.reports`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Reports { pending: Arc::default(), stats }
    }

    fn counters(&self) -> &ReportStats {
        &self.stats.reports
    }

    /// Records that `session_id` of `agent_id` reported the agent holds
    /// `blocklist_version` with `firewall_entries` entries in its firewall.
    pub fn record(&self, agent_id: Uuid, session_id: Uuid, blocklist_version: u64, firewall_entries: u64) {
        let applied =
            (i64::try_from(blocklist_version).unwrap_or(i64::MAX), i64::try_from(firewall_entries).unwrap_or(i64::MAX));
        self.put(agent_id, Report { session_id, applied: Some(applied) });
    }

    /// Records that `session_id` of `agent_id` saw the agent alive
    /// (`last_seen`), keeping the version it reported last.
    pub fn seen(&self, agent_id: Uuid, session_id: Uuid) {
        self.put(agent_id, Report { session_id, applied: None });
    }

    fn put(&self, agent_id: Uuid, report: Report) {
        self.counters().recorded.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = pending.entry(agent_id).or_insert(report);
        if entry.session_id != report.session_id || report.applied.is_some() {
            *entry = report;
        }
    }

    /// Takes the pending reports.
    fn take(&self) -> HashMap<Uuid, Report> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts back reports a failed flush could not store, unless a newer
    /// report of the same agent arrived meanwhile.
    fn restore(&self, reports: HashMap<Uuid, Report>) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for (agent_id, report) in reports {
            pending.entry(agent_id).or_insert(report);
        }
    }

    /// Stores the pending reports in one statement; returns how many agents
    /// it covered.
    pub async fn flush(&self, pool: &PgPool) -> Result<usize, sqlx::Error> {
        let reports = self.take();
        if reports.is_empty() {
            return Ok(0);
        }
        let mut rows: Vec<(Uuid, Report)> = reports.iter().map(|(id, r)| (*id, *r)).collect();
        // One order for every writer, so that two replicas' flushes lock
        // rows the same way.
        rows.sort_unstable_by_key(|(id, _)| *id);
        let ids: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
        let sessions: Vec<Uuid> = rows.iter().map(|(_, r)| r.session_id).collect();
        let versions: Vec<Option<i64>> = rows.iter().map(|(_, r)| r.applied.map(|a| a.0)).collect();
        let entries: Vec<Option<i64>> = rows.iter().map(|(_, r)| r.applied.map(|a| a.1)).collect();
        let result = sqlx::query(
            "update agents a set last_seen = now(), \
               blocklist_version = coalesce(r.version, a.blocklist_version), \
               firewall_entries = coalesce(r.entries, a.firewall_entries) \
             from unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[]) as r(id, session_id, version, entries) \
             where a.id = r.id and a.session_id = r.session_id",
        )
        .bind(&ids)
        .bind(&sessions)
        .bind(&versions)
        .bind(&entries)
        .execute(pool)
        .await;
        match result {
            Ok(done) => {
                self.counters().flushes.fetch_add(1, Ordering::Relaxed);
                self.counters().rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
                debug!(agents = rows.len(), updated = done.rows_affected(), "Agent reports stored.");
                Ok(rows.len())
            }
            Err(error) => {
                self.counters().failed.fetch_add(1, Ordering::Relaxed);
                self.restore(reports);
                Err(error)
            }
        }
    }

    /// Stores the pending reports every `interval` until `shutdown`
    /// resolves, then once more.
    pub async fn run(self, pool: PgPool, interval: Duration, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    if let Err(error) = self.flush(&pool).await {
                        warn!(%error, "Cannot store agent reports; retrying at the next interval.");
                    }
                }
            }
        }
        if let Err(error) = self.flush(&pool).await {
            warn!(%error, "Cannot store the last agent reports at shutdown.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_report_of_a_session_wins_and_a_sign_of_life_keeps_the_version() {
        let reports = Reports::default();
        let (agent, session, newer) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        reports.record(agent, session, 3, 10);
        reports.record(agent, session, 5, 12);
        reports.seen(agent, session);
        assert_eq!(reports.take()[&agent], Report { session_id: session, applied: Some((5, 12)) });
        reports.record(agent, session, 5, 12);
        reports.seen(agent, newer);
        assert_eq!(reports.take()[&agent], Report { session_id: newer, applied: None });
        assert_eq!(ReportStats::get(&reports.stats.reports.recorded), 5);
    }

    #[test]
    fn a_failed_flush_does_not_overwrite_a_newer_report() {
        let reports = Reports::default();
        let (agent, other, session) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        reports.record(agent, session, 3, 0);
        reports.record(other, session, 4, 0);
        let taken = reports.take();
        reports.record(agent, session, 6, 0);
        reports.restore(taken);
        let pending = reports.take();
        assert_eq!(pending[&agent].applied, Some((6, 0)));
        assert_eq!(pending[&other].applied, Some((4, 0)));
    }

    /// The fleet's reports update every agent's row all the time; with the
    /// table's pages half full (migration `20261129000300`) each update is
    /// HOT: the new row version stays on its page and no index changes.
    /// (Counted from `ctid`s; the statistics views are updated late.)
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn report_flushes_update_agents_in_place(pool: sqlx::PgPool) {
        let reports = Reports::default();
        let session = Uuid::new_v4();
        let mut agents = Vec::new();
        for n in 0..300 {
            let id = Uuid::new_v4();
            sqlx::query(
                "insert into agents (id, name, hostname, secret_hash, session_id) \
                 values ($1, $2, $2, '\\x00112233445566778899', $3)",
            )
            .bind(id)
            .bind(format!("mail{n}.fleet.example.net"))
            .bind(session)
            .execute(&pool)
            .await
            .unwrap();
            agents.push(id);
        }
        let pages = || {
            let pool = pool.clone();
            async move {
                let pages: Vec<(Uuid, String)> = sqlx::query_as(
                    "select id, split_part(trim(both '()' from ctid::text), ',', 1) from agents order by id",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                pages
            }
        };
        let before = pages().await;
        // One flush: whether later ones stay in place too depends on when
        // Postgres prunes the older versions (other sessions of the
        // cluster can hold that back), which a test cannot control.
        for id in &agents {
            reports.record(*id, session, 1, 101);
        }
        assert_eq!(reports.flush(&pool).await.unwrap(), 300);
        // With pages filled to 100 % every update moves its row to another
        // page; half full, the new versions fit beside the old ones.
        let after = pages().await;
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert!(moved <= 300 / 10, "{moved} of 300 rows left their page");
        let stored: i64 =
            sqlx::query_scalar("select count(*) from agents where blocklist_version = 1 and firewall_entries = 101")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, 300);
    }
}
