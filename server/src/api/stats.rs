//! `/api/v1/stats`: the fleet at a glance — event rates, events by kind,
//! active blocks, agents connected, and how far behind the blocklist the
//! slowest connected agent is.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;

/// Fleet statistics.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Events per second over the last minute (by log time): single events
    /// plus the lines agents counted into context summaries (a summary
    /// arrives once its interval ended, so its lines count here only when
    /// the interval started within the minute).
    pub events_per_sec_1m: f64,
    /// Events per second over the last hour (by log time), summarised
    /// lines included.
    pub events_per_sec_1h: f64,
    /// Events of the last hour by kind, summarised lines included.
    pub events_by_kind_1h: BTreeMap<String, i64>,
    /// Context summaries stored for the last hour (rows; each stands for
    /// the context lines of one address and service in one interval).
    #[serde(default)]
    pub summaries_1h: i64,
    /// Live blocks.
    pub active_blocks: i64,
    /// Live blocks by source (`auto`, `agent`, `manual`, `feed`, `policy`).
    pub blocks_by_source: BTreeMap<String, i64>,
    /// Agents with an open session.
    pub agents_connected: i64,
    /// Agents not revoked.
    pub agents_total: i64,
    /// Latest blocklist version.
    pub blocklist_version: i64,
    /// Largest number of versions a connected agent is behind.
    pub max_versions_behind: i64,
    /// Propagation lag: how long the oldest change not yet applied by some
    /// connected agent has been waiting, seconds (0 when all are current).
    pub propagation_lag_secs: f64,
}

#[derive(sqlx::FromRow)]
struct Scalars {
    events_1m: i64,
    events_1h: i64,
    summaries_1h: i64,
    active_blocks: i64,
    agents_connected: i64,
    agents_total: i64,
    blocklist_version: i64,
    max_versions_behind: i64,
    propagation_lag_secs: f64,
}

/// Computes the statistics (also used by `/metrics`).
pub async fn compute(pool: &PgPool) -> Result<Stats, sqlx::Error> {
    let s = sqlx::query_as::<_, Scalars>(
        "select \
           (select count(*) from events where time >= now() - interval '1 minute' and time <= now() + interval '1 minute') \
             + (select coalesce(sum(lines), 0) from context_summaries \
                where interval_start >= now() - interval '1 minute' and interval_start <= now() + interval '1 minute')::bigint \
             as events_1m, \
           (select count(*) from events where time >= now() - interval '1 hour' and time <= now() + interval '1 minute') \
             + (select coalesce(sum(lines), 0) from context_summaries \
                where interval_start >= now() - interval '1 hour' and interval_start <= now() + interval '1 minute')::bigint \
             as events_1h, \
           (select count(*) from context_summaries \
             where interval_start >= now() - interval '1 hour' and interval_start <= now() + interval '1 minute') \
             as summaries_1h, \
           (select count(*) from live_blocks) as active_blocks, \
           (select count(*) from agents where connected and revoked_at is null) as agents_connected, \
           (select count(*) from agents where revoked_at is null) as agents_total, \
           (select coalesce(max(version), 0) from block_changes) as blocklist_version, \
           (select coalesce(max(greatest((select coalesce(max(version), 0) from block_changes) - a.blocklist_version, 0)), 0) \
              from agents a where a.connected and a.revoked_at is null)::bigint as max_versions_behind, \
           (select coalesce(max(extract(epoch from now() - \
                     (select min(c.changed_at) from block_changes c where c.version > a.blocklist_version))), 0) \
              from agents a where a.connected and a.revoked_at is null)::float8 as propagation_lag_secs",
    )
    .fetch_one(pool)
    .await?;
    let by_kind: Vec<(String, i64)> = sqlx::query_as(
        "select kind, sum(n)::bigint from ( \
           select kind, count(*) as n from events where time >= now() - interval '1 hour' group by kind \
           union all \
           select c.kind, sum(c.n) from context_summaries s, unnest(s.kinds, s.counts) as c(kind, n) \
           where s.interval_start >= now() - interval '1 hour' group by c.kind \
         ) k group by kind order by kind",
    )
    .fetch_all(pool)
    .await?;
    let by_source: Vec<(String, i64)> =
        sqlx::query_as("select source, count(*) from live_blocks group by source").fetch_all(pool).await?;
    Ok(Stats {
        events_per_sec_1m: s.events_1m as f64 / 60.0,
        events_per_sec_1h: s.events_1h as f64 / 3600.0,
        events_by_kind_1h: by_kind.into_iter().collect(),
        summaries_1h: s.summaries_1h,
        active_blocks: s.active_blocks,
        blocks_by_source: by_source.into_iter().collect(),
        agents_connected: s.agents_connected,
        agents_total: s.agents_total,
        blocklist_version: s.blocklist_version,
        max_versions_behind: s.max_versions_behind,
        propagation_lag_secs: s.propagation_lag_secs,
    })
}

/// Fleet statistics.
#[utoipa::path(get, path = "/api/v1/stats", tag = "stats", security(("bearer" = [])),
    responses((status = 200, body = Stats), (status = 401, body = super::error::ErrorBody)))]
pub async fn get(State(state): State<AppState>, _caller: Caller) -> Result<Json<Stats>, ApiError> {
    Ok(Json(compute(&state.pool).await?))
}
