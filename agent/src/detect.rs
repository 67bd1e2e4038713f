//! Local detection: abuse rules that block within milliseconds, without
//! waiting for the server.
//!
//! Four rules, with thresholds from `[detect]` (and `Policy` updates from the
//! server):
//!
//! - **slot exhaustion** (`slot_exhaustion`): a `connect` line whose
//!   connection count reaches `slot_alarm_ratio` of `smtp_accept_max`
//!   (configured, or learned as the highest count seen, never below 100), or
//!   any `refused_too_many` / `refused_per_host` line, raises the alarm; the
//!   addresses holding at least `slot_share` of the connections opened in the
//!   last `slot_window_secs` (and at least [`SLOT_MIN_CONNECTIONS`]) are
//!   blocked. While the alarm lasts the shares are recomputed at most once
//!   a second.
//! - **connection rate** (`conn_rate`): `conn_rate` connects from one address
//!   within `conn_rate_window_secs`.
//! - **auth failures** (`auth_failures`): `auth_failures` failed logins, or
//!   `auth_distinct_users` distinct user names, from one address within
//!   `auth_window_secs`.
//! - **protocol abuse** (`protocol_abuse`): `abuse_events` sync errors,
//!   nonmail / syntax / unrecognized-command drops, protocol or syntax errors
//!   and relay attempts within `abuse_window_secs`.
//!
//! Windows slide on the events' own timestamps; an event older than the
//! longest window (a backlog read at start) is skipped and counted, so old
//! history never triggers a block. Addresses are tracked by the range they
//! would be blocked as (IPv4 /32, IPv6 /`ipv6_block_prefix`). Memory is
//! bounded: each tracked range keeps at most as many timestamps as its
//! thresholds need, and at most `max_tracked` ranges are tracked (least
//! recently seen evicted and counted).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetban_proto::v1::Policy;
use ipnet::IpNet;

use crate::config::DetectConfig;
use crate::parse::{Event, EventKind};

/// Fewest connections an address must hold in the slot window to be blocked
/// for slot exhaustion (a share of a handful of connections is noise).
pub const SLOT_MIN_CONNECTIONS: usize = 3;
/// The slot ceiling assumed while learning (cPanel's `smtp_accept_max`).
pub const DEFAULT_SLOT_CEILING: u32 = 100;
/// Shortest interval between two slot-share computations during an alarm.
const SLOT_EVAL_INTERVAL_MS: i64 = 1_000;

/// Which rule fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A few addresses hold the connection slots.
    SlotExhaustion,
    /// Too many connects from one address.
    ConnRate,
    /// Too many failed logins from one address.
    AuthFailures,
    /// Too many protocol violations from one address.
    ProtocolAbuse,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 4] = [Rule::SlotExhaustion, Rule::ConnRate, Rule::AuthFailures, Rule::ProtocolAbuse];

    /// The name reported to the server (`LocalBlock.reason`) and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::SlotExhaustion => "slot_exhaustion",
            Rule::ConnRate => "conn_rate",
            Rule::AuthFailures => "auth_failures",
            Rule::ProtocolAbuse => "protocol_abuse",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The thresholds in force (config, then server policy).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Slot ceiling; 0 = learn.
    pub smtp_accept_max: u32,
    /// Alarm ratio of the ceiling.
    pub slot_alarm_ratio: f64,
    /// Share of recent connections that marks a slot holder.
    pub slot_share: f64,
    /// Slot window, ms.
    pub slot_window_ms: i64,
    /// Connects per window.
    pub conn_rate: u32,
    /// Connection-rate window, ms.
    pub conn_rate_window_ms: i64,
    /// Failed logins per window.
    pub auth_failures: u32,
    /// Distinct failing users per window.
    pub auth_distinct_users: u32,
    /// Auth window, ms.
    pub auth_window_ms: i64,
    /// Abuse events per window.
    pub abuse_events: u32,
    /// Abuse window, ms.
    pub abuse_window_ms: i64,
    /// IPv6 block prefix length.
    pub ipv6_block_prefix: u8,
    /// Local block lifetime, seconds.
    pub local_block_ttl_secs: u32,
}

