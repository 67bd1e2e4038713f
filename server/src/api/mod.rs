//! The HTTP side of the server: the REST API under `/api/v1`, the dashboard,
//! `/metrics`, the OpenAPI document and the health checks.
//!
//! Every route is declared once, in [`routes`]: the router is built from that
//! table and the tests check it against the OpenAPI document and drive every
//! write in it through the auth matrix. Handlers live in one module per
//! resource; they authenticate with the [`auth::Caller`] / [`auth::Admin`]
//! extractors, fail with [`error::ApiError`], and write through
//! [`crate::blocks`] where the blocklist changes.
//!
//! Limits: request bodies are capped at [`MAX_BODY_BYTES`], requests time
//! out after [`REQUEST_TIMEOUT`], CORS is off (no cross-origin headers are
//! ever sent).
//!
//! # Layout
//!
//! - [`error`]: the error type and its JSON shape.
//! - [`auth`]: bearer tokens, roles, audit log.
//! - [`params`]: shared parameter parsing.
//! - [`agents`], [`blocks`], [`allowlist`], [`attackers`], [`events`],
//!   [`stats`], [`reports`]: the resources.
//! - [`tokens`]: API and enrollment tokens; [`audit`]: the audit log;
//!   [`whoami`]: the caller's role.
//! - [`feeds`]: status and refresh of blocklist feeds and ASN rules.
//! - [`timeseries`]: abuse, block and slot series over a range.
//! - [`explain`]: why a block was made, in words.
//! - [`openapi`]: the OpenAPI document.
//! - [`dashboard`]: the embedded single-page dashboard.
//! - [`metrics`]: Prometheus metrics and their names.
//! - [`notify`]: notification channels, their queues, test messages.

pub mod agents;
pub mod allowlist;
pub mod attackers;
pub mod audit;
pub mod auth;
pub mod blocks;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod explain;
pub mod feeds;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod params;
pub mod replicas;
pub mod reports;
pub mod shadow;
pub mod stats;
pub mod summaries;
pub mod timeseries;
pub mod tokens;
pub mod transfer;
pub mod whoami;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::routing::{MethodRouter, delete, get, patch, post};
use sqlx::PgPool;
use tower_http::timeout::TimeoutLayer;

use crate::correlate::CorrelateConfig;
use error::ApiError;

/// Largest request body, bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest a request may take before it is answered 408.
pub const REQUEST_TIMEOUT: Duration = crate::config::HTTP_REQUEST_TIMEOUT;

/// Shared state of every HTTP handler.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The database pool.
    pub pool: PgPool,
    /// The policy blocks are checked against (allowlist, fleet addresses,
    /// `never_block`, minimum prefixes).
    pub policy: Arc<CorrelateConfig>,
    /// The agent-session counters of this server, exported by `/metrics`.
    pub stats: Option<Arc<crate::session::Stats>>,
    /// The configured blocklist feeds and ASN block rules.
    pub feeds: Arc<crate::feeds::Feeds>,
    /// The country database and ASN/country policy (countries shown in the
    /// attacker views and reports).
    pub geo: Arc<crate::geo::GeoPolicy>,
    /// The notification channels (`[[notify]]`).
    pub channels: crate::alerts::Channels,
    /// This server replica (its name, id and leadership), when it runs one.
    pub replica: Option<crate::replica::Replica>,
}

impl AppState {
    /// State over `pool` with `policy`.
    pub fn new(pool: PgPool, policy: CorrelateConfig) -> Self {
        AppState {
            pool,
            policy: Arc::new(policy),
            stats: None,
            feeds: Arc::default(),
            geo: Arc::default(),
            channels: crate::alerts::Channels::default(),
            replica: None,
        }
    }

    /// Shows `replica` on `/api/v1/replicas` and `/metrics`.
    pub fn with_replica(mut self, replica: crate::replica::Replica) -> Self {
        self.replica = Some(replica);
        self
    }

    /// Shows countries from `geo`'s country database.
    pub fn with_geo(mut self, geo: Arc<crate::geo::GeoPolicy>) -> Self {
        self.geo = geo;
        self
    }

    /// Serves the status and refresh of `feeds`.
    pub fn with_feeds(mut self, feeds: Arc<crate::feeds::Feeds>) -> Self {
        self.feeds = feeds;
        self
    }

    /// Serves `channels` (`GET /api/v1/notify`, `POST .../test`).
    pub fn with_channels(mut self, channels: crate::alerts::Channels) -> Self {
        self.channels = channels;
        self
    }

    /// Exports `stats` (ingest and session counters) on `/metrics`.
    pub fn with_stats(mut self, stats: Arc<crate::session::Stats>) -> Self {
        self.stats = Some(stats);
        self
    }
}

