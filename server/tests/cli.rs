//! The `fleetban` binary against a real server (`serve::run` on
//! 127.0.0.1:0): tables, `--json`, writes, env configuration, and one-line
//! errors with a non-zero exit code.

mod common;

use std::process::Output;

use serde_json::Value;
use sqlx::PgPool;
use time::{Duration, OffsetDateTime};

async fn fleetban(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban"));
    command.env_remove("FLEETBAN_URL").env_remove("FLEETBAN_TOKEN").arg("--url").arg(url);
    if let Some(token) = token {
        command.arg("--token").arg(token);
    }
    // Not a terminal: nothing asks for confirmation (as for scripts).
    command.args(args).stdin(std::process::Stdio::null()).output().await.unwrap()
}

fn ok(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(output.stderr.is_empty(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// Asserts a failure with exactly one line on stderr containing `needle`.
fn fails(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail; stdout: {}", String::from_utf8_lossy(&output.stdout));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("fleetban: ") && stderr.contains(needle), "{needle:?} in {stderr}");
    assert!(output.stdout.is_empty());
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn cli_reads_and_writes_through_the_api(pool: PgPool) {
    let server = common::Server::start(&pool).await;
    let url = server.url.clone();
    let t = common::tokens(&pool).await;
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &["192.0.2.10"]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", false, &[]).await;
    let now = OffsetDateTime::now_utc();
    for (agent, n) in [(mx1, 3), (mx2, 2)] {
        for i in 0..n {
            let raw =
                format!("dovecot_login authenticator failed for (x) [203.0.113.7]:4{i} 535 Incorrect (agent {n})");
            common::event(&pool, agent, 1, now - Duration::seconds(10 + i), "auth_failed", "203.0.113.7", &raw).await;
        }
        common::evidence(&pool, agent, "203.0.113.7", "auth_failed", n, now - Duration::seconds(10), "sample").await;
    }

    // agents: an aligned table, and JSON.
    let agents = ok(&fleetban(&url, Some(&t.read), &["agents"]).await);
    let lines: Vec<&str> = agents.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("NAME") && lines[0].contains("STATE"), "{agents}");
    assert_eq!(lines.len(), 3, "{agents}");
    let name_col = lines[0].find("NAME").unwrap();
    assert_eq!(&lines[1][name_col..name_col + 3], "mx1", "columns align: {agents}");
    assert!(lines[1].contains("online") && lines[2].contains("offline"), "{agents}");
    let json: Value = serde_json::from_str(&ok(&fleetban(&url, Some(&t.read), &["--json", "agents"]).await)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    // block, blocks, unblock by CIDR and by id.
    let out =
        ok(&fleetban(&url, Some(&t.admin), &["block", "203.0.113.7", "--ttl", "6h", "--reason", "brute force"]).await);
    assert!(out.starts_with("Blocked 203.0.113.7/32 (block "), "{out}");
    let out = ok(&fleetban(&url, Some(&t.admin), &["block", "198.51.100.0/24", "--reason", "spam"]).await);
    assert!(out.contains("permanent"), "{out}");
    let blocks = ok(&fleetban(&url, Some(&t.read), &["blocks"]).await);
    assert!(blocks.lines().next().unwrap().starts_with("ID"), "{blocks}");
    assert!(blocks.contains("203.0.113.7/32") && blocks.contains("brute force") && blocks.contains("198.51.100.0/24"));
    let listed: Value = serde_json::from_str(&ok(&fleetban(&url, Some(&t.read), &["blocks", "--json"]).await)).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let host_block = listed.iter().find(|b| b["cidr"] == "203.0.113.7/32").unwrap();
    assert_eq!(host_block["evidence"]["agents"], 2);
    let range_id = listed.iter().find(|b| b["cidr"] == "198.51.100.0/24").unwrap()["id"].as_i64().unwrap();

    let out = ok(&fleetban(&url, Some(&t.admin), &["unblock", "203.0.113.7"]).await);
    assert!(out.starts_with("Removed block ") && out.contains("203.0.113.7/32"), "{out}");
    let out = ok(&fleetban(&url, Some(&t.admin), &["unblock", &range_id.to_string()]).await);
    assert_eq!(out, format!("Removed block {range_id}.\n"));
    let live: i64 =
        sqlx::query_scalar("select count(*) from blocks where revoked_at is null").fetch_one(&pool).await.unwrap();
    assert_eq!(live, 0);
    let all = ok(&fleetban(&url, Some(&t.read), &["blocks", "--all"]).await);
    assert_eq!(all.lines().count(), 3, "{all}");
    fails(&fleetban(&url, Some(&t.admin), &["unblock", "203.0.113.7"]).await, "no live block of 203.0.113.7/32");
    fails(&fleetban(&url, Some(&t.admin), &["unblock", &range_id.to_string()]).await, "409");

    // allow / allowlist / unallow; allow suppresses covered blocks.
    ok(&fleetban(&url, Some(&t.admin), &["block", "203.0.113.9", "--reason", "r"]).await);
    let out = ok(&fleetban(&url, Some(&t.admin), &["allow", "203.0.113.0/24", "--note", "partner"]).await);
    assert!(out.contains("Allowlisted 203.0.113.0/24") && out.contains("Suppressed 1 overlapping block"), "{out}");
    let list = ok(&fleetban(&url, Some(&t.read), &["allowlist"]).await);
    assert!(list.contains("203.0.113.0/24") && list.contains("partner") && list.contains("ops-admin"), "{list}");
    fails(&fleetban(&url, Some(&t.admin), &["block", "203.0.113.20", "--reason", "r"]).await, "422");
    ok(&fleetban(&url, Some(&t.admin), &["unallow", "203.0.113.0/24"]).await);
    assert_eq!(ok(&fleetban(&url, Some(&t.read), &["allowlist"]).await).lines().count(), 1);

    // attackers, attacker, events, report, stats.
    let attackers = ok(&fleetban(&url, Some(&t.read), &["attackers", "--since", "1h"]).await);
    assert!(attackers.lines().nth(1).unwrap().starts_with("203.0.113.7"), "{attackers}");
    assert!(attackers.contains("auth_failed"), "{attackers}");
    let attacker = ok(&fleetban(&url, Some(&t.read), &["attacker", "203.0.113.7"]).await);
    assert!(
        attacker.contains("hosts 2") && attacker.contains("mx2.example.net") && attacker.contains("535 Incorrect"),
        "{attacker}"
    );
    let events = ok(&fleetban(&url, Some(&t.read), &["events", "--ip", "203.0.113.7"]).await);
    assert_eq!(events.lines().count(), 6, "{events}");
    // Piped output: absolute times with their zone.
    assert!(events.lines().skip(1).all(|line| line.split("  ").next().unwrap().ends_with(" UTC")), "{events}");
    let events: Value = serde_json::from_str(&ok(&fleetban(
        &url,
        Some(&t.read),
        &["events", "--ip", "203.0.113.7", "--agent", "mx2", "--json"],
    )
    .await))
    .unwrap();
    assert_eq!(events.as_array().unwrap().len(), 2);
    for event in events.as_array().unwrap() {
        let time = event["time"].as_str().unwrap();
        assert!(time.ends_with('Z') || time.contains('+'), "JSON times carry their zone: {time}");
    }
    // A kind that does not exist fails (clap's usage error) listing the kinds.
    let bogus = fleetban(&url, Some(&t.read), &["events", "--kind", "bogus"]).await;
    let stderr = String::from_utf8_lossy(&bogus.stderr);
    assert!(!bogus.status.success() && stderr.contains("'bogus'") && stderr.contains("auth_failed"), "{stderr}");
    let report = ok(&fleetban(&url, Some(&t.read), &["report", "203.0.113.7"]).await);
    assert!(report.starts_with("Abuse report: SMTP abuse from 203.0.113.7"), "{report}");
    assert!(report.contains("against 2 of our mail servers"), "{report}");
    let stats = ok(&fleetban(&url, Some(&t.read), &["stats"]).await);
    assert!(stats.contains("agents connected") && stats.contains("1 / 2"), "{stats}");

    // Errors: one line, non-zero exit.
    fails(&fleetban(&url, Some(&t.read), &["block", "203.0.113.50", "--reason", "r"]).await, "403 forbidden");
    fails(&fleetban(&url, None, &["agents"]).await, "no API token");
    fails(&fleetban(&url, Some("fbt_nope"), &["agents"]).await, "401 unauthorized");
    fails(&fleetban(&url, Some(&t.admin), &["block", "nonsense", "--reason", "r"]).await, "400 bad request");
    fails(
        &fleetban(&url, Some(&t.admin), &["block", "203.0.113.5", "--ttl", "soon", "--reason", "r"]).await,
        "bad --ttl",
    );
    fails(&fleetban(&url, Some(&t.read), &["attacker", "203.0.113.200"]).await, "404 not found");
    fails(&fleetban("http://127.0.0.1:1", Some(&t.read), &["agents"]).await, "cannot reach http://127.0.0.1:1");

    // FLEETBAN_URL and FLEETBAN_TOKEN from the environment.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban"))
        .env("FLEETBAN_URL", &url)
        .env("FLEETBAN_TOKEN", &t.read)
        .arg("stats")
        .output()
        .await
        .unwrap();
    assert!(ok(&output).contains("active blocks"));

    server.stop().await;
}

/// `unblock` of an address covered only by a wider block names that block
/// instead of a bare 404, and `--carve` exempts the address for the
/// covering block's remaining time (or `--ttl`); `allow` of a range broader
/// than /16 needs `--force`.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn cli_unblock_names_covering_blocks_and_carves(pool: PgPool) {
    let server = common::Server::start(&pool).await;
    let url = server.url.clone();
    let t = common::tokens(&pool).await;
    let out =
        ok(&fleetban(&url, Some(&t.admin), &["block", "198.51.100.0/24", "--ttl", "2h", "--reason", "campaign"]).await);
    let id: i64 = out.split("(block ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
    fails(
        &fleetban(&url, Some(&t.admin), &["unblock", "198.51.100.55"]).await,
        &format!("covered by block {id} (198.51.100.0/24, reason \"campaign\")"),
    );
    fails(&fleetban(&url, Some(&t.admin), &["unblock", "198.51.100.55", "--ttl", "1h"]).await, "--carve only");
    let out = ok(&fleetban(&url, Some(&t.admin), &["unblock", "198.51.100.55", "--carve"]).await);
    assert!(out.starts_with(&format!("Exempted 198.51.100.55/32 from block {id}")), "{out}");
    let (cidr, note, left): (String, String, f64) =
        sqlx::query_as("select cidr::text, note, extract(epoch from expires_at - now())::float8 from allowlist")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((cidr.as_str(), note.as_str()), ("198.51.100.55/32", format!("carved out of block {id}").as_str()));
    assert!((7_000.0..=7_200.0).contains(&left), "the exemption lasts as long as the block: {left}");
    // The covering block is untouched; a second carve with its own TTL.
    let live: i64 =
        sqlx::query_scalar("select count(*) from blocks where revoked_at is null").fetch_one(&pool).await.unwrap();
    assert_eq!(live, 1);
    let out =
        ok(&fleetban(&url, Some(&t.admin), &["unblock", "198.51.100.56", "--carve", "--ttl", "10m", "--yes"]).await);
    assert!(out.contains("198.51.100.56/32"), "{out}");
    let left: f64 = sqlx::query_scalar(
        "select extract(epoch from expires_at - now())::float8 from allowlist where cidr = '198.51.100.56/32'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!((500.0..=600.0).contains(&left), "{left}");
    // The exact block and the covering one: the exact one goes, the other is named.
    ok(&fleetban(&url, Some(&t.admin), &["block", "198.51.100.77", "--reason", "single"]).await);
    let out = ok(&fleetban(&url, Some(&t.admin), &["unblock", "198.51.100.77"]).await);
    assert!(out.contains("Removed block") && out.contains(&format!("still covered by block {id}")), "{out}");

    // allow: the breadth guard, in the CLI's words from the API.
    fails(&fleetban(&url, Some(&t.admin), &["allow", "0.0.0.0/0"]).await, "needs force");
    fails(&fleetban(&url, Some(&t.admin), &["allow", "2001:db8::/31"]).await, "needs force");
    let out = ok(&fleetban(&url, Some(&t.admin), &["allow", "0.0.0.0/0", "--force", "--yes"]).await);
    assert!(out.contains("Allowlisted 0.0.0.0/0") && out.contains("Suppressed 1"), "{out}");
    let blocks = ok(&fleetban(&url, Some(&t.read), &["blocks"]).await);
    assert!(blocks.contains("allowlisted"), "{blocks}");
    let out = ok(&fleetban(&url, Some(&t.admin), &["unallow", "0.0.0.0/0", "--yes"]).await);
    assert!(out.contains("enforced again"), "{out}");
    server.stop().await;
}

/// Agent names, host names and raw log lines come from agents and mail
/// clients: tables show their control characters escaped, one line per row;
/// `--json` keeps them exact.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn cli_tables_escape_client_text_and_json_stays_exact(pool: PgPool) {
    let server = common::Server::start(&pool).await;
    let url = server.url.clone();
    let t = common::tokens(&pool).await;
    let name = "mx\x1b[31mred";
    let hostname = "mx1.example.net\x1b]0;owned\x07\nroot@mx1:~# ";
    let raw = "535 Incorrect authentication data (set_id=\x1b[2J\r\nforged line)";
    let mx = common::agent(&pool, name, hostname, true, &[]).await;
    let now = OffsetDateTime::now_utc();
    common::event(&pool, mx, 1, now - Duration::seconds(5), "auth_failed", "203.0.113.7", raw).await;
    common::evidence(&pool, mx, "203.0.113.7", "auth_failed", 1, now - Duration::seconds(5), raw).await;

    let clean = |text: &str| !text.chars().any(|c| c.is_control() && c != '\n');
    let agents = ok(&fleetban(&url, Some(&t.read), &["agents"]).await);
    assert!(clean(&agents), "{agents:?}");
    assert_eq!(agents.lines().count(), 2, "{agents}");
    assert!(agents.contains(r"mx\u{1b}[31mred") && agents.contains(r"\u{7}\nroot@mx1:~#"), "{agents}");
    let events = ok(&fleetban(&url, Some(&t.read), &["events"]).await);
    assert!(clean(&events), "{events:?}");
    assert_eq!(events.lines().count(), 2, "{events}");
    assert!(events.contains(r"set_id=\u{1b}[2J\r\nforged line"), "{events}");
    let attacker = ok(&fleetban(&url, Some(&t.read), &["attacker", "203.0.113.7"]).await);
    assert!(clean(&attacker), "{attacker:?}");
    assert!(!attacker.lines().any(|l| l.starts_with("forged")), "{attacker}");

    let json: Value = serde_json::from_str(&ok(&fleetban(&url, Some(&t.read), &["--json", "agents"]).await)).unwrap();
    assert_eq!(json[0]["name"], name);
    assert_eq!(json[0]["hostname"], hostname);
    let json: Value = serde_json::from_str(&ok(&fleetban(&url, Some(&t.read), &["--json", "events"]).await)).unwrap();
    assert_eq!(json[0]["raw"], raw);
    server.stop().await;
}

/// `fleetban tokens`, `enroll-token`, `agents rename|revoke|remove` and
/// `audit` against a real server: listings never show a token, revoking and
/// removing need `--yes` without a terminal, and every change is audited.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn cli_manages_tokens_agents_and_shows_the_audit_log(pool: PgPool) {
    let server = common::Server::start(&pool).await;
    let url = server.url.clone();
    let t = common::tokens(&pool).await;
    let mx1 = common::agent(&pool, "mx1", "mx1.example.net", true, &[]).await;
    let mx2 = common::agent(&pool, "mx2", "mx2.example.net", false, &[]).await;

    // tokens create / list / revoke.
    let out = ok(&fleetban(
        &url,
        Some(&t.admin),
        &["tokens", "create", "--role", "read", "--name", "ci", "--expires", "30d"],
    )
    .await);
    let created = out.lines().last().unwrap().to_owned();
    assert!(created.starts_with("fbt_") && out.contains("\"ci\"") && out.contains("shown only once"), "{out}");
    let list = ok(&fleetban(&url, Some(&t.admin), &["tokens", "list"]).await);
    assert!(list.starts_with("ID") && list.contains("PREFIX") && list.contains("EXPIRES"), "{list}");
    for secret in [&created, &t.admin, &t.read] {
        assert!(!list.contains(secret.as_str()), "a listing shows a token: {list}");
    }
    let ci = list.lines().find(|l| l.contains(" ci ")).unwrap_or_else(|| panic!("{list}"));
    assert!(ci.contains(&created[..12]) && ci.contains("active") && !ci.contains("never"), "{ci}");
    assert_eq!(list.lines().count(), 4, "{list}");
    let listed: Value =
        serde_json::from_str(&ok(&fleetban(&url, Some(&t.admin), &["--json", "tokens", "list"]).await)).unwrap();
    let ci_id = listed.as_array().unwrap().iter().find(|x| x["name"] == "ci").unwrap()["id"].as_i64().unwrap();
    ok(&fleetban(&url, Some(&created), &["agents"]).await);
    // Without a terminal, revoking needs --yes; nothing happens without it.
    fails(&fleetban(&url, Some(&t.admin), &["tokens", "revoke", "ci"]).await, "pass --yes");
    ok(&fleetban(&url, Some(&created), &["agents"]).await);
    let out = ok(&fleetban(&url, Some(&t.admin), &["tokens", "revoke", "ci", "--yes"]).await);
    assert_eq!(out, format!("Revoked API token {ci_id} (\"ci\").\n"));
    fails(&fleetban(&url, Some(&created), &["agents"]).await, "was revoked at");
    fails(&fleetban(&url, Some(&t.admin), &["tokens", "revoke", &ci_id.to_string(), "--yes"]).await, "409");
    let all = ok(&fleetban(&url, Some(&t.admin), &["tokens", "list", "--all"]).await);
    assert!(all.lines().any(|l| l.contains(" ci ") && l.contains("revoked")), "{all}");
    assert!(!ok(&fleetban(&url, Some(&t.admin), &["tokens", "list"]).await).contains(" ci "));
    fails(&fleetban(&url, Some(&t.read), &["tokens", "list"]).await, "403 forbidden");
    fails(
        &fleetban(&url, Some(&t.admin), &["tokens", "create", "--role", "read", "--expires", "soon"]).await,
        "bad --expires",
    );
    // An expired token says so and how to get another.
    let out = ok(&fleetban(&url, Some(&t.admin), &["tokens", "create", "--role", "read", "--name", "old"]).await);
    let old = out.lines().last().unwrap().to_owned();
    sqlx::query("update api_tokens set expires_at = now() - interval '1 s' where name = 'old'")
        .execute(&pool)
        .await
        .unwrap();
    fails(&fleetban(&url, Some(&old), &["agents"]).await, "expired at");

    // enroll-token create / list / revoke.
    let out = ok(&fleetban(
        &url,
        Some(&t.admin),
        &["enroll-token", "create", "--uses", "3", "--expires", "2h", "--note", "batch 1"],
    )
    .await);
    let enroll = out.lines().last().unwrap().to_owned();
    assert!(enroll.starts_with("fbe_"), "{out}");
    let list = ok(&fleetban(&url, Some(&t.admin), &["enroll-token", "list"]).await);
    assert!(!list.contains(&enroll) && list.contains(&enroll[..12]), "{list}");
    assert!(list.contains("3/3") && list.contains("batch 1") && list.contains("active"), "{list}");
    let id: i64 = sqlx::query_scalar("select id from enrollment_tokens").fetch_one(&pool).await.unwrap();
    fails(&fleetban(&url, Some(&t.admin), &["enroll-token", "revoke", &id.to_string()]).await, "pass --yes");
    ok(&fleetban(&url, Some(&t.admin), &["enroll-token", "revoke", &id.to_string(), "--yes"]).await);
    let refused = fleetban_server::auth::enroll(&pool, &enroll, "mx9", "0.1.0", &[]).await.unwrap_err();
    assert!(refused.to_string().contains("revoked"), "{refused}");

    // agents rename / revoke / remove, by name or id.
    let out = ok(&fleetban(&url, Some(&t.admin), &["agents", "rename", "mx1", "mx1-old"]).await);
    assert_eq!(out, format!("Renamed agent {mx1} from \"mx1\" to \"mx1-old\".\n"));
    fails(&fleetban(&url, Some(&t.admin), &["agents", "rename", "mx1-old", "MX2"]).await, "409 conflict");
    fails(&fleetban(&url, Some(&t.admin), &["agents", "rename", "nosuch", "x"]).await, "no agent named");
    let agents = ok(&fleetban(&url, Some(&t.read), &["agents"]).await);
    assert!(agents.contains("mx1-old") && agents.contains(&mx1.to_string()), "{agents}");
    fails(&fleetban(&url, Some(&t.admin), &["agents", "revoke", "mx2"]).await, "pass --yes");
    let out = ok(&fleetban(&url, Some(&t.admin), &["agents", "revoke", "mx2", "--yes"]).await);
    assert_eq!(out, format!("Revoked agent \"mx2\" ({mx2}).\n"));
    assert!(
        ok(&fleetban(&url, Some(&t.read), &["agents"]).await)
            .lines()
            .any(|l| l.contains("mx2") && l.contains("revoked"))
    );
    fails(&fleetban(&url, Some(&t.admin), &["agents", "remove", &mx2.to_string()]).await, "pass --yes");
    let out = ok(&fleetban(&url, Some(&t.admin), &["--json", "agents", "remove", &mx2.to_string(), "--yes"]).await);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), serde_json::json!({ "removed": mx2 }));
    let agents = ok(&fleetban(&url, Some(&t.read), &["agents"]).await);
    assert!(!agents.contains("mx2") && agents.lines().count() == 2, "{agents}");

    // audit: newest first, who / what / target.
    let audit = ok(&fleetban(&url, Some(&t.read), &["audit"]).await);
    let lines: Vec<&str> = audit.lines().collect();
    assert!(lines[0].starts_with("TIME") && lines[0].contains("ACTOR") && lines[0].contains("TARGET"), "{audit}");
    assert!(lines[1].contains("agent.remove") && lines[1].contains(&mx2.to_string()), "{audit}");
    for action in
        ["agent.revoke", "agent.rename", "enroll_token.revoke", "enroll_token.create", "token.revoke", "token.create"]
    {
        assert!(audit.contains(action), "{action} in {audit}");
    }
    let renamed = lines.iter().find(|l| l.contains("agent.rename")).unwrap();
    assert!(renamed.contains("ops-admin") && renamed.contains("mx1-old"), "{renamed}");
    let json: Value =
        serde_json::from_str(&ok(&fleetban(&url, Some(&t.read), &["audit", "--json", "--action", "agent."]).await))
            .unwrap();
    let actions: Vec<&str> = json.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["agent.remove", "agent.revoke", "agent.rename"]);
    fails(&fleetban(&url, Some(&t.read), &["audit", "--since", "whenever"]).await, "400 bad request");
    server.stop().await;
}

