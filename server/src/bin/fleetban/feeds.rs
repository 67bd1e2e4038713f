//! `feeds` and `feed refresh NAME`: the blocklist feeds and ASN block rules
//! of [`fleetban_server::feeds`] through `GET /api/v1/feeds` and
//! `POST /api/v1/feeds/{name}/refresh`.

use clap::Subcommand;
use fleetban_server::api::feeds::Refreshed;
use fleetban_server::feeds::{FeedStatus, Outcome};
use fleetban_server::table::table;
use fleetban_server::text::escape;
use reqwest::Method;

use super::{CliError, Client, when_opt};

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
fn status_cell(status: &str, last_error: Option<&str>) -> String {
    match last_error {
        Some(error) if status != "ok" => format!("{status}: {error}"),
        _ => status.to_owned(),
    }
}

fn feeds_table(feeds: &[FeedStatus]) -> String {
    let rows: Vec<Vec<String>> = feeds
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.kind.clone(),
                f.entries.to_string(),
                f.blocks.to_string(),
                f.refused.to_string(),
                f.bad_lines.to_string(),
                when_opt(f.last_success),
                when_opt(f.last_attempt),
                status_cell(&f.status, f.last_error.as_deref()),
                f.origin.clone(),
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
    let (raw, feeds) = client.get_as::<Vec<FeedStatus>>("/api/v1/feeds", &[]).await?;
    Ok(if json { raw } else { feeds_table(&feeds) })
}

/// `fleetban feed ...`.
pub(crate) async fn feed(client: &Client, json: bool, command: &FeedCommand) -> Result<String, CliError> {
    let FeedCommand::Refresh { name } = command;
    let path = format!("/api/v1/feeds/{}/refresh", urlencode(name));
    let (raw, answer) = client.call::<Refreshed>(Method::POST, &path, &[], super::NO_BODY).await?;
    if json {
        return Ok(raw);
    }
    // One line: escaped without its line break.
    let head = match &answer.result {
        Outcome::Ok { entries, blocks, written, retired, refused, bad_lines } => format!(
            "{name}: {entries} entries, {blocks} live blocks ({written} written, {retired} retired, {refused} \
             refused by policy, {bad_lines} bad lines)."
        ),
        Outcome::Failed { error } => format!("{name}: failed: {error}; the previous list stays in force."),
        Outcome::Held { error } => format!("{name}: held: {error}; the previous list stays in force."),
        Outcome::Skipped => format!("{name}: skipped; the previous list stays in force."),
    };
    Ok(format!("{}\n{}", escape(&head), feeds_table(std::slice::from_ref(&answer.feed))))
}

/// `name` safe in a URL path segment (feed names are `[A-Za-z0-9._:-]`;
/// anything else is percent-encoded so the server answers 404, not 400).
pub(crate) fn urlencode(name: &str) -> String {
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
        assert_eq!(
            status_cell("held", Some("the list shrank from 10 to 4 entries")),
            "held: the list shrank from 10 to 4 entries"
        );
        assert_eq!(status_cell("ok", None), "ok");
        assert_eq!(urlencode("asn:64500"), "asn:64500");
        assert_eq!(urlencode("a/b c"), "a%2Fb%20c");
    }
}
