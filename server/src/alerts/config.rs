//! `[[notify]]` channels and `[alerts]` thresholds of `server.toml`.
//!
//! A channel is a destination (a JSON webhook, a Slack/Mattermost webhook or
//! SMTP email) with a filter (which event types, a minimum severity, which
//! hosts), a rate limit and an optional digest interval. Every key is checked
//! at start; a key of another kind (`smtp_host` on a webhook) is an error, so
//! a typo never silently drops a setting.

use std::time::Duration;

use serde::Deserialize;

use super::{AlertKind, Severity};

/// Why a `[[notify]]` or `[alerts]` value cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The offending key, with the channel's name.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

/// What a channel delivers through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// A JSON `POST` signed with HMAC-SHA256.
    Webhook,
    /// A Slack- or Mattermost-compatible incoming webhook (`{"text": ...}`).
    Slack,
    /// Email over SMTP.
    Email,
}

impl ChannelKind {
    /// The name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Webhook => "webhook",
            ChannelKind::Slack => "slack",
            ChannelKind::Email => "email",
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with `STARTTLS` (required), port 587.
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS), port 465.
    Tls,
    /// No encryption (a local relay only), port 25.
    None,
}

/// One `[[notify]]` channel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Name, unique among channels (`fleetban notify test NAME`). Required.
    pub name: String,
    /// `webhook`, `slack` or `email`. Required.
    pub kind: ChannelKind,
    /// Event types delivered: `block`, `slot_exhaustion`, `agent_offline`,
    /// `propagation_lag`, `shadow_block`. Default: all.
    #[serde(default)]
    pub events: Vec<AlertKind>,
    /// Least severity delivered: `info`, `warning` or `critical`. Default
    /// `info` (everything).
    #[serde(default)]
    pub min_severity: Severity,
    /// Agent names whose host events (slot exhaustion, offline, lag, an
    /// agent's shadow decision) are delivered; fleet-wide events (blocks)
    /// always pass. Default: all hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Most messages sent per rolling hour. Events beyond it wait and go
    /// out together as one summary message once the hour allows one more.
    /// Default 60.
    #[serde(default = "default_max_messages_per_hour")]
    pub max_messages_per_hour: u32,
    /// Digest mode: when set, events wait until the oldest has waited this
    /// long, then all of them go out as one message, seconds. Default: none
    /// (each event as it comes, within the rate limit).
    #[serde(default)]
    pub digest_interval_secs: Option<u64>,
    /// Attempts before a message is dead-lettered. Default 8.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry, milliseconds; doubles with each failed
    /// attempt up to `retry_max_secs`. Default 5000.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest wait between attempts, seconds. Default 3600.
    #[serde(default = "default_retry_max_secs")]
    pub retry_max_secs: u64,
    /// Longest one delivery attempt may take, seconds. Default 10.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// `webhook`, `slack`: the URL posted to (`http://` or `https://`).
    #[serde(default)]
    pub url: Option<String>,
    /// `webhook`: key of the HMAC-SHA256 signature
    /// (`X-Fleetban-Signature: sha256=<hex>` over `<timestamp>.<body>`).
    /// Required for webhooks.
    #[serde(default)]
    pub secret: Option<String>,
    /// `email`: SMTP server host name.
    #[serde(default)]
    pub smtp_host: Option<String>,
    /// `email`: SMTP port. Default by `smtp_tls`: 587, 465 or 25.
    #[serde(default)]
    pub smtp_port: Option<u16>,
    /// `email`: `starttls` (default), `tls` or `none`.
    #[serde(default)]
    pub smtp_tls: Option<SmtpTls>,
    /// `email`: PEM file of CA certificates trusted for the SMTP server's
    /// certificate besides the public roots (a private relay). Default: none.
    #[serde(default)]
    pub smtp_ca_file: Option<std::path::PathBuf>,
    /// `email`: user name for SMTP AUTH. Default: no authentication.
    #[serde(default)]
    pub smtp_username: Option<String>,
    /// `email`: password for SMTP AUTH (with `smtp_username`).
    #[serde(default)]
    pub smtp_password: Option<String>,
    /// `email`: the `From:` mailbox (`fleetban <fleetban@example.net>`).
    #[serde(default)]
    pub from: Option<String>,
    /// `email`: recipients' mailboxes. At least one.
    #[serde(default)]
    pub to: Vec<String>,
}

