//! `/metrics` renders what any module records through the `metrics` facade
//! and the fleet values read from the database. In its own test binary,
//! because the Prometheus recorder is process-wide and other tests would add
//! to its counters.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetban_server::api::{self, AppState};
use fleetban_server::correlate::CorrelateConfig;
use sqlx::PgPool;
use tower::ServiceExt;

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn metrics_expose_facade_and_fleet_values(pool: PgPool) {
    // The session counters a server shares with its API, and a running push
    // listener that measures the lag of the block created below.
    let stats = Arc::new(fleetban_server::session::Stats::default());
    stats.events_stored.store(3, Ordering::Relaxed);
    stats.events_rejected.store(2, Ordering::Relaxed);
    stats.batches_stored.store(5, Ordering::Relaxed);
    stats.batches_duplicate.store(1, Ordering::Relaxed);
    stats.sessions_open.store(4, Ordering::Relaxed);
    let hub = fleetban_server::push::Hub::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::spawn(fleetban_server::push::run_listener(pool.clone(), hub.clone(), async move {
        let _ = stopped.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hub.stats().listens < 1 {
        assert!(std::time::Instant::now() < deadline, "push listener never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A connected session that is up to date: the block goes straight onto
    // its stream.
    let version = fleetban_server::blocks::current_version(&pool).await.unwrap();
    let (out, mut stream) = tokio::sync::mpsc::channel(16);
    let mut sub = hub.subscribe(uuid::Uuid::new_v4(), out);
    assert!(sub.open(version));
    let app = api::router(AppState::new(pool.clone(), CorrelateConfig::default()).with_stats(stats));
    let t = common::tokens(&pool).await;
    common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let request = Request::post("/api/v1/blocks")
        .header("authorization", format!("Bearer {}", t.admin))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"cidr": "203.0.113.7", "reason": "r"}"#))
        .unwrap();
    assert_eq!(app.clone().oneshot(request).await.unwrap().status(), StatusCode::CREATED);
    // Recorded anywhere through the facade, rendered by /metrics.
    metrics::counter!("fleetban_test_marker_total").increment(7);
    // Wait until the listener has fanned the change out and measured it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hub.stats().deltas < 1 {
        assert!(std::time::Instant::now() < deadline, "push listener never saw the block");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = app.clone().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    for needle in [
        "fleetban_test_marker_total 7",
        "fleetban_ingest_events_total 3",
        "fleetban_ingest_invalid_events_total 2",
        "fleetban_ingest_batches_total{result=\"stored\"} 5",
        "fleetban_ingest_batches_total{result=\"duplicate\"} 1",
        "fleetban_agent_sessions 4",
        "fleetban_push_lag_seconds_count 1",
        "fleetban_agents_connected 1",
        "fleetban_agents_total 1",
        "fleetban_blocks_active{source=\"manual\"} 1",
        "fleetban_blocks_active{source=\"auto\"} 0",
        "fleetban_push_lag_seconds_bucket{le=\"+Inf\"} 1",
        "fleetban_db_pool_connections{state=\"idle\"}",
        "fleetban_http_requests_total{method=\"POST\",route=\"/api/v1/blocks\",status=\"201\"} 1",
        "fleetban_http_request_duration_seconds_bucket",
        "fleetban_push_deliveries_total{path=\"direct\"}",
        "fleetban_push_lagged_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let direct: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fleetban_push_deliveries_total{path=\"direct\"} "))
        .and_then(|v| v.trim().parse().ok())
        .expect("direct deliveries counted");
    assert!(direct >= 1, "the block was delivered directly: {direct}");
    let mut delta = false;
    while let Ok(Ok(frame)) = stream.try_recv() {
        delta |= matches!(frame.frame, Some(fleetban_proto::v1::server_frame::Frame::Delta(_)));
    }
    assert!(delta, "the session's stream got the delta");
    let _ = stop.send(());
    listener.await.unwrap();
}
