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
//!   simulated spool of [`ContextMode::Individual`] keeps five numbers per
//!   batch and regenerates the events when it (re)sends the batch, byte for
//!   byte the same.
//!
//! [`HostOutput`] turns the events of one flush into a batch of `Event`s
//! ([`ContextMode::Individual`]); [`SummarisingHost`] feeds them to the
//! agent's aggregator ([`ContextMode::Summarised`]), whose output the spool
//! stores as it is.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::sync::Arc;

use fleetban_agent::aggregate::{AggregateConfig, Aggregator};
use fleetban_proto::v1::{ContextSummary, Event, EventBatch, EventKind, IpAddress};

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
    /// Every event as an `Event` of the batch (the agent with
    /// `[aggregate] enabled = false`).
    Individual,
    /// Context events folded into per-address summaries by the agent's
    /// [`Aggregator`] (the agent's default `[aggregate]`); abuse events and
    /// the first standing line of an (address, interval) stay individual.
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

/// What one host sends for the events of each flush in
/// [`ContextMode::Individual`]: every event, regenerated from the flush's
/// description each time.
#[derive(Debug)]
pub struct HostOutput {
    host: usize,
}

impl HostOutput {
    /// The output step of host `host`.
    pub fn new(host: usize) -> HostOutput {
        HostOutput { host }
    }

    /// The batch `seq` carrying `events`.
    pub fn flush(&mut self, seq: u64, events: &[GenEvent]) -> EventBatch {
        EventBatch { seq, events: render(self.host, seq, events), position: None, ..Default::default() }
    }
}

/// The proto events of `events`, generated under `key` (a batch's seq, or a
/// summarising host's flush number): a pure function of its arguments.
pub fn render(host: usize, key: u64, events: &[GenEvent]) -> Vec<Event> {
    let mut stamp = String::new();
    let mut stamp_sec = i64::MIN;
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let sec = e.time_ms.div_euclid(1000);
            if sec != stamp_sec {
                stamp_sec = sec;
                stamp = log_stamp(sec);
            }
            to_event(host, key, i, e, &stamp)
        })
        .collect()
}

/// What a summarising host sends after one flush of its log: the events
/// that stay individual, and the summaries its aggregator flushed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Flushed {
    /// Individual events, in log order.
    pub events: Vec<Event>,
    /// Summaries flushed (an interval ended, or a quiet log's grace passed).
    pub summaries: Vec<ContextSummary>,
}

impl Flushed {
    /// Lines the summaries cover (the sum of their counts).
    pub fn summary_lines(&self) -> u64 {
        summary_lines(&self.summaries)
    }
}

/// Lines covered by `summaries`.
pub fn summary_lines(summaries: &[ContextSummary]) -> u64 {
    summaries.iter().flat_map(|s| &s.counts).map(|c| u64::from(c.lines)).sum()
}

/// One host in [`ContextMode::Summarised`]: its log lines go through the
/// agent's [`Aggregator`] (default [`AggregateConfig`]) the way the agent's
/// pipeline feeds it: every line is observed (a line of a newer interval
/// flushes the open summaries), and a quiet log's summaries are flushed
/// [`fleetban_agent::aggregate::LATE_GRACE_MS`] after their interval ended
/// ([`Aggregator::flush_due`]). The aggregator is stateful, so the spool
/// keeps what a flush produced instead of regenerating it.
#[derive(Debug)]
pub struct SummarisingHost {
    host: usize,
    aggregator: Aggregator,
    /// Flushes of the log so far: the key of each flush's events.
    flushes: u64,
    /// Lines counted into open summaries, not yet flushed.
    held: u64,
}

impl SummarisingHost {
    /// Host `host` with the agent's default aggregation.
    pub fn new(host: usize) -> SummarisingHost {
        SummarisingHost {
            host,
            aggregator: Aggregator::new(&AggregateConfig::default(), Arc::default()),
            flushes: 0,
            held: 0,
        }
    }

    /// The key the next flush's events are generated under.
    pub fn next_key(&self) -> u64 {
        self.flushes + 1
    }

    /// Lines held in open summaries.
    pub fn held_lines(&self) -> u64 {
        self.held
    }

    /// Feeds the lines the log got since the last flush (`events`, generated
    /// under [`SummarisingHost::next_key`]) at wall-clock `now_ms`; returns
    /// what goes into the next batch.
    pub fn feed(&mut self, events: &[GenEvent], now_ms: i64) -> Flushed {
        self.flushes += 1;
        let mut out = Flushed::default();
        for event in render(self.host, self.flushes, events) {
            match self.aggregator.observe(event, &[], &mut out.summaries) {
                Some(event) => out.events.push(event),
                None => self.held += 1,
            }
        }
        out.summaries.extend(self.aggregator.flush_due(now_ms));
        self.held -= out.summary_lines().min(self.held);
        out
    }

