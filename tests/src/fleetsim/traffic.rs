//! What each simulated host logs: a deterministic model of a fleet's Exim
//! traffic, and what a host sends for the events of one flush.
//!
//! - **Rates.** Every host writes context lines (connects, accepted mail,
//!   closed and lost sessions, TLS errors, sessions without mail, command
//!   timeouts) at its own rate: half the hosts at half the mean, 30 % at the
//!   mean, 20 % at 2.25× (the mean of the fleet is `context_per_sec`).
//!   A share of the hosts is under attack: in each minute such a host bursts
//!   with probability 1/2, for 5–20 s at 100 to `burst_max` lines/s of AUTH
//!   failures, connects with counts near the 100-slot ceiling and
//!   `refused: too many connections`, from a handful of attacker addresses.
//! - **Senders.** Half the context comes from big senders shared by the
//!   fleet (the three IPv4 documentation /24s, skewed so a few addresses
//!   send most), 30 % from the host's regular correspondents (200 addresses
//!   of its own in 198.19.0.0–198.19.239.255), 20 % from one-off addresses
//!   (198.18.0.0/16, a quarter of them IPv6 in 2001:db8::/32). Attackers come
//!   from 198.19.240.0/20 and 2001:db8:bad::/48.
//! - **Determinism.** A flush is described by `(host, seq, time, context
//!   events, abuse events)`; its events are a pure function of that, so a
//!   simulated spool keeps five numbers per batch and regenerates the events
//!   when it (re)sends the batch, byte for byte the same.
//!
//! [`HostOutput`] turns the events of one flush into what the host sends:
//! today every event as an `Event` ([`ContextMode::Individual`]).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use fleetban_proto::v1::{Event, EventBatch, EventKind, IpAddress};

/// Parameters of the simulated fleet.
#[derive(Debug, Clone, Copy)]
pub struct FleetModel {
    /// Seed of every random choice.
    pub seed: u64,
    /// Hosts in the fleet.
    pub hosts: usize,
    /// Mean context lines per second per host.
    pub context_per_sec: f64,
    /// Share of hosts under attack, percent.
    pub attacked_percent: u32,
    /// Highest abuse rate of a burst, lines per second.
    pub burst_max: f64,
}

/// One host of the model.
#[derive(Debug, Clone, Copy)]
pub struct HostProfile {
    /// Index in the fleet.
    pub index: usize,
    /// Context lines per second.
    pub context_per_sec: f64,
    /// Whether the host is attacked (bursts of abuse).
    pub attacked: bool,
}

/// A generated log event, before it becomes what the host sends.
#[derive(Debug, Clone, PartialEq)]
pub struct GenEvent {
    /// Unix milliseconds.
    pub time_ms: i64,
    /// Its kind.
    pub kind: EventKind,
    /// The client.
    pub remote: IpAddr,
    /// The client's port.
    pub remote_port: u16,
    /// The local port (25 or 587).
    pub local_port: u16,
    /// `TCP/IP connection count` of a connect line; 0 otherwise.
    pub connection_count: u32,
    /// The failing user of an AUTH failure (index into a name list).
    pub user: u32,
}

/// The seconds of one attack window.
const ATTACK_WINDOW_MS: i64 = 60_000;

