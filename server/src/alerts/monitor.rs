//! The events the server watches for itself, checked every
//! `alerts.check_interval_secs` on every replica: agents offline, block
//! changes an agent has not applied in time, hosts whose connection slots
//! are exhausted. Each condition has a dedupe key, so it is one event
//! however many replicas and checks see it:
//!
//! - `agent_offline:<agent>:<last seen>`: once per outage;
//! - `propagation_lag:<agent>:<version>`: once per change the agent lags on;
//! - `slot_exhaustion:<agent>:<hour>`: at most once per host and hour.
//!
//! Slot exhaustion is read from the events agents store: Exim's
//! `refused: too many connections` (`refused_too_many`, which it logs for
//! everyone while every slot is taken) within `slot_window_secs`. The slot
//! count is the highest connection count a `connect` line reported in the
//! window, and the holders are the addresses that opened the most
//! connections in it (the store does not pair opens with ends; the agent's
//! detector, which does, blocks the real holders and those blocks arrive as
//! `block` events). Agents that aggregate context send these lines as
//! `context_summaries` (counts per address and interval); the monitor adds
//! those up with the single events, counting a summary when its last line
//! falls in the window.

use std::future::Future;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use time::OffsetDateTime;
use tracing::warn;
use uuid::Uuid;

use super::{Alert, AlertKind, AlertsConfig, Severity, record};
use crate::telemetry;

/// Most holders listed in a slot-exhaustion event.
const MAX_HOLDERS: i64 = 10;

/// Runs [`check`] every `check_interval_secs` until `shutdown` resolves.
pub async fn run(pool: PgPool, config: AlertsConfig, shutdown: impl Future<Output = ()>) {
    crate::periodic::every(Duration::from_secs(config.check_interval_secs), shutdown, || async {
        if let Err(error) = check(&pool, &config).await {
            warn!(%error, "Cannot check for agents offline, propagation lag or slot exhaustion.");
        }
    })
    .await;
}

/// Checks every condition once; returns how many new events were recorded.
pub async fn check(pool: &PgPool, config: &AlertsConfig) -> Result<usize, sqlx::Error> {
    let mut alerts = offline(pool, config.agent_offline_secs).await?;
    alerts.extend(lag(pool, config.propagation_lag_secs).await?);
    alerts.extend(slots(pool, config.slot_window_secs).await?);
    let mut new = 0;
    for alert in &alerts {
        if record(pool, alert).await? {
            new += 1;
            metrics::counter!(telemetry::ALERTS_RAISED, "kind" => alert.kind.as_str()).increment(1);
        }
    }
    Ok(new)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

async fn offline(pool: &PgPool, after_secs: u64) -> Result<Vec<Alert>, sqlx::Error> {
    let rows: Vec<(Uuid, String, OffsetDateTime, f64)> = sqlx::query_as(
        "select id, name, last_seen, extract(epoch from now() - last_seen)::float8 from agents \
         where revoked_at is null and removed_at is null and last_seen is not null \
           and last_seen < now() - make_interval(secs => $1) order by name",
    )
    .bind(after_secs as f64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, last_seen, silent)| Alert {
            kind: AlertKind::AgentOffline,
            severity: Severity::Warning,
            host: Some(name.clone()),
            dedupe_key: Some(format!("agent_offline:{id}:{}", last_seen.unix_timestamp())),
            summary: format!(
                "agent {} offline: not heard from for {} min (since {})",
                crate::text::escape(&name),
                (silent / 60.0).floor() as i64,
                rfc3339(last_seen)
            ),
            details: json!({ "agent_id": id, "agent": name, "last_seen": rfc3339(last_seen),
                             "silent_secs": silent.floor() as i64 }),
        })
        .collect())
}

/// An agent behind the blocklist: what it holds, the oldest version it
/// lacks and since when.
#[derive(sqlx::FromRow)]
struct LagRow {
    id: Uuid,
    name: String,
    applied: i64,
    version: i64,
    changed_at: OffsetDateTime,
    lag_secs: f64,
}

