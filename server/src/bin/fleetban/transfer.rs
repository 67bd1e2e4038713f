//! `import` and `export`: the blocklist and the allowlist in bulk through
//! `POST /api/v1/import` and `GET /api/v1/export` (formats in
//! [`fleetban_server::transfer`]).
//!
//! An import is applied by the server in one transaction. On a terminal,
//! without `--yes` or `--dry-run`, the CLI first asks the server for a dry
//! run, prints its summary and asks for confirmation before importing for
//! real; without a terminal it imports at once (scripts).

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::Path;

use reqwest::Method;

use super::ranges::confirm;
use super::{CliError, Client, one_line, ttl_secs};
use fleetban_server::api::transfer::{ImportRequest, ImportSummary};
use fleetban_server::text::escape;
use fleetban_server::transfer::{Format, List};

fn format_arg(format: &str) -> Result<Format, CliError> {
    Format::parse(format).ok_or_else(|| {
        CliError::BadArgument(format!("bad --format {format:?}: expected plain, csv, json, csf-deny or csf-allow"))
    })
}

fn list_arg(list: Option<&str>) -> Result<Option<List>, CliError> {
    match list {
        None => Ok(None),
        Some("block") => Ok(Some(List::Block)),
        Some("allow") => Ok(Some(List::Allow)),
        Some(other) => Err(CliError::BadArgument(format!("bad --list {other:?}: expected block or allow"))),
    }
}

fn summary_text(summary: &ImportSummary, file: &str) -> String {
    let mut out = format!(
        "{}{file}: {} added, {} already present, {} skipped.\n",
        if summary.dry_run { "Dry run, nothing written: " } else { "" },
        summary.added.len(),
        summary.already_present.len(),
        summary.skipped.len()
    );
    for skip in &summary.skipped {
        let _ = writeln!(out, "  line {}: {}", skip.line, escape(&skip.reason));
    }
    out
}

/// `fleetban import [--format F] [--list L] [--dry-run] [--force] [--reason R] [--ttl T] [--yes] FILE`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn import(
    client: &Client,
    file: &Path,
    format: &str,
    list: Option<&str>,
    dry_run: bool,
    force: bool,
    reason: Option<&str>,
    ttl: Option<&str>,
    yes: bool,
    json_out: bool,
) -> Result<String, CliError> {
    let format = format_arg(format)?;
    let list = list_arg(list)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::BadArgument(format!("cannot read {}: {}", file.display(), one_line(&e))))?;
    let mut body = ImportRequest {
        format,
        list,
        text,
        dry_run: true,
        force,
        reason: reason.map(str::to_owned),
        ttl_secs: ttl_secs(ttl)?,
    };
    let name = file.display().to_string();
    if !dry_run && !yes && std::io::stdin().is_terminal() {
        let (_, summary) = client.call::<ImportSummary>(Method::POST, "/api/v1/import", &[], Some(&body)).await?;
        eprint!("{}", summary_text(&summary, &name));
        confirm(&format!("Import {name} for real?"), false)?;
    }
    body.dry_run = dry_run;
    let (raw, summary) = client.call::<ImportSummary>(Method::POST, "/api/v1/import", &[], Some(&body)).await?;
    Ok(if json_out { raw } else { summary_text(&summary, &escape(&name)) })
}

/// `fleetban export [--format F] [--list L]`: the file, on standard output.
pub(crate) async fn export(client: &Client, format: &str, list: Option<&str>) -> Result<String, CliError> {
    format_arg(format)?;
    let mut query = vec![("format", format.to_owned())];
    if let Some(list) = list_arg(list)? {
        query.push(("list", if list == List::Block { "block" } else { "allow" }.to_owned()));
    }
    let response = client.send(Method::GET, "/api/v1/export", &query, super::NO_BODY).await?;
    response.text().await.map_err(|e| CliError::Decode(one_line(&e)))
}
