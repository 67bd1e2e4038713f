//! `/api/v1/events`: stored log events, newest first, with keyset pagination
//! on `(time, id)` so a page never skips or repeats a row while events arrive.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, QueryBuilder};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ApiQuery};
use super::{AppState, next_cursor_headers, params};
use crate::eventlog;

/// Filters of the event list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Remote address or range (`203.0.113.7`, `203.0.113.0/24`).
    pub ip: Option<String>,
    /// Agent id or name.
    pub agent: Option<String>,
    /// Event kind (`auth_failed`, `refused_too_many`, ...).
    pub kind: Option<String>,
    /// `true`: abuse kinds only (no connects, accepted mail, refusals of a
    /// full host or other context lines).
    pub abuse: Option<bool>,
    /// Service (`smtp`, `imap`, `pop3`, `managesieve`, `submission`).
    pub service: Option<String>,
    /// Earliest event time: RFC 3339 or a duration ago (`1h`).
    pub since: Option<String>,
    /// Latest event time (exclusive): RFC 3339 or a duration ago.
    pub until: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// The `x-next-cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One stored event.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct Event {
    /// Event id.
    pub id: i64,
    /// Log time.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The agent that sent it.
    pub agent_id: Uuid,
    /// That agent's name.
    pub agent: String,
    /// Event kind.
    pub kind: String,
    /// The service the log line came from (`smtp` for Exim's lines, `imap`,
    /// `pop3`, ... for Dovecot's).
    pub service: String,
    /// Remote (client) address.
    #[schema(value_type = String)]
    pub remote: IpNet,
    /// Remote port.
    pub remote_port: Option<i32>,
    /// Local interface address.
    #[schema(value_type = Option<String>)]
    pub local: Option<IpNet>,
    /// Local port.
    pub local_port: Option<i32>,
    /// Exim's TCP/IP connection count, on connect events.
    pub connection_count: Option<i32>,
    /// Authentication user, on auth events.
    pub auth_user: Option<String>,
    /// HELO name.
    pub helo: Option<String>,
    /// Further detail.
    pub detail: Option<String>,
    /// The raw log line.
    pub raw: Option<String>,
}

/// Events matching the filters, newest first. The next page's cursor is in
/// the `x-next-cursor` header (absent on the last page).
#[utoipa::path(get, path = "/api/v1/events", tag = "events", security(("bearer" = [])), params(EventQuery),
    responses((status = 200, body = [Event], headers(("x-next-cursor" = String, description = "Cursor of the next page"))),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<EventQuery>,
) -> Result<(HeaderMap, Json<Vec<Event>>), ApiError> {
    let limit = params::limit(query.limit)?;
    let ip = query.ip.as_deref().map(|v| params::cidr("ip", v)).transpose()?;
    let since = query.since.as_deref().map(|v| params::time("since", v)).transpose()?;
    let until = query.until.as_deref().map(|v| params::time("until", v)).transpose()?;
    let cursor = query.cursor.as_deref().map(params::parse_time_cursor).transpose()?;
    let agent = match query.agent.as_deref() {
        None => None,
        Some(agent) => Some(resolve_agent(&state, agent).await?),
    };
    if let Some(kind) = &query.kind
        && (kind.is_empty() || kind.len() > 64 || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    {
        return Err(ApiError::bad_request(format!("kind: {kind:?} is not an event kind")));
    }
    let service = match query.service.as_deref() {
        None => None,
        Some(name) => Some(
            fleetban_proto::v1::Service::from_name(name)
                .ok_or_else(|| ApiError::bad_request(format!("service: {name:?} is not a service")))?,
        ),
    };
    // Newest first over slices of time (see `eventlog`): the first slices
    // usually hold a whole page.
    let latest = eventlog::latest_possible();
    let end = [cursor.map(|c| c.0), until].into_iter().flatten().fold(latest, OffsetDateTime::min);
    let mut events: Vec<Event> = Vec::new();
    for slice in eventlog::slices(end, since) {
        let want = limit + 1 - events.len() as i64;
        let mut q = QueryBuilder::<Postgres>::new(
            "select e.id, e.time, e.agent_id, coalesce(a.name, '') as agent, e.kind, \
                    coalesce(e.service, 'smtp') as service, e.remote, e.remote_port, \
                    e.local, e.local_port, e.connection_count, e.auth_user, e.helo, e.detail, e.raw \
             from events e left join agents a on a.id = e.agent_id where e.time < ",
        );
        q.push_bind(slice.to_exclusive());
        q.push(" and e.time >= ").push_bind(slice.from.unwrap_or(OffsetDateTime::UNIX_EPOCH));
        if let Some(ip) = ip {
            q.push(" and e.remote between fleetban_first(").push_bind(ip);
            q.push("::cidr) and fleetban_last(").push_bind(ip).push("::cidr)");
        }
        if let Some(agent) = agent {
            q.push(" and e.agent_id = ").push_bind(agent);
        }
        if let Some(kind) = &query.kind {
            q.push(" and e.kind = ").push_bind(kind);
        }
        if query.abuse == Some(true) {
            q.push(" and e.kind = any(").push_bind(abuse_kinds()).push("::text[])");
        }
        if let Some(service) = service {
            q.push(" and coalesce(e.service, 'smtp') = ").push_bind(service.as_str());
        }
        if let Some(until) = until {
            q.push(" and e.time < ").push_bind(until);
        }
        if let Some((t, id)) = cursor {
            q.push(" and (e.time, e.id) < (").push_bind(t).push(", ").push_bind(id).push(")");
        }
        q.push(" order by e.time desc, e.id desc limit ").push_bind(want);
        events.extend(q.build_query_as::<Event>().fetch_all(&state.pool).await?);
        if events.len() as i64 > limit {
            break;
        }
    }
    let next = if events.len() as i64 > limit {
        events.truncate(limit as usize);
        events.last().map(|e| params::time_cursor(e.time, e.id))
    } else {
        None
    };
    Ok((next_cursor_headers(next), Json(events)))
}

/// The stored names of the abuse kinds (the shared vocabulary's).
fn abuse_kinds() -> Vec<&'static str> {
    fleetban_proto::v1::EventKind::ALL.into_iter().filter(|k| k.is_abuse()).map(|k| k.as_str()).collect()
}

/// Resolves an agent given by id or by name.
pub(super) async fn resolve_agent(state: &AppState, agent: &str) -> Result<Uuid, ApiError> {
    if let Ok(id) = agent.parse::<Uuid>() {
        return Ok(id);
    }
    sqlx::query_scalar(
        "select id from agents where name = $1 or hostname = $1 \
         order by removed_at is not null, enrolled_at limit 1",
    )
    .bind(agent)
    .fetch_optional(&state.pool)
    .await?
    .ok_or_else(|| ApiError::bad_request(format!("agent: no agent named {agent:?}")))
}
