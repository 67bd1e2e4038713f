//! Time series of what happened, for the dashboard's "overnight" view:
//! abuse events by kind and by host (`abuse_minutes`, `abuse_hours`), slot
//! usage per host (`slot_minutes`, `slot_hours`: the highest `TCP/IP
//! connection count` and the refusals of a full host), and blocks made,
//! expired and revoked (counted from `blocks` itself).
//!
//! Ingest maintains the four tables inside each batch's transaction
//! ([`BatchSeries`]): a resent batch writes nothing twice, so the series are
//! exactly-once like the events they count. A batch adds at most a row per
//! (minute, kind) and (hour, kind) it covers, all in one statement, so the
//! cost on the ingest path is one round trip bounded by the minutes a batch
//! spans, not by its events. Every row belongs to one agent, so agents never
//! wait on each other's rows. The short ranges read minutes, the long ones
//! hours; the retention sweep keeps minutes [`MINUTE_RETENTION_DAYS`] and
//! hours [`HOUR_RETENTION_DAYS`].
//!
//! Reads ([`abuse`], [`blocks`], [`slots`]) bucket a [`Range`] into a fixed
//! number of steps; every series has one value per bucket, zeros included.

use std::collections::BTreeMap;

use fleetban_proto::v1::EventKind;
use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

/// How long the per-minute tables keep rows, days: longer than the longest
/// range read per minute (24 h).
pub const MINUTE_RETENTION_DAYS: i32 = 2;

/// How long the per-hour tables keep rows, days: longer than the longest
/// [`Range`] (30 d), whatever the events' retention is.
pub const HOUR_RETENTION_DAYS: i32 = 31;

/// `t` truncated to its minute.
fn minute(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).and_then(|t| t.replace_second(0)).unwrap_or(t)
}

/// `t` truncated to its hour.
fn hour(t: OffsetDateTime) -> OffsetDateTime {
    minute(t).replace_minute(0).unwrap_or(t)
}

/// What one batch adds to the series, per minute.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchSeries {
    /// Abuse events per (minute, kind).
    abuse: BTreeMap<(OffsetDateTime, &'static str), i32>,
    /// Per minute: the highest connection count, and refusals of a full host.
    slots: BTreeMap<OffsetDateTime, (i32, i32)>,
}

impl BatchSeries {
    /// Counts one event.
    pub fn add(&mut self, kind: EventKind, time: OffsetDateTime, connection_count: Option<i32>) {
        let m = minute(time);
        if kind.is_abuse() {
            *self.abuse.entry((m, kind.as_str())).or_default() += 1;
        }
        match kind {
            EventKind::Connect => {
                if let Some(count) = connection_count {
                    let slot = self.slots.entry(m).or_default();
                    slot.0 = slot.0.max(count);
                }
            }
            EventKind::RefusedTooMany => self.slots.entry(m).or_default().1 += 1,
            _ => {}
        }
    }

    /// Counts an agent's context summary of the interval starting at
    /// `start`: its highest connection count and its refusals of a full
    /// host. An interval of at most a minute lies within one minute, so the
    /// series come out as from the single lines; a longer one counts in its
    /// first minute.
    pub fn add_summary(&mut self, start: OffsetDateTime, max_connection_count: Option<i32>, refused_full: i32) {
        let m = minute(start);
        if let Some(count) = max_connection_count {
            let slot = self.slots.entry(m).or_default();
            slot.0 = slot.0.max(count);
        }
        if refused_full > 0 {
            self.slots.entry(m).or_default().1 += refused_full;
        }
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.abuse.is_empty() && self.slots.is_empty()
    }