fn default_max_messages_per_hour() -> u32 {
    60
}
fn default_max_attempts() -> u32 {
    8
}
fn default_retry_initial_ms() -> u64 {
    5000
}
fn default_retry_max_secs() -> u64 {
    3600
}
fn default_timeout_secs() -> u64 {
    10
}

impl ChannelConfig {
    /// A channel of `kind` named `name` with every default; tests and the
    /// config's validation fill in the rest.
    pub fn new(name: &str, kind: ChannelKind) -> Self {
        ChannelConfig {
            name: name.to_owned(),
            kind,
            events: Vec::new(),
            min_severity: Severity::Info,
            hosts: Vec::new(),
            max_messages_per_hour: default_max_messages_per_hour(),
            digest_interval_secs: None,
            max_attempts: default_max_attempts(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_secs: default_retry_max_secs(),
            timeout_secs: default_timeout_secs(),
            url: None,
            secret: None,
            smtp_host: None,
            smtp_port: None,
            smtp_tls: None,
            smtp_ca_file: None,
            smtp_username: None,
            smtp_password: None,
            from: None,
            to: Vec::new(),
        }
    }

    /// Whether an event of `kind` and `severity` about `host` (none for a
    /// fleet-wide event) goes to this channel.
    pub fn accepts(&self, kind: AlertKind, severity: Severity, host: Option<&str>) -> bool {
        if kind == AlertKind::Test {
            return true;
        }
        if !self.events.is_empty() && !self.events.contains(&kind) {
            return false;
        }
        if severity < self.min_severity {
            return false;
        }
        match host {
            Some(host) if !self.hosts.is_empty() => self.hosts.iter().any(|h| h == host),
            _ => true,
        }
    }

    /// The wait after `failed` failed attempts (1 = after the first).
    pub fn backoff(&self, failed: u32) -> Duration {
        let initial = Duration::from_millis(self.retry_initial_ms);
        let factor = 1u32.checked_shl(failed.saturating_sub(1).min(31)).unwrap_or(u32::MAX);
        initial.saturating_mul(factor).min(Duration::from_secs(self.retry_max_secs))
    }

    /// The digest interval, if the channel is in digest mode.
    pub fn digest_interval(&self) -> Option<Duration> {
        self.digest_interval_secs.map(Duration::from_secs)
    }

    /// The SMTP port: `smtp_port` or the `smtp_tls` mode's usual one.
    pub fn smtp_port(&self) -> u16 {
        self.smtp_port.unwrap_or(match self.smtp_tls.unwrap_or_default() {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        })
    }

    /// Checks that the channel can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, problem: &str| {
            Err(ConfigError { key: format!("notify[{}].{key}", self.name), problem: problem.to_owned() })
        };
        if self.name.trim().is_empty() || self.name.len() > 64 || self.name.chars().any(|c| c.is_control()) {
            return Err(ConfigError {
                key: "notify.name".into(),
                problem: format!("{:?}: must be 1 to 64 characters without control characters", self.name),
            });
        }
        if self.max_messages_per_hour == 0 {
            return err("max_messages_per_hour", "must be at least 1");
        }
        if self.digest_interval_secs.is_some_and(|s| s == 0 || s > 7 * 86_400) {
            return err("digest_interval_secs", "must be 1 to 604800");
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return err("max_attempts", "must be 1 to 100");
        }
        if self.retry_max_secs == 0 || self.retry_max_secs > 86_400 {
            return err("retry_max_secs", "must be 1 to 86400");
        }
        if self.retry_initial_ms > self.retry_max_secs * 1000 {
            return err("retry_initial_ms", "must not exceed retry_max_secs");
        }
        if self.timeout_secs == 0 || self.timeout_secs > 300 {
            return err("timeout_secs", "must be 1 to 300");
        }
        let http = matches!(self.kind, ChannelKind::Webhook | ChannelKind::Slack);
        let email_keys = [
            ("smtp_host", self.smtp_host.is_some()),
            ("smtp_port", self.smtp_port.is_some()),
            ("smtp_tls", self.smtp_tls.is_some()),
            ("smtp_ca_file", self.smtp_ca_file.is_some()),
            ("smtp_username", self.smtp_username.is_some()),
            ("smtp_password", self.smtp_password.is_some()),
            ("from", self.from.is_some()),
            ("to", !self.to.is_empty()),
        ];
        if http {
            if let Some((key, _)) = email_keys.iter().find(|(_, set)| *set) {
                return err(key, &format!("is for kind = \"email\", not {:?}", self.kind.as_str()));
            }
            let Some(url) = &self.url else { return err("url", "is required") };
            match reqwest::Url::parse(url) {
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some() => {}
                _ => return err("url", "must be an http:// or https:// URL"),
            }
        }
        match self.kind {
            ChannelKind::Webhook => {
                if self.secret.as_deref().is_none_or(|s| s.len() < 16) {
                    return err("secret", "is required, at least 16 characters (the HMAC key)");
                }
            }
            ChannelKind::Slack => {
                if self.secret.is_some() {
                    return err("secret", "is for kind = \"webhook\"; Slack webhooks carry their secret in the URL");
                }
            }
            ChannelKind::Email => {
                if self.url.is_some() || self.secret.is_some() {
                    return err("url", "url and secret are for webhooks, not kind = \"email\"");
                }
                if self.smtp_host.as_deref().is_none_or(|h| h.trim().is_empty()) {
                    return err("smtp_host", "is required");
                }
                if let Some(path) = &self.smtp_ca_file {
                    if self.smtp_tls == Some(SmtpTls::None) {
                        return err("smtp_ca_file", "needs smtp_tls = \"starttls\" or \"tls\"");
                    }
                    let pem = std::fs::read(path).map_err(|e| ConfigError {
                        key: format!("notify[{}].smtp_ca_file", self.name),
                        problem: format!("cannot read {}: {e}", path.display()),
                    })?;
                    if lettre::transport::smtp::client::Certificate::from_pem(&pem).is_err() {
                        return err("smtp_ca_file", "is not a PEM certificate");
                    }
                }
                if self.smtp_username.is_some() != self.smtp_password.is_some() {
                    return err("smtp_username", "smtp_username and smtp_password go together");
                }
                let Some(from) = &self.from else { return err("from", "is required") };
                if from.parse::<lettre::message::Mailbox>().is_err() {
                    return err("from", "is not a mailbox (name@example.net or \"Name <name@example.net>\")");
                }
                if self.to.is_empty() {
                    return err("to", "needs at least one recipient");
                }
                if let Some(bad) = self.to.iter().find(|to| to.parse::<lettre::message::Mailbox>().is_err()) {
                    return err("to", &format!("{bad:?} is not a mailbox"));
                }
            }
        }
        Ok(())
    }
}

