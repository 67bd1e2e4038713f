//! Local detection: the agent's side of the shared evidence model.
//!
//! The rules themselves (slot holders matched open-to-end, connection rate,
//! the per-host scenario thresholds, good standing, protected senders,
//! shadow mode) live in `fleetban_proto::detect`, so that the server's
//! replay runs exactly the code every agent runs. `[detect]` becomes
//! [`Thresholds`] through [`DetectConfig::thresholds`]; this module feeds
//! parsed lines to the [`Detector`].

use std::sync::Arc;

use ipnet::IpNet;

pub use fleetban_proto::detect::{
    DEFAULT_SLOT_CEILING, Decision, DetectStats, GOOD_STANDING_FACTOR, Observation, Rule, SLOT_MIN_CONNECTIONS,
    Thresholds,
};

use crate::config::DetectConfig;
use crate::parse::Event;

/// The shared detector, built from `[detect]`.
#[derive(Debug)]
pub struct Detector {
    inner: fleetban_proto::detect::Detector,
}

impl Detector {
    /// A detector with `config`'s thresholds, never blocking `exclude`.
    pub fn new(config: &DetectConfig, exclude: Vec<IpNet>, stats: Arc<DetectStats>) -> Self {
        let inner = fleetban_proto::detect::Detector::new(config.thresholds(), config.max_tracked, exclude, stats);
        Self { inner }
    }

    /// Feeds one parsed line observed at `now_ms`.
    pub fn observe_event(&mut self, event: &Event<'_>, now_ms: i64) -> Vec<Decision> {
        let o = Observation {
            kind: event.kind,
            ip: event.ip,
            port: event.port,
            count: event.count,
            user: event.user,
            host_name: event.host_name,
            time_ms: event.time_ms,
            attempts: event.attempts,
        };
        self.inner.observe(&o, now_ms)
    }

    /// Applies a server policy.
    pub fn set_policy(&mut self, policy: &fleetban_proto::v1::Policy) {
        self.inner.set_policy(policy);
    }

    /// Replaces the ranges that are never blocked.
    pub fn set_exclusions(&mut self, exclude: Vec<IpNet>) {
        self.inner.set_exclusions(exclude);
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> &Thresholds {
        self.inner.thresholds()
    }

    /// Forgets the evidence about `range` seen before an operator revoked
    /// its block at `revoked_at_ms` (see
    /// [`fleetban_proto::detect::Detector::forget`]).
    pub fn forget(&mut self, range: IpNet, revoked_at_ms: i64) -> usize {
        self.inner.forget(range, revoked_at_ms)
    }

    /// Forgets for every revocation that can still matter at `now_ms` (see
    /// [`fleetban_proto::detect::Detector::forget_revoked`]).
    pub fn forget_revoked(&mut self, revoked: &[(IpNet, i64)], now_ms: i64) -> usize {
        self.inner.forget_revoked(revoked, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_line;
    use fleetban_proto::policy::Scenario;

    #[test]
    fn config_keys_reach_the_rules() {
        let mut c = DetectConfig { auth_failures: 4, abuse_events: 7, ..DetectConfig::default() };
        c.rules.insert(
            "relay".into(),
            fleetban_proto::policy::RuleTable { per_host: Some(3), enforce: Some(false), ..Default::default() },
        );
        c.shadow_rules = vec!["conn_rate".into(), "dictionary".into()];
        let th = c.thresholds();
        assert_eq!(th.rules.get(Scenario::Auth).per_host, 4);
        assert_eq!(th.rules.get(Scenario::Protocol).per_host, 7);
        assert_eq!(th.rules.get(Scenario::Relay).per_host, 3);
        assert!(th.rules.get(Scenario::Relay).shadow && th.rules.get(Scenario::Dictionary).shadow);
        assert!(th.conn_rate_shadow && !th.slot_shadow);
        assert!(th.protected_domains.iter().any(|d| d == "google.com"));
    }

    /// Parsed real lines reach the detector with their verified names: a
    /// Google relay in good standing is never blocked for its protocol
    /// errors; the same errors from an unnamed address are.
    #[test]
    fn parsed_lines_carry_the_verified_name() {
        let mut d = Detector::new(&DetectConfig::default(), vec![], Arc::default());
        let t = "2026-11-27 01:57:34";
        let now = parse_line(format!("{t} x").as_bytes()).map_or(1_795_000_000_000, |e| e.time_ms);
        let mut fired = Vec::new();
        for i in 0..12 {
            for (name, ip) in [("mail-wr1-f45.google.com (helo) ", "209.85.221.45"), ("(helo) ", "198.51.100.7")] {
                let line = format!(
                    "{t} SMTP protocol synchronization error (input sent without waiting for greeting): \
                     rejected connection from H={name}[{ip}]:{} input=\"x\"",
                    40_000 + i
                );
                let event = parse_line(line.as_bytes()).unwrap();
                fired.extend(d.observe_event(&event, event.time_ms.max(now)));
            }
        }
        let nets: Vec<String> = fired.iter().map(|f| f.net.to_string()).collect();
        assert_eq!(nets, ["198.51.100.7/32"]);
    }
}