    /// Adds the rows of the series of several batches (each with its
    /// agent), per minute and per hour, in one statement inside the batch
    /// transaction. Rows of the same key are merged first (a statement may
    /// not update a row twice) and go in key order, so concurrent writers
    /// take row locks in one order.
    pub async fn write_all(series: &[(Uuid, &BatchSeries)], tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        if series.iter().all(|(_, s)| s.is_empty()) {
            return Ok(());
        }
        let mut abuse: BTreeMap<(Uuid, OffsetDateTime, &str), i32> = BTreeMap::new();
        let mut abuse_hours: BTreeMap<(Uuid, OffsetDateTime, &str), i32> = BTreeMap::new();
        let mut slots: BTreeMap<(Uuid, OffsetDateTime), (i32, i32)> = BTreeMap::new();
        let mut slot_hours: BTreeMap<(Uuid, OffsetDateTime), (i32, i32)> = BTreeMap::new();
        for (agent, s) in series {
            for ((minute, kind), count) in &s.abuse {
                *abuse.entry((*agent, *minute, kind)).or_default() += count;
                *abuse_hours.entry((*agent, hour(*minute), kind)).or_default() += count;
            }
            for (minute, (count, refused)) in &s.slots {
                for slot in [
                    slots.entry((*agent, *minute)).or_default(),
                    slot_hours.entry((*agent, hour(*minute))).or_default(),
                ] {
                    slot.0 = slot.0.max(*count);
                    slot.1 += refused;
                }
            }
        }
        let (mut aa, mut am, mut ak, mut an) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((agent, minute, kind), count) in abuse {
            aa.push(agent);
            am.push(minute);
            ak.push(kind);
            an.push(count);
        }
        let (mut aha, mut ah, mut ahk, mut ahn) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((agent, h, kind), count) in abuse_hours {
            aha.push(agent);
            ah.push(h);
            ahk.push(kind);
            ahn.push(count);
        }
        let (mut sa, mut sm, mut sc, mut sr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((agent, minute), (count, refused)) in slots {
            sa.push(agent);
            sm.push(minute);
            sc.push(count);
            sr.push(refused);
        }
        let (mut sha, mut sh, mut shc, mut shr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((agent, h), (count, refused)) in slot_hours {
            sha.push(agent);
            sh.push(h);
            shc.push(count);
            shr.push(refused);
        }
        sqlx::query(
            "with am as ( \
               insert into abuse_minutes (agent_id, minute, kind, events) \
               select a, m, k, n from unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::int4[]) as t(a, m, k, n) \
               on conflict (agent_id, minute, kind) do update set events = abuse_minutes.events + excluded.events), \
             ah as ( \
               insert into abuse_hours (agent_id, hour, kind, events) \
               select a, h, k, n from unnest($5::uuid[], $6::timestamptz[], $7::text[], $8::int4[]) as t(a, h, k, n) \
               on conflict (agent_id, hour, kind) do update set events = abuse_hours.events + excluded.events), \
             sm as ( \
               insert into slot_minutes (agent_id, minute, max_connections, refused_full) \
               select a, m, c, r from unnest($9::uuid[], $10::timestamptz[], $11::int4[], $12::int4[]) as t(a, m, c, r) \
               on conflict (agent_id, minute) do update set \
               max_connections = greatest(slot_minutes.max_connections, excluded.max_connections), \
               refused_full = slot_minutes.refused_full + excluded.refused_full) \
             insert into slot_hours (agent_id, hour, max_connections, refused_full) \
             select a, h, c, r from unnest($13::uuid[], $14::timestamptz[], $15::int4[], $16::int4[]) as t(a, h, c, r) \
             on conflict (agent_id, hour) do update set \
             max_connections = greatest(slot_hours.max_connections, excluded.max_connections), \
             refused_full = slot_hours.refused_full + excluded.refused_full",
        )
        .bind(&aa)
        .bind(&am)
        .bind(&ak)
        .bind(&an)
        .bind(&aha)
        .bind(&ah)
        .bind(&ahk)
        .bind(&ahn)
        .bind(&sa)
        .bind(&sm)
        .bind(&sc)
        .bind(&sr)
        .bind(&sha)
        .bind(&sh)
        .bind(&shc)
        .bind(&shr)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Deletes minute rows older than [`MINUTE_RETENTION_DAYS`] and hour rows
/// older than [`HOUR_RETENTION_DAYS`]; returns how many.
pub async fn sweep(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut n = 0;
    for (sql, days) in [
        ("delete from abuse_minutes where minute < now() - make_interval(days => $1)", MINUTE_RETENTION_DAYS),
        ("delete from slot_minutes where minute < now() - make_interval(days => $1)", MINUTE_RETENTION_DAYS),
        ("delete from abuse_hours where hour < now() - make_interval(days => $1)", HOUR_RETENTION_DAYS),
        ("delete from slot_hours where hour < now() - make_interval(days => $1)", HOUR_RETENTION_DAYS),
    ] {
        n += sqlx::query(sql).bind(days).execute(pool).await?.rows_affected();
    }
    Ok(n)
}

/// A time range of the series, ending now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// The last hour, per minute.
    Hour,
    /// The last 24 hours, per 10 minutes.
    Day,
    /// The last 7 days, per hour.
    Week,
    /// The last 30 days, per 6 hours.
    Month,
}

impl Range {
    /// Every range.
    pub const ALL: [Range; 4] = [Range::Hour, Range::Day, Range::Week, Range::Month];

    /// `1h`, `24h`, `7d`, `30d`.
    pub fn as_str(self) -> &'static str {
        match self {
            Range::Hour => "1h",
            Range::Day => "24h",
            Range::Week => "7d",
            Range::Month => "30d",
        }
    }

    /// The range named `name`.
    pub fn from_name(name: &str) -> Option<Range> {
        Range::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// One bucket, seconds.
    pub fn step_secs(self) -> i64 {
        match self {
            Range::Hour => 60,
            Range::Day => 600,
            Range::Week => 3_600,
            Range::Month => 6 * 3_600,
        }
    }

    /// Buckets in the range.
    pub fn buckets(self) -> usize {
        match self {
            Range::Hour => 60,
            Range::Day => 144,
            Range::Week => 168,
            Range::Month => 120,
        }
    }

    /// The abuse and slot tables and their time column: minutes for the
    /// short ranges, hours for the long ones.
    fn tables(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Range::Hour | Range::Day => ("abuse_minutes", "slot_minutes", "minute"),
            Range::Week | Range::Month => ("abuse_hours", "slot_hours", "hour"),
        }
    }

    /// The buckets' start times, oldest first, the last one holding `now`.
    fn starts(self, now: OffsetDateTime) -> Vec<OffsetDateTime> {
        let step = self.step_secs();
        let last = now.unix_timestamp().div_euclid(step) * step;
        let n = self.buckets() as i64;
        (0..n).filter_map(|i| OffsetDateTime::from_unix_timestamp(last - (n - 1 - i) * step).ok()).collect()
    }
}

/// Buckets and named series of one range.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Series {
    /// The range (`1h`, `24h`, `7d`, `30d`).
    pub range: String,
    /// One bucket, seconds.
    pub step_secs: i64,
    /// Each bucket's start, oldest first.
    #[schema(value_type = Vec<String>)]
    pub buckets: Vec<String>,
    /// One line per key, biggest total first.
    pub series: Vec<Line>,
}

/// One series: a value per bucket.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Line {
    /// What it counts: an event kind, an agent's name, or `made` /
    /// `expired` / `revoked`.
    pub key: String,
    /// A value per bucket.
    pub values: Vec<i64>,
    /// The sum of the values.
    pub total: i64,
}