/// SplitMix64: a well-mixed 64-bit hash of `x`.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl FleetModel {
    /// Host `index`'s profile.
    pub fn host(&self, index: usize) -> HostProfile {
        let h = mix(self.seed ^ mix(index as u64));
        let factor = match h % 10 {
            0..=4 => 0.5,
            5..=7 => 1.0,
            _ => 2.25,
        };
        let attacked = mix(h) % 100 < u64::from(self.attacked_percent);
        HostProfile { index, context_per_sec: self.context_per_sec * factor, attacked }
    }

    /// The abuse lines per second host `p` writes at `time_ms`: 0 outside
    /// its bursts.
    pub fn abuse_per_sec(&self, p: &HostProfile, time_ms: i64) -> f64 {
        if !p.attacked {
            return 0.0;
        }
        let window = time_ms.div_euclid(ATTACK_WINDOW_MS);
        let h = mix(self.seed ^ mix(p.index as u64 ^ (window as u64).rotate_left(32)));
        if h & 1 == 0 {
            return 0.0;
        }
        let start = (unit(mix(h)) * 40_000.0) as i64;
        let length = 5_000 + (unit(mix(h ^ 1)) * 15_000.0) as i64;
        let offset = time_ms.rem_euclid(ATTACK_WINDOW_MS);
        if offset < start || offset >= start + length {
            return 0.0;
        }
        100.0 + unit(mix(h ^ 2)) * (self.burst_max - 100.0).max(0.0)
    }

    /// The events of one flush of host `p`: `context` context lines and
    /// `abuse` abuse lines within the 100 ms before `time_ms`; a pure
    /// function of its arguments.
    pub fn events(&self, p: &HostProfile, seq: u64, time_ms: i64, context: u32, abuse: u32) -> Vec<GenEvent> {
        let mut rng = fastrand::Rng::with_seed(mix(self.seed ^ mix(p.index as u64) ^ seq.rotate_left(20)));
        let mut out = Vec::with_capacity((context + abuse) as usize);
        let window = time_ms.div_euclid(ATTACK_WINDOW_MS) as u64;
        for _ in 0..context {
            let kind = match rng.u32(0..100) {
                0..=37 => EventKind::Connect,
                38..=57 => EventKind::Accepted,
                58..=79 => EventKind::Closed,
                80..=87 => EventKind::Lost,
                88..=93 => EventKind::TlsError,
                94..=97 => EventKind::NoMail,
                _ => EventKind::CommandTimeout,
            };
            let remote = match rng.u32(0..10) {
                0..=4 => big_sender(&mut rng),
                5..=7 => regular(p.index, rng.u32(0..200)),
                _ => one_off(&mut rng),
            };
            out.push(GenEvent {
                time_ms: time_ms - i64::from(rng.u32(0..100)),
                kind,
                remote,
                remote_port: rng.u16(1024..=65535),
                local_port: if rng.u32(0..10) == 0 { 587 } else { 25 },
                connection_count: if kind == EventKind::Connect { rng.u32(1..40) } else { 0 },
                user: 0,
            });
        }
        // A burst's attackers: 1–8 addresses of the fleet's attacker pool,
        // chosen per host and minute.
        let attackers = 1 + (mix(self.seed ^ p.index as u64 ^ window) % 8) as u32;
        for _ in 0..abuse {
            let a = rng.u32(0..attackers);
            let remote = attacker(mix(self.seed ^ (p.index as u64).wrapping_mul(31) ^ window ^ u64::from(a)));
            let kind = match rng.u32(0..10) {
                0..=3 => EventKind::AuthFailed,
                4..=7 => EventKind::Connect,
                _ => EventKind::RefusedTooMany,
            };
            out.push(GenEvent {
                time_ms: time_ms - i64::from(rng.u32(0..100)),
                kind,
                remote,
                remote_port: rng.u16(1024..=65535),
                local_port: if kind == EventKind::AuthFailed { 587 } else { 25 },
                connection_count: if kind == EventKind::Connect { rng.u32(90..=100) } else { 0 },
                user: rng.u32(0..50),
            });
        }
        out.sort_by_key(|e| e.time_ms);
        out
    }
}

/// A big sender: one of the 768 addresses of the IPv4 documentation /24s,
/// skewed so that the first few send most.
fn big_sender(rng: &mut fastrand::Rng) -> IpAddr {
    let u = rng.f64();
    let n = (768.0 * u * u * u) as u32;
    let last = (n / 3) as u8;
    IpAddr::V4(match n % 3 {
        0 => Ipv4Addr::new(192, 0, 2, last),
        1 => Ipv4Addr::new(198, 51, 100, last),
        _ => Ipv4Addr::new(203, 0, 113, last),
    })
}

/// Regular correspondent `n` (of 200) of host `host`: 198.19.0.0–198.19.239.255.
fn regular(host: usize, n: u32) -> IpAddr {
    let i = (mix(host as u64 ^ (u64::from(n) << 40)) % (240 * 256)) as u32;
    IpAddr::V4(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8))
}

/// A one-off sender: 198.18.0.0/16, a quarter in 2001:db8::/32.
fn one_off(rng: &mut fastrand::Rng) -> IpAddr {
    if rng.u32(0..4) == 0 {
        let r = rng.u64(..);
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, (r >> 48) as u16, (r >> 32) as u16, 0, 0, (r >> 16) as u16, r as u16))
    } else {
        let r = rng.u32(..);
        IpAddr::V4(Ipv4Addr::new(198, 18, (r >> 8) as u8, r as u8))
    }
}

/// An attacker of the fleet's pool: 198.19.240.0/20, one in eight in
/// 2001:db8:bad::/48.
fn attacker(h: u64) -> IpAddr {
    if h.is_multiple_of(8) {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, (h >> 8) as u16 & 0x0fff))
    } else {
        let i = ((h >> 8) % 4096) as u32;
        IpAddr::V4(Ipv4Addr::new(198, 19, 240 + (i >> 8) as u8, i as u8))
    }
}

