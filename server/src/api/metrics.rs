//! `/metrics`: Prometheus text exposition.
//!
//! Any code of the server records through the `metrics` facade
//! (`metrics::counter!`, `gauge!`, `histogram!`); [`install`] puts the
//! Prometheus recorder behind it once per process, and `/metrics` renders
//! it. Values that live in the database (agents, blocks, blocklist version,
//! propagation lag) and the pool's state are refreshed from it at each
//! scrape, so they are right whichever replica is scraped.
//!
//! # Metric names
//!
//! | name | type | labels | recorded by |
//! |---|---|---|---|
//! | `fleetban_ingest_events_total` | counter | | scrape, from `session::Stats`: events stored |
//! | `fleetban_ingest_invalid_events_total` | counter | | scrape, from `session::Stats`: events rejected as invalid |
//! | `fleetban_ingest_batches_total` | counter | `result` = `stored`, `duplicate`, `refused` | scrape, from `session::Stats` |
//! | `fleetban_ingest_group_commits_total` | counter | | ingest, at each commit of a group of batches |
//! | `fleetban_agent_frames_rejected_total` | counter | `reason` = `undecodable`, `invalid` | scrape, from `session::Stats` |
//! | `fleetban_agent_auth_refused_total` | counter | | scrape, from `session::Stats` |
//! | `fleetban_agent_spool_lost_events_total` | counter | | scrape, from `session::Stats`: losses agents reported |
//! | `fleetban_agent_reports_total` | counter | | scrape, from `session::Stats`: `Applied` reports and signs of life recorded by sessions |
//! | `fleetban_agent_report_flushes_total` | counter | | scrape, from `session::Stats`: statements that stored them (`applied`) |
//! | `fleetban_push_lag_seconds` | histogram | | push: oldest change of a delta, commit → fan-out to sessions |
//! | `fleetban_agent_heartbeats_total` | counter | | `heartbeat`: heartbeats written |
//! | `fleetban_agent_heartbeat_statements_total` | counter | | `heartbeat`: statements that wrote them |
//! | `fleetban_agent_sessions` | gauge | | scrape, from `session::Stats`: sessions open on this replica |
//! | `fleetban_agents_connected` | gauge | | scrape: agents with an open session (fleet-wide) |
//! | `fleetban_agents_total` | gauge | | scrape: agents not revoked |
//! | `fleetban_blocks_active` | gauge | `source` = `auto`, `agent`, `manual`, `feed`, `policy` | scrape |
//! | `fleetban_blocklist_version` | gauge | | scrape: latest block change version |
//! | `fleetban_propagation_lag_seconds` | gauge | | scrape: oldest change a connected agent has not applied |
//! | `fleetban_events_per_second` | gauge | `window` = `1m`, `1h` | scrape |
//! | `fleetban_db_pool_connections` | gauge | `state` = `idle`, `busy` | scrape |
//! | `fleetban_http_requests_total` | counter | `method`, `route`, `status` | API middleware |
//! | `fleetban_http_request_duration_seconds` | histogram | `method`, `route` | API middleware |
//! | `fleetban_connections_open` | gauge | `listener` = `grpc`, `http` | `conn`: admitted connections open now |
//! | `fleetban_connections_unauthenticated` | gauge | | `conn`: gRPC connections without an authenticated session |
//! | `fleetban_connections_refused_total` | counter | `listener`; `reason` = `max_connections`, `per_source`, `unauthenticated`, `unauthenticated_per_source` | `conn`: closed at accept |
//! | `fleetban_connections_timed_out_total` | counter | `listener`; `phase` = `handshake`, `header`, `idle` | `conn`: closed for a deadline |
//! | `fleetban_agent_auth_throttled_total` | counter | | `guard`: Enroll/Connect refused after repeated failures from the source |
//! | `fleetban_shadow_decisions_total` | counter | `rule` | `correlate`: decisions of rules in shadow mode, recorded, nothing blocked |
//! | `fleetban_correlate_spared_total` | counter | `why` = `protected`, `good_standing` | `correlate`: automatic blocks not made |
//! | `fleetban_feed_refreshes_total` | counter | `feed`; `outcome` = `ok`, `failed`, `held` | `feeds`: refreshes of feeds and ASN rules (`failed`/`held` keep the previous list) |
//! | `fleetban_feed_bad_lines_total` | counter | `feed` | `feeds`: malformed lines skipped |
//! | `fleetban_feed_entries` | gauge | `feed` | `feeds`: entries of the last accepted list |
//! | `fleetban_feed_last_success_timestamp_seconds` | gauge | `feed` | `feeds`: Unix time of the last accepted list |
//! | `fleetban_policy_threshold_adjustments_total` | counter | `direction` = `stronger`, `weaker` | `geo`: judgements with an ASN/country evidence multiplier |

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::AppState;
use super::stats;

