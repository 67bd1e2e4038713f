//! The precision benchmark's generator, checked against the real parser and
//! against Exim's slot rules over whole generated fleets.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use fleetban_agent::parse::{EventKind, Parser, Timezone};
use fleetban_tests::traffic::{Class, Config, Generator, HostLog, Label, Labels, score};

fn fleet(config: Config) -> (Vec<HostLog>, Labels) {
    let mut g = Generator::new(config).unwrap();
    let logs: Vec<HostLog> = (0..g.config().hosts).map(|h| g.generate_host(h)).collect();
    (logs, g.labels())
}

/// Every line meant as an event parses as that kind and address at its
/// time; every other line parses as nothing.
fn assert_parses(logs: &[HostLog]) -> usize {
    let mut events = 0;
    for log in logs {
        let mut parser = Parser::new(Timezone::Utc);
        for line in &log.lines {
            let got = parser.feed(line.text.as_bytes());
            match (line.expect, got) {
                (Some((kind, ip)), Some(ev)) => {
                    assert_eq!((ev.kind, ev.ip, ev.time_ms), (kind, ip, line.time_ms), "{}: {}", log.name, line.text);
                    events += 1;
                }
                (None, None) => {}
                (want, got) => panic!("{}: {}\nwanted {want:?}, parsed {:?}", log.name, line.text, got.map(|e| e.kind)),
            }
        }
        let stats = parser.stats();
        assert_eq!(stats.lines, log.lines.len() as u64);
        assert_eq!(stats.events as usize, log.lines.iter().filter(|l| l.expect.is_some()).count());
    }
    events
}

#[test]
fn every_generated_line_parses_as_intended() {
    let (logs, _) = fleet(Config::small(7));
    let events = assert_parses(&logs);
    assert!(events > 5_000, "{events}");
    // With +millisec too, and a start that is not midnight.
    let (logs, _) = fleet(Config { millisec: true, start_ms: 1_790_000_123_456, ..Config::small(8) });
    assert_parses(&logs);
}

/// Replays a host's log the way Exim's daemon counts: connects open a
/// session (count = open sessions including it), end lines close it by
/// ip:port and pid, refusals happen exactly when the host is full.
fn assert_slots(log: &HostLog, max: usize) -> (u64, u64) {
    let mut parser = Parser::new(Timezone::Utc);
    // (ip, port) -> session pid once known.
    let mut open: HashMap<(IpAddr, u16), Option<u32>> = HashMap::new();
    let (mut connects, mut refused) = (0, 0);
    let mut last_time = i64::MIN;
    let pid_of = |text: &str| -> u32 {
        let start = text.find('[').unwrap() + 1;
        text[start..start + text[start..].find(']').unwrap()].parse().unwrap()
    };
    let mut daemon = None;
    for line in &log.lines {
        assert!(line.time_ms >= last_time, "{}: out of order: {}", log.name, line.text);
        last_time = line.time_ms;
        let Some(ev) = parser.feed(line.text.as_bytes()) else { continue };
        let key = (ev.ip, ev.port.unwrap());
        let pid = pid_of(&line.text);
        match ev.kind {
            EventKind::Connect => {
                assert!(open.len() < max, "{}: connect while full: {}", log.name, line.text);
                assert!(open.insert(key, None).is_none(), "{}: ip:port reused while open: {}", log.name, line.text);
                assert_eq!(ev.count, Some(open.len() as u32), "{}: {}", log.name, line.text);
                assert_eq!(*daemon.get_or_insert(pid), pid, "connects come from the daemon");
                connects += 1;
            }
            EventKind::RefusedTooMany => {
                assert_eq!(open.len(), max, "{}: refused while not full: {}", log.name, line.text);
                assert_eq!(*daemon.get_or_insert(pid), pid);
                refused += 1;
            }
            kind => {
                let session =
                    open.get_mut(&key).unwrap_or_else(|| panic!("{}: no open session: {}", log.name, line.text));
                assert_eq!(
                    *session.get_or_insert(pid),
                    pid,
                    "{}: pid differs within a session: {}",
                    log.name,
                    line.text
                );
                if kind.ends_session() {
                    open.remove(&key);
                }
            }
        }
    }
    assert!(open.is_empty(), "{}: {} sessions never ended", log.name, open.len());
    (connects, refused)
}

#[test]
fn hosts_simulate_their_slots_faithfully() {
    for seed in 3..7 {
        slots_of_seed(seed);
    }
}

