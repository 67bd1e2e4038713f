//! The dispatcher: routes recorded events to channels, composes messages
//! under each channel's rate limit and digest interval, and delivers them
//! with retries. Every replica runs one; Postgres row locks and a
//! per-channel advisory lock keep them from doing the same work twice (see
//! the module docs of [`super`] for the guarantee).

use std::future::Future;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;
use tracing::{debug, warn};
use uuid::Uuid;

use super::deliver::{DeliveryError, EventItem, Message, Sender};
use super::{AlertKind, ChannelConfig, Channels, Severity};
use crate::telemetry;

/// Most events routed per transaction.
const ROUTE_BATCH: i64 = 500;
/// Most events in one message.
pub const MAX_EVENTS_PER_MESSAGE: i64 = 1000;
/// Most messages one tick delivers before it routes and composes again.
const DELIVER_PER_TICK: usize = 100;
/// A message whose channel this replica does not know waits this long (the
/// channel may exist in another replica's config during a rolling change).
const UNKNOWN_CHANNEL_RETRY: Duration = Duration::from_secs(300);

/// What happened to a claimed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered.
    Delivered,
    /// Failed; it will be retried.
    Retry,
    /// Failed for the last time: dead-lettered.
    Dead,
    /// Its channel is not configured here; left for later.
    Postponed,
}

/// Routes, composes and delivers.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pool: PgPool,
    channels: Channels,
    sender: Sender,
}

impl Dispatcher {
    /// A dispatcher over `pool` for `channels`.
    pub fn new(pool: PgPool, channels: Channels) -> Result<Self, reqwest::Error> {
        Ok(Dispatcher { pool, channels, sender: Sender::new()? })
    }

    /// Routes and composes, then delivers due messages (at most
    /// [`DELIVER_PER_TICK`]); returns the outcomes.
    pub async fn tick(&self) -> Result<Vec<Outcome>, sqlx::Error> {
        self.route().await?;
        self.compose_all().await?;
        let mut outcomes = Vec::new();
        while outcomes.len() < DELIVER_PER_TICK {
            match self.deliver_one().await? {
                Some(outcome) => outcomes.push(outcome),
                None => break,
            }
        }
        Ok(outcomes)
    }

