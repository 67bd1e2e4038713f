//! The demo's scripted traffic: Exim main-log lines (the format of Exim 4.96
//! with `+smtp_connection +incoming_port`, as in the corpus) appended to the
//! simulated hosts' logs.
//!
//! A [`Fleet`] owns the hosts' log files. Every line is written only if the
//! host's firewall (its dry-run state, as the observer last read it) does not
//! hold the sender: a blocked sender's connections never reach Exim, so they
//! never reach the log either. Every write is recorded with its time and the
//! sender, so the timeline can measure each block from the line that
//! triggered it.
//!
//! Addresses (documentation ranges only): hosts 192.0.2.11-14 (`I=`),
//! legitimate senders 192.0.2.50-73 and 2001:db8:25::/64 addresses, the
//! flood source 203.0.113.7, the brute-force source 203.0.113.66, the
//! campaign 198.51.100.0/24.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// The flood source.
pub const FLOOD_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
/// The brute-force source.
pub const BRUTE_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66));
/// The campaign's prefix.
pub const CAMPAIGN_PREFIX: &str = "198.51.100.0/24";
/// The campaign's addresses that attack (the fifth is never seen before the
/// prefix block).
pub const CAMPAIGN: [Ipv4Addr; 5] = [
    Ipv4Addr::new(198, 51, 100, 10),
    Ipv4Addr::new(198, 51, 100, 23),
    Ipv4Addr::new(198, 51, 100, 47),
    Ipv4Addr::new(198, 51, 100, 81),
    Ipv4Addr::new(198, 51, 100, 112),
];
/// The hosts' `smtp_accept_max` (the agents are configured with it).
pub const SMTP_ACCEPT_MAX: u32 = 20;

/// The legitimate senders.
pub fn legit_senders() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (50..74).map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))).collect();
    out.extend((1..5).map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0, 0, 0, 0, i))));
    out
}

/// The address of host `index` (0-based).
pub fn host_address(index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11 + (index % 200) as u8))
}

/// One recorded write.
#[derive(Debug, Clone)]
pub struct Write {
    /// The sender of the line.
    pub sender: IpAddr,
    /// When the line was in the log.
    pub at: Instant,
    /// The host written to.
    pub host: usize,
    /// What the line was part of.
    pub label: &'static str,
}

/// Counters of the script.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Lines written.
    pub lines: u64,
    /// Legitimate lines written.
    pub legit_lines: u64,
    /// Attack lines not written because the host's firewall held the sender.
    pub attack_dropped: u64,
    /// Legitimate lines not written because the host's firewall held the
    /// sender (a false positive).
    pub legit_dropped: u64,
}

/// The firewall sets as last observed, per host.
pub type Firewalls = Arc<Mutex<Vec<Vec<IpNet>>>>;

/// The hosts' logs and what was written to them.
#[derive(Debug)]
pub struct Fleet {
    logs: Vec<Mutex<File>>,
    firewalls: Firewalls,
    writes: Mutex<Vec<Write>>,
    counts: Mutex<Counts>,
    pid: Mutex<u32>,
}

/// One line to write: sender, body (after the `[pid] ` prefix).
pub struct Line {
    sender: IpAddr,
    body: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn port(seed: u64) -> u16 {
    32768 + (seed.wrapping_mul(2654435761) % 28000) as u16
}

impl Fleet {
    /// Opens (creates) the logs at `paths`.
    pub fn open(paths: &[impl AsRef<Path>], firewalls: Firewalls) -> std::io::Result<Fleet> {
        let logs = paths
            .iter()
            .map(|p| OpenOptions::new().create(true).append(true).open(p).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Fleet {
            logs,
            firewalls,
            writes: Mutex::new(Vec::new()),
            counts: Mutex::new(Counts::default()),
            pid: Mutex::new(8000),
        })
    }

    /// Number of hosts.
    pub fn hosts(&self) -> usize {
        self.logs.len()
    }

    /// The writes so far.
    pub fn writes(&self) -> Vec<Write> {
        lock(&self.writes).clone()
    }

