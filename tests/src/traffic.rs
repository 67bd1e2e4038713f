//! A labelled, multi-host day of realistic Exim traffic, and the scorer that
//! judges a detector's decisions against its labels: fleetban's precision
//! benchmark.
//!
//! [`Generator`] writes one `exim_mainlog` per host (`mx01` ..) exactly as
//! cPanel's Exim 4.96 writes it with `log_selector = +incoming_port
//! +incoming_interface +smtp_connection +pid` (`+millisec` optional), and a
//! [`Labels`] file that says, for every source address (or range), whether it
//! is legitimate or an attacker, its class, the hosts it touched and when its
//! first line was written. [`score`] takes a detector's decisions (range,
//! time) and reports legitimate senders blocked, attackers blocked, the
//! time from each attacker's first abusive line to its block and how many
//! of its attack lines came before the block. [`crate::precision`] runs
//! the whole benchmark: a fleet through the real detection and correlation
//! (`fleetban-traffic bench`), scored.
//!
//! # What makes it honest
//!
//! - **Connection slots.** Every host simulates Exim's `smtp_accept_max`
//!   (100 by default, cPanel's value). Every `SMTP connection from [ip]:port
//!   I=[local]:25 (TCP/IP connection count = N)` line carries the true number
//!   of open sessions including the new one; every opened session ends with
//!   exactly one end line (`closed by QUIT`, `lost`, `SMTP command timeout`,
//!   `dropped: too many ...`) with the same `ip:port` and the session's pid;
//!   while a host is full *every* new connection, legitimate or not, gets
//!   `Connection from [ip]:port I=[local]:25 refused: too many connections`
//!   and no session. As in the real corpus (`real-exim-4.96-full-selectors.log`),
//!   connect and refusal lines carry the daemon's pid and session lines the
//!   session's own pid. Legitimate senders that are refused retry later with
//!   their own back-off, so a flood delays mail and produces refusals of
//!   big providers on the flooded host.
//! - **The legitimate traffic that looks most like an attack** (see the
//!   project's notes on what CSF, fail2ban and CrowdSec ship): providers with
//!   unknown recipients on every host, ESPs with stale lists, office NATs with
//!   typos on two hosts, a phone retrying a stale password on a carrier NAT
//!   shared with users who log in fine, forwarder bursts, flaky MTAs with TLS
//!   and synchronisation errors, IPv6 provider relays, and legitimate
//!   neighbours next to the attackers' /24 and /64.
//! - **Attacks at the intensity real attacks have**, not tuned to any
//!   detector: several of them stay under every per-host threshold that the
//!   established tools ship (CSF `LF_SMTPAUTH` 5 failures per 3600 s,
//!   fail2ban `maxretry` 5 in 10 min), which is exactly why they are here.
//!
//! # Legitimate classes (`label = "legit"`)
//!
//! Rates are per host and hour at full size, scaled over the day by a
//! diurnal curve (peak ×1.0 at 14:00 UTC, trough ×0.2 at 02:00).
//!
//! | class | sources | traffic |
//! |---|---|---|
//! | `big_provider` | 3 providers, 8 /24s, 16 addresses each; verified reverse DNS | 95 bursts/h/host at the peak (Google 50, Outlook 30, Yahoo 15), each 1–4 parallel connections from different addresses (≈ 240 sessions/h); 1–3 messages each (`<= sender H=mail-xx.google.com [ip]:port I=.. P=esmtps X=TLS1.3:.. CV=no S=..`, then `=>` and `Completed`); 3 % of recipients unknown (`rejected RCPT <x>: No Such User Here`); 0.3 % of sessions a TLS error then `lost`, 0.5 % `lost` mid-session; refused connections retried after 5–15 min, doubling, up to 6 tries |
//! | `ipv6_provider` | 2 providers' IPv6 relays in two /64s | 10 bursts/h/host per provider at the peak, 1–2 connections each, as above, over IPv6 (`I=[2001:db8:f1ee::N]:25`) |
//! | `esp_stale_list` | 4 ESPs, 2 addresses each | 2–4 campaigns a day (at least one per run); each campaign reaches every host with 10–60 messages in 3–8 sessions over 5–20 min; 10–30 % of recipients unknown, so a campaign writes 1–18 `No Such User Here` per host and many hosts at once, alongside accepted mail |
//! | `office_nat` | 6 offices, one address each (one in the /24 next to the attack campaign) | users submitting on port 587 (`P=esmtpsa A=dovecot_login:user`) to 2–3 home hosts, ≈ 12/h per home host in office hours, 1/h at night; once per day on each of two home hosts a typo (1–2 × `dovecot_login authenticator failed ... (set_id=user)`) followed 20–90 s later by that user's successful login |
//! | `mobile_stale_password` | 3 carrier NAT addresses | one phone retries an old password on one host every 10–20 min for 3–10 h (the whole run when shorter), one failure per connection, never succeeding; ≈ 4/h other users behind the same address submit mail successfully on 2–4 hosts |
//! | `forwarder` | 4 list servers / forwarders | bursts every 1–3 h per target host (1–3 hosts): 20–80 messages over 1–3 min in 3–8 parallel sessions; 5 % unknown recipients (stale subscribers); 10 % of sessions are bounces (`<= <>`, `F=<>`) |
//! | `flaky_mta` | 8 small MTAs, half without reverse DNS | ≈ 3 sessions/h on each of 2–5 hosts; 8 % `TLS error on connection from ...` then `lost`, 6 % `lost` mid-session, 2 % `SMTP protocol synchronization error (next input sent too soon ...)` then `lost`, 2 % `SMTP data timeout (message abandoned)` after 5 min; the rest deliver |
//! | `small_sender` | 8 per host (40 at 5 hosts, 160 at 20), and an IPv6 VPS in the /48 of the IPv6 rotation | 0.2–2 sessions/h each to random hosts (the VPS: 4/h) |
//!
//! # Attack classes (`label = "attack"`)
//!
//! | class | judged as | intensity |
//! |---|---|---|
//! | `slot_flood` | each address | on ⌈hosts/6⌉ hosts (at least 2), at different times, 1–3 addresses each open a connection every 100–500 ms for 15–40 min and send nothing; each accepted one holds its slot until Exim's `smtp_receive_timeout` (5 min: `SMTP command timeout ... D=5m`), every attempt while the host is full is refused. No abuse-kind line is ever written: only connects, refusals and timeouts |
//! | `distributed_auth` | each address | 3 addresses; within 20–60 min each writes 2–4 failures on each of ~70 % of the hosts (1–2 per connection, 1–10 min apart per host), a different user every time: under every per-host threshold, tens of failures fleet-wide |
//! | `slow_auth` | each address | 2 addresses; one failure every 3–8 min on a random host for 4–10 h (the whole run when shorter): fewer than 5 per host per hour, the CrowdSec "slow brute force" pattern |
//! | `dictionary` | each address | 2 addresses; on 1–4 hosts, 1–5 sessions each trying 10–40 unknown recipients, never an accepted message |
//! | `relay_probe` | each address | 3 addresses; 1–2 sessions on each of 3–8 hosts, 1–3 `rejected RCPT <x@outside>: relay not permitted` each |
//! | `protocol_abuse` | each address | 3 addresses: an HTTP prober (`synchronization error (input sent without waiting for greeting)`), an `AUTH LOGIN` when not advertised bot (3 protocol errors then `dropped: too many syntax or protocol errors`), a `NOOP`/`VRFY` chatterer (`dropped: too many nonmail commands`); 1–3 sessions on each of 3–10 hosts |
//! | `campaign_24` | its /24 | 20–30 addresses (40–80 at full size) of one /24 each writing 1–3 AUTH failures on 1–3 hosts within an hour: almost nothing per address |
//! | `ipv6_rotation` | its /64 | 30–60 AUTH failures within an hour over the fleet, a new address inside one /64 every 2–4 attempts |
//!
//! ## Against the thresholds other tools ship
//!
//! - `distributed_auth`, `campaign_24`, `ipv6_rotation`: at most 4
//!   failures per host per address, under CSF `LF_SMTPAUTH` (5 in 3600 s)
//!   and fail2ban (`maxretry` 5 in 10 min) on every host; only a fleet-wide
//!   count (or, for the ranges, a count per /24 or /64) sees them.
//! - `slow_auth`: 7–20 failures an hour over the fleet, spread over hosts,
//!   so one host sees about one an hour at full size; CrowdSec's slow SMTP
//!   AUTH bucket (capacity 7, leak 15 min) would need 8 on one host.
//! - `protocol_abuse`: 1–3 sessions per host, each with 1–4 syntax or
//!   protocol lines, under CSF `LF_EXIMSYNTAX` (10 in 3600 s) per host.
//! - `slot_flood`: 1–3 addresses share the host's 100 slots, so each holds
//!   33–100; CSF's `CT_LIMIT` (off by default, 50–300 when set, sampled
//!   every 30 s) misses the ones holding fewer than its limit.
//! - The hard legitimate cases sit on the other side of the same lines: an
//!   ESP writes up to 18 unknown recipients per host per campaign, the
//!   phone 3–6 AUTH failures an hour on one host (CSF blocks it), an office
//!   one or two typos on each of two hosts.
//!
//! # Judgement calls
//!
//! - The phone with a stale password is labelled legitimate. CSF would block
//!   it (5 failures an hour), and for a single phone that block is
//!   tolerable; but its address is a carrier NAT through which other users
//!   submit mail successfully all day, so blocking it blocks them: the
//!   scorer counts it as a legitimate sender blocked, and the report names
//!   its class so the cost is visible.
//! - A slot flooder is judged as its address, and its first line is its
//!   first connect: holding slots is the abuse, there is no other line.
//! - After a `TLS error` or a synchronisation error the session is ended by a
//!   `lost` line (the client hangs up), so every session has an end line.
//!   The `no MAIL in SMTP connection` line needs `+smtp_no_mail`, which is
//!   not in cPanel's selectors, so it is never written.
//! - Attack timing is chosen at random inside the run (seeded); an attack
//!   longer than the run (slow brute force at the small size) is cut to it.
//!
//! # Volume
//!
//! At full size (20 hosts, 24 h from midnight UTC, seed 1): 810,654 lines,
//! 111 MB, about 1,700 lines per host per hour on average (≈ 2,500 at the
//! afternoon peak, ≈ 600 at night); big providers write three quarters of
//! them, and a flooded host adds 5,000–30,000 refusals. Generating it takes
//! about 2 s (debug build). The `--small` preset (5 hosts, 2 h from 12:00
//! UTC, `smtp_accept_max` 20) is about 44,000 lines, of which ~12,700 are
//! the two slot floods. `fleetban-traffic generate` prints the figures of
//! each run; BENCHMARKS.md records them.
//!
//! # Addresses and time
//!
//! Timestamps are UTC without a zone (no `log_timezone`), whole seconds
//! unless `+millisec` is asked for.
//!
//! Senders are in 198.18.0.0/15 (RFC 2544, reserved for benchmarks) and
//! 2001:db8::/32; the hosts' own interfaces are 203.0.113.N and
//! 2001:db8:f1ee::N. Everything is deterministic in the seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use fleetban_agent::parse::EventKind;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Milliseconds in a minute and an hour.
const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;