impl From<&DetectConfig> for Thresholds {
    fn from(c: &DetectConfig) -> Self {
        Self {
            smtp_accept_max: c.smtp_accept_max,
            slot_alarm_ratio: c.slot_alarm_ratio,
            slot_share: c.slot_share,
            slot_window_ms: i64::from(c.slot_window_secs) * 1000,
            conn_rate: c.conn_rate,
            conn_rate_window_ms: i64::from(c.conn_rate_window_secs) * 1000,
            auth_failures: c.auth_failures,
            auth_distinct_users: c.auth_distinct_users,
            auth_window_ms: i64::from(c.auth_window_secs) * 1000,
            abuse_events: c.abuse_events,
            abuse_window_ms: i64::from(c.abuse_window_secs) * 1000,
            ipv6_block_prefix: c.ipv6_block_prefix,
            local_block_ttl_secs: c.local_block_ttl_secs,
        }
    }
}

impl Thresholds {
    /// Applies a server policy: every non-zero, valid field replaces the
    /// local value.
    pub fn apply_policy(&mut self, policy: &Policy) {
        if policy.smtp_accept_max > 0 {
            self.smtp_accept_max = policy.smtp_accept_max;
        }
        if policy.slot_alarm_ratio > 0.0 && policy.slot_alarm_ratio <= 1.0 {
            self.slot_alarm_ratio = policy.slot_alarm_ratio;
        }
        if policy.slot_share > 0.0 && policy.slot_share <= 1.0 {
            self.slot_share = policy.slot_share;
        }
        if policy.slot_window_secs > 0 {
            self.slot_window_ms = i64::from(policy.slot_window_secs.min(86_400)) * 1000;
        }
        if policy.conn_rate > 0 {
            self.conn_rate = policy.conn_rate;
        }
        if policy.auth_failures > 0 {
            self.auth_failures = policy.auth_failures;
        }
        if policy.abuse_events > 0 {
            self.abuse_events = policy.abuse_events;
        }
        if (48..=128).contains(&policy.ipv6_block_prefix) {
            self.ipv6_block_prefix = policy.ipv6_block_prefix as u8;
        }
        if policy.local_block_ttl_secs > 0 {
            self.local_block_ttl_secs = policy.local_block_ttl_secs;
        }
    }

    fn longest_window_ms(&self) -> i64 {
        self.slot_window_ms.max(self.conn_rate_window_ms).max(self.auth_window_ms).max(self.abuse_window_ms)
    }
}

/// A decision to block a range locally.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The range (IPv4 /32 or IPv6 /`ipv6_block_prefix`).
    pub net: IpNet,
    /// The rule that fired.
    pub rule: Rule,
    /// Counts and window, for the server and the log.
    pub evidence: String,
    /// Block lifetime, seconds.
    pub ttl_secs: u32,
    /// When it was decided, unix ms.
    pub time_ms: i64,
}

/// Counters of detection.
#[derive(Debug, Default)]
pub struct DetectStats {
    /// Decisions per rule (indexed like [`Rule::ALL`]).
    pub decisions: [AtomicU64; 4],
    /// Tracked ranges evicted because `max_tracked` was reached.
    pub evictions: AtomicU64,
    /// Events skipped because they were older than the longest window.
    pub stale_skipped: AtomicU64,
    /// Ranges tracked now.
    pub tracked: AtomicU64,
}

#[derive(Debug, Default)]
struct Track {
    tick: u64,
    connects: VecDeque<i64>,
    auth: VecDeque<i64>,
    users: Vec<(u64, i64)>,
    abuse: VecDeque<i64>,
}

/// Pushes `t` keeping the newest `cap`; returns whether `cap` events lie
/// within `window_ms` of the newest.
fn push_window(times: &mut VecDeque<i64>, t: i64, cap: u32, window_ms: i64) -> bool {
    let cap = cap.max(1) as usize;
    times.push_back(t);
    while times.len() > cap {
        times.pop_front();
    }
    times.len() == cap && times.front().is_some_and(|first| t - first < window_ms)
}

/// The detector. See the module documentation.
#[derive(Debug)]
pub struct Detector {
    thresholds: Thresholds,
    exclude: Vec<IpNet>,
    max_tracked: usize,
    tracks: HashMap<IpNet, Track>,
    lru: VecDeque<(IpNet, u64)>,
    tick: u64,
    slot_recent: VecDeque<(i64, IpNet)>,
    highest_count: u32,
    last_slot_eval_ms: Option<i64>,
    blocked: HashMap<IpNet, i64>,
    stats: Arc<DetectStats>,
}

fn is_abuse_kind(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::SyncError
            | EventKind::TooManyNonmail
            | EventKind::TooManySyntax
            | EventKind::TooManyUnrecognized
            | EventKind::ProtocolError
            | EventKind::SyntaxError
            | EventKind::RelayDenied
    )
}