/// How a host sends its context events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    /// Every event as an `Event` of the batch (the agent as it is).
    Individual,
    /// Context events folded into per-address summaries by the agent's
    /// aggregator; abuse events stay individual. This build's agent has no
    /// aggregator: [`HostOutput::new`] refuses the mode.
    Summarised,
}

impl std::fmt::Display for ContextMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ContextMode::Individual => "individual",
            ContextMode::Summarised => "summarised",
        })
    }
}

/// Errors of the output step.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The mode needs what this build does not have.
    #[error("context mode `{0}` is not available in this build")]
    Unavailable(ContextMode),
}

/// What one host sends for the events of each flush. Per host, so a mode
/// may keep state between flushes (an aggregator's open intervals).
#[derive(Debug)]
pub struct HostOutput {
    host: usize,
}

impl HostOutput {
    /// The output step of host `host` in `mode`.
    pub fn new(mode: ContextMode, host: usize) -> Result<HostOutput, OutputError> {
        match mode {
            ContextMode::Individual => Ok(HostOutput { host }),
            ContextMode::Summarised => Err(OutputError::Unavailable(mode)),
        }
    }

    /// The batch `seq` carrying `events`.
    pub fn flush(&mut self, seq: u64, events: &[GenEvent]) -> EventBatch {
        let mut stamp = String::new();
        let mut stamp_sec = i64::MIN;
        let events = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let sec = e.time_ms.div_euclid(1000);
                if sec != stamp_sec {
                    stamp_sec = sec;
                    stamp = log_stamp(sec);
                }
                to_event(self.host, seq, i, e, &stamp)
            })
            .collect();
        EventBatch { seq, events, position: None, summaries: Vec::new() }
    }
}

/// `YYYY-MM-DD HH:MM:SS` of unix second `sec`, UTC.
fn log_stamp(sec: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(sec) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "1970-01-01 00:00:00".to_owned(),
    }
}

const HELOS: [&str; 6] = ["mail.example.net", "User", "smtp.example.org", "localhost", "mx.example.com", "[192.0.2.1]"];