/// Every route: method, path, handler. The one place routes are declared.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    vec![
        (Method::GET, "/", get(dashboard::index)),
        (Method::GET, "/dashboard/app.js", get(dashboard::script)),
        (Method::GET, "/dashboard/app.css", get(dashboard::style)),
        (Method::GET, "/healthz", get(healthz)),
        (Method::GET, "/readyz", get(readyz)),
        (Method::GET, "/metrics", get(metrics::render)),
        (Method::GET, "/api/v1/openapi.json", get(openapi::document)),
        (Method::GET, "/api/v1/agents", get(agents::list)),
        (Method::GET, "/api/v1/agents/{id}", get(agents::get)),
        (Method::PATCH, "/api/v1/agents/{id}", patch(agents::rename)),
        (Method::DELETE, "/api/v1/agents/{id}", delete(agents::remove)),
        (Method::POST, "/api/v1/agents/{id}/revoke", post(agents::revoke)),
        (Method::GET, "/api/v1/tokens", get(tokens::list)),
        (Method::POST, "/api/v1/tokens", post(tokens::create)),
        (Method::DELETE, "/api/v1/tokens/{id}", delete(tokens::revoke)),
        (Method::GET, "/api/v1/enroll-tokens", get(tokens::list_enroll)),
        (Method::POST, "/api/v1/enroll-tokens", post(tokens::create_enroll)),
        (Method::DELETE, "/api/v1/enroll-tokens/{id}", delete(tokens::revoke_enroll)),
        (Method::GET, "/api/v1/audit", get(audit::list)),
        (Method::GET, "/api/v1/blocks", get(blocks::list)),
        (Method::POST, "/api/v1/blocks", post(blocks::create)),
        (Method::GET, "/api/v1/blocks/{id}", get(blocks::get)),
        (Method::DELETE, "/api/v1/blocks/{id}", delete(blocks::delete)),
        (Method::GET, "/api/v1/allowlist", get(allowlist::list)),
        (Method::POST, "/api/v1/allowlist", post(allowlist::create)),
        (Method::DELETE, "/api/v1/allowlist", delete(allowlist::delete_by_cidr)),
        (Method::DELETE, "/api/v1/allowlist/{id}", delete(allowlist::delete)),
        (
            Method::POST,
            "/api/v1/import",
            post(transfer::import).layer(DefaultBodyLimit::max(transfer::MAX_IMPORT_BYTES)),
        ),
        (Method::GET, "/api/v1/export", get(transfer::export)),
        (Method::GET, "/api/v1/attackers", get(attackers::list)),
        (Method::GET, "/api/v1/attackers/{ip}", get(attackers::get)),
        (Method::GET, "/api/v1/events", get(events::list)),
        (Method::GET, "/api/v1/summaries", get(summaries::list)),
        (Method::GET, "/api/v1/shadow", get(shadow::list)),
        (Method::GET, "/api/v1/stats", get(stats::get)),
        (Method::GET, "/api/v1/feeds", get(feeds::list)),
        (Method::POST, "/api/v1/feeds/{name}/refresh", post(feeds::refresh)),
        (Method::GET, "/api/v1/timeseries/abuse", get(timeseries::abuse)),
        (Method::GET, "/api/v1/timeseries/blocks", get(timeseries::blocks)),
        (Method::GET, "/api/v1/timeseries/slots", get(timeseries::slots)),
        (Method::GET, "/api/v1/whoami", get(whoami::get)),
        (Method::GET, "/api/v1/notify", get(notify::list)),
        (Method::POST, "/api/v1/notify/{name}/test", post(notify::test)),
        (Method::GET, "/api/v1/reports/abuse", get(reports::abuse)),
        (Method::GET, "/api/v1/replicas", get(replicas::list)),
    ]
}

/// The HTTP router.
pub fn router(state: AppState) -> Router {
    metrics::install();
    let mut router = Router::new();
    for (_, path, handler) in routes() {
        router = router.route(path, handler);
    }
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// The `x-next-cursor` header of a paginated list, if there is a next page.
pub(crate) fn next_cursor_headers(next: Option<String>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(value) = next.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert("x-next-cursor", value);
    }
    headers
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", content_type = "text/plain", body = String)))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready", content_type = "text/plain", body = String),
              (status = 503, description = "Database unreachable", content_type = "text/plain", body = String)))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match sqlx::query_scalar::<_, i32>("select 1").fetch_one(&state.pool).await {
        Ok(_) => (StatusCode::OK, "ok\n"),
        Err(error) => {
            tracing::warn!(%error, "Readiness check: database unreachable.");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
        }
    }
}