    /// The counters so far.
    pub fn counts(&self) -> Counts {
        lock(&self.counts).clone()
    }

    fn blocked(&self, host: usize, ip: IpAddr) -> bool {
        lock(&self.firewalls).get(host).is_some_and(|set| set.iter().any(|net| net.contains(&ip)))
    }

    fn next_pid(&self) -> u32 {
        let mut pid = lock(&self.pid);
        *pid += 1;
        *pid
    }

    /// Appends `lines` to `host`'s log in one write, dropping those whose
    /// sender the host's firewall holds. Returns how many were written.
    pub fn write(&self, host: usize, label: &'static str, legit: bool, lines: Vec<Line>) -> usize {
        let mut text = String::new();
        let mut senders = Vec::new();
        let mut dropped = 0;
        for line in lines {
            if self.blocked(host, line.sender) {
                dropped += 1;
                continue;
            }
            let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
            text.push_str(&now.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string());
            text.push_str(&format!(" [{}] ", self.next_pid()));
            text.push_str(&line.body);
            text.push('\n');
            senders.push(line.sender);
        }
        let written = senders.len();
        if written > 0 {
            let Some(log) = self.logs.get(host) else { return 0 };
            if let Err(error) = lock(log).write_all(text.as_bytes()) {
                tracing::warn!(%error, host, "Cannot append to the demo log.");
                return 0;
            }
            let at = Instant::now();
            let mut writes = lock(&self.writes);
            for sender in senders {
                writes.push(Write { sender, at, host, label });
            }
        }
        let mut counts = lock(&self.counts);
        counts.lines += written as u64;
        if legit {
            counts.legit_lines += written as u64;
            counts.legit_dropped += dropped;
        } else {
            counts.attack_dropped += dropped;
        }
        written
    }
}

fn i_addr(host: usize) -> String {
    format!("[{}]:25", host_address(host))
}

fn bracket(ip: IpAddr) -> String {
    format!("[{ip}]")
}

/// `SMTP connection from [ip]:port I=[host]:25 (TCP/IP connection count = n)`.
pub fn connect(host: usize, ip: IpAddr, seed: u64, count: u32) -> Line {
    Line {
        sender: ip,
        body: format!(
            "SMTP connection from {}:{} I={} (TCP/IP connection count = {count})",
            bracket(ip),
            port(seed),
            i_addr(host)
        ),
    }
}

/// `Connection from [ip]:port I=[host]:25 refused: too many connections`.
pub fn refused(host: usize, ip: IpAddr, seed: u64) -> Line {
    Line {
        sender: ip,
        body: format!(
            "Connection from {}:{} I={} refused: too many connections",
            bracket(ip),
            port(seed),
            i_addr(host)
        ),
    }
}

/// A failed AUTH (535) for `user`.
pub fn auth_failed(host: usize, ip: IpAddr, seed: u64, user: &str) -> Line {
    Line {
        sender: ip,
        body: format!(
            "dovecot_plain authenticator failed for (scanner.invalid) {}:{} I={}: 535 Incorrect authentication data (set_id={user})",
            bracket(ip),
            port(seed),
            i_addr(host)
        ),
    }
}

/// A relay attempt refused at RCPT.
pub fn relay_denied(host: usize, ip: IpAddr, seed: u64, n: u64) -> Line {
    Line {
        sender: ip,
        body: format!(
            "H=(relay-test.invalid) {}:{} I={} F=<spam@spam.invalid> rejected RCPT <victim{n}@elsewhere.invalid>: relay not permitted",
            bracket(ip),
            port(seed),
            i_addr(host)
        ),
    }
}

/// A whole legitimate delivery: connect, arrival, delivery, completion, QUIT.
pub fn legit_session(host: usize, ip: IpAddr, seed: u64, count: u32) -> Vec<Line> {
    let p = port(seed);
    let id = format!("1xWlDl-{:04X}{:02X}-{:02X}", (seed % 0xffff) as u16, host, (seed % 251) as u8);
    let h = format!("H=(client{}.example) {}:{p} I={}", seed % 97, bracket(ip), i_addr(host));
    vec![
        Line {
            sender: ip,
            body: format!(
                "SMTP connection from {}:{p} I={} (TCP/IP connection count = {count})",
                bracket(ip),
                i_addr(host)
            ),
        },
        Line {
            sender: ip,
            body: format!(
                "{id} <= sender{}@example.com {h} P=esmtp S={} id={seed}@example.com",
                seed % 13,
                900 + seed % 5000
            ),
        },
        Line {
            sender: ip,
            body: format!(
                "{id} => user{} <user{}@mx{}.fleet.test> R=local_user T=local_delivery",
                seed % 7,
                seed % 7,
                host + 1
            ),
        },
        Line { sender: ip, body: format!("{id} Completed") },
        Line {
            sender: ip,
            body: format!(
                "SMTP connection from (client{}.example) {}:{p} I={} closed by QUIT",
                seed % 97,
                bracket(ip),
                i_addr(host)
            ),
        },
    ]
}

/// Writes the legitimate background traffic: one delivery every `every`,
/// round-robin over the hosts, each sender at most once per host every
/// 30 s (so none of them ever looks like a slot holder), until `stop`.
pub async fn legit_traffic(fleet: Arc<Fleet>, every: Duration, stop: tokio::sync::watch::Receiver<bool>) {
    let senders = legit_senders();
    let hosts = fleet.hosts();
    let mut per_host = vec![0usize; hosts];
    let mut seed = 1u64;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *stop.borrow() {
            return;
        }
        tick.tick().await;
        let host = (seed as usize) % hosts;
        let k = per_host[host];
        per_host[host] += 1;
        let sender = senders[(k + host * 7) % senders.len()];
        let lines = legit_session(host, sender, seed, 1 + (seed % 3) as u32);
        fleet.write(host, "legitimate mail", true, lines);
        seed += 1;
    }
}

