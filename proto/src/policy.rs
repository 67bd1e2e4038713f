//! The evidence model: what abuse is, how much of it blocks, and what never
//! blocks. The agent's local detection, the server's fleet correlation and
//! the replay all decide with these functions.
//!
//! - Every abuse kind feeds one [`Scenario`] with its [`EventKind::weight`]
//!   (see `kind`); context kinds feed none.
//! - Each scenario has a [`Rule`]: a threshold of weighted events from one
//!   address on one host (`per_host`) and across the fleet (`fleet`, spread
//!   over at least `min_hosts` hosts), within `window_secs`, like CSF's
//!   per-trigger `LF_*` limits and CrowdSec's per-scenario buckets.
//! - **Good standing**: an address that delivered accepted mail to the fleet
//!   or logged in successfully within `good_standing_secs` needs
//!   `good_standing_factor` times the evidence (0 = it is never blocked by
//!   that rule). Unknown recipients from a sender that also delivers are not
//!   a dictionary attack, so `dictionary` defaults to 0.
//! - **Protected senders**: an address whose *verified* reverse-DNS name
//!   (Exim's `H=name`, never the HELO) lies in a protected domain is never
//!   blocked automatically ([`is_protected`]).
//! - **Shadow mode**: a rule with `shadow = true` still decides, and the
//!   decision is recorded, but nothing is blocked.
//!
//! [`judge`] is pure: callers gather a [`Tally`] (from memory on the agent,
//! from Postgres on the server) and get a [`Verdict`] back.

use serde::{Deserialize, Serialize};

use crate::v1::EventKind;
use crate::v1::RulePolicy;