pub use crate::telemetry::{AGENT_SESSIONS, INGEST_BATCHES, INGEST_EVENTS, INGEST_INVALID_EVENTS, PUSH_LAG};

/// Buckets of every `_seconds` histogram: 1 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder, once;
/// returns its handle, or `None` if another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
            {
                Ok(builder) => builder,
                Err(error) => {
                    tracing::warn!(%error, "Cannot configure metric buckets; using summaries.");
                    PrometheusBuilder::new()
                }
            };
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot install the Prometheus recorder; /metrics is unavailable.");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    metrics::describe_counter!(INGEST_EVENTS, "Events stored by ingest.");
    metrics::describe_counter!(INGEST_INVALID_EVENTS, "Events rejected by ingest as invalid.");
    metrics::describe_counter!(INGEST_BATCHES, "Event batches by result (stored, duplicate, refused).");
    metrics::describe_counter!(
        crate::telemetry::INGEST_GROUP_COMMITS,
        "Ingest transactions committed, each with one or more agents' batches."
    );
    metrics::describe_histogram!(PUSH_LAG, metrics::Unit::Seconds, "Block change commit to delivery to an agent.");
    metrics::describe_counter!(
        crate::telemetry::PUSH_DELIVERIES,
        "Pushes delivered to agent sessions, by path (direct onto the stream, or queued for the session)."
    );
    metrics::describe_counter!(
        crate::telemetry::PUSH_LAGGED,
        "Agent push queues that overflowed (the agent gets a snapshot instead)."
    );
    metrics::describe_counter!(
        crate::telemetry::HEARTBEATS,
        "Agent heartbeats written (seen, connected, credentials checked)."
    );
    metrics::describe_counter!(
        crate::telemetry::HEARTBEAT_STATEMENTS,
        "Statements that wrote agent heartbeats (several agents each under load)."
    );
    metrics::describe_gauge!(AGENT_SESSIONS, "Agent sessions open on this replica.");
    metrics::describe_gauge!(crate::telemetry::REPLICA_LEADER, "1 while this replica leads the fleet-wide sweeps.");
    metrics::describe_gauge!(crate::telemetry::REPLICA_INFO, "This replica's name and id (always 1).");
    metrics::describe_gauge!(crate::telemetry::REPLICAS_ALIVE, "Server replicas alive on the database.");
    metrics::describe_counter!(crate::telemetry::NOTIFY_DELIVERED, "Notification messages delivered, by channel.");
    metrics::describe_counter!(
        crate::telemetry::NOTIFY_ATTEMPT_FAILURES,
        "Failed notification delivery attempts (each retry counts), by channel."
    );
    metrics::describe_counter!(
        crate::telemetry::NOTIFY_DEAD_LETTERS,
        "Notification messages dead-lettered after their last attempt, by channel."
    );
    metrics::describe_gauge!(
        crate::telemetry::NOTIFY_QUEUE,
        "Notification messages not delivered, fleet-wide, by channel and state (pending, dead)."
    );
    metrics::describe_counter!(
        crate::telemetry::ALERTS_RAISED,
        "Events raised by the server's monitor (agent offline, propagation lag, slot exhaustion), by kind."
    );
    metrics::describe_counter!(
        crate::correlate::SHADOW_DECISIONS,
        "Decisions of rules in shadow mode (recorded, nothing blocked), by rule."
    );
    metrics::describe_counter!(
        crate::correlate::SPARED,
        "Automatic blocks not made, by why (protected sender, good standing)."
    );
    metrics::describe_counter!(
        crate::telemetry::FEED_REFRESHES,
        "Refreshes of blocklist feeds and ASN rules by feed and outcome (failed and held keep the previous list)."
    );
    metrics::describe_counter!(crate::telemetry::FEED_BAD_LINES, "Malformed feed lines skipped, by feed.");
    metrics::describe_gauge!(crate::telemetry::FEED_ENTRIES, "Entries of each feed's last accepted list.");
    metrics::describe_gauge!(crate::telemetry::FEED_LAST_SUCCESS, "Unix time of each feed's last accepted list.");
    metrics::describe_counter!(
        crate::telemetry::POLICY_THRESHOLD_ADJUSTED,
        "Correlation judgements whose thresholds an ASN or country evidence multiplier changed."
    );
    metrics::describe_counter!(crate::applied::REPORTS, "Agent reports (Applied, signs of life) recorded by sessions.");
    metrics::describe_counter!(crate::applied::FLUSHES, "Statements that stored the agents' latest reports.");
    metrics::describe_gauge!("fleetban_agents_connected", "Agents with an open session, fleet-wide.");
    metrics::describe_gauge!("fleetban_agents_total", "Agents not revoked.");
    metrics::describe_gauge!("fleetban_blocks_active", "Live blocks by source.");
    metrics::describe_gauge!("fleetban_blocklist_version", "Latest blocklist version.");
    metrics::describe_gauge!(
        "fleetban_propagation_lag_seconds",
        "Age of the oldest block change a connected agent has not applied."
    );
    metrics::describe_gauge!("fleetban_events_per_second", "Stored events per second by log time.");
    metrics::describe_gauge!("fleetban_db_pool_connections", "Database pool connections by state.");
    metrics::describe_counter!("fleetban_http_requests_total", "HTTP requests by method, route and status.");
    metrics::describe_gauge!(crate::conn::CONNECTIONS_OPEN, "Open connections by listener.");
    metrics::describe_gauge!(
        crate::conn::CONNECTIONS_UNAUTHENTICATED,
        "gRPC connections without an authenticated agent session."
    );
    metrics::describe_counter!(
        crate::conn::CONNECTIONS_REFUSED,
        "Connections closed at accept by a connection limit, by listener and limit."
    );
    metrics::describe_counter!(
        crate::conn::CONNECTIONS_TIMED_OUT,
        "Connections closed for a deadline (handshake, header, idle), by listener."
    );
    metrics::describe_counter!(
        crate::guard::AUTH_THROTTLED,
        "Enroll/Connect calls refused because their source failed authentication too often."
    );
    metrics::describe_histogram!(
        "fleetban_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP request duration by method and route."
    );
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
              (status = 503, description = "No recorder")))]
