//! The `run`, `status` and `backfill` commands, driven as a user would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/corpus/exim/real-exim-4.96-full-selectors.log");

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetban-agent")).args(args).env("RUST_LOG", "warn").output().expect("run agent")
}

fn write_config(dir: &Path, log: &Path, start_at: &str, extra: &str) -> PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"http://127.0.0.1:9\"\nstate_dir = \"{}\"\ntimezone = \"UTC\"\n[firewall]\nbackend = \"dry-run\"\n{extra}\n[[source]]\nkind = \"exim\"\npath = \"{}\"\nstart_at = \"{start_at}\"\n",
            dir.join("state").display(),
            log.display()
        ),
    )
    .expect("write config");
    config
}

fn status(config: &Path) -> serde_json::Value {
    let output = agent(&["status", "--config", config.to_str().expect("utf-8")]);
    assert!(output.status.success(), "status failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("status prints JSON")
}

fn spawn_run(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fleetban-agent"))
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agent")
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = child.wait().expect("wait");
    assert!(status.success(), "agent exit: {status}");
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bad_config_fails_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &dir.path().join("log"), "end", "[spool]\nfsync_ms = 0\n");
    for command in ["run", "status"] {
        let output = agent(&[command, "--config", config.to_str().expect("utf-8")]);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("spool.fsync_ms"), "{command}: {stderr}");
    }
    let config = write_config(dir.path(), &dir.path().join("log"), "middle", "");
    let output = agent(&["run", "--config", config.to_str().expect("utf-8")]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("start_at"));
}

#[test]
fn check_config_refuses_a_time_zone_that_run_would_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let config = write_config(dir.path(), &log, "end", "");
    let text = std::fs::read_to_string(&config).expect("read config");
    for (zone, valid) in [("Europe/Berln", false), ("Europe/Berlin", true)] {
        std::fs::write(&config, text.replace("timezone = \"UTC\"", &format!("timezone = \"{zone}\""))).expect("write");
        let path = config.to_str().expect("utf-8");
        let checked = agent(&["check-config", "--no-host", "--config", path]);
        let stderr = String::from_utf8_lossy(&checked.stderr);
        assert_eq!(checked.status.success(), valid, "check-config {zone}: {stderr}");
        if !valid {
            assert!(stderr.contains("timezone") && stderr.contains("Europe/Berln"), "{stderr}");
            // `run` refuses it the same way, before starting anything.
            let run = agent(&["run", "--config", path]);
            assert!(!run.status.success());
            assert!(String::from_utf8_lossy(&run.stderr).contains("timezone"));
        }
    }
}

#[test]
fn run_spools_new_lines_without_a_server_and_status_reports_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("exim_mainlog");
    let corpus = std::fs::read(CORPUS).expect("corpus");
    std::fs::write(&log, &corpus).expect("write log");
    // Every line an event (`[aggregate]` off): the test compares the events
    // of `run` and `backfill` one for one, which summaries (cut at other
    // moments by the wall clock) would not allow.
    let config = write_config(dir.path(), &log, "end", "[aggregate]\nenabled = false\n");

    let fresh = status(&config);
    assert_eq!(fresh["sources"][0]["offset"], serde_json::Value::Null);
    assert_eq!(fresh["spool"]["pending_events"], 0);
    assert_eq!(fresh["uplink"]["connected"], serde_json::Value::Null);

    let child = spawn_run(&config);
    // start_at = "end": the existing lines are skipped; the start is checkpointed.
    let size = corpus.len() as u64;
    wait_for("start checkpoint", || status(&config)["sources"][0]["offset"] == size);
    assert_eq!(status(&config)["spool"]["pending_events"], 0);
    std::fs::OpenOptions::new().append(true).open(&log).expect("open").write_all(&corpus).expect("append");
    wait_for("appended lines", || status(&config)["sources"][0]["offset"] == 2 * size);
    let running = status(&config);
    assert_eq!(running["uplink"]["connected"], false, "{running}");
    assert_eq!(running["uplink"]["enrolled"], false, "{running}");
    assert_eq!(running["firewall"]["backend"], "dry-run", "{running}");
    assert!(running["spool"]["pending_events"].as_u64().expect("count") > 10, "{running}");
    assert_eq!(
        running["sources"][0]["fingerprint"],
        format!("{:016x}", fleetban_agent::tail::fingerprint_file(&log).expect("fingerprint"))
    );

    // The spool is held by the running agent: backfill refuses clearly.
    let output = agent(&["backfill", "--config", config.to_str().expect("utf-8"), "--from", CORPUS]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use"));
    stop(child);

    let pending = running["spool"]["pending_events"].as_u64().expect("count");
    let output = agent(&["backfill", "--config", config.to_str().expect("utf-8"), "--from", CORPUS]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("backfill:"), "plain progress lines when not on a terminal: {stderr}");
    let after = status(&config);
    assert_eq!(after["spool"]["pending_events"].as_u64().expect("count"), 2 * pending, "backfill adds the same events");
    assert_eq!(after["sources"][0]["offset"], 2 * size, "backfill leaves the live checkpoint alone");
}
