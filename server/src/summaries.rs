//! Context summaries: what agents with `[aggregate]` on send instead of one
//! event per context line (see `fleetban_agent::aggregate`), validated and
//! stored by ingest in the batch's transaction, and read wherever context
//! is read (good standing, the slot series, the alert monitor, reports,
//! stats, the replay).
//!
//! A summary covers one remote address and service within one interval
//! aligned to the epoch: per-kind line counts (only kinds for which
//! [`EventKind::is_summarised`] holds), first and last line, the highest
//! connection count, the verified host name and a few sample lines.
//! Stored as one `context_summaries` row, partitioned by day like `events`.
//!
//! Invariants:
//! - A summary is validated like an event: a bad address, an interval that
//!   is not aligned or not a valid length, times outside the interval or
//!   outside the accepted age, a kind that is not summarised, a count of
//!   zero or too large, an over-long name or sample: the summary is
//!   rejected and counted under the same reasons as events
//!   ([`EventError::reason`]), never stored, never a panic.
//! - Rows are written by the same transaction as the batch's events and its
//!   `agent_batches` row, so a resent batch stores its summaries once.
//! - Several rows may cover one (agent, address, service, interval);
//!   readers add them up.

use std::net::IpAddr;
use std::time::Duration;

use fleetban_proto::v1::{ContextSummary, EventKind, Service};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ingest::{EventError, MAX_FUTURE, MAX_NAME_BYTES, MAX_RAW_BYTES};
use crate::pgcopy::CopyBuf;

/// Most summaries in one batch.
pub const MAX_BATCH_SUMMARIES: usize = 10_000;
/// Most sample lines kept per summary.
pub const MAX_SAMPLES: usize = 100;

/// One validated summary, ready for its columns.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// Position in the batch's `summaries`.
    pub index: i32,
    /// Start of the interval.
    pub interval_start: OffsetDateTime,
    /// Length of the interval, seconds.
    pub interval_secs: i32,
    /// The remote address.
    pub remote: IpAddr,
    /// The service.
    pub service: Service,
    /// First and last line.
    pub first_seen: OffsetDateTime,
    /// Last line.
    pub last_seen: OffsetDateTime,
    /// Lines per kind, in kind order, each kind once.
    pub counts: Vec<(EventKind, i32, OffsetDateTime)>,
    /// Highest connection count; `None` = none logged.
    pub max_connection_count: Option<i32>,
    /// Verified reverse-DNS name (lower case).
    pub host_name: Option<String>,
    /// Sample lines.
    pub samples: Vec<String>,
}

impl SummaryRow {
    /// Lines of every kind.
    pub fn lines(&self) -> i32 {
        self.counts.iter().map(|(_, n, _)| *n).fold(0i32, i32::saturating_add)
    }

    /// Lines of `kind`.
    pub fn count(&self, kind: EventKind) -> i32 {
        self.counts.iter().filter(|(k, _, _)| *k == kind).map(|(_, n, _)| *n).sum()
    }

    /// Lines that earn good standing (accepted mail, logins) and the time of
    /// the last of them.
    pub fn standing(&self) -> (i32, Option<OffsetDateTime>) {
        let earning = self.counts.iter().filter(|(k, _, _)| k.earns_standing());
        earning.fold((0, None), |(n, last), (_, lines, at)| {
            (n + lines, Some(last.map_or(*at, |l: OffsetDateTime| l.max(*at))))
        })
    }
}