/// A kind of abuse, with its own thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// SMTP AUTH failures (brute force, credential stuffing).
    Auth,
    /// Relay attempts and unauthenticated submission.
    Relay,
    /// RCPT rejections (unknown users: dictionary attacks).
    Dictionary,
    /// Protocol abuse: synchronization, syntax and protocol errors, sessions
    /// dropped for too many bad commands.
    Protocol,
    /// Refusals for too many connections from one address.
    ConnLimit,
    /// ACL rejections and drops outside RCPT (HELO, connect ACLs).
    Acl,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 6] =
        [Scenario::Auth, Scenario::Relay, Scenario::Dictionary, Scenario::Protocol, Scenario::ConnLimit, Scenario::Acl];

    /// The name used in config, evidence, metrics and the API.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scenario::Auth => "auth",
            Scenario::Relay => "relay",
            Scenario::Dictionary => "dictionary",
            Scenario::Protocol => "protocol",
            Scenario::ConnLimit => "conn_limit",
            Scenario::Acl => "acl",
        }
    }

    /// The scenario named `name`.
    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Position in [`Scenario::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The stored names of the kinds that feed this scenario.
    pub fn kinds(self) -> impl Iterator<Item = EventKind> {
        EventKind::ALL.into_iter().filter(move |k| k.scenario() == Some(self))
    }

    /// The defaults shipped for this scenario: safe for a hosting fleet
    /// (see DECISIONS: CSF's `LF_SMTPAUTH` 5/h and `LF_EXIMSYNTAX` 10/h,
    /// fail2ban's 5/10 min, CrowdSec's slow buckets), erring towards letting
    /// an attacker try a little longer rather than blocking a sender.
    pub const fn default_rule(self) -> Rule {
        let base = Rule {
            per_host: 0,
            fleet: 0,
            min_hosts: 2,
            window_secs: 3_600,
            distinct_users: 0,
            good_standing_factor: 5,
            shadow: false,
        };
        match self {
            // A phone retrying a stale password polls every few minutes
            // (under 10 an hour); an office NAT mistypes once per host.
            Scenario::Auth => Rule { per_host: 10, fleet: 15, distinct_users: 5, ..base },
            // A misconfigured client (`SMTP AUTH is required`) talks to its
            // own server; a relay probe walks the fleet, so the fleet's bar
            // is lower than one host's.
            Scenario::Relay => Rule { per_host: 10, fleet: 8, ..base },
            // Never for a sender that also delivers accepted mail.
            Scenario::Dictionary => Rule { per_host: 20, fleet: 25, good_standing_factor: 0, ..base },
            // A flaky MTA that delivers is in good standing (x5); a pre-greeting
            // talker that walks the fleet is a scanner.
            Scenario::Protocol => Rule { per_host: 10, fleet: 8, ..base },
            // Big senders open many connections and retry after refusals.
            Scenario::ConnLimit => {
                Rule { per_host: 100, fleet: 200, window_secs: 600, good_standing_factor: 0, ..base }
            }
            // Connect-ACL verdicts of other tools (ratelimits, RBLs) hit
            // legitimate senders too.
            Scenario::Acl => Rule { per_host: 30, fleet: 60, good_standing_factor: 0, ..base },
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One scenario's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Weighted events from one address on one host within `window_secs`
    /// that block; 0 = never on one host's evidence alone.
    pub per_host: u32,
    /// Weighted events from one address across the fleet within
    /// `window_secs` that block, when spread over at least `min_hosts`
    /// hosts; 0 = off.
    pub fleet: u32,
    /// Hosts the fleet count must span.
    pub min_hosts: u32,
    /// Sliding window, seconds.
    pub window_secs: u32,
    /// Distinct user names failing from one address (on one host, or across
    /// the fleet) that block (`auth` only); 0 = off.
    pub distinct_users: u32,
    /// Threshold multiplier for an address in good standing; 0 = never.
    pub good_standing_factor: u32,
    /// Record what would be blocked, block nothing.
    pub shadow: bool,
}

/// A rule's table in a TOML config: every key optional, the scenario's
/// default for the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTable {
    /// Weighted events on one host within `window_secs` that block; 0 = off.
    pub per_host: Option<u32>,
    /// Weighted events across the fleet within `window_secs` that block; 0 = off.
    pub fleet: Option<u32>,
    /// Hosts the fleet count must span (at least 1).
    pub min_hosts: Option<u32>,
    /// Sliding window, seconds (1 to 604800).
    pub window_secs: Option<u32>,
    /// Distinct failing user names that block (`auth` only); 0 = off.
    pub distinct_users: Option<u32>,
    /// Threshold multiplier in good standing; 0 = never block one.
    pub good_standing_factor: Option<u32>,
    /// `false` = shadow mode (record, never block). Default true.
    pub enforce: Option<bool>,
}

impl RuleTable {
    /// The rule for `scenario` with these overrides.
    pub fn resolve(&self, scenario: Scenario) -> Rule {
        let d = scenario.default_rule();
        Rule {
            per_host: self.per_host.unwrap_or(d.per_host),
            fleet: self.fleet.unwrap_or(d.fleet),
            min_hosts: self.min_hosts.unwrap_or(d.min_hosts),
            window_secs: self.window_secs.unwrap_or(d.window_secs),
            distinct_users: self.distinct_users.unwrap_or(d.distinct_users),
            good_standing_factor: self.good_standing_factor.unwrap_or(d.good_standing_factor),
            shadow: self.enforce.map_or(d.shadow, |e| !e),
        }
    }
}

/// Every scenario's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    rules: [Rule; 6],
}

impl Default for Rules {
    fn default() -> Self {
        Rules { rules: Scenario::ALL.map(Scenario::default_rule) }
    }
}

/// A value in a rule table that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{scenario}.{key}: {problem}")]
pub struct RuleError {
    /// The scenario.
    pub scenario: Scenario,
    /// The key.
    pub key: &'static str,
    /// What is wrong.
    pub problem: &'static str,
}

impl Rules {
    /// The rule of `scenario`.
    pub fn get(&self, scenario: Scenario) -> &Rule {
        &self.rules[scenario.index()]
    }

    /// Replaces the rule of `scenario`.
    pub fn set(&mut self, scenario: Scenario, rule: Rule) {
        self.rules[scenario.index()] = rule;
    }

    /// The longest window of any rule, seconds.
    pub fn longest_window_secs(&self) -> u32 {
        self.rules.iter().map(|r| r.window_secs).max().unwrap_or(0)
    }

    /// Checks values that cannot work.
    pub fn validate(&self) -> Result<(), RuleError> {
        for scenario in Scenario::ALL {
            let r = self.get(scenario);
            let err = |key, problem| Err(RuleError { scenario, key, problem });
            if r.min_hosts == 0 {
                return err("min_hosts", "must be at least 1");
            }
            if r.window_secs == 0 || r.window_secs > 604_800 {
                return err("window_secs", "must be between 1 and 604800 (7 days)");
            }
            if r.distinct_users != 0 && scenario != Scenario::Auth {
                return err("distinct_users", "applies to the auth rule only");
            }
            if r.good_standing_factor > 1_000 {
                return err("good_standing_factor", "must be at most 1000");
            }
        }
        Ok(())
    }

    /// The rules as pushed to agents in `Policy.rules`.
    pub fn to_proto(&self) -> Vec<RulePolicy> {
        Scenario::ALL
            .iter()
            .map(|s| {
                let r = self.get(*s);
                RulePolicy {
                    name: s.as_str().to_owned(),
                    per_host: r.per_host,
                    window_secs: r.window_secs,
                    distinct_users: r.distinct_users,
                    good_standing_factor: r.good_standing_factor,
                    shadow: r.shadow,
                }
            })
            .collect()
    }

    /// Applies the per-host parts of rules pushed by a server; unknown
    /// names are ignored (a newer server's rules), windows are clamped.
    pub fn apply_proto(&mut self, rules: &[RulePolicy]) {
        for p in rules {
            let Some(scenario) = Scenario::from_name(&p.name) else { continue };
            let r = &mut self.rules[scenario.index()];
            r.per_host = p.per_host;
            if p.window_secs > 0 {
                r.window_secs = p.window_secs.min(604_800);
            }
            r.distinct_users = if scenario == Scenario::Auth { p.distinct_users } else { 0 };
            r.good_standing_factor = p.good_standing_factor.min(1_000);
            r.shadow = p.shadow;
        }
    }
}

/// What is known about one address (or the range it is judged as) for one
/// scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    /// Weighted events on the host with the most of them.
    pub host_max: u32,
    /// Distinct failing user names on that host.
    pub host_users: u32,
    /// Weighted events across the fleet.
    pub fleet: u32,
    /// Hosts that saw any.
    pub hosts: u32,
    /// Distinct failing user names across the fleet.
    pub fleet_users: u32,
}

/// Everything [`judge`] weighs about one address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Per scenario (indexed like [`Scenario::ALL`]), within each rule's window.
    pub counts: [Count; 6],
    /// It delivered accepted mail or logged in within `good_standing_secs`.
    pub good_standing: bool,
    /// Its verified reverse-DNS name is in a protected domain.
    pub protected: bool,
}

/// Which evidence met a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One host's evidence.
    Host,
    /// The fleet's evidence.
    Fleet,
}

/// A decision to block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The scenario whose threshold was met.
    pub scenario: Scenario,
    /// On whose evidence.
    pub scope: Scope,
    /// The rule runs in shadow mode: record, do not block.
    pub shadow: bool,
    /// The threshold that was met, after the good-standing factor.
    pub threshold: u32,
    /// The count that met it.
    pub count: u32,
    /// Whether it counted distinct users rather than events.
    pub users: bool,
    /// The address was in good standing (the threshold was raised).
    pub good_standing: bool,
}

impl Verdict {
    /// One line for logs and evidence: `auth: 12 weighted events on one host
    /// within 3600 s (threshold 10)`.
    pub fn describe(&self, rule: &Rule) -> String {
        let what = if self.users { "distinct users failing" } else { "weighted events" };
        let scope = match self.scope {
            Scope::Host => "on one host",
            Scope::Fleet => "across the fleet",
        };
        let standing = if self.good_standing { ", in good standing" } else { "" };
        format!(
            "{}: {} {what} {scope} within {} s (threshold {}{standing})",
            self.scenario, self.count, rule.window_secs, self.threshold
        )
    }
}

