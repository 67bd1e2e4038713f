//! Measurements of the fleet run: CPU and memory of processes from `/proc`,
//! and Postgres's insert counters and sizes.

use std::collections::HashMap;
use std::time::Instant;

use sqlx::PgPool;

use super::{Totals, mono_ns};

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `(ppid, utime + stime)` of `pid` from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// CPU time of `pid` in clock ticks.
pub fn ticks(pid: u32) -> u64 {
    stat(pid).map_or(0, |(_, t)| t)
}

/// `VmRSS` of `pid`, KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The postmaster's pid, when the database runs on this machine: the parent
/// of this session's backend.
pub async fn postgres_root(pool: &PgPool) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("select pg_backend_pid()").fetch_one(pool).await.ok()?;
    let (ppid, _) = stat(u32::try_from(backend).ok()?)?;
    let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    (comm.trim() == "postgres").then_some(ppid)
}

/// `root` and the pids of its children alive now.
pub fn family(root: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![root] };
    let children = dir
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| stat(*pid).is_some_and(|(ppid, _)| ppid == root));
    std::iter::once(root).chain(children).collect()
}

/// Nanoseconds the threads of `pid` alive now spent waiting on a run
/// queue for a CPU (second field of `/proc/PID/task/TID/schedstat`).
pub fn wait_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Counters at one instant of the run.
#[derive(Debug)]
pub struct Sample {
    pub at: Instant,
    /// Rows inserted into the partitions of `events` (statistics counter).
    pub event_rows: i64,
    /// Rows inserted into every user table.
    pub all_rows: i64,
    pub db_bytes: i64,
    /// Total size of the partitions of `events` with their indexes.
    pub event_bytes: i64,
    /// Rows inserted into the partitions of `context_summaries`, and their
    /// total size.
    pub summary_rows: i64,
    pub summary_bytes: i64,
    /// Per table: rows inserted, total size.
    pub tables: HashMap<String, (i64, i64)>,
    pub server_ticks: u64,
    pub postgres_ticks: Option<u64>,
    pub sim_ticks: u64,
    /// Time the processes' threads waited for a CPU, ns ([`wait_ns`]).
    pub server_wait_ns: u64,
    pub postgres_wait_ns: Option<u64>,
    pub sim_wait_ns: u64,
    pub fleet: Totals,
}

impl Sample {
    /// Takes a sample; `fleet` is the simulators' totals at this instant.
    pub async fn take(
        pool: &PgPool,
        server: u32,
        postgres: Option<u32>,
        sims: &[u32],
        fleet: Totals,
    ) -> anyhow::Result<Sample> {
        let at = Instant::now();
        let server_ticks = ticks(server);
        // The postmaster and its backends, read once for both figures.
        let postgres_family = postgres.map(family);
        let postgres_ticks = postgres_family.as_ref().map(|pids| pids.iter().map(|p| ticks(*p)).sum());
        let sim_ticks = sims.iter().map(|p| ticks(*p)).sum();
        let server_wait_ns = wait_ns(server);
        let postgres_wait_ns = postgres_family.as_ref().map(|pids| pids.iter().map(|p| wait_ns(*p)).sum());
        let sim_wait_ns = sims.iter().map(|p| wait_ns(*p)).sum();
        // Statistics of other sessions reach this one within a second.
        let rows: Vec<(String, i64, i64, Option<String>)> = sqlx::query_as(
            "select s.relname::text, s.n_tup_ins, pg_total_relation_size(s.relid), \
                    (select p.relname::text from pg_inherits i join pg_class p on p.oid = i.inhparent \
                     where i.inhrelid = s.relid limit 1) \
             from pg_stat_user_tables s",
        )
        .fetch_all(pool)
        .await?;
        let db_bytes: i64 = sqlx::query_scalar("select pg_database_size(current_database())").fetch_one(pool).await?;
        let mut sample = Sample {
            at,
            event_rows: 0,
            all_rows: 0,
            db_bytes,
            event_bytes: 0,
            summary_rows: 0,
            summary_bytes: 0,
            tables: HashMap::new(),
            server_ticks,
            postgres_ticks,
            sim_ticks,
            server_wait_ns,
            postgres_wait_ns,
            sim_wait_ns,
            fleet,
        };
        for (name, inserted, bytes, parent) in rows {
            sample.all_rows += inserted;
            match parent.as_deref() {
                Some("events") => {
                    sample.event_rows += inserted;
                    sample.event_bytes += bytes;
                }
                Some("context_summaries") => {
                    sample.summary_rows += inserted;
                    sample.summary_bytes += bytes;
                }
                _ => {}
            }
            // Partitions of one table count as the table.
            let key = match parent {
                Some(parent) => format!("{parent} (partitions)"),
                None => name,
            };
            let e = sample.tables.entry(key).or_default();
            e.0 += inserted;
            e.1 += bytes;
        }
        Ok(sample)
    }
}

/// Inserts a manual block of `cidr` (an hour long) and its `add` change in
/// `tx`; returns the block's id. The change's trigger notifies the servers
/// when `tx` commits.
pub async fn stage_block(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    cidr: &str,
    reason: &str,
) -> Result<i64, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(
        "insert into blocks (cidr, reason, source, expires_at) \
         values ($1::cidr, $2, 'manual', now() + interval '1 hour') returning id",
    )
    .bind(cidr)
    .bind(reason)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "insert into block_changes (op, block_id, cidr, expires_at, reason) \
         select 'add', id, cidr, expires_at, reason from blocks where id = $1",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(id)
}

/// Commits a manual block and its `add` change (the trigger notifies);
/// returns its id and the monotonic time just before the commit.
pub async fn commit_block(pool: &PgPool, cidr: &str) -> anyhow::Result<(i64, i64)> {
    let mut tx = pool.begin().await?;
    let id = stage_block(&mut tx, cidr, "fleet bench").await?;
    let at = mono_ns();
    tx.commit().await?;
    Ok((id, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two busy threads pinned to one CPU: each waits while the other runs.
    #[test]
    fn threads_that_share_one_cpu_are_counted_waiting() {
        // The first CPU this process may run on.
        // SAFETY: sched_getaffinity fills the zeroed set for this thread.
        let cpu = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set), 0);
            (0..libc::CPU_SETSIZE as usize).find(|&c| libc::CPU_ISSET(c, &set)).expect("an allowed CPU")
        };
        let spin = move || {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t with one bit set, for the
                // calling thread (pid 0).
                let pinned = unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
                };
                assert_eq!(pinned, 0, "pin to CPU {cpu}");
                let end = Instant::now() + std::time::Duration::from_millis(400);
                let mut x = 0u64;
                while Instant::now() < end {
                    x = x.wrapping_add(1);
                }
                x
            })
        };
        let me = std::process::id();
        let before = wait_ns(me);
        // Read while they run: the time of exited threads is in no task.
        let running = [spin(), spin()];
        std::thread::sleep(std::time::Duration::from_millis(300));
        let during = wait_ns(me);
        for t in running {
            t.join().expect("spinner");
        }
        assert!(
            during.saturating_sub(before) >= 100_000_000,
            "two spinning threads on one CPU for 300 ms waited {} ms",
            during.saturating_sub(before) / 1_000_000
        );
        assert_eq!(wait_ns(u32::MAX), 0, "no such process");
    }
}
