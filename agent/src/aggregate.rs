//! Aggregation of context lines: per (remote address, service) and interval,
//! the agent counts connects, global refusals, session ends, TLS errors,
//! accepted mail, logins and the other context kinds instead of sending one
//! event per line.
//!
//! Which kinds are summarised is [`EventKind::is_summarised`] (every context
//! kind, never an abuse kind): the server decides on abuse events one by one
//! and reads context only as counts (good standing, slot series, reports).
//! Local detection is not affected: it runs in the parser, before the
//! aggregator sees an event.
//!
//! An [`Aggregator`] holds the open summaries of the current interval.
//! Intervals are aligned to wall-clock boundaries of the log time
//! (`interval_start_ms` is a multiple of the interval since the epoch), so
//! with `interval_secs` dividing 60 every summary lies inside one minute and
//! the server's minute series come out exactly as from single events.
//!
//! Good standing cannot wait for the end of an interval: the server judges
//! abuse lines as they come, and an address's accepted mail or login must be
//! known by then (an office NAT where one user logs in and another mistypes
//! a password). So the first line of an (address, service, interval) that
//! earns standing is passed on as a single event, and the rest of them are
//! counted; the server adds both up.
//!
//! Invariants:
//! - A flush always empties the aggregator completely (never one interval
//!   and not another): the pipeline then knows that every line fed since
//!   the last flush is held, and nothing else, which is what its restart
//!   replay relies on (see `crate::pipeline`).
//! - A flush happens when a line of a newer interval arrives, when the
//!   newest open interval ended [`LATE_GRACE_MS`] ago by the wall clock
//!   ([`Aggregator::flush_due`]), when a new address would exceed
//!   `max_addresses` (counted), and on demand ([`Aggregator::flush`]). A
//!   line that arrives after its interval was flushed opens a new summary of
//!   that interval: the server adds summaries of the same interval up.
//! - At most `max_addresses` summaries are open; each holds at most
//!   `samples` raw lines of at most [`MAX_SAMPLE_BYTES`].
//!
//! The type is public so that other tools (the fleet simulator) can turn a
//! stream of events into what an agent sends: [`Aggregator::observe`] each
//! event, [`Aggregator::flush`] at the end of an interval.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetban_proto::v1::{ContextSummary, Event, EventKind, KindCount};
use serde::Deserialize;

/// How long after the end of the newest open interval (wall clock) a quiet
/// log's summaries are flushed: Exim's processes write lines a little out
/// of order, so a line of the previous interval may still come.
pub const LATE_GRACE_MS: i64 = 2_000;

/// Longest raw sample line kept, bytes (the server's limit for raw lines).
pub const MAX_SAMPLE_BYTES: usize = 16 * 1024;

/// `[aggregate]`: context lines summarised per address and interval.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Summarise context lines (connects, refusals of a full host, session
    /// ends, TLS errors, accepted mail, logins) instead of sending one event
    /// per line. `false` sends every line as an event (the previous mode).
    /// Default: true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Length of a summary's interval, in seconds: a divisor of 60 (1, 2, 3,
    /// 4, 5, 6, 10, 12, 15, 20, 30, 60), or a multiple of 60 that divides
    /// 3600, so that no interval straddles a minute (or an hour) and the
    /// dashboard's series stay exact. Default: 60.
    #[serde(default = "default_interval_secs")]
    pub interval_secs: u32,
    /// Raw log lines kept per summary as samples, 0 to 100. Default: 1.
    #[serde(default = "default_samples")]
    pub samples: u32,
    /// Most (address, service) summaries open at once, a memory bound:
    /// past it the open summaries are flushed early (and counted,
    /// `fleetban_agent_summary_early_flushes_total`). 1 to 10000000.
    /// Default: 100000.
    #[serde(default = "default_max_addresses")]
    pub max_addresses: usize,
    /// Summaries of an ended interval are sent after a delay this agent
    /// picks at random when it starts, 0 up to this many seconds (at most
    /// half the interval), so that a fleet's agents, which all end an
    /// interval at the same moment, send their summaries spread over that
    /// time. Held summaries survive a crash like open ones. 0 sends them at
    /// once. 0 to 1800. Default: 30.
    #[serde(default = "default_spread_secs")]
    pub spread_secs: u32,
}

fn default_true() -> bool {
    true
}

fn default_interval_secs() -> u32 {
    60
}

fn default_samples() -> u32 {
    1
}

fn default_max_addresses() -> usize {
    100_000
}

fn default_spread_secs() -> u32 {
    30
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: default_interval_secs(),
            samples: default_samples(),
            max_addresses: default_max_addresses(),
            spread_secs: default_spread_secs(),
        }
    }
}

