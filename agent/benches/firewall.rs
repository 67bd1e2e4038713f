//! Agent firewall and detection benchmarks (run as root; they create their
//! own network namespaces and delete them afterwards):
//!
//! - nftables: a 100 000-element initial load, and 1 000-change deltas
//!   (500 added, 500 removed) on top of it, through the reconciler, in one
//!   namespace;
//! - detection latency: the 30th connect line of a connection-rate attacker
//!   is written to a followed log file; the time until the nft commit that
//!   holds the attacker's element has returned (element present in the
//!   kernel) is measured, with the 100k blocklist loaded.
//!
//! `cargo bench -p fleetban-agent --bench firewall` (release profile).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetban_agent::config::{AgentConfig, FirewallBackend, FirewallScope, StartAt};
use fleetban_agent::firewall::reconcile::{FirewallStats, Reconciler};
use fleetban_agent::firewall::{Exec, backend_of, now_ms};
use fleetban_agent::parse::{LogKind, Timezone};
use fleetban_agent::pipeline::{Pipeline, PipelineOptions, SourceSpec};
use fleetban_agent::service::{ServiceOptions, Services};
use fleetban_agent::spool::{Spool, SpoolOptions};
use fleetban_proto::v1::{BlockEntry, BlocklistDelta, BlocklistSnapshot};
use ipnet::IpNet;

fn block(id: i64, ip: Ipv4Addr, expires_at_ms: i64) -> BlockEntry {
    BlockEntry {
        block_id: id,
        cidr: Some(IpNet::from(std::net::IpAddr::V4(ip)).into()),
        expires_at_ms,
        reason: "bench".into(),
    }
}