/// What the generator produces: sizes, time and Exim settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Hosts in the fleet (`mx01` ..).
    pub hosts: usize,
    /// Length of the run, hours.
    pub hours: u32,
    /// Start of the run, unix milliseconds UTC.
    pub start_ms: i64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Exim's `smtp_accept_max` on every host (cPanel: 100).
    pub smtp_accept_max: u32,
    /// Exim's `smtp_receive_timeout`, seconds (default 300): how long a
    /// silent connection holds its slot.
    pub receive_timeout_secs: u32,
    /// Write `+millisec` timestamps (`.mmm`); cPanel's default is off.
    pub millisec: bool,
}

/// 2026-11-02T00:00:00Z, the default start.
pub const DEFAULT_START_MS: i64 = 1_793_577_600_000;

impl Config {
    /// The full size: 20 hosts, 24 hours, `smtp_accept_max` 100.
    pub fn full(seed: u64) -> Config {
        Config {
            hosts: 20,
            hours: 24,
            start_ms: DEFAULT_START_MS,
            seed,
            smtp_accept_max: 100,
            receive_timeout_secs: 300,
            millisec: false,
        }
    }

    /// The CI size: 5 hosts, 2 hours from 12:00 UTC (the busy afternoon),
    /// `smtp_accept_max` 20.
    pub fn small(seed: u64) -> Config {
        Config { hosts: 5, hours: 2, smtp_accept_max: 20, start_ms: DEFAULT_START_MS + 12 * HOUR, ..Config::full(seed) }
    }

    fn end_ms(&self) -> i64 {
        self.start_ms + i64::from(self.hours) * HOUR
    }

    fn validate(&self) -> Result<(), TrafficError> {
        if !(2..=999).contains(&self.hosts) {
            return Err(TrafficError::Config("hosts must be 2..=999"));
        }
        if !(1..=168).contains(&self.hours) {
            return Err(TrafficError::Config("hours must be 1..=168"));
        }
        if self.smtp_accept_max < 2 {
            return Err(TrafficError::Config("smtp_accept_max must be at least 2"));
        }
        if !(10..=3600).contains(&self.receive_timeout_secs) {
            return Err(TrafficError::Config("receive_timeout_secs must be 10..=3600"));
        }
        Ok(())
    }
}

/// Why a fleet could not be generated, written or scored.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// A setting is out of range.
    #[error("bad traffic config: {0}")]
    Config(&'static str),
    /// Writing or reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A labels or decisions file is not valid JSON of the expected shape.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
}

// ---------------------------------------------------------------------------
// Labels

/// Whether a source is legitimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// Must never be blocked.
    Legit,
    /// Must be blocked, soon after its first line.
    Attack,
}

/// What kind of sender a source is (see the module docs for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Class {
    BigProvider,
    Ipv6Provider,
    EspStaleList,
    OfficeNat,
    MobileStalePassword,
    Forwarder,
    FlakyMta,
    SmallSender,
    SlotFlood,
    DistributedAuth,
    SlowAuth,
    Dictionary,
    RelayProbe,
    ProtocolAbuse,
    #[serde(rename = "campaign_24")]
    Campaign24,
    Ipv6Rotation,
}

impl Class {
    /// The snake_case name used in the labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::BigProvider => "big_provider",
            Class::Ipv6Provider => "ipv6_provider",
            Class::EspStaleList => "esp_stale_list",
            Class::OfficeNat => "office_nat",
            Class::MobileStalePassword => "mobile_stale_password",
            Class::Forwarder => "forwarder",
            Class::FlakyMta => "flaky_mta",
            Class::SmallSender => "small_sender",
            Class::SlotFlood => "slot_flood",
            Class::DistributedAuth => "distributed_auth",
            Class::SlowAuth => "slow_auth",
            Class::Dictionary => "dictionary",
            Class::RelayProbe => "relay_probe",
            Class::ProtocolAbuse => "protocol_abuse",
            Class::Campaign24 => "campaign_24",
            Class::Ipv6Rotation => "ipv6_rotation",
        }
    }

    /// The label every source of this class has.
    pub fn label(self) -> Label {
        match self {
            Class::BigProvider
            | Class::Ipv6Provider
            | Class::EspStaleList
            | Class::OfficeNat
            | Class::MobileStalePassword
            | Class::Forwarder
            | Class::FlakyMta
            | Class::SmallSender => Label::Legit,
            _ => Label::Attack,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One labelled source: an address, or the range an attacker is judged as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The address (/32, /128) or the range (/24 campaign, /64 rotation).
    pub range: IpNet,
    /// Legitimate or attacker.
    pub label: Label,
    /// What kind of sender.
    pub class: Class,
    /// Which actor it belongs to (e.g. `google`, `office-3`, `flood-mx04-1`).
    pub actor: String,
    /// The hosts it wrote lines on.
    pub hosts: Vec<String>,
    /// For a legitimate sender its first line; for an attacker its first
    /// abusive line (the first of [`Source::attack_lines_ms`]: an abuse-kind
    /// line, or for a slot flooder the connect of its first held session;
    /// the connect before a brute-force attempt does not count), unix ms as
    /// written.
    pub first_line_ms: i64,
    /// Its first line of any kind (for an attacker, often the connect
    /// before its first abusive line), unix ms.
    pub first_any_line_ms: i64,
    /// Its last line, unix ms.
    pub last_line_ms: i64,
    /// Lines it caused (refusals included).
    pub lines: u64,
    /// Of those, lines of an abuse kind (`EventKind::is_abuse`).
    pub abuse_lines: u64,
    /// Of those, `refused: too many connections`.
    pub refused: u64,
    /// For a range: the addresses inside it that wrote lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<IpAddr>,
    /// For an attacker: the times of its attack lines, in order (abuse-kind
    /// lines; for a slot flooder, the connects of the sessions it held).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attack_lines_ms: Vec<i64>,
}

/// The `labels.json` of a generated fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labels {
    /// The seed it was generated from.
    pub seed: u64,
    /// Start and end of the run, unix ms.
    pub start_ms: i64,
    /// End of the run, unix ms (sessions may end up to the receive timeout
    /// later).
    pub end_ms: i64,
    /// Host names, in order.
    pub hosts: Vec<String>,
    /// `smtp_accept_max` of every host.
    pub smtp_accept_max: u32,
    /// Every source that wrote at least one line.
    pub sources: Vec<Source>,
}

impl Labels {
    /// Reads a `labels.json`.
    pub fn read(path: &Path) -> Result<Labels, TrafficError> {
        let text = std::fs::read(path).map_err(|source| TrafficError::Io { path: path.to_owned(), source })?;
        serde_json::from_slice(&text).map_err(|source| TrafficError::Json { path: path.to_owned(), source })
    }
}

// ---------------------------------------------------------------------------
// Randomness: splitmix64, stable across versions and platforms.

#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: &str) -> Rng {
        let mut h = seed ^ 0x5851_F42D_4C95_7F2D;
        for b in stream.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
        let mut r = Rng(h);
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// One of `items`, which is never empty: every caller passes a constant
    /// list or one built with at least one element.
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// An exponential gap with this mean, ms (at least 1).
    fn exp_ms(&mut self, mean_ms: f64) -> i64 {
        let u = self.unit().max(1e-12);
        ((-u.ln()) * mean_ms).max(1.0) as i64
    }

    /// `lo..=hi` (uniform) distinct indices of `0..n`.
    fn sample_some(&mut self, n: usize, lo: i64, hi: i64) -> Vec<usize> {
        let k = self.range(lo, hi) as usize;
        self.sample(n, k)
    }

    /// `k` distinct indices of `0..n` (all of them when `k >= n`).
    fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..n {
            let j = i + self.below((n - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(k.min(n));
        all.sort_unstable();
        all
    }
}

/// The diurnal factor at `t`: 1.0 at 14:00 UTC, 0.2 at 02:00.
fn diurnal(t: i64) -> f64 {
    let h = (t.rem_euclid(24 * HOUR)) as f64 / HOUR as f64;
    0.6 + 0.4 * ((h - 14.0) / 24.0 * std::f64::consts::TAU).cos()
}

/// Arrival times of a Poisson process of `per_hour` (at the diurnal peak
/// when `daily`) within `[from, to)`.
fn arrivals(rng: &mut Rng, from: i64, to: i64, per_hour: f64, daily: bool) -> Vec<i64> {
    let mut out = Vec::new();
    if per_hour <= 0.0 {
        return out;
    }
    let mean = HOUR as f64 / per_hour;
    let mut t = from + rng.exp_ms(mean);
    while t < to {
        if !daily || rng.unit() < diurnal(t) {
            out.push(t);
        }
        t += rng.exp_ms(mean);
    }
    out
}

// ---------------------------------------------------------------------------
// Actors and planned sessions

/// Back-off of a sender whose connection was refused.
#[derive(Debug, Clone, Copy)]
struct Retry {
    first_min_ms: i64,
    first_max_ms: i64,
    /// Each later wait is the previous times this.
    factor: i64,
    tries: u8,
}

const MTA_RETRY: Retry = Retry { first_min_ms: 5 * MIN, first_max_ms: 15 * MIN, factor: 2, tries: 6 };
const CLIENT_RETRY: Retry = Retry { first_min_ms: 30_000, first_max_ms: 120_000, factor: 2, tries: 3 };

/// Per-address identity: reverse DNS, HELO, sender domain.
#[derive(Debug, Clone)]
struct Ident {
    /// Verified reverse-DNS name.
    rdns: Option<String>,
    helo: String,
    /// Envelope sender domain.
    domain: String,
}

/// One labelled source (an address, or a range with its members).
#[derive(Debug, Clone)]
struct SourceDef {
    range: IpNet,
    class: Class,
    actor: String,
    retry: Option<Retry>,
}

/// What a session does once it has a slot.
#[derive(Debug, Clone)]
enum Act {
    /// Incoming mail on port 25: messages, each with some unknown and some
    /// valid recipients.
    /// `bounce`: a delivery status notification (null sender `<>`).
    Deliver { msgs: Vec<(u8, u8)>, tls: bool, bounce: bool },
    /// Authenticated submission on port 587.
    Submit { user: String, msgs: u8 },
    /// Failed AUTH attempts (typos, stale passwords, brute force).
    AuthFail { users: Vec<String>, port: u16, driver: &'static str },
    /// Connect and send nothing until the receive timeout.
    Hold,
    /// A broken delivery: 0 TLS error, 1 lost mid-session, 2 pipelining
    /// synchronisation error, 3 data timeout (a stalled link).
    Flaky(u8),
    /// Unknown recipients only.
    Dictionary { rcpts: u8 },
    /// Recipients outside the host's domains.
    Relay { rcpts: u8 },
    /// 0 HTTP before the greeting, 1 AUTH when not advertised, 2 nonmail
    /// chatter.
    Protocol(u8),
}

/// A connection attempt planned on one host.
#[derive(Debug, Clone)]
struct Req {
    t: i64,
    source: u32,
    ip: IpAddr,
    ident: u32,
    act: Act,
    attempt: u8,
}

/// One rendered log line and what it is meant to parse as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The time written on the line, unix ms (whole seconds without
    /// `+millisec`).
    pub time_ms: i64,
    /// The line, without its newline.
    pub text: String,
    /// The kind and address it must parse as; `None` for lines that are no
    /// event (`=>` deliveries, `Completed`).
    pub expect: Option<(EventKind, IpAddr)>,
    /// The labelled source that caused it (index into the generator's
    /// sources).
    pub source: u32,
}

/// One host's log.
#[derive(Debug, Clone)]
pub struct HostLog {
    /// `mx01` ..
    pub name: String,
    /// Its lines in file order.
    pub lines: Vec<Line>,
    /// Sessions opened.
    pub sessions: u64,
    /// Connections refused because the host was full.
    pub refused: u64,
    /// The most sessions open at once.
    pub peak_open: u32,
}

#[derive(Debug, Clone, Default)]
struct Stats {
    first: Option<i64>,
    last: i64,
    lines: u64,
    abuse: u64,
    refused: u64,
    hosts: BTreeSet<usize>,
    members: BTreeSet<IpAddr>,
    attack_ms: Vec<i64>,
}

/// The planned fleet: generate each host's log with
/// [`Generator::generate_host`], then read [`Generator::labels`].
#[derive(Debug)]
pub struct Generator {
    config: Config,
    sources: Vec<SourceDef>,
    idents: Vec<Ident>,
    /// Domains hosted on each host.
    domains: Vec<Vec<String>>,
    reqs: Vec<Vec<Req>>,
    stats: Vec<Stats>,
}

const WORDS: &[&str] = &[
    "acme",
    "bluebird",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lumen",
    "maple",
    "nimbus",
    "orchid",
    "pioneer",
    "quartz",
    "riverside",
    "summit",
    "tundra",
    "umber",
    "vista",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
];
const FIRST: &[&str] = &[
    "anna", "ben", "carla", "david", "elena", "frank", "grace", "hugo", "ines", "jonas", "kate", "liam", "maria",
    "noah", "olga", "paul", "rosa", "sam", "tina", "victor",
];
const BRUTE_USERS: &[&str] =
    &["info", "admin", "sales", "test", "contact", "office", "support", "webmaster", "billing", "hr", "marketing"];
const TLS: &str = "X=TLS1.3:TLS_AES_256_GCM_SHA384:256 CV=no";
const TLS12: &str = "X=TLS1.2:ECDHE-RSA-AES256-GCM-SHA384:256 CV=no";

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(segs: [u16; 8]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(segs[0], segs[1], segs[2], segs[3], segs[4], segs[5], segs[6], segs[7]))
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Builds the plan: who sends what to which host when.
struct Planner<'a> {
    cfg: &'a Config,
    sources: Vec<SourceDef>,
    idents: Vec<Ident>,
    domains: Vec<Vec<String>>,
    reqs: Vec<Vec<Req>>,
    /// Source index per address (for sources judged by address).
    by_addr: HashMap<IpAddr, u32>,
}