/// `[alerts]`: when the server raises the events it watches for itself, and
/// how often the dispatcher looks for work.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// An agent not heard from for this long raises `agent_offline`, once
    /// per outage, seconds. Default 300.
    pub agent_offline_secs: u64,
    /// A connected agent that has not applied a block change this old
    /// raises `propagation_lag`, seconds. Default 30. Agents report what
    /// they applied 0.3–0.7 s after applying it, and reports are stored
    /// every 0.5 s: keep this above 2.
    pub propagation_lag_secs: u64,
    /// A host whose log shows `refused: too many connections` within this
    /// window raises `slot_exhaustion` (at most once per host and hour),
    /// seconds. Default 120.
    pub slot_window_secs: u64,
    /// How often the server checks for offline agents, lag and slot
    /// exhaustion, seconds. Default 15.
    pub check_interval_secs: u64,
    /// How often each replica's dispatcher looks for messages to compose
    /// and deliver, milliseconds. Default 1000.
    pub dispatch_interval_ms: u64,
    /// Delivered and dead messages and their events are deleted after this
    /// many days. Default 30.
    pub retention_days: u32,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            agent_offline_secs: 300,
            propagation_lag_secs: 30,
            slot_window_secs: 120,
            check_interval_secs: 15,
            dispatch_interval_ms: 1000,
            retention_days: 30,
        }
    }
}

impl AlertsConfig {
    /// Checks that every value can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            ("alerts.agent_offline_secs", self.agent_offline_secs, 10, 30 * 86_400),
            ("alerts.propagation_lag_secs", self.propagation_lag_secs, 1, 86_400),
            ("alerts.slot_window_secs", self.slot_window_secs, 10, 86_400),
            ("alerts.check_interval_secs", self.check_interval_secs, 1, 3600),
            ("alerts.dispatch_interval_ms", self.dispatch_interval_ms, 10, 60_000),
            ("alerts.retention_days", u64::from(self.retention_days), 1, 3650),
        ];
        for (key, value, min, max) in checks {
            if !(min..=max).contains(&value) {
                return Err(ConfigError { key: key.into(), problem: format!("must be {min} to {max}") });
            }
        }
        Ok(())
    }
}

