//! `fleetban-bench` still runs against the current server: a short ingest
//! and propagation run with small numbers, checked for the figures it
//! prints. (The figures themselves are measured with the release binary and
//! recorded in BENCHMARKS.md; this only keeps the bench from rotting.)

mod common;

use std::process::Command;

/// A fresh database on the test cluster.
fn fresh_database() -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by the ctor");
    let name = format!("fleetban_bench_{}", uuid::Uuid::new_v4().simple());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let admin = sqlx::PgPool::connect(&base).await.expect("connect to the test cluster");
        sqlx::query(&format!("create database {name}")).execute(&admin).await.expect("create database");
        admin.close().await;
    });
    let (prefix, _) = base.rsplit_once('/').expect("DATABASE_URL has a database name");
    format!("{prefix}/{name}")
}

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetban-bench"))
        .args(args)
        .env("DATABASE_URL", fresh_database())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fleetban-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fleetban-bench {args:?} failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The number right before `unit` on the line starting with `prefix` that
/// has `unit`.
fn figure(stdout: &str, prefix: &str, unit: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(unit))
        .unwrap_or_else(|| panic!("no {prefix:?} line with {unit:?}: {stdout}"));
    let before = line.split(unit).next().unwrap_or_default();
    before
        .split_whitespace()
        .last()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {unit:?} in {line:?}"))
}

#[test]
fn ingest_stores_what_it_acknowledges() {
    let out = bench(&[
        "ingest",
        "--agents",
        "3",
        "--batch",
        "200",
        "--warmup-secs",
        "0",
        "--seconds",
        "2",
        "--copy-rows",
        "2000",
    ]);
    assert!(figure(&out, "ingest: ", "events acked") > 0.0, "{out}");
    assert!(figure(&out, "ingest: ", "events/s") > 0.0, "{out}");
    // Everything acknowledged was stored (more may be stored: batches in
    // flight when the measured period ended).
    let acked = figure(&out, "ingest: ", "events acked");
    let stored =
        out.lines().find_map(|l| l.strip_prefix("ingest: ").and_then(|r| r.strip_suffix(" events stored in total")));
    let stored: f64 = stored.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no stored total: {out}"));
    assert!(stored >= acked, "{out}");
    assert!(figure(&out, "reference: ", "rows/s") > 0.0, "{out}");
}

#[test]
fn propagation_reaches_every_agent() {
    let out = bench(&["propagation", "--agents", "5", "--blocks", "5", "--pause-ms", "10"]);
    let line = out.lines().find(|l| l.contains("commit -> delta at every agent")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("5 agents") && line.contains("(5 samples)"), "{line}");
}

/// Runs `fleetban-bench fleet ARGS` against the real server binary (from
/// `FLEETBAN_BIN_DIR`, or next to the bench); returns its `fleet-json` line,
/// parsed and as text.
fn fleet(args: &[&str]) -> (serde_json::Value, String) {
    let bins = match std::env::var_os("FLEETBAN_BIN_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::path::Path::new(env!("CARGO_BIN_EXE_fleetban-bench")).parent().expect("bin dir").to_path_buf(),
    };
    let server = bins.join("fleetban-server");
    assert!(server.is_file(), "{} is missing: cargo build -p fleetban-server first", server.display());
    let mut all = vec!["fleet"];
    all.extend_from_slice(args);
    all.extend(["--server-bin", server.to_str().expect("utf-8 path")]);
    let out = bench(&all);
    let json = out
        .lines()
        .find_map(|l| l.strip_prefix("fleet-json: "))
        .unwrap_or_else(|| panic!("no fleet-json: {out}"))
        .to_owned();
    (serde_json::from_str(&json).expect("fleet-json is JSON"), json)
}

/// A small fleet against the real server binary: every agent connects,
/// every block reaches every agent (idle and under traffic), the agents are
/// all back after the server is killed and restarted, and what the
/// simulated agents had acknowledged is what the database holds.
#[test]
fn fleet_runs_against_the_real_server_and_stores_each_batch_once() {
    let (r, json) = fleet(&[
        "--hosts",
        "30",
        "--agents-per-process",
        "12",
        "--seconds",
        "3",
        "--warmup-secs",
        "1",
        "--idle-blocks",
        "3",
        "--block-interval-ms",
        "200",
        "--drain-secs",
        "60",
    ]);
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no number {k}: {json}"));
    assert_eq!(n("processes"), 3.0, "{json}");
    assert!(n("kb_per_session") > 0.0, "{json}");
    assert!(n("offered_events_per_sec") > 0.0 && n("stored_event_rows_per_sec") > 0.0, "{json}");
    assert_eq!(n("idle_blocks_incomplete"), 0.0, "{json}");
    assert_eq!(n("blocks_incomplete"), 0.0, "{json}");
    assert!(n("blocks_committed") >= 10.0, "{json}");
    assert!(n("propagation_p99_ms") < 5_000.0, "{json}");
    assert!(n("storm_all_back_ms") < 60_000.0, "{json}");
    assert_eq!(r["drained"], true, "{json}");
    assert_eq!(n("final_stored_events"), n("final_acked_events"), "{json}");
    assert_eq!(n("final_acked_events"), n("final_generated_events"), "{json}");
    assert_eq!(r["exactly_once"], true, "{json}");
}

/// The same fleet with the agents' context aggregation: what the simulated
/// agents had acknowledged (individual events, summaries and the lines those
/// cover) is what the database holds, and every line the hosts wrote is
/// stored once, as an event or counted in a summary.
#[test]
fn fleet_in_summarised_mode_stores_events_and_summaries_once_covering_every_line() {
    let (r, json) = fleet(&[
        "--hosts",
        "30",
        "--agents-per-process",
        "12",
        "--context",
        "summarised",
        "--seconds",
        "3",
        "--warmup-secs",
        "1",
        "--idle-blocks",
        "2",
        "--block-interval-ms",
        "200",
        "--skip-storm",
        "--drain-secs",
        "60",
    ]);
    let n = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no number {k}: {json}"));
    assert_eq!(r["context"], "summarised", "{json}");
    assert_eq!(r["drained"], true, "{json}");
    assert_eq!(n("dropped_events"), 0.0, "{json}");
    // Stored rows are what was acknowledged: events and summaries.
    assert_eq!(n("final_stored_events"), n("final_acked_events"), "{json}");
    assert_eq!(n("final_stored_summaries"), n("final_acked_summaries"), "{json}");
    assert_eq!(n("final_stored_summary_lines"), n("final_acked_summary_lines"), "{json}");
    assert!(n("final_stored_summaries") > 0.0, "the drain flushes the open summaries: {json}");
    assert!(n("final_stored_summary_lines") > n("final_stored_summaries"), "{json}");
    // Every line generated is stored once: as an event or in a summary.
    assert_eq!(n("final_stored_events") + n("final_stored_summary_lines"), n("final_generated_events"), "{json}");
    assert!(n("final_stored_events") < n("final_generated_events"), "context was summarised: {json}");
    assert_eq!(r["exactly_once"], true, "{json}");
}