impl AggregateConfig {
    /// Checks every value; returns the offending key (without the
    /// `aggregate.` prefix) and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let s = self.interval_secs;
        if !EventKind::summary_interval_is_valid(s) {
            return Err((
                "interval_secs".into(),
                format!(
                    "{s} does not divide 60 and is not a multiple of 60 that divides 3600: use e.g. 10, 30, 60, 300 \
                     or 600 so summaries never straddle a minute"
                ),
            ));
        }
        if self.samples > 100 {
            return Err(("samples".into(), "must be between 0 and 100".into()));
        }
        if !(1..=10_000_000).contains(&self.max_addresses) {
            return Err(("max_addresses".into(), "must be between 1 and 10000000".into()));
        }
        if self.spread_secs > 1800 {
            return Err(("spread_secs".into(), "must be between 0 and 1800 seconds".into()));
        }
        Ok(())
    }
}

/// Counters of an aggregator (shared with metrics).
#[derive(Debug, Default)]
pub struct AggregateStats {
    /// Summaries flushed.
    pub summaries: AtomicU64,
    /// Lines counted into summaries (instead of being sent one by one).
    pub lines: AtomicU64,
    /// Flushes forced by `max_addresses`.
    pub early_flushes: AtomicU64,
}

/// One summary being counted.
#[derive(Debug)]
struct Open {
    summary: ContextSummary,
    /// The first line of the interval that earns good standing went out as
    /// a single event.
    standing_sent: bool,
}

/// Open summaries of one source; see the module documentation.
#[derive(Debug)]
pub struct Aggregator {
    interval_ms: i64,
    interval_secs: u32,
    samples: usize,
    max_addresses: usize,
    open: HashMap<(IpAddr, i32, i64), Open>,
    /// Start of the newest interval held.
    newest: Option<i64>,
    stats: Arc<AggregateStats>,
}

impl Aggregator {
    /// An empty aggregator for `config` (whose `enabled` it ignores: the
    /// caller decides what to feed it).
    pub fn new(config: &AggregateConfig, stats: Arc<AggregateStats>) -> Self {
        let interval_secs = config.interval_secs.max(1);
        Self {
            interval_ms: i64::from(interval_secs) * 1000,
            interval_secs,
            samples: config.samples as usize,
            max_addresses: config.max_addresses.max(1),
            open: HashMap::new(),
            newest: None,
            stats,
        }
    }

    /// The start of the interval `time_ms` lies in.
    pub fn interval_start(&self, time_ms: i64) -> i64 {
        time_ms.div_euclid(self.interval_ms) * self.interval_ms
    }

