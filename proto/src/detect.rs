//! Per-host detection: the rules one mail host applies to its own log, within
//! milliseconds and without the server. The agent runs it on every parsed
//! line; the server's replay runs the same code over past traffic.
//!
//! Rules, with thresholds from [`Thresholds`] (agent config, then `Policy`
//! updates from the server):
//!
//! - **slot exhaustion** (`slot_exhaustion`): every session's open
//!   (`connect`) is matched to its end ([`EventKind::ends_session`]) by
//!   `ip:port` (by address alone when ports are not logged), so the detector
//!   knows who holds the host's slots *now*. When the host is full or nearly
//!   full (a connect line whose count reaches `slot_alarm_ratio` of the
//!   ceiling, or Exim's global `refused: too many connections`), the
//!   addresses holding at least `slot_share` of the ceiling in open sessions
//!   (and at least [`SLOT_MIN_CONNECTIONS`]) are blocked. An address whose
//!   sessions ended, or that was refused, holds nothing and is never a slot
//!   holder. Open sessions with no end line are forgotten after
//!   `session_timeout_ms`.
//! - **connection rate** (`conn_rate`): `conn_rate` connects from one range
//!   within `conn_rate_window_ms`.
//! - **scenarios** (`auth`, `relay`, `dictionary`, `protocol`, `conn_limit`,
//!   `acl`): weighted abuse events on this host against each scenario's
//!   `per_host` (and, for `auth`, `distinct_users`) threshold, judged by
//!   [`crate::policy::judge`].
//!
//! What never blocks: excluded ranges (own addresses, allowlists, the
//! server), addresses whose verified reverse DNS is in a protected domain,
//! context lines. Good standing (accepted mail or a login seen from the
//! range within `good_standing_ms`) multiplies every threshold (by the
//! scenario's factor; by [`GOOD_STANDING_FACTOR`] for slots and rate).
//! A rule in shadow mode decides as usual, but its decisions carry
//! `shadow = true` and the caller blocks nothing.
//!
//! Windows slide on the events' own timestamps; an event older than the
//! longest window (a backlog read at start) is skipped and counted, so old
//! history never triggers a block. Addresses are tracked by the range they
//! would be blocked as (IPv4 /32, IPv6 /`ipv6_block_prefix`). Memory is
//! bounded: each tracked range keeps at most as many timestamps as its
//! thresholds need, at most `max_tracked` ranges are tracked (least recently
//! seen evicted and counted), and at most `max_tracked` open sessions.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;

use crate::policy::{self, Count, DEFAULT_PROTECTED_DOMAINS, Rules, Scenario, Tally, is_protected};
use crate::v1::{self, EventKind, Policy};

/// Fewest open sessions an address must hold to be a slot holder.
pub const SLOT_MIN_CONNECTIONS: u32 = 3;
/// The slot ceiling assumed until one is configured or learned (cPanel's
/// `smtp_accept_max`).
pub const DEFAULT_SLOT_CEILING: u32 = 100;
/// Threshold multiplier of the slot and rate rules for a range in good
/// standing.
pub const GOOD_STANDING_FACTOR: u32 = 2;
/// Shortest interval between two slot-holder evaluations during an alarm.
const SLOT_EVAL_INTERVAL_MS: i64 = 1_000;
/// A slot alarm is raised only by lines at most this old: a backlog read at
/// start describes slots that are long gone.
const SLOT_ALARM_FRESH_MS: i64 = 120_000;

/// Which rule fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A few ranges hold the host's connection slots.
    SlotExhaustion,
    /// Too many connects from one range.
    ConnRate,
    /// A scenario's per-host threshold.
    Scenario(Scenario),
}

impl Rule {
    /// Every rule, in the order of [`DetectStats::decisions`].
    pub const ALL: [Rule; 8] = [
        Rule::SlotExhaustion,
        Rule::ConnRate,
        Rule::Scenario(Scenario::Auth),
        Rule::Scenario(Scenario::Relay),
        Rule::Scenario(Scenario::Dictionary),
        Rule::Scenario(Scenario::Protocol),
        Rule::Scenario(Scenario::ConnLimit),
        Rule::Scenario(Scenario::Acl),
    ];

