//! Correlation tests: evidence goes in through the real ingest path, and
//! every rule is checked against the legitimate traffic that looks most like
//! its attack.

use super::*;

use std::net::IpAddr;

use fleetban_proto::policy::RuleTable;
use fleetban_proto::v1::{Event, EventBatch};
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::blocks::{self, Block, BlockSource, NewBlock};
use crate::ingest::Ingest;

#[test]
fn defaults_parse_and_validate() {
    let cfg = CorrelateConfig::default();
    assert_eq!(cfg.never_block.len(), DEFAULT_NEVER_BLOCK.len(), "a default never_block range failed to parse");
    cfg.validate().unwrap();
    let doc: IpNet = "192.0.2.0/24".parse().unwrap();
    assert!(!cfg.never_block.iter().any(|n| n.contains(&doc)), "documentation ranges are attackers in tests");
    assert_eq!(cfg.resolved_rules(), Rules::default());
    assert!(cfg.protected_domains().iter().any(|d| d == "google.com"));
}

#[test]
fn bad_values_name_the_key() {
    let cfg = CorrelateConfig { ipv6_block_prefix: 48, ..Default::default() };
    assert_eq!(cfg.validate().unwrap_err().key, "ipv6_block_prefix");
    let cfg = CorrelateConfig { ttl_secs: vec![], ..Default::default() };
    assert_eq!(
        cfg.validate().unwrap_err().to_string(),
        "correlate.ttl_secs: must be a non-empty list of positive durations"
    );
    let cfg = CorrelateConfig { min_hosts: Some(2), ..Default::default() };
    assert!(cfg.validate().unwrap_err().to_string().contains("[correlate.rules.<scenario>] min_hosts"));
    let mut cfg = CorrelateConfig::default();
    cfg.rules.insert("bruteforce".into(), RuleTable::default());
    assert_eq!(cfg.validate().unwrap_err().key, "rules.bruteforce");
    let mut cfg = CorrelateConfig::default();
    cfg.rules.insert("auth".into(), RuleTable { window_secs: Some(0), ..RuleTable::default() });
    assert_eq!(cfg.validate().unwrap_err().key, "rules.auth.window_secs");
    let cfg = CorrelateConfig { shadow_rules: vec!["everything".into()], ..Default::default() };
    assert_eq!(cfg.validate().unwrap_err().key, "shadow_rules");
}

#[test]
fn agent_policy_carries_only_what_the_operator_set() {
    let p = CorrelateConfig::default().agent_policy();
    assert_eq!(p.ipv6_block_prefix, 64);
    assert!(!p.protected_domains_set && p.good_standing_secs == 0);
    assert_eq!(
        p.rules.iter().map(|r| (r.name.as_str(), r.shadow)).collect::<Vec<_>>(),
        [("slot_exhaustion", false), ("conn_rate", false)]
    );
    let mut cfg = CorrelateConfig {
        shadow_rules: vec!["slot_exhaustion".into(), "relay".into()],
        protected_domains: Some(vec!["example.net".into()]),
        ..Default::default()
    };
    cfg.rules.insert("auth".into(), RuleTable { per_host: Some(20), ..RuleTable::default() });
    let p = cfg.agent_policy();
    let auth = p.rules.iter().find(|r| r.name == "auth").unwrap();
    assert_eq!((auth.per_host, auth.shadow), (20, false));
    assert!(p.rules.iter().find(|r| r.name == "relay").unwrap().shadow);
    assert!(p.rules.iter().find(|r| r.name == "slot_exhaustion").unwrap().shadow);
    assert!(p.protected_domains_set && p.protected_domains == ["example.net"]);
}

// ---- Correlator (database tests) ----

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

async fn agent(pool: &PgPool, name: &str, addresses: &[&str]) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, $2, $2, '\\x00')")
        .bind(id)
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    for a in addresses {
        sqlx::query("insert into agent_addresses (agent_id, address) values ($1, $2)")
            .bind(id)
            .bind(ip(a))
            .execute(pool)
            .await
            .unwrap();
    }
    id
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Stores `events` as the agent's next batch through the real ingest path.
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