/// The proto event of `e`, with an Exim line of cPanel's log selectors.
fn to_event(host: usize, seq: u64, i: usize, e: &GenEvent, stamp: &str) -> Event {
    let pid = 10_000 + (mix(host as u64 ^ seq) % 50_000) as u32 + i as u32;
    let (ip, port, lp) = (e.remote, e.remote_port, e.local_port);
    let helo = HELOS[(mix(u64::from(port)) % HELOS.len() as u64) as usize];
    let iface = "I=[192.0.2.254]";
    let mut raw = String::with_capacity(200);
    let mut auth_user = String::new();
    let mut duration_ms = 0;
    let mut host_name = String::new();
    let _ = match e.kind {
        EventKind::Connect => write!(
            raw,
            "{stamp} [{pid}] SMTP connection from [{ip}]:{port} {iface}:{lp} (TCP/IP connection count = {})",
            e.connection_count
        ),
        EventKind::Accepted => {
            host_name = format!("mail{}.example.net", port % 50);
            write!(
                raw,
                "{stamp} [{pid}] 1tQ{:03x}-{:06x}-AB <= bounce-{}@example.net H={host_name} [{ip}]:{port} {iface}:{lp} \
                 P=esmtps X=TLS1.3:TLS_AES_256_GCM_SHA384:256 CV=no S={} id={:x}@example.net T=\"Your order\" for user{}@example.com",
                seq % 4096,
                i % 0xff_ffff,
                port,
                2000 + port % 60_000,
                mix(seq ^ i as u64),
                port % 97
            )
        }
        EventKind::Closed => {
            write!(raw, "{stamp} [{pid}] SMTP connection from ({helo}) [{ip}]:{port} {iface}:{lp} closed by QUIT")
        }
        EventKind::Lost => {
            duration_ms = 31_000;
            write!(raw, "{stamp} [{pid}] SMTP connection from ({helo}) [{ip}]:{port} {iface}:{lp} lost D=31s")
        }
        EventKind::TlsError => write!(
            raw,
            "{stamp} [{pid}] TLS error on connection from ({helo}) [{ip}]:{port} {iface}:{lp} (SSL_accept): \
             error:0A000416:SSL routines::sslv3 alert certificate unknown"
        ),
        EventKind::NoMail => write!(
            raw,
            "{stamp} [{pid}] no MAIL in SMTP connection from ({helo}) [{ip}]:{port} {iface}:{lp} D=0.312s C=EHLO,STARTTLS,EHLO,QUIT"
        ),
        EventKind::CommandTimeout => {
            duration_ms = 300_000;
            write!(
                raw,
                "{stamp} [{pid}] SMTP command timeout on connection from ({helo}) [{ip}]:{port} {iface}:{lp} D=5m"
            )
        }
        EventKind::AuthFailed => {
            auth_user = format!("user{}@example.com", e.user);
            write!(
                raw,
                "{stamp} [{pid}] dovecot_login authenticator failed for H=(User) [{ip}]:{port} {iface}:{lp}: \
                 535 Incorrect authentication data (set_id={auth_user})"
            )
        }
        _ => write!(raw, "{stamp} [{pid}] Connection from [{ip}]:{port} {iface}:{lp} refused: too many connections"),
    };
    Event {
        time_ms: e.time_ms,
        kind: e.kind as i32,
        remote: Some(IpAddress::from(ip)),
        remote_port: u32::from(port),
        local_port: u32::from(lp),
        connection_count: e.connection_count,
        auth_user,
        helo: if matches!(e.kind, EventKind::Closed | EventKind::Lost | EventKind::TlsError | EventKind::NoMail) {
            helo.to_owned()
        } else {
            String::new()
        },
        raw,
        duration_ms,
        host_name,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> FleetModel {
        FleetModel { seed: 1, hosts: 1000, context_per_sec: 30.0, attacked_percent: 10, burst_max: 1000.0 }
    }

    #[test]
    fn a_flush_is_the_same_every_time_it_is_generated() {
        let m = model();
        let p = m.host(7);
        let a = m.events(&p, 12, 1_700_000_000_000, 5, 3);
        let b = m.events(&p, 12, 1_700_000_000_000, 5, 3);
        assert_eq!(a, b);
        assert_eq!(a.len(), 8);
        let mut out = HostOutput::new(ContextMode::Individual, 7).expect("individual mode");
        assert_eq!(out.flush(12, &a), out.flush(12, &b));
        assert_ne!(m.events(&p, 13, 1_700_000_000_000, 5, 3), a, "another seq, other events");
    }

    #[test]
    fn the_fleet_has_the_configured_mean_rate_and_attacked_share() {
        let m = model();
        let hosts: Vec<HostProfile> = (0..m.hosts).map(|i| m.host(i)).collect();
        let mean = hosts.iter().map(|h| h.context_per_sec).sum::<f64>() / m.hosts as f64;
        assert!((mean - 30.0).abs() < 3.0, "mean context rate {mean}");
        let attacked = hosts.iter().filter(|h| h.attacked).count();
        assert!((60..=140).contains(&attacked), "{attacked} of 1000 attacked");
        // Attacked hosts burst at 100–1000 lines/s part of the time, others never.
        let quiet = hosts.iter().find(|h| !h.attacked).expect("a quiet host");
        assert!((0..600).all(|s| m.abuse_per_sec(quiet, s * 1000) == 0.0));
        let rates: Vec<f64> = hosts
            .iter()
            .filter(|h| h.attacked)
            .flat_map(|h| (0..600).map(move |s| (h, s)))
            .map(|(h, s)| m.abuse_per_sec(h, s * 1000))
            .collect();
        let bursting = rates.iter().filter(|r| **r > 0.0).count() as f64 / rates.len() as f64;
        assert!(bursting > 0.05 && bursting < 0.3, "share of burst seconds {bursting}");
        assert!(rates.iter().all(|r| *r == 0.0 || (100.0..=1000.0).contains(r)));
    }

    #[test]
    fn events_carry_their_kind_in_a_parseable_exim_line() {
        let m = model();
        let p = m.host(3);
        let events = m.events(&p, 1, 1_700_000_000_000, 200, 50);
        let batch = HostOutput::new(ContextMode::Individual, 3).expect("individual mode").flush(1, &events);
        assert_eq!(batch.events.len(), 250);
        for (g, e) in events.iter().zip(&batch.events) {
            let parsed = fleetban_agent::parse::parse_line(e.raw.as_bytes())
                .unwrap_or_else(|| panic!("the parser reads {:?}", e.raw));
            assert_eq!(parsed.kind as i32, e.kind, "{}", e.raw);
            assert_eq!(parsed.ip, g.remote, "{}", e.raw);
        }
        assert!(batch.events.iter().any(|e| e.kind == EventKind::AuthFailed as i32));
        assert!(batch.events.iter().any(|e| e.connection_count >= 90));
    }

    #[test]
    fn the_summarised_mode_is_refused_in_this_build() {
        let error = HostOutput::new(ContextMode::Summarised, 0).expect_err("no aggregator in this build");
        assert!(matches!(error, OutputError::Unavailable(ContextMode::Summarised)));
    }
}