pub async fn render(State(state): State<AppState>) -> Response {
    let Some(handle) = install() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder unavailable\n").into_response();
    };
    if let Some(stats) = &state.stats {
        export_session_stats(stats);
    }
    if let Some(replica) = &state.replica {
        metrics::gauge!(crate::telemetry::REPLICA_LEADER).set(if replica.is_leader() { 1.0 } else { 0.0 });
        metrics::gauge!(crate::telemetry::REPLICA_INFO, "replica" => replica.name().to_owned(), "id" => replica.id().to_string())
            .set(1.0);
        match crate::replica::list(&state.pool).await {
            Ok(rows) => {
                let alive = rows.iter().filter(|r| r.alive).count();
                metrics::gauge!(crate::telemetry::REPLICAS_ALIVE).set(alive as f64);
            }
            Err(error) => tracing::warn!(%error, "Metrics scrape: cannot read the replicas."),
        }
    }
    let size = state.pool.size();
    let idle = u32::try_from(state.pool.num_idle()).unwrap_or(u32::MAX);
    metrics::gauge!("fleetban_db_pool_connections", "state" => "idle").set(f64::from(idle));
    metrics::gauge!("fleetban_db_pool_connections", "state" => "busy").set(f64::from(size.saturating_sub(idle)));
    match stats::compute(&state.pool).await {
        Ok(s) => {
            metrics::gauge!("fleetban_agents_connected").set(s.agents_connected as f64);
            metrics::gauge!("fleetban_agents_total").set(s.agents_total as f64);
            metrics::gauge!("fleetban_blocklist_version").set(s.blocklist_version as f64);
            metrics::gauge!("fleetban_propagation_lag_seconds").set(s.propagation_lag_secs);
            metrics::gauge!("fleetban_events_per_second", "window" => "1m").set(s.events_per_sec_1m);
            metrics::gauge!("fleetban_events_per_second", "window" => "1h").set(s.events_per_sec_1h);
            for source in ["auto", "agent", "manual"] {
                let n = s.blocks_by_source.get(source).copied().unwrap_or(0);
                metrics::gauge!("fleetban_blocks_active", "source" => source).set(n as f64);
            }
        }
        Err(error) => tracing::warn!(%error, "Metrics scrape: cannot read fleet statistics."),
    }
    match crate::alerts::dispatch::queue_counts(&state.pool, &state.channels).await {
        Ok(counts) => {
            for (channel, queue_state, n) in counts {
                metrics::gauge!(crate::telemetry::NOTIFY_QUEUE, "channel" => channel, "state" => queue_state)
                    .set(n as f64);
            }
        }
        Err(error) => tracing::warn!(%error, "Metrics scrape: cannot read the notification queue."),
    }
    handle.run_upkeep();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

