//! `POST /api/v1/import` and `GET /api/v1/export`: the blocklist and the
//! allowlist in bulk, in the formats of [`crate::transfer`].
//!
//! An import is applied in one database transaction: every row is judged
//! (added, already present, or skipped with the reason and its line number:
//! unparsable, broader than the minimum prefix without `force`, refused by
//! policy) and the whole import commits at once, or, with `dry_run`, is
//! rolled back after the same judgement, so a dry run reports exactly what
//! the import would do. Blocks go through [`crate::blocks::create_in`], so
//! they are versioned, policy-checked and pushed like any other. Imports
//! have a larger body limit ([`MAX_IMPORT_BYTES`]) than other requests.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::allowlist::{check_breadth, insert};
use super::auth::{Admin, Caller, audit};
use super::error::{ApiError, ApiJson, ApiQuery};
use crate::blocks::{self, BlockError, BlockSource, NewBlock};
use crate::transfer::{self, Exported, Format, List, Skipped};

/// Largest import request body, bytes.
pub const MAX_IMPORT_BYTES: usize = 8 * 1024 * 1024;

/// An import.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// The file's format.
    pub format: Format,
    /// Where rows without a list of their own go (`plain`, `csv`, `json`);
    /// default `block`. The CSF formats choose their own.
    pub list: Option<List>,
    /// The file's text.
    pub text: String,
    /// Judge every row and report, but write nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Accept ranges broader than the minimum prefix (/16 IPv4, /32 IPv6);
    /// without it they are skipped.
    #[serde(default)]
    pub force: bool,
    /// Reason of rows that carry none (default `imported`).
    pub reason: Option<String>,
    /// Lifetime of rows that carry none, seconds; absent = permanent.
    pub ttl_secs: Option<u64>,
}

/// A row that was added or already present.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportedRow {
    /// Line number in the file.
    pub line: usize,
    /// Which list.
    pub list: List,
    /// The range.
    #[schema(value_type = String)]
    pub cidr: ipnet::IpNet,
}

/// What an import did (or, with `dry_run`, would do).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImportSummary {
    /// Nothing was written.
    pub dry_run: bool,
    /// Rows added.
    pub added: Vec<ImportedRow>,
    /// Rows whose range was already live in their list (left unchanged).
    pub already_present: Vec<ImportedRow>,
    /// Lines not imported, with why.
    pub skipped: Vec<Skipped>,
}

/// Applies (or judges) an import in one transaction.
#[utoipa::path(post, path = "/api/v1/import", tag = "blocks", security(("bearer" = [])), request_body = ImportRequest,
    responses((status = 200, body = ImportSummary), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody)))]
