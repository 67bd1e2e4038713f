//! `fleetban-server token create` and `fleetban-server asn import` as an
//! operator runs them: the printed token works against the API with its
//! role, and an imported ASN file is looked up.

mod common;

use std::io::Write;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use fleetban_server::api::{self, AppState};
use fleetban_server::correlate::CorrelateConfig;
use sqlx::PgPool;
use tower::ServiceExt;

/// The URL of the test's own database.
fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").unwrap();
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{}", pool.connect_options().get_database().unwrap())
}

async fn server_command(pool: &PgPool, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban-server"))
        .args(args)
        .env("DATABASE_URL", database_url(pool))
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

async fn status(pool: &PgPool, method: &str, uri: &str, token: &str) -> StatusCode {
    let app = api::router(AppState::new(pool.clone(), CorrelateConfig::default()));
    let mut request = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {token}"));
    let body = if method == "POST" {
        request = request.header("content-type", "application/json");
        Body::from(r#"{"cidr": "203.0.113.7", "reason": "r"}"#)
    } else {
        Body::empty()
    };
    app.oneshot(request.body(body).unwrap()).await.unwrap().status()
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn token_create_prints_a_working_token(pool: PgPool) {
    let out = server_command(&pool, &["token", "create", "--role", "read", "--name", "grafana"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(read.starts_with("fbt_"), "{read}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("grafana"));
    assert_eq!(status(&pool, "GET", "/api/v1/agents", &read).await, StatusCode::OK);
    assert_eq!(status(&pool, "POST", "/api/v1/blocks", &read).await, StatusCode::FORBIDDEN);

    let out = server_command(&pool, &["token", "create", "--role", "admin"]).await;
    assert!(out.status.success());
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_ne!(admin, read);
    assert_eq!(status(&pool, "POST", "/api/v1/blocks", &admin).await, StatusCode::CREATED);
    let audit: Vec<(String, String, String)> =
        sqlx::query_as("select actor, action, target from audit_log order by id").fetch_all(&pool).await.unwrap();
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert_eq!(audit[0], ("fleetban-server".into(), "token.create".into(), "grafana".into()));
    assert_eq!((audit[1].0.as_str(), audit[1].1.as_str()), ("fleetban-server", "token.create"));
    assert!(audit[2].0.starts_with("admin-") && audit[2].1 == "block.create", "{audit:?}");

    let bad = server_command(&pool, &["token", "create", "--role", "root"]).await;
    assert!(!bad.status.success());
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn admin_commands_log_plain_text_without_postgres_notices(pool: PgPool) {
    // The default log level (RUST_LOG unset), stderr a pipe as under journald.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban-server"))
        .args(["token", "create", "--role", "read"])
        .env("DATABASE_URL", database_url(&pool))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The schema exists, so applying migrations makes Postgres say
    // `relation "_sqlx_migrations" already exists, skipping`.
    assert!(!stderr.contains("already exists") && !stderr.contains("notice"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI codes in non-terminal output: {stderr:?}");
    assert!(stderr.contains("Created read token"), "{stderr}");
}

#[tokio::test]
async fn database_errors_name_the_target_and_the_expected_url_form() {
    let run = |url: &'static str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fleetban-server"))
            .args(["token", "create", "--role", "read"])
            .env("DATABASE_URL", url)
            .env("RUST_BACKTRACE", "0")
            .output()
    };
    let out = run("fleetban:s3cret@db.example/fleetban").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("must start with postgres://") && stderr.contains(fleetban_server::db::URL_FORM),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
    // Nothing listens on port 1 of loopback.
    let out = run("postgres://fleetban:s3cret@127.0.0.1:1/fleetban").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("127.0.0.1:1/fleetban") && stderr.contains("is Postgres running"), "{stderr}");
    assert!(!stderr.contains("s3cret") && !stderr.contains("pool timed out"), "{stderr}");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn asn_import_loads_the_iptoasn_file(pool: PgPool) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "203.0.113.0\t203.0.113.255\t64500\tNL\tEXAMPLE-NET").unwrap();
    writeln!(file, "198.51.100.0\t198.51.100.255\t0\tNone\tNot routed").unwrap();
    writeln!(file, "broken line").unwrap();
    let path = file.path().to_str().unwrap().to_owned();
    let out = server_command(&pool, &["asn", "import", &path]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Imported 1 ASN ranges (1 unrouted and 1 malformed lines skipped)"), "{text}");
    let info = fleetban_server::asn::lookup(&pool, "203.0.113.9".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(info.asn, 64500);
    let action: String = sqlx::query_scalar("select action from audit_log").fetch_one(&pool).await.unwrap();
    assert_eq!(action, "asn.import");

    let missing = server_command(&pool, &["asn", "import", "/nonexistent/ip2asn.tsv"]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/ip2asn.tsv"));
}

/// `fleetban-server token create --expires`, `token list|revoke` and
/// `enroll-token list|revoke`: what an operator with database access uses
/// when no API token works any more.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn token_and_enroll_token_list_and_revoke(pool: PgPool) {
    let out = server_command(&pool, &["token", "create", "--role", "admin", "--name", "ops", "--expires", "30d"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(String::from_utf8_lossy(&out.stderr).contains("expires 20"), "{}", String::from_utf8_lossy(&out.stderr));
    let expires: bool = sqlx::query_scalar(
        "select expires_at between now() + interval '29 days' and now() + interval '31 days' from api_tokens",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(expires);
    let out = server_command(&pool, &["token", "list"]).await;
    let list = String::from_utf8(out.stdout).unwrap();
    assert!(list.contains("ops") && list.contains(&token[..12]) && !list.contains(&token), "{list}");
    let id: i64 = sqlx::query_scalar("select id from api_tokens").fetch_one(&pool).await.unwrap();
    let out = server_command(&pool, &["token", "revoke", &id.to_string()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&pool, "GET", "/api/v1/agents", &token).await, StatusCode::UNAUTHORIZED);
    let again = server_command(&pool, &["token", "revoke", &id.to_string()]).await;
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already revoked"));

    let out =
        server_command(&pool, &["enroll-token", "create", "--uses", "2", "--expires", "1h", "--note", "rack 4"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let enroll = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let list = String::from_utf8(server_command(&pool, &["enroll-token", "list"]).await.stdout).unwrap();
    assert!(list.contains("rack 4") && list.contains("2/2") && !list.contains(&enroll), "{list}");
    let id: i64 = sqlx::query_scalar("select id from enrollment_tokens").fetch_one(&pool).await.unwrap();
    assert!(server_command(&pool, &["enroll-token", "revoke", &id.to_string()]).await.status.success());
    assert!(fleetban_server::auth::enroll(&pool, &enroll, "mx1", "0.1.0", &[]).await.is_err());
    let list = String::from_utf8(server_command(&pool, &["enroll-token", "list", "--all"]).await.stdout).unwrap();
    assert!(list.contains("revoked"), "{list}");
    let actions: Vec<String> =
        sqlx::query_scalar("select action from audit_log order by id").fetch_all(&pool).await.unwrap();
    assert_eq!(actions, ["token.create", "token.revoke", "enroll_token.create", "enroll_token.revoke"]);
}