/// Checks every channel and that names are unique.
pub fn validate_channels(channels: &[ChannelConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for channel in channels {
        channel.validate()?;
        if !seen.insert(channel.name.as_str()) {
            return Err(ConfigError {
                key: "notify.name".into(),
                problem: format!("{:?} is used twice", channel.name),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ChannelConfig>, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            notify: Vec<ChannelConfig>,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        validate_channels(&file.notify).map_err(|e| e.to_string())?;
        Ok(file.notify)
    }

    #[test]
    fn each_kind_parses_with_its_keys() {
        let channels = parse(
            r#"
[[notify]]
name = "hook"
kind = "webhook"
url = "https://hooks.example.net/fleetban"
secret = "0123456789abcdef0123"
events = ["block", "slot_exhaustion"]
min_severity = "warning"
hosts = ["mx1"]
max_messages_per_hour = 10
digest_interval_secs = 300

[[notify]]
name = "chat"
kind = "slack"
url = "https://chat.example.net/hooks/abc"

[[notify]]
name = "mail"
kind = "email"
smtp_host = "smtp.example.net"
smtp_tls = "tls"
smtp_username = "fleetban"
smtp_password = "pw"
from = "fleetban <fleetban@example.net>"
to = ["ops@example.net"]
"#,
        )
        .unwrap();
        assert_eq!(channels.len(), 3);
        assert_eq!(channels[0].events, vec![AlertKind::Block, AlertKind::SlotExhaustion]);
        assert_eq!(channels[0].digest_interval(), Some(Duration::from_secs(300)));
        assert_eq!(channels[2].smtp_port(), 465);
        assert!(channels[0].accepts(AlertKind::Block, Severity::Warning, None));
        assert!(!channels[0].accepts(AlertKind::Block, Severity::Info, None));
        assert!(!channels[0].accepts(AlertKind::AgentOffline, Severity::Critical, Some("mx1")));
        assert!(channels[0].accepts(AlertKind::SlotExhaustion, Severity::Critical, Some("mx1")));
        assert!(!channels[0].accepts(AlertKind::SlotExhaustion, Severity::Critical, Some("mx2")));
        assert!(channels[1].accepts(AlertKind::ShadowBlock, Severity::Info, Some("mx9")));
    }

    #[test]
    fn bad_channels_name_the_key() {
        let cases = [
            ("name = \"a\"\nkind = \"webhook\"\nurl = \"https://x.example\"\n", "notify[a].secret"),
            ("name = \"a\"\nkind = \"webhook\"\nurl = \"ftp://x.example\"\nsecret = \"0123456789abcdef\"\n", "url"),
            ("name = \"a\"\nkind = \"slack\"\nurl = \"https://x.example\"\nsmtp_host = \"h\"\n", "smtp_host"),
            ("name = \"a\"\nkind = \"email\"\nsmtp_host = \"h\"\nfrom = \"f@example.net\"\n", "notify[a].to"),
            ("name = \"a\"\nkind = \"email\"\nsmtp_host = \"h\"\nfrom = \"nope\"\nto = [\"t@example.net\"]\n", "from"),
            (
                "name = \"a\"\nkind = \"slack\"\nurl = \"https://x.example\"\nmax_messages_per_hour = 0\n",
                "max_messages",
            ),
            ("name = \"a\"\nkind = \"slack\"\nurl = \"https://x.example\"\nevents = [\"bogus\"]\n", "bogus"),
            ("name = \"a\"\nkind = \"slack\"\nurl = \"https://x.example\"\nurll = \"x\"\n", "urll"),
            ("name = \"a\"\nkind = \"sms\"\n", "sms"),
        ];
        for (body, key) in cases {
            let error = parse(&format!("[[notify]]\n{body}")).unwrap_err();
            assert!(error.contains(key), "{body}: {error}");
        }
        let twice = "[[notify]]\nname = \"a\"\nkind = \"slack\"\nurl = \"https://x.example\"\n";
        let error = parse(&format!("{twice}{twice}")).unwrap_err();
        assert!(error.contains("used twice"), "{error}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut c = ChannelConfig::new("a", ChannelKind::Slack);
        c.retry_initial_ms = 1000;
        c.retry_max_secs = 10;
        let waits: Vec<u64> = (1..=6).map(|n| c.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(c.backoff(1000), Duration::from_secs(10));
    }
}
