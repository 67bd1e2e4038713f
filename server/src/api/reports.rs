//! `/api/v1/reports/abuse`: the plain-text abuse report of [`crate::report`]
//! for an address or range.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa::IntoParams;

use super::auth::Caller;
use super::error::{ApiError, ApiQuery};
use super::{AppState, params};
use crate::report;

/// What to report on.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    /// Address or range (`203.0.113.7`, `203.0.113.0/24`).
    pub target: String,
    /// Replace our own host names, agent names and addresses (default false).
    pub redact: Option<bool>,
}

/// An abuse report for the operator of the attacking network.
#[utoipa::path(get, path = "/api/v1/reports/abuse", tag = "reports", security(("bearer" = [])), params(ReportQuery),
    responses((status = 200, description = "The report", content_type = "text/plain", body = String),
              (status = 400, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn abuse(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<ReportQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let target = params::cidr("target", &query.target)?;
    let mut data = report::gather(&state.pool, target)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("nothing is known about {target}")))?;
    data.country = state.geo.mmdb_country(target.network());
    Ok(([(CONTENT_TYPE, "text/plain; charset=utf-8")], report::render(&data, query.redact.unwrap_or(false))))
}
