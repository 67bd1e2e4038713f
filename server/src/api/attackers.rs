//! `/api/v1/attackers`: addresses ranked by how many of the fleet's hosts
//! they hit and how many abuse events they caused, from the evidence tables
//! (`offenders`, `offender_hosts`) that ingest keeps current; and one
//! address's timeline across hosts with sample raw lines.

use std::net::IpAddr;

use axum::Json;
use axum::extract::State;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::Caller;
use super::error::{ApiError, ApiPath, ApiQuery};
use super::{AppState, params};
use crate::asn::{self, AsnInfo};
use crate::eventlog;

/// Filters of the attacker ranking.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AttackerQuery {
    /// Only addresses seen since: RFC 3339 or a duration ago (default `24h`).
    pub since: Option<String>,
    /// How many, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// Only addresses inside this address or range (`203.0.113.0/24`).
    pub within: Option<String>,
}

/// An attacking address.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Attacker {
    /// The address.
    #[schema(value_type = String)]
    pub ip: IpAddr,
    /// Distinct hosts of the fleet it hit.
    pub hosts: i32,
    /// Abuse events.
    pub events: i64,
    /// Kinds of abuse seen.
    pub kinds: Vec<String>,
    /// First abuse event.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// Last abuse event.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Whether a live block covers it.
    pub blocked: bool,
    /// Its autonomous system, when an ASN database is loaded.
    pub asn: Option<AsnInfo>,
    /// Its two-letter country, when known: from the country database
    /// (`[geo] country_mmdb_path`), else its AS's.
    pub country: Option<String>,
}

/// The country of `ip`: the country database's, else the AS's.
fn country(geo: &crate::geo::GeoPolicy, ip: std::net::IpAddr, asn: Option<&AsnInfo>) -> Option<String> {
    geo.mmdb_country(ip).or_else(|| asn.map(|a| a.country.clone()).filter(|c| !c.is_empty()))
}

#[derive(sqlx::FromRow)]
struct AttackerRow {
    ip: IpNet,
    hosts: i32,
    events: i64,
    kinds: Vec<String>,
    first_seen: OffsetDateTime,
    last_seen: OffsetDateTime,
    blocked: bool,
    asn: Option<i64>,
    as_name: Option<String>,
    country: Option<String>,
}

impl From<AttackerRow> for Attacker {
    fn from(row: AttackerRow) -> Self {
        let asn = match (row.asn, row.as_name, row.country) {
            (Some(asn), Some(name), Some(country)) => Some(AsnInfo { asn, name, country }),
            _ => None,
        };
        Attacker {
            ip: row.ip.addr(),
            hosts: row.hosts,
            events: row.events,
            kinds: row.kinds,
            first_seen: row.first_seen,
            last_seen: row.last_seen,
            blocked: row.blocked,
            asn,
            country: None,
        }
    }
}

fn select() -> String {
    format!(
        "select o.address as ip, o.hosts, o.events, o.first_seen, o.last_seen, \
           coalesce((select array_agg(distinct h.kind) from offender_hosts h where h.address = o.address), '{{}}') \
             as kinds, \
           exists (select 1 from live_blocks b where b.cidr >>= o.address) as blocked, \
           x.asn, x.name as as_name, x.country \
         from offenders o left join lateral ({}) x on true",
        asn::lookup_sql("o.address")
    )
}

/// Addresses ranked by hosts hit, then events.
#[utoipa::path(get, path = "/api/v1/attackers", tag = "attackers", security(("bearer" = [])), params(AttackerQuery),
    responses((status = 200, body = [Attacker]), (status = 400, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    ApiQuery(query): ApiQuery<AttackerQuery>,
) -> Result<Json<Vec<Attacker>>, ApiError> {
    let limit = params::limit(query.limit)?;
    let since = params::time("since", query.since.as_deref().unwrap_or("24h"))?;
    let within = query.within.as_deref().map(|v| params::cidr("within", v)).transpose()?;
    let rows = sqlx::query_as::<_, AttackerRow>(&format!(
        "{} where o.last_seen >= $1 \
           and ($3::cidr is null or o.address between fleetban_first($3::cidr) and fleetban_last($3::cidr)) \
         order by o.hosts desc, o.events desc, o.address limit $2",
        select()
    ))
    .bind(since)
    .bind(limit)
    .bind(within)
    .fetch_all(&state.pool)
    .await?;
    let attackers = rows
        .into_iter()
        .map(Attacker::from)
        .map(|mut a| {
            a.country = country(&state.geo, a.ip, a.asn.as_ref());
            a
        })
        .collect();
    Ok(Json(attackers))
}

/// Evidence of one address on one host.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct HostEvidence {
    /// The agent.
    pub agent_id: Uuid,
    /// Its name.
    pub agent: String,
    /// Its host name.
    pub hostname: String,
    /// Kind of abuse.
    pub kind: String,
    /// Events of that kind.
    pub events: i64,
    /// First seen.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// Last seen.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// A sample raw log line.
    pub sample_raw: Option<String>,
}