/// Slot usage of one host.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HostSlots {
    /// The agent.
    pub agent_id: Uuid,
    /// Its name.
    pub agent: String,
    /// The highest connection count per bucket (0: none reported).
    pub max_connections: Vec<i64>,
    /// Connections refused because every slot was taken, per bucket.
    pub refused_full: Vec<i64>,
    /// The host's slot ceiling (`smtp_accept_max`) if known: the highest
    /// connection count of a host that Exim has had to refuse connections
    /// for being full, within the retained series.
    pub smtp_accept_max: Option<i64>,
}

/// Slot usage of every host that reported connection counts in the range.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Slots {
    /// The range.
    pub range: String,
    /// One bucket, seconds.
    pub step_secs: i64,
    /// Each bucket's start, oldest first.
    #[schema(value_type = Vec<String>)]
    pub buckets: Vec<String>,
    /// One entry per host, busiest first.
    pub hosts: Vec<HostSlots>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Index of the bucket starting at `start`, if within `starts`.
fn index(starts: &[OffsetDateTime], step: i64, start: OffsetDateTime) -> Option<usize> {
    let first = starts.first()?;
    let offset = (start - *first).whole_seconds();
    if offset < 0 || offset % step != 0 {
        return None;
    }
    usize::try_from(offset / step).ok().filter(|&i| i < starts.len())
}

