//! `/metrics` renders what any module records through the `metrics` facade
//! and the fleet values read from the database. In its own test binary,
//! because the Prometheus recorder is process-wide and other tests would add
//! to its counters.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetban_server::api::{self, AppState};
use fleetban_server::correlate::CorrelateConfig;
use sqlx::PgPool;
use tower::ServiceExt;

#[ctor::ctor]
fn init() {
    fleetban_server::pgembed::ensure_test_database_url();
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn metrics_expose_facade_and_fleet_values(pool: PgPool) {
    let app = api::router(AppState::new(pool.clone(), CorrelateConfig::default()));
    let t = common::tokens(&pool).await;
    common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let request = Request::post("/api/v1/blocks")
        .header("authorization", format!("Bearer {}", t.admin))
        .header("content-type", "application/json")
        .body(Body::from(r#"{"cidr": "203.0.113.7", "reason": "r"}"#))
        .unwrap();
    assert_eq!(app.clone().oneshot(request).await.unwrap().status(), StatusCode::CREATED);
    metrics::counter!(api::metrics::INGEST_EVENTS).increment(3);
    metrics::histogram!(api::metrics::PUSH_LAG).record(0.02);
    let response = app.clone().oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    for needle in [
        "fleetban_ingest_events_total 3",
        "fleetban_agents_connected 1",
        "fleetban_agents_total 1",
        "fleetban_blocks_active{source=\"manual\"} 1",
        "fleetban_blocks_active{source=\"auto\"} 0",
        "fleetban_push_lag_seconds_bucket{le=\"0.025\"} 1",
        "fleetban_db_pool_connections{state=\"idle\"}",
        "fleetban_http_requests_total{method=\"POST\",route=\"/api/v1/blocks\",status=\"201\"} 1",
        "fleetban_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}