/// `threshold` raised for good standing; `None` = the rule never blocks.
fn effective(threshold: u32, rule: &Rule, good_standing: bool) -> Option<u32> {
    if threshold == 0 {
        return None;
    }
    if !good_standing {
        return Some(threshold);
    }
    match rule.good_standing_factor {
        0 => None,
        f => Some(threshold.saturating_mul(f)),
    }
}

/// The first rule (in [`Scenario::ALL`] order, host evidence before fleet
/// evidence) whose threshold `tally` meets; `None` when none is, or when the
/// address is protected.
pub fn judge(rules: &Rules, tally: &Tally) -> Option<Verdict> {
    if tally.protected {
        return None;
    }
    let gs = tally.good_standing;
    for scenario in Scenario::ALL {
        let rule = rules.get(scenario);
        let c = &tally.counts[scenario.index()];
        let verdict = |scope, threshold, count, users| Verdict {
            scenario,
            scope,
            shadow: rule.shadow,
            threshold,
            count,
            users,
            good_standing: gs,
        };
        if let Some(t) = effective(rule.per_host, rule, gs)
            && c.host_max >= t
        {
            return Some(verdict(Scope::Host, t, c.host_max, false));
        }
        if let Some(t) = effective(rule.distinct_users, rule, gs)
            && c.host_users >= t
        {
            return Some(verdict(Scope::Host, t, c.host_users, true));
        }
        if c.hosts >= rule.min_hosts.max(1) {
            if let Some(t) = effective(rule.fleet, rule, gs)
                && c.fleet >= t
            {
                return Some(verdict(Scope::Fleet, t, c.fleet, false));
            }
            // Distinct users across the fleet: the same bar plus half again.
            if let Some(t) = effective(rule.distinct_users, rule, gs).map(|t| t.saturating_add(t / 2))
                && c.fleet_users >= t
            {
                return Some(verdict(Scope::Fleet, t, c.fleet_users, true));
            }
        }
    }
    None
}