fn slots_of_seed(seed: u64) {
    let config = Config::small(seed);
    let max = config.smtp_accept_max as usize;
    let (logs, labels) = fleet(config);
    assert_parses(&logs);
    let mut full_hosts = 0;
    for log in &logs {
        let (connects, refused) = assert_slots(log, max);
        assert_eq!((connects, refused), (log.sessions, log.refused));
        if refused > 0 {
            full_hosts += 1;
            assert_eq!(log.peak_open as usize, max);
        }
    }
    // Slot floods fill at least two hosts.
    assert!(full_hosts >= 2, "{full_hosts}");
    // Legitimate senders were refused there too, and those that retry got
    // their mail through later.
    let refused_legit: Vec<_> = labels.sources.iter().filter(|s| s.label == Label::Legit && s.refused > 0).collect();
    assert!(!refused_legit.is_empty(), "no legitimate sender was refused during a flood");
}

#[test]
fn floods_refuse_big_providers_who_retry_later() {
    // The full-size slot count over a shorter day, so the test stays quick.
    let (logs, labels) = fleet(Config { hosts: 12, hours: 6, ..Config::full(5) });
    let mut parser = Parser::new(Timezone::Utc);
    let providers: BTreeSet<IpAddr> =
        labels.sources.iter().filter(|s| s.class == Class::BigProvider).map(|s| s.range.addr()).collect();
    let mut refused_then_accepted = 0;
    for log in &logs {
        let mut refused: BTreeSet<IpAddr> = BTreeSet::new();
        for line in &log.lines {
            let Some(ev) = parser.feed(line.text.as_bytes()) else { continue };
            if !providers.contains(&ev.ip) {
                continue;
            }
            match ev.kind {
                EventKind::RefusedTooMany => {
                    refused.insert(ev.ip);
                }
                EventKind::Accepted if refused.remove(&ev.ip) => refused_then_accepted += 1,
                _ => {}
            }
        }
        assert_slots(log, 100);
    }
    assert_parses(&logs);
    assert!(refused_then_accepted > 0, "no provider was refused and delivered later");
}

#[test]
fn labels_cover_every_class_with_its_hard_cases() {
    let (logs, labels) = fleet(Config::small(11));
    let classes: BTreeSet<Class> = labels.sources.iter().map(|s| s.class).collect();
    assert_eq!(classes.len(), 16, "{classes:?}");
    for s in &labels.sources {
        assert_eq!(s.label, s.class.label());
        assert!(s.lines > 0 && !s.hosts.is_empty());
    }
    // First lines are the earliest line each source wrote anywhere.
    let mut first: HashMap<IpAddr, i64> = HashMap::new();
    let mut parser = Parser::new(Timezone::Utc);
    for log in &logs {
        for line in &log.lines {
            if let Some(ev) = parser.feed(line.text.as_bytes()) {
                let f = first.entry(ev.ip).or_insert(i64::MAX);
                *f = (*f).min(ev.time_ms);
            }
        }
    }
    for s in labels.sources.iter().filter(|s| s.label == Label::Attack) {
        let earliest = if s.members.is_empty() {
            first[&s.range.addr()]
        } else {
            assert!(s.members.iter().all(|m| s.range.contains(m)));
            s.members.iter().map(|m| first[m]).min().unwrap()
        };
        assert_eq!(s.first_any_line_ms, earliest, "{}", s.range);
        // Its first abusive line is the first of its attack lines, at or
        // after its first line (a connect, or a refusal while a host was full).
        if s.attack_lines_ms.is_empty() {
            // Only ever refused while a host was full: not scored.
            assert_eq!(s.abuse_lines, 0);
            continue;
        }
        assert_eq!(s.attack_lines_ms.first(), Some(&s.first_line_ms), "{}", s.range);
        assert!(s.first_line_ms >= earliest, "{s:?}");
        assert!(s.attack_lines_ms.windows(2).all(|w| w[0] <= w[1]));
        assert!(s.attack_lines_ms.len() as u64 >= s.abuse_lines);
    }
    let by = |c: Class| labels.sources.iter().filter(move |s| s.class == c);
    // Ranges: the campaign is one /24, the rotation one /64, each with many members.
    let campaign: Vec<_> = by(Class::Campaign24).collect();
    assert_eq!(campaign.len(), 1);
    assert_eq!(campaign[0].range.prefix_len(), 24);
    assert!(campaign[0].members.len() >= 15, "{}", campaign[0].members.len());
    let rotation: Vec<_> = by(Class::Ipv6Rotation).collect();
    assert_eq!(rotation[0].range.prefix_len(), 64);
    assert!(rotation[0].members.len() >= 8);
    // Distributed brute force: a few failures on each of many hosts.
    for s in by(Class::DistributedAuth) {
        assert!(s.hosts.len() >= 3 && s.abuse_lines <= 4 * s.hosts.len() as u64, "{s:?}");
    }
    // ESPs write unknown recipients on several hosts and also deliver.
    let esp_hosts: BTreeSet<&String> =
        by(Class::EspStaleList).filter(|s| s.abuse_lines > 0).flat_map(|s| &s.hosts).collect();
    assert!(esp_hosts.len() >= 3, "{esp_hosts:?}");
    // Office typos: a failure on exactly two hosts, at most two per host.
    for s in by(Class::OfficeNat) {
        assert!((2..=4).contains(&s.abuse_lines), "{s:?}");
    }
    // Slot floods never write an abuse-kind line.
    for s in by(Class::SlotFlood) {
        assert_eq!(s.abuse_lines, 0);
        assert!(s.refused > 0 || s.lines > 10);
    }
    // A legitimate neighbour in the /24 next to the campaign and in the /48
    // of the rotation.
    let legit: Vec<_> = labels.sources.iter().filter(|s| s.label == Label::Legit).collect();
    assert!(legit.iter().any(|s| "198.19.76.0/24".parse::<ipnet::IpNet>().unwrap().contains(&s.range)));
    assert!(legit.iter().any(|s| "2001:db8:bad::/48".parse::<ipnet::IpNet>().unwrap().contains(&s.range)));
}

