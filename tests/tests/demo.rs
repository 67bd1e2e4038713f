//! The demo's claims, checked from the outside: after the scripted attack,
//! every agent's dry-run firewall state and the database hold blocks of the
//! flood source, the brute-force source and the campaign's /24, and no
//! legitimate sender is blocked anywhere.

mod common;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetban_agent::firewall::dryrun;
use fleetban_tests::demo::{self, DemoOptions};
use fleetban_tests::demo_script as script;
use ipnet::IpNet;

/// A fresh database on the test cluster.
async fn fresh_database() -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by the ctor");
    let name = format!("fleetban_demo_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&base).await.expect("connect to the test cluster");
    sqlx::query(&format!("create database {name}")).execute(&admin).await.expect("create database");
    admin.close().await;
    let (prefix, _) = base.rsplit_once('/').expect("DATABASE_URL has a database name");
    format!("{prefix}/{name}")
}

fn firewall_state(state_dir: &std::path::Path) -> Vec<IpNet> {
    let bytes = std::fs::read(state_dir.join(dryrun::FILE_NAME)).expect("dry-run firewall state exists");
    let records: Vec<dryrun::Record> = serde_json::from_slice(&bytes).expect("dry-run state is JSON");
    records.iter().map(|r| r.cidr.parse().expect("a CIDR")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_blocks_every_attack_on_every_host_and_no_legitimate_sender() {
    let url = fresh_database().await;
    let work = tempfile::tempdir().expect("temp dir");
    let out: Arc<Mutex<Vec<u8>>> = Arc::new(Mutex::new(Vec::new()));
    let options = DemoOptions {
        database_url: Some(url.clone()),
        work_dir: Some(work.path().to_path_buf()),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        exit_after_script: Some(Duration::from_secs(1)),
        out: out.clone(),
        ..DemoOptions::default()
    };
    let report = demo::run(options, tokio::time::sleep(Duration::from_secs(120))).await.expect("demo runs");
    let timeline = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    println!("{timeline}");
    assert!(report.script_completed, "the script did not finish:\n{timeline}");
    assert_eq!(report.hosts, ["mx1", "mx2", "mx3", "mx4"]);

    let campaign: IpNet = script::CAMPAIGN_PREFIX.parse().unwrap();
    let legit = script::legit_senders();
    for (host, dir) in report.hosts.iter().zip(&report.state_dirs) {
        let held = firewall_state(dir);
        let holds = |ip: IpAddr| held.iter().any(|net| net.contains(&ip));
        assert!(holds(script::FLOOD_SOURCE), "{host} does not block the flood source: {held:?}");
        assert!(holds(script::BRUTE_SOURCE), "{host} does not block the brute-force source: {held:?}");
        assert!(held.contains(&campaign), "{host} does not block {campaign}: {held:?}");
        for ip in &legit {
            assert!(!holds(*ip), "{host} blocks the legitimate sender {ip}: {held:?}");
        }
    }
    assert_eq!(report.legit_dropped, 0, "legitimate lines were dropped:\n{timeline}");

    let pool = sqlx::PgPool::connect(&url).await.expect("connect to the demo database");
    let live: Vec<IpNet> = sqlx::query_scalar(
        "select cidr from blocks where revoked_at is null and (expires_at is null or expires_at > now())",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for ip in [script::FLOOD_SOURCE, script::BRUTE_SOURCE] {
        assert!(live.iter().any(|net| net.contains(&ip)), "no live block of {ip} in the database: {live:?}");
    }
    assert!(live.contains(&campaign), "no live block of {campaign} in the database: {live:?}");
    for ip in &legit {
        assert!(!live.iter().any(|net| net.contains(ip)), "the database blocks the legitimate sender {ip}");
    }
    let per_agent: Vec<(String, i64)> = sqlx::query_as(
        "select a.name, (select count(*) from events e where e.agent_id = a.id) from agents a order by a.name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(per_agent.len(), 4, "{per_agent:?}");
    assert!(per_agent.iter().all(|(_, n)| *n > 0), "an agent stored no events: {per_agent:?}");
    // The brute force stayed below every host's own threshold: its block
    // came from fleet correlation, not from a local rule.
    let brute_reason: String = sqlx::query_scalar("select reason from blocks where cidr = $1::cidr")
        .bind(IpNet::from(script::BRUTE_SOURCE))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(brute_reason, "fleet_correlation");
    pool.close().await;
}