impl Planner<'_> {
    fn source(&mut self, range: IpNet, class: Class, actor: &str, retry: Option<Retry>) -> u32 {
        self.sources.push(SourceDef { range, class, actor: actor.to_owned(), retry });
        let id = (self.sources.len() - 1) as u32;
        if range.prefix_len() == range.max_prefix_len() {
            self.by_addr.insert(range.addr(), id);
        }
        id
    }

    fn ident(&mut self, rdns: Option<String>, helo: String, domain: String) -> u32 {
        self.idents.push(Ident { rdns, helo, domain });
        (self.idents.len() - 1) as u32
    }

    fn push(&mut self, host: usize, t: i64, source: u32, ip: IpAddr, ident: u32, act: Act) {
        if t >= self.cfg.start_ms && t < self.cfg.end_ms() {
            self.reqs[host].push(Req { t, source, ip, ident, act, attempt: 0 });
        }
    }

    fn span(&self) -> (i64, i64) {
        (self.cfg.start_ms, self.cfg.end_ms())
    }

    fn hosts(&self) -> usize {
        self.cfg.hosts
    }

    /// Messages of a delivery: `(unknown, valid)` recipients each.
    fn msgs(rng: &mut Rng, n: u8, p_unknown: f64, max_rcpt: u8) -> Vec<(u8, u8)> {
        (0..n)
            .map(|_| {
                let rcpts = rng.range(1, i64::from(max_rcpt)) as u8;
                let unknown = (0..rcpts).filter(|_| rng.chance(p_unknown)).count() as u8;
                (unknown, rcpts - unknown)
            })
            .collect()
    }

    fn big_providers(&mut self) {
        // (name, /24s (third octet in 198.18.x), rate per host-hour of bursts, rdns, helo differs)
        let providers: [(&str, &[u8], f64); 3] =
            [("google", &[10, 11, 12], 50.0), ("outlook", &[20, 21, 22], 30.0), ("yahoo", &[30, 31], 15.0)];
        let mut rng = Rng::new(self.cfg.seed, "big_providers");
        for (name, nets, rate) in providers {
            let mut addrs = Vec::new();
            for &c in nets {
                for d in rng.sample(250, 16) {
                    let ip = v4(198, 18, c, (d + 2) as u8);
                    let (rdns, helo, domain) = match name {
                        "google" => {
                            let n = format!("mail-{}{}-f{}.google.com", ["wm1", "ej1", "pl1", "qk1"][d % 4], "", d);
                            (n.clone(), n, "gmail.com")
                        }
                        "outlook" => (
                            format!(
                                "mail-{}eur0{}on2{:03}.outbound.protection.outlook.com",
                                ["db8", "am6", "he1"][d % 3],
                                d % 9,
                                d
                            ),
                            format!(
                                "EUR0{}-{}-obe.outbound.protection.outlook.com",
                                d % 9,
                                ["DB8", "AM6", "HE1"][d % 3]
                            ),
                            "outlook.com",
                        ),
                        _ => (
                            format!("sonic{}-{}.consmr.mail.ne1.yahoo.com", 300 + d, d % 40),
                            format!("sonic{}-{}.consmr.mail.ne1.yahoo.com", 300 + d, d % 40),
                            "yahoo.com",
                        ),
                    };
                    let src = self.source(host_net(ip), Class::BigProvider, name, Some(MTA_RETRY));
                    let id = self.ident(Some(rdns), helo, domain.to_owned());
                    addrs.push((src, ip, id));
                }
            }
            let (from, to) = self.span();
            for host in 0..self.hosts() {
                for t in arrivals(&mut rng, from, to, rate, true) {
                    let parallel = rng.range(1, 4);
                    for k in 0..parallel {
                        let (src, ip, id) = *rng.pick(&addrs);
                        let n = rng.range(1, 3) as u8;
                        let msgs = Self::msgs(&mut rng, n, 0.03, 2);
                        // Now and then a TLS handshake fails or the connection drops.
                        let act = match rng.unit() {
                            r if r < 0.003 => Act::Flaky(0),
                            r if r < 0.008 => Act::Flaky(1),
                            _ => Act::Deliver { msgs, tls: true, bounce: false },
                        };
                        self.push(host, t + k * rng.range(50, 800), src, ip, id, act);
                    }
                }
            }
        }
    }

    fn ipv6_providers(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "ipv6_providers");
        let providers: [(&str, [u16; 4], &str); 2] = [
            ("google-v6", [0x2001, 0xdb8, 0x4860, 0x4864], "gmail.com"),
            ("outlook-v6", [0x2001, 0xdb8, 0xa0, 0x1], "outlook.com"),
        ];
        for (name, p, domain) in providers {
            let mut addrs = Vec::new();
            for k in 0..6u16 {
                let ip = v6([p[0], p[1], p[2], p[3], 0, 0, 0x20 + k, 0x2a + k]);
                let rdns = if name == "google-v6" {
                    format!("mail-yw1-x11{k}.google.com")
                } else {
                    format!("mail-eopbgr6{k}0101.outbound.protection.outlook.com")
                };
                let src = self.source(host_net(ip), Class::Ipv6Provider, name, Some(MTA_RETRY));
                let id = self.ident(Some(rdns.clone()), rdns, domain.to_owned());
                addrs.push((src, ip, id));
            }
            let (from, to) = self.span();
            for host in 0..self.hosts() {
                for t in arrivals(&mut rng, from, to, 10.0, true) {
                    for k in 0..rng.range(1, 2) {
                        let (src, ip, id) = *rng.pick(&addrs);
                        let n = rng.range(1, 2) as u8;
                        let msgs = Self::msgs(&mut rng, n, 0.03, 2);
                        self.push(host, t + k * 300, src, ip, id, Act::Deliver { msgs, tls: true, bounce: false });
                    }
                }
            }
        }
    }

    fn esps(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "esps");
        let esps = [
            ("sendgrid", "o{}.ptr{}.sendgrid.net", "em.newsletter-shop.example"),
            ("mailchimp", "mail{}.atl{}.mcsv.net", "mail.citybikes.example"),
            ("amazonses", "a{}-{}.smtp-out.amazonses.com", "notify.travelbook.example"),
            ("sparkpost", "mta{}-{}.sparkpostmail.com", "news.gardenclub.example"),
        ];
        let (from, to) = self.span();
        for (i, (name, pattern, domain)) in esps.into_iter().enumerate() {
            let mut addrs = Vec::new();
            for k in 0..2u8 {
                let ip = v4(198, 18, 40 + i as u8, 10 + k * 37);
                let mut parts = pattern.split("{}");
                let rdns = format!(
                    "{}{}{}{}{}",
                    parts.next().unwrap_or_default(),
                    1000 + u32::from(k) * 7 + i as u32,
                    parts.next().unwrap_or_default(),
                    1 + k,
                    parts.next().unwrap_or_default()
                );
                let src = self.source(host_net(ip), Class::EspStaleList, name, Some(MTA_RETRY));
                let id = self.ident(Some(rdns.clone()), rdns, (*domain).to_owned());
                addrs.push((src, ip, id));
            }
            let days = ((to - from) as f64 / (24 * HOUR) as f64).max(0.0);
            let mut campaigns: Vec<i64> = (0..((days * rng.range(2, 4) as f64).round() as i64).max(1))
                .map(|_| rng.range(from, (to - 25 * MIN).max(from)))
                .collect();
            campaigns.sort_unstable();
            let p_unknown = 0.10 + rng.unit() * 0.20;
            for t0 in campaigns {
                for host in 0..self.hosts() {
                    let start = t0 + rng.range(0, 10 * MIN);
                    let length = rng.range(5 * MIN, 20 * MIN);
                    let total = rng.range(10, 60);
                    let sessions = rng.range(3, 8);
                    for s in 0..sessions {
                        let n = (total / sessions).clamp(1, 255) as u8;
                        let (src, ip, id) = *rng.pick(&addrs);
                        let msgs = Self::msgs(&mut rng, n, p_unknown, 1);
                        self.push(
                            host,
                            start + s * length / sessions,
                            src,
                            ip,
                            id,
                            Act::Deliver { msgs, tls: true, bounce: false },
                        );
                    }
                }
            }
        }
    }

    fn offices(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "offices");
        let (from, to) = self.span();
        // The last office sits in the /24 next to the attack campaign.
        let addrs = [
            v4(198, 18, 50, 17),
            v4(198, 18, 51, 200),
            v4(198, 18, 52, 33),
            v4(198, 18, 53, 4),
            v4(198, 18, 54, 90),
            v4(198, 19, 76, 14),
        ];
        for (i, ip) in addrs.into_iter().enumerate() {
            let actor = format!("office-{}", i + 1);
            let src = self.source(host_net(ip), Class::OfficeNat, &actor, Some(CLIENT_RETRY));
            let homes = rng.sample_some(self.hosts(), 2, 3);
            let company = WORDS[(i * 5 + 3) % WORDS.len()];
            let domain = format!("{company}-office.example");
            let users: Vec<String> = (0..rng.range(10, 40))
                .map(|k| format!("{}{}@{domain}", FIRST[k as usize % FIRST.len()], k / 20))
                .collect();
            let helos: Vec<u32> = (0..4)
                .map(|k| {
                    let helo = if k % 2 == 0 {
                        format!("DESKTOP-{:04X}{}", rng.below(65_536), k)
                    } else {
                        format!("[192.168.{}.{}]", i, 20 + k)
                    };
                    self.ident(None, helo, domain.clone())
                })
                .collect();
            for &host in &homes {
                // Office hours 07:00-19:00 UTC at 12/h, else 1/h.
                for t in arrivals(&mut rng, from, to, 12.0, false) {
                    let h = t.rem_euclid(24 * HOUR) / HOUR;
                    if !(7..19).contains(&h) && !rng.chance(1.0 / 12.0) {
                        continue;
                    }
                    let user = rng.pick(&users).clone();
                    let id = *rng.pick(&helos);
                    self.push(host, t, src, ip, id, Act::Submit { user, msgs: rng.range(1, 2) as u8 });
                }
            }
            // A typo on two home hosts, once per day (at least once per run).
            let days = (((to - from) as f64) / (24 * HOUR) as f64).ceil().max(1.0) as i64;
            for day in 0..days {
                for &host in homes.iter().take(2) {
                    let lo = from + day * 24 * HOUR;
                    let t = rng.range(lo, (lo + 24 * HOUR).min(to) - 3 * MIN);
                    let user = rng.pick(&users).clone();
                    let id = *rng.pick(&helos);
                    let fails = vec![user.clone(); rng.range(1, 2) as usize];
                    self.push(host, t, src, ip, id, Act::AuthFail { users: fails, port: 587, driver: "dovecot_login" });
                    self.push(host, t + rng.range(20_000, 90_000), src, ip, id, Act::Submit { user, msgs: 1 });
                }
            }
        }
    }

    fn mobiles(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "mobiles");
        let (from, to) = self.span();
        for i in 0..3u8 {
            let ip = v4(198, 18, 60 + i, 101 + i * 3);
            let actor = format!("carrier-{}", i + 1);
            let src = self.source(host_net(ip), Class::MobileStalePassword, &actor, None);
            let phone =
                self.ident(None, ["[10.84.3.17]", "iPhone", "android-8f3a2c"][i as usize].to_owned(), "example".into());
            let hosts = rng.sample_some(self.hosts(), 2, 4);
            let stale_host = hosts[0];
            let domain = format!("{}-mail.example", WORDS[(i as usize * 7 + 1) % WORDS.len()]);
            let stale_user = format!("{}@{domain}", FIRST[i as usize * 3]);
            let span = rng.range(3 * HOUR, 10 * HOUR).min(to - from);
            let mut t = rng.range(from, to - span);
            let end = t + span;
            while t < end {
                self.push(
                    stale_host,
                    t,
                    src,
                    ip,
                    phone,
                    Act::AuthFail { users: vec![stale_user.clone()], port: 587, driver: "dovecot_login" },
                );
                t += rng.range(10 * MIN, 20 * MIN);
            }
            let others = self.ident(None, "[10.84.7.2]".into(), domain.clone());
            for t in arrivals(&mut rng, from, to, 4.0, true) {
                let host = *rng.pick(&hosts);
                let user = format!("{}@{domain}", rng.pick(FIRST));
                self.push(host, t, src, ip, others, Act::Submit { user, msgs: 1 });
            }
        }
    }

    fn forwarders(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "forwarders");
        let (from, to) = self.span();
        for i in 0..4u8 {
            let ip = v4(198, 18, 70 + i, 25);
            let rdns = format!("lists.{}.example", WORDS[(i as usize * 3 + 2) % WORDS.len()]);
            let actor = format!("forwarder-{}", i + 1);
            let src = self.source(host_net(ip), Class::Forwarder, &actor, Some(MTA_RETRY));
            let id = self.ident(Some(rdns.clone()), rdns.clone(), rdns);
            for host in rng.sample_some(self.hosts(), 1, 3) {
                let mut t = from + rng.range(0, 2 * HOUR);
                while t < to {
                    let total = rng.range(20, 80);
                    let parallel = rng.range(3, 8);
                    let length = rng.range(MIN, 3 * MIN);
                    for s in 0..parallel {
                        let n = (total / parallel) as u8;
                        let msgs = Self::msgs(&mut rng, n, 0.05, 1);
                        self.push(
                            host,
                            t + s * length / parallel / 4,
                            src,
                            ip,
                            id,
                            Act::Deliver { msgs, tls: rng.chance(0.7), bounce: rng.chance(0.1) },
                        );
                    }
                    t += rng.range(HOUR, 3 * HOUR);
                }
            }
        }
    }

    fn flaky(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "flaky");
        let (from, to) = self.span();
        for i in 0..8u8 {
            let ip = v4(198, 18, 80 + i, 66);
            let actor = format!("flaky-{}", i + 1);
            let src = self.source(host_net(ip), Class::FlakyMta, &actor, Some(MTA_RETRY));
            let name = format!("mail.{}-{}.example", WORDS[(i as usize * 11 + 5) % WORDS.len()], i);
            let id = if i % 2 == 0 {
                self.ident(Some(name.clone()), name.clone(), name)
            } else {
                self.ident(None, "localhost.localdomain".into(), name)
            };
            for host in rng.sample_some(self.hosts(), 2, 5) {
                for t in arrivals(&mut rng, from, to, 3.0, true) {
                    let r = rng.unit();
                    let act = if r < 0.08 {
                        Act::Flaky(0)
                    } else if r < 0.14 {
                        Act::Flaky(1)
                    } else if r < 0.16 {
                        Act::Flaky(2)
                    } else if r < 0.18 {
                        Act::Flaky(3)
                    } else {
                        Act::Deliver { msgs: Self::msgs(&mut rng, 1, 0.02, 2), tls: rng.chance(0.5), bounce: false }
                    };
                    self.push(host, t, src, ip, id, act);
                }
            }
        }
    }

    fn small_senders(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "small_senders");
        let (from, to) = self.span();
        let n = 8 * self.hosts();
        let mut addrs: Vec<IpAddr> = (0..n).map(|k| v4(198, 18, 100 + (k / 200) as u8, (k % 200 + 20) as u8)).collect();
        // A VPS in the /48 of the IPv6 rotation (its own /64).
        addrs.push(v6([0x2001, 0xdb8, 0xbad, 0x2, 0, 0, 0, 0x25]));
        for (k, ip) in addrs.into_iter().enumerate() {
            let name = format!("{}{}.example", WORDS[k % WORDS.len()], k);
            let src = self.source(host_net(ip), Class::SmallSender, &format!("small-{k}"), Some(MTA_RETRY));
            let id = if k % 3 == 0 {
                self.ident(None, format!("mail.{name}"), name)
            } else {
                self.ident(Some(format!("mail.{name}")), format!("mail.{name}"), name)
            };
            // The VPS next to the rotation sends steadily, so it is in every run.
            let (rate, daily) = if ip.is_ipv6() { (4.0, false) } else { (0.2 + rng.unit() * 1.8, true) };
            for t in arrivals(&mut rng, from, to, rate, daily) {
                let host = rng.below(self.hosts() as u64) as usize;
                let msgs = Self::msgs(&mut rng, 1, 0.02, 2);
                self.push(host, t, src, ip, id, Act::Deliver { msgs, tls: rng.chance(0.8), bounce: false });
            }
        }
    }

    /// A window of `min..=max` long inside the run (clipped to it).
    fn window(&self, rng: &mut Rng, min: i64, max: i64) -> (i64, i64) {
        let (from, to) = self.span();
        let len = rng.range(min, max).min(to - from);
        let start = rng.range(from, to - len);
        (start, start + len)
    }

    fn slot_floods(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "slot_floods");
        let n = self.hosts().div_ceil(6).max(2);
        let (from, to) = self.span();
        let targets = rng.sample(self.hosts(), n);
        for (j, host) in targets.into_iter().enumerate() {
            // Different times on different hosts: spread the starts.
            let slice = (to - from) / n as i64;
            let start = from + slice * j as i64 + rng.range(0, slice / 2);
            let len = rng.range(15 * MIN, 40 * MIN).min(to - start);
            for k in 0..rng.range(1, 3) {
                let ip = v4(198, 19, 10 + j as u8, 40 + k as u8 * 9);
                let actor = format!("flood-mx{:02}-{}", host + 1, k + 1);
                let src = self.source(host_net(ip), Class::SlotFlood, &actor, None);
                let id = self.ident(None, String::new(), "flood.invalid".into());
                let gap = rng.range(100, 500);
                let mut t = start + rng.range(0, 2000);
                while t < start + len {
                    self.push(host, t, src, ip, id, Act::Hold);
                    t += rng.range(gap / 2, gap * 3 / 2);
                }
            }
        }
    }

    fn brute_users(&self, rng: &mut Rng, host: usize) -> String {
        let d = rng.pick(&self.domains[host]).clone();
        format!("{}@{d}", rng.pick(BRUTE_USERS))
    }

    fn distributed_auth(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "distributed_auth");
        for i in 0..3u8 {
            let ip = v4(198, 19, 20 + i, 7 + i);
            let src = self.source(host_net(ip), Class::DistributedAuth, &format!("distributed-{}", i + 1), None);
            let id = self.ident(None, ["User", "ylmf-pc", "WIN-CLJ1B0GQ6JP"][i as usize].into(), "x".into());
            let (start, end) = self.window(&mut rng, 20 * MIN, 60 * MIN);
            let hosts = rng.sample(self.hosts(), (self.hosts() * 7).div_ceil(10).max(3));
            for host in hosts {
                let failures = rng.range(2, 4);
                let mut t = rng.range(start, end);
                let mut done = 0;
                while done < failures {
                    let per = rng.range(1, 2).min(failures - done);
                    let users = (0..per).map(|_| self.brute_users(&mut rng, host)).collect();
                    self.push(
                        host,
                        t,
                        src,
                        ip,
                        id,
                        Act::AuthFail { users, port: *rng.pick(&[25, 587, 465]), driver: "dovecot_login" },
                    );
                    done += per;
                    t += rng.range(MIN, 10 * MIN);
                }
            }
        }
    }

    fn slow_auth(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "slow_auth");
        for i in 0..2u8 {
            let ip = v4(198, 19, 30 + i, 150 + i);
            let src = self.source(host_net(ip), Class::SlowAuth, &format!("slow-{}", i + 1), None);
            let id = self.ident(None, format!("[{ip}]"), "x".into());
            let (start, end) = self.window(&mut rng, 4 * HOUR, 10 * HOUR);
            let mut t = start;
            while t < end {
                let host = rng.below(self.hosts() as u64) as usize;
                let users = vec![self.brute_users(&mut rng, host)];
                self.push(host, t, src, ip, id, Act::AuthFail { users, port: 587, driver: "dovecot_plain" });
                t += rng.range(3 * MIN, 8 * MIN);
            }
        }
    }

    fn dictionary(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "dictionary");
        for i in 0..2u8 {
            let ip = v4(198, 19, 40 + i, 201);
            let src = self.source(host_net(ip), Class::Dictionary, &format!("dictionary-{}", i + 1), None);
            let id = self.ident(None, format!("mail{}.bulk-{}.example", i, i), format!("promo{i}.example"));
            let (start, end) = self.window(&mut rng, 30 * MIN, 2 * HOUR);
            for host in rng.sample_some(self.hosts(), 1, 4) {
                for _ in 0..rng.range(1, 5) {
                    let rcpts = rng.range(10, 40) as u8;
                    self.push(host, rng.range(start, end), src, ip, id, Act::Dictionary { rcpts });
                }
            }
        }
    }

    fn relay_probes(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "relay_probes");
        for i in 0..3u8 {
            let ip = v4(198, 19, 50 + i, 33 + i);
            let src = self.source(host_net(ip), Class::RelayProbe, &format!("relay-{}", i + 1), None);
            let id = self.ident(None, ["relay-test", "[198.19.50.33]", "windows-pc"][i as usize].into(), "x".into());
            let (start, end) = self.window(&mut rng, 20 * MIN, 90 * MIN);
            for host in rng.sample_some(self.hosts(), 3, 8) {
                for _ in 0..rng.range(1, 2) {
                    let rcpts = rng.range(1, 3) as u8;
                    self.push(host, rng.range(start, end), src, ip, id, Act::Relay { rcpts });
                }
            }
        }
    }

    fn protocol_abuse(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "protocol_abuse");
        for i in 0..3u8 {
            let ip = v4(198, 19, 60 + i, 90 + i);
            let src = self.source(host_net(ip), Class::ProtocolAbuse, &format!("protocol-{}", i + 1), None);
            let id = self.ident(None, ["", "ylmf-pc", "scanner"][i as usize].into(), "x".into());
            let (start, end) = self.window(&mut rng, 10 * MIN, 60 * MIN);
            for host in rng.sample_some(self.hosts(), 3, 10) {
                for _ in 0..rng.range(1, 3) {
                    self.push(host, rng.range(start, end), src, ip, id, Act::Protocol(i));
                }
            }
        }
    }

    fn campaign(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "campaign_24");
        let net: IpNet = IpNet::new(v4(198, 19, 77, 0), 24).unwrap_or_else(|_| host_net(v4(198, 19, 77, 0)));
        let src = self.source(net, Class::Campaign24, "campaign-198.19.77", None);
        let (start, end) = self.window(&mut rng, 40 * MIN, 60 * MIN);
        let size = if self.hosts() >= 10 { rng.range(40, 80) } else { rng.range(20, 30) } as usize;
        for d in rng.sample(250, size) {
            let ip = v4(198, 19, 77, (d + 2) as u8);
            let id = self.ident(None, format!("[{ip}]"), "x".into());
            let t0 = rng.range(start, end);
            for host in rng.sample_some(self.hosts(), 1, 3) {
                let users = (0..rng.range(1, 3)).map(|_| self.brute_users(&mut rng, host)).collect();
                self.push(
                    host,
                    t0 + rng.range(0, 5 * MIN),
                    src,
                    ip,
                    id,
                    Act::AuthFail { users, port: 587, driver: "dovecot_login" },
                );
            }
        }
    }

    fn ipv6_rotation(&mut self) {
        let mut rng = Rng::new(self.cfg.seed, "ipv6_rotation");
        let prefix = [0x2001, 0xdb8, 0xbad, 0x1];
        let net: IpNet = IpNet::new(v6([prefix[0], prefix[1], prefix[2], prefix[3], 0, 0, 0, 0]), 64)
            .unwrap_or_else(|_| host_net(v6([0; 8])));
        let src = self.source(net, Class::Ipv6Rotation, "rotation-2001:db8:bad:1", None);
        let (start, end) = self.window(&mut rng, 40 * MIN, 60 * MIN);
        let attempts = rng.range(30, 60);
        let mut t = start;
        let mut left = 0;
        let (mut ip, mut id) = (v6([0; 8]), 0);
        for _ in 0..attempts {
            if left == 0 {
                let s = [
                    rng.below(65_536) as u16,
                    rng.below(65_536) as u16,
                    rng.below(65_536) as u16,
                    rng.below(65_536) as u16,
                ];
                ip = v6([prefix[0], prefix[1], prefix[2], prefix[3], s[0], s[1], s[2], s[3]]);
                id = self.ident(None, "User".into(), "x".into());
                left = rng.range(2, 4);
            }
            let host = rng.below(self.hosts() as u64) as usize;
            let users = vec![self.brute_users(&mut rng, host)];
            self.push(host, t, src, ip, id, Act::AuthFail { users, port: 587, driver: "dovecot_login" });
            left -= 1;
            t += ((end - start) / attempts).max(1000) + rng.range(-20_000, 20_000);
        }
    }
}

