//! The `fleetban-server` binary's operator commands: `enroll-token create`,
//! `pki init`, and `serve` refusing plaintext on a network listener.

mod common;

use std::process::Command;

use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_fleetban-server");

/// The URL of the test's own database.
async fn url(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(pool).await.unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{db}")
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn enroll_token_create_prints_a_token_good_for_its_uses(pool: PgPool) {
    let out = Command::new(BIN)
        .args(["enroll-token", "create", "--uses", "2", "--ttl", "1h", "--database-url", &url(&pool).await])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with(fleetban_server::auth::TOKEN_PREFIX), "{token}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&token), "the token was logged");
    for host in ["mx1", "mx2"] {
        fleetban_server::auth::enroll(&pool, &token, host, "0.1.0", &[]).await.unwrap();
    }
    assert!(fleetban_server::auth::enroll(&pool, &token, "mx3", "0.1.0", &[]).await.is_err());
    let bad = Command::new(BIN).args(["enroll-token", "create", "--ttl", "1y"]).output().unwrap();
    assert!(!bad.status.success());
}

#[test]
fn pki_init_writes_the_files_and_serve_refuses_plaintext_on_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["pki", "init", "--dir"])
        .arg(dir.path())
        .args(["--server-name", "fleetban.example"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let out = Command::new(BIN)
        .args(["serve", "--grpc-listen", "0.0.0.0:0", "--database-url", "postgres://unused@127.0.0.1:1/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing plaintext gRPC") && stderr.contains("--insecure"), "{stderr}");
}

#[test]
fn check_config_refuses_what_serve_would() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("server.toml");
        std::fs::write(&path, text).unwrap();
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("DATABASE_URL")
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let good = "database_url = \"postgres://fleetban@127.0.0.1/fleetban\"\ngrpc_listen = \"127.0.0.1:50051\"\n";
    let out = check(good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    for (text, named) in [
        ("database_url = \"fleetban@db.example/fleetban\"\n", "postgres://"),
        (&format!("{good}max_event_age_days = 90\n"), "max_event_age_days"),
        (&format!("{good}[limits]\nhttp_idle_timeout_secs = 5\n"), "limits.http_idle_timeout_secs"),
        // Plaintext gRPC on the network, as `serve` refuses it.
        ("database_url = \"postgres://fleetban@127.0.0.1/fleetban\"\ngrpc_listen = \"0.0.0.0:50051\"\n", "plaintext"),
        // TLS files that cannot be read.
        (&format!("{good}[tls]\ncert_file = \"/nonexistent/s.pem\"\nkey_file = \"/nonexistent/s.key\"\n"), "s.pem"),
        ("grpc_listen = \"127.0.0.1:50051\"\n", "database_url"),
    ] {
        let out = check(text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}: accepted");
        assert!(stderr.to_lowercase().contains(&named.to_lowercase()), "{text}: {stderr}");
    }
}
