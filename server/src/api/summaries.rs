//! `/api/v1/summaries`: the context agents summarised instead of sending
//! each line (connects, accepted mail, logins, refusals of a full host, ...;
//! `[aggregate]` in the agent's config), newest interval first, with keyset
//! pagination on `(interval_start, agent_id, batch_seq, batch_index)`, the
//! table's unique key, so a page never skips or repeats a row.

use std::collections::BTreeMap;

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
use super::events::resolve_agent;
use super::{AppState, next_cursor_headers, params};
use crate::eventlog;

/// Filters of the summary list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SummaryQuery {
    /// Remote address or range (`198.51.100.7`, `198.51.100.0/24`).
    pub ip: Option<String>,
    /// Agent id or name.
    pub agent: Option<String>,
    /// Only summaries with lines of this kind (`connect`, `accepted`, ...).
    pub kind: Option<String>,
    /// Service (`smtp`, `imap`, `pop3`, `managesieve`, `submission`).
    pub service: Option<String>,
    /// Earliest interval start: RFC 3339 or a duration ago (`1h`).
    pub since: Option<String>,
    /// Latest interval start (exclusive): RFC 3339 or a duration ago.
    pub until: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// The `x-next-cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One agent's summary of one address's context lines over one interval.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Summary {
    /// The agent that sent it.
    pub agent_id: Uuid,
    /// That agent's name.
    pub agent: String,
    /// Start of the interval (aligned to wall-clock time).
    #[serde(with = "time::serde::rfc3339")]
    pub interval_start: OffsetDateTime,
    /// Length of the interval, seconds.
    pub interval_secs: i32,
    /// Remote (client) address.
    #[schema(value_type = String)]
    pub remote: IpNet,
    /// The service the lines came from.
    pub service: String,
    /// Time of the first line.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// Time of the last line.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Lines of every kind.
    pub lines: i32,
    /// Lines per kind.
    pub kinds: BTreeMap<String, i32>,
    /// Highest `TCP/IP connection count` of its connects.
    pub max_connection_count: Option<i32>,
    /// Lines that earn good standing (accepted mail, logins).
    pub standing: i32,
    /// Time of the last of those.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_standing: Option<OffsetDateTime>,
    /// Verified host name of the address, if the lines had one.
    pub host_name: Option<String>,
    /// Raw lines kept as samples.
    pub samples: Vec<String>,
    /// The batch that carried it.
    pub batch_seq: i64,
    /// Its place in that batch.
    pub batch_index: i32,
}

#[derive(sqlx::FromRow)]
struct Row {
    agent_id: Uuid,
    agent: String,
    interval_start: OffsetDateTime,
    interval_secs: i32,
    remote: IpNet,
    service: String,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
    lines: i32,
    kinds: Vec<String>,
    counts: Vec<i32>,
    max_connection_count: Option<i32>,
    standing: i32,
    last_standing: Option<OffsetDateTime>,
    host_name: Option<String>,
    samples: Option<Vec<String>>,
    batch_seq: i64,
    batch_index: i32,
}

impl From<Row> for Summary {
    fn from(r: Row) -> Self {
        Summary {
            agent_id: r.agent_id,
            agent: r.agent,
            interval_start: r.interval_start,
            interval_secs: r.interval_secs,
            remote: r.remote,
            service: r.service,
            first_seen: r.first_seen,
            last_seen: r.last_seen,
            lines: r.lines,
            kinds: r.kinds.into_iter().zip(r.counts).collect(),
            max_connection_count: r.max_connection_count,
            standing: r.standing,
            last_standing: r.last_standing,
            host_name: r.host_name,
            samples: r.samples.unwrap_or_default(),
            batch_seq: r.batch_seq,
            batch_index: r.batch_index,
        }
    }
}

/// Position of the last summary of a page.
type Cursor = (OffsetDateTime, Uuid, i64, i32);

fn cursor_of(s: &Summary) -> String {
    format!("{}.{}.{}.{}", s.interval_start.unix_timestamp_nanos(), s.agent_id.simple(), s.batch_seq, s.batch_index)
}