fn line(kind: EventKind, addr: &str, user: &str) -> String {
    match kind {
        EventKind::AuthFailed => format!(
            "2026-11-27 02:00:00 dovecot_login authenticator failed for (User) [{addr}]:51234: \
             535 Incorrect authentication data (set_id={user})"
        ),
        _ => format!("2026-11-27 02:00:00 H=(x) [{addr}]:51234 {kind}"),
    }
}

/// `n` events of `kind` from `addr` on `agent`, `ago_secs` before now, with
/// user names `user0`, `user1`, ... when `distinct_users`.
async fn events(
    pool: &PgPool,
    agent: Uuid,
    addr: &str,
    kind: EventKind,
    n: usize,
    ago_secs: i64,
    distinct_users: bool,
) {
    let t = now_ms() - ago_secs * 1000;
    let events = (0..n)
        .map(|i| {
            let user = if distinct_users { format!("user{i}") } else { "info@example.com".into() };
            Event {
                time_ms: t - i as i64,
                kind: kind as i32,
                remote: Some(ip(addr).into()),
                remote_port: 40_000 + i as u32,
                auth_user: if kind == EventKind::AuthFailed { user.clone() } else { String::new() },
                raw: if kind.is_abuse() { line(kind, addr, &user) } else { String::new() },
                ..Event::default()
            }
        })
        .collect();
    store(pool, agent, events).await;
}

async fn abuse(pool: &PgPool, agent: Uuid, addr: &str, kind: EventKind, n: usize, ago_secs: i64) {
    events(pool, agent, addr, kind, n, ago_secs, false).await;
}

/// Accepted mail from `addr` (with a verified name when given).
async fn delivers(pool: &PgPool, agent: Uuid, addr: &str, host_name: &str) {
    let event = Event {
        time_ms: now_ms() - 5_000,
        kind: EventKind::Accepted as i32,
        remote: Some(ip(addr).into()),
        host_name: host_name.into(),
        ..Event::default()
    };
    store(pool, agent, vec![event]).await;
}

fn correlator(pool: &PgPool) -> Correlator {
    Correlator::new(pool.clone(), CorrelateConfig::default())
}

fn ttl_secs(block: &Block) -> i64 {
    (block.expires_at.unwrap() - block.created_at).whole_seconds()
}

async fn live(pool: &PgPool) -> Vec<IpNet> {
    sqlx::query_scalar("select cidr from blocks where revoked_at is null order by cidr").fetch_all(pool).await.unwrap()
}

/// A distributed brute force seen by two agents: 8 failures each, below
/// every host's own threshold, 16 across the fleet.
async fn two_agent_attack(c: &Correlator, a: Uuid, b: Uuid, addr: &str) -> Vec<Block> {
    abuse(&c.pool, a, addr, EventKind::AuthFailed, 8, 30).await;
    assert!(c.on_batch(a, &[ip(addr)]).await.unwrap().is_empty(), "{addr}: one agent's 8 is not enough");
    abuse(&c.pool, b, addr, EventKind::AuthFailed, 8, 5).await;
    c.on_batch(b, &[ip(addr)]).await.unwrap()
}

