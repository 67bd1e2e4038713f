//! `/api/v1/feeds`: the status of the blocklist feeds and ASN block rules
//! ([`crate::feeds`]), and a refresh on demand.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::auth::{Admin, Caller, audit};
use super::error::{ApiError, ApiPath};
use crate::blocks::BlockPolicy;
use crate::feeds::{FeedError, FeedStatus, Outcome};

fn feed_error(error: FeedError) -> ApiError {
    match error {
        FeedError::Unknown(name) => ApiError::not_found(format!("no feed named {name:?} is configured")),
        FeedError::Database(error) => ApiError::Database(error),
        FeedError::Client(error) => ApiError::Internal(error.to_string()),
    }
}

/// Every configured feed and ASN block rule with its status.
#[utoipa::path(get, path = "/api/v1/feeds", tag = "feeds", security(("bearer" = [])),
    responses((status = 200, body = [FeedStatus]), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, _caller: Caller) -> Result<Json<Vec<FeedStatus>>, ApiError> {
    Ok(Json(state.feeds.status(&state.pool).await.map_err(feed_error)?))
}

/// What a refresh did, and the feed's status after it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Refreshed {
    /// The refresh: `ok` with counts, `failed` or `held` with the error
    /// (the previous list stays in force).
    pub result: Outcome,
    /// The feed's status now.
    pub feed: FeedStatus,
}

/// Fetches a feed (or re-reads an ASN rule's ranges) now and applies it.
/// A refresh another replica is running is a 409.
#[utoipa::path(post, path = "/api/v1/feeds/{name}/refresh", tag = "feeds", security(("bearer" = [])),
    params(("name" = String, Path, description = "Feed name, or `asn:<number>` for an ASN rule")),
    responses((status = 200, body = Refreshed), (status = 403, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody),
              (status = 409, description = "A refresh of this feed is running", body = super::error::ErrorBody)))]
pub async fn refresh(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Refreshed>, ApiError> {
    // The refresh runs as its own task: a slow fetch that outlives the
    // request's timeout still finishes (or fails) and records its status.
    let task = {
        let (feeds, pool, policy, name) = (state.feeds.clone(), state.pool.clone(), state.policy.clone(), name.clone());
        tokio::spawn(async move {
            let policy: Arc<dyn BlockPolicy> = policy;
            feeds.refresh(&pool, policy.as_ref(), &name, true).await
        })
    };
    let outcome =
        task.await.map_err(|error| ApiError::Internal(format!("feed refresh task: {error}")))?.map_err(feed_error)?;
    if outcome == Outcome::Skipped {
        return Err(ApiError::Conflict(format!("a refresh of {name} is running")));
    }
    audit(&state.pool, &caller.name, "feed.refresh", &name, serde_json::to_value(&outcome).unwrap_or_default()).await?;
    let feed = state
        .feeds
        .status(&state.pool)
        .await
        .map_err(feed_error)?
        .into_iter()
        .find(|f| f.name == name)
        .ok_or_else(|| ApiError::Internal(format!("feed {name} vanished")))?;
    Ok(Json(Refreshed { result: outcome, feed }))
}