impl Generator {
    /// Plans the fleet.
    pub fn new(config: Config) -> Result<Generator, TrafficError> {
        config.validate()?;
        let mut rng = Rng::new(config.seed, "domains");
        let domains = (0..config.hosts)
            .map(|h| (0..3).map(|k| format!("{}{}.example", rng.pick(WORDS), h * 3 + k)).collect())
            .collect();
        let mut p = Planner {
            cfg: &config,
            sources: Vec::new(),
            idents: Vec::new(),
            domains,
            reqs: vec![Vec::new(); config.hosts],
            by_addr: HashMap::new(),
        };
        p.big_providers();
        p.ipv6_providers();
        p.esps();
        p.offices();
        p.mobiles();
        p.forwarders();
        p.flaky();
        p.small_senders();
        p.slot_floods();
        p.distributed_auth();
        p.slow_auth();
        p.dictionary();
        p.relay_probes();
        p.protocol_abuse();
        p.campaign();
        p.ipv6_rotation();
        let Planner { sources, idents, domains, mut reqs, .. } = p;
        for r in &mut reqs {
            r.sort_by_key(|r| r.t);
        }
        let stats = vec![Stats::default(); sources.len()];
        Ok(Generator { config, sources, idents, domains, reqs, stats })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Host `i`'s name: `mx01` ...
    pub fn host_name(&self, i: usize) -> String {
        if self.config.hosts < 100 { format!("mx{:02}", i + 1) } else { format!("mx{:03}", i + 1) }
    }

    /// The labelled source a line of [`Line::source`] belongs to:
    /// `(range, class)`.
    pub fn source_of(&self, source: u32) -> Option<(IpNet, Class)> {
        self.sources.get(source as usize).map(|s| (s.range, s.class))
    }

    /// Simulates host `host` (its slots, refusals and retries) and renders
    /// its log. Call once per host; the labels collect what each call saw.
    pub fn generate_host(&mut self, host: usize) -> HostLog {
        let reqs = std::mem::take(&mut self.reqs[host]);
        let mut sim = HostSim::new(self, host);
        let mut queue: BinaryHeap<Reverse<(i64, u64, usize)>> = BinaryHeap::new();
        let mut pending = reqs;
        for (i, r) in pending.iter().enumerate() {
            queue.push(Reverse((r.t, i as u64, i)));
        }
        let mut seq = pending.len() as u64;
        while let Some(Reverse((t, _, i))) = queue.pop() {
            let req = pending[i].clone();
            if let Some(retry_at) = sim.connect(self, t, &req) {
                let mut again = req;
                again.t = retry_at;
                again.attempt += 1;
                pending.push(again);
                queue.push(Reverse((retry_at, seq, pending.len() - 1)));
                seq += 1;
            }
        }
        let HostSim { mut lines, sessions, refused, peak, .. } = sim;
        lines.sort_by_key(|(t, s, _)| (*t, *s));
        let millis = self.config.millisec;
        let lines: Vec<Line> = lines
            .into_iter()
            .map(|(_, _, mut l)| {
                if !millis {
                    l.time_ms -= l.time_ms.rem_euclid(1000);
                }
                l
            })
            .collect();
        for l in &lines {
            let st = &mut self.stats[l.source as usize];
            st.first = Some(st.first.map_or(l.time_ms, |f| f.min(l.time_ms)));
            st.last = st.last.max(l.time_ms);
            st.lines += 1;
            st.hosts.insert(host);
            if let Some((kind, ip)) = l.expect {
                if kind.is_abuse() {
                    st.abuse += 1;
                }
                if kind == EventKind::RefusedTooMany {
                    st.refused += 1;
                }
                let class = self.sources[l.source as usize].class;
                if class.label() == Label::Attack
                    && (kind.is_abuse() || (class == Class::SlotFlood && kind == EventKind::Connect))
                {
                    st.attack_ms.push(l.time_ms);
                }
                if self.sources[l.source as usize].range.prefix_len()
                    < self.sources[l.source as usize].range.max_prefix_len()
                {
                    st.members.insert(ip);
                }
            }
        }
        HostLog { name: self.host_name(host), lines, sessions, refused, peak_open: peak }
    }

    /// The labels of every source that wrote a line in the hosts generated
    /// so far.
    pub fn labels(&self) -> Labels {
        let sources = self
            .sources
            .iter()
            .zip(&self.stats)
            .filter_map(|(s, st)| {
                let first = st.first?;
                Some(Source {
                    range: s.range,
                    label: s.class.label(),
                    class: s.class,
                    actor: s.actor.clone(),
                    hosts: st.hosts.iter().map(|&h| self.host_name(h)).collect(),
                    first_line_ms: if s.class.label() == Label::Attack {
                        st.attack_ms.iter().copied().min().unwrap_or(first)
                    } else {
                        first
                    },
                    last_line_ms: st.last,
                    first_any_line_ms: first,
                    lines: st.lines,
                    abuse_lines: st.abuse,
                    refused: st.refused,
                    members: st.members.iter().copied().collect(),
                    attack_lines_ms: {
                        let mut t = st.attack_ms.clone();
                        t.sort_unstable();
                        t
                    },
                })
            })
            .collect();
        Labels {
            seed: self.config.seed,
            start_ms: self.config.start_ms,
            end_ms: self.config.end_ms(),
            hosts: (0..self.config.hosts).map(|h| self.host_name(h)).collect(),
            smtp_accept_max: self.config.smtp_accept_max,
            sources,
        }
    }
}

// ---------------------------------------------------------------------------
// One host: slots and rendering

struct HostSim {
    host: usize,
    rng: Rng,
    daemon_pid: u32,
    next_pid: u32,
    local4: IpAddr,
    local6: IpAddr,
    /// Open sessions by end time.
    open: BinaryHeap<Reverse<(i64, IpAddr, u16)>>,
    open_ports: HashSet<(IpAddr, u16)>,
    /// (original time ms, insertion order, line).
    lines: Vec<(i64, u64, Line)>,
    seq: u64,
    sessions: u64,
    refused: u64,
    peak: u32,
    max: usize,
    timeout_ms: i64,
    millis: bool,
    msg_counter: u64,
}

/// The host part of a session line: `name (helo) [ip]:port I=[local]:lport`.
struct Peer<'a> {
    ip: IpAddr,
    port: u16,
    local: IpAddr,
    lport: u16,
    ident: &'a Ident,
}

