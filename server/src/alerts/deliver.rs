//! Rendering a message and sending it through a channel.
//!
//! - `webhook`: `POST` of the JSON [`webhook_body`] with
//!   `X-Fleetban-Timestamp: <unix seconds>` and
//!   `X-Fleetban-Signature: sha256=<hex>`, the HMAC-SHA256 under the
//!   channel's `secret` of `<timestamp>.<body>` (the timestamp is signed so a
//!   captured request cannot be replayed later with a fresh one), plus
//!   `X-Fleetban-Message-Id` and `Idempotency-Key` (the message id).
//! - `slack`: `POST {"text": ...}`, which Slack and Mattermost incoming
//!   webhooks accept; `&`, `<` and `>` are escaped, so event text cannot
//!   mention or link.
//! - `email`: a plain-text mail over SMTP (`lettre`, rustls), STARTTLS, TLS or
//!   plain, with AUTH when a user name is set; the server's certificate is
//!   checked against the public roots and `smtp_ca_file`; its `Message-ID`
//!   is the message id.
//!
//! Any 2xx answer is delivered; anything else, a timeout or a transport
//! error is a failed attempt.

use std::fmt::Write as _;
use std::time::Duration;

use hmac::{Hmac, Mac};
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;
use uuid::Uuid;

use super::config::{ChannelConfig, ChannelKind, SmtpTls};

/// Most events listed one by one in a message's text; the rest are counted.
pub const MAX_LISTED: usize = 50;

/// Why an attempt failed (the message is retried or dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver answered with a non-2xx status.
    #[error("HTTP {0}")]
    Status(u16),
    /// The request could not be sent or timed out.
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The SMTP exchange failed.
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    /// The mail could not be built (a bad address).
    #[error("mail: {0}")]
    Mail(String),
    /// The channel lacks a value validation requires.
    #[error("channel {0} is missing {1}")]
    Config(String, &'static str),
    /// The attempt took longer than the channel's `timeout_secs`.
    #[error("timed out")]
    Timeout,
}

/// One event in a message.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct EventItem {
    /// The event's id (stable across resends).
    pub id: Uuid,
    /// Its type (`block`, `slot_exhaustion`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// The agent it concerns, if one.
    pub host: Option<String>,
    /// When it was recorded.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// One line for people.
    pub summary: String,
    /// Type-specific details.
    pub details: Value,
}

/// A message: one event, or a digest of several.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The message id: the idempotency key receivers dedupe on.
    pub id: Uuid,
    /// The channel's name.
    pub channel: String,
    /// Whether several events were summarised (digest mode or rate limit).
    pub digest: bool,
    /// The events, oldest first.
    pub events: Vec<EventItem>,
}

impl Message {
    /// The subject line (email subject, first line of the text).
    pub fn subject(&self) -> String {
        match self.events.as_slice() {
            [one] if !self.digest => format!("[fleetban] {}: {}", one.severity, crate::text::escape(&one.summary)),
            events => {
                let mut counts = std::collections::BTreeMap::<&str, usize>::new();
                for e in events {
                    *counts.entry(e.kind.as_str()).or_default() += 1;
                }
                let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
                format!("[fleetban] {} events: {}", events.len(), parts.join(", "))
            }
        }
    }

    /// The text of the message (Slack text, email body).
    pub fn text(&self) -> String {
        let mut out = self.subject();
        out.push('\n');
        for event in self.events.iter().take(MAX_LISTED) {
            let when = event.occurred_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            let host = event.host.as_deref().map(|h| format!(" {}", crate::text::escape(h))).unwrap_or_default();
            let _ = write!(
                out,
                "\n- {when} [{}] {}{host}: {}",
                event.severity,
                event.kind,
                crate::text::escape(&event.summary)
            );
            for line in detail_lines(event) {
                let _ = write!(out, "\n    {line}");
            }
        }
        if self.events.len() > MAX_LISTED {
            let _ = write!(out, "\n- ... and {} more", self.events.len() - MAX_LISTED);
        }
        let _ = write!(out, "\n\nmessage {} · channel {}", self.id, crate::text::escape(&self.channel));
        out
    }
}