#[tokio::test]
async fn a_database_outage_is_reported_as_such_not_as_a_bare_500() {
    // The API over a pool whose database cannot be reached (nothing listens
    // on port 1 of loopback).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_millis(500))
        .connect_lazy("postgres://fleetban@127.0.0.1:1/fleetban")
        .unwrap();
    let app = fleetban_server::api::router(fleetban_server::api::AppState::new(
        pool,
        fleetban_server::correlate::CorrelateConfig::default(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let response =
        reqwest::Client::new().get(format!("{url}/api/v1/agents")).bearer_auth("fbt_0000").send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
    let output = fleetban(&url, Some("fbt_0000"), &["agents"]).await;
    fails(&output, "503 service unavailable: the database is unavailable");
    server.abort();
}

/// `import` (dry run, then for real) and `export` through the binary.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn cli_imports_and_exports(pool: PgPool) {
    let server = common::Server::start(&pool).await;
    let url = server.url.clone();
    let t = common::tokens(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("csf.deny");
    std::fs::write(
        &file,
        "203.0.113.7 # lfd: 5 failed logins - Fri Nov 27 00:00:00 2026\ntcp|in|d=22|s=203.0.113.8\n198.0.0.0/8\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = ok(&fleetban(&url, Some(&t.admin), &["import", "--format", "csf-deny", "--dry-run", path]).await);
    assert!(out.starts_with("Dry run, nothing written: ") && out.contains("1 added, 0 already present, 2 skipped"));
    assert!(out.contains("line 2: advanced CSF filter") && out.contains("line 3: ") && out.contains("force"), "{out}");
    let live: i64 = sqlx::query_scalar("select count(*) from blocks").fetch_one(&pool).await.unwrap();
    assert_eq!(live, 0, "a dry run writes nothing");
    let out = ok(&fleetban(&url, Some(&t.admin), &["import", "--format", "csf-deny", "--force", path]).await);
    assert!(out.contains("2 added, 0 already present, 1 skipped"), "{out}");
    let json: Value = serde_json::from_str(&ok(&fleetban(
        &url,
        Some(&t.admin),
        &["--json", "import", "--format", "csf-deny", "--force", "--yes", path],
    )
    .await))
    .unwrap();
    assert_eq!(json["already_present"].as_array().unwrap().len(), 2);
    let exported = ok(&fleetban(&url, Some(&t.read), &["export", "--format", "csf-deny"]).await);
    assert_eq!(exported, "198.0.0.0/8 # imported\n203.0.113.7 # lfd: 5 failed logins\n");
    fails(&fleetban(&url, Some(&t.admin), &["import", "--format", "xml", path]).await, "bad --format");
    fails(&fleetban(&url, Some(&t.admin), &["import", "/nonexistent/file"]).await, "cannot read /nonexistent/file");
    fails(&fleetban(&url, Some(&t.read), &["import", path]).await, "403");
    server.stop().await;
}

/// Runs `fleetban ARGS` on a terminal (`script` gives it a pseudo-terminal)
/// and answers `answer` to whatever it asks.
async fn on_terminal(url: &str, token: &str, args: &[&str], answer: &str) -> (bool, String) {
    use tokio::io::AsyncWriteExt as _;
    let mut line = format!("{} --url {url} --token {token}", env!("CARGO_BIN_EXE_fleetban"));
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env_remove("FLEETBAN_URL")
        .env_remove("FLEETBAN_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(answer.as_bytes()).await.unwrap();
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the CLI answered in time")
        .unwrap();
    drop(stdin);
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

/// On a terminal, range actions ask first: `n` changes nothing, `y` and
/// `--yes` proceed; a single address is not asked about.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn cli_asks_before_range_actions_on_a_terminal(pool: PgPool) {
    let server = common::Server::start(&pool).await;
    let url = server.url.clone();
    let t = common::tokens(&pool).await;
    let allowed =
        || async { sqlx::query_scalar::<_, i64>("select count(*) from allowlist").fetch_one(&pool).await.unwrap() };
    let (ok_, out) = on_terminal(&url, &t.admin, &["allow", "198.51.100.0/24"], "n\n").await;
    assert!(!ok_ && out.contains("lifts every block inside it") && out.contains("Proceed? [y/N]"), "{out}");
    assert!(out.contains("aborted"), "{out}");
    assert_eq!(allowed().await, 0, "answering no changes nothing");
    let (ok_, out) = on_terminal(&url, &t.admin, &["allow", "198.51.100.0/24"], "y\n").await;
    assert!(ok_ && out.contains("Allowlisted 198.51.100.0/24"), "{out}");
    assert_eq!(allowed().await, 1);
    let (ok_, out) = on_terminal(&url, &t.admin, &["unallow", "198.51.100.0/24", "--yes"], "").await;
    assert!(ok_ && !out.contains("Proceed?"), "{out}");
    let (ok_, out) = on_terminal(&url, &t.admin, &["allow", "198.51.100.7"], "").await;
    assert!(ok_ && !out.contains("Proceed?"), "one address is not asked about: {out}");
    // An import shows its dry run first, then asks.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deny.txt");
    std::fs::write(&file, "203.0.113.7\n203.0.113.8\n").unwrap();
    let blocks =
        || async { sqlx::query_scalar::<_, i64>("select count(*) from blocks").fetch_one(&pool).await.unwrap() };
    let (ok_, out) = on_terminal(&url, &t.admin, &["import", file.to_str().unwrap()], "n\n").await;
    assert!(
        !ok_ && out.contains("Dry run, nothing written") && out.contains("2 added") && out.contains("Proceed?"),
        "{out}"
    );
    assert_eq!(blocks().await, 0, "answering no imports nothing");
    let (ok_, out) = on_terminal(&url, &t.admin, &["import", file.to_str().unwrap()], "y\n").await;
    assert!(ok_ && out.contains("2 added"), "{out}");
    assert_eq!(blocks().await, 2);
    server.stop().await;
}

/// `shadow`, `feeds` and `feed refresh` read the API's answers into its
/// types (a field the CLI expects that the API stopped sending fails here).
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn cli_shows_shadow_decisions_and_feeds(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list.txt");
    std::fs::write(&list, "203.0.113.5\n198.51.100.0/24\n").unwrap();
    let feed: fleetban_server::feeds::FeedConfig =
        toml::from_str(&format!("name = \"local-list\"\npath = \"{}\"\nformat = \"plain\"\n", list.display())).unwrap();
    feed.validate().unwrap();
    let feeds = fleetban_server::feeds::Feeds::new(vec![feed], vec![]).unwrap();
    let options = fleetban_server::serve::Options {
        feeds: std::sync::Arc::new(feeds),
        ..fleetban_server::serve::Options::default()
    };
    let server = common::Server::start_with(&pool, options).await;
    let url = server.url.clone();
    let t = common::tokens(&pool).await;
    sqlx::query(
        "insert into shadow_decisions (cidr, rule, source, evidence) \
         values ('203.0.113.0/24', 'prefix', 'auto', '{\"verdict\": \"4 hosts in 203.0.113.0/24\"}')",
    )
    .execute(&pool)
    .await
    .unwrap();

    let shadow = ok(&fleetban(&url, Some(&t.read), &["shadow"]).await);
    let lines: Vec<&str> = shadow.lines().collect();
    assert_eq!(lines.len(), 2, "{shadow}");
    assert!(lines[0].starts_with("DECIDED") && lines[0].contains("EVIDENCE"), "{shadow}");
    assert!(lines[1].contains("203.0.113.0/24") && lines[1].contains("prefix"), "{shadow}");
    assert!(lines[1].contains("4 hosts in 203.0.113.0/24"), "{shadow}");
    let json: Value = serde_json::from_str(&ok(&fleetban(&url, Some(&t.read), &["--json", "shadow"]).await)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json[0]["rule"], "prefix");

    // The server refreshes the feed once at start; a manual refresh while
    // that runs is refused (409 conflict): retry until it is accepted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refreshed = loop {
        let out = fleetban(&url, Some(&t.admin), &["feed", "refresh", "local-list"]).await;
        if out.status.success() {
            break ok(&out);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("409") && std::time::Instant::now() < deadline, "{stderr}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(refreshed.starts_with("local-list: 2 entries, 2 live blocks"), "{refreshed}");
    assert!(refreshed.lines().any(|l| l.starts_with("NAME") && l.contains("STATUS")), "{refreshed}");
    let listed = ok(&fleetban(&url, Some(&t.read), &["feeds"]).await);
    let row = listed.lines().find(|l| l.starts_with("local-list")).unwrap_or_else(|| panic!("{listed}"));
    assert!(row.contains(" ok "), "{listed}");
    let json: Value = serde_json::from_str(&ok(&fleetban(&url, Some(&t.read), &["--json", "feeds"]).await)).unwrap();
    assert_eq!(json[0]["name"], "local-list");
    assert_eq!(json[0]["entries"], 2);
    fails(&fleetban(&url, Some(&t.admin), &["feed", "refresh", "no-such-feed"]).await, "404");
    server.stop().await;
}
