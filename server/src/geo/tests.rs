//! Tests of the ASN/country policy: the country database (written by
//! [`super::mmdb_writer`]), the bounded scaling of thresholds, a country
//! multiplier changing the correlation's decision both ways while the
//! allowlist still wins, and an ASN block rule.

use std::sync::Arc;

use fleetban_proto::policy::{Rules, Scenario};
use fleetban_proto::v1::EventKind;
use ipnet::IpNet;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::*;
use crate::correlate::{CorrelateConfig, Correlator};
use crate::feeds::{Feeds, Outcome};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A country database file: 203.0.113.0/24 is NL, 198.51.100.0/25 is DE.
fn country_file(dir: &tempfile::TempDir) -> PathBuf {
    let bytes = mmdb_writer::country_db(&[
        ("203.0.113.0/24".parse().unwrap(), "NL"),
        ("198.51.100.0/25".parse().unwrap(), "de"),
    ]);
    let path = dir.path().join("country.mmdb");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn geo_config(path: PathBuf) -> GeoConfig {
    GeoConfig {
        country_mmdb_path: Some(path),
        block_asn: Vec::new(),
        evidence: vec![
            EvidenceRule { asn: None, country: Some("NL".into()), factor_percent: 200 },
            EvidenceRule { asn: None, country: Some("de".into()), factor_percent: 50 },
            EvidenceRule { asn: Some(64501), country: None, factor_percent: 300 },
        ],
    }
}

#[test]
fn the_country_database_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let geo = GeoPolicy::load(&geo_config(country_file(&dir))).unwrap();
    assert_eq!(geo.mmdb_country(ip("203.0.113.9")).as_deref(), Some("NL"));
    assert_eq!(geo.mmdb_country(ip("::ffff:203.0.113.9")).as_deref(), Some("NL"), "mapped addresses are IPv4");
    assert_eq!(geo.mmdb_country(ip("198.51.100.1")).as_deref(), Some("DE"));
    assert_eq!(geo.mmdb_country(ip("198.51.100.200")), None);
    assert_eq!(geo.mmdb_country(ip("2001:db8::1")), None, "an IPv4 database knows no IPv6");
    let nl = Origin { asn: None, country: Some("NL".into()) };
    assert_eq!(geo.factor_percent(&nl), 200);
    assert_eq!(geo.factor_percent(&Origin::default()), 100);
    let nl_as = Origin { asn: Some(64501), country: Some("NL".into()) };
    assert_eq!(geo.factor_percent(&nl_as), 300, "an AS rule wins over a country rule");
    assert_eq!(geo.factor_percent(&Origin { asn: Some(64502), country: Some("NL".into()) }), 200);

    // A file that is not a MaxMind DB, a missing file: clear errors.
    let junk = dir.path().join("junk.mmdb");
    std::fs::write(&junk, b"not a database").unwrap();
    let err = GeoPolicy::load(&geo_config(junk)).unwrap_err().to_string();
    assert!(err.contains("country_mmdb_path") && err.contains("not a MaxMind DB"), "{err}");
    let err = GeoPolicy::load(&geo_config(dir.path().join("missing.mmdb"))).unwrap_err().to_string();
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn multipliers_are_bounded() {
    let rules = Rules::default();
    let doubled = scale(&rules, 200);
    let auth = doubled.get(Scenario::Auth);
    assert_eq!((auth.per_host, auth.fleet, auth.distinct_users), (20, 30, 10));
    assert_eq!(auth.window_secs, rules.get(Scenario::Auth).window_secs);
    assert_eq!(auth.good_standing_factor, rules.get(Scenario::Auth).good_standing_factor);
    // Below the floor it is clamped to half, never to nothing.
    let weakest = scale(&rules, 1);
    assert_eq!(weakest.get(Scenario::Auth).per_host, 5);
    assert_eq!(weakest, scale(&rules, MIN_FACTOR_PERCENT));
    assert_eq!(scale(&rules, 100_000), scale(&rules, MAX_FACTOR_PERCENT));
    // Off stays off; a threshold of 1 stays 1.
    assert_eq!(scale_threshold(0, 50), 0);
    assert_eq!(scale_threshold(1, 50), 1);
    assert_eq!(scale_threshold(3, 50), 2, "rounded up");

    for (cfg, key) in [
        (
            GeoConfig {
                evidence: vec![EvidenceRule { asn: Some(1), country: None, factor_percent: 10 }],
                ..Default::default()
            },
            "factor_percent",
        ),
        (
            GeoConfig {
                evidence: vec![EvidenceRule { asn: Some(1), country: Some("NL".into()), factor_percent: 200 }],
                ..Default::default()
            },
            "exactly one",
        ),
        (
            GeoConfig {
                evidence: vec![EvidenceRule { asn: None, country: Some("NLD".into()), factor_percent: 200 }],
                ..Default::default()
            },
            "two-letter",
        ),
    ] {
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}

async fn agent(pool: &PgPool) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, $2, $2, '\\x00')")
        .bind(id)
        .bind(format!("mx-{id}"))
        .execute(pool)
        .await
        .unwrap();
    id
}