impl Peer<'_> {
    /// With the HELO (after EHLO) or without (before it).
    fn spec(&self, helo: bool) -> String {
        let mut s = String::with_capacity(96);
        if helo {
            match (&self.ident.rdns, self.ident.helo.as_str()) {
                (Some(name), h) if h == name => {
                    let _ = write!(s, "{name} ");
                }
                (Some(name), "") => {
                    let _ = write!(s, "{name} ");
                }
                (Some(name), h) => {
                    let _ = write!(s, "{name} ({h}) ");
                }
                (None, "") => {}
                (None, h) => {
                    let _ = write!(s, "({h}) ");
                }
            }
        } else if let Some(name) = &self.ident.rdns {
            let _ = write!(s, "{name} ");
        }
        let _ = write!(s, "[{}]:{} I=[{}]:{}", self.ip, self.port, self.local, self.lport);
        s
    }
}

impl HostSim {
    fn new(g: &Generator, host: usize) -> HostSim {
        let mut rng = Rng::new(g.config.seed, &format!("host-{host}"));
        let daemon_pid = rng.range(1000, 30_000) as u32;
        let n = (host % 240 + 10) as u8;
        HostSim {
            host,
            next_pid: daemon_pid + 1,
            daemon_pid,
            rng,
            local4: v4(203, 0, 113, n),
            local6: v6([0x2001, 0xdb8, 0xf1ee, 0, 0, 0, 0, u16::from(n)]),
            open: BinaryHeap::new(),
            open_ports: HashSet::new(),
            lines: Vec::new(),
            seq: 0,
            sessions: 0,
            refused: 0,
            peak: 0,
            max: g.config.smtp_accept_max as usize,
            timeout_ms: i64::from(g.config.receive_timeout_secs) * 1000,
            millis: g.config.millisec,
            msg_counter: 0,
        }
    }