    /// Flushes every open summary (the agent's shutdown).
    pub fn finish(&mut self) -> Flushed {
        let summaries = self.aggregator.flush();
        self.held -= summary_lines(&summaries).min(self.held);
        Flushed { events: Vec::new(), summaries }
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
    use fleetban_agent::aggregate::LATE_GRACE_MS;

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
        let mut out = HostOutput::new(7);
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
        let batch = HostOutput::new(3).flush(1, &events);
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

    /// Lines per kind: from individual events and summaries.
    fn lines_by_kind(flushes: &[Flushed]) -> std::collections::BTreeMap<i32, u64> {
        let mut m = std::collections::BTreeMap::new();
        for f in flushes {
            for e in &f.events {
                *m.entry(e.kind).or_default() += 1;
            }
            for s in &f.summaries {
                for c in &s.counts {
                    *m.entry(c.kind).or_default() += u64::from(c.lines);
                }
            }
        }
        m
    }

    /// A busy host's log over three minutes, a flush every 100 ms.
    fn summarised_run(host: usize, start_ms: i64, ticks: i64) -> (Vec<GenEvent>, Vec<(i64, Flushed)>, SummarisingHost) {
        let m = model();
        let p = m.host(host);
        let mut h = SummarisingHost::new(host);
        let mut generated = Vec::new();
        let mut flushes = Vec::new();
        for t in 1..=ticks {
            let now = start_ms + t * 100;
            let events = m.events(&p, h.next_key(), now, 5, if t % 50 == 0 { 3 } else { 0 });
            generated.extend(events.iter().cloned());
            flushes.push((now, h.feed(&events, now)));
        }
        (generated, flushes, h)
    }

    #[test]
    fn a_summarising_host_covers_exactly_the_lines_generated() {
        // Starts mid-minute: the run crosses three minute boundaries.
        let (generated, mut flushes, mut h) = summarised_run(5, 1_700_000_030_000, 1_800);
        let held = h.held_lines();
        assert!(held > 0, "the last minute is still open");
        flushes.push((0, h.finish()));
        assert_eq!(h.held_lines(), 0);
        let flushes: Vec<Flushed> = flushes.into_iter().map(|(_, f)| f).collect();
        let events: u64 = flushes.iter().map(|f| f.events.len() as u64).sum();
        let lines: u64 = flushes.iter().map(Flushed::summary_lines).sum();
        assert_eq!(events + lines, generated.len() as u64, "individual events + summarised lines == generated");
        let mut want = std::collections::BTreeMap::new();
        for e in &generated {
            *want.entry(e.kind as i32).or_default() += 1u64;
        }
        assert_eq!(lines_by_kind(&flushes), want, "per kind too");
        // Abuse lines all stay individual; most context is summarised.
        let abuse = generated.iter().filter(|e| e.kind == EventKind::AuthFailed).count();
        let auth_events =
            flushes.iter().flat_map(|f| &f.events).filter(|e| e.kind == EventKind::AuthFailed as i32).count();
        assert_eq!(auth_events, abuse);
        assert!(lines > events, "{lines} summarised lines, {events} individual events");
    }

    #[test]
    fn summaries_are_flushed_at_interval_boundaries() {
        let start = 1_700_000_030_000; // 30 s into a minute
        let (_, flushes, _) = summarised_run(9, start, 1_800);
        let with_summaries: Vec<(i64, &Flushed)> =
            flushes.iter().filter(|(_, f)| !f.summaries.is_empty()).map(|(now, f)| (*now, f)).collect();
        // A busy log: each minute's summaries go out with the first line of
        // the next minute, all at once, one flush per boundary.
        let boundaries: Vec<i64> = with_summaries.iter().map(|(now, _)| now.div_euclid(60_000) * 60_000).collect();
        assert_eq!(boundaries.len(), 3, "three boundaries crossed: {boundaries:?}");
        for ((now, f), boundary) in with_summaries.iter().zip(&boundaries) {
            assert!(now - boundary <= 100, "flushed in the first flush after the boundary ({now})");
            assert!(f.summaries.iter().all(|s| s.interval_start_ms == boundary - 60_000 && s.interval_secs == 60));
        }
        // A quiet log: flushed once the grace after the interval's end passed.
        let m = model();
        let p = m.host(9);
        let mut h = SummarisingHost::new(9);
        let t0 = 1_700_000_070_000; // 30 s into a minute
        let events = m.events(&p, h.next_key(), t0, 20, 0);
        let first = h.feed(&events, t0);
        assert!(first.summaries.is_empty());
        let end = t0.div_euclid(60_000) * 60_000 + 60_000;
        assert!(h.feed(&[], end + LATE_GRACE_MS - 1).summaries.is_empty(), "not before the grace");
        let late = h.feed(&[], end + LATE_GRACE_MS);
        assert!(!late.summaries.is_empty() && h.held_lines() == 0);
        assert_eq!(first.events.len() as u64 + late.summary_lines(), 20);
    }
}