/// 100 000 hosts of 198.18.0.0/15 (the benchmarking range).
fn fleet(count: u32) -> BlocklistSnapshot {
    let hour = now_ms() + 3_600_000;
    BlocklistSnapshot {
        version: 1,
        entries: (0..count).map(|i| block(i64::from(i) + 1, Ipv4Addr::from(0xC612_0000 + i), hour)).collect(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} min={:.1?} p50={:.1?} p99={:.1?} max={:.1?}",
        samples.len(),
        samples[0],
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

fn nftables(ns: &support::Netns) {
    let exec = || Exec { netns: Some(ns.server.clone()) };
    let mut loads = Vec::new();
    for _ in 0..5 {
        let backend = backend_of(FirewallBackend::Nftables, FirewallScope::Smtp, std::env::temp_dir(), exec());
        let mut fw = Reconciler::new(backend, vec![], None, Arc::new(FirewallStats::default()));
        fw.flush().expect("flush");
        fw.reconcile(now_ms()).expect("reconcile");
        let snapshot = fleet(100_000);
        let started = Instant::now();
        let changes = fw.apply_snapshot(&snapshot, now_ms()).expect("load");
        loads.push(started.elapsed());
        assert_eq!(changes, 100_000);
    }
    report("nftables initial load, 100000 elements", loads);

    // Deltas of 1000 changes on top of the loaded 100k set.
    let backend = backend_of(FirewallBackend::Nftables, FirewallScope::Smtp, std::env::temp_dir(), exec());
    let mut fw = Reconciler::new(backend, vec![], None, Arc::new(FirewallStats::default()));
    fw.reconcile(now_ms()).expect("reconcile");
    fw.apply_snapshot(&fleet(100_000), now_ms()).expect("load");
    let hour = now_ms() + 3_600_000;
    let mut deltas = Vec::new();
    let mut next_id = 100_001i64;
    let mut next_ip = 0xC612_0000u32 + 100_000;
    let mut oldest = 1i64;
    for round in 0..30u64 {
        let added: Vec<BlockEntry> = (0..500)
            .map(|_| {
                let entry = block(next_id, Ipv4Addr::from(next_ip), hour);
                next_id += 1;
                next_ip += 1;
                entry
            })
            .collect();
        let removed: Vec<i64> = (oldest..oldest + 500).collect();
        oldest += 500;
        let delta = BlocklistDelta { from_version: round + 1, to_version: round + 2, added, removed };
        let started = Instant::now();
        fw.apply_delta(&delta, now_ms()).expect("delta");
        deltas.push(started.elapsed());
    }
    assert_eq!(fw.entries(), 100_000);
    assert_eq!(fw.reconcile(now_ms()).expect("reconcile"), 0, "the kernel holds exactly the desired set");
    report("nftables delta, 1000 changes on 100000 elements", deltas);
    fw.flush().expect("flush");
}

fn connect_line(ip: Ipv4Addr, port: u32) -> String {
    let now = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S%.3f");
    format!("{now} [1234] SMTP connection from [{ip}]:{port} I=[203.0.113.1]:25 (TCP/IP connection count = 5)\n")
}

fn detection(ns: &support::Netns) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("exim_mainlog");
    std::fs::write(&log, "").expect("log");
    let toml = format!(
        "server = \"http://127.0.0.1:1\"\nstate_dir = \"{}\"\ntimezone = \"UTC\"\n[firewall]\nbackend = \"nftables\"\n",
        dir.path().display()
    );
    let config = AgentConfig::from_toml(&toml, Path::new("bench.toml")).expect("config");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (applied_tx, applied_rx) = std::sync::mpsc::channel();
    let (spool, _) = Spool::open(&config.spool_dir(), SpoolOptions::with_max_bytes(64 << 20)).expect("spool");
    let _guard = runtime.enter();
    let services = Services::start(
        &config,
        Timezone::from_config("UTC").expect("tz"),
        ServiceOptions { netns: Some(ns.server.clone()), applied: Some(applied_tx), insecure: false },
    )
    .expect("services");
    // The fleet blocklist is loaded, as on a real host.
    let firewall = services.firewall();
    runtime.block_on(firewall.snapshot(fleet(100_000))).expect("snapshot");
    let sources = [SourceSpec { path: log.clone(), start_at: StartAt::Beginning, kind: LogKind::Exim }];
    let pipeline =
        Pipeline::start(spool, &sources, |s| services.parser(s.kind), PipelineOptions::default()).expect("pipeline");
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).expect("open log");
    let mut samples = Vec::new();
    // Attackers from 198.19.200.0 on: outside the fleet list (198.18.0.0 to
    // 198.19.134.159), so every local block is a real kernel change.
    for attacker in 0..60u32 {
        let ip = Ipv4Addr::from(0xC613_C800 + attacker);
        let mut lines = String::new();
        for port in 0..29 {
            lines.push_str(&connect_line(ip, 40_000 + port));
        }
        file.write_all(lines.as_bytes()).expect("write");
        std::thread::sleep(Duration::from_millis(30));
        let written = Instant::now();
        file.write_all(connect_line(ip, 50_000).as_bytes()).expect("write");
        let (net, applied) = applied_rx.recv_timeout(Duration::from_secs(10)).expect("local block applied");
        assert_eq!(net, IpNet::from(std::net::IpAddr::V4(ip)));
        samples.push(applied.duration_since(written));
        std::thread::sleep(Duration::from_millis(20));
    }
    report("detection latency, log line written -> nft element present (100k loaded)", samples);
    let listing = ns.exec_server(&["nft", "list", "set", "inet", "fleetban", "v4_32"]);
    let present =
        (0..60u32).filter(|i| listing.contains(&format!("{} timeout", Ipv4Addr::from(0xC613_C800 + i)))).count();
    assert_eq!(present, 60, "every attacker's element is in the kernel");
    assert_eq!(firewall.entries(), 100_060, "every local block was a new element");
    pipeline.shutdown().expect("pipeline");
    drop(firewall);
    runtime.block_on(services.shutdown());
    let backend = backend_of(
        FirewallBackend::Nftables,
        FirewallScope::Smtp,
        std::env::temp_dir(),
        Exec { netns: Some(ns.server.clone()) },
    );
    Reconciler::new(backend, vec![], None, Arc::default()).flush().expect("flush");
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return;
    }
    if !support::root_or_skip("firewall benchmarks") {
        return;
    }
    let ns = support::Netns::new("bench");
    nftables(&ns);
    detection(&ns);
}
