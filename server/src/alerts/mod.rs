//! Notifications: events worth telling an operator, queued in Postgres and
//! delivered to `[[notify]]` channels (JSON webhook, Slack/Mattermost
//! webhook, SMTP email).
//!
//! # Flow
//!
//! 1. **Record.** An event is a row of `alert_events`. A new block and a
//!    shadow-mode decision insert theirs from a trigger, in the transaction
//!    that made them (so an event exists exactly when its cause committed);
//!    [`monitor`] records agents offline, propagation lag and slot
//!    exhaustion, which are conditions observed over time. A `dedupe_key`
//!    makes a condition one event however many replicas see it.
//! 2. **Route** ([`dispatch`]): each unrouted event gets one `notify_outbox`
//!    row per channel whose filter accepts it, and is marked routed, in one
//!    transaction (`for update skip locked`).
//! 3. **Compose**: under a per-channel advisory lock, a channel's queued
//!    events become messages: one per event, or all of them in one when the
//!    channel is in digest mode (after the oldest has waited the interval)
//!    or when more are waiting than the rate limit allows this hour.
//! 4. **Deliver**: a dispatcher claims one due message with
//!    `for update skip locked`, sends it and records the outcome (delivered,
//!    retry after an exponential backoff, or dead after `max_attempts`) in the
//!    same transaction. Other replicas skip the locked row, so no two send the
//!    same message at once, and rows survive a restart.
//!
//! # Delivery guarantee
//!
//! Exactly once per message while processes stop cleanly. A process that
//! dies after the receiver accepted a message but before its transaction
//! committed leaves the message pending, and it is sent again: at least once
//! across crashes. Every message carries its id (`X-Fleetban-Message-Id`,
//! the JSON `id`, the email's `Message-ID`), and every event its own id, so
//! a receiver dedupes a resend.
//!
//! # Layout
//!
//! - [`config`]: `[[notify]]` channels and `[alerts]` thresholds.
//! - [`dispatch`]: routing, composing, delivery with retries.
//! - [`deliver`]: rendering a message and sending it by kind.
//! - [`monitor`]: the events the server watches for itself.

pub mod config;
pub mod deliver;
pub mod dispatch;
pub mod monitor;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;

pub use config::{AlertsConfig, ChannelConfig, ChannelKind, SmtpTls};

/// The types of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A fleet block was made: its range, reason, evidence, and the hosts
    /// enforcing it when the message is sent.
    Block,
    /// A host refused everyone because every connection slot was taken.
    SlotExhaustion,
    /// An agent has not been heard from for `agent_offline_secs`.
    AgentOffline,
    /// A connected agent has not applied a block change within
    /// `propagation_lag_secs`.
    PropagationLag,
    /// A rule in shadow mode would have blocked.
    ShadowBlock,
    /// `fleetban notify test`: passes every filter.
    Test,
}

impl AlertKind {
    /// Every kind.
    pub const ALL: [AlertKind; 6] = [
        AlertKind::Block,
        AlertKind::SlotExhaustion,
        AlertKind::AgentOffline,
        AlertKind::PropagationLag,
        AlertKind::ShadowBlock,
        AlertKind::Test,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Block => "block",
            AlertKind::SlotExhaustion => "slot_exhaustion",
            AlertKind::AgentOffline => "agent_offline",
            AlertKind::PropagationLag => "propagation_lag",
            AlertKind::ShadowBlock => "shadow_block",
            AlertKind::Test => "test",
        }
    }

    /// The kind of a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// How urgent an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For the record (a shadow decision).
    #[default]
    Info,
    /// Something acted or degraded (a block, an offline agent, lag).
    Warning,
    /// Mail is being refused (slot exhaustion).
    Critical,
}

impl Severity {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    /// The severity of a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [Severity::Info, Severity::Warning, Severity::Critical].into_iter().find(|s| s.as_str() == name)
    }
}

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Its type.
    pub kind: AlertKind,
    /// Its severity.
    pub severity: Severity,
    /// The agent it concerns, if it concerns one host.
    pub host: Option<String>,
    /// One condition, one event: a second record with the same key is
    /// ignored. `None` records every time.
    pub dedupe_key: Option<String>,
    /// One line for people.
    pub summary: String,
    /// Machine-readable details (the webhook's `details`).
    pub details: serde_json::Value,
}

/// Records `alert` (ignored if its `dedupe_key` was recorded before);
/// returns whether it was new. Run it in the transaction of the change that
/// caused it, where there is one.
pub async fn record<'e>(executor: impl PgExecutor<'e>, alert: &Alert) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "insert into alert_events (kind, severity, host, dedupe_key, summary, details) \
         values ($1, $2, $3, $4, $5, $6) on conflict (dedupe_key) do nothing",
    )
    .bind(alert.kind.as_str())
    .bind(alert.severity.as_str())
    .bind(alert.host.as_deref())
    .bind(alert.dedupe_key.as_deref())
    .bind(&alert.summary)
    .bind(&alert.details)
    .execute(executor)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// The configured channels, shared by the dispatcher and the API.
#[derive(Debug, Clone, Default)]
pub struct Channels(Arc<Vec<ChannelConfig>>);

impl Channels {
    /// Wraps validated channels.
    pub fn new(channels: Vec<ChannelConfig>) -> Self {
        Channels(Arc::new(channels))
    }

    /// Every channel.
    pub fn all(&self) -> &[ChannelConfig] {
        &self.0
    }

    /// The channel named `name`.
    pub fn get(&self, name: &str) -> Option<&ChannelConfig> {
        self.0.iter().find(|c| c.name == name)
    }
}
