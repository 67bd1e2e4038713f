//! `GET /api/v1/notify`: the notification channels with their queues (events
//! waiting, messages pending and dead-lettered); `POST
//! /api/v1/notify/{name}/test`: sends a test message through a channel at
//! once (admin). Destinations are never shown: a Slack URL or SMTP password
//! is a secret.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Admin, Caller, audit};
use super::error::{ApiError, ApiPath};
use crate::alerts::dispatch;

/// A channel and its queue.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChannelStatus {
    /// The channel's name.
    pub name: String,
    /// `webhook`, `slack` or `email`.
    pub kind: String,
    /// Event types delivered (empty: all).
    pub events: Vec<String>,
    /// Least severity delivered.
    pub min_severity: String,
    /// Digest interval, seconds (none: each event as it comes).
    pub digest_interval_secs: Option<u64>,
    /// Rate limit, messages per hour.
    pub max_messages_per_hour: u32,
    /// Events routed to the channel and not yet in a message.
    pub queued_events: i64,
    /// Messages waiting for their first or next attempt.
    pub pending_messages: i64,
    /// Messages dead-lettered after their last attempt.
    pub dead_messages: i64,
    /// Messages delivered in the last 24 hours.
    pub delivered_24h: i64,
    /// When the last message was delivered.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_delivered_at: Option<OffsetDateTime>,
    /// The last failed attempt's error, of a message not yet delivered.
    pub last_error: Option<String>,
}

/// The result of a test message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TestResult {
    /// The channel.
    pub channel: String,
    /// Whether the receiver accepted it.
    pub delivered: bool,
    /// The test message's id, when delivered.
    pub message_id: Option<String>,
    /// Why it was not delivered.
    pub error: Option<String>,
}

/// One channel's queue as the store counts it.
#[derive(sqlx::FromRow)]
struct Counts {
    name: String,
    queued: i64,
    pending: i64,
    dead: i64,
    delivered_24h: i64,
    last_delivered_at: Option<OffsetDateTime>,
    last_error: Option<String>,
}

/// Lists the notification channels with their queues.
#[utoipa::path(get, path = "/api/v1/notify", tag = "notify", security(("bearer" = [])),
    responses((status = 200, body = [ChannelStatus]), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<Vec<ChannelStatus>>, ApiError> {
    let names: Vec<String> = state.channels.all().iter().map(|c| c.name.clone()).collect();
    let counts: Vec<Counts> = sqlx::query_as(
        "select n.name, \
           (select count(*) from notify_outbox o where o.channel = n.name and o.message_id is null) as queued, \
           (select count(*) from notify_messages m where m.channel = n.name and m.state = 'pending') as pending, \
           (select count(*) from notify_messages m where m.channel = n.name and m.state = 'dead') as dead, \
           (select count(*) from notify_messages m where m.channel = n.name and m.state = 'delivered' \
              and m.delivered_at > now() - interval '1 day') as delivered_24h, \
           (select max(delivered_at) from notify_messages m where m.channel = n.name) as last_delivered_at, \
           (select m.last_error from notify_messages m where m.channel = n.name and m.state <> 'delivered' \
              and m.last_error is not null order by m.id desc limit 1) as last_error \
         from unnest($1::text[]) as n(name)",
    )
    .bind(&names)
    .fetch_all(&state.pool)
    .await?;
    let list = state
        .channels
        .all()
        .iter()
        .map(|c| {
            let row = counts.iter().find(|r| r.name == c.name);
            ChannelStatus {
                name: c.name.clone(),
                kind: c.kind.as_str().to_owned(),
                events: c.events.iter().map(|e| e.as_str().to_owned()).collect(),
                min_severity: c.min_severity.as_str().to_owned(),
                digest_interval_secs: c.digest_interval_secs,
                max_messages_per_hour: c.max_messages_per_hour,
                queued_events: row.map_or(0, |r| r.queued),
                pending_messages: row.map_or(0, |r| r.pending),
                dead_messages: row.map_or(0, |r| r.dead),
                delivered_24h: row.map_or(0, |r| r.delivered_24h),
                last_delivered_at: row.and_then(|r| r.last_delivered_at),
                last_error: row.and_then(|r| r.last_error.clone()),
            }
        })
        .collect();
    Ok(Json(list))
}

/// Sends a test message through a channel now (not queued) and says
/// whether the receiver accepted it.
#[utoipa::path(post, path = "/api/v1/notify/{name}/test", tag = "notify", security(("bearer" = [])),
    params(("name" = String, Path, description = "The channel's name")),
    responses((status = 200, body = TestResult), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody)))]
pub async fn test(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<TestResult>, ApiError> {
    let channel =
        state.channels.get(&name).ok_or_else(|| ApiError::not_found(format!("no notification channel {name:?}")))?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "this host".to_owned());
    let result = match dispatch::send_test(channel, &host).await {
        Ok(id) => TestResult { channel: name.clone(), delivered: true, message_id: Some(id.to_string()), error: None },
        Err(error) => {
            tracing::warn!(error = %error, channel = %crate::text::escape(&name), "Test notification failed.");
            TestResult { channel: name.clone(), delivered: false, message_id: None, error: Some(error.to_string()) }
        }
    };
    audit(
        &state.pool,
        &caller.name,
        "notify.test",
        &name,
        serde_json::json!({ "delivered": result.delivered, "message_id": result.message_id }),
    )
    .await?;
    Ok(Json(result))
}
