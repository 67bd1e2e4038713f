//! The agent as a systemd service sees it: `READY=1` on `$NOTIFY_SOCKET`
//! only after the firewall's first reconcile, with metrics already served,
//! `STOPPING=1` on SIGTERM; and `check-config` as an installer uses it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fleetban-agent");

fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("metrics endpoint listens");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Receives one notification datagram (as text), or `None` after `wait`.
fn receive(socket: &UnixDatagram, wait: Duration) -> Option<String> {
    socket.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn ready_after_the_first_reconcile_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"http://127.0.0.1:9\"\nstate_dir = \"{state}\"\ntimezone = \"UTC\"\n\
             [firewall]\nbackend = \"dry-run\"\n[metrics]\nlisten = \"{metrics}\"\n\
             [[source]]\npath = \"{log}\"\n",
            state = dir.path().join("state").display(),
            log = dir.path().join("exim_mainlog").display(),
        ),
    )
    .expect("config");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn agent");

    let ready = receive(&socket, Duration::from_secs(60)).expect("READY=1 within 60 s");
    assert!(ready.lines().any(|line| line == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=Running: 1 source(s), dry-run firewall reconciled"), "{ready:?}");
    // At READY the first reconcile has run and the metrics endpoint answers.
    let text = scrape(metrics);
    let reconciles = metric(&text, "fleetban_agent_firewall_reconciles_total").expect("reconcile counter");
    assert!(reconciles >= 1, "READY before the first reconcile:\n{text}");
    assert_eq!(receive(&socket, Duration::from_millis(300)), None, "one READY only");

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let stopping = receive(&socket, Duration::from_secs(30)).expect("STOPPING=1 after SIGTERM");
    assert!(stopping.lines().any(|line| line == "STOPPING=1"), "{stopping:?}");
    let status = child.wait().expect("wait");
    assert!(status.success(), "agent exit: {status}");
}

fn check_config(config: &Path, extra: &[&str]) -> Output {
    Command::new(BIN).arg("check-config").arg("--config").arg(config).args(extra).output().expect("run check-config")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

const GOOD: &str = "server = \"https://fleet.example.net:50051\"\nstate_dir = \"/var/lib/fleetban\"\n\
                    [firewall]\nbackend = \"dry-run\"\n[allowlist]\ncidrs = [\"192.0.2.0/24\"]\n\
                    [[source]]\npath = \"/var/log/exim_mainlog\"\n";

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(dir.path(), "good.toml", GOOD);
    let output = check_config(&good, &[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));
    // The only warning is the dry-run backend; --strict turns it into a failure.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning: key `firewall.backend`"), "{stderr}");
    assert!(!check_config(&good, &["--strict", "--no-host"]).status.success());
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.example.toml");
    let output = check_config(Path::new(example), &["--no-host"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn check_config_names_the_offending_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, &str)] = &[
        ("server = \"https://fleet.example.net:50051\"\nstat_dir = \"/x\"\n", "stat_dir"),
        ("server = \"http://192.0.2.1:50051\"\n", "server"),
        ("server = \"https://a.example:1\"\n[firewall]\nbackend = \"iptables\"\n", "backend"),
        ("server = \"https://a.example:1\"\n[allowlist]\ncidrs = [\"192.0.2.1/24\"]\n", "cidrs"),
        ("server = \"https://a.example:1\"\n[[source]]\npath = \"exim_mainlog\"\n", "source[0].path"),
        ("server = \"https://a.example:1\"\n", "`source`"),
        (
            "server = \"https://a.example:1\"\nca_file = \"ca.pem\"\n[[source]]\npath = \"/var/log/exim_mainlog\"\n",
            "ca_file",
        ),
        (
            "server = \"https://a.example:1\"\n[allowlist]\ncidrs = [\"0.0.0.0/0\"]\n[[source]]\npath = \"/l\"\n",
            "allowlist.cidrs[0]",
        ),
    ];
    for (index, (text, key)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("bad{index}.toml"), text);
        let output = check_config(&path, &["--no-host"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{text:?} passed: {stderr}");
        assert!(stderr.contains(key), "{text:?}: the error does not name {key}: {stderr}");
    }
    let output = check_config(&dir.path().join("missing.toml"), &[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read"));
}