fn parse_cursor(value: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::bad_request(format!("cursor: {value:?} is not a cursor returned by this API"));
    let mut parts = value.splitn(4, '.');
    let (Some(time), Some(agent), Some(seq), Some(index)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    // The time and its id part go through the events' cursor parser (same
    // bounds and length limit).
    let (t, seq) = params::parse_time_cursor(&format!("{time}.{seq}")).map_err(|_| bad())?;
    let agent: Uuid = agent.parse().map_err(|_| bad())?;
    let index: i32 = index.parse().map_err(|_| bad())?;
    Ok((t, agent, seq, index))
}

/// Context summaries matching the filters, newest interval first. The next
/// page's cursor is in the `x-next-cursor` header (absent on the last page).
#[utoipa::path(get, path = "/api/v1/summaries", tag = "events", security(("bearer" = [])), params(SummaryQuery),
    responses((status = 200, body = [Summary], headers(("x-next-cursor" = String, description = "Cursor of the next page"))),
              (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<SummaryQuery>,
) -> Result<(HeaderMap, Json<Vec<Summary>>), ApiError> {
    let limit = params::limit(query.limit)?;
    let ip = query.ip.as_deref().map(|v| params::cidr("ip", v)).transpose()?;
    let since = query.since.as_deref().map(|v| params::time("since", v)).transpose()?;
    let until = query.until.as_deref().map(|v| params::time("until", v)).transpose()?;
    let cursor = query.cursor.as_deref().map(parse_cursor).transpose()?;
    let agent = match query.agent.as_deref() {
        None => None,
        Some(agent) => Some(resolve_agent(&state, agent).await?),
    };
    let kind = match query.kind.as_deref() {
        None => None,
        Some(name) => Some(
            fleetban_proto::v1::EventKind::ALL
                .into_iter()
                .find(|k| k.as_str() == name)
                .filter(|k| k.is_summarised())
                .ok_or_else(|| ApiError::bad_request(format!("kind: {name:?} is not a summarised event kind")))?,
        ),
    };
    let service = match query.service.as_deref() {
        None => None,
        Some(name) => Some(
            fleetban_proto::v1::Service::from_name(name)
                .ok_or_else(|| ApiError::bad_request(format!("service: {name:?} is not a service")))?,
        ),
    };
    let end = [cursor.map(|c| c.0), until].into_iter().flatten().fold(eventlog::latest_possible(), OffsetDateTime::min);
    let mut summaries: Vec<Summary> = Vec::new();
    for slice in eventlog::slices(end, since) {
        let want = limit + 1 - summaries.len() as i64;
        let mut q = QueryBuilder::<Postgres>::new(
            "select s.agent_id, coalesce(a.name, '') as agent, s.interval_start, s.interval_secs, s.remote, \
                    coalesce(s.service, 'smtp') as service, s.first_seen, s.last_seen, s.lines, s.kinds, s.counts, \
                    s.max_connection_count, s.standing, s.last_standing, s.host_name, s.samples, \
                    s.batch_seq, s.batch_index \
             from context_summaries s left join agents a on a.id = s.agent_id where s.interval_start < ",
        );
        q.push_bind(slice.to_exclusive());
        q.push(" and s.interval_start >= ").push_bind(slice.from.unwrap_or(OffsetDateTime::UNIX_EPOCH));
        if let Some(ip) = ip {
            q.push(" and s.remote between fleetban_first(").push_bind(ip);
            q.push("::cidr) and fleetban_last(").push_bind(ip).push("::cidr)");
        }
        if let Some(agent) = agent {
            q.push(" and s.agent_id = ").push_bind(agent);
        }
        if let Some(kind) = kind {
            q.push(" and ").push_bind(kind.as_str()).push(" = any(s.kinds)");
        }
        if let Some(service) = service {
            q.push(" and coalesce(s.service, 'smtp') = ").push_bind(service.as_str());
        }
        if let Some(until) = until {
            q.push(" and s.interval_start < ").push_bind(until);
        }
        if let Some((t, agent, seq, index)) = cursor {
            q.push(" and (s.interval_start, s.agent_id, s.batch_seq, s.batch_index) < (").push_bind(t);
            q.push(", ").push_bind(agent).push(", ").push_bind(seq).push(", ").push_bind(index).push(")");
        }
        q.push(" order by s.interval_start desc, s.agent_id desc, s.batch_seq desc, s.batch_index desc limit ");
        q.push_bind(want);
        let rows = q.build_query_as::<Row>().fetch_all(&state.pool).await?;
        summaries.extend(rows.into_iter().map(Summary::from));
        if summaries.len() as i64 > limit {
            break;
        }
    }
    let next = if summaries.len() as i64 > limit {
        summaries.truncate(limit as usize);
        summaries.last().map(cursor_of)
    } else {
        None
    };
    Ok((next_cursor_headers(next), Json(summaries)))
}
