//! Context aggregated at the agent decides and draws exactly as single
//! events do: the same traffic goes through the real ingest once as one
//! event per line and once through the agent's `Aggregator` (abuse lines
//! single, context as summaries), and good standing, the decisions and the
//! dashboard's series come out the same.

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use fleetban_agent::aggregate::{AggregateConfig, Aggregator};
use fleetban_proto::v1::{ContextSummary, Event, EventBatch, EventKind};
use fleetban_server::correlate::{CorrelateConfig, Correlator};
use fleetban_server::ingest::Ingest;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

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

/// The start of the minute ten minutes ago, unix ms.
fn base_ms() -> i64 {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    (now / 60 - 10) * 60_000
}

/// Stores `events` and `summaries` as batches of at most 5,000 each.
async fn store(pool: &PgPool, agent: Uuid, events: Vec<Event>, summaries: Vec<ContextSummary>) {
    let ingest = Ingest::new(pool.clone());
    let mut seq: i64 = sqlx::query_scalar("select coalesce(max(seq), 0) from agent_batches where agent_id = $1")
        .bind(agent)
        .fetch_one(pool)
        .await
        .unwrap();
    let mut events = events.into_iter().peekable();
    let mut summaries = summaries.into_iter().peekable();
    while events.peek().is_some() || summaries.peek().is_some() {
        seq += 1;
        let batch = EventBatch {
            seq: seq as u64,
            events: events.by_ref().take(5_000).collect(),
            summaries: summaries.by_ref().take(5_000).collect(),
            position: None,
        };
        let outcome = ingest.store(agent, batch).await.unwrap();
        assert_eq!(outcome.rejected, 0, "{outcome:?}");
    }
}

/// What an agent with `[aggregate]` of `interval_secs` sends for `events`.
fn aggregated(events: Vec<Event>, interval_secs: u32) -> (Vec<Event>, Vec<ContextSummary>) {
    let config = AggregateConfig { interval_secs, ..AggregateConfig::default() };
    let (individual, summaries) = Aggregator::new(&config, Arc::default()).split(events);
    assert!(individual.iter().all(|e| {
        let kind = EventKind::try_from(e.kind).unwrap();
        kind.is_abuse() || kind.earns_standing()
    }));
    assert!(!summaries.is_empty());
    (individual, summaries)
}

fn line(kind: EventKind, remote: &str, time_ms: i64) -> Event {
    Event {
        time_ms,
        kind: kind as i32,
        remote: Some(ip(remote).into()),
        remote_port: 40_000 + (time_ms % 20_000) as u32,
        local_port: 25,
        raw: format!("{time_ms} {} [{remote}]", kind.as_str()),
        ..Event::default()
    }
}

/// The busy outbound relay of a large mail provider, the legitimate traffic
/// that looks most like an attack: hundreds of connections a few minutes,
/// dozens open at once, every message accepted, and now and then a burst
/// of failures (a customer's stale AUTH credentials, a newsletter to
/// addresses that no longer exist).
fn relay(remote: &str, base: i64) -> Vec<Event> {
    let mut out = Vec::new();
    for i in 0..400i64 {
        let t = base + i * 700;
        out.push(Event { connection_count: 20 + (i % 37) as u32, ..line(EventKind::Connect, remote, t) });
        out.push(Event {
            host_name: "outbound-7.mail.example.org".into(),
            ..line(EventKind::Accepted, remote, t + 150)
        });
        out.push(line(EventKind::Closed, remote, t + 300));
    }
    out.extend(failures(remote, base + 400 * 700));
    out
}