/// One legitimate user mistypes a password once, on one host: not abuse
/// enough for any rule.
pub fn legit_typo(fleet: &Fleet) {
    let user = legit_senders()[3];
    let host = 1 % fleet.hosts();
    fleet.write(host, "legitimate mail", true, vec![auth_failed(host, user, 77, "carol@example.com")]);
}

/// The slot-exhaustion flood on host 0: the attacker opens connections until
/// the count reaches `smtp_accept_max`, then further connections are
/// refused (one legitimate sender's too).
pub fn flood(fleet: &Fleet) -> usize {
    let host = 0;
    let mut lines = Vec::new();
    let base = 1;
    for i in 0..(SMTP_ACCEPT_MAX - base) {
        lines.push(connect(host, FLOOD_SOURCE, 1000 + u64::from(i), base + 1 + i));
    }
    for i in 0..4 {
        lines.push(refused(host, FLOOD_SOURCE, 2000 + i));
    }
    lines.push(refused(host, legit_senders()[0], 2100));
    lines.push(refused(host, FLOOD_SOURCE, 2101));
    fleet.write(host, "slot-exhaustion flood", false, lines)
}

/// One step of the distributed brute force: `users` failed logins on `host`.
pub fn brute_force(fleet: &Fleet, host: usize, users: &[&str]) -> usize {
    let lines = users
        .iter()
        .enumerate()
        .map(|(i, user)| auth_failed(host, BRUTE_SOURCE, 3000 + (host * 10 + i) as u64, user))
        .collect();
    fleet.write(host, "distributed AUTH brute force", false, lines)
}

/// One step of the /24 campaign: `ip` tries to relay through `host`.
pub fn campaign(fleet: &Fleet, host: usize, ip: Ipv4Addr, n: u64) -> usize {
    let ip = IpAddr::V4(ip);
    let lines = vec![connect(host, ip, 4000 + n, 2), relay_denied(host, ip, 4000 + n, n)];
    fleet.write(host, "/24 campaign", false, lines)
}