    fn pid(&mut self) -> u32 {
        let p = self.next_pid;
        self.next_pid = if p >= 4_194_000 { 300 } else { p + 1 };
        p
    }

    fn stamp(&self, t: i64) -> String {
        let (y, mo, d, h, mi, s, ms) = civil(t);
        if self.millis {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{ms:03}")
        } else {
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
        }
    }

    fn emit(&mut self, t: i64, pid: u32, body: &str, expect: Option<(EventKind, IpAddr)>, source: u32) {
        let text = format!("{} [{pid}] {body}", self.stamp(t));
        self.lines.push((t, self.seq, Line { time_ms: t, text, expect, source }));
        self.seq += 1;
    }

    /// `D=` as Exim writes it: with milliseconds under `+millisec`.
    fn dur(&self, ms: i64) -> String {
        let ms = ms.max(0) as u64;
        if self.millis {
            let ms = if ms.is_multiple_of(1000) { ms + 1 } else { ms };
            fleetban_agent::parse::render::duration(ms)
        } else {
            fleetban_agent::parse::render::duration(ms / 1000 * 1000)
        }
    }

    /// A 4.96 message id (`1xWlDl-0002Hj-1Q`).
    fn msgid(&mut self, t: i64, pid: u32) -> String {
        const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        fn push(out: &mut String, mut n: u64, width: usize) {
            let mut buf = [b'0'; 6];
            for slot in buf[..width].iter_mut().rev() {
                *slot = B62[(n % 62) as usize];
                n /= 62;
            }
            out.extend(buf[..width].iter().map(|&b| char::from(b)));
        }
        let mut out = String::with_capacity(17);
        push(&mut out, (t / 1000) as u64, 6);
        out.push('-');
        push(&mut out, u64::from(pid), 6);
        out.push('-');
        self.msg_counter += 1;
        push(&mut out, (t % 1000) as u64 / 16 + self.msg_counter % 3, 2);
        out
    }

    /// Handles a connection attempt at `t`: refused (returning when to try
    /// again, if the sender retries) or opened and played.
    fn connect(&mut self, g: &Generator, t: i64, req: &Req) -> Option<i64> {
        while let Some(Reverse((end, ip, port))) = self.open.peek().copied() {
            if end > t {
                break;
            }
            self.open.pop();
            self.open_ports.remove(&(ip, port));
        }
        let local = if req.ip.is_ipv4() { self.local4 } else { self.local6 };
        let lport = match &req.act {
            Act::Submit { .. } => 587,
            Act::AuthFail { port, .. } => *port,
            _ => 25,
        };
        let mut port = self.rng.range(32_768, 60_999) as u16;
        while self.open_ports.contains(&(req.ip, port)) {
            port = self.rng.range(32_768, 60_999) as u16;
        }
        let daemon = self.daemon_pid;
        if self.open.len() >= self.max {
            self.refused += 1;
            let body = format!("Connection from [{}]:{port} I=[{local}]:{lport} refused: too many connections", req.ip);
            self.emit(t, daemon, &body, Some((EventKind::RefusedTooMany, req.ip)), req.source);
            let retry = g.sources[req.source as usize].retry?;
            if req.attempt + 1 >= retry.tries {
                return None;
            }
            let mut wait = self.rng.range(retry.first_min_ms, retry.first_max_ms);
            for _ in 0..req.attempt {
                wait *= retry.factor;
            }
            return Some(t + wait);
        }
        let count = self.open.len() + 1;
        self.peak = self.peak.max(count as u32);
        self.sessions += 1;
        let body =
            format!("SMTP connection from [{}]:{port} I=[{local}]:{lport} (TCP/IP connection count = {count})", req.ip);
        self.emit(t, daemon, &body, Some((EventKind::Connect, req.ip)), req.source);
        let ident = &g.idents[req.ident as usize];
        let peer = Peer { ip: req.ip, port, local, lport, ident };
        let end = self.play(g, t, req, &peer);
        self.open.push(Reverse((end, req.ip, port)));
        self.open_ports.insert((req.ip, port));
        None
    }

    /// Writes a session's lines after its connect at `t0`; returns when it
    /// ended.
    fn play(&mut self, g: &Generator, t0: i64, req: &Req, peer: &Peer<'_>) -> i64 {
        let pid = self.pid();
        let ip = req.ip;
        let src = req.source;
        let h = peer.spec(true);
        let mut t = t0 + self.rng.range(40, 400);
        let domains = &g.domains[self.host];
        let quit = |s: &mut HostSim, t: i64| {
            s.emit(t, pid, &format!("SMTP connection from {h} closed by QUIT"), Some((EventKind::Closed, ip)), src);
        };
        match &req.act {
            Act::Deliver { msgs, tls, bounce } => {
                let x = if *tls { TLS } else { "" };
                let p = if *tls { "esmtps" } else { "esmtp" };
                let from =
                    if *bounce { String::new() } else { format!("{}@{}", self.rng.pick(FIRST), peer.ident.domain) };
                for &(unknown, valid) in msgs {
                    for _ in 0..unknown {
                        t += self.rng.range(20, 300);
                        let rcpt =
                            format!("{}{}@{}", self.rng.pick(FIRST), self.rng.range(1, 99), self.rng.pick(domains));
                        let sp = if *tls { format!("{x} ") } else { String::new() };
                        let body = format!("H={h} {sp}F=<{from}> rejected RCPT <{rcpt}>: No Such User Here");
                        self.emit(t, pid, &body, Some((EventKind::RcptRejected, ip)), src);
                    }
                    if valid > 0 {
                        t += self.rng.range(300, 3000);
                        let id = self.msgid(t, pid);
                        let size = self.rng.range(1500, 80_000);
                        let sender = if from.is_empty() { "<>" } else { from.as_str() };
                        let xs = if *tls { format!(" {x}") } else { String::new() };
                        let body =
                            format!("{id} <= {sender} H={h} P={p}{xs} S={size} id={}.{}@{}", t, pid, peer.ident.domain);
                        self.emit(t, pid, &body, Some((EventKind::Accepted, ip)), src);
                        let dpid = self.pid();
                        for _ in 0..valid {
                            let user = self.rng.pick(FIRST);
                            let dom = self.rng.pick(domains);
                            let body = format!("{id} => {user} <{user}@{dom}> R=virtual_user T=virtual_userdelivery");
                            self.emit(t + 30, dpid, &body, None, src);
                        }
                        self.emit(t + 31, dpid, &format!("{id} Completed"), None, src);
                    }
                }
                t += self.rng.range(50, 400);
                quit(self, t);
            }
            Act::Submit { user, msgs } => {
                for _ in 0..*msgs {
                    t += self.rng.range(500, 4000);
                    let id = self.msgid(t, pid);
                    let size = self.rng.range(1200, 400_000);
                    let body = format!(
                        "{id} <= {user} H={h} P=esmtpsa {TLS} A=dovecot_login:{user} S={size} id={}.{}@{}",
                        t, pid, peer.ident.domain
                    );
                    self.emit(t, pid, &body, Some((EventKind::Accepted, ip)), src);
                    let dpid = self.pid();
                    let to = format!(
                        "{}@{}",
                        self.rng.pick(FIRST),
                        self.rng.pick(&["gmail.com", "outlook.com", "partner.example"])
                    );
                    let body = format!(
                        "{id} => {to} R=dkim_lookuphost T=dkim_remote_smtp H=mx.partner.example [192.0.2.200] {TLS12} C=\"250 2.0.0 Ok: queued\""
                    );
                    self.emit(t + 400, dpid, &body, None, src);
                    self.emit(t + 401, dpid, &format!("{id} Completed"), None, src);
                }
                t += self.rng.range(50, 400);
                quit(self, t);
            }
            Act::AuthFail { users, driver, .. } => {
                for user in users {
                    t += self.rng.range(300, 3000);
                    let body = format!(
                        "{driver} authenticator failed for {h}: 535 Incorrect authentication data (set_id={user})"
                    );
                    self.emit(t, pid, &body, Some((EventKind::AuthFailed, ip)), src);
                }
                t += self.rng.range(20, 500);
                if self.rng.chance(0.7) {
                    quit(self, t);
                } else {
                    let body = format!("SMTP connection from {h} lost D={}", self.dur(t - t0));
                    self.emit(t, pid, &body, Some((EventKind::Lost, ip)), src);
                }
            }
            Act::Hold => {
                let t = t0 + self.timeout_ms;
                let body = format!(
                    "SMTP command timeout on connection from {} D={}",
                    peer.spec(false),
                    self.dur(self.timeout_ms)
                );
                self.emit(t, pid, &body, Some((EventKind::CommandTimeout, ip)), src);
                return t;
            }
            Act::Flaky(3) => {
                // The message stalls in DATA until the receive timeout.
                let from = format!("{}@{}", self.rng.pick(FIRST), peer.ident.domain);
                let t = t + self.timeout_ms;
                let body = format!(
                    "SMTP data timeout (message abandoned) on connection from {h} F=<{from}> D={}",
                    self.dur(t - t0)
                );
                self.emit(t, pid, &body, Some((EventKind::CommandTimeout, ip)), src);
                return t;
            }
            Act::Flaky(kind) => {
                match kind {
                    0 => {
                        let why = *self.rng.pick(&[
                            "(SSL_accept): error:0A000126:SSL routines::unexpected eof while reading",
                            "(SSL_accept): error:0A00010B:SSL routines::wrong version number",
                            "(SSL_accept): error:0A000418:SSL routines::tlsv1 alert unknown ca",
                        ]);
                        t += self.rng.range(100, 2000);
                        self.emit(
                            t,
                            pid,
                            &format!("TLS error on connection from {h} {why}"),
                            Some((EventKind::TlsError, ip)),
                            src,
                        );
                    }
                    1 => t += self.rng.range(2000, 60_000),
                    _ => {
                        t += self.rng.range(50, 500);
                        let body = format!(
                            "SMTP protocol synchronization error (next input sent too soon: pipelining was not advertised): rejected \"EHLO {}\" H={h} next input=\"MAIL FROM:<{}@{}>\\r\\n\"",
                            peer.ident.helo,
                            self.rng.pick(FIRST),
                            peer.ident.domain
                        );
                        self.emit(t, pid, &body, Some((EventKind::SyncError, ip)), src);
                    }
                }
                t += self.rng.range(1, 200);
                let body = format!("SMTP connection from {h} lost D={}", self.dur(t - t0));
                self.emit(t, pid, &body, Some((EventKind::Lost, ip)), src);
            }
            Act::Dictionary { rcpts } => {
                let from = format!("{}@{}", self.rng.pick(FIRST), peer.ident.domain);
                for _ in 0..*rcpts {
                    t += self.rng.range(100, 1500);
                    let rcpt = format!("{}{}@{}", self.rng.pick(FIRST), self.rng.range(1, 99), self.rng.pick(domains));
                    let body = format!("H={h} F=<{from}> rejected RCPT <{rcpt}>: No Such User Here");
                    self.emit(t, pid, &body, Some((EventKind::RcptRejected, ip)), src);
                }
                t += self.rng.range(50, 400);
                quit(self, t);
            }
            Act::Relay { rcpts } => {
                for _ in 0..*rcpts {
                    t += self.rng.range(200, 2000);
                    let rcpt = format!(
                        "{}{}@{}",
                        self.rng.pick(FIRST),
                        self.rng.range(1, 999),
                        self.rng.pick(&["gmail.com", "yahoo.co.jp", "qq.com", "mail.ru"])
                    );
                    let body = format!("H={h} F=<spameri@tiscali.it> rejected RCPT <{rcpt}>: relay not permitted");
                    self.emit(t, pid, &body, Some((EventKind::RelayDenied, ip)), src);
                }
                t += self.rng.range(50, 400);
                quit(self, t);
            }
            Act::Protocol(variant) => match variant {
                0 => {
                    t += self.rng.range(1, 50);
                    let body = format!(
                        "SMTP protocol synchronization error (input sent without waiting for greeting): rejected connection from H={} input=\"GET / HTTP/1.1\\r\\nHost: {}\\r\\n\"",
                        peer.spec(false),
                        peer.local
                    );
                    self.emit(t, pid, &body, Some((EventKind::SyncError, ip)), src);
                    t += 1;
                    let body = format!("SMTP connection from {} lost D={}", peer.spec(false), self.dur(t - t0));
                    self.emit(t, pid, &body, Some((EventKind::Lost, ip)), src);
                }
                1 => {
                    for _ in 0..3 {
                        t += self.rng.range(100, 800);
                        let body = format!(
                            "SMTP protocol error in \"AUTH LOGIN\" H={h} AUTH command used when not advertised"
                        );
                        self.emit(t, pid, &body, Some((EventKind::ProtocolError, ip)), src);
                    }
                    t += self.rng.range(10, 100);
                    let body = format!(
                        "SMTP call from {h} dropped: too many syntax or protocol errors (last command was \"AUTH LOGIN\")"
                    );
                    self.emit(t, pid, &body, Some((EventKind::TooManySyntax, ip)), src);
                }
                _ => {
                    t += self.rng.range(2000, 20_000);
                    let body = format!("SMTP call from {h} dropped: too many nonmail commands (last was \"NOOP\")");
                    self.emit(t, pid, &body, Some((EventKind::TooManyNonmail, ip)), src);
                }
            },
        }
        t
    }
}