/// `n` authentication failures from `addr` on `agent` a minute ago, as
/// ingest records them for correlation.
async fn failures(pool: &PgPool, agent: Uuid, addr: &str, n: i32) {
    sqlx::query(
        "insert into evidence_minutes (address, agent_id, kind, minute, events) \
         values ($1, $2, $3, date_trunc('minute', now() - interval '1 minute'), $4)",
    )
    .bind(IpNet::from(ip(addr)))
    .bind(agent)
    .bind(EventKind::AuthFailed.as_str())
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn a_country_multiplier_changes_the_decision_within_bounds(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let geo = Arc::new(GeoPolicy::load(&geo_config(country_file(&dir))).unwrap());
    let plain = Correlator::new(pool.clone(), CorrelateConfig::default());
    let with_geo = Correlator::new(pool.clone(), CorrelateConfig::default()).with_geo(geo);
    let mx1 = agent(&pool).await;
    let now = OffsetDateTime::now_utc();
    let mut conn = pool.acquire().await.unwrap();

    // NL needs twice the evidence: 12 failures on one host block elsewhere
    // (threshold 10), not in NL (threshold 20).
    failures(&pool, mx1, "203.0.113.9", 12).await;
    let target = net("203.0.113.9/32");
    assert!(plain.evaluate(&mut conn, target, now).await.unwrap().is_some());
    assert!(with_geo.evaluate(&mut conn, target, now).await.unwrap().is_none(), "NL requires 20");
    failures(&pool, mx1, "203.0.113.10", 20).await;
    let finding = with_geo.evaluate(&mut conn, net("203.0.113.10/32"), now).await.unwrap().unwrap();
    assert_eq!(finding.verdict.threshold, 20);

    // DE needs half: 6 failures block there, not elsewhere.
    failures(&pool, mx1, "198.51.100.20", 6).await;
    let target = net("198.51.100.20/32");
    assert!(plain.evaluate(&mut conn, target, now).await.unwrap().is_none());
    let finding = with_geo.evaluate(&mut conn, target, now).await.unwrap().unwrap();
    assert_eq!(finding.verdict.threshold, 5);
    // ... but never below half, and the allowlist still wins.
    failures(&pool, mx1, "198.51.100.21", 4).await;
    assert!(with_geo.evaluate(&mut conn, net("198.51.100.21/32"), now).await.unwrap().is_none());
    drop(conn);
    sqlx::query("insert into allowlist (cidr, note) values ('198.51.100.20/32', 'partner')")
        .execute(&pool)
        .await
        .unwrap();
    assert!(with_geo.on_batch(mx1, &[ip("198.51.100.20")]).await.unwrap().is_empty());
    let blocked: i64 = sqlx::query_scalar("select count(*) from blocks").fetch_one(&pool).await.unwrap();
    assert_eq!(blocked, 0);
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn an_asn_rule_blocks_the_as_carved_by_the_allowlist(pool: PgPool) {
    let table = "203.0.113.0\t203.0.113.255\t64500\tNL\tEXAMPLE-BAD\n\
                 198.51.100.0\t198.51.100.95\t64500\tNL\tEXAMPLE-BAD\n\
                 2001:db8:bad::\t2001:db8:bad:ffff:ffff:ffff:ffff:ffff\t64500\tNL\tEXAMPLE-BAD\n\
                 192.0.2.0\t192.0.2.255\t64501\tDE\tEXAMPLE-GOOD\n";
    crate::asn::import(&pool, table.as_bytes()).await.unwrap();
    sqlx::query("insert into allowlist (cidr, note) values ('203.0.113.25/32', 'a customer inside AS64500')")
        .execute(&pool)
        .await
        .unwrap();
    let rule: AsnBlockRule = toml::from_str("asn = 64500").unwrap();
    assert_eq!(rule.name(), "asn:64500");
    let feeds = Feeds::new(Vec::new(), vec![rule]).unwrap();
    let policy = CorrelateConfig::default();
    let outcome = feeds.refresh(&pool, &policy, "asn:64500", true).await.unwrap();
    // 203.0.113.0/24, 198.51.100.0/26 + /27 (the 0-95 range), 2001:db8:bad::/48.
    assert!(matches!(outcome, Outcome::Ok { entries: 4, refused: 0, .. }), "{outcome:?}");
    let blocks: Vec<(IpNet, String, serde_json::Value)> =
        sqlx::query_as("select cidr, source, evidence from blocks where revoked_at is null order by cidr")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(blocks.iter().all(|(_, source, ev)| source == "policy" && ev["feed"] == "asn:64500"));
    let cidrs: Vec<IpNet> = blocks.iter().map(|(c, ..)| *c).collect();
    assert!(cidrs.contains(&net("198.51.100.0/26")) && cidrs.contains(&net("198.51.100.64/27")));
    assert!(cidrs.contains(&net("2001:db8:bad::/48")));
    assert!(!cidrs.iter().any(|c| c.contains(&net("203.0.113.25/32"))), "the allowlisted address is carved out");
    assert!(cidrs.iter().any(|c| c.contains(&net("203.0.113.24/32"))));
    assert!(!cidrs.iter().any(|c| c.contains(&net("192.0.2.1/32"))), "another AS");
    assert_eq!(blocks[0].2["label"], "AS64500 EXAMPLE-BAD");

    let status = feeds.status(&pool).await.unwrap();
    assert_eq!(
        (status[0].kind.as_str(), status[0].origin.as_str(), status[0].status.as_str()),
        ("asn", "AS64500", "ok")
    );

    // An AS range broader than /16 needs allow_broad.
    crate::asn::import(&pool, format!("{table}198.0.0.0\t198.1.255.255\t64500\tNL\tEXAMPLE-BAD\n").as_bytes())
        .await
        .unwrap();
    let outcome = feeds.refresh(&pool, &policy, "asn:64500", true).await.unwrap();
    assert!(matches!(outcome, Outcome::Ok { entries: 5, refused: 1, .. }), "{outcome:?}");
    let broad: AsnBlockRule = toml::from_str("asn = 64500\nallow_broad = true").unwrap();
    let feeds = Feeds::new(Vec::new(), vec![broad]).unwrap();
    let outcome = feeds.refresh(&pool, &policy, "asn:64500", true).await.unwrap();
    assert!(matches!(outcome, Outcome::Ok { entries: 5, refused: 0, .. }), "{outcome:?}");
    let live: bool =
        sqlx::query_scalar("select exists (select 1 from blocks where revoked_at is null and cidr = '198.0.0.0/15')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(live, "allow_broad blocks the /15");
}

#[test]
fn ranges_become_exact_cidrs() {
    assert_eq!(
        range_cidrs(ip("198.51.100.0"), ip("198.51.100.95")),
        vec![net("198.51.100.0/26"), net("198.51.100.64/27")]
    );
    assert_eq!(range_cidrs(ip("2001:db8::"), ip("2001:db8::ffff")), vec![net("2001:db8::/112")]);
    assert!(range_cidrs(ip("192.0.2.1"), ip("2001:db8::1")).is_empty());
}

#[sqlx::test(migrator = "crate::db::MIGRATOR")]
async fn the_attacker_view_and_the_report_show_the_country(pool: PgPool) {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let geo = Arc::new(GeoPolicy::load(&geo_config(country_file(&dir))).unwrap());
    let app = crate::api::router(crate::api::AppState::new(pool.clone(), CorrelateConfig::default()).with_geo(geo));
    let token = crate::api::auth::create_token(&pool, crate::api::auth::Role::Read, Some("t")).await.unwrap().token;
    let mx1 = agent(&pool).await;
    for (address, raw) in [("203.0.113.9", "535 from NL"), ("192.0.2.9", "535 from nowhere known")] {
        sqlx::query(
            "insert into offender_hosts (address, agent_id, kind, first_seen, last_seen, events, sample_raw) \
             values ($1, $2, 'auth_failed', now(), now(), 3, $3)",
        )
        .bind(IpNet::from(ip(address)))
        .bind(mx1)
        .bind(raw)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "insert into offenders (address, first_seen, last_seen, events, hosts) values ($1, now(), now(), 3, 1)",
        )
        .bind(IpNet::from(ip(address)))
        .execute(&pool)
        .await
        .unwrap();
    }
    let get = |uri: String| {
        let request = axum::http::Request::builder()
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            assert_eq!(response.status(), axum::http::StatusCode::OK);
            axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap().to_vec()
        }
    };
    let detail: serde_json::Value = serde_json::from_slice(&get("/api/v1/attackers/203.0.113.9".into()).await).unwrap();
    assert_eq!(detail["country"], "NL");
    assert_eq!(detail["summary"]["country"], "NL");
    let list: serde_json::Value = serde_json::from_slice(&get("/api/v1/attackers".into()).await).unwrap();
    let countries: Vec<&serde_json::Value> = list.as_array().unwrap().iter().map(|a| &a["country"]).collect();
    assert!(countries.contains(&&serde_json::json!("NL")) && countries.contains(&&serde_json::Value::Null));
    let report = String::from_utf8(get("/api/v1/reports/abuse?target=203.0.113.9".into()).await).unwrap();
    assert!(report.contains("\nCountry: NL\n"), "{report}");
}
