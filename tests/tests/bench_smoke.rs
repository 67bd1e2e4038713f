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