/// One more event from an address whose evidence is still in the window.
async fn attack_again(c: &Correlator, a: Uuid, addr: &str) -> Vec<Block> {
    abuse(&c.pool, a, addr, EventKind::AuthFailed, 1, 1).await;
    c.on_batch(a, &[ip(addr)]).await.unwrap()
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn distributed_brute_force_makes_a_fleet_block_with_evidence(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    let made = two_agent_attack(&c, a, b, "203.0.113.9").await;
    assert_eq!(made.len(), 1);
    let block = &made[0];
    assert_eq!(
        (block.cidr, block.reason.as_str(), block.source),
        (net("203.0.113.9/32"), REASON_FLEET, BlockSource::Auto)
    );
    assert_eq!(ttl_secs(block), 3_600);
    let ev = &block.evidence;
    assert_eq!(ev["agents"].as_array().unwrap().len(), 2);
    assert_eq!(ev["kinds"], serde_json::json!({"auth_failed": 16}));
    assert_eq!((ev["events"].as_i64(), ev["scenario"].as_str()), (Some(16), Some("auth")));
    assert_eq!(ev["verdict"], "auth: 16 weighted events across the fleet within 3600 s (threshold 15)");
    assert_eq!(
        (ev["good_standing"].as_bool(), ev["escalates"].as_bool(), ev["offence"].as_i64()),
        (Some(false), Some(true), Some(1))
    );
    assert!(ev["samples"][0].as_str().unwrap().contains("[203.0.113.9]"), "{ev}");
    let logged: Option<OffsetDateTime> =
        sqlx::query_scalar("select last_blocked_at from offenders where address = '203.0.113.9'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(logged.is_some());
    // Another batch about the blocked address changes nothing.
    abuse(&pool, a, "203.0.113.9", EventKind::AuthFailed, 3, 1).await;
    assert!(c.on_batch(a, &[ip("203.0.113.9")]).await.unwrap().is_empty());
    assert_eq!(blocks::current_version(&pool).await.unwrap(), 1);
}

/// The traffic that looks most like an attack and is not: a typo on each of
/// two hosts (an office NAT), Exim's global refusal everyone gets while a
/// host is full, lost sessions and TLS errors of a flaky MTA, a few unknown
/// recipients of a big sender.
#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn legitimate_lookalikes_are_never_blocked(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b, d) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await, agent(&pool, "mx3", &[]).await);
    // The office NAT: one mistyped password on each host.
    for host in [a, b, d] {
        abuse(&pool, host, "203.0.113.20", EventKind::AuthFailed, 1, 10).await;
        assert!(c.on_batch(host, &[ip("203.0.113.20")]).await.unwrap().is_empty());
    }
    // Refused while the hosts were full, many times, on every host.
    for host in [a, b, d] {
        abuse(&pool, host, "203.0.113.21", EventKind::RefusedTooMany, 40, 10).await;
        abuse(&pool, host, "203.0.113.21", EventKind::Connect, 80, 10).await;
        abuse(&pool, host, "203.0.113.21", EventKind::Lost, 20, 10).await;
        abuse(&pool, host, "203.0.113.21", EventKind::TlsError, 20, 10).await;
        abuse(&pool, host, "203.0.113.21", EventKind::CommandTimeout, 20, 10).await;
        assert!(c.on_batch(host, &[ip("203.0.113.21")]).await.unwrap().is_empty());
    }
    // A sender that delivers, with many unknown recipients (a stale list).
    delivers(&pool, a, "198.51.100.30", "").await;
    for host in [a, b, d] {
        abuse(&pool, host, "198.51.100.30", EventKind::RcptRejected, 200, 10).await;
        assert!(c.on_batch(host, &[ip("198.51.100.30")]).await.unwrap().is_empty());
    }
    // The same without any accepted mail is a dictionary attack.
    abuse(&pool, a, "198.51.100.31", EventKind::RcptRejected, 30, 10).await;
    let made = c.on_batch(a, &[ip("198.51.100.31")]).await.unwrap();
    assert_eq!(made.iter().map(|b| b.cidr).collect::<Vec<_>>(), [net("198.51.100.31/32")]);
    assert_eq!(made[0].evidence["scenario"], "dictionary");
    assert_eq!(live(&pool).await, [net("198.51.100.31/32")]);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn good_standing_raises_the_bar_and_a_typo_then_success_never_blocks(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    // 12 failures on one host would block an unknown address ...
    abuse(&pool, a, "198.51.100.40", EventKind::AuthFailed, 12, 20).await;
    assert_eq!(c.on_batch(a, &[ip("198.51.100.40")]).await.unwrap().len(), 1);
    // ... not one that logs in and delivers.
    delivers(&pool, b, "198.51.100.41", "").await;
    abuse(&pool, a, "198.51.100.41", EventKind::AuthFailed, 12, 20).await;
    assert!(c.on_batch(a, &[ip("198.51.100.41")]).await.unwrap().is_empty());
    // Well past the raised threshold (5 x 10) it is still blocked, and such
    // a block never counts towards a prefix.
    abuse(&pool, a, "198.51.100.41", EventKind::AuthFailed, 40, 10).await;
    let made = c.on_batch(a, &[ip("198.51.100.41")]).await.unwrap();
    assert_eq!(made.len(), 1);
    assert_eq!(
        (made[0].evidence["good_standing"].as_bool(), made[0].evidence["escalates"].as_bool()),
        (Some(true), Some(false))
    );
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn protected_senders_are_never_blocked_automatically(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    let google = "209.85.221.45";
    delivers(&pool, a, google, "mail-wr1-f45.google.com").await;
    for host in [a, b] {
        abuse(&pool, host, google, EventKind::SyncError, 100, 10).await;
        abuse(&pool, host, google, EventKind::AuthFailed, 100, 10).await;
        assert!(c.on_batch(host, &[ip(google)]).await.unwrap().is_empty());
    }
    assert!(
        c.on_local_block(a, net(&format!("{google}/32")), "slot_exhaustion", "held 60", 600).await.unwrap().is_none()
    );
    assert!(live(&pool).await.is_empty());
    // An operator still can.
    let manual = blocks::create(
        &pool,
        c.config(),
        NewBlock {
            cidr: net(&format!("{google}/32")),
            reason: "manual".into(),
            source: BlockSource::Manual,
            evidence: serde_json::json!({}),
            ttl: None,
            created_by: Some("ops".into()),
            force: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(manual.cidr, net(&format!("{google}/32")));
    // A look-alike name is not protected.
    delivers(&pool, a, "198.51.100.45", "mail.evilgoogle.com").await;
    abuse(&pool, a, "198.51.100.45", EventKind::SyncError, 30, 10).await;
    // (in good standing: 5 x 10 weighted protocol events needed)
    abuse(&pool, a, "198.51.100.45", EventKind::TooManySyntax, 10, 10).await;
    assert_eq!(c.on_batch(a, &[ip("198.51.100.45")]).await.unwrap().len(), 1);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn shadow_rules_record_and_block_nothing(pool: PgPool) {
    let mut cfg = CorrelateConfig { shadow_rules: vec!["local_block".into()], ..Default::default() };
    cfg.rules.insert("relay".into(), RuleTable { enforce: Some(false), ..RuleTable::default() });
    let c = Correlator::new(pool.clone(), cfg);
    let a = agent(&pool, "mx1", &[]).await;
    abuse(&pool, a, "203.0.113.50", EventKind::RelayDenied, 12, 10).await;
    assert!(c.on_batch(a, &[ip("203.0.113.50")]).await.unwrap().is_empty());
    // Recorded once, however often it is evaluated.
    abuse(&pool, a, "203.0.113.50", EventKind::RelayDenied, 1, 5).await;
    assert!(c.on_batch(a, &[ip("203.0.113.50")]).await.unwrap().is_empty());
    assert!(c.on_local_block(a, net("203.0.113.51/32"), "conn_rate", "31 connects", 600).await.unwrap().is_none());
    assert!(c.on_shadow_local_block(a, net("203.0.113.52/32"), "slot_exhaustion", "held 8").await.unwrap());
    let rows: Vec<(IpNet, String, String, serde_json::Value)> =
        sqlx::query_as("select cidr, rule, source, evidence from shadow_decisions order by id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let got: Vec<(String, &str, &str)> =
        rows.iter().map(|(c, r, s, _)| (c.to_string(), r.as_str(), s.as_str())).collect();
    assert_eq!(
        got,
        [
            ("203.0.113.50/32".to_owned(), "relay", "auto"),
            ("203.0.113.51/32".to_owned(), "conn_rate", "agent"),
            ("203.0.113.52/32".to_owned(), "slot_exhaustion", "agent"),
        ]
    );
    assert_eq!(rows[0].3["scenario"], "relay");
    assert!(live(&pool).await.is_empty());
    assert_eq!(blocks::current_version(&pool).await.unwrap(), 0);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn local_blocks_become_fleet_blocks_unless_standing_or_protection_say_no(pool: PgPool) {
    let c = correlator(&pool);
    let a = agent(&pool, "mx1", &["198.51.100.25"]).await;
    let block = c
        .on_local_block(a, net("203.0.113.40/32"), "slot_exhaustion", "held 80 of 100 slots", 600)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (block.cidr, block.source, block.reason.as_str()),
        (net("203.0.113.40/32"), BlockSource::Agent, REASON_LOCAL)
    );
    assert_eq!(ttl_secs(&block), 3_600, "the offence TTL when longer than the agent's");
    assert_eq!(block.evidence["local"]["reason"], "slot_exhaustion");
    assert_eq!(block.evidence["local"]["evidence"], "held 80 of 100 slots");
    assert_eq!(block.evidence["agents"], serde_json::json!([a.to_string()]));
    assert!(c.on_local_block(a, net("203.0.113.40/32"), "conn_rate", "", 600).await.unwrap().is_none());
    // An IPv6 host becomes its /64; a longer TTL than the policy's is capped.
    let v6 = c.on_local_block(a, net("2001:db8:4:4::7/128"), "conn_rate", "", 7_200).await.unwrap().unwrap();
    assert_eq!((v6.cidr, ttl_secs(&v6)), (net("2001:db8:4:4::/64"), 3_600));
    let mapped = c.on_local_block(a, net("::ffff:203.0.113.41/128"), "conn_rate", "", 60).await.unwrap().unwrap();
    assert_eq!(mapped.cidr, net("203.0.113.41/32"));
    // Never: the fleet's own address, a never_block range, an over-broad range.
    assert!(c.on_local_block(a, net("198.51.100.25/32"), "conn_rate", "", 60).await.unwrap().is_none());
    assert!(c.on_local_block(a, net("192.168.1.1/32"), "conn_rate", "", 60).await.unwrap().is_none());
    assert!(c.on_local_block(a, net("198.0.0.0/8"), "conn_rate", "", 60).await.unwrap().is_none());
    // A sender in good standing: one host's scenario evidence is not
    // enough, a slot flood is.
    delivers(&pool, a, "198.51.100.60", "").await;
    assert!(c.on_local_block(a, net("198.51.100.60/32"), "auth", "10 failures", 600).await.unwrap().is_none());
    assert!(c.on_local_block(a, net("198.51.100.60/32"), "slot_exhaustion", "held 20", 600).await.unwrap().is_some());
    assert_eq!(live(&pool).await.len(), 4);
    let distrust = Correlator::new(pool.clone(), CorrelateConfig { trust_local_blocks: false, ..Default::default() });
    assert!(distrust.on_local_block(a, net("203.0.113.42/32"), "conn_rate", "", 60).await.unwrap().is_none());
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn four_abusive_addresses_in_a_slash_24_escalate_to_the_prefix(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    let mut singles = Vec::new();
    for i in 1..=3 {
        let made = two_agent_attack(&c, a, b, &format!("192.0.2.{i}")).await;
        assert_eq!(made.len(), 1, "three addresses do not escalate");
        singles.push(made[0].id);
    }
    // The fourth: its first agent's 8 failures already make the /24 a
    // campaign of four abusive addresses.
    abuse(&pool, a, "192.0.2.200", EventKind::AuthFailed, 8, 30).await;
    let made = c.on_batch(a, &[ip("192.0.2.200")]).await.unwrap();
    assert_eq!(made.len(), 1, "{made:?}");
    let prefix = &made[0];
    assert_eq!((prefix.cidr, prefix.reason.as_str()), (net("192.0.2.0/24"), REASON_PREFIX));
    assert_eq!(live(&pool).await, vec![net("192.0.2.0/24")], "the prefix replaces the singles");
    let ev = &prefix.evidence;
    assert_eq!(ev["addresses"].as_array().unwrap().len(), 4);
    assert_eq!(ev["events"], 56);
    let log: Vec<(String, i64)> =
        sqlx::query_as("select op, block_id from block_changes order by version").fetch_all(&pool).await.unwrap();
    let removes: Vec<i64> = log.iter().filter(|(op, _)| op == "remove").map(|(_, id)| *id).collect();
    assert_eq!(removes, singles, "the prefix retires the singles inside it");
    assert_eq!(log.last().unwrap(), &("add".to_owned(), prefix.id));
    // A fifth address inside is covered; another /24 is unaffected.
    abuse(&pool, a, "192.0.2.77", EventKind::AuthFailed, 60, 1).await;
    assert!(c.on_batch(a, &[ip("192.0.2.77")]).await.unwrap().is_empty());
    assert_eq!(two_agent_attack(&c, a, b, "192.0.3.1").await.len(), 1);
}

/// Blocks of senders in good standing never build a prefix: four of them in
/// one /24 (a provider's relays, each blocked well past its raised
/// threshold) stay four single blocks.
#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn senders_in_good_standing_never_escalate_a_prefix(pool: PgPool) {
    let c = correlator(&pool);
    let a = agent(&pool, "mx1", &[]).await;
    for i in 1..=5 {
        let addr = format!("198.51.100.{i}");
        delivers(&pool, a, &addr, "").await;
        abuse(&pool, a, &addr, EventKind::AuthFailed, 50, 10).await;
        assert_eq!(c.on_batch(a, &[ip(&addr)]).await.unwrap().len(), 1, "{addr}");
    }
    assert_eq!(live(&pool).await.len(), 5);
    assert!(!live(&pool).await.contains(&net("198.51.100.0/24")));
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn ipv6_attackers_are_blocked_as_their_slash_64(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    // Rotation inside one /64: each address a little, together enough.
    for i in 1..=4 {
        abuse(&pool, if i % 2 == 0 { a } else { b }, &format!("2001:db8:a:b::{i}"), EventKind::AuthFailed, 4, 20).await;
    }
    let made = c.on_batch(b, &[ip("2001:db8:a:b::3")]).await.unwrap();
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].cidr, net("2001:db8:a:b::/64"));
    assert_eq!(made[0].evidence["addresses"].as_array().unwrap().len(), 4);
    for i in 1..=2 {
        assert_eq!(two_agent_attack(&c, a, b, &format!("2001:db8:a:{i}::5")).await.len(), 1, "{i}");
    }
    // The fourth /64 of the /48 (after ::b::/64 and two more).
    abuse(&pool, a, "2001:db8:a:3::5", EventKind::AuthFailed, 8, 30).await;
    let made = c.on_batch(a, &[ip("2001:db8:a:3::5")]).await.unwrap();
    assert_eq!(made.iter().map(|b| b.cidr).collect::<Vec<_>>(), [net("2001:db8:a::/48")]);
    assert_eq!(live(&pool).await, vec![net("2001:db8:a::/48")]);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn repeat_offenders_get_escalating_ttls(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    let addr = "203.0.113.50";
    let mut ttls = Vec::new();
    for round in 0..4 {
        let made = if round == 0 { two_agent_attack(&c, a, b, addr).await } else { attack_again(&c, a, addr).await };
        assert_eq!(made.len(), 1);
        ttls.push((ttl_secs(&made[0]), made[0].evidence["offence"].as_i64().unwrap()));
        sqlx::query("update blocks set expires_at = now() - interval '1 second' where id = $1")
            .bind(made[0].id)
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(blocks::expire_due(&pool).await.unwrap(), 1);
    }
    assert_eq!(ttls, vec![(3_600, 1), (21_600, 2), (86_400, 3), (604_800, 4)]);
}

/// An operator's unblock wins: the evidence from before it never blocks the
/// address again (not even topped up by one more event), new evidence after
/// it does, and the revoked block does not count as an offence.
#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn evidence_before_an_operators_unblock_does_not_block_again(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    let addr = "203.0.113.51";
    abuse(&pool, a, addr, EventKind::AuthFailed, 8, 600).await;
    abuse(&pool, b, addr, EventKind::AuthFailed, 8, 590).await;
    let first = c.on_batch(b, &[ip(addr)]).await.unwrap().remove(0);
    blocks::revoke(&pool, first.id, "false positive").await.unwrap().unwrap();
    // The unblock happened after that evidence and before what follows.
    sqlx::query("update blocks set revoked_at = now() - interval '5 minutes' where id = $1")
        .bind(first.id)
        .execute(&pool)
        .await
        .unwrap();
    assert!(attack_again(&c, a, addr).await.is_empty(), "old evidence plus one event must not block again");
    assert!(live(&pool).await.is_empty());
    let again = two_agent_attack(&c, a, b, addr).await.remove(0);
    assert_eq!(ttl_secs(&again), 3_600, "a revoked block is no offence");
    // The same evidence without the unblock: one more event blocks.
    let other = "203.0.113.52";
    abuse(&pool, a, other, EventKind::AuthFailed, 8, 600).await;
    abuse(&pool, b, other, EventKind::AuthFailed, 6, 590).await;
    assert!(c.on_batch(b, &[ip(other)]).await.unwrap().is_empty());
    assert_eq!(attack_again(&c, a, other).await.len(), 1);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn allowlisted_and_fleet_addresses_are_never_blocked(pool: PgPool) {
    let c = correlator(&pool);
    let a = agent(&pool, "mx1", &["203.0.113.60", "2001:db8:f:1::25"]).await;
    let b = agent(&pool, "mx2", &[]).await;
    sqlx::query("insert into allowlist (cidr, note) values ('198.51.100.0/24', 'partner relays')")
        .execute(&pool)
        .await
        .unwrap();
    for addr in ["198.51.100.5", "203.0.113.60", "10.0.0.5"] {
        abuse(&pool, a, addr, EventKind::AuthFailed, 60, 10).await;
        assert!(two_agent_attack(&c, a, b, addr).await.is_empty(), "{addr}");
        assert!(c.on_local_block(b, IpNet::from(ip(addr)), "conn_rate", "", 60).await.unwrap().is_none(), "{addr}");
    }
    assert!(live(&pool).await.is_empty());
    let made = two_agent_attack(&c, a, b, "2001:db8:f:1::bad").await;
    assert_eq!(made.iter().map(|b| b.cidr).collect::<Vec<_>>(), vec![net("2001:db8:f:1::bad/128")]);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn concurrent_batches_about_one_attacker_make_one_block(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    abuse(&pool, a, "203.0.113.70", EventKind::AuthFailed, 8, 10).await;
    abuse(&pool, b, "203.0.113.70", EventKind::AuthFailed, 8, 10).await;
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let c = c.clone();
            let agent = if i % 2 == 0 { a } else { b };
            tokio::spawn(async move { c.on_batch(agent, &[ip("203.0.113.70")]).await.unwrap().len() })
        })
        .collect();
    let mut made = 0;
    for t in tasks {
        made += t.await.unwrap();
    }
    assert_eq!(made, 1);
    assert_eq!(blocks::current_version(&pool).await.unwrap(), 1);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn distinct_users_across_the_fleet_block(pool: PgPool) {
    let c = correlator(&pool);
    let hosts = [agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await, agent(&pool, "mx3", &[]).await];
    // Password spraying: 3 distinct users on each of three hosts (no host
    // reaches 5 distinct users, no host 10 failures, the fleet 9 < 15).
    for (i, host) in hosts.iter().enumerate() {
        let t = now_ms() - 10_000;
        let evs = (0..3)
            .map(|j| Event {
                time_ms: t - j,
                kind: EventKind::AuthFailed as i32,
                remote: Some(ip("203.0.113.90").into()),
                auth_user: format!("u{i}{j}"),
                raw: line(EventKind::AuthFailed, "203.0.113.90", "u"),
                ..Event::default()
            })
            .collect();
        store(&pool, *host, evs).await;
    }
    let made = c.on_batch(hosts[2], &[ip("203.0.113.90")]).await.unwrap();
    assert_eq!(made.len(), 1);
    assert!(made[0].evidence["verdict"].as_str().unwrap().contains("distinct users"), "{}", made[0].evidence);
}

/// A /24 campaign: five addresses, each a little AUTH brute force on two
/// hosts (8 failures, under every per-address threshold), are one
/// attacker: the /24 is blocked. The same volume from addresses in good
/// standing (a provider's relays whose users mistype) is not.
#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn campaigns_of_small_abusers_block_their_prefix_and_delivering_neighbours_do_not(pool: PgPool) {
    let c = correlator(&pool);
    let (a, b) = (agent(&pool, "mx1", &[]).await, agent(&pool, "mx2", &[]).await);
    let mut made = Vec::new();
    for i in 1..=5 {
        let addr = format!("198.51.100.{i}");
        abuse(&pool, a, &addr, EventKind::AuthFailed, 4, 20).await;
        made.extend(c.on_batch(a, &[ip(&addr)]).await.unwrap());
        abuse(&pool, b, &addr, EventKind::AuthFailed, 4, 10).await;
        made.extend(c.on_batch(b, &[ip(&addr)]).await.unwrap());
    }
    let cidrs: Vec<IpNet> = made.iter().map(|b| b.cidr).collect();
    assert_eq!(cidrs, [net("198.51.100.0/24")], "{made:?}");
    let ev = &made[0].evidence;
    assert_eq!(ev["rule"], REASON_PREFIX);
    assert!(ev["verdict"].as_str().unwrap().starts_with("campaign of 4 addresses"), "{ev}");
    assert_eq!(ev["escalates"], false);

    // Neighbours that deliver: never a campaign.
    for i in 1..=8 {
        let addr = format!("203.0.113.{i}");
        delivers(&pool, a, &addr, "").await;
        abuse(&pool, a, &addr, EventKind::AuthFailed, 4, 20).await;
        abuse(&pool, b, &addr, EventKind::AuthFailed, 4, 10).await;
        assert!(c.on_batch(b, &[ip(&addr)]).await.unwrap().is_empty(), "{addr}");
    }
    // Too few addresses for a campaign, however busy.
    for i in 1..=3 {
        let addr = format!("192.0.2.{i}");
        abuse(&pool, a, &addr, EventKind::RelayDenied, 9, 20).await;
        assert!(c.on_batch(a, &[ip(&addr)]).await.unwrap().is_empty(), "{addr}");
    }
    // An office's users mistyping once each: 6 addresses, 6 failures.
    for i in 10..=15 {
        let addr = format!("192.0.2.{i}");
        abuse(&pool, a, &addr, EventKind::AuthFailed, 1, 20).await;
        assert!(c.on_batch(a, &[ip(&addr)]).await.unwrap().is_empty(), "{addr}");
    }
    assert_eq!(live(&pool).await, [net("198.51.100.0/24")]);
}

/// Four agents' slot-flood blocks in one /24 (no abuse lines, only held
/// connections) escalate to the /24 through the blocks themselves.
#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn four_local_flood_blocks_in_a_slash_24_escalate(pool: PgPool) {
    let c = correlator(&pool);
    let a = agent(&pool, "mx1", &[]).await;
    for i in 1..=3 {
        let block = c.on_local_block(a, net(&format!("198.51.100.{i}/32")), "slot_exhaustion", "held 8", 600).await;
        assert!(block.unwrap().is_some());
    }
    assert_eq!(live(&pool).await.len(), 3);
    assert!(c.on_local_block(a, net("198.51.100.99/32"), "slot_exhaustion", "held 8", 600).await.unwrap().is_some());
    assert_eq!(live(&pool).await, [net("198.51.100.0/24")]);
}