pub async fn import(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(body): ApiJson<ImportRequest>,
) -> Result<Json<ImportSummary>, ApiError> {
    if body.ttl_secs == Some(0) {
        return Err(ApiError::bad_request("ttl_secs must be positive"));
    }
    let default_reason = body.reason.as_deref().map(str::trim).filter(|r| !r.is_empty()).unwrap_or("imported");
    if default_reason.chars().count() > transfer::MAX_REASON_CHARS {
        return Err(ApiError::bad_request(format!("reason must be at most {} characters", transfer::MAX_REASON_CHARS)));
    }
    let (rows, mut skipped) = transfer::parse(body.format, body.list.unwrap_or(List::Block), &body.text);
    let mut summary =
        ImportSummary { dry_run: body.dry_run, added: Vec::new(), already_present: Vec::new(), skipped: Vec::new() };
    let mut tx = state.pool.begin().await?;
    for row in rows {
        if let Err(refusal) = check_breadth(&state.policy, row.cidr, body.force) {
            skipped.push(Skipped { line: row.line, reason: format!("{refusal} (--force)") });
            continue;
        }
        let reason = if row.reason.is_empty() { default_reason.to_owned() } else { row.reason.clone() };
        let ttl_secs = row.ttl_secs.or(body.ttl_secs);
        let done = ImportedRow { line: row.line, list: row.list, cidr: row.cidr };
        match row.list {
            List::Allow => match insert(&mut tx, row.cidr, &reason, &caller.name, ttl_secs).await? {
                Some(_) => summary.added.push(done),
                None => summary.already_present.push(done),
            },
            List::Block => {
                let live: bool = sqlx::query_scalar("select exists(select 1 from live_blocks where cidr = $1::cidr)")
                    .bind(row.cidr)
                    .fetch_one(&mut *tx)
                    .await?;
                if live {
                    summary.already_present.push(done);
                    continue;
                }
                let new = NewBlock {
                    cidr: row.cidr,
                    reason,
                    source: BlockSource::Manual,
                    evidence: serde_json::json!({ "operator": caller.name, "import_line": row.line }),
                    ttl: ttl_secs.map(std::time::Duration::from_secs),
                    created_by: Some(caller.name.clone()),
                    // Breadth was judged above.
                    force: true,
                };
                match blocks::create_in(&mut tx, state.policy.as_ref(), new).await {
                    Ok(_) => summary.added.push(done),
                    Err(BlockError::Refused(refusal)) => {
                        skipped.push(Skipped { line: row.line, reason: refusal.to_string() });
                    }
                    Err(BlockError::Database(error)) => return Err(error.into()),
                }
            }
        }
    }
    skipped.sort_by_key(|s| s.line);
    summary.skipped = skipped;
    if body.dry_run {
        tx.rollback().await?;
        return Ok(Json(summary));
    }
    tx.commit().await?;
    audit(
        &state.pool,
        &caller.name,
        "import",
        &format!("{:?}", body.format).to_lowercase(),
        serde_json::json!({ "added": summary.added.len(), "already_present": summary.already_present.len(),
            "skipped": summary.skipped.len(), "force": body.force }),
    )
    .await?;
    Ok(Json(summary))
}

/// What to export.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `plain`, `csv`, `json`, `csf-deny` or `csf-allow` (default `csv`).
    pub format: Option<String>,
    /// `block` or `allow`; absent = both (the CSF formats hold one each).
    pub list: Option<String>,
}

/// The live blocklist and allowlist in a bulk format (re-importable).
#[utoipa::path(get, path = "/api/v1/export", tag = "blocks", security(("bearer" = [])), params(ExportQuery),
    responses((status = 200, description = "The file", body = String), (status = 400, body = super::error::ErrorBody)))]
pub async fn export(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let format = match query.format.as_deref() {
        None => Format::Csv,
        Some(name) => Format::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!("format {name:?}: expected plain, csv, json, csf-deny or csf-allow"))
        })?,
    };
    let (blocks, allows) = match query.list.as_deref() {
        None => (true, true),
        Some("block") => (true, false),
        Some("allow") => (false, true),
        Some(other) => return Err(ApiError::bad_request(format!("list {other:?}: expected block or allow"))),
    };
    let now = OffsetDateTime::now_utc();
    let ttl = |expires: Option<OffsetDateTime>| {
        expires.map(|at| u64::try_from((at - now).whole_seconds().max(1)).unwrap_or(1))
    };
    let mut entries = Vec::new();
    if blocks {
        let rows: Vec<(ipnet::IpNet, String, Option<OffsetDateTime>)> =
            sqlx::query_as("select cidr, reason, expires_at from live_blocks order by cidr")
                .fetch_all(&state.pool)
                .await?;
        entries.extend(rows.into_iter().map(|(cidr, reason, expires)| Exported {
            cidr,
            list: List::Block,
            reason,
            ttl_secs: ttl(expires),
        }));
    }
    if allows {
        let rows: Vec<(ipnet::IpNet, String, Option<OffsetDateTime>)> =
            sqlx::query_as("select cidr, note, expires_at from live_allowlist order by cidr")
                .fetch_all(&state.pool)
                .await?;
        entries.extend(rows.into_iter().map(|(cidr, reason, expires)| Exported {
            cidr,
            list: List::Allow,
            reason,
            ttl_secs: ttl(expires),
        }));
    }
    let content_type = if format == Format::Json { "application/json" } else { "text/plain; charset=utf-8" };
    Ok(([(header::CONTENT_TYPE, content_type)], transfer::render(format, &entries)).into_response())
}