/// 12 AUTH failures (the auth rule blocks 10 on one host) and 25 unknown
/// recipients (the dictionary rule blocks 20).
fn failures(remote: &str, from: i64) -> Vec<Event> {
    let auth = (0..12).map(|i| Event {
        auth_user: format!("user{i}@example.net"),
        ..line(EventKind::AuthFailed, remote, from + i * 100)
    });
    let rcpt = (0..25).map(|i| line(EventKind::RcptRejected, remote, from + 2_000 + i * 100));
    auth.chain(rcpt).collect()
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_big_sender_whose_mail_arrives_only_in_summaries_keeps_its_good_standing(pool: PgPool) {
    let c = Correlator::new(pool.clone(), CorrelateConfig::default());
    let (mx1, mx2, mx3) = (agent(&pool, "mx1").await, agent(&pool, "mx2").await, agent(&pool, "mx3").await);
    let base = base_ms();
    let (single, summarised, unknown) = ("198.51.100.77", "198.51.100.78", "198.51.100.99");

    store(&pool, mx1, relay(single, base), vec![]).await;
    let (events, summaries) = aggregated(relay(summarised, base), 60);
    // The agent sends the single events as they come and the summaries
    // once their interval has ended, so the failures are judged before
    // the summaries arrive: only the first accepted line of each interval
    // is there by then.
    let accepted_alone = events.iter().filter(|e| e.kind == EventKind::Accepted as i32).count();
    assert!((1..=6).contains(&accepted_alone), "{accepted_alone} accepted lines sent alone of 400");
    store(&pool, mx2, events, vec![]).await;
    assert!(c.on_batch(mx2, &[ip(summarised)]).await.unwrap().is_empty(), "summaries pending: not blocked");
    store(&pool, mx2, vec![], summaries).await;
    // The same failures from an address without mail: blocked, so the
    // failures alone are enough to block and the standing is what saves
    // the relay.
    store(&pool, mx3, failures(unknown, base + 400 * 700), vec![]).await;

    // Good standing as the single lines give it.
    let standing = |address: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, OffsetDateTime, Option<String>)>(
                "select accepted, last_accepted, host_name from sender_standing where address = $1",
            )
            .bind(ip(address))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (from_events, from_summaries) = (standing(single).await, standing(summarised).await);
    assert_eq!(from_events.0, 400);
    assert_eq!(from_summaries, from_events);

    // The decisions: neither relay is blocked, the unknown address is.
    assert!(c.on_batch(mx1, &[ip(single)]).await.unwrap().is_empty(), "single events: not blocked");
    assert!(c.on_batch(mx2, &[ip(summarised)]).await.unwrap().is_empty(), "summaries: not blocked");
    let made = c.on_batch(mx3, &[ip(unknown)]).await.unwrap();
    assert_eq!(made.len(), 1, "the same failures block an address without standing");
}

/// A flood on a host: connects with rising counts, a full host refusing
/// everyone, abuse, over four minutes.
fn flood(base: i64) -> Vec<Event> {
    let mut out = Vec::new();
    for i in 0..600i64 {
        let t = base + i * 400;
        let remote = format!("203.0.113.{}", 1 + i % 50);
        out.push(Event { connection_count: (i % 100) as u32 + 1, ..line(EventKind::Connect, &remote, t) });
        if i % 3 == 0 {
            out.push(line(EventKind::RefusedTooMany, &format!("192.0.2.{}", 1 + i % 20), t + 100));
        }
        if i % 5 == 0 {
            out.push(line(EventKind::AuthFailed, &remote, t + 200));
        }
        if i % 7 == 0 {
            out.push(line(EventKind::Lost, &remote, t + 300));
        }
    }
    out
}

async fn series(pool: &PgPool, agent: Uuid) -> Vec<String> {
    let slots: Vec<(OffsetDateTime, i32, i32)> = sqlx::query_as(
        "select minute, max_connections, refused_full from slot_minutes where agent_id = $1 order by minute",
    )
    .bind(agent)
    .fetch_all(pool)
    .await
    .unwrap();
    let hours: Vec<(OffsetDateTime, i32, i32)> =
        sqlx::query_as("select hour, max_connections, refused_full from slot_hours where agent_id = $1 order by hour")
            .bind(agent)
            .fetch_all(pool)
            .await
            .unwrap();
    let abuse: Vec<(OffsetDateTime, String, i32)> =
        sqlx::query_as("select minute, kind, events from abuse_minutes where agent_id = $1 order by minute, kind")
            .bind(agent)
            .fetch_all(pool)
            .await
            .unwrap();
    let mut out: Vec<String> = slots.iter().map(|r| format!("slot {r:?}")).collect();
    out.extend(hours.iter().map(|r| format!("hour {r:?}")));
    out.extend(abuse.iter().map(|r| format!("abuse {r:?}")));
    out
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_dashboard_series_from_summaries_equal_those_from_single_events(pool: PgPool) {
    let base = base_ms() + 17_000;
    let single = agent(&pool, "single").await;
    store(&pool, single, flood(base), vec![]).await;
    let expected = series(&pool, single).await;
    assert!(expected.iter().filter(|r| r.starts_with("slot")).count() >= 4, "{expected:?}");
    assert!(expected.iter().any(|r| r.starts_with("abuse")), "{expected:?}");
    for interval_secs in [60, 10, 1] {
        let host = agent(&pool, &format!("summarised-{interval_secs}")).await;
        let (events, summaries) = aggregated(flood(base), interval_secs);
        store(&pool, host, events, summaries).await;
        assert_eq!(series(&pool, host).await, expected, "interval {interval_secs} s");
    }
    // The rows stored: one per address and minute instead of one per line.
    let (events, summaries): (i64, i64) = sqlx::query_as(
        "select (select count(*) from events where agent_id = $1), \
                (select count(*) from context_summaries where agent_id = $1)",
    )
    .bind(
        sqlx::query_scalar::<_, Uuid>("select id from agents where name = 'summarised-60'")
            .fetch_one(&pool)
            .await
            .unwrap(),
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let lines = flood(base).len() as i64;
    assert!(events + summaries < lines / 2, "{events} events + {summaries} summaries for {lines} lines");
}
