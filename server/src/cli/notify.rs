//! `fleetban notify` (the notification channels with their queues) and
//! `fleetban notify test NAME` (a test message through one channel, sent by
//! the server at once; needs an admin token).

use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use super::{CliError, Client, cell, items, pretty, table, when};

/// `fleetban notify ...`.
#[derive(Debug, Subcommand)]
pub enum NotifyCommand {
    /// Send a test message through a channel now and report whether the
    /// receiver accepted it.
    Test {
        /// The channel's name (`[[notify]] name`).
        name: String,
    },
}

/// Runs `fleetban notify [test NAME]`.
pub(super) async fn run(client: &Client, json: bool, command: Option<&NotifyCommand>) -> Result<String, CliError> {
    match command {
        None => {
            let channels = client.get("/api/v1/notify", &[]).await?;
            if json {
                return Ok(pretty(&channels));
            }
            if items(&channels).is_empty() {
                return Ok("no notification channels ([[notify]] in server.toml)\n".to_owned());
            }
            let rows: Vec<Vec<String>> = items(&channels)
                .iter()
                .map(|c| {
                    let mode = match c["digest_interval_secs"].as_u64() {
                        Some(secs) => format!("digest {secs}s"),
                        None => "each".to_owned(),
                    };
                    vec![
                        cell(&c["name"]),
                        cell(&c["kind"]),
                        if items(&c["events"]).is_empty() { "all".to_owned() } else { cell(&c["events"]) },
                        mode,
                        cell(&c["queued_events"]),
                        cell(&c["pending_messages"]),
                        cell(&c["dead_messages"]),
                        cell(&c["delivered_24h"]),
                        when(&c["last_delivered_at"]),
                        cell(&c["last_error"]),
                    ]
                })
                .collect();
            Ok(table(
                &["NAME", "KIND", "EVENTS", "MODE", "QUEUED", "PENDING", "DEAD", "SENT 24H", "LAST SENT", "LAST ERROR"],
                &rows,
            ))
        }
        Some(NotifyCommand::Test { name }) => {
            let path = format!("/api/v1/notify/{}/test", encode(name));
            let result = client.json(Method::POST, &path, &[], None).await?;
            if result["delivered"] != Value::Bool(true) {
                return Err(CliError::Api {
                    status: 502,
                    message: format!(
                        "test message through {} not delivered: {}",
                        crate::text::escape(name),
                        crate::text::escape(result["error"].as_str().unwrap_or("unknown error"))
                    ),
                });
            }
            if json {
                return Ok(pretty(&result));
            }
            Ok(format!(
                "test message {} delivered through {}\n",
                cell(&result["message_id"]),
                crate::text::escape(name)
            ))
        }
    }
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}