/// Mirrors the session counters (atomics owned by `session`) into the
/// recorder.
fn export_session_stats(stats: &crate::session::Stats) {
    use crate::session::Stats;
    metrics::counter!(INGEST_EVENTS).absolute(Stats::get(&stats.events_stored));
    metrics::counter!(INGEST_INVALID_EVENTS).absolute(Stats::get(&stats.events_rejected));
    metrics::counter!(INGEST_BATCHES, "result" => "stored").absolute(Stats::get(&stats.batches_stored));
    metrics::counter!(INGEST_BATCHES, "result" => "duplicate").absolute(Stats::get(&stats.batches_duplicate));
    metrics::counter!(INGEST_BATCHES, "result" => "refused").absolute(Stats::get(&stats.batches_refused));
    metrics::counter!("fleetban_agent_frames_rejected_total", "reason" => "undecodable")
        .absolute(Stats::get(&stats.frames_rejected));
    metrics::counter!("fleetban_agent_frames_rejected_total", "reason" => "invalid")
        .absolute(Stats::get(&stats.frames_invalid));
    metrics::counter!("fleetban_agent_auth_refused_total").absolute(Stats::get(&stats.auth_refused));
    metrics::counter!("fleetban_agent_spool_lost_events_total").absolute(Stats::get(&stats.spool_lost_events));
    metrics::counter!(crate::applied::REPORTS).absolute(Stats::get(&stats.reports.recorded));
    metrics::counter!(crate::applied::FLUSHES).absolute(Stats::get(&stats.reports.flushes));
    metrics::gauge!(AGENT_SESSIONS).set(Stats::get(&stats.sessions_open) as f64);
}

/// Middleware: counts and times every HTTP request by its route template.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("fleetban_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("fleetban_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