#[test]
fn generation_is_deterministic_in_the_seed() {
    let (a, la) = fleet(Config::small(21));
    let (b, lb) = fleet(Config::small(21));
    let (c, _) = fleet(Config::small(22));
    assert_eq!(la, lb);
    assert!(a.iter().zip(&b).all(|(x, y)| x.lines == y.lines));
    assert!(a.iter().zip(&c).any(|(x, y)| x.lines != y.lines));
}

#[test]
fn labels_and_scorer_fit_together() {
    let (_, labels) = fleet(Config::small(4));
    let attacks: Vec<_> = labels.sources.iter().filter(|s| s.label == Label::Attack).collect();
    // An ideal detector: every attacker's range, one second after its first line.
    let ideal: Vec<(ipnet::IpNet, i64)> = attacks.iter().map(|s| (s.range, s.first_line_ms + 1000)).collect();
    let s = score(&labels, &ideal);
    assert!(s.goal_met(), "{s}");
    assert_eq!(s.median_time_to_block_ms, Some(1000));
    // Blocking the providers' /24s hurts.
    let provider = labels.sources.iter().find(|s| s.class == Class::BigProvider).unwrap();
    let net = ipnet::IpNet::new(provider.range.addr(), 24).unwrap().trunc();
    let s = score(&labels, &[(net, labels.start_ms)]);
    assert!(s.legit_blocked.len() > 1, "{s}");
    assert!(s.legit_blocked.iter().all(|l| l.class == Class::BigProvider));
}

#[test]
fn write_fleet_writes_logs_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let summary = fleetban_tests::traffic::write_fleet(Config::small(2), dir.path()).unwrap();
    assert_eq!(summary.hosts.len(), 5);
    let labels = Labels::read(&dir.path().join("labels.json")).unwrap();
    assert_eq!(labels.hosts, ["mx01", "mx02", "mx03", "mx04", "mx05"]);
    let mut total = 0;
    for h in &labels.hosts {
        let text = std::fs::read_to_string(dir.path().join(h).join("exim_mainlog")).unwrap();
        total += text.lines().count() as u64;
    }
    assert_eq!(total, summary.lines);
}