impl Detector {
    /// A detector with `config`'s thresholds, never blocking `exclude`.
    pub fn new(config: &DetectConfig, exclude: Vec<IpNet>, stats: Arc<DetectStats>) -> Self {
        Self {
            thresholds: Thresholds::from(config),
            exclude,
            max_tracked: config.max_tracked.max(1),
            tracks: HashMap::new(),
            lru: VecDeque::new(),
            tick: 0,
            slot_recent: VecDeque::new(),
            highest_count: 0,
            last_slot_eval_ms: None,
            blocked: HashMap::new(),
            stats,
        }
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> &Thresholds {
        &self.thresholds
    }

    /// Applies a server policy.
    pub fn set_policy(&mut self, policy: &Policy) {
        self.thresholds.apply_policy(policy);
    }

    /// Replaces the ranges that are never blocked.
    pub fn set_exclusions(&mut self, exclude: Vec<IpNet>) {
        self.exclude = exclude;
    }

    /// The counters.
    pub fn stats(&self) -> Arc<DetectStats> {
        self.stats.clone()
    }

    /// The range an address is tracked and blocked as.
    pub fn block_net(&self, ip: IpAddr) -> IpNet {
        let len = if ip.is_ipv4() { 32 } else { self.thresholds.ipv6_block_prefix };
        IpNet::new(ip, len).map_or(IpNet::from(ip), |net| net.trunc())
    }

    /// Feeds one parsed event observed at `now_ms`.
    pub fn observe_event(&mut self, event: &Event<'_>, now_ms: i64) -> Vec<Decision> {
        self.observe(event.kind, event.ip, event.count, event.user, event.time_ms, now_ms)
    }

    /// Feeds one event; returns the blocks it triggers.
    pub fn observe(
        &mut self,
        kind: EventKind,
        ip: IpAddr,
        count: Option<u32>,
        user: Option<&str>,
        time_ms: i64,
        now_ms: i64,
    ) -> Vec<Decision> {
        let relevant = matches!(kind, EventKind::Connect | EventKind::RefusedTooMany | EventKind::RefusedPerHost)
            || kind == EventKind::AuthFailed
            || is_abuse_kind(kind);
        if !relevant {
            return Vec::new();
        }
        if time_ms < now_ms - self.thresholds.longest_window_ms() {
            self.stats.stale_skipped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let net = self.block_net(ip);
        let t = time_ms;
        let th = self.thresholds.clone();
        let mut decisions = Vec::new();
        let mut alarm = false;
        match kind {
            EventKind::Connect => {
                self.push_slot(t, net);
                if let Some(count) = count {
                    self.highest_count = self.highest_count.max(count);
                    let ceiling = if th.smtp_accept_max > 0 {
                        th.smtp_accept_max
                    } else {
                        self.highest_count.max(DEFAULT_SLOT_CEILING)
                    };
                    alarm = f64::from(count) >= th.slot_alarm_ratio * f64::from(ceiling);
                }
                let track = self.track(net);
                if push_window(&mut track.connects, t, th.conn_rate, th.conn_rate_window_ms) {
                    track.connects.clear();
                    let evidence = format!("{} connects within {} s", th.conn_rate, th.conn_rate_window_ms / 1000);
                    decisions.push((Rule::ConnRate, evidence));
                }
            }
            EventKind::RefusedTooMany | EventKind::RefusedPerHost => alarm = true,
            EventKind::AuthFailed => {
                let user_hash = user.map(|user| {
                    let mut hasher = DefaultHasher::new();
                    user.hash(&mut hasher);
                    hasher.finish()
                });
                let track = self.track(net);
                if push_window(&mut track.auth, t, th.auth_failures, th.auth_window_ms) {
                    track.auth.clear();
                    track.users.clear();
                    decisions.push((
                        Rule::AuthFailures,
                        format!("{} failed logins within {} s", th.auth_failures, th.auth_window_ms / 1000),
                    ));
                } else if let Some(hash) = user_hash {
                    track.users.retain(|(_, seen)| t - seen < th.auth_window_ms);
                    match track.users.iter_mut().find(|(h, _)| *h == hash) {
                        Some(entry) => entry.1 = t,
                        None => track.users.push((hash, t)),
                    }
                    if track.users.len() >= th.auth_distinct_users.max(1) as usize {
                        let distinct = track.users.len();
                        track.auth.clear();
                        track.users.clear();
                        decisions.push((
                            Rule::AuthFailures,
                            format!("{distinct} distinct users failed within {} s", th.auth_window_ms / 1000),
                        ));
                    }
                }
            }
            _ => {
                let track = self.track(net);
                if push_window(&mut track.abuse, t, th.abuse_events, th.abuse_window_ms) {
                    track.abuse.clear();
                    decisions.push((
                        Rule::ProtocolAbuse,
                        format!("{} protocol violations within {} s", th.abuse_events, th.abuse_window_ms / 1000),
                    ));
                }
            }
        }
        let mut out = Vec::new();
        for (rule, evidence) in decisions {
            out.extend(self.decide(net, rule, evidence, now_ms));
        }
        if alarm && self.last_slot_eval_ms.is_none_or(|last| now_ms - last >= SLOT_EVAL_INTERVAL_MS) {
            self.last_slot_eval_ms = Some(now_ms);
            out.extend(self.slot_holders(t, now_ms));
        }
        self.evict();
        out
    }

    fn push_slot(&mut self, t: i64, net: IpNet) {
        self.slot_recent.push_back((t, net));
        let window = self.thresholds.slot_window_ms;
        while self.slot_recent.front().is_some_and(|(seen, _)| t - seen >= window)
            || self.slot_recent.len() > self.max_tracked * 2
        {
            self.slot_recent.pop_front();
        }
    }

    /// The ranges holding at least `slot_share` of the window's connections.
    fn slot_holders(&mut self, t: i64, now_ms: i64) -> Vec<Decision> {
        let window = self.thresholds.slot_window_ms;
        let mut counts: HashMap<IpNet, usize> = HashMap::new();
        let mut total = 0usize;
        for (seen, net) in &self.slot_recent {
            if t - seen < window {
                *counts.entry(*net).or_default() += 1;
                total += 1;
            }
        }
        let needed = ((self.thresholds.slot_share * total as f64).ceil() as usize).max(SLOT_MIN_CONNECTIONS);
        let mut holders: Vec<(IpNet, usize)> = counts.into_iter().filter(|(_, n)| *n >= needed).collect();
        holders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Vec::new();
        for (net, n) in holders {
            let evidence = format!(
                "slot alarm: holds {n} of {total} connections opened within {} s ({:.0}%)",
                window / 1000,
                100.0 * n as f64 / total.max(1) as f64
            );
            out.extend(self.decide(net, Rule::SlotExhaustion, evidence, now_ms));
        }
        out
    }

    fn decide(&mut self, net: IpNet, rule: Rule, evidence: String, now_ms: i64) -> Option<Decision> {
        if self.blocked.get(&net).is_some_and(|until| *until > now_ms) {
            return None;
        }
        if self.exclude.iter().any(|x| x.contains(&net) || net.contains(x)) {
            return None;
        }
        let ttl_secs = self.thresholds.local_block_ttl_secs;
        if self.blocked.len() >= self.max_tracked {
            self.blocked.retain(|_, until| *until > now_ms);
        }
        self.blocked.insert(net, now_ms + i64::from(ttl_secs) * 1000);
        self.stats.decisions[rule.index()].fetch_add(1, Ordering::Relaxed);
        Some(Decision { net, rule, evidence, ttl_secs, time_ms: now_ms })
    }

    /// The track of `net`, marked as most recently seen.
    fn track(&mut self, net: IpNet) -> &mut Track {
        self.tick += 1;
        let tick = self.tick;
        self.lru.push_back((net, tick));
        let track = self.tracks.entry(net).or_default();
        track.tick = tick;
        track
    }

    /// Enforces `max_tracked` (least recently seen first).
    fn evict(&mut self) {
        while self.tracks.len() > self.max_tracked {
            let Some((net, tick)) = self.lru.pop_front() else { break };
            if self.tracks.get(&net).is_some_and(|track| track.tick == tick) {
                self.tracks.remove(&net);
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.lru.len() > 2 * self.max_tracked + 64 {
            let tracks = &self.tracks;
            self.lru.retain(|(net, tick)| tracks.get(net).is_some_and(|track| track.tick == *tick));
        }
        self.stats.tracked.store(self.tracks.len() as u64, Ordering::Relaxed);
    }

    /// Ranges tracked now.
    pub fn tracked(&self) -> usize {
        self.tracks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn detector() -> Detector {
        Detector::new(&DetectConfig::default(), vec![], Arc::default())
    }

    fn connect(d: &mut Detector, addr: &str, count: u32, t: i64) -> Vec<Decision> {
        d.observe(EventKind::Connect, ip(addr), Some(count), None, t, t)
    }

    #[test]
    fn conn_rate_fires_at_30_within_60_s_and_not_slower() {
        let mut d = detector();
        // 30 connects spread over 61 s: never 30 within 60 s.
        for i in 0..30 {
            assert!(connect(&mut d, "192.0.2.1", 1, T0 + i * 2_100).is_empty(), "fired at {i}");
        }
        let mut d = detector();
        for i in 0..29 {
            assert!(connect(&mut d, "192.0.2.1", 1, T0 + i * 1_000).is_empty());
        }
        let fired = connect(&mut d, "192.0.2.1", 1, T0 + 29_000);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].rule, Rule::ConnRate);
        assert_eq!(fired[0].net, "192.0.2.1/32".parse::<IpNet>().unwrap());
        assert_eq!(fired[0].ttl_secs, 3600);
        // Already blocked: no second decision.
        for i in 0..40 {
            assert!(connect(&mut d, "192.0.2.1", 1, T0 + 30_000 + i).is_empty());
        }
        assert_eq!(d.stats().decisions[Rule::ConnRate.index()].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn auth_failures_by_count_and_by_distinct_users() {
        let mut d = detector();
        let fail = |d: &mut Detector, addr: &str, user: &str, t: i64| {
            d.observe(EventKind::AuthFailed, ip(addr), None, Some(user), t, t)
        };
        // Same user 5 times within 600 s.
        for i in 0..4 {
            assert!(fail(&mut d, "192.0.2.5", "info@example.com", T0 + i * 100_000).is_empty());
        }
        let fired = fail(&mut d, "192.0.2.5", "info@example.com", T0 + 400_000);
        assert_eq!(fired.iter().map(|f| f.rule).collect::<Vec<_>>(), [Rule::AuthFailures]);
        // 4 failures 200 s apart (800 s span) never fire.
        for i in 0..8 {
            assert!(fail(&mut d, "192.0.2.6", "a", T0 + i * 200_000).is_empty());
        }
        // Three distinct users.
        assert!(fail(&mut d, "192.0.2.7", "a", T0).is_empty());
        assert!(fail(&mut d, "192.0.2.7", "b", T0 + 1_000).is_empty());
        let fired = fail(&mut d, "192.0.2.7", "c", T0 + 2_000);
        assert_eq!(fired.len(), 1);
        assert!(fired[0].evidence.contains("3 distinct users"), "{}", fired[0].evidence);
        // Distinct users spread beyond the window do not count.
        assert!(fail(&mut d, "192.0.2.8", "a", T0).is_empty());
        assert!(fail(&mut d, "192.0.2.8", "b", T0 + 300_000).is_empty());
        assert!(fail(&mut d, "192.0.2.8", "c", T0 + 700_000).is_empty());
    }

    #[test]
    fn protocol_abuse_counts_only_abuse_kinds() {
        let mut d = detector();
        let kinds = [EventKind::SyncError, EventKind::TooManyNonmail, EventKind::ProtocolError, EventKind::RelayDenied];
        for i in 0..9 {
            assert!(d.observe(kinds[i % 4], ip("198.51.100.9"), None, None, T0 + i as i64, T0).is_empty());
            // Context kinds never count.
            assert!(d.observe(EventKind::Lost, ip("198.51.100.9"), None, None, T0, T0).is_empty());
            assert!(d.observe(EventKind::TlsError, ip("198.51.100.9"), None, None, T0, T0).is_empty());
        }
        let fired = d.observe(EventKind::TooManySyntax, ip("198.51.100.9"), None, None, T0 + 100, T0);
        assert_eq!(fired.iter().map(|f| f.rule).collect::<Vec<_>>(), [Rule::ProtocolAbuse]);
    }

    #[test]
    fn slot_exhaustion_blocks_the_largest_holders() {
        let mut d = detector();
        let mut t = T0;
        // Background: 40 senders with one or two connects each.
        for i in 0..40 {
            t += 100;
            assert!(connect(&mut d, &format!("203.0.113.{i}"), 10 + i, t).is_empty());
        }
        // Two attackers open 25 connects each (below conn_rate 30).
        for i in 0..25 {
            t += 10;
            assert!(connect(&mut d, "192.0.2.66", 50 + i, t).is_empty());
            assert!(connect(&mut d, "2001:db8:bad:1::7", 50 + i, t).is_empty());
        }
        // The count reaches 90 of 100: alarm.
        t += 10;
        let fired = connect(&mut d, "203.0.113.200", 90, t);
        let mut nets: Vec<String> = fired.iter().map(|f| f.net.to_string()).collect();
        nets.sort();
        assert_eq!(nets, ["192.0.2.66/32", "2001:db8:bad:1::/64"]);
        assert!(fired.iter().all(|f| f.rule == Rule::SlotExhaustion));
        assert!(fired[0].evidence.contains("of 91 connections"), "{}", fired[0].evidence);
    }

    #[test]
    fn slot_alarm_from_refusals_and_learned_ceiling() {
        let mut d = detector();
        let mut t = T0;
        for i in 0..10 {
            t += 10;
            connect(&mut d, "192.0.2.10", 1 + i, t);
        }
        // Count 12 is far below 90: no alarm yet.
        assert!(connect(&mut d, "192.0.2.11", 12, t).is_empty());
        // A refusal raises it: 192.0.2.10 holds 10 of 11.
        let fired = d.observe(EventKind::RefusedTooMany, ip("198.51.100.1"), None, None, t, t);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].net.to_string(), "192.0.2.10/32");
        // Learned ceiling: counts above 100 raise it, 0.9 of 200 is 180.
        let mut d = detector();
        assert!(connect(&mut d, "192.0.2.20", 200, T0).is_empty(), "one connection is below SLOT_MIN_CONNECTIONS");
        for i in 0..5 {
            connect(&mut d, "192.0.2.21", 100 + i, T0 + 2_000 + i64::from(i));
        }
        assert!(connect(&mut d, "192.0.2.21", 170, T0 + 3_000).is_empty(), "170 < 0.9 * 200");
        let fired = connect(&mut d, "192.0.2.22", 180, T0 + 3_001);
        assert_eq!(fired.iter().map(|f| f.net.to_string()).collect::<Vec<_>>(), ["192.0.2.21/32"]);
    }

    #[test]
    fn policy_changes_thresholds_and_ipv6_prefix() {
        let mut d = detector();
        d.set_policy(&Policy { conn_rate: 3, ipv6_block_prefix: 48, local_block_ttl_secs: 60, ..Policy::default() });
        connect(&mut d, "2001:db8:1:2::1", 1, T0);
        connect(&mut d, "2001:db8:1:3::1", 1, T0 + 1);
        let fired = connect(&mut d, "2001:db8:1:4::1", 1, T0 + 2);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].net.to_string(), "2001:db8:1::/48");
        assert_eq!(fired[0].ttl_secs, 60);
        // Zero fields keep the local values.
        d.set_policy(&Policy::default());
        assert_eq!(d.thresholds().conn_rate, 3);
    }

    #[test]
    fn excluded_and_stale_events_never_block() {
        let mut d = Detector::new(&DetectConfig::default(), vec!["192.0.2.0/24".parse().unwrap()], Arc::default());
        for i in 0..100 {
            assert!(connect(&mut d, "192.0.2.1", 1, T0 + i).is_empty());
        }
        // A backlog an hour old: skipped and counted.
        let old = T0 - 3_600_000;
        for i in 0..100 {
            assert!(d.observe(EventKind::Connect, ip("198.51.100.1"), Some(1), None, old + i, T0).is_empty());
        }
        assert_eq!(d.stats().stale_skipped.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn memory_is_bounded_and_evictions_counted() {
        let config = DetectConfig { max_tracked: 1000, ..DetectConfig::default() };
        let mut d = Detector::new(&config, vec![], Arc::default());
        for i in 0..5000u32 {
            let addr = std::net::Ipv4Addr::from(0xC633_6400 + i); // 198.51.100.0 onwards
            d.observe(EventKind::Connect, IpAddr::V4(addr), Some(1), None, T0 + i64::from(i), T0 + i64::from(i));
        }
        assert_eq!(d.tracked(), 1000);
        assert_eq!(d.stats().evictions.load(Ordering::Relaxed), 4000);
        assert!(d.lru.len() <= 2 * 1000 + 64);
        // The most recent address is still tracked: 29 more connects fire.
        let last = IpAddr::V4(std::net::Ipv4Addr::from(0xC633_6400 + 4999));
        let fired: usize = (0..29)
            .map(|i| d.observe(EventKind::Connect, last, Some(1), None, T0 + 5000 + i, T0 + 5000 + i).len())
            .sum();
        assert_eq!(fired, 1);
    }
}
