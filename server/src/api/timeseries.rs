//! `/api/v1/timeseries/*`: the dashboard's history — abuse over time by
//! kind or host, blocks made/expired/revoked, and slot usage per host —
//! over a fixed range (`1h`, `24h`, `7d`, `30d`) from the series ingest
//! keeps ([`crate::timeseries`]). Any token may read them.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiQuery};
use crate::timeseries::{self as series, By, Range, Series, Slots};

/// The range of a series.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    /// `1h` (per minute), `24h` (default; per 10 min), `7d` (per hour) or
    /// `30d` (per 6 h).
    pub range: Option<String>,
}

/// The range and split of the abuse series.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AbuseQuery {
    /// `1h` (per minute), `24h` (default; per 10 min), `7d` (per hour) or
    /// `30d` (per 6 h).
    pub range: Option<String>,
    /// `kind` (default): a series per abuse kind; `host`: per agent.
    pub by: Option<String>,
}

fn range(value: Option<&str>) -> Result<Range, ApiError> {
    let value = value.unwrap_or("24h");
    Range::from_name(value)
        .ok_or_else(|| ApiError::bad_request(format!("range: {value:?} is not one of 1h, 24h, 7d, 30d")))
}

/// Abuse events over time, per kind or per host. Context lines (connects,
/// accepted mail, refusals of a full host) are never counted.
#[utoipa::path(get, path = "/api/v1/timeseries/abuse", tag = "stats", security(("bearer" = [])), params(AbuseQuery),
    responses((status = 200, body = Series), (status = 400, body = super::error::ErrorBody),
              (status = 401, body = super::error::ErrorBody)))]
pub async fn abuse(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<AbuseQuery>,
) -> Result<Json<Series>, ApiError> {
    let range = range(query.range.as_deref())?;
    let by = match query.by.as_deref().unwrap_or("kind") {
        "kind" => By::Kind,
        "host" => By::Host,
        other => return Err(ApiError::bad_request(format!("by: {other:?} is not kind or host"))),
    };
    Ok(Json(series::abuse(&state.pool, range, by).await?))
}

/// Blocks made, expired and revoked by an operator, over time.
#[utoipa::path(get, path = "/api/v1/timeseries/blocks", tag = "stats", security(("bearer" = [])), params(RangeQuery),
    responses((status = 200, body = Series), (status = 400, body = super::error::ErrorBody),
              (status = 401, body = super::error::ErrorBody)))]
pub async fn blocks(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<RangeQuery>,
) -> Result<Json<Series>, ApiError> {
    let range = range(query.range.as_deref())?;
    Ok(Json(series::blocks(&state.pool, range).await?))
}

/// Slot usage per host: the highest `connection count` per bucket, the
/// refusals of a full host, and the host's `smtp_accept_max` if known.
#[utoipa::path(get, path = "/api/v1/timeseries/slots", tag = "stats", security(("bearer" = [])), params(RangeQuery),
    responses((status = 200, body = Slots), (status = 400, body = super::error::ErrorBody),
              (status = 401, body = super::error::ErrorBody)))]
pub async fn slots(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<RangeQuery>,
) -> Result<Json<Slots>, ApiError> {
    let range = range(query.range.as_deref())?;
    Ok(Json(series::slots(&state.pool, range).await?))
}
