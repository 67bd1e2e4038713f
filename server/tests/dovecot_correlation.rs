//! IMAP/POP3 evidence joins SMTP evidence: an address failing AUTH on SMTP
//! on one host and IMAP on another is one attacker, a Dovecot line counts its
//! attempts, and a successful IMAP login is good standing like accepted mail.
//! Evidence goes in through the real ingest path.

mod common;

use std::net::IpAddr;

use fleetban_proto::v1::{Event, EventBatch, EventKind, Service};
use fleetban_server::correlate::{CorrelateConfig, Correlator};
use fleetban_server::ingest::Ingest;
use sqlx::PgPool;
use uuid::Uuid;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn agent(pool: &PgPool, name: &str) -> Uuid {
    common::agent(pool, name, name, false, &[]).await
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

async fn store(pool: &PgPool, agent: Uuid, events: Vec<Event>) {
    let seq: i64 = sqlx::query_scalar("select coalesce(max(seq), 0) + 1 from agent_batches where agent_id = $1")
        .bind(agent)
        .fetch_one(pool)
        .await
        .unwrap();
    let outcome = Ingest::new(pool.clone())
        .store(agent, EventBatch { seq: seq as u64, events, position: None, summaries: Vec::new() })
        .await
        .unwrap();
    assert_eq!(outcome.rejected, 0);
}

fn event(kind: EventKind, service: Service, addr: &str, attempts: u32, i: usize) -> Event {
    Event {
        time_ms: now_ms() - 10_000 - i as i64,
        kind: kind as i32,
        remote: Some(ip(addr).into()),
        auth_user: "info@example.com".into(),
        service: service as i32,
        attempts,
        raw: format!("line {i} from {addr}"),
        ..Event::default()
    }
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn smtp_auth_on_one_host_and_imap_on_another_are_one_attacker(pool: PgPool) {
    let c = Correlator::new(pool.clone(), CorrelateConfig::default());
    let (mx1, mx2) = (agent(&pool, "mx1").await, agent(&pool, "mx2").await);
    let addr = "203.0.113.9";
    // 8 SMTP AUTH failures on mx1: under every threshold.
    store(&pool, mx1, (0..8).map(|i| event(EventKind::AuthFailed, Service::Smtp, addr, 0, i)).collect()).await;
    assert!(c.on_batch(mx1, &[ip(addr)]).await.unwrap().is_empty());
    // 3 IMAP sessions on mx2 of 3 guesses each: 9, and 17 across the fleet
    // (the auth rule's fleet threshold is 15). Counted as sessions, 11.
    store(&pool, mx2, (0..3).map(|i| event(EventKind::AuthFailed, Service::Imap, addr, 3, i)).collect()).await;
    let made = c.on_batch(mx2, &[ip(addr)]).await.unwrap();
    assert_eq!(made.len(), 1, "one attacker across SMTP and IMAP");
    let ev = &made[0].evidence;
    assert_eq!(ev["scenario"], "auth", "{ev}");
    assert_eq!(ev["agents"].as_array().unwrap().len(), 2, "{ev}");
    assert!(ev["verdict"].as_str().unwrap().contains("17 weighted events across the fleet"), "{ev}");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn an_imap_login_is_good_standing(pool: PgPool) {
    let c = Correlator::new(pool.clone(), CorrelateConfig::default());
    let (mx1, mx2) = (agent(&pool, "mx1").await, agent(&pool, "mx2").await);
    // 12 SMTP AUTH failures on one host block an unknown address ...
    store(&pool, mx1, (0..12).map(|i| event(EventKind::AuthFailed, Service::Smtp, "198.51.100.40", 0, i)).collect())
        .await;
    assert_eq!(c.on_batch(mx1, &[ip("198.51.100.40")]).await.unwrap().len(), 1);
    // ... not one that logged in over IMAP (an office NAT after a typo).
    store(&pool, mx2, vec![event(EventKind::Login, Service::Imap, "198.51.100.41", 0, 0)]).await;
    store(&pool, mx1, (0..12).map(|i| event(EventKind::AuthFailed, Service::Pop3, "198.51.100.41", 0, i)).collect())
        .await;
    assert!(c.on_batch(mx1, &[ip("198.51.100.41")]).await.unwrap().is_empty());
}