/// The extra lines of an event's text: a block's evidence and enforcement,
/// a slot exhaustion's holders.
fn detail_lines(event: &EventItem) -> Vec<String> {
    let d = &event.details;
    let mut lines = Vec::new();
    let esc =
        |v: &Value| crate::text::escape(&v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())).into_owned();
    let list = |v: &Value| v.as_array().map(|a| a.iter().map(esc).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    match event.kind.as_str() {
        "block" => {
            let ev = &d["evidence"];
            let mut evidence = Vec::new();
            if let Some(verdict) = ev["verdict"].as_str().filter(|v| !v.is_empty()) {
                evidence.push(esc(&Value::String(verdict.to_owned())));
            }
            if let Some(n) = ev["events"].as_i64() {
                evidence.push(format!("{n} events"));
            }
            if d["seen_by"].as_array().is_some_and(|a| !a.is_empty()) {
                evidence.push(format!("seen by {}", list(&d["seen_by"])));
            }
            if !evidence.is_empty() {
                lines.push(format!("evidence: {}", evidence.join("; ")));
            }
            if let Some(enforced) = d["enforced_by"].as_array() {
                let pending = d["pending_on"].as_array().map_or(0, Vec::len);
                lines.push(format!(
                    "enforced by {} of {} hosts: {}",
                    enforced.len(),
                    enforced.len() + pending,
                    if enforced.is_empty() { "none yet".to_owned() } else { list(&d["enforced_by"]) }
                ));
            }
            if !d["expires_at"].is_null() {
                lines.push(format!("expires {}", esc(&d["expires_at"])));
            }
        }
        "slot_exhaustion" => {
            if let Some(slots) = d["slots"].as_i64() {
                lines.push(format!("slots: {slots}"));
            }
            if let Some(holders) = d["holders"].as_array().filter(|h| !h.is_empty()) {
                let shown: Vec<String> = holders
                    .iter()
                    .map(|h| format!("{} ({})", esc(&h["address"]), h["connections"].as_i64().unwrap_or(0)))
                    .collect();
                lines.push(format!("holders (connections opened in the window): {}", shown.join(", ")));
            }
        }
        _ => {}
    }
    lines
}

/// The JSON body of a webhook.
pub fn webhook_body(message: &Message, sent_at: OffsetDateTime) -> Vec<u8> {
    let body = json!({
        "id": message.id,
        "channel": message.channel,
        "sent_at": sent_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "digest": message.digest,
        "summary": message.subject(),
        "events": message.events,
    });
    // Serialising a `Value` cannot fail.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `sha256=<hex>`: HMAC-SHA256 under `secret` of `<timestamp>.<body>`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts a key of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends messages; one per dispatcher (it holds the HTTP connection pool).
#[derive(Debug, Clone)]
pub struct Sender {
    http: reqwest::Client,
}

impl Sender {
    /// A sender with its own HTTP client.
    pub fn new() -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("fleetban/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Sender { http })
    }

    /// One attempt to deliver `message` through `channel`.
    pub async fn send(&self, channel: &ChannelConfig, message: &Message) -> Result<(), DeliveryError> {
        let timeout = Duration::from_secs(channel.timeout_secs);
        match tokio::time::timeout(timeout, self.attempt(channel, message, timeout)).await {
            Ok(result) => result,
            Err(_) => Err(DeliveryError::Timeout),
        }
    }

    async fn attempt(
        &self,
        channel: &ChannelConfig,
        message: &Message,
        timeout: Duration,
    ) -> Result<(), DeliveryError> {
        let missing = |what| DeliveryError::Config(channel.name.clone(), what);
        match channel.kind {
            ChannelKind::Webhook => {
                let url = channel.url.as_deref().ok_or_else(|| missing("url"))?;
                let secret = channel.secret.as_deref().ok_or_else(|| missing("secret"))?;
                let now = OffsetDateTime::now_utc();
                let body = webhook_body(message, now);
                let timestamp = now.unix_timestamp();
                let response = self
                    .http
                    .post(url)
                    .timeout(timeout)
                    .header("content-type", "application/json")
                    .header("x-fleetban-timestamp", timestamp.to_string())
                    .header("x-fleetban-signature", signature(secret, timestamp, &body))
                    .header("x-fleetban-message-id", message.id.to_string())
                    .header("idempotency-key", message.id.to_string())
                    .body(body)
                    .send()
                    .await?;
                status(response.status())
            }
            ChannelKind::Slack => {
                let url = channel.url.as_deref().ok_or_else(|| missing("url"))?;
                let response = self
                    .http
                    .post(url)
                    .timeout(timeout)
                    .json(&json!({ "text": slack_escape(&message.text()) }))
                    .send()
                    .await?;
                status(response.status())
            }
            ChannelKind::Email => send_mail(channel, message, timeout).await,
        }
    }
}

/// Escapes `&`, `<` and `>` as Slack asks, so no text in an event can
/// become a mention (`<!channel>`) or a link.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn status(status: reqwest::StatusCode) -> Result<(), DeliveryError> {
    if status.is_success() { Ok(()) } else { Err(DeliveryError::Status(status.as_u16())) }
}