fn time_of(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

/// Whether `secs` is an interval length agents may use: a divisor of 60 or
/// a multiple of 60 that divides 3600.
pub fn valid_interval(secs: u32) -> bool {
    EventKind::summary_interval_is_valid(secs)
}

/// Validates one summary against `now`; summaries whose interval started
/// more than `max_age` ago are rejected like old events.
pub fn validate(
    index: usize,
    summary: ContextSummary,
    now: OffsetDateTime,
    max_age: Duration,
) -> Result<SummaryRow, EventError> {
    let remote = summary.remote.as_ref().and_then(|a| IpAddr::try_from(a).ok()).ok_or(EventError::Remote)?;
    if !valid_interval(summary.interval_secs) {
        return Err(EventError::Number("interval_secs"));
    }
    let interval_ms = i64::from(summary.interval_secs) * 1000;
    if summary.interval_start_ms.rem_euclid(interval_ms) != 0 {
        return Err(EventError::Number("interval_start_ms"));
    }
    let too_old = EventError::TooOld { max_age_days: max_age.as_secs() / 86_400 };
    let start = time_of(summary.interval_start_ms).ok_or(if summary.interval_start_ms < 0 {
        too_old.clone()
    } else {
        EventError::InFuture
    })?;
    let end_ms = summary.interval_start_ms.checked_add(interval_ms).ok_or(EventError::InFuture)?;
    let within = |ms: i64| ms >= summary.interval_start_ms && ms < end_ms;
    if !within(summary.first_seen_ms) || !within(summary.last_seen_ms) || summary.first_seen_ms > summary.last_seen_ms {
        return Err(EventError::Number("first_seen_ms"));
    }
    let first_seen = time_of(summary.first_seen_ms).ok_or(EventError::Number("first_seen_ms"))?;
    let last_seen = time_of(summary.last_seen_ms).ok_or(EventError::Number("last_seen_ms"))?;
    if last_seen > now + MAX_FUTURE {
        return Err(EventError::InFuture);
    }
    if start < now - max_age {
        return Err(too_old);
    }
    if summary.counts.is_empty() || summary.counts.len() > EventKind::ALL.len() {
        return Err(EventError::Number("counts"));
    }
    let mut counts: Vec<(EventKind, i32, OffsetDateTime)> = Vec::with_capacity(summary.counts.len());
    let mut total: i64 = 0;
    for count in &summary.counts {
        let kind = EventKind::try_from(count.kind).map_err(|_| EventError::Kind(count.kind))?;
        if !kind.is_summarised() {
            return Err(EventError::Kind(count.kind));
        }
        let lines = i32::try_from(count.lines).ok().filter(|n| *n > 0).ok_or(EventError::Number("lines"))?;
        total += i64::from(lines);
        if !within(count.last_seen_ms) {
            return Err(EventError::Number("last_seen_ms"));
        }
        let at = time_of(count.last_seen_ms).ok_or(EventError::Number("last_seen_ms"))?;
        match counts.iter_mut().find(|(k, _, _)| *k == kind) {
            Some(existing) => {
                existing.1 = existing.1.checked_add(lines).ok_or(EventError::Number("lines"))?;
                existing.2 = existing.2.max(at);
            }
            None => counts.push((kind, lines, at)),
        }
    }
    if total > i64::from(i32::MAX) {
        return Err(EventError::Number("lines"));
    }
    counts.sort_unstable_by_key(|(k, _, _)| *k as i32);
    let max_connection_count = match summary.max_connection_count {
        0 => None,
        n => Some(i32::try_from(n).map_err(|_| EventError::Number("max_connection_count"))?),
    };
    let host_name = match summary.host_name.as_str() {
        "" => None,
        name if name.len() > MAX_NAME_BYTES || name.contains('\0') => return Err(EventError::Text("host_name")),
        name => Some(name.to_ascii_lowercase()),
    };
    if summary.samples.len() > MAX_SAMPLES
        || summary.samples.iter().any(|s| s.len() > MAX_RAW_BYTES || s.contains('\0'))
    {
        return Err(EventError::Text("samples"));
    }
    Ok(SummaryRow {
        // MAX_BATCH_SUMMARIES is checked before any summary is validated.
        index: index as i32,
        interval_start: start,
        interval_secs: summary.interval_secs as i32,
        remote,
        service: Service::from_wire(summary.service),
        first_seen,
        last_seen,
        counts,
        max_connection_count,
        host_name,
        samples: summary.samples,
    })
}

/// The `COPY` statement of a batch's summaries; [`copy_summaries`] writes
/// its fields in this order.
pub const COPY_SUMMARIES: &str = "copy context_summaries (agent_id, batch_seq, batch_index, interval_start, \
     interval_secs, remote, service, first_seen, last_seen, lines, connects, refused_full, standing, last_standing, \
     max_connection_count, kinds, counts, host_name, samples) from stdin with (format binary)";

/// The binary `COPY` stream of `rows`; `None` when there are none.
pub fn copy_summaries(agent_id: Uuid, seq: i64, rows: &[SummaryRow]) -> Option<Vec<u8>> {
    if rows.is_empty() {
        return None;
    }
    let bytes: usize = rows.iter().map(|r| 256 + r.samples.iter().map(String::len).sum::<usize>()).sum();
    let mut c = CopyBuf::with_capacity(bytes);
    for r in rows {
        let (standing, last_standing) = r.standing();
        let kinds: Vec<&str> = r.counts.iter().map(|(k, _, _)| k.as_str()).collect();
        let counts: Vec<i32> = r.counts.iter().map(|(_, n, _)| *n).collect();
        let samples: Vec<&str> = r.samples.iter().map(String::as_str).collect();
        c.row(19);
        c.uuid(agent_id);
        c.i64(seq);
        c.i32(r.index);
        c.timestamptz(r.interval_start);
        c.i32(r.interval_secs);
        c.inet(r.remote);
        c.opt_text((r.service != Service::Smtp).then(|| r.service.as_str()));
        c.timestamptz(r.first_seen);
        c.timestamptz(r.last_seen);
        c.i32(r.lines());
        c.i32(r.count(EventKind::Connect));
        c.i32(r.count(EventKind::RefusedTooMany));
        c.i32(standing);
        match last_standing {
            Some(t) => c.timestamptz(t),
            None => c.null(),
        }
        c.opt_i32(r.max_connection_count);
        c.text_array(&kinds);
        c.i32_array(&counts);
        c.opt_text(r.host_name.as_deref());
        if samples.is_empty() {
            c.null();
        } else {
            c.text_array(&samples);
        }
    }
    Some(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetban_proto::v1::KindCount;

    const DAY: Duration = Duration::from_secs(30 * 86_400);

    fn now_minute_ms() -> i64 {
        (OffsetDateTime::now_utc().unix_timestamp() / 60) * 60_000
    }

    fn summary() -> ContextSummary {
        let start = now_minute_ms() - 60_000;
        ContextSummary {
            remote: Some("198.51.100.7".parse::<IpAddr>().unwrap().into()),
            service: 0,
            interval_start_ms: start,
            interval_secs: 60,
            counts: vec![
                KindCount { kind: EventKind::Connect as i32, lines: 4, last_seen_ms: start + 50_000 },
                KindCount { kind: EventKind::Accepted as i32, lines: 2, last_seen_ms: start + 40_000 },
            ],
            first_seen_ms: start + 1_000,
            last_seen_ms: start + 50_000,
            max_connection_count: 12,
            host_name: "Relay.Example.NET".into(),
            samples: vec!["a line".into()],
        }
    }

    async fn agent(pool: &sqlx::PgPool) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, 'a', 'a', '\\x00')")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        id
    }

    /// Stored with the batch, once however often it is resent; invalid
    /// summaries are counted with the batch's rejections; standing and the
    /// slot series take their counts.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn summaries_are_stored_once_and_invalid_ones_counted(pool: sqlx::PgPool) {
        use fleetban_proto::v1::{Event, EventBatch};
        let ingest = crate::ingest::Ingest::new(pool.clone());
        let a = agent(&pool).await;
        let ok = summary();
        let start = ok.interval_start_ms;
        let refusals = ContextSummary {
            remote: Some("203.0.113.5".parse::<IpAddr>().unwrap().into()),
            counts: vec![KindCount { kind: EventKind::RefusedTooMany as i32, lines: 3, last_seen_ms: start + 2_000 }],
            host_name: String::new(),
            samples: vec![],
            max_connection_count: 0,
            ..ok.clone()
        };
        let bad = ContextSummary { interval_start_ms: start + 5, ..ok.clone() };
        let abuse = Event {
            time_ms: start + 3_000,
            kind: EventKind::AuthFailed as i32,
            remote: Some("192.0.2.7".parse::<IpAddr>().unwrap().into()),
            ..Event::default()
        };
        let batch = EventBatch { seq: 1, events: vec![abuse], position: None, summaries: vec![ok, bad, refusals] };
        let first = ingest.store(a, batch.clone()).await.unwrap();
        assert_eq!((first.stored, first.summaries, first.rejected, first.duplicate), (1, 2, 1, false));
        assert_eq!(
            first.rejections.iter().map(|r| (r.reason, r.events)).collect::<Vec<_>>(),
            [("number_out_of_range", 1)]
        );
        let again = ingest.store(a, batch).await.unwrap();
        assert!(again.duplicate && again.summaries == 0);

        type Stored = (String, i32, i32, i32, i32, Vec<String>, Vec<i32>, Option<String>, Option<Vec<String>>);
        let rows: Vec<Stored> = sqlx::query_as(
            "select host(remote), lines, connects, refused_full, standing, kinds, counts, host_name, samples \
                 from context_summaries order by remote",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2, "stored once: {rows:?}");
        let relay = &rows[0];
        assert_eq!(relay.0, "198.51.100.7");
        assert_eq!((relay.1, relay.2, relay.3, relay.4), (6, 4, 0, 2));
        assert_eq!(relay.5, ["connect", "accepted"]);
        assert_eq!(relay.6, [4, 2]);
        assert_eq!(relay.7.as_deref(), Some("relay.example.net"));
        assert_eq!(relay.8.as_deref(), Some(&["a line".to_owned()][..]));
        assert_eq!((rows[1].3, rows[1].8.is_none()), (3, true));
        let rejected: i32 = sqlx::query_scalar("select rejected from agent_batches where agent_id = $1")
            .bind(a)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rejected, 1);

        // Good standing as the two accepted lines would give it.
        let (accepted, last, name): (i64, OffsetDateTime, Option<String>) = sqlx::query_as(
            "select accepted, last_accepted, host_name from sender_standing where address = '198.51.100.7'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((accepted, name.as_deref()), (2, Some("relay.example.net")));
        assert_eq!(last, time_of(start + 40_000).unwrap());
        // The slot series: the highest count and the refusals of the minute.
        let slots: (i32, i32) =
            sqlx::query_as("select max_connections, refused_full from slot_minutes where agent_id = $1")
                .bind(a)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(slots, (12, 3));
    }

    /// `fleetban-server replay` from the store sees the standing a summary
    /// carries: an accepted line at the last accepted mail, with the name.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn the_replay_reads_standing_from_summaries(pool: sqlx::PgPool) {
        use fleetban_proto::v1::EventBatch;
        let a = agent(&pool).await;
        let ok = summary();
        let accepted_at = ok.interval_start_ms + 40_000;
        let nameless = ContextSummary {
            remote: Some("203.0.113.5".parse::<IpAddr>().unwrap().into()),
            host_name: String::new(),
            counts: vec![KindCount { kind: EventKind::Connect as i32, lines: 1, last_seen_ms: ok.last_seen_ms }],
            ..ok.clone()
        };
        let batch = EventBatch { seq: 1, events: vec![], position: None, summaries: vec![ok, nameless] };
        crate::ingest::Ingest::new(pool.clone()).store(a, batch).await.unwrap();
        let hosts = crate::replay::load_db(&pool, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(hosts.len(), 1);
        let events = &hosts[0].events;
        assert_eq!(events.len(), 1, "only the summary with standing or a name: {events:?}");
        assert_eq!(events[0].kind, EventKind::Accepted as i32);
        assert_eq!(events[0].time_ms, accepted_at);
        assert_eq!(events[0].host_name, "relay.example.net");
    }

    #[test]
    fn a_valid_summary_becomes_a_row() {
        let row = validate(3, summary(), OffsetDateTime::now_utc(), DAY).unwrap();
        assert_eq!((row.index, row.lines(), row.count(EventKind::Connect)), (3, 6, 4));
        assert_eq!(row.standing().0, 2);
        assert_eq!(row.host_name.as_deref(), Some("relay.example.net"));
        assert_eq!(row.max_connection_count, Some(12));
    }

    #[test]
    fn invalid_summaries_are_named() {
        let now = OffsetDateTime::now_utc();
        let ok = summary();
        let start = ok.interval_start_ms;
        let with_count = |kind: EventKind, lines: u32, last: i64| ContextSummary {
            counts: vec![KindCount { kind: kind as i32, lines, last_seen_ms: last }],
            ..ok.clone()
        };
        let cases: Vec<(ContextSummary, EventError)> = vec![
            (ContextSummary { remote: None, ..ok.clone() }, EventError::Remote),
            (ContextSummary { interval_secs: 0, ..ok.clone() }, EventError::Number("interval_secs")),
            (ContextSummary { interval_secs: 45, ..ok.clone() }, EventError::Number("interval_secs")),
            (ContextSummary { interval_start_ms: start + 1, ..ok.clone() }, EventError::Number("interval_start_ms")),
            (ContextSummary { first_seen_ms: start - 1, ..ok.clone() }, EventError::Number("first_seen_ms")),
            (ContextSummary { last_seen_ms: start + 60_000, ..ok.clone() }, EventError::Number("first_seen_ms")),
            (with_count(EventKind::AuthFailed, 1, start + 1_000), EventError::Kind(EventKind::AuthFailed as i32)),
            (with_count(EventKind::Connect, 0, start + 1_000), EventError::Number("lines")),
            (with_count(EventKind::Connect, u32::MAX, start + 1_000), EventError::Number("lines")),
            (with_count(EventKind::Connect, 1, start + 70_000), EventError::Number("last_seen_ms")),
            (ContextSummary { counts: vec![], ..ok.clone() }, EventError::Number("counts")),
            (
                ContextSummary { max_connection_count: u32::MAX, ..ok.clone() },
                EventError::Number("max_connection_count"),
            ),
            (ContextSummary { host_name: "a\0b".into(), ..ok.clone() }, EventError::Text("host_name")),
            (
                ContextSummary { samples: vec!["x".repeat(MAX_RAW_BYTES + 1)], ..ok.clone() },
                EventError::Text("samples"),
            ),
            (
                ContextSummary { samples: vec![String::new(); MAX_SAMPLES + 1], ..ok.clone() },
                EventError::Text("samples"),
            ),
            (
                ContextSummary {
                    interval_start_ms: start - 40 * 86_400_000,
                    first_seen_ms: start - 40 * 86_400_000,
                    last_seen_ms: start - 40 * 86_400_000,
                    counts: vec![KindCount {
                        kind: EventKind::Connect as i32,
                        lines: 1,
                        last_seen_ms: start - 40 * 86_400_000,
                    }],
                    ..ok.clone()
                },
                EventError::TooOld { max_age_days: 30 },
            ),
            (
                ContextSummary {
                    interval_start_ms: start + 3_600_000,
                    first_seen_ms: start + 3_600_000,
                    last_seen_ms: start + 3_600_000,
                    counts: vec![KindCount {
                        kind: EventKind::Connect as i32,
                        lines: 1,
                        last_seen_ms: start + 3_600_000,
                    }],
                    ..ok.clone()
                },
                EventError::InFuture,
            ),
            (
                ContextSummary {
                    interval_start_ms: i64::MAX - i64::MAX % 60_000,
                    first_seen_ms: i64::MAX - 1,
                    last_seen_ms: i64::MAX - 1,
                    ..ok.clone()
                },
                EventError::InFuture,
            ),
            (
                ContextSummary {
                    interval_start_ms: i64::MIN + (60_000 - i64::MIN.rem_euclid(60_000)),
                    first_seen_ms: i64::MIN + (60_000 - i64::MIN.rem_euclid(60_000)),
                    last_seen_ms: i64::MIN + (60_000 - i64::MIN.rem_euclid(60_000)),
                    ..ok.clone()
                },
                EventError::TooOld { max_age_days: 30 },
            ),
        ];
        for (summary, expected) in cases {
            assert_eq!(validate(0, summary.clone(), now, DAY), Err(expected), "{summary:?}");
        }
    }
}
