//! `fleetban notify` (the notification channels with their queues) and
//! `fleetban notify test NAME` (a test message through one channel, sent by
//! the server at once; needs an admin token), through `GET /api/v1/notify`
//! and `POST /api/v1/notify/{name}/test`.

use clap::Subcommand;
use fleetban_server::api::notify::{ChannelStatus, TestResult};
use fleetban_server::table::table;
use fleetban_server::text::escape;
use reqwest::Method;

use super::feeds::urlencode;
use super::{CliError, Client, when_opt};

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

fn channels_table(channels: &[ChannelStatus]) -> String {
    let rows: Vec<Vec<String>> = channels
        .iter()
        .map(|c| {
            let mode = match c.digest_interval_secs {
                Some(secs) => format!("digest {secs}s"),
                None => "each".to_owned(),
            };
            vec![
                c.name.clone(),
                c.kind.clone(),
                if c.events.is_empty() { "all".to_owned() } else { c.events.join(",") },
                mode,
                c.queued_events.to_string(),
                c.pending_messages.to_string(),
                c.dead_messages.to_string(),
                c.delivered_24h.to_string(),
                when_opt(c.last_delivered_at),
                c.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    table(
        &["NAME", "KIND", "EVENTS", "MODE", "QUEUED", "PENDING", "DEAD", "SENT 24H", "LAST SENT", "LAST ERROR"],
        &rows,
    )
}

/// Runs `fleetban notify [test NAME]`.
pub(super) async fn run(client: &Client, json: bool, command: Option<&NotifyCommand>) -> Result<String, CliError> {
    match command {
        None => {
            let (raw, channels) = client.get_as::<Vec<ChannelStatus>>("/api/v1/notify", &[]).await?;
            if json {
                return Ok(raw);
            }
            if channels.is_empty() {
                return Ok("no notification channels ([[notify]] in server.toml)\n".to_owned());
            }
            Ok(channels_table(&channels))
        }
        Some(NotifyCommand::Test { name }) => {
            let path = format!("/api/v1/notify/{}/test", urlencode(name));
            let (raw, result) = client.call::<TestResult>(Method::POST, &path, &[], super::NO_BODY).await?;
            if !result.delivered {
                return Err(CliError::Api {
                    status: 502,
                    message: format!(
                        "test message through {} not delivered: {}",
                        escape(name),
                        escape(result.error.as_deref().unwrap_or("unknown error"))
                    ),
                });
            }
            if json {
                return Ok(raw);
            }
            Ok(format!(
                "test message {} delivered through {}\n",
                escape(result.message_id.as_deref().unwrap_or("-")),
                escape(name)
            ))
        }
    }
}
