//! The `parse` and `gen-log` subcommands, run as the installed binary would be.

use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_fleetban-agent");

#[test]
fn parse_reads_stdin_and_prints_json_and_a_summary_line() {
    let mut child = Command::new(BIN)
        .args(["parse", "--json", "--tz", "Europe/Berlin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = b"2026-07-15 14:00:00 SMTP connection from [192.0.2.1]:4000 (TCP/IP connection count = 7)\n\
                  not a log line\n\
                  2026-07-15 14:00:01 +0000 H=(x) [192.0.2.2]:1 F=<a@b> rejected RCPT <c@d>: relay not permitted\n\
                  2026-07-15 14:00:02 dovecot_login authenticator failed for (x) [8.8.8.8]:25 (y) [198.51.100.88]:1234: 535 Incorrect authentication data\n";
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["ts"], "2026-07-15T12:00:00.000Z", "zone-less stamp read in --tz");
    assert_eq!(rows[0]["count"], 7);
    assert_eq!(rows[1]["ts"], "2026-07-15T14:00:01.000Z", "explicit offset wins");
    assert_eq!(rows[1]["kind"], "relay_denied");
    assert_eq!(String::from_utf8(out.stderr).unwrap().trim(), "lines=4 events=2 ignored=2 ambiguous=1");
}

#[test]
fn parse_rejects_an_unknown_zone_and_a_missing_file() {
    let out = Command::new(BIN).args(["parse", "--tz", "Mars/Olympus", "-"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Mars/Olympus"));
    let out = Command::new(BIN).args(["parse", "/nonexistent/exim_mainlog"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/exim_mainlog"));
}

#[test]
fn gen_log_is_deterministic_and_parseable() {
    let run =
        |seed: &str| Command::new(BIN).args(["gen-log", "--lines", "2000", "--seed", seed]).output().unwrap().stdout;
    let a = run("7");
    assert_eq!(a, run("7"));
    assert_ne!(a, run("8"));
    assert_eq!(a.iter().filter(|b| **b == b'\n').count(), 2000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gen.log");
    std::fs::write(&path, &a).unwrap();
    let out = Command::new(BIN).args(["parse", "--tz", "UTC"]).arg(&path).output().unwrap();
    let summary = String::from_utf8(out.stderr).unwrap();
    let events: u64 = summary.split("events=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    // Every session's end (`closed by QUIT`, `lost`, ...) is an event too.
    assert!((1400..1900).contains(&events), "{summary}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for kind in ["connect", "accepted", "auth_failed", "no_mail", "refused_too_many", "closed"] {
        assert!(stdout.contains(&format!("  {kind} ")), "{kind} missing:\n{stdout}");
    }
}