async fn send_mail(channel: &ChannelConfig, message: &Message, timeout: Duration) -> Result<(), DeliveryError> {
    let host = channel.smtp_host.as_deref().ok_or_else(|| DeliveryError::Config(channel.name.clone(), "smtp_host"))?;
    let mode = channel.smtp_tls.unwrap_or_default();
    let tls = if mode == SmtpTls::None {
        Tls::None
    } else {
        let mut parameters = TlsParameters::builder(host.to_owned());
        if let Some(path) = &channel.smtp_ca_file {
            let pem = std::fs::read(path).map_err(|e| DeliveryError::Mail(format!("{}: {e}", path.display())))?;
            parameters = parameters.add_root_certificate(Certificate::from_pem(&pem)?);
        }
        let parameters = parameters.build_rustls()?;
        if mode == SmtpTls::Tls { Tls::Wrapper(parameters) } else { Tls::Required(parameters) }
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .tls(tls)
        .port(channel.smtp_port())
        .timeout(Some(timeout));
    if let (Some(user), Some(password)) = (&channel.smtp_username, &channel.smtp_password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
    }
    let transport = builder.build();
    let mailbox = |text: &str| text.parse::<Mailbox>().map_err(|e| DeliveryError::Mail(format!("{text:?}: {e}")));
    let from = channel.from.as_deref().ok_or_else(|| DeliveryError::Config(channel.name.clone(), "from"))?;
    let mut mail = lettre::Message::builder()
        .from(mailbox(from)?)
        .subject(message.subject())
        .message_id(Some(format!("<{}@fleetban>", message.id)))
        .header(ContentType::TEXT_PLAIN);
    for to in &channel.to {
        mail = mail.to(mailbox(to)?);
    }
    let mail = mail.body(message.text()).map_err(|e| DeliveryError::Mail(e.to_string()))?;
    transport.send(mail).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, summary: &str, details: Value) -> EventItem {
        EventItem {
            id: Uuid::nil(),
            kind: kind.into(),
            severity: "warning".into(),
            host: None,
            occurred_at: OffsetDateTime::UNIX_EPOCH,
            summary: summary.into(),
            details,
        }
    }

    #[test]
    fn a_digest_lists_its_events_and_counts_the_rest() {
        let events: Vec<EventItem> =
            (0..MAX_LISTED + 3).map(|i| event("block", &format!("198.51.100.{i}/32 blocked"), json!({}))).collect();
        let message = Message { id: Uuid::nil(), channel: "c".into(), digest: true, events };
        assert!(message.subject().contains(&format!("{} events: block ×{}", MAX_LISTED + 3, MAX_LISTED + 3)));
        let text = message.text();
        assert!(text.contains("198.51.100.0/32 blocked") && text.contains("198.51.100.49/32 blocked"));
        assert!(!text.contains("198.51.100.50/32"), "{text}");
        assert!(text.contains("and 3 more"), "{text}");
    }

    #[test]
    fn a_block_shows_evidence_and_enforcement() {
        let e = event(
            "block",
            "203.0.113.0/24 blocked fleet-wide (auto): campaign",
            json!({"evidence": {"verdict": "auth: 16 weighted events", "events": 16},
                   "seen_by": ["mx1", "mx2"], "enforced_by": ["mx1"], "pending_on": ["mx2", "mx3"]}),
        );
        let text = Message { id: Uuid::nil(), channel: "c".into(), digest: false, events: vec![e] }.text();
        assert!(text.contains("evidence: auth: 16 weighted events; 16 events; seen by mx1, mx2"), "{text}");
        assert!(text.contains("enforced by 1 of 3 hosts: mx1"), "{text}");
    }

    #[test]
    fn slack_text_cannot_mention_or_link() {
        assert_eq!(slack_escape("<!channel> a & b <http://x|y>"), "&lt;!channel&gt; a &amp; b &lt;http://x|y&gt;");
    }

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let a = signature("k", 1, b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
        assert_ne!(a, signature("k", 2, b"{}"));
        assert_ne!(a, signature("k", 1, b"{ }"));
        assert_ne!(a, signature("j", 1, b"{}"));
    }
}