/// Lines from `(bucket, key, value)` rows: a value per bucket, biggest
/// total first, ties by key.
fn lines(starts: &[OffsetDateTime], step: i64, rows: Vec<(OffsetDateTime, String, i64)>) -> Vec<Line> {
    let mut by_key: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (bucket, key, value) in rows {
        if let Some(i) = index(starts, step, bucket) {
            by_key.entry(key).or_insert_with(|| vec![0; starts.len()])[i] += value;
        }
    }
    let mut out: Vec<Line> =
        by_key.into_iter().map(|(key, values)| Line { total: values.iter().sum(), key, values }).collect();
    out.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.key.cmp(&b.key)));
    out
}

/// The SQL bucket of a timestamp expression, with `$1` the step in seconds.
fn bucket(expr: &str) -> String {
    format!("date_bin(make_interval(secs => $1), {expr}, timestamptz '1970-01-01 00:00:00+00')")
}

/// How abuse is split into series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// One series per event kind.
    Kind,
    /// One series per host (agent name).
    Host,
}

/// Abuse events over `range`, per kind or per host.
pub async fn abuse(pool: &PgPool, range: Range, by: By) -> Result<Series, sqlx::Error> {
    abuse_at(pool, range, by, OffsetDateTime::now_utc()).await
}

async fn abuse_at(pool: &PgPool, range: Range, by: By, now: OffsetDateTime) -> Result<Series, sqlx::Error> {
    let starts = range.starts(now);
    let step = range.step_secs();
    let from = starts.first().copied().unwrap_or(now);
    let key = match by {
        By::Kind => "m.kind",
        By::Host => "coalesce(a.name, m.agent_id::text)",
    };
    let (table, _, column) = range.tables();
    let rows: Vec<(OffsetDateTime, String, i64)> = sqlx::query_as(&format!(
        "select {} as b, {key} as k, sum(m.events)::bigint \
         from {table} m left join agents a on a.id = m.agent_id \
         where m.{column} >= $2 group by 1, 2",
        bucket(&format!("m.{column}"))
    ))
    .bind(step as f64)
    .bind(from)
    .fetch_all(pool)
    .await?;
    Ok(Series {
        range: range.as_str().to_owned(),
        step_secs: step,
        buckets: starts.iter().copied().map(rfc3339).collect(),
        series: lines(&starts, step, rows),
    })
}

/// Blocks made, expired and revoked by an operator over `range` (blocks
/// replaced by a wider or renewed block are not counted as ending).
pub async fn blocks(pool: &PgPool, range: Range) -> Result<Series, sqlx::Error> {
    let now = OffsetDateTime::now_utc();
    let starts = range.starts(now);
    let step = range.step_secs();
    let from = starts.first().copied().unwrap_or(now);
    let rows: Vec<(OffsetDateTime, String, i64)> = sqlx::query_as(&format!(
        "select {made} as b, 'made' as k, count(*) from blocks where created_at >= $2 group by 1 \
         union all \
         select {ended} as b, case revoked_cause when 'expired' then 'expired' else 'revoked' end as k, count(*) \
           from blocks where revoked_at >= $2 and revoked_cause in ('expired', 'revoked') group by 1, 2 \
         union all \
         select {due} as b, 'expired' as k, count(*) from blocks \
           where revoked_at is null and expires_at >= $2 and expires_at <= now() group by 1",
        made = bucket("created_at"),
        ended = bucket("revoked_at"),
        due = bucket("expires_at"),
    ))
    .bind(step as f64)
    .bind(from)
    .fetch_all(pool)
    .await?;
    let mut series = lines(&starts, step, rows);
    // Always the three lines, in a fixed order, so a chart's legend is stable.
    let mut fixed = Vec::new();
    for key in ["made", "expired", "revoked"] {
        let line = match series.iter().position(|l| l.key == key) {
            Some(i) => series.swap_remove(i),
            None => Line { key: key.to_owned(), values: vec![0; starts.len()], total: 0 },
        };
        fixed.push(line);
    }
    Ok(Series {
        range: range.as_str().to_owned(),
        step_secs: step,
        buckets: starts.iter().copied().map(rfc3339).collect(),
        series: fixed,
    })
}