/// The big mailbox providers and ESPs whose outbound servers are never
/// blocked automatically (matched against verified reverse DNS).
pub const DEFAULT_PROTECTED_DOMAINS: &[&str] = &[
    "google.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "yahoo.com",
    "yahoodns.net",
    "aol.com",
    "icloud.com",
    "me.com",
    "mac.com",
    "apple.com",
    "amazonses.com",
    "zoho.com",
    "zohomail.com",
    "yandex.net",
    "yandex.ru",
    "mail.ru",
    "gmx.net",
    "web.de",
    "protonmail.ch",
    "messagingengine.com",
    "mailgun.net",
    "sendgrid.net",
    "mcsv.net",
    "mcdlv.net",
    "rsgsv.net",
    "mandrillapp.com",
    "sparkpostmail.com",
    "postmarkapp.com",
];

/// Whether `host_name` (a verified reverse-DNS name) is `domain` or inside
/// it, for one of `domains`; case-insensitive, a trailing dot ignored. The
/// match is on whole labels: `evilgoogle.com` is not in `google.com`.
pub fn is_protected<S: AsRef<str>>(host_name: &str, domains: &[S]) -> bool {
    let name = host_name.strip_suffix('.').unwrap_or(host_name);
    if name.is_empty() {
        return false;
    }
    domains.iter().any(|d| {
        let d = d.as_ref();
        let d = d.strip_suffix('.').unwrap_or(d);
        let d = d.strip_prefix('.').unwrap_or(d);
        if d.is_empty() || name.len() < d.len() {
            return false;
        }
        let (head, tail) = name.split_at(name.len() - d.len());
        tail.eq_ignore_ascii_case(d) && (head.is_empty() || head.ends_with('.'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(scenario: Scenario, count: Count) -> Tally {
        let mut t = Tally::default();
        t.counts[scenario.index()] = count;
        t
    }

    #[test]
    fn defaults_validate_and_every_abuse_kind_has_a_scenario_rule() {
        Rules::default().validate().unwrap();
        for s in Scenario::ALL {
            assert!(s.kinds().count() >= 1, "{s}");
            assert_eq!(Scenario::from_name(s.as_str()), Some(s));
        }
    }

    #[test]
    fn one_typo_per_host_on_two_hosts_never_blocks() {
        // The office NAT: one mistyped password on each of two hosts.
        let t = tally(Scenario::Auth, Count { host_max: 1, host_users: 1, fleet: 2, hosts: 2, fleet_users: 2 });
        assert_eq!(judge(&Rules::default(), &t), None);
    }

    #[test]
    fn brute_force_on_one_host_and_across_hosts_blocks() {
        let rules = Rules::default();
        let one = tally(Scenario::Auth, Count { host_max: 10, host_users: 1, fleet: 10, hosts: 1, fleet_users: 1 });
        let v = judge(&rules, &one).unwrap();
        assert_eq!((v.scenario, v.scope, v.threshold), (Scenario::Auth, Scope::Host, 10));
        // Three failures on each of five hosts: invisible to each host.
        let spread = tally(Scenario::Auth, Count { host_max: 3, host_users: 3, fleet: 15, hosts: 5, fleet_users: 3 });
        assert_eq!(judge(&rules, &spread).unwrap().scope, Scope::Fleet);
        // Many distinct users on one host.
        let users = tally(Scenario::Auth, Count { host_max: 5, host_users: 5, fleet: 5, hosts: 1, fleet_users: 5 });
        assert!(judge(&rules, &users).unwrap().users);
        // The fleet count on one host alone does not make a fleet verdict.
        let alone = tally(Scenario::Auth, Count { host_max: 9, host_users: 1, fleet: 40, hosts: 1, fleet_users: 1 });
        assert_eq!(judge(&rules, &alone), None);
    }

    #[test]
    fn good_standing_raises_the_bar_and_dictionary_never_blocks_a_sender() {
        let rules = Rules::default();
        // A typo followed by a success: in good standing.
        let mut t = tally(Scenario::Auth, Count { host_max: 12, host_users: 2, fleet: 12, hosts: 1, fleet_users: 2 });
        t.good_standing = true;
        assert_eq!(judge(&rules, &t), None);
        t.counts[0].host_max = 50;
        let v = judge(&rules, &t).unwrap();
        assert_eq!((v.threshold, v.good_standing), (50, true));
        // A newsletter with a stale list that also delivers: never.
        let mut d =
            tally(Scenario::Dictionary, Count { host_max: 500, host_users: 0, fleet: 900, hosts: 5, fleet_users: 0 });
        d.good_standing = true;
        assert_eq!(judge(&rules, &d), None);
        d.good_standing = false;
        assert_eq!(judge(&rules, &d).unwrap().scenario, Scenario::Dictionary);
    }

    /// The legitimate traffic that looks most like each remaining rule's
    /// attack: a client without SMTP AUTH configured retrying on its own
    /// server (relay), a big sender refused per host while it retries
    /// (conn_limit), a provider rate-limited by cPanel's connect ACL (acl).
    #[test]
    fn relay_conn_limit_and_acl_spare_their_lookalikes() {
        let rules = Rules::default();
        // Nine "SMTP AUTH is required" an hour on its one server.
        let client = tally(Scenario::Relay, Count { host_max: 9, host_users: 0, fleet: 9, hosts: 1, fleet_users: 0 });
        assert_eq!(judge(&rules, &client), None);
        // The same client in good standing (its other users send fine), 40 an hour.
        let mut busy =
            tally(Scenario::Relay, Count { host_max: 40, host_users: 0, fleet: 40, hosts: 1, fleet_users: 0 });
        busy.good_standing = true;
        assert_eq!(judge(&rules, &busy), None);
        // A relay probe walking the fleet: 8 attempts over 4 hosts.
        let probe = tally(Scenario::Relay, Count { host_max: 2, host_users: 0, fleet: 8, hosts: 4, fleet_users: 0 });
        assert_eq!(judge(&rules, &probe).unwrap().scope, Scope::Fleet);
        // A big sender refused per host 500 times while it retries: it
        // delivers, so never.
        let mut big =
            tally(Scenario::ConnLimit, Count { host_max: 500, host_users: 0, fleet: 900, hosts: 5, fleet_users: 0 });
        big.good_standing = true;
        assert_eq!(judge(&rules, &big), None);
        // A provider rate-limited by the connect ACL on every host: never in
        // good standing.
        let mut limited =
            tally(Scenario::Acl, Count { host_max: 300, host_users: 0, fleet: 900, hosts: 5, fleet_users: 0 });
        limited.good_standing = true;
        assert_eq!(judge(&rules, &limited), None);
        limited.good_standing = false;
        assert_eq!(judge(&rules, &limited).unwrap().scenario, Scenario::Acl);
    }

    #[test]
    fn protected_senders_are_never_judged() {
        let mut t =
            tally(Scenario::Protocol, Count { host_max: 1000, host_users: 0, fleet: 1000, hosts: 9, fleet_users: 0 });
        t.protected = true;
        assert_eq!(judge(&Rules::default(), &t), None);
        let d = DEFAULT_PROTECTED_DOMAINS;
        assert!(is_protected("mail-wr1-f45.google.com", d));
        assert!(is_protected("MAIL-SOR-F41.GOOGLE.COM.", d));
        assert!(is_protected("google.com", d));
        assert!(!is_protected("evilgoogle.com", d));
        assert!(!is_protected("google.com.attacker.example", d));
        assert!(!is_protected("", d));
        assert!(is_protected("a.outbound.protection.outlook.com", d));
    }

    #[test]
    fn shadow_rules_still_decide_and_say_so() {
        let mut rules = Rules::default();
        let table = RuleTable { enforce: Some(false), per_host: Some(3), ..RuleTable::default() };
        rules.set(Scenario::Relay, table.resolve(Scenario::Relay));
        let t = tally(Scenario::Relay, Count { host_max: 3, host_users: 0, fleet: 3, hosts: 1, fleet_users: 0 });
        let v = judge(&rules, &t).unwrap();
        assert!(v.shadow);
        assert_eq!(
            v.describe(rules.get(Scenario::Relay)),
            "relay: 3 weighted events on one host within 3600 s (threshold 3)"
        );
    }

    #[test]
    fn rules_travel_to_agents_and_bad_values_name_the_key() {
        let mut rules = Rules::default();
        rules.set(Scenario::Auth, Rule { per_host: 7, shadow: true, ..Scenario::Auth.default_rule() });
        let mut agent = Rules::default();
        agent.apply_proto(&rules.to_proto());
        assert_eq!(agent.get(Scenario::Auth).per_host, 7);
        assert!(agent.get(Scenario::Auth).shadow);
        let mut bad = Rules::default();
        bad.set(Scenario::Relay, Rule { distinct_users: 3, ..Scenario::Relay.default_rule() });
        assert_eq!(bad.validate().unwrap_err().to_string(), "relay.distinct_users: applies to the auth rule only");
    }
}
