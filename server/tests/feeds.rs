//! Blocklist feeds end to end against a fresh database: lists served by a
//! local HTTP server on 127.0.0.1 (or read from a file) in every format,
//! with hostile lines; the blocks they make (source `feed`, the feed's name
//! recorded, carved around the allowlist and `never_block`, in the pushed
//! snapshot); a failed fetch, a list with too many bad lines and a list that
//! shrank by 60 % keeping the previous list with the status saying why; a
//! removed entry retired by the next good refresh; one replica at a time;
//! `GET /api/v1/feeds` and `POST /api/v1/feeds/{name}/refresh`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use fleetban_server::api::{self, AppState};
use fleetban_server::blocks;
use fleetban_server::correlate::CorrelateConfig;
use fleetban_server::feeds::{FeedConfig, FeedFormat, Feeds, Outcome};
use ipnet::IpNet;
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt;

/// What the local list server answers: a status and a body.
type Served = Arc<Mutex<(u16, Vec<u8>)>>;

/// A list server on 127.0.0.1 answering `GET /list` with `served`; stops
/// with the test's runtime.
async fn list_server(served: Served) -> SocketAddr {
    let app = Router::new().route(
        "/list",
        axum::routing::get(move || {
            let served = served.clone();
            async move {
                let (status, body) = served.lock().unwrap().clone();
                (StatusCode::from_u16(status).unwrap(), body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn feed(name: &str, url: &str, format: FeedFormat) -> FeedConfig {
    let toml = format!("name = \"{name}\"\nurl = \"{url}\"\nformat = \"{}\"\n", format.as_str());
    let feed: FeedConfig = toml::from_str(&toml).unwrap();
    feed.validate().unwrap();
    feed
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Live blocks of `feed`: (cidr, source, evidence).
async fn feed_blocks(pool: &PgPool, feed: &str) -> Vec<(IpNet, String, Value)> {
    sqlx::query_as(
        "select cidr, source, evidence from blocks where revoked_at is null and evidence->>'feed' = $1 order by cidr",
    )
    .bind(feed)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn status(feeds: &Feeds, pool: &PgPool, name: &str) -> fleetban_server::feeds::FeedStatus {
    feeds.status(pool).await.unwrap().into_iter().find(|f| f.name == name).unwrap()
}

/// Is `addr` inside a live block (of any source)?
async fn blocked(pool: &PgPool, addr: &str) -> bool {
    sqlx::query_scalar(
        "select exists (select 1 from blocks where revoked_at is null and cidr >>= $1::inet \
         and (expires_at is null or expires_at > now()))",
    )
    .bind(net(&format!("{addr}/32")))
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn drop_feed_blocks_with_source_feed_carved_around_the_allowlist(pool: PgPool) {
    let policy = CorrelateConfig::default();
    sqlx::query("insert into allowlist (cidr, note) values ('198.51.100.7/32', 'partner MX')")
        .execute(&pool)
        .await
        .unwrap();
    let body = "; Spamhaus DROP List 2026/11/28 - (c) 2026 The Spamhaus Project\n\
                ; Last-Modified: Sat, 28 Nov 2026 12:00:00 GMT\n\
                198.51.100.0/24 ; SBL100\n\
                203.0.113.0/25 ; SBL101\n\
                2001:db8:bad::/48 ; SBL102\n\
                10.1.0.0/16 ; SBL103 private, never blocked\n\
                198.0.0.0/11 ; SBL104 broader than /16\n\
                192.0.2.0/26 ; SBL105\n\
                192.0.2.64/26 ; SBL106\n\
                192.0.2.128/26 ; SBL107\n\
                192.0.2.192/26 ; SBL108\n\
                203.0.113.128/26 ; SBL109\n\
                203.0.113.999/32 ; SBL110 hostile\n";
    let served: Served = Arc::new(Mutex::new((200, body.as_bytes().to_vec())));
    let addr = list_server(served.clone()).await;
    let feeds =
        Feeds::new(vec![feed("spamhaus-drop", &format!("http://{addr}/list"), FeedFormat::Drop)], vec![]).unwrap();
    assert_eq!(status(&feeds, &pool, "spamhaus-drop").await.status, "never");

    let outcome = feeds.refresh(&pool, &policy, "spamhaus-drop", true).await.unwrap();
    let Outcome::Ok { entries, refused, bad_lines, .. } = outcome else { panic!("{outcome:?}") };
    assert_eq!((entries, refused, bad_lines), (10, 2, 1), "the private and the broad entries are refused");

    let live = feed_blocks(&pool, "spamhaus-drop").await;
    assert!(live.iter().all(|(_, source, _)| source == "feed"));
    let cidrs: Vec<IpNet> = live.iter().map(|(c, ..)| *c).collect();
    assert!(cidrs.contains(&net("203.0.113.0/25")) && cidrs.contains(&net("2001:db8:bad::/48")));
    assert!(!cidrs.contains(&net("198.51.100.0/24")), "the allowlisted address is carved out");
    // The /24 is carved into 8 pieces around 198.51.100.7: every other
    // address is blocked, that one is not.
    assert_eq!(cidrs.iter().filter(|c| net("198.51.100.0/24").contains(*c)).count(), 8);
    assert!(!blocked(&pool, "198.51.100.7").await);
    for other in ["198.51.100.0", "198.51.100.6", "198.51.100.8", "198.51.100.255"] {
        assert!(blocked(&pool, other).await, "{other}");
    }
    assert!(!blocked(&pool, "10.1.0.1").await && !blocked(&pool, "198.1.0.1").await);
    let sbl = live.iter().find(|(c, ..)| *c == net("203.0.113.0/25")).unwrap();
    assert_eq!(sbl.2["label"], "SBL101");
    assert_eq!(sbl.2["entry"], "203.0.113.0/25");
    assert_eq!(sbl.2["escalates"], false, "third-party data never escalates to a prefix");

    // The blocks are in the blocklist agents are pushed.
    let snapshot = blocks::snapshot(&pool).await.unwrap();
    assert_eq!(snapshot.entries.len(), live.len());
    assert!(snapshot.entries.iter().all(|e| e.reason == "feed"));

    let st = status(&feeds, &pool, "spamhaus-drop").await;
    assert_eq!((st.status.as_str(), st.entries, st.refused, st.bad_lines), ("ok", 10, 2, 1));
    assert_eq!(st.blocks, live.len() as i64);
    assert!(st.last_success.is_some() && st.last_error.is_none());

    // A refresh of the same list writes nothing (the blocks have most of
    // their TTL left) and changes no version.
    let version = blocks::current_version(&pool).await.unwrap();
    let again = feeds.refresh(&pool, &policy, "spamhaus-drop", true).await.unwrap();
    assert!(matches!(again, Outcome::Ok { written: 0, retired: 0, .. }), "{again:?}");
    assert_eq!(blocks::current_version(&pool).await.unwrap(), version);
    // Not due yet without force.
    assert_eq!(feeds.refresh(&pool, &policy, "spamhaus-drop", false).await.unwrap(), Outcome::Skipped);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn plain_and_csv_feeds_over_http_and_from_a_file(pool: PgPool) {
    let policy = CorrelateConfig::default();
    let plain = "# scanners\n203.0.113.5\n203.0.113.6 # noisy\n2001:db8::66\n\n\
                 198.51.100.0/24\n192.0.2.1\n192.0.2.2\n192.0.2.3\n192.0.2.4\n192.0.2.5\n<script>\n";
    let served: Served = Arc::new(Mutex::new((200, plain.as_bytes().to_vec())));
    let addr = list_server(served.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("list.csv");
    std::fs::write(
        &csv_path,
        "first_seen,address,score\n2026-11-27,198.51.100.77,9\n2026-11-27,\"203.0.113.0/28\",5\n\
         2026-11-28,192.0.2.200,1\n2026-11-28,192.0.2.201,1\n2026-11-28,192.0.2.202,1\n\
         2026-11-28,192.0.2.203,1\n2026-11-28,192.0.2.204,1\n2026-11-28,192.0.2.205,1\n\
         2026-11-28,192.0.2.206,1\n2026-11-28,\u{1b}[2J,1\n",
    )
    .unwrap();
    let csv: FeedConfig = toml::from_str(&format!(
        "name = \"csv-list\"\npath = \"{}\"\nformat = \"csv\"\ncsv_column = 2\ncsv_header = true\n",
        csv_path.display()
    ))
    .unwrap();
    csv.validate().unwrap();
    let feeds =
        Feeds::new(vec![feed("plain-list", &format!("http://{addr}/list"), FeedFormat::Plain), csv], vec![]).unwrap();

    let plain_outcome = feeds.refresh(&pool, &policy, "plain-list", true).await.unwrap();
    assert!(matches!(plain_outcome, Outcome::Ok { entries: 9, bad_lines: 1, refused: 0, .. }), "{plain_outcome:?}");
    let cidrs: Vec<IpNet> = feed_blocks(&pool, "plain-list").await.into_iter().map(|(c, ..)| c).collect();
    for want in ["203.0.113.5/32", "203.0.113.6/32", "2001:db8::66/128", "198.51.100.0/24"] {
        assert!(cidrs.contains(&net(want)), "{want} in {cidrs:?}");
    }

    let csv_outcome = feeds.refresh(&pool, &policy, "csv-list", true).await.unwrap();
    assert!(matches!(csv_outcome, Outcome::Ok { entries: 9, bad_lines: 1, .. }), "{csv_outcome:?}");
    let csv_blocks = feed_blocks(&pool, "csv-list").await;
    let cidrs: Vec<IpNet> = csv_blocks.iter().map(|(c, ..)| *c).collect();
    assert!(cidrs.contains(&net("203.0.113.0/28")) && cidrs.contains(&net("192.0.2.206/32")));
    // 198.51.100.77 is already blocked by the plain feed's /24: the CSV
    // feed's /32 is a block of its own (a narrower range).
    assert!(cidrs.contains(&net("198.51.100.77/32")));
    assert!(csv_blocks.iter().all(|(_, source, ev)| source == "feed" && ev["feed"] == "csv-list"));

    // A missing file fails and keeps the list.
    std::fs::remove_file(&csv_path).unwrap();
    let failed = feeds.refresh(&pool, &policy, "csv-list", true).await.unwrap();
    assert!(matches!(&failed, Outcome::Failed { error } if error.contains("cannot read")), "{failed:?}");
    assert_eq!(feed_blocks(&pool, "csv-list").await.len(), csv_blocks.len());
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn failures_and_shrinks_keep_the_previous_list(pool: PgPool) {
    let recorder = api::metrics::install().expect("the Prometheus recorder installs");
    let policy = CorrelateConfig::default();
    let ten: String = (1..=10).map(|i| format!("203.0.113.{i}\n")).collect();
    let served: Served = Arc::new(Mutex::new((200, ten.into_bytes())));
    let addr = list_server(served.clone()).await;
    let feeds = Feeds::new(vec![feed("list", &format!("http://{addr}/list"), FeedFormat::Plain)], vec![]).unwrap();
    assert!(matches!(feeds.refresh(&pool, &policy, "list", true).await.unwrap(), Outcome::Ok { entries: 10, .. }));
    let first = status(&feeds, &pool, "list").await;
    assert_eq!(feed_blocks(&pool, "list").await.len(), 10);

    // The server fails: the previous list stays, the status says why.
    *served.lock().unwrap() = (503, b"maintenance".to_vec());
    let failed = feeds.refresh(&pool, &policy, "list", true).await.unwrap();
    assert!(matches!(&failed, Outcome::Failed { error } if error.contains("503")), "{failed:?}");
    let st = status(&feeds, &pool, "list").await;
    assert_eq!(st.status, "failed");
    assert!(st.last_error.as_deref().unwrap().contains("503"));
    assert_eq!((st.last_success, st.entries), (first.last_success, 10));
    assert_eq!(feed_blocks(&pool, "list").await.len(), 10);

    // Garbage (a captive portal's HTML): too many bad lines.
    *served.lock().unwrap() = (200, b"<html>\n<body>Please log in</body>\n</html>\n203.0.113.1\n".to_vec());
    let garbage = feeds.refresh(&pool, &policy, "list", true).await.unwrap();
    assert!(matches!(&garbage, Outcome::Failed { error } if error.contains("malformed")), "{garbage:?}");
    assert_eq!(feed_blocks(&pool, "list").await.len(), 10);

    // A 60 % shrink: held.
    let four: String = (1..=4).map(|i| format!("203.0.113.{i}\n")).collect();
    *served.lock().unwrap() = (200, four.into_bytes());
    let held = feeds.refresh(&pool, &policy, "list", true).await.unwrap();
    assert!(matches!(&held, Outcome::Held { error } if error.contains("shrank from 10 to 4")), "{held:?}");
    let st = status(&feeds, &pool, "list").await;
    assert_eq!((st.status.as_str(), st.entries), ("held", 10));
    assert_eq!(feed_blocks(&pool, "list").await.len(), 10);
    for i in 1..=10 {
        assert!(blocked(&pool, &format!("203.0.113.{i}")).await);
    }

    // An unreachable server (nothing listens on the port any more).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let gone =
        Feeds::new(vec![feed("list", &format!("http://{closed_addr}/list"), FeedFormat::Plain)], vec![]).unwrap();
    let refused = gone.refresh(&pool, &policy, "list", true).await.unwrap();
    assert!(matches!(refused, Outcome::Failed { .. }), "{refused:?}");
    assert_eq!(feed_blocks(&pool, "list").await.len(), 10);

    // Every outcome is counted by feed and outcome.
    let metrics = recorder.render();
    for outcome in ["ok", "failed", "held"] {
        let series = format!("fleetban_feed_refreshes_total{{feed=\"list\",outcome=\"{outcome}\"}}");
        assert!(metrics.contains(&series), "{series} missing from:\n{metrics}");
    }
    assert!(metrics.contains("fleetban_feed_bad_lines_total{feed=\"list\"}"), "{metrics}");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn removed_entries_are_retired_by_the_next_good_refresh(pool: PgPool) {
    let policy = CorrelateConfig::default();
    let served: Served = Arc::new(Mutex::new((200, b"203.0.113.1\n203.0.113.2\n203.0.113.3\n203.0.113.4\n".to_vec())));
    let addr = list_server(served.clone()).await;
    let feeds = Feeds::new(vec![feed("list", &format!("http://{addr}/list"), FeedFormat::Plain)], vec![]).unwrap();
    feeds.refresh(&pool, &policy, "list", true).await.unwrap();
    let version = blocks::current_version(&pool).await.unwrap();
    let removed: i64 =
        sqlx::query_scalar("select id from blocks where cidr = '203.0.113.4/32'").fetch_one(&pool).await.unwrap();

    *served.lock().unwrap() = (200, b"203.0.113.1\n203.0.113.2\n203.0.113.3\n".to_vec());
    let outcome = feeds.refresh(&pool, &policy, "list", true).await.unwrap();
    assert!(matches!(outcome, Outcome::Ok { entries: 3, retired: 1, written: 0, .. }), "{outcome:?}");
    assert!(!blocked(&pool, "203.0.113.4").await);
    let (cause, reason): (String, String) =
        sqlx::query_as("select revoked_cause, revoked_reason from blocks where id = $1")
            .bind(removed)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(cause, "expired", "not an operator's revocation");
    assert!(reason.contains("no longer in feed list"), "{reason}");
    // Agents get the removal as a delta.
    let delta = blocks::changes_since(&pool, version, None).await.unwrap().unwrap();
    assert_eq!((delta.removed, delta.added.len()), (vec![removed], 0));

    // An allowlist entry added later is carved out by the next refresh.
    sqlx::query("insert into allowlist (cidr, note) values ('203.0.113.2/32', 'ours')").execute(&pool).await.unwrap();
    let outcome = feeds.refresh(&pool, &policy, "list", true).await.unwrap();
    assert!(matches!(outcome, Outcome::Ok { retired: 1, refused: 1, .. }), "{outcome:?}");
    assert!(!blocked(&pool, "203.0.113.2").await && blocked(&pool, "203.0.113.3").await);
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn one_replica_refreshes_at_a_time(pool: PgPool) {
    let policy = CorrelateConfig::default();
    let served: Served = Arc::new(Mutex::new((200, b"203.0.113.1\n".to_vec())));
    let addr = list_server(served).await;
    let feeds = Feeds::new(vec![feed("list", &format!("http://{addr}/list"), FeedFormat::Plain)], vec![]).unwrap();
    // Another replica holds the list's lock.
    let mut other = pool.begin().await.unwrap();
    let held: bool =
        sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtext('fleetban_feed'), hashtext('list'))")
            .fetch_one(&mut *other)
            .await
            .unwrap();
    assert!(held);
    assert_eq!(feeds.refresh(&pool, &policy, "list", true).await.unwrap(), Outcome::Skipped);
    assert!(feed_blocks(&pool, "list").await.is_empty());
    other.rollback().await.unwrap();
    assert!(matches!(feeds.refresh(&pool, &policy, "list", true).await.unwrap(), Outcome::Ok { .. }));
}

async fn call(app: &Router, method: Method, uri: &str, token: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty());
    let response = app.clone().oneshot(request.unwrap()).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn api_lists_and_refreshes_feeds(pool: PgPool) {
    let t = common::tokens(&pool).await;
    let served: Served = Arc::new(Mutex::new((200, b"203.0.113.0/24 ; SBL1\n".to_vec())));
    let addr = list_server(served.clone()).await;
    let feeds = Feeds::new(vec![feed("drop", &format!("http://{addr}/list"), FeedFormat::Drop)], vec![]).unwrap();
    let app = api::router(AppState::new(pool.clone(), CorrelateConfig::default()).with_feeds(Arc::new(feeds)));

    let (status, list) = call(&app, Method::GET, "/api/v1/feeds", &t.read).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list[0]["name"], "drop");
    assert_eq!(list[0]["status"], "never");

    let (status, _) = call(&app, Method::POST, "/api/v1/feeds/drop/refresh", &t.read).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(&app, Method::POST, "/api/v1/feeds/drop/refresh", &t.admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["result"]["outcome"], "ok");
    assert_eq!(body["feed"]["status"], "ok");
    assert_eq!(body["feed"]["blocks"], 1);
    assert!(blocked(&pool, "203.0.113.9").await);
    let (status, _) = call(&app, Method::POST, "/api/v1/feeds/nope/refresh", &t.admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    *served.lock().unwrap() = (500, Vec::new());
    let (status, body) = call(&app, Method::POST, "/api/v1/feeds/drop/refresh", &t.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["result"]["outcome"], "failed");
    let (_, list) = call(&app, Method::GET, "/api/v1/feeds", &t.read).await;
    assert_eq!(list[0]["status"], "failed");
    assert!(list[0]["last_error"].as_str().unwrap().contains("500"));
    assert!(!list[0]["last_success"].is_null());
    let audited: i64 = sqlx::query_scalar("select count(*) from audit_log where action = 'feed.refresh'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(audited, 2);
}

async fn fleetban_cli(url: &str, token: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban"))
        .env_remove("FLEETBAN_URL")
        .env_remove("FLEETBAN_TOKEN")
        .args(["--url", url, "--token", token])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

/// The running server refreshes its feeds on its own (the first tick is at
/// start), and `fleetban feeds` / `fleetban feed refresh NAME` show and
/// drive them.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn the_server_refreshes_feeds_and_the_cli_shows_them(pool: PgPool) {
    let t = common::tokens(&pool).await;
    let served: Served = Arc::new(Mutex::new((200, b"203.0.113.0/24 ; SBL1\n198.51.100.0/24 ; SBL2\n".to_vec())));
    let addr = list_server(served.clone()).await;
    let feeds = Feeds::new(vec![feed("drop", &format!("http://{addr}/list"), FeedFormat::Drop)], vec![]).unwrap();
    let options = fleetban_server::serve::Options { feeds: Arc::new(feeds), ..Default::default() };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", http.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listeners = fleetban_server::serve::Listeners { grpc, http };
    let server = tokio::spawn(fleetban_server::serve::run(pool.clone(), options, listeners, async move {
        let _ = stopped.await;
    }));

    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !blocked(&pool, "198.51.100.9").await {
        assert!(tokio::time::Instant::now() < deadline, "the server did not refresh its feed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let out = fleetban_cli(&url, &t.read, &["feeds"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with("drop ")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" ok ") && row.contains(&format!("http://{addr}/list")), "{row}");

    *served.lock().unwrap() = (500, Vec::new());
    let out = fleetban_cli(&url, &t.admin, &["feed", "refresh", "drop"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("drop: failed: HTTP status 500") && text.contains("previous list stays"), "{text}");
    let out = fleetban_cli(&url, &t.read, &["--json", "feeds"]).await;
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["status"], "failed");
    assert_eq!(json[0]["entries"], 2);
    assert!(blocked(&pool, "198.51.100.9").await, "the previous list stays in force");
    let out = fleetban_cli(&url, &t.admin, &["feed", "refresh", "nope"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no feed named"), "{}", String::from_utf8_lossy(&out.stderr));

    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), server).await.unwrap().unwrap().unwrap();
}