/// One host's slot usage in one bucket.
#[derive(sqlx::FromRow)]
struct SlotRow {
    agent_id: Uuid,
    /// The agent's name (its id when it has none).
    agent: String,
    bucket: OffsetDateTime,
    max_connections: i64,
    refused_full: i64,
}

/// Slot usage per host over `range`.
pub async fn slots(pool: &PgPool, range: Range) -> Result<Slots, sqlx::Error> {
    let now = OffsetDateTime::now_utc();
    let starts = range.starts(now);
    let step = range.step_secs();
    let from = starts.first().copied().unwrap_or(now);
    let (_, table, column) = range.tables();
    let rows: Vec<SlotRow> = sqlx::query_as(&format!(
        "select s.agent_id, coalesce(a.name, s.agent_id::text) as agent, {} as bucket, \
                max(s.max_connections)::bigint as max_connections, sum(s.refused_full)::bigint as refused_full \
         from {table} s left join agents a on a.id = s.agent_id \
         where s.{column} >= $2 group by 1, 2, 3",
        bucket(&format!("s.{column}"))
    ))
    .bind(step as f64)
    .bind(from)
    .fetch_all(pool)
    .await?;
    // A host refuses for being full only at its ceiling, and its count
    // never exceeds the ceiling: once it has refused, its highest count is
    // the ceiling.
    let ceilings: Vec<(Uuid, i64)> = sqlx::query_as(
        "select agent_id, max(max_connections)::bigint from slot_hours \
         group by agent_id having sum(refused_full) > 0 and max(max_connections) > 0",
    )
    .fetch_all(pool)
    .await?;
    let ceilings: BTreeMap<Uuid, i64> = ceilings.into_iter().collect();
    let mut hosts: BTreeMap<Uuid, HostSlots> = BTreeMap::new();
    for row in rows {
        let Some(i) = index(&starts, step, row.bucket) else { continue };
        let host = hosts.entry(row.agent_id).or_insert_with(|| HostSlots {
            agent_id: row.agent_id,
            agent: row.agent,
            max_connections: vec![0; starts.len()],
            refused_full: vec![0; starts.len()],
            smtp_accept_max: ceilings.get(&row.agent_id).copied(),
        });
        host.max_connections[i] = host.max_connections[i].max(row.max_connections);
        host.refused_full[i] += row.refused_full;
    }
    let mut hosts: Vec<HostSlots> = hosts.into_values().collect();
    let peak = |h: &HostSlots| h.max_connections.iter().copied().max().unwrap_or(0);
    hosts.sort_by(|a, b| peak(b).cmp(&peak(a)).then_with(|| a.agent.cmp(&b.agent)));
    Ok(Slots {
        range: range.as_str().to_owned(),
        step_secs: step,
        buckets: starts.iter().copied().map(rfc3339).collect(),
        hosts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Ingest;
    use fleetban_proto::v1::{Event, EventBatch};
    use std::net::IpAddr;

    async fn agent(pool: &PgPool, name: &str) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, $2, $2, '\\x00')")
            .bind(id)
            .bind(name)
            .execute(pool)
            .await
            .unwrap();
        id
    }

    fn event(kind: EventKind, remote: &str, ago_secs: i64, count: u32) -> Event {
        let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        Event {
            time_ms: now_ms - ago_secs * 1000,
            kind: kind as i32,
            remote: Some(remote.parse::<IpAddr>().unwrap().into()),
            remote_port: 40000,
            local_port: 25,
            connection_count: count,
            raw: format!("H=({remote}) [{remote}] line"),
            ..Default::default()
        }
    }

    #[test]
    fn ranges_have_their_buckets_and_end_now() {
        let now = OffsetDateTime::from_unix_timestamp(1_790_000_123).unwrap();
        for range in Range::ALL {
            let starts = range.starts(now);
            assert_eq!(starts.len(), range.buckets(), "{range:?}");
            let last = *starts.last().unwrap();
            assert!(last <= now && (now - last).whole_seconds() < range.step_secs(), "{range:?}");
            assert_eq!(Range::from_name(range.as_str()), Some(range));
        }
        assert_eq!(Range::from_name("2h"), None);
        let starts = Range::Hour.starts(now);
        assert_eq!(index(&starts, 60, starts[3]), Some(3));
        assert_eq!(index(&starts, 60, starts[0] - time::Duration::minutes(1)), None);
        assert_eq!(index(&starts, 60, starts[59] + time::Duration::minutes(1)), None);
    }

    /// Abuse is counted per kind and host, context never; a resent batch
    /// counts once; slot usage keeps the per-minute maximum and learns the
    /// ceiling from minutes in which the host was full.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn ingest_fills_the_series_exactly_once(pool: PgPool) {
        let ingest = Ingest::new(pool.clone());
        let (a, b) = (agent(&pool, "mx-a").await, agent(&pool, "mx-b").await);
        let batch = EventBatch {
            seq: 1,
            events: vec![
                event(EventKind::AuthFailed, "192.0.2.7", 5, 0),
                event(EventKind::AuthFailed, "192.0.2.8", 5, 0),
                event(EventKind::RelayDenied, "192.0.2.7", 5, 0),
                event(EventKind::Connect, "198.51.100.1", 5, 37),
                event(EventKind::Connect, "198.51.100.2", 5, 40),
                event(EventKind::RefusedTooMany, "198.51.100.3", 5, 0),
                event(EventKind::Accepted, "198.51.100.1", 5, 0),
            ],
            position: None,
            summaries: Vec::new(),
        };
        ingest.store(a, batch.clone()).await.unwrap();
        ingest.store(a, batch.clone()).await.unwrap();
        ingest
            .store(b, EventBatch { events: vec![event(EventKind::AuthFailed, "192.0.2.7", 5, 0)], ..batch })
            .await
            .unwrap();

        let by_kind = abuse(&pool, Range::Hour, By::Kind).await.unwrap();
        assert_eq!(by_kind.buckets.len(), 60);
        let totals: Vec<(&str, i64)> = by_kind.series.iter().map(|l| (l.key.as_str(), l.total)).collect();
        assert_eq!(totals, [("auth_failed", 3), ("relay_denied", 1)], "context is not abuse; resent once");
        let auth = &by_kind.series[0];
        assert_eq!(auth.values.len(), 60);
        assert_eq!(auth.values.iter().filter(|&&v| v > 0).count(), 1, "{:?}", auth.values);

        let by_host = abuse(&pool, Range::Day, By::Host).await.unwrap();
        let totals: Vec<(&str, i64)> = by_host.series.iter().map(|l| (l.key.as_str(), l.total)).collect();
        assert_eq!(totals, [("mx-a", 3), ("mx-b", 1)]);

        // The long ranges read hours: the batch is there too, and 29 days ago
        // is outside the week but inside the month.
        let week = abuse(&pool, Range::Week, By::Kind).await.unwrap();
        let totals: Vec<(&str, i64)> = week.series.iter().map(|l| (l.key.as_str(), l.total)).collect();
        assert_eq!(totals, [("auth_failed", 3), ("relay_denied", 1)]);
        let old = OffsetDateTime::now_utc() - time::Duration::days(29);
        sqlx::query("insert into abuse_hours (agent_id, hour, kind, events) values ($1, $2, 'rcpt_rejected', 5)")
            .bind(a)
            .bind(hour(old))
            .execute(&pool)
            .await
            .unwrap();
        let week = abuse(&pool, Range::Week, By::Kind).await.unwrap();
        assert!(week.series.iter().all(|l| l.key != "rcpt_rejected"));
        let month = abuse(&pool, Range::Month, By::Kind).await.unwrap();
        assert!(month.series.iter().any(|l| l.key == "rcpt_rejected" && l.total == 5));

        let hour_slots = slots(&pool, Range::Hour).await.unwrap();
        assert_eq!(hour_slots.hosts.len(), 1, "mx-b reported no connection counts");
        let host = &hour_slots.hosts[0];
        assert_eq!(host.agent, "mx-a");
        assert_eq!(host.max_connections.iter().copied().max(), Some(40));
        assert_eq!(host.refused_full.iter().sum::<i64>(), 1, "the resent batch counts once");
        assert_eq!(host.smtp_accept_max, Some(40));
        let month = slots(&pool, Range::Month).await.unwrap();
        assert_eq!(month.hosts[0].max_connections.iter().copied().max(), Some(40));
        assert_eq!(month.hosts[0].refused_full.iter().sum::<i64>(), 1);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn blocks_made_expired_and_revoked_are_counted(pool: PgPool) {
        sqlx::query(
            "insert into blocks (cidr, reason, source, created_at, expires_at, revoked_at, revoked_cause) values \
             ('192.0.2.1/32', 'x', 'manual', now() - interval '30 minutes', now() + interval '1 hour', null, null), \
             ('192.0.2.2/32', 'x', 'manual', now() - interval '20 minutes', now() - interval '5 minutes', null, null), \
             ('192.0.2.3/32', 'x', 'manual', now() - interval '20 minutes', null, now() - interval '2 minutes', 'revoked'), \
             ('192.0.2.4/32', 'x', 'manual', now() - interval '50 minutes', now() - interval '9 minutes', \
                now() - interval '8 minutes', 'expired'), \
             ('192.0.2.5/32', 'x', 'manual', now() - interval '10 days', null, now() - interval '9 days', 'revoked')",
        )
        .execute(&pool)
        .await
        .unwrap();
        let hour = blocks(&pool, Range::Hour).await.unwrap();
        let totals: Vec<(&str, i64)> = hour.series.iter().map(|l| (l.key.as_str(), l.total)).collect();
        assert_eq!(totals, [("made", 4), ("expired", 2), ("revoked", 1)]);
        let month = blocks(&pool, Range::Month).await.unwrap();
        let totals: Vec<(&str, i64)> = month.series.iter().map(|l| (l.key.as_str(), l.total)).collect();
        assert_eq!(totals, [("made", 5), ("expired", 2), ("revoked", 2)]);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn sweep_drops_old_minutes_and_hours_only(pool: PgPool) {
        let a = agent(&pool, "mx-a").await;
        sqlx::query(
            "insert into abuse_minutes (agent_id, minute, kind, events) values \
             ($1, date_trunc('minute', now()), 'auth_failed', 1), \
             ($1, date_trunc('minute', now() - interval '3 days'), 'auth_failed', 1)",
        )
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "insert into abuse_hours (agent_id, hour, kind, events) values \
             ($1, date_trunc('hour', now() - interval '3 days'), 'auth_failed', 1), \
             ($1, date_trunc('hour', now() - interval '40 days'), 'auth_failed', 1)",
        )
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "insert into slot_minutes (agent_id, minute, max_connections) \
             values ($1, date_trunc('minute', now() - interval '3 days'), 9)",
        )
        .bind(a)
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(sweep(&pool).await.unwrap(), 3);
        let left: (i64, i64) =
            sqlx::query_as("select (select count(*) from abuse_minutes), (select count(*) from abuse_hours)")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(left, (1, 1), "the recent minute and the 3-day-old hour stay");
    }
}
