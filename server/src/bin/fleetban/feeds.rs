//! `feeds` and `feed refresh NAME`: the blocklist feeds and ASN block rules
//! of [`fleetban_server::feeds`] through `GET /api/v1/feeds` and
//! `POST /api/v1/feeds/{name}/refresh`.

use clap::Subcommand;
use fleetban_server::text::escape;
use reqwest::Method;
use serde_json::Value;

use super::{CliError, Client, cell, items, pretty, table, when};

/// `fleetban feed ...`.
#[derive(Debug, Subcommand)]
pub enum FeedCommand {
    /// Fetch a feed now (or re-read an ASN rule's ranges: `asn:64500`) and
    /// apply it; a failed or suspicious list keeps the previous one.
    Refresh {
        /// The feed's name.
        name: String,
    },
}

/// The status cell: `ok`, or the status with its error.
fn status_cell(feed: &Value) -> String {
    match feed["last_error"].as_str() {
        Some(error) if feed["status"] != "ok" => format!("{}: {error}", cell(&feed["status"])),
        _ => cell(&feed["status"]),
    }
}

fn feeds_table(feeds: &Value) -> String {
    let rows: Vec<Vec<String>> = items(feeds)
        .iter()
        .map(|f| {
            vec![
                cell(&f["name"]),
                cell(&f["kind"]),
                cell(&f["entries"]),
                cell(&f["blocks"]),
                cell(&f["refused"]),
                cell(&f["bad_lines"]),
                when(&f["last_success"]),
                when(&f["last_attempt"]),
                status_cell(f),
                cell(&f["origin"]),
            ]
        })
        .collect();
    table(
        &["NAME", "KIND", "ENTRIES", "BLOCKS", "REFUSED", "BAD", "LAST SUCCESS", "LAST TRY", "STATUS", "ORIGIN"],
        &rows,
    )
}

/// `fleetban feeds`.
pub(crate) async fn list(client: &Client, json: bool) -> Result<String, CliError> {
    let feeds = client.get("/api/v1/feeds", &[]).await?;
    Ok(if json { pretty(&feeds) } else { feeds_table(&feeds) })
}

/// `fleetban feed ...`.
pub(crate) async fn feed(client: &Client, json: bool, command: &FeedCommand) -> Result<String, CliError> {
    let FeedCommand::Refresh { name } = command;
    let path = format!("/api/v1/feeds/{}/refresh", urlencode(name));
    let answer = client.json(Method::POST, &path, &[], None).await?;
    if json {
        return Ok(pretty(&answer));
    }
    let result = &answer["result"];
    let head = match result["outcome"].as_str() {
        Some("ok") => format!(
            "{name}: {} entries, {} live blocks ({} written, {} retired, {} refused by policy, {} bad lines).\n",
            cell(&result["entries"]),
            cell(&result["blocks"]),
            cell(&result["written"]),
            cell(&result["retired"]),
            cell(&result["refused"]),
            cell(&result["bad_lines"]),
        ),
        Some(outcome) => {
            format!("{name}: {outcome}: {}; the previous list stays in force.\n", cell(&result["error"]))
        }
        None => format!("{name}: {}\n", cell(result)),
    };
    Ok(format!("{}{}", escape(&head), feeds_table(&Value::Array(vec![answer["feed"].clone()]))))
}

/// `name` safe in a URL path segment (feed names are `[A-Za-z0-9._:-]`;
/// anything else is percent-encoded so the server answers 404, not 400).
fn urlencode(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_error_unless_ok() {
        let held = serde_json::json!({"status": "held", "last_error": "the list shrank from 10 to 4 entries"});
        assert_eq!(status_cell(&held), "held: the list shrank from 10 to 4 entries");
        assert_eq!(status_cell(&serde_json::json!({"status": "ok", "last_error": null})), "ok");
        assert_eq!(urlencode("asn:64500"), "asn:64500");
        assert_eq!(urlencode("a/b c"), "a%2Fb%20c");
    }
}
