//! `fleetban-agent firewall list [--json]` and `fleetban-agent why IP` as an
//! operator runs them, on the dry-run backend (the kernel backends and CSF
//! are covered by `firewall_kernel.rs` and `firewall_csf.rs` with the same
//! scenario, `common_inspect`).

mod common_inspect;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use fleetban_agent::firewall::dryrun::{DryRun, FILE_NAME};
use fleetban_agent::firewall::reconcile::Reconciler;
use fleetban_agent::firewall::{Entry, now_ms};
use fleetban_proto::v1::{BlockEntry, BlocklistSnapshot};
use ipnet::IpNet;

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetban-agent")).args(args).env("RUST_LOG", "warn").output().expect("run agent")
}

fn ok(output: &Output) -> String {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn dry_run_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let path = state.join(FILE_NAME);
    common_inspect::inspection_joins_the_kernel_with_the_state(&|| Box::new(DryRun::new(path.clone())));
}

fn config(dir: &Path) -> String {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"http://127.0.0.1:9\"\nstate_dir = \"{}\"\ntimezone = \"UTC\"\n[firewall]\nbackend = \"dry-run\"\n\
             [allowlist]\ncidrs = [\"203.0.113.0/24\"]\n[[source]]\nkind = \"exim\"\npath = \"{}\"\n",
            dir.join("state").display(),
            dir.join("exim_mainlog").display()
        ),
    )
    .unwrap();
    config.display().to_string()
}

#[test]
fn list_and_why_commands() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = config(dir.path());
    // What a running agent leaves: a fleet block and a local one.
    let now = now_ms();
    let mut r =
        Reconciler::new(Box::new(DryRun::new(state.join(FILE_NAME))), vec![], Some(state.clone()), Arc::default());
    r.apply_snapshot(
        &BlocklistSnapshot {
            version: 2,
            entries: vec![BlockEntry {
                block_id: 13,
                cidr: Some("198.51.100.0/24".parse::<IpNet>().unwrap().into()),
                expires_at_ms: now + 3_600_000,
                reason: "campaign".into(),
            }],
        },
        now,
    )
    .unwrap();
    r.add_local(
        Entry { net: "192.0.2.7/32".parse().unwrap(), expires_at_ms: Some(now + 600_000), reason: "auth".into() },
        now,
    )
    .unwrap();
    r.shutdown().unwrap();

    let table = ok(&agent(&["firewall", "list", "--config", &config]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("CIDR") && lines[0].contains("SOURCE") && lines[0].contains("REASON"), "{table}");
    assert!(lines[1].starts_with("192.0.2.7/32") && lines[1].contains("local") && lines[1].contains("auth"), "{table}");
    assert!(lines[2].starts_with("198.51.100.0/24") && lines[2].contains("fleet   13"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&agent(&["firewall", "list", "--json", "--config", &config]))).unwrap();
    assert_eq!(json[1]["sources"][0]["block_id"], 13);
    assert_eq!(json[0]["sources"][0]["origin"], "local");

    let why = ok(&agent(&["why", "198.51.100.77", "--config", &config]));
    assert!(why.starts_with("198.51.100.77 is blocked on this host by the entry 198.51.100.0/24"), "{why}");
    assert!(why.contains("from fleet block 13 198.51.100.0/24 (campaign"), "{why}");
    let why = ok(&agent(&["why", "203.0.113.5", "--config", &config]));
    assert!(why.starts_with("203.0.113.5 is not blocked") && why.contains("allowlisted"), "{why}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&agent(&["why", "192.0.2.7", "--json", "--config", &config]))).unwrap();
    assert_eq!(json["entry"]["sources"][0]["origin"], "local");
    let bad = agent(&["why", "not-an-ip", "--config", &config]);
    assert!(!bad.status.success());
}