    /// Runs every `interval` until `shutdown` resolves. Shutdown is checked
    /// between messages, so a message being sent is finished and recorded
    /// first.
    pub async fn run(self, interval: Duration, retention: Duration, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_cleanup: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = ticker.tick() => {}
            }
            if let Err(error) = async {
                self.route().await?;
                self.compose_all().await
            }
            .await
            {
                warn!(%error, "Cannot route or compose notifications.");
                continue;
            }
            for _ in 0..DELIVER_PER_TICK {
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    () = std::future::ready(()) => {}
                }
                match self.deliver_one().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(error) => {
                        warn!(%error, "Cannot deliver notifications.");
                        break;
                    }
                }
            }
            if last_cleanup.is_none_or(|at| at.elapsed() >= Duration::from_secs(3600)) {
                last_cleanup = Some(tokio::time::Instant::now());
                if let Err(error) = cleanup(&self.pool, retention).await {
                    warn!(%error, "Cannot delete old notifications.");
                }
            }
        }
    }

    /// Gives every unrouted event one outbox row per channel that accepts
    /// it; returns how many events were routed.
    pub async fn route(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let events: Vec<(i64, String, String, Option<String>)> = sqlx::query_as(
            "select id, kind, severity, host from alert_events where not routed order by id limit $1 \
             for update skip locked",
        )
        .bind(ROUTE_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if events.is_empty() {
            return Ok(0);
        }
        let (mut names, mut alert_ids) = (Vec::new(), Vec::new());
        for (id, kind, severity, host) in &events {
            let Some(kind) = AlertKind::parse(kind) else {
                debug!(id, kind = %kind, "Alert event of an unknown type is routed nowhere.");
                continue;
            };
            let severity = Severity::parse(severity).unwrap_or_default();
            for channel in self.channels.all().iter().filter(|c| c.accepts(kind, severity, host.as_deref())) {
                names.push(channel.name.clone());
                alert_ids.push(*id);
            }
        }
        sqlx::query(
            "insert into notify_outbox (channel, alert_id) select * from unnest($1::text[], $2::bigint[]) \
             on conflict do nothing",
        )
        .bind(&names)
        .bind(&alert_ids)
        .execute(&mut *tx)
        .await?;
        let ids: Vec<i64> = events.iter().map(|e| e.0).collect();
        sqlx::query("update alert_events set routed = true where id = any($1)").bind(&ids).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(events.len())
    }

    /// Composes messages for every channel; returns how many were made.
    pub async fn compose_all(&self) -> Result<usize, sqlx::Error> {
        let mut made = 0;
        for channel in self.channels.all() {
            made += compose(&self.pool, channel).await?;
        }
        Ok(made)
    }

    /// Claims the next due message, sends it and records the outcome;
    /// `None` when no message is due (or all due ones are being sent by
    /// other replicas).
    pub async fn deliver_one(&self) -> Result<Option<Outcome>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let claimed: Option<(i64, Uuid, String, bool, i32)> = sqlx::query_as(
            "select id, message_id, channel, digest, attempts from notify_messages \
             where state = 'pending' and next_attempt_at <= now() \
             order by next_attempt_at, id limit 1 for update skip locked",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, message_id, channel_name, digest, attempts)) = claimed else {
            return Ok(None);
        };
        let Some(channel) = self.channels.get(&channel_name) else {
            sqlx::query(
                "update notify_messages set next_attempt_at = now() + make_interval(secs => $2), \
                 last_error = 'no channel of this name in this server''s configuration' where id = $1",
            )
            .bind(id)
            .bind(UNKNOWN_CHANNEL_RETRY.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            warn!(channel = %crate::text::escape(&channel_name), message = %message_id,
                  "A queued notification names a channel this server does not have; it waits.");
            return Ok(Some(Outcome::Postponed));
        };
        let events = load_events(&mut tx, id).await?;
        let message = Message { id: message_id, channel: channel_name.clone(), digest, events };
        let attempt = u32::try_from(attempts).unwrap_or(0).saturating_add(1);
        let labels = [("channel", channel_name.clone())];
        let outcome = match self.sender.send(channel, &message).await {
            Ok(()) => {
                sqlx::query(
                    "update notify_messages set state = 'delivered', delivered_at = now(), attempts = $2, \
                     last_error = null where id = $1",
                )
                .bind(id)
                .bind(attempt as i32)
                .execute(&mut *tx)
                .await?;
                metrics::counter!(telemetry::NOTIFY_DELIVERED, &labels).increment(1);
                Outcome::Delivered
            }
            Err(error) => {
                metrics::counter!(telemetry::NOTIFY_ATTEMPT_FAILURES, &labels).increment(1);
                let dead = attempt >= channel.max_attempts;
                let text = error.to_string();
                if dead {
                    warn!(error = %text, channel = %channel.name, message = %message_id, attempts = attempt,
                          "Notification dead-lettered after its last attempt.");
                    metrics::counter!(telemetry::NOTIFY_DEAD_LETTERS, &labels).increment(1);
                } else {
                    debug!(error = %text, channel = %channel.name, message = %message_id, attempts = attempt,
                           "Notification attempt failed; it will be retried.");
                }
                sqlx::query(
                    "update notify_messages set attempts = $2, last_error = $3, \
                     state = case when $4 then 'dead' else 'pending' end, \
                     next_attempt_at = now() + make_interval(secs => $5) where id = $1",
                )
                .bind(id)
                .bind(attempt as i32)
                .bind(truncate(&text, 500))
                .bind(dead)
                .bind(channel.backoff(attempt).as_secs_f64())
                .execute(&mut *tx)
                .await?;
                if dead { Outcome::Dead } else { Outcome::Retry }
            }
        };
        if let Err(error) = tx.commit().await {
            // At-least-once boundary: a delivered message whose record did
            // not commit is sent again.
            warn!(%error, message = %message_id, "Cannot record a notification's delivery; it may be sent again.");
            return Err(error);
        }
        Ok(Some(outcome))
    }
}

/// Sends a test message through `channel` at once (not queued); returns
/// its id.
pub async fn send_test(channel: &ChannelConfig, host: &str) -> Result<Uuid, TestError> {
    let sender = Sender::new()?;
    let message = Message {
        id: Uuid::new_v4(),
        channel: channel.name.clone(),
        digest: false,
        events: vec![EventItem {
            id: Uuid::new_v4(),
            kind: AlertKind::Test.as_str().to_owned(),
            severity: Severity::Info.as_str().to_owned(),
            host: None,
            occurred_at: OffsetDateTime::now_utc(),
            summary: format!("test message from the fleetban server on {host}"),
            details: serde_json::json!({}),
        }],
    };
    sender.send(channel, &message).await?;
    Ok(message.id)
}

/// Why a test message was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The attempt failed.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
}