async fn lag(pool: &PgPool, bound_secs: u64) -> Result<Vec<Alert>, sqlx::Error> {
    let rows: Vec<LagRow> = sqlx::query_as(
        "select a.id, a.name, a.blocklist_version as applied, c.version, c.changed_at, \
                extract(epoch from now() - c.changed_at)::float8 as lag_secs \
         from agents a \
         join lateral (select version, changed_at from block_changes where version > a.blocklist_version \
                       order by version limit 1) c on true \
         where a.connected and a.revoked_at is null and a.removed_at is null \
           and c.changed_at < now() - make_interval(secs => $1) order by a.name",
    )
    .bind(bound_secs as f64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|LagRow { id, name, applied, version, changed_at, lag_secs: lag }| Alert {
            kind: AlertKind::PropagationLag,
            severity: Severity::Warning,
            host: Some(name.clone()),
            dedupe_key: Some(format!("propagation_lag:{id}:{version}")),
            summary: format!(
                "agent {} has not applied blocklist version {version} after {} s (it holds {applied})",
                crate::text::escape(&name),
                lag.floor() as i64
            ),
            details: json!({ "agent_id": id, "agent": name, "applied_version": applied,
                             "lagging_version": version, "changed_at": rfc3339(changed_at),
                             "lag_secs": lag.floor() as i64, "bound_secs": bound_secs }),
        })
        .collect())
}

async fn slots(pool: &PgPool, window_secs: u64) -> Result<Vec<Alert>, sqlx::Error> {
    let window = window_secs as f64;
    let hosts: Vec<(Uuid, String, i64, OffsetDateTime)> = sqlx::query_as(
        "select r.agent_id, g.name, sum(r.n)::int8, max(r.t) from ( \
           select agent_id, 1 as n, time as t from events \
           where time > now() - make_interval(secs => $1) and kind = 'refused_too_many' \
           union all \
           select agent_id, refused_full, last_seen from context_summaries \
           where last_seen > now() - make_interval(secs => $1) and refused_full > 0 \
             and interval_start > now() - make_interval(secs => $1) - interval '1 hour' \
         ) r join agents g on g.id = r.agent_id \
         group by r.agent_id, g.name order by g.name",
    )
    .bind(window)
    .fetch_all(pool)
    .await?;
    let hour = OffsetDateTime::now_utc().unix_timestamp() / 3600;
    let mut alerts = Vec::new();
    for (agent, name, refusals, last) in hosts {
        let slots: Option<i32> = sqlx::query_scalar(
            "select max(c) from ( \
               select max(connection_count) as c from events where agent_id = $1 and kind = 'connect' \
               and time > now() - make_interval(secs => $2) \
               union all \
               select max(max_connection_count) from context_summaries where agent_id = $1 and connects > 0 \
               and last_seen > now() - make_interval(secs => $2) \
               and interval_start > now() - make_interval(secs => $2) - interval '1 hour') m",
        )
        .bind(agent)
        .bind(window)
        .fetch_one(pool)
        .await?;
        let holders: Vec<(String, i64)> = sqlx::query_as(
            "select host(remote), sum(n)::int8 from ( \
               select remote, 1 as n from events where agent_id = $1 and kind = 'connect' \
               and time > now() - make_interval(secs => $2) \
               union all \
               select remote, connects from context_summaries where agent_id = $1 and connects > 0 \
               and last_seen > now() - make_interval(secs => $2) \
               and interval_start > now() - make_interval(secs => $2) - interval '1 hour' \
             ) c group by remote order by 2 desc, 1 limit $3",
        )
        .bind(agent)
        .bind(window)
        .bind(MAX_HOLDERS)
        .fetch_all(pool)
        .await?;
        let shown: Vec<String> = holders.iter().take(3).map(|(a, n)| format!("{a} ({n})")).collect();
        alerts.push(Alert {
            kind: AlertKind::SlotExhaustion,
            severity: Severity::Critical,
            host: Some(name.clone()),
            dedupe_key: Some(format!("slot_exhaustion:{agent}:{hour}")),
            summary: format!(
                "{} refused everyone: all {} connection slots taken ({refusals} refusals in {window_secs} s){}",
                crate::text::escape(&name),
                slots.map_or_else(|| "its".to_owned(), |s| s.to_string()),
                if shown.is_empty() { String::new() } else { format!("; top: {}", shown.join(", ")) }
            ),
            details: json!({
                "agent_id": agent, "agent": name, "slots": slots, "refusals": refusals,
                "window_secs": window_secs, "last_refusal": rfc3339(last),
                "holders": holders.iter().map(|(a, n)| json!({"address": a, "connections": n})).collect::<Vec<_>>(),
            }),
        });
    }
    Ok(alerts)
}
