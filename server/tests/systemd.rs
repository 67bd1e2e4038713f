//! `fleetban-server serve` under systemd (`Type=notify`): `READY=1` arrives
//! on `$NOTIFY_SOCKET` only once the migrations are applied and both
//! listeners accept connections; `STOPPING=1` when SIGTERM starts the drain.
//! (Blocking socket calls inside the async test are deliberate: nothing else
//! runs on its runtime while it waits.)

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use sqlx::PgPool;

const BIN: &str = env!("CARGO_BIN_EXE_fleetban-server");

/// The URL of the test's own database.
async fn url(pool: &PgPool) -> String {
    let db: String = sqlx::query_scalar("select current_database()").fetch_one(pool).await.unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{db}")
}

fn receive(socket: &UnixDatagram, wait: Duration) -> Option<String> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("HTTP listener accepts at READY");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// The address after `label` in the READY status line
/// (`Listening: gRPC ADDR, HTTP ADDR`).
fn address(status: &str, label: &str) -> SocketAddr {
    let line = status.lines().find_map(|line| line.strip_prefix("STATUS=")).expect("a STATUS line");
    let rest = line.split(label).nth(1).unwrap_or_else(|| panic!("no {label:?} in {line:?}"));
    let token = rest.split(',').next().unwrap().trim();
    token.parse().unwrap_or_else(|_| panic!("bad address {token:?} in {line:?}"))
}

#[sqlx::test(migrations = false)]
async fn ready_after_migrations_and_listening_stopping_on_sigterm(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--database-url"])
        .arg(url(&pool).await)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let ready = receive(&socket, Duration::from_secs(60)).expect("READY=1 within 60 s");
    assert!(ready.lines().any(|line| line == "READY=1"), "{ready:?}");
    // The migrations were applied before READY: every one is recorded.
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations where success")
        .fetch_one(&pool)
        .await
        .expect("the migrations table exists at READY");
    assert_eq!(applied as usize, fleetban_server::db::MIGRATOR.iter().count());
    // Both listeners accept at READY.
    let http = address(&ready, "HTTP ");
    let grpc = address(&ready, "gRPC ");
    let readyz = get(http, "/readyz");
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");
    TcpStream::connect(grpc).expect("gRPC listener accepts at READY");

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let stopping = receive(&socket, Duration::from_secs(30)).expect("STOPPING=1 after SIGTERM");
    assert!(stopping.lines().any(|line| line == "STOPPING=1"), "{stopping:?}");
    let status = child.wait().unwrap();
    assert!(status.success(), "server exit: {status}");
}