/// Civil UTC time of unix ms: (year, month, day, hour, minute, second, ms).
fn civil(ms: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, sod / 3600, sod / 60 % 60, sod % 60, millis)
}

// ---------------------------------------------------------------------------
// Writing a fleet

/// What [`write_fleet`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Per host: (name, lines, sessions, refused, peak open sessions).
    pub hosts: Vec<(String, u64, u64, u64, u32)>,
    /// Lines in all hosts.
    pub lines: u64,
    /// Bytes in all logs.
    pub bytes: u64,
    /// Lines per host per hour, on average.
    pub lines_per_host_hour: f64,
    /// Legitimate sources in the labels.
    pub legit_sources: usize,
    /// Attack sources in the labels.
    pub attack_sources: usize,
}

/// Generates the fleet of `config` into `dir`: `dir/<host>/exim_mainlog`
/// for each host and `dir/labels.json`.
pub fn write_fleet(config: Config, dir: &Path) -> Result<Summary, TrafficError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TrafficError::Io { path, source }
    };
    let hours = config.hours;
    let mut g = Generator::new(config)?;
    let mut summary = Summary {
        hosts: Vec::new(),
        lines: 0,
        bytes: 0,
        lines_per_host_hour: 0.0,
        legit_sources: 0,
        attack_sources: 0,
    };
    for host in 0..g.config().hosts {
        let log = g.generate_host(host);
        let hdir = dir.join(&log.name);
        std::fs::create_dir_all(&hdir).map_err(io(&hdir))?;
        let path = hdir.join("exim_mainlog");
        let file = std::fs::File::create(&path).map_err(io(&path))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut bytes = 0u64;
        for l in &log.lines {
            w.write_all(l.text.as_bytes()).map_err(io(&path))?;
            w.write_all(b"\n").map_err(io(&path))?;
            bytes += l.text.len() as u64 + 1;
        }
        w.flush().map_err(io(&path))?;
        summary.lines += log.lines.len() as u64;
        summary.bytes += bytes;
        summary.hosts.push((log.name, log.lines.len() as u64, log.sessions, log.refused, log.peak_open));
    }
    let labels = g.labels();
    summary.legit_sources = labels.sources.iter().filter(|s| s.label == Label::Legit).count();
    summary.attack_sources = labels.sources.len() - summary.legit_sources;
    summary.lines_per_host_hour = summary.lines as f64 / (labels.hosts.len() as f64 * f64::from(hours));
    let path = dir.join("labels.json");
    let json =
        serde_json::to_vec_pretty(&labels).map_err(|source| TrafficError::Json { path: path.clone(), source })?;
    std::fs::write(&path, json).map_err(io(&path))?;
    Ok(summary)
}

// ---------------------------------------------------------------------------
// Scoring

/// One decision of a detector: a range blocked at a time (the form of a
/// decisions file; [`score`] takes `(range, time_ms)` pairs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The blocked range.
    pub range: IpNet,
    /// When it was decided, unix ms (on the log's clock).
    pub time_ms: i64,
}

/// A legitimate source that a decision covered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LegitBlocked {
    /// Its address.
    pub range: IpNet,
    /// Its class and actor.
    pub class: Class,
    /// Its actor.
    pub actor: String,
    /// The first decision (by time) that covered it.
    pub decision: IpNet,
    /// When.
    pub decision_ms: i64,
}

/// How one attacker fared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttackerResult {
    /// The address or range it is judged as.
    pub range: IpNet,
    /// Its class.
    pub class: Class,
    /// Its actor.
    pub actor: String,
    /// Its first abusive line, unix ms.
    pub first_line_ms: i64,
    /// The first decision covering its whole range at or after its first
    /// line.
    pub decision: Option<IpNet>,
    /// From its first line to that decision, ms.
    pub time_to_block_ms: Option<i64>,
    /// For a range: how many of its members some decision covered.
    pub members_covered: usize,
    /// For a range: how many members it has.
    pub members: usize,
    /// Its attack lines (see [`Source::attack_lines_ms`]).
    pub attack_lines: usize,
    /// Of them, written before it was blocked (all when never blocked): the
    /// exposure, independent of how the attack is paced.
    pub attack_lines_before_block: usize,
}

/// Counts of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassCount {
    /// Sources of the class.
    pub total: usize,
    /// Of them blocked.
    pub blocked: usize,
}

/// The benchmark's verdict on a set of decisions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    /// Legitimate sources.
    pub legit_total: usize,
    /// Legitimate sources some decision covered (any time).
    pub legit_blocked: Vec<LegitBlocked>,
    /// Attackers.
    pub attackers_total: usize,
    /// Attackers covered after their first line.
    pub attackers_blocked: usize,
    /// Every attacker.
    pub attackers: Vec<AttackerResult>,
    /// Attackers that never wrote an attack line (every connection refused
    /// while a host was full): not scored.
    pub attackers_unseen: Vec<IpNet>,
    /// Median time from an attacker's first line to its block, over the
    /// blocked ones (ms).
    pub median_time_to_block_ms: Option<i64>,
    /// 95th percentile of the same (nearest rank).
    pub p95_time_to_block_ms: Option<i64>,
    /// Per class.
    pub classes: BTreeMap<String, ClassCount>,
}