#[test]
fn the_binary_generates_and_scores() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_fleetban-traffic");
    let out = dir.path().join("fleet");
    let status = std::process::Command::new(bin)
        .args(["generate", "--small", "--seed", "9", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(String::from_utf8_lossy(&status.stdout).contains("lines/host/hour"));
    let labels = Labels::read(&out.join("labels.json")).unwrap();
    assert_eq!(labels.seed, 9);
    // Block every attacker two seconds after its first line, and one big
    // provider's address.
    let mut decisions: Vec<serde_json::Value> = labels
        .sources
        .iter()
        .filter(|s| s.label == Label::Attack)
        .map(|s| serde_json::json!({"range": s.range.to_string(), "time_ms": s.first_line_ms + 2000}))
        .collect();
    let provider = labels.sources.iter().find(|s| s.class == Class::BigProvider).unwrap();
    decisions.push(serde_json::json!({"range": provider.range.to_string(), "time_ms": labels.start_ms}));
    let path = dir.path().join("decisions.json");
    std::fs::write(&path, serde_json::to_vec(&decisions).unwrap()).unwrap();
    let output = std::process::Command::new(bin)
        .args(["score", "--json", "--labels"])
        .arg(out.join("labels.json"))
        .arg("--decisions")
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let score: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(score["attackers_blocked"], score["attackers_total"]);
    assert_eq!(score["median_time_to_block_ms"], 2000);
    assert_eq!(score["legit_blocked"].as_array().unwrap().len(), 1);
    assert_eq!(score["legit_blocked"][0]["range"], provider.range.to_string());
    // A decisions file with an unknown field is refused, not half-read.
    std::fs::write(&path, br#"[{"range": "198.19.77.0/24", "time_ms": 1, "ttl": 5}]"#).unwrap();
    let status = std::process::Command::new(bin)
        .args(["score", "--labels"])
        .arg(out.join("labels.json"))
        .arg("--decisions")
        .arg(&path)
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
}

/// The benchmark at CI size through the real detection and correlation.
/// It holds the line on precision (no legitimate sender blocked) and on what
/// is caught today (every slot flooder); the full goal (every attacker,
/// median under 2 s) is reported, not asserted, until detection meets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precision_benchmark_at_ci_size() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by the ctor");
    let policy = fleetban_server::correlate::CorrelateConfig::default();
    let run = fleetban_tests::precision::run(Config::small(1), &policy, &url).await.expect("benchmark runs");
    println!("{}", run.score);
    assert!(run.lines > 30_000 && run.outcome.events > 20_000, "{} lines, {} events", run.lines, run.outcome.events);
    assert!(run.score.legit_blocked.is_empty(), "{}", run.score);
    let floods = run.score.attackers.iter().filter(|a| a.class == Class::SlotFlood);
    assert!(floods.clone().count() >= 2);
    // Every attacker the fleet saw attacking is blocked, whatever its class.
    assert!(run.score.attackers.len() >= 15, "{}", run.score);
    for a in &run.score.attackers {
        assert!(a.decision.is_some(), "{:?} attacker {} not blocked\n{}", a.class, a.range, run.score);
    }
}

/// `fleetban-server replay --logs` end to end: a generated fleet's log
/// directories, parsed by `fleetban-agent parse --json`, replayed with a
/// candidate that puts the slot rule in shadow mode, compared with the
/// shipped policy; the JSON says what each did and where they differ.
#[test]
fn replay_command_compares_a_candidate_with_the_live_policy() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by the ctor");
    let bins = fleetban_tests::fleet::binaries().expect("agent and server binaries are built");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fleet");
    let generated = std::process::Command::new(env!("CARGO_BIN_EXE_fleetban-traffic"))
        .args(["generate", "--small", "--seed", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    let labels = Labels::read(&out.join("labels.json")).unwrap();
    let candidate = dir.path().join("candidate.toml");
    std::fs::write(&candidate, "[correlate]\nshadow_rules = [\"slot_exhaustion\"]\n").unwrap();
    let hosts: Vec<std::path::PathBuf> = labels.hosts.iter().map(|h| out.join(h)).collect();
    for h in &hosts {
        assert!(h.join("exim_mainlog").is_file(), "{} has no log", h.display());
    }
    let replay = std::process::Command::new(bins.join("fleetban-server"))
        .args(["replay", "--json", "--smtp-accept-max", &labels.smtp_accept_max.to_string(), "--policy"])
        .arg(&candidate)
        .arg("--agent-bin")
        .arg(bins.join("fleetban-agent"))
        .args(["--scratch-database-url", &url, "--logs"])
        .args(&hosts)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(replay.status.success(), "{}", String::from_utf8_lossy(&replay.stderr));
    let json: serde_json::Value = serde_json::from_slice(&replay.stdout).unwrap();
    let events = json["candidate"]["events"].as_u64().unwrap();
    assert!(events > 1_000, "{events} events replayed");
    assert_eq!(json["live"]["events"].as_u64(), Some(events));
    let decisions = |who: &str| json[who]["decisions"].as_array().cloned().unwrap_or_default();
    // The candidate's slot decisions are shadow ones; the live policy's block.
    let slots = |who: &str, shadow: bool| {
        decisions(who).iter().filter(|d| d["detail"] == "slot_exhaustion" && d["shadow"] == shadow).count()
    };
    assert!(slots("live", false) >= 1, "the live policy blocks the flood:\n{json:#}");
    assert_eq!(slots("candidate", false), 0);
    assert!(slots("candidate", true) >= 1);
    let only_live = json["difference"]["only_live"].as_array().unwrap();
    assert!(!only_live.is_empty(), "{json:#}");
    // No legitimate sender is blocked by either.
    for who in ["candidate", "live"] {
        let blocked: Vec<(ipnet::IpNet, i64)> = decisions(who)
            .iter()
            .filter(|d| d["shadow"] == false)
            .map(|d| (d["cidr"].as_str().unwrap().parse().unwrap(), d["time_ms"].as_i64().unwrap()))
            .collect();
        let score = fleetban_tests::traffic::score(&labels, &blocked);
        assert!(score.legit_blocked.is_empty(), "{who}: {score}");
    }
}