    /// The name reported to the server (`LocalBlock.reason`), in metrics and
    /// in config (`shadow_rules`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Rule::SlotExhaustion => "slot_exhaustion",
            Rule::ConnRate => "conn_rate",
            Rule::Scenario(s) => s.as_str(),
        }
    }

    /// The rule named `name`.
    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Position in [`Rule::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Rule::SlotExhaustion => 0,
            Rule::ConnRate => 1,
            Rule::Scenario(s) => 2 + s.index(),
        }
    }
}

/// The thresholds in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Slot ceiling (`smtp_accept_max`); 0 = learn it.
    pub smtp_accept_max: u32,
    /// Alarm ratio of the ceiling.
    pub slot_alarm_ratio: f64,
    /// Share of the ceiling an address must hold in open sessions.
    pub slot_share: f64,
    /// An open session with no end line is forgotten after this, ms.
    pub session_timeout_ms: i64,
    /// Connects per window.
    pub conn_rate: u32,
    /// Connection-rate window, ms.
    pub conn_rate_window_ms: i64,
    /// The scenarios' rules (their `per_host` parts apply here).
    pub rules: Rules,
    /// How long accepted mail or a login keeps a range in good standing, ms.
    pub good_standing_ms: i64,
    /// Verified reverse-DNS domains never blocked automatically.
    pub protected_domains: Vec<String>,
    /// IPv6 block prefix length.
    pub ipv6_block_prefix: u8,
    /// Local block lifetime, seconds.
    pub local_block_ttl_secs: u32,
    /// The slot rule runs in shadow mode.
    pub slot_shadow: bool,
    /// The connection-rate rule runs in shadow mode.
    pub conn_rate_shadow: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            smtp_accept_max: 0,
            slot_alarm_ratio: 0.9,
            slot_share: 0.1,
            session_timeout_ms: 900_000,
            conn_rate: 30,
            conn_rate_window_ms: 60_000,
            rules: Rules::default(),
            good_standing_ms: 7 * 86_400_000,
            protected_domains: DEFAULT_PROTECTED_DOMAINS.iter().map(|d| (*d).to_owned()).collect(),
            ipv6_block_prefix: 64,
            local_block_ttl_secs: 3_600,
            slot_shadow: false,
            conn_rate_shadow: false,
        }
    }
}

impl Thresholds {
    /// Applies a server policy: every non-zero, valid field replaces the
    /// local value; `rules` replace the scenarios' per-host parts and the
    /// local rules' shadow flags.
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
        if policy.conn_rate > 0 {
            self.conn_rate = policy.conn_rate;
        }
        // Older servers send the two per-host thresholds alone.
        if policy.auth_failures > 0 {
            let mut auth = *self.rules.get(Scenario::Auth);
            auth.per_host = policy.auth_failures;
            self.rules.set(Scenario::Auth, auth);
        }
        if policy.abuse_events > 0 {
            let mut protocol = *self.rules.get(Scenario::Protocol);
            protocol.per_host = policy.abuse_events;
            self.rules.set(Scenario::Protocol, protocol);
        }
        self.rules.apply_proto(&policy.rules);
        for rule in &policy.rules {
            match Rule::from_name(&rule.name) {
                Some(Rule::SlotExhaustion) => self.slot_shadow = rule.shadow,
                Some(Rule::ConnRate) => self.conn_rate_shadow = rule.shadow,
                _ => {}
            }
        }
        if policy.protected_domains_set {
            self.protected_domains = policy.protected_domains.iter().take(4_096).cloned().collect();
        }
        if policy.good_standing_secs > 0 {
            self.good_standing_ms = i64::from(policy.good_standing_secs) * 1000;
        }
        if (48..=128).contains(&policy.ipv6_block_prefix) {
            self.ipv6_block_prefix = policy.ipv6_block_prefix as u8;
        }
        if policy.local_block_ttl_secs > 0 {
            self.local_block_ttl_secs = policy.local_block_ttl_secs;
        }
    }

    fn longest_window_ms(&self) -> i64 {
        (i64::from(self.rules.longest_window_secs()) * 1000).max(self.conn_rate_window_ms).max(SLOT_ALARM_FRESH_MS)
    }
}

/// One log line as detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation<'a> {
    /// What happened.
    pub kind: EventKind,
    /// The remote address.
    pub ip: IpAddr,
    /// The remote port, when logged.
    pub port: Option<u16>,
    /// `TCP/IP connection count = N` on connect lines.
    pub count: Option<u32>,
    /// The failing user of an auth failure.
    pub user: Option<&'a str>,
    /// The verified reverse-DNS name.
    pub host_name: Option<&'a str>,
    /// When, unix ms.
    pub time_ms: i64,
    /// Authentication attempts the line reports (0 = one); see
    /// [`crate::kind::event_weight`].
    pub attempts: u32,
}

impl<'a> Observation<'a> {
    /// A wire event as an observation; `None` for an event without a valid
    /// address or kind.
    pub fn from_proto(event: &'a v1::Event) -> Option<Observation<'a>> {
        let ip = IpAddr::try_from(event.remote.as_ref()?).ok()?.to_canonical();
        let kind = EventKind::try_from(event.kind).ok().filter(|k| *k != EventKind::Unspecified)?;
        let text = |s: &'a str| (!s.is_empty()).then_some(s);
        Some(Observation {
            kind,
            ip,
            port: u16::try_from(event.remote_port).ok().filter(|p| *p != 0),
            count: (event.connection_count > 0).then_some(event.connection_count),
            user: text(&event.auth_user),
            host_name: text(&event.host_name),
            time_ms: event.time_ms,
            attempts: event.attempts,
        })
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
    /// Shadow mode: record it, block nothing.
    pub shadow: bool,
}

/// Counters of detection.
#[derive(Debug, Default)]
pub struct DetectStats {
    /// Enforced decisions per rule (indexed like [`Rule::ALL`]).
    pub decisions: [AtomicU64; 8],
    /// Shadow decisions per rule (indexed like [`Rule::ALL`]).
    pub shadow_decisions: [AtomicU64; 8],
    /// Tracked ranges evicted because `max_tracked` was reached.
    pub evictions: AtomicU64,
    /// Events skipped because they were older than the longest window.
    pub stale_skipped: AtomicU64,
    /// Ranges tracked now.
    pub tracked: AtomicU64,
    /// Sessions open now (opened, not yet ended).
    pub open_sessions: AtomicU64,
    /// Decisions not made because the range's verified reverse DNS is in a
    /// protected domain.
    pub protected_spared: AtomicU64,
}

#[derive(Debug, Default)]
struct Track {
    tick: u64,
    connects: VecDeque<i64>,
    /// Per scenario: (time, weight), oldest first.
    abuse: [VecDeque<(i64, u32)>; 6],
    /// Failing user names (hashed) with when last seen.
    users: Vec<(u64, i64)>,
    /// Last accepted mail or login.
    standing_ms: Option<i64>,
    protected: bool,
}

/// An open session: where it came from and when it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SessionKey {
    ip: IpAddr,
    /// 0 = not logged.
    port: u16,
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
    /// Open sessions: key → (opened at, how many with this key are open;
    /// more than one only when ports are not logged).
    open: HashMap<SessionKey, (i64, u32)>,
    open_total: u64,
    /// Opens in arrival order, for ageing out sessions whose end was never
    /// logged.
    open_order: VecDeque<(SessionKey, i64)>,
    highest_count: u32,
    learned_ceiling: Option<u32>,
    last_slot_eval_ms: Option<i64>,
    blocked: HashMap<IpNet, i64>,
    stats: Arc<DetectStats>,
}

fn hash_user(user: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    user.hash(&mut hasher);
    hasher.finish()
}

impl Detector {
    /// A detector with `thresholds`, never blocking `exclude`, tracking at
    /// most `max_tracked` ranges.
    pub fn new(thresholds: Thresholds, max_tracked: usize, exclude: Vec<IpNet>, stats: Arc<DetectStats>) -> Self {
        Self {
            thresholds,
            exclude,
            max_tracked: max_tracked.max(1),
            tracks: HashMap::new(),
            lru: VecDeque::new(),
            tick: 0,
            open: HashMap::new(),
            open_total: 0,
            open_order: VecDeque::new(),
            highest_count: 0,
            learned_ceiling: None,
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

    /// Sessions open now.
    pub fn open_sessions(&self) -> u64 {
        self.open_total
    }

    /// The range an address is tracked and blocked as.
    pub fn block_net(&self, ip: IpAddr) -> IpNet {
        let ip = ip.to_canonical();
        let len = if ip.is_ipv4() { 32 } else { self.thresholds.ipv6_block_prefix };
        IpNet::new(ip, len).map_or(IpNet::from(ip), |net| net.trunc())
    }

    /// The slot ceiling in force: configured, else learned from the count at
    /// which Exim refused everyone, else the highest count seen (at least
    /// [`DEFAULT_SLOT_CEILING`]).
    pub fn ceiling(&self) -> u32 {
        if self.thresholds.smtp_accept_max > 0 {
            return self.thresholds.smtp_accept_max;
        }
        self.learned_ceiling.unwrap_or(self.highest_count.max(DEFAULT_SLOT_CEILING))
    }

    /// Feeds one event, observed at `now_ms`; returns the blocks it triggers.
    pub fn observe(&mut self, o: &Observation<'_>, now_ms: i64) -> Vec<Decision> {
        let kind = o.kind;
        if kind == EventKind::Unspecified {
            return Vec::new();
        }
        if o.time_ms < now_ms - self.thresholds.longest_window_ms() {
            self.stats.stale_skipped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let t = o.time_ms;
        let ip = o.ip.to_canonical();
        let net = self.block_net(ip);
        self.age_sessions(t);
        let mut out = Vec::new();
        let mut alarm = false;
        let th = &self.thresholds;
        let protected = o.host_name.is_some_and(|name| is_protected(name, &th.protected_domains));

        match kind {
            EventKind::Connect => {
                let (conn_rate, window, good_ms, shadow) =
                    (th.conn_rate, th.conn_rate_window_ms, th.good_standing_ms, th.conn_rate_shadow);
                self.open_session(SessionKey { ip, port: o.port.unwrap_or(0) }, t);
                if let Some(count) = o.count {
                    self.highest_count = self.highest_count.max(count);
                    alarm = f64::from(count) >= self.thresholds.slot_alarm_ratio * f64::from(self.ceiling());
                }
                let track = self.track(net, protected);
                let good = track.standing_ms.is_some_and(|s| t - s < good_ms);
                let need = if good { conn_rate.saturating_mul(GOOD_STANDING_FACTOR) } else { conn_rate }.max(1);
                track.connects.push_back(t);
                while track.connects.len() > need as usize {
                    track.connects.pop_front();
                }
                if track.connects.len() == need as usize && track.connects.front().is_some_and(|f| t - f < window) {
                    track.connects.clear();
                    let standing = if good { ", in good standing" } else { "" };
                    let evidence = format!("{need} connects within {} s{standing}", window / 1000);
                    out.extend(self.decide(net, Rule::ConnRate, evidence, shadow, now_ms));
                }
            }
            EventKind::RefusedTooMany => {
                // The host is full: everyone is refused, the refused address
                // holds nothing. Learn the ceiling from the count Exim had.
                if self.thresholds.smtp_accept_max == 0 && self.highest_count > 0 {
                    let open = u32::try_from(self.open_total).unwrap_or(u32::MAX);
                    self.learned_ceiling = Some(self.highest_count.max(open).max(SLOT_MIN_CONNECTIONS));
                }
                alarm = true;
            }
            k if k.earns_standing() => {
                self.track(net, protected).standing_ms = Some(t);
            }
            _ => {}
        }
        if kind.ends_session() {
            self.end_session(SessionKey { ip, port: o.port.unwrap_or(0) });
        }
        if let Some(scenario) = kind.scenario() {
            out.extend(self.count_abuse(net, scenario, weight(kind, o.attempts), o.user, protected, t, now_ms));
        }
        if alarm
            && now_ms - t < SLOT_ALARM_FRESH_MS
            && self.last_slot_eval_ms.is_none_or(|last| now_ms - last >= SLOT_EVAL_INTERVAL_MS)
        {
            self.last_slot_eval_ms = Some(now_ms);
            out.extend(self.slot_holders(t, now_ms));
        }
        self.evict();
        self.stats.open_sessions.store(self.open_total, Ordering::Relaxed);
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn count_abuse(
        &mut self,
        net: IpNet,
        scenario: Scenario,
        weight: u32,
        user: Option<&str>,
        protected: bool,
        t: i64,
        now_ms: i64,
    ) -> Option<Decision> {
        let rule = *self.thresholds.rules.get(scenario);
        let good_ms = self.thresholds.good_standing_ms;
        let window = i64::from(rule.window_secs) * 1000;
        let track = self.track(net, protected);
        let good = track.standing_ms.is_some_and(|s| t - s < good_ms);
        let cap = rule.per_host.max(rule.distinct_users).saturating_mul(rule.good_standing_factor.max(1)).max(1);
        let events = &mut track.abuse[scenario.index()];
        events.push_back((t, weight));
        while events.front().is_some_and(|(seen, _)| t - seen >= window) || events.len() > cap as usize {
            events.pop_front();
        }
        let sum: u32 = events.iter().map(|(_, w)| *w).sum();
        let mut users = 0;
        if scenario == Scenario::Auth
            && let Some(user) = user
        {
            let hash = hash_user(user);
            track.users.retain(|(_, seen)| t - seen < window);
            let room = track.users.len() < cap as usize;
            match track.users.iter_mut().find(|(h, _)| *h == hash) {
                Some(entry) => entry.1 = t,
                None if room => track.users.push((hash, t)),
                None => {}
            }
            users = u32::try_from(track.users.len()).unwrap_or(u32::MAX);
        }
        let mut tally = Tally { good_standing: good, protected: track.protected, ..Tally::default() };
        tally.counts[scenario.index()] = Count { host_max: sum, host_users: users, ..Count::default() };
        if tally.protected {
            if rule.per_host > 0 && sum >= rule.per_host {
                self.stats.protected_spared.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        }
        let mut rules = Rules::default();
        rules.set(scenario, rule);
        let verdict = policy::judge(&rules, &tally)?;
        let track = self.track(net, protected);
        track.abuse[scenario.index()].clear();
        track.users.clear();
        self.decide(net, Rule::Scenario(scenario), verdict.describe(&rule), verdict.shadow, now_ms)
    }

    fn open_session(&mut self, key: SessionKey, t: i64) {
        let entry = self.open.entry(key).or_insert((t, 0));
        entry.0 = t;
        entry.1 = entry.1.saturating_add(1);
        self.open_total += 1;
        self.open_order.push_back((key, t));
        // Bounded: the oldest sessions go first.
        while self.open_total as usize > self.max_tracked {
            let Some((old, _)) = self.open_order.pop_front() else { break };
            self.end_session(old);
        }
    }

    fn end_session(&mut self, key: SessionKey) {
        if let Some(entry) = self.open.get_mut(&key) {
            entry.1 -= 1;
            self.open_total = self.open_total.saturating_sub(1);
            if entry.1 == 0 {
                self.open.remove(&key);
            }
        }
    }

    /// Forgets sessions opened more than `session_timeout_ms` before `t`.
    fn age_sessions(&mut self, t: i64) {
        let timeout = self.thresholds.session_timeout_ms;
        while let Some((key, opened)) = self.open_order.front().copied() {
            if t - opened < timeout {
                break;
            }
            self.open_order.pop_front();
            // Only if this is still the session that opened then (a newer
            // one with the same key keeps it alive).
            if self.open.get(&key).is_some_and(|(latest, _)| *latest == opened) {
                self.end_session(key);
            }
        }
        if self.open_order.len() > 2 * self.max_tracked + 64 {
            let open = &self.open;
            self.open_order.retain(|(key, t)| open.get(key).is_some_and(|(latest, _)| latest == t));
        }
    }

    /// The ranges holding at least `slot_share` of the ceiling in open
    /// sessions.
    fn slot_holders(&mut self, _t: i64, now_ms: i64) -> Vec<Decision> {
        let ceiling = self.ceiling();
        let share = self.thresholds.slot_share;
        let needed = ((share * f64::from(ceiling)).ceil() as u32).max(SLOT_MIN_CONNECTIONS);
        let mut held: HashMap<IpNet, u32> = HashMap::new();
        for (key, (_, n)) in &self.open {
            *held.entry(self.block_net(key.ip)).or_default() += n;
        }
        let good_ms = self.thresholds.good_standing_ms;
        let shadow = self.thresholds.slot_shadow;
        let open = self.open_total;
        let mut holders: Vec<(IpNet, u32, bool)> = held
            .into_iter()
            .filter_map(|(net, n)| {
                let track = self.tracks.get(&net);
                if track.is_some_and(|t| t.protected) {
                    return None;
                }
                let good = track.and_then(|t| t.standing_ms).is_some_and(|s| now_ms - s < good_ms);
                let need = if good { needed.saturating_mul(GOOD_STANDING_FACTOR) } else { needed };
                (n >= need).then_some((net, n, good))
            })
            .collect();
        holders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut out = Vec::new();
        for (net, n, good) in holders {
            let standing = if good { ", in good standing" } else { "" };
            let evidence = format!(
                "slot alarm: holds {n} of {open} open sessions (ceiling {ceiling}, {:.0}%){standing}",
                100.0 * f64::from(n) / f64::from(ceiling.max(1))
            );
            out.extend(self.decide(net, Rule::SlotExhaustion, evidence, shadow, now_ms));
        }
        out
    }

    fn decide(&mut self, net: IpNet, rule: Rule, evidence: String, shadow: bool, now_ms: i64) -> Option<Decision> {
        if self.blocked.get(&net).is_some_and(|until| *until > now_ms) {
            return None;
        }
        if self.exclude.iter().any(|x| x.contains(&net) || net.contains(x)) {
            return None;
        }
        if self.tracks.get(&net).is_some_and(|t| t.protected) {
            self.stats.protected_spared.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let ttl_secs = self.thresholds.local_block_ttl_secs;
        if self.blocked.len() >= self.max_tracked {
            self.blocked.retain(|_, until| *until > now_ms);
        }
        self.blocked.insert(net, now_ms + i64::from(ttl_secs) * 1000);
        let counter = if shadow { &self.stats.shadow_decisions } else { &self.stats.decisions };
        counter[rule.index()].fetch_add(1, Ordering::Relaxed);
        Some(Decision { net, rule, evidence, ttl_secs, time_ms: now_ms, shadow })
    }

    /// The track of `net`, marked as most recently seen; `protected` (a
    /// protected verified name seen on this line) sticks.
    fn track(&mut self, net: IpNet, protected: bool) -> &mut Track {
        self.tick += 1;
        let tick = self.tick;
        self.lru.push_back((net, tick));
        let track = self.tracks.entry(net).or_default();
        track.tick = tick;
        track.protected |= protected;
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

    /// An operator revoked the block of `range`, at `revoked_at_ms`: the
    /// evidence seen before then about addresses overlapping it (connects,
    /// abuse events, failing users, open sessions) is forgotten and its
    /// decisions made before then no longer hold back a new one, so only
    /// evidence after the revocation can block it again. Good standing and
    /// the protected mark stay. Returns how many ranges had state dropped.
    pub fn forget(&mut self, range: IpNet, revoked_at_ms: i64) -> usize {
        let overlaps = |net: &IpNet| range.contains(net) || net.contains(&range);
        let mut touched = 0;
        for (_, track) in self.tracks.iter_mut().filter(|(net, _)| overlaps(net)) {
            let before =
                track.connects.len() + track.abuse.iter().map(VecDeque::len).sum::<usize>() + track.users.len();
            track.connects.retain(|t| *t >= revoked_at_ms);
            for events in &mut track.abuse {
                events.retain(|(t, _)| *t >= revoked_at_ms);
            }
            track.users.retain(|(_, seen)| *seen >= revoked_at_ms);
            let after = track.connects.len() + track.abuse.iter().map(VecDeque::len).sum::<usize>() + track.users.len();
            if after < before {
                touched += 1;
            }
        }
        let ttl_ms = i64::from(self.thresholds.local_block_ttl_secs) * 1000;
        let blocked_before = self.blocked.len();
        self.blocked.retain(|net, until| !(overlaps(net) && *until - ttl_ms <= revoked_at_ms));
        touched += blocked_before - self.blocked.len();
        let stale: Vec<SessionKey> = self
            .open
            .iter()
            .filter(|(key, (opened, _))| *opened < revoked_at_ms && overlaps(&self.block_net(key.ip)))
            .map(|(key, _)| *key)
            .collect();
        for key in stale {
            if let Some((_, n)) = self.open.remove(&key) {
                self.open_total = self.open_total.saturating_sub(u64::from(n));
                touched += 1;
            }
        }
        self.stats.open_sessions.store(self.open_total, Ordering::Relaxed);
        touched
    }

    /// [`Detector::forget`] for each revocation `(range, revoked at)` that
    /// can still matter at `now_ms`: evidence older than the longest window
    /// no longer counts anyway, and a decision older than the local block
    /// TTL no longer holds back a new one, so older revocations (a snapshot
    /// carries a week of them) are skipped without walking the tracked
    /// ranges. Returns how many revocations were applied.
    pub fn forget_revoked(&mut self, revoked: &[(IpNet, i64)], now_ms: i64) -> usize {
        let ttl_ms = i64::from(self.thresholds.local_block_ttl_secs) * 1000;
        let horizon = now_ms - self.thresholds.longest_window_ms().max(ttl_ms);
        let mut applied = 0;
        for (range, at) in revoked.iter().filter(|(_, at)| *at >= horizon) {
            self.forget(*range, *at);
            applied += 1;
        }
        applied
    }

    /// Ranges tracked now.
    pub fn tracked(&self) -> usize {
        self.tracks.len()
    }
}

/// An observation's weight, as the detector's `u32`.
fn weight(kind: EventKind, attempts: u32) -> u32 {
    u32::try_from(crate::kind::event_weight(kind, attempts)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