/// The nearest-rank percentile `p` (0..=100) of sorted values.
fn percentile(sorted: &[i64], p: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// Scores decisions against labels.
///
/// - A legitimate source is blocked when any decision's range contains its
///   address, at any time (a /24 block of an attacker's neighbour blocks the
///   neighbour).
/// - An attacker is blocked when a decision made at or after its first line
///   contains its whole address or range (a /24 campaign needs a decision of
///   /24 or wider; single-address blocks of its members are reported as
///   `members_covered` but do not count).
/// - Time to block is the first such decision's time minus the first line.
/// - An attacker without attack lines (every connection it tried was
///   refused because a host was full) is listed in `attackers_unseen` and
///   not scored: it never did anything a detector could see.
pub fn score(labels: &Labels, decisions: &[(IpNet, i64)]) -> Score {
    let mut sorted: Vec<Decision> = decisions.iter().map(|&(range, time_ms)| Decision { range, time_ms }).collect();
    sorted.sort_by_key(|d| d.time_ms);
    let mut legit_total = 0;
    let mut unseen = Vec::new();
    let mut legit_blocked = Vec::new();
    let mut attackers = Vec::new();
    let mut classes: BTreeMap<String, ClassCount> = BTreeMap::new();
    for s in &labels.sources {
        let c = classes.entry(s.class.as_str().to_owned()).or_default();
        c.total += 1;
        match s.label {
            Label::Legit => {
                legit_total += 1;
                if let Some(d) = sorted.iter().find(|d| d.range.contains(&s.range) || s.range.contains(&d.range)) {
                    c.blocked += 1;
                    legit_blocked.push(LegitBlocked {
                        range: s.range,
                        class: s.class,
                        actor: s.actor.clone(),
                        decision: d.range,
                        decision_ms: d.time_ms,
                    });
                }
            }
            Label::Attack if s.attack_lines_ms.is_empty() => {
                // Every attempt was refused while a host was full: nothing
                // abusive was ever written, so there is nothing to block.
                c.total -= 1;
                unseen.push(s.range);
            }
            Label::Attack => {
                let hit = sorted.iter().find(|d| d.time_ms >= s.first_line_ms && d.range.contains(&s.range));
                if hit.is_some() {
                    c.blocked += 1;
                }
                let members_covered = s
                    .members
                    .iter()
                    .filter(|m| sorted.iter().any(|d| d.time_ms >= s.first_line_ms && d.range.contains(*m)))
                    .count();
                attackers.push(AttackerResult {
                    range: s.range,
                    class: s.class,
                    actor: s.actor.clone(),
                    first_line_ms: s.first_line_ms,
                    decision: hit.map(|d| d.range),
                    time_to_block_ms: hit.map(|d| d.time_ms - s.first_line_ms),
                    members_covered,
                    members: s.members.len(),
                    attack_lines: s.attack_lines_ms.len(),
                    attack_lines_before_block: hit
                        .map_or(s.attack_lines_ms.len(), |d| s.attack_lines_ms.partition_point(|&t| t < d.time_ms)),
                });
            }
        }
    }
    let mut times: Vec<i64> = attackers.iter().filter_map(|a| a.time_to_block_ms).collect();
    times.sort_unstable();
    Score {
        legit_total,
        attackers_total: attackers.len(),
        attackers_blocked: times.len(),
        median_time_to_block_ms: percentile(&times, 50),
        p95_time_to_block_ms: percentile(&times, 95),
        legit_blocked,
        attackers,
        attackers_unseen: unseen,
        classes,
    }
}

impl Decision {
    /// The `(range, time_ms)` pair [`score`] takes.
    pub fn pair(&self) -> (IpNet, i64) {
        (self.range, self.time_ms)
    }
}

impl Score {
    /// Whether the benchmark's goal is met: no legitimate sender blocked,
    /// every attacker blocked, median time to block under 2 s.
    pub fn goal_met(&self) -> bool {
        self.legit_blocked.is_empty()
            && self.attackers_blocked == self.attackers_total
            && self.median_time_to_block_ms.is_some_and(|m| m < 2000)
    }
}

fn secs(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "legitimate senders blocked: {} of {}", self.legit_blocked.len(), self.legit_total)?;
        writeln!(f, "attackers blocked:          {} of {}", self.attackers_blocked, self.attackers_total)?;
        writeln!(
            f,
            "time to block:              median {}, p95 {}",
            secs(self.median_time_to_block_ms),
            secs(self.p95_time_to_block_ms)
        )?;
        writeln!(
            f,
            "goal (0 legit, 100 % attackers, median < 2 s): {}",
            if self.goal_met() { "met" } else { "NOT met" }
        )?;
        writeln!(f, "\nper class (blocked / total):")?;
        for (class, c) in &self.classes {
            writeln!(f, "  {class:<22} {:>4} / {:<4}", c.blocked, c.total)?;
        }
        if !self.legit_blocked.is_empty() {
            writeln!(f, "\nlegitimate senders blocked:")?;
            for l in &self.legit_blocked {
                writeln!(
                    f,
                    "  {:<28} {:<22} {:<16} by {} at {}",
                    l.range.to_string(),
                    l.class,
                    l.actor,
                    l.decision,
                    l.decision_ms
                )?;
            }
        }
        if !self.attackers_unseen.is_empty() {
            let list: Vec<String> = self.attackers_unseen.iter().map(ToString::to_string).collect();
            writeln!(f, "\nattackers never seen attacking (only refused), not scored: {}", list.join(", "))?;
        }
        writeln!(f, "\nattackers:")?;
        for a in &self.attackers {
            let members = if a.members > 0 {
                format!(" (members covered {}/{})", a.members_covered, a.members)
            } else {
                String::new()
            };
            match (a.decision, a.time_to_block_ms) {
                (Some(d), Some(ms)) => writeln!(
                    f,
                    "  {:<28} {:<18} blocked by {d} after {} and {}/{} attack lines{members}",
                    a.range.to_string(),
                    a.class,
                    secs(Some(ms)),
                    a.attack_lines_before_block,
                    a.attack_lines
                )?,
                _ => writeln!(
                    f,
                    "  {:<28} {:<18} NOT blocked ({} attack lines){members}",
                    a.range.to_string(),
                    a.class,
                    a.attack_lines
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(range: &str, class: Class, first: i64, members: &[&str]) -> Source {
        Source {
            range: range.parse().unwrap(),
            label: class.label(),
            class,
            actor: range.to_owned(),
            hosts: vec!["mx01".into()],
            first_line_ms: first,
            first_any_line_ms: first,
            last_line_ms: first + 1000,
            lines: 1,
            abuse_lines: 0,
            attack_lines_ms: vec![first, first + 500, first + 5000],
            refused: 0,
            members: members.iter().map(|m| m.parse().unwrap()).collect(),
        }
    }

    fn labels() -> Labels {
        Labels {
            seed: 1,
            start_ms: 0,
            end_ms: 3_600_000,
            hosts: vec!["mx01".into()],
            smtp_accept_max: 20,
            sources: vec![
                src("198.18.10.5/32", Class::BigProvider, 0, &[]),
                src("198.19.76.14/32", Class::OfficeNat, 0, &[]),
                src("2001:db8:bad:2::25/128", Class::SmallSender, 0, &[]),
                src("198.19.20.7/32", Class::DistributedAuth, 10_000, &[]),
                src("198.19.30.150/32", Class::SlowAuth, 20_000, &[]),
                src("198.19.77.0/24", Class::Campaign24, 30_000, &["198.19.77.2", "198.19.77.3"]),
                src("2001:db8:bad:1::/64", Class::Ipv6Rotation, 40_000, &["2001:db8:bad:1::9"]),
            ],
        }
    }

    fn d(range: &str, time_ms: i64) -> (IpNet, i64) {
        (range.parse().unwrap(), time_ms)
    }

    #[test]
    fn no_decisions_block_nothing() {
        let s = score(&labels(), &[]);
        assert_eq!(s.legit_total, 3);
        assert!(s.legit_blocked.is_empty());
        assert_eq!((s.attackers_total, s.attackers_blocked), (4, 0));
        assert_eq!(s.median_time_to_block_ms, None);
        assert!(!s.goal_met());
    }

    #[test]
    fn perfect_decisions_meet_the_goal() {
        let decisions = [
            d("198.19.20.7/32", 11_000),
            d("198.19.30.150/32", 20_500),
            d("198.19.77.0/24", 31_000),
            d("2001:db8:bad:1::/64", 43_000),
        ];
        let s = score(&labels(), &decisions);
        assert!(s.legit_blocked.is_empty(), "{s}");
        assert_eq!(s.attackers_blocked, 4);
        // Times 1000, 500, 1000, 3000 ms: median (nearest rank) 1000, p95 3000.
        assert_eq!(s.median_time_to_block_ms, Some(1000));
        assert_eq!(s.p95_time_to_block_ms, Some(3000));
        assert!(s.goal_met());
        assert_eq!(s.classes["campaign_24"], ClassCount { total: 1, blocked: 1 });
    }

    #[test]
    fn a_range_decision_blocks_the_legitimate_neighbour() {
        // A legitimate sender inside the campaign's /24: the exact /24 blocks it.
        let mut l = labels();
        l.sources.push(src("198.19.77.250/32", Class::OfficeNat, 0, &[]));
        let s = score(&l, &[d("198.19.77.0/24", 31_000)]);
        assert_eq!(s.legit_blocked.len(), 1, "{s}");
        assert_eq!(s.legit_blocked[0].range, "198.19.77.250/32".parse::<IpNet>().unwrap());
        assert_eq!(s.legit_blocked[0].decision, "198.19.77.0/24".parse::<IpNet>().unwrap());
        assert_eq!(s.attackers_blocked, 1);
        // A /48 over the rotation's /64 covers the VPS in the next /64.
        let s = score(&labels(), &[d("2001:db8:bad::/48", 41_000)]);
        assert_eq!(s.legit_total, 3);
        assert_eq!(s.legit_blocked.len(), 1);
        assert_eq!(s.legit_blocked[0].class, Class::SmallSender);
        assert_eq!(s.attackers_blocked, 1);
        assert!(!s.goal_met());
        // A /23 over the campaign reaches the office in the /24 next to it.
        let s = score(&labels(), &[d("198.19.76.0/23", 31_000)]);
        assert_eq!(s.legit_blocked.len(), 1);
        assert_eq!(s.legit_blocked[0].class, Class::OfficeNat);
    }

    #[test]
    fn member_blocks_do_not_block_a_range_and_early_decisions_do_not_count() {
        let decisions = [
            d("198.19.77.2/32", 31_000),
            d("198.19.77.3/32", 32_000),
            // Before the attacker's first line.
            d("198.19.20.7/32", 5_000),
            // A /25 is narrower than the campaign's /24.
            d("198.19.77.0/25", 33_000),
        ];
        let s = score(&labels(), &decisions);
        assert_eq!(s.attackers_blocked, 0, "{s}");
        let campaign = s.attackers.iter().find(|a| a.class == Class::Campaign24).unwrap();
        assert_eq!((campaign.members_covered, campaign.members), (2, 2));
        assert_eq!(campaign.decision, None);
        // The earliest covering decision after the first line is the one used.
        let s = score(&labels(), &[d("198.19.20.0/24", 19_000), d("198.19.20.7/32", 12_000)]);
        let a = s.attackers.iter().find(|a| a.class == Class::DistributedAuth).unwrap();
        assert_eq!(a.time_to_block_ms, Some(2000));
        // Its attack lines are at +0, +0.5 s and +5 s: two came before the block.
        assert_eq!((a.attack_lines_before_block, a.attack_lines), (2, 3));
        let never = s.attackers.iter().find(|a| a.class == Class::SlowAuth).unwrap();
        assert_eq!((never.attack_lines_before_block, never.attack_lines), (3, 3));
        assert_eq!(a.decision, Some("198.19.20.7/32".parse().unwrap()));
    }

    #[test]
    fn report_and_json_name_what_was_blocked() {
        let s = score(&labels(), &[d("198.18.10.0/24", 1), d("198.19.20.7/32", 10_000)]);
        let text = s.to_string();
        assert!(text.contains("legitimate senders blocked: 1 of 3"), "{text}");
        assert!(text.contains("198.18.10.5/32") && text.contains("big_provider"), "{text}");
        assert!(text.contains("NOT blocked"), "{text}");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["legit_blocked"][0]["class"], "big_provider");
        assert_eq!(json["attackers_blocked"], 1);
        assert_eq!(json["median_time_to_block_ms"], 0);
    }

    #[test]
    fn attackers_that_only_were_refused_are_not_scored() {
        let mut l = labels();
        let mut only_refused = src("198.19.40.201/32", Class::Dictionary, 0, &[]);
        only_refused.attack_lines_ms.clear();
        l.sources.push(only_refused);
        let s = score(&l, &[]);
        assert_eq!(s.attackers_total, 4);
        assert_eq!(s.attackers_unseen, ["198.19.40.201/32".parse::<IpNet>().unwrap()]);
        assert_eq!(s.classes["dictionary"], ClassCount { total: 0, blocked: 0 });
        assert!(s.to_string().contains("not scored: 198.19.40.201/32"));
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<i64> = (1..=20).collect();
        assert_eq!(percentile(&v, 50), Some(10));
        assert_eq!(percentile(&v, 95), Some(19));
        assert_eq!(percentile(&[7], 95), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn civil_matches_known_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0, 0));
        assert_eq!(civil(DEFAULT_START_MS), (2026, 11, 2, 0, 0, 0, 0));
        assert_eq!(civil(951_782_400_123), (2000, 2, 29, 0, 0, 0, 123));
    }

    #[test]
    fn labels_round_trip_through_json() {
        let l = labels();
        let text = serde_json::to_string(&l).unwrap();
        assert!(text.contains("\"campaign_24\""));
        assert_eq!(serde_json::from_str::<Labels>(&text).unwrap(), l);
    }
}
