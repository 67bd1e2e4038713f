//! `deploy/grafana/fleetban.json` queries only metrics that fleetban really
//! exports: every `fleetban_*` name in the dashboard (panel expressions and
//! variable queries) must appear in a real scrape of the agent's `/metrics`
//! text and of a running server's `/metrics` (in-process, on the embedded
//! Postgres, after a block was pushed so that the push-lag histogram exists).
//! A misspelt or renamed metric fails here. In its own test binary, because
//! the server's Prometheus recorder is process-wide.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetban_agent::detect::DetectStats;
use fleetban_agent::firewall::reconcile::FirewallStats;
use fleetban_agent::metrics::{self, KindCounters, Sources};
use fleetban_agent::pipeline::PipelineStats;
use fleetban_agent::spool::{Spool, SpoolOptions};
use fleetban_agent::uplink::UplinkStats;
use fleetban_server::api::auth::{Role, create_token};
use fleetban_server::serve;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const DASHBOARD: &str = include_str!("../../deploy/grafana/fleetban.json");

/// Metric names of a Prometheus text exposition (samples and `# TYPE`).
fn exposition_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|name| !name.is_empty()) {
            names.insert(name.to_owned());
        }
    }
    names
}

/// Every `fleetban_[a-z0-9_]+` token in the dashboard's strings.
fn dashboard_names(value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::String(text) => {
            let mut rest = text.as_str();
            while let Some(start) = rest.find("fleetban_") {
                let token: String = rest[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                rest = &rest[start + token.len()..];
                out.insert(token);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| dashboard_names(item, out)),
        serde_json::Value::Object(map) => map.values().for_each(|item| dashboard_names(item, out)),
        _ => {}
    }
}

fn agent_names() -> BTreeSet<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (spool, _) = Spool::open(&dir.path().join("spool"), SpoolOptions::with_max_bytes(1 << 20)).expect("spool");
    let sources = Sources {
        pipeline: Some(Arc::new(PipelineStats::default())),
        kinds: Some(Arc::new(KindCounters::default())),
        detect: Some(Arc::new(DetectStats::default())),
        firewall: Some(Arc::new(FirewallStats::default())),
        uplink: Some(Arc::new(UplinkStats::default())),
        spool: Some(Arc::new(Mutex::new(spool))),
    };
    exposition_names(&metrics::render(&sources))
}

async fn http(addr: SocketAddr, request: String) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

async fn scrape(addr: SocketAddr) -> String {
    let response = http(addr, "GET /metrics HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".into()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn every_dashboard_metric_is_exported(pool: PgPool) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http_listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::run(
        pool.clone(),
        serve::Options::default(),
        serve::Listeners { grpc, http: http_listener },
        async move {
            let _ = stop_rx.await;
        },
    ));
    // The first scrape installs the recorder; then a block is created and
    // pushed, which records the push lag.
    scrape(addr).await;
    let admin = create_token(&pool, Role::Admin, Some("grafana-test")).await.unwrap().token;
    let body = r#"{"cidr": "203.0.113.7", "reason": "dashboard test"}"#;
    let created = http(
        addr,
        format!(
            "POST /api/v1/blocks HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {admin}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(created.starts_with("HTTP/1.1 201"), "{created}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut text = scrape(addr).await;
    while !text.contains("fleetban_push_lag_seconds_count") {
        assert!(Instant::now() < deadline, "the push lag was never recorded:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = scrape(addr).await;
    }
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();

    let mut exported = exposition_names(&text);
    exported.extend(agent_names());
    assert!(exported.contains("fleetban_agent_firewall_entries") && exported.contains("fleetban_blocks_active"));

    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    dashboard_names(&dashboard, &mut used);
    assert!(used.len() >= 20, "the dashboard uses only {used:?}");
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics nobody exports: {unknown:?}\nexported: {exported:?}");

    // Every panel queries the datasource variable, and ids are unique.
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "duplicate panel id {}", panel["id"]);
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
            assert!(!target["expr"].as_str().unwrap_or_default().is_empty(), "{}", panel["title"]);
        }
    }
}