    /// No summary is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Summaries open now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Takes one event. A kind that stays individual (abuse, or an event
    /// without a valid address) comes back as `Some`, and so does the first
    /// line of an (address, service, interval) that earns good standing
    /// (accepted mail, a login: see [`Aggregator`]); a summarised one is
    /// counted and `None` comes back. `raw` is its log line (empty: the
    /// event's own `raw`). Summaries flushed on the way (a newer interval
    /// began, `max_addresses` reached) are appended to `flushed`.
    pub fn observe(&mut self, event: Event, raw: &[u8], flushed: &mut Vec<ContextSummary>) -> Option<Event> {
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        if !kind.is_summarised() {
            return Some(event);
        }
        let Some(remote) = event.remote.as_ref().and_then(|a| IpAddr::try_from(a).ok()) else {
            return Some(event);
        };
        let start = self.interval_start(event.time_ms);
        if self.newest.is_some_and(|newest| start > newest) {
            self.flush_into(flushed);
        }
        let key = (remote, event.service, start);
        if !self.open.contains_key(&key) && self.open.len() >= self.max_addresses {
            self.stats.early_flushes.fetch_add(1, Ordering::Relaxed);
            self.flush_into(flushed);
        }
        self.newest = Some(self.newest.map_or(start, |n| n.max(start)));
        let interval_secs = self.interval_secs;
        let open = self.open.entry(key).or_insert_with(|| Open {
            summary: ContextSummary {
                remote: event.remote.clone(),
                service: event.service,
                interval_start_ms: start,
                interval_secs,
                first_seen_ms: event.time_ms,
                last_seen_ms: event.time_ms,
                ..ContextSummary::default()
            },
            standing_sent: false,
        });
        if kind.earns_standing() && !open.standing_sent {
            // Good standing must reach the server as soon as the abuse
            // lines that may follow it: the first accepted mail or login of
            // an address in an interval goes out at once, the rest is
            // counted.
            open.standing_sent = true;
            return Some(event);
        }
        let s = &mut open.summary;
        if s.counts.is_empty() {
            s.first_seen_ms = event.time_ms;
            s.last_seen_ms = event.time_ms;
        }
        s.first_seen_ms = s.first_seen_ms.min(event.time_ms);
        s.last_seen_ms = s.last_seen_ms.max(event.time_ms);
        s.max_connection_count = s.max_connection_count.max(event.connection_count);
        if !event.host_name.is_empty() {
            s.host_name = event.host_name;
        }
        match s.counts.iter_mut().find(|c| c.kind == event.kind) {
            Some(count) => {
                count.lines = count.lines.saturating_add(1);
                count.last_seen_ms = count.last_seen_ms.max(event.time_ms);
            }
            None => s.counts.push(KindCount { kind: event.kind, lines: 1, last_seen_ms: event.time_ms }),
        }
        if s.samples.len() < self.samples {
            let line = if raw.is_empty() { event.raw.as_bytes() } else { raw };
            s.samples.push(sample(line));
        }
        self.stats.lines.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// When the open summaries are due by the wall clock (unix ms): the end
    /// of the newest open interval plus [`LATE_GRACE_MS`]; `None` when none
    /// is open.
    pub fn deadline_ms(&self) -> Option<i64> {
        if self.open.is_empty() {
            return None;
        }
        self.newest.map(|n| n.saturating_add(self.interval_ms).saturating_add(LATE_GRACE_MS))
    }

    /// Flushes everything when the newest open interval ended more than
    /// [`LATE_GRACE_MS`] before `now_ms` (a quiet log); otherwise nothing.
    pub fn flush_due(&mut self, now_ms: i64) -> Vec<ContextSummary> {
        match self.deadline_ms() {
            Some(deadline) if deadline <= now_ms => self.flush(),
            _ => Vec::new(),
        }
    }

    /// Every open summary, in (interval, address, service) order; the
    /// aggregator is empty afterwards.
    pub fn flush(&mut self) -> Vec<ContextSummary> {
        let mut out = Vec::new();
        self.flush_into(&mut out);
        out
    }

    fn flush_into(&mut self, out: &mut Vec<ContextSummary>) {
        let mut open: Vec<((IpAddr, i32, i64), Open)> = self.open.drain().collect();
        open.sort_unstable_by_key(|((remote, service, start), _)| (*start, *remote, *service));
        // A summary that only marked its standing line as sent holds nothing.
        let before = out.len();
        out.extend(open.into_iter().filter(|(_, o)| !o.summary.counts.is_empty()).map(|(_, mut o)| {
            o.summary.counts.sort_unstable_by_key(|c| c.kind);
            o.summary
        }));
        self.stats.summaries.fetch_add((out.len() - before) as u64, Ordering::Relaxed);
        self.newest = None;
    }

    /// Feeds `events` and flushes: what an agent would send for them, as
    /// (individual events in order, summaries).
    pub fn split(&mut self, events: impl IntoIterator<Item = Event>) -> (Vec<Event>, Vec<ContextSummary>) {
        let mut individual = Vec::new();
        let mut summaries = Vec::new();
        for event in events {
            if let Some(event) = self.observe(event, &[], &mut summaries) {
                individual.push(event);
            }
        }
        summaries.extend(self.flush());
        (individual, summaries)
    }
}

/// A raw line as a sample: without its line end, at most
/// [`MAX_SAMPLE_BYTES`], lossy UTF-8, no NUL.
fn sample(line: &[u8]) -> String {
    let mut line = line;
    while let [rest @ .., b'\n' | b'\r'] = line {
        line = rest;
    }
    let mut text = String::from_utf8_lossy(line).replace('\0', "\u{fffd}");
    if text.len() > MAX_SAMPLE_BYTES {
        let mut end = MAX_SAMPLE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetban_proto::v1::Service;

    const T0: i64 = 1_764_000_000_000; // a multiple of 60 000

    fn ev(kind: EventKind, remote: &str, time_ms: i64) -> Event {
        Event { time_ms, kind: kind as i32, remote: Some(remote.parse::<IpAddr>().unwrap().into()), ..Event::default() }
    }

    fn agg(interval_secs: u32, samples: u32, max_addresses: usize) -> Aggregator {
        let config = AggregateConfig { enabled: true, interval_secs, samples, max_addresses, spread_secs: 0 };
        Aggregator::new(&config, Arc::default())
    }

    fn count(s: &ContextSummary, kind: EventKind) -> u32 {
        s.counts.iter().find(|c| c.kind == kind as i32).map_or(0, |c| c.lines)
    }

    #[test]
    fn intervals_are_aligned_to_wall_clock_boundaries() {
        assert_eq!(T0 % 60_000, 0);
        let a = agg(60, 1, 10);
        assert_eq!(a.interval_start(T0 + 59_999), T0);
        assert_eq!(a.interval_start(T0 + 60_000), T0 + 60_000);
        assert_eq!(a.interval_start(T0 - 1), T0 - 60_000);
        let b = agg(15, 1, 10);
        assert_eq!(b.interval_start(T0 + 44_000), T0 + 30_000);
        let mut c = agg(10, 1, 10);
        let (_, summaries) = c.split([ev(EventKind::Connect, "192.0.2.1", T0 + 19_999)]);
        assert_eq!((summaries[0].interval_start_ms, summaries[0].interval_secs), (T0 + 10_000, 10));
    }

    #[test]
    fn context_is_counted_per_address_service_and_kind_and_abuse_stays_individual() {
        let mut a = agg(60, 1, 10);
        let mut events = vec![
            ev(EventKind::Connect, "192.0.2.1", T0 + 1_000),
            ev(EventKind::AuthFailed, "192.0.2.1", T0 + 1_500),
            ev(EventKind::Connect, "192.0.2.1", T0 + 2_000),
            ev(EventKind::Accepted, "192.0.2.1", T0 + 3_000),
            ev(EventKind::Closed, "192.0.2.1", T0 + 4_000),
            ev(EventKind::Connect, "192.0.2.2", T0 + 5_000),
            Event { service: Service::Imap as i32, ..ev(EventKind::Login, "192.0.2.1", T0 + 6_000) },
            ev(EventKind::RelayDenied, "192.0.2.2", T0 + 7_000),
        ];
        events[0].connection_count = 7;
        events[2].connection_count = 9;
        events[3].host_name = "relay.example.net".into();
        let (individual, summaries) = a.split(events);
        let kinds: Vec<i32> = individual.iter().map(|e| e.kind).collect();
        // The first accepted mail and the first login of their address,
        // service and interval go out at once, for good standing.
        assert_eq!(
            kinds,
            [
                EventKind::AuthFailed as i32,
                EventKind::Accepted as i32,
                EventKind::Login as i32,
                EventKind::RelayDenied as i32
            ]
        );
        assert_eq!(individual[1].host_name, "relay.example.net");
        assert_eq!(summaries.len(), 2, "{summaries:#?}");
        let smtp1 = summaries
            .iter()
            .find(|s| s.remote == Some("192.0.2.1".parse::<IpAddr>().unwrap().into()) && s.service == 0)
            .unwrap();
        assert_eq!(count(smtp1, EventKind::Connect), 2);
        assert_eq!(count(smtp1, EventKind::Accepted), 0);
        assert_eq!(count(smtp1, EventKind::Closed), 1);
        assert_eq!(smtp1.max_connection_count, 9);
        assert_eq!((smtp1.first_seen_ms, smtp1.last_seen_ms), (T0 + 1_000, T0 + 4_000));
        assert!(summaries.iter().all(|s| s.service != Service::Imap as i32), "the one login went out alone");
        assert_eq!(a.stats.lines.load(Ordering::Relaxed), 4);
        assert_eq!(a.stats.summaries.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_first_standing_line_of_an_interval_goes_out_and_the_rest_is_counted() {
        let mut a = agg(60, 1, 10);
        let accepted = |t: i64| Event { host_name: "mx.example.org".into(), ..ev(EventKind::Accepted, "192.0.2.1", t) };
        let mut events: Vec<Event> = (0..5).map(|i| accepted(T0 + i * 1000)).collect();
        events.extend((0..3).map(|i| accepted(T0 + 60_000 + i * 1000)));
        let (individual, summaries) = a.split(events);
        assert_eq!(individual.iter().map(|e| e.time_ms).collect::<Vec<_>>(), [T0, T0 + 60_000]);
        assert_eq!(summaries.len(), 2);
        assert_eq!((count(&summaries[0], EventKind::Accepted), count(&summaries[1], EventKind::Accepted)), (4, 2));
        assert_eq!(summaries[0].first_seen_ms, T0 + 1000, "the line sent alone is not in the summary");
        assert_eq!(summaries[0].host_name, "mx.example.org");
        // One accepted line alone: an event, and no empty summary.
        let (individual, summaries) = agg(60, 1, 10).split([accepted(T0)]);
        assert_eq!((individual.len(), summaries.len()), (1, 0));
    }

    #[test]
    fn a_newer_interval_flushes_everything_and_late_lines_open_a_new_summary() {
        let mut a = agg(60, 1, 10);
        let mut flushed = Vec::new();
        assert!(a.observe(ev(EventKind::Connect, "192.0.2.1", T0 + 10), b"l1\n", &mut flushed).is_none());
        assert!(a.observe(ev(EventKind::Connect, "192.0.2.2", T0 + 20), b"l2\n", &mut flushed).is_none());
        assert!(flushed.is_empty());
        a.observe(ev(EventKind::Connect, "192.0.2.1", T0 + 60_000), b"l3\n", &mut flushed);
        assert_eq!(flushed.len(), 2);
        assert!(flushed.iter().all(|s| s.interval_start_ms == T0));
        assert_eq!(flushed[0].samples, ["l1"]);
        // A late line of the flushed interval: its own summary, no flush.
        a.observe(ev(EventKind::Lost, "192.0.2.1", T0 + 59_000), b"late\n", &mut flushed);
        assert_eq!(flushed.len(), 2);
        assert_eq!(a.len(), 2);
        let rest = a.flush();
        assert_eq!(rest.iter().map(|s| s.interval_start_ms).collect::<Vec<_>>(), [T0, T0 + 60_000]);
        assert!(a.is_empty() && a.deadline_ms().is_none());
    }

    #[test]
    fn samples_are_capped_and_zero_keeps_none() {
        let mut a = agg(60, 2, 10);
        let events: Vec<Event> =
            (0..5).map(|i| Event { raw: format!("line {i}"), ..ev(EventKind::Connect, "192.0.2.1", T0 + i) }).collect();
        let (_, summaries) = a.split(events.clone());
        assert_eq!(summaries[0].samples, ["line 0", "line 1"]);
        assert_eq!(count(&summaries[0], EventKind::Connect), 5);
        let (_, none) = agg(60, 0, 10).split(events);
        assert!(none[0].samples.is_empty());
        let long = vec![b'x'; MAX_SAMPLE_BYTES + 10];
        assert_eq!(sample(&long).len(), MAX_SAMPLE_BYTES);
        assert_eq!(sample(b"a\0b\r\n"), "a\u{fffd}b");
    }

    #[test]
    fn max_addresses_flushes_early_and_counts_it() {
        let mut a = agg(60, 1, 3);
        let mut flushed = Vec::new();
        for i in 0..3 {
            a.observe(ev(EventKind::Connect, &format!("192.0.2.{i}"), T0 + i), &[], &mut flushed);
        }
        // A known address does not count against the bound.
        a.observe(ev(EventKind::Connect, "192.0.2.0", T0 + 5), &[], &mut flushed);
        assert!(flushed.is_empty());
        a.observe(ev(EventKind::Connect, "192.0.2.9", T0 + 6), &[], &mut flushed);
        assert_eq!(flushed.len(), 3);
        assert_eq!(a.len(), 1);
        assert_eq!(a.stats.early_flushes.load(Ordering::Relaxed), 1);
        let total: u32 = flushed.iter().chain(a.flush().iter()).map(|s| count(s, EventKind::Connect)).sum();
        assert_eq!(total, 5, "nothing lost by an early flush");
    }

    #[test]
    fn a_quiet_log_is_flushed_after_the_interval_and_the_grace() {
        let mut a = agg(60, 1, 10);
        let mut flushed = Vec::new();
        a.observe(ev(EventKind::Connect, "192.0.2.1", T0 + 30_000), &[], &mut flushed);
        assert_eq!(a.deadline_ms(), Some(T0 + 60_000 + LATE_GRACE_MS));
        assert!(a.flush_due(T0 + 60_000 + LATE_GRACE_MS - 1).is_empty());
        assert_eq!(a.flush_due(T0 + 60_000 + LATE_GRACE_MS).len(), 1);
        assert!(a.is_empty());
    }

    #[test]
    fn interval_lengths_are_validated() {
        for ok in [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 3600] {
            let config = AggregateConfig { interval_secs: ok, ..AggregateConfig::default() };
            assert!(config.validate().is_ok(), "{ok}");
        }
        for bad in [0, 7, 45, 90, 420, 7200] {
            let config = AggregateConfig { interval_secs: bad, ..AggregateConfig::default() };
            let (key, message) = config.validate().unwrap_err();
            assert_eq!(key, "interval_secs");
            assert!(message.contains("divide"), "{message}");
        }
        assert!(AggregateConfig { samples: 101, ..AggregateConfig::default() }.validate().is_err());
        assert!(AggregateConfig { max_addresses: 0, ..AggregateConfig::default() }.validate().is_err());
    }
}