/// One event on the timeline.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct TimelineEvent {
    /// Log time.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The agent's name.
    pub agent: String,
    /// Event kind.
    pub kind: String,
    /// The service the line came from (`smtp`, `imap`, `pop3`, ...).
    pub service: String,
    /// The raw log line.
    pub raw: Option<String>,
}

/// A block that covers or covered the address.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, ToSchema)]
pub struct BlockRef {
    /// Block id.
    pub id: i64,
    /// Blocked range.
    #[schema(value_type = String)]
    pub cidr: IpNet,
    /// Reason.
    pub reason: String,
    /// `auto`, `agent`, `manual`, `feed` (a blocklist feed) or `policy` (an ASN rule).
    pub source: String,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Expiry; `null` = permanent.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Whether it is live now.
    pub active: bool,
    /// Why it was blocked, in one sentence.
    #[sqlx(skip)]
    pub why: String,
    #[serde(skip)]
    #[schema(ignore)]
    created_by: Option<String>,
    #[serde(skip)]
    #[schema(ignore)]
    evidence: serde_json::Value,
}

/// One address in detail.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttackerDetail {
    /// The summary (absent when only raw events, no abuse evidence, exist).
    pub summary: Option<Attacker>,
    /// Its autonomous system, when an ASN database is loaded.
    pub asn: Option<AsnInfo>,
    /// Its two-letter country, when known: from the country database, else
    /// its AS's.
    pub country: Option<String>,
    /// Evidence per host and kind.
    pub hosts: Vec<HostEvidence>,
    /// The latest events from it across hosts, newest first (at most 200).
    pub timeline: Vec<TimelineEvent>,
    /// Blocks covering it, newest first.
    pub blocks: Vec<BlockRef>,
}

/// Events on the timeline of one address.
const TIMELINE_LIMIT: i64 = 200;

/// One address: evidence per host, timeline with raw lines, blocks.
#[utoipa::path(get, path = "/api/v1/attackers/{ip}", tag = "attackers", security(("bearer" = [])),
    params(("ip" = String, Path, description = "The address")),
    responses((status = 200, body = AttackerDetail), (status = 400, body = super::error::ErrorBody),
              (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    ApiPath(ip): ApiPath<String>,
) -> Result<Json<AttackerDetail>, ApiError> {
    let ip = params::ip("ip", &ip)?;
    let host = IpNet::from(ip);
    let summary = sqlx::query_as::<_, AttackerRow>(&format!("{} where o.address = $1", select()))
        .bind(host)
        .fetch_optional(&state.pool)
        .await?
        .map(Attacker::from)
        .map(|mut a| {
            a.country = country(&state.geo, a.ip, a.asn.as_ref());
            a
        });
    let hosts = sqlx::query_as::<_, HostEvidence>(
        "select h.agent_id, coalesce(a.name, '') as agent, coalesce(a.hostname, '') as hostname, h.kind, h.events, \
                h.first_seen, h.last_seen, h.sample_raw \
         from offender_hosts h left join agents a on a.id = h.agent_id \
         where h.address = $1 order by h.events desc, a.name, h.kind",
    )
    .bind(host)
    .fetch_all(&state.pool)
    .await?;
    let mut timeline: Vec<TimelineEvent> = Vec::new();
    for slice in eventlog::slices(eventlog::latest_possible(), None) {
        timeline.extend(
            sqlx::query_as::<_, TimelineEvent>(
                "select e.time, coalesce(a.name, '') as agent, e.kind, coalesce(e.service, 'smtp') as service, e.raw \
                 from events e left join agents a on a.id = e.agent_id \
                 where e.remote = $1 and e.time >= $2 and e.time < $3 order by e.time desc, e.id desc limit $4",
            )
            .bind(host)
            .bind(slice.from.unwrap_or(OffsetDateTime::UNIX_EPOCH))
            .bind(slice.to_exclusive())
            .bind(TIMELINE_LIMIT - timeline.len() as i64)
            .fetch_all(&state.pool)
            .await?,
        );
        if timeline.len() as i64 >= TIMELINE_LIMIT {
            break;
        }
    }
    let blocks = sqlx::query_as::<_, BlockRef>(
        "select b.id, b.cidr, b.reason, b.source, b.created_at, b.expires_at, \
           exists(select 1 from live_blocks l where l.id = b.id) as active, b.created_by, b.evidence \
         from blocks b where b.cidr >>= $1 order by b.id desc limit 50",
    )
    .bind(host)
    .fetch_all(&state.pool)
    .await?;
    let blocks: Vec<BlockRef> = blocks
        .into_iter()
        .map(|b| BlockRef { why: super::explain::why(&b.source, &b.reason, b.created_by.as_deref(), &b.evidence), ..b })
        .collect();
    if summary.is_none() && timeline.is_empty() && blocks.is_empty() {
        return Err(ApiError::not_found(format!("nothing is known about {ip}")));
    }
    let asn = asn::lookup(&state.pool, ip).await?;
    let country = country(&state.geo, ip, asn.as_ref());
    Ok(Json(AttackerDetail { summary, asn, country, hosts, timeline, blocks }))
}
