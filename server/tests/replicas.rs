//! Replicas on one database: exactly one leads, the leadership moves when
//! the leader's connection goes, leader-only tasks follow it, and the
//! stale-session sweep tells agents of a gone replica from agents another
//! live replica serves.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fleetban_server::replica::{self, Replica};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);

struct Running {
    replica: Replica,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(pool: &PgPool, name: &str) -> Running {
    let replica = Replica::new(name);
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(replica::run(pool.clone(), replica.clone(), Duration::from_secs(5), async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    Running { replica, stop, task }
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let started = tokio::time::Instant::now();
    while !ok().await {
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn leaders(replicas: &[&Running]) -> Vec<String> {
    replicas.iter().filter(|r| r.replica.is_leader()).map(|r| r.replica.name().to_owned()).collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn one_replica_leads_and_the_leadership_moves_when_it_dies(pool: PgPool) {
    let a = start(&pool, "a");
    let b = start(&pool, "b");
    let c = start(&pool, "c");
    wait_for("a leader", async || leaders(&[&a, &b, &c]).len() == 1).await;
    // It stays one for a while (every replica keeps trying).
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(leaders(&[&a, &b, &c]).len(), 1, "{:?}", leaders(&[&a, &b, &c]));
    }
    // The rows say the same.
    wait_for("the rows to name the leader", async || {
        let rows = replica::list(&pool).await.unwrap();
        rows.len() == 3 && rows.iter().filter(|r| r.leader && r.alive).count() == 1
    })
    .await;

    // The leader dies without a word: its task (and its connection) is
    // dropped, so Postgres releases the lock.
    let mut all = vec![a, b, c];
    let index = all.iter().position(|r| r.replica.is_leader()).unwrap();
    let dead = all.remove(index);
    dead.task.abort();
    let _ = dead.task.await;
    let started = tokio::time::Instant::now();
    wait_for("another leader", async || leaders(&[&all[0], &all[1]]).len() == 1).await;
    assert!(started.elapsed() < Duration::from_secs(5), "took over in {:?}", started.elapsed());

    // The new leader's connection is cut by Postgres: it steps down, and
    // a leader is back within seconds (the same replica, reconnected, or
    // the other).
    let leader = all.iter().find(|r| r.replica.is_leader()).unwrap().replica.clone();
    let mut lost = leader.leadership();
    let killed: i64 = sqlx::query_scalar(
        "select count(*) from (select pg_terminate_backend(l.pid) from pg_locks l \
          where l.locktype = 'advisory' and l.granted and l.database = \
            (select oid from pg_database where datname = current_database()) \
            and l.objid = ($1 & 4294967295)::oid) t",
    )
    .bind(replica::LEADER_LOCK)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1, "exactly one session held the leadership");
    tokio::time::timeout(WAIT, lost.wait_for(|l| !*l)).await.unwrap().unwrap();
    wait_for("a leader again", async || leaders(&[&all[0], &all[1]]).len() == 1).await;

    // A clean stop gives the leadership up and deletes the row.
    for running in all {
        let _ = running.stop.send(true);
        running.task.await.unwrap();
    }
    let rows = replica::list(&pool).await.unwrap();
    assert_eq!(rows.len(), 1, "only the replica killed without a word keeps a row: {rows:?}");
    assert_eq!(rows[0].name, dead.replica.name());
}

#[sqlx::test(migrations = "../migrations")]
async fn leader_only_tasks_run_on_the_leader_alone_and_follow_the_leadership(pool: PgPool) {
    let a = start(&pool, "a");
    let b = start(&pool, "b");
    let runs: Arc<[AtomicU32; 2]> = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let (server_stop, _) = watch::channel(false);
    let mut supervisors = Vec::new();
    for (index, running) in [&a, &b].into_iter().enumerate() {
        let runs = runs.clone();
        supervisors.push(tokio::spawn(replica::while_leader(running.replica.clone(), server_stop.subscribe(), {
            move |stop| {
                let runs = runs.clone();
                fleetban_server::periodic::every(Duration::from_millis(20), stop, move || {
                    let runs = runs.clone();
                    async move {
                        runs[index].fetch_add(1, Ordering::SeqCst);
                    }
                })
            }
        })));
    }
    wait_for("a leader", async || a.replica.is_leader() || b.replica.is_leader()).await;
    let (leader, follower) = if a.replica.is_leader() { (0, 1) } else { (1, 0) };
    wait_for("the leader's task to run", async || runs[leader].load(Ordering::SeqCst) > 10).await;
    assert_eq!(runs[follower].load(Ordering::SeqCst), 0, "the follower runs nothing");

    // The leader dies: the task moves.
    let (dead, alive) = if leader == 0 { (a, b) } else { (b, a) };
    dead.task.abort();
    let _ = dead.task.await;
    assert!(!dead.replica.is_leader(), "a dropped leadership loop steps down");
    // Its supervisor stops the task (a run in progress completes).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = runs[leader].load(Ordering::SeqCst);
    wait_for("the task on the new leader", async || runs[follower].load(Ordering::SeqCst) > 10).await;
    assert!(alive.replica.is_leader());
    assert_eq!(runs[leader].load(Ordering::SeqCst), before, "nothing on the dead replica");

    // Server stop ends the supervisors.
    let _ = server_stop.send(true);
    tokio::time::timeout(WAIT, supervisors.remove(follower)).await.unwrap().unwrap();
    let _ = alive.stop.send(true);
    alive.task.await.unwrap();
}

async fn agent(pool: &PgPool, replica_id: Option<Uuid>, silent_secs: f64) -> Uuid {
    let id = common::agent(pool, &format!("mx-{}", Uuid::new_v4()), "mx", true, &[]).await;
    sqlx::query(
        "update agents set replica_id = $2, session_id = gen_random_uuid(), \
         last_seen = now() - make_interval(secs => $3) where id = $1",
    )
    .bind(id)
    .bind(replica_id)
    .bind(silent_secs)
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn connected(pool: &PgPool, id: Uuid) -> bool {
    sqlx::query_scalar("select connected from agents where id = $1").bind(id).fetch_one(pool).await.unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn the_stale_sweep_spares_the_agents_of_live_replicas(pool: PgPool) {
    // A live replica whose agents heartbeat every 60 s, one gone for a
    // minute, and agents of each.
    let live = Uuid::new_v4();
    let gone = Uuid::new_v4();
    sqlx::query(
        "insert into replicas (id, name, version, heartbeat_secs, last_seen) values \
         ($1, 'live', 'x', 60, now()), ($2, 'gone', 'x', 15, now() - interval '1 minute')",
    )
    .bind(live)
    .bind(gone)
    .execute(&pool)
    .await
    .unwrap();
    // 100 s silent: stale for this server's 15 s heartbeat, not for the
    // live replica's 60 s.
    let on_live = agent(&pool, Some(live), 100.0).await;
    let silent_on_live = agent(&pool, Some(live), 200.0).await;
    let on_gone = agent(&pool, Some(gone), 1.0).await;
    let on_unknown = agent(&pool, Some(Uuid::new_v4()), 1.0).await;
    let old_fresh = agent(&pool, None, 1.0).await;
    let old_silent = agent(&pool, None, 100.0).await;

    let swept = replica::sweep_stale_sessions(&pool, Duration::from_secs(15)).await.unwrap();
    assert_eq!(swept, 4);
    assert!(connected(&pool, on_live).await, "another live replica's agent is left alone");
    assert!(!connected(&pool, silent_on_live).await, "silent for three of its replica's intervals");
    assert!(!connected(&pool, on_gone).await, "its replica is gone");
    assert!(!connected(&pool, on_unknown).await, "no replica claims it");
    assert!(connected(&pool, old_fresh).await, "an older server's agent heartbeats");
    assert!(!connected(&pool, old_silent).await, "an older server's silent agent");
}