/// Turns `channel`'s queued events into messages, within its rate limit and
/// digest interval; returns how many messages were made.
async fn compose(pool: &PgPool, channel: &ChannelConfig) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool =
        sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtext('fleetban_notify_compose'), hashtext($1))")
            .bind(&channel.name)
            .fetch_one(&mut *tx)
            .await?;
    if !locked {
        return Ok(0);
    }
    let queued: Vec<(i64, f64)> = sqlx::query_as(
        "select id, extract(epoch from now() - queued_at)::float8 from notify_outbox \
         where channel = $1 and message_id is null order by id limit $2",
    )
    .bind(&channel.name)
    .bind(MAX_EVENTS_PER_MESSAGE)
    .fetch_all(&mut *tx)
    .await?;
    let Some(oldest_age) = queued.iter().map(|q| q.1).reduce(f64::max) else {
        return Ok(0);
    };
    if let Some(interval) = channel.digest_interval()
        && oldest_age < interval.as_secs_f64()
    {
        return Ok(0);
    }
    let sent: i64 = sqlx::query_scalar(
        "select count(*) from notify_messages where channel = $1 and created_at > now() - interval '1 hour'",
    )
    .bind(&channel.name)
    .fetch_one(&mut *tx)
    .await?;
    let budget = i64::from(channel.max_messages_per_hour) - sent;
    if budget <= 0 {
        return Ok(0);
    }
    let ids: Vec<i64> = queued.iter().map(|q| q.0).collect();
    let groups: Vec<(bool, Vec<i64>)> = if channel.digest_interval().is_some() || ids.len() as i64 > budget {
        vec![(ids.len() > 1 || channel.digest_interval().is_some(), ids)]
    } else {
        ids.into_iter().map(|id| (false, vec![id])).collect()
    };
    for (digest, ids) in &groups {
        let message: i64 =
            sqlx::query_scalar("insert into notify_messages (channel, digest) values ($1, $2) returning id")
                .bind(&channel.name)
                .bind(digest)
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query("update notify_outbox set message_id = $1 where id = any($2)")
            .bind(message)
            .bind(ids)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(groups.len())
}

/// The events of message `id`, oldest first; a block's details gain the
/// names of the hosts that saw it (`seen_by`), that enforce it now
/// (`enforced_by`: applied its version) and that do not yet (`pending_on`).
async fn load_events(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<Vec<EventItem>, sqlx::Error> {
    sqlx::query_as::<_, EventItem>(
        "select a.event_id as id, a.kind, a.severity, a.host, a.occurred_at, a.summary, \
           case when a.kind = 'block' then a.details || jsonb_build_object( \
             'enforced_by', coalesce((select jsonb_agg(g.name order by g.name) from agents g \
                where g.revoked_at is null and g.removed_at is null \
                  and b.created_version is not null and g.blocklist_version >= b.created_version), '[]'), \
             'pending_on', coalesce((select jsonb_agg(g.name order by g.name) from agents g \
                where g.revoked_at is null and g.removed_at is null \
                  and (b.created_version is null or g.blocklist_version < b.created_version)), '[]'), \
             'seen_by', case when jsonb_typeof(a.details -> 'evidence' -> 'agents') = 'array' then \
                coalesce((select jsonb_agg(g.name order by g.name) from agents g where g.id::text in \
                  (select jsonb_array_elements_text(a.details -> 'evidence' -> 'agents'))), '[]') \
                else '[]' end) \
           else a.details end as details \
         from notify_outbox o join alert_events a on a.id = o.alert_id \
         left join blocks b on a.kind = 'block' and b.id = (a.details ->> 'block_id')::bigint \
         where o.message_id = $1 order by a.id",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await
}

/// Messages not delivered, fleet-wide, by channel and state (`pending`,
/// `dead`), for every channel in `channels` (zero when none).
pub async fn queue_counts(pool: &PgPool, channels: &Channels) -> Result<Vec<(String, &'static str, i64)>, sqlx::Error> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "select channel, state, count(*) from notify_messages where state <> 'delivered' group by channel, state",
    )
    .fetch_all(pool)
    .await?;
    let mut counts = Vec::new();
    for channel in channels.all() {
        for state in ["pending", "dead"] {
            let n = rows.iter().find(|r| r.0 == channel.name && r.1 == state).map_or(0, |r| r.2);
            counts.push((channel.name.clone(), state, n));
        }
    }
    Ok(counts)
}

/// Deletes delivered and dead messages (with their outbox rows), events
/// still queued (for a channel since removed) and routed events older than
/// `retention`.
pub async fn cleanup(pool: &PgPool, retention: Duration) -> Result<(), sqlx::Error> {
    let secs = retention.as_secs_f64();
    sqlx::query(
        "delete from notify_messages where state <> 'pending' and created_at < now() - make_interval(secs => $1)",
    )
    .bind(secs)
    .execute(pool)
    .await?;
    // Events queued for a channel that no longer exists are never composed.
    sqlx::query("delete from notify_outbox where message_id is null and queued_at < now() - make_interval(secs => $1)")
        .bind(secs)
        .execute(pool)
        .await?;
    sqlx::query(
        "delete from alert_events a where routed and occurred_at < now() - make_interval(secs => $1) \
         and not exists (select 1 from notify_outbox o where o.alert_id = a.id)",
    )
    .bind(secs)
    .execute(pool)
    .await?;
    Ok(())
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}
