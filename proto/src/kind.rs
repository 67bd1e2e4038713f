//! The event vocabulary: every kind of log line fleetban reads (Exim and
//! Dovecot), its stored name, what it is worth as evidence, and the service
//! ([`Service`]) a line came from.
//!
//! Kinds are service-neutral: an IMAP or POP3 authentication failure is an
//! [`EventKind::AuthFailed`] like an SMTP AUTH failure (with its
//! [`Service`] alongside), so an address failing AUTH on SMTP on one host and
//! IMAP on another is one attacker to the evidence model, and a successful
//! login on any service ([`EventKind::Login`]) earns good standing like
//! accepted mail.
//!
//! This is the one place that says what a kind is called and whether it is
//! abuse. The agent (parser, detection, metrics), the server (ingest,
//! correlation, the API) and the replay all read it from here, so the two
//! sides cannot drift apart.
//!
//! Invariants:
//! - [`EventKind::as_str`] and [`EventKind::from_name`] are inverse for every
//!   kind in [`EventKind::ALL`]; the names are stored in Postgres
//!   (`events.kind`) and never change.
//! - Context kinds ([`EventKind::is_context`]) are never evidence of abuse on
//!   their own: connects, the global refusals Exim gives everyone while a host
//!   is full, lost or timed-out sessions, TLS errors, missing reverse DNS,
//!   accepted mail and connection ends.

use std::fmt;

use crate::policy::Scenario;
use crate::v1::{EventKind, Service};

impl EventKind {
    /// Every kind fleetban produces, in wire order (without `Unspecified`).
    pub const ALL: [EventKind; 25] = [
        EventKind::Connect,
        EventKind::RefusedTooMany,
        EventKind::RefusedPerHost,
        EventKind::RefusedLoad,
        EventKind::AuthFailed,
        EventKind::RelayDenied,
        EventKind::RcptRejected,
        EventKind::SyncError,
        EventKind::TooManyNonmail,
        EventKind::TooManySyntax,
        EventKind::TooManyUnrecognized,
        EventKind::ProtocolError,
        EventKind::SyntaxError,
        EventKind::NoMail,
        EventKind::AclRejected,
        EventKind::AclDropped,
        EventKind::ClosedByDrop,
        EventKind::Lost,
        EventKind::CommandTimeout,
        EventKind::TlsError,
        EventKind::NoHostName,
        EventKind::Accepted,
        EventKind::Closed,
        EventKind::Login,
        EventKind::NoAuthAttempts,
    ];

    /// The snake_case name used in storage, JSON, metrics and config.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Unspecified => "unspecified",
            EventKind::Connect => "connect",
            EventKind::RefusedTooMany => "refused_too_many",
            EventKind::RefusedPerHost => "refused_per_host",
            EventKind::RefusedLoad => "refused_load",
            EventKind::AuthFailed => "auth_failed",
            EventKind::RelayDenied => "relay_denied",
            EventKind::RcptRejected => "rcpt_rejected",
            EventKind::SyncError => "sync_error",
            EventKind::TooManyNonmail => "too_many_nonmail",
            EventKind::TooManySyntax => "too_many_syntax",
            EventKind::TooManyUnrecognized => "too_many_unrecognized",
            EventKind::ProtocolError => "protocol_error",
            EventKind::SyntaxError => "syntax_error",
            EventKind::NoMail => "no_mail",
            EventKind::AclRejected => "acl_rejected",
            EventKind::AclDropped => "acl_dropped",
            EventKind::ClosedByDrop => "closed_by_drop",
            EventKind::Lost => "lost",
            EventKind::CommandTimeout => "command_timeout",
            EventKind::TlsError => "tls_error",
            EventKind::NoHostName => "no_host_name",
            EventKind::Accepted => "accepted",
            EventKind::Closed => "closed",
            EventKind::Login => "login",
            EventKind::NoAuthAttempts => "no_auth_attempts",
        }
    }

    /// The kind named `name` (the inverse of [`EventKind::as_str`]);
    /// `unspecified` and unknown names are `None`.
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The abuse scenario a line of this kind is evidence for, or `None` for
    /// a context kind.
    pub const fn scenario(self) -> Option<Scenario> {
        match self {
            EventKind::AuthFailed => Some(Scenario::Auth),
            EventKind::RelayDenied => Some(Scenario::Relay),
            EventKind::RcptRejected => Some(Scenario::Dictionary),
            EventKind::SyncError
            | EventKind::TooManyNonmail
            | EventKind::TooManySyntax
            | EventKind::TooManyUnrecognized
            | EventKind::ProtocolError
            | EventKind::SyntaxError => Some(Scenario::Protocol),
            EventKind::RefusedPerHost => Some(Scenario::ConnLimit),
            EventKind::AclRejected | EventKind::AclDropped => Some(Scenario::Acl),
            EventKind::Unspecified
            | EventKind::Connect
            | EventKind::RefusedTooMany
            | EventKind::RefusedLoad
            | EventKind::NoMail
            | EventKind::ClosedByDrop
            | EventKind::Lost
            | EventKind::CommandTimeout
            | EventKind::TlsError
            | EventKind::NoHostName
            | EventKind::Accepted
            | EventKind::Closed
            | EventKind::Login
            | EventKind::NoAuthAttempts => None,
        }
    }

    /// Whether a line of this kind is evidence of abuse by its address.
    pub const fn is_abuse(self) -> bool {
        self.scenario().is_some()
    }

    /// Whether a line of this kind is context only (never abuse on its own).
    pub const fn is_context(self) -> bool {
        !self.is_abuse()
    }

    /// Whether an agent that aggregates context (`[aggregate] enabled`)
    /// sends lines of this kind as per-address summaries
    /// ([`crate::v1::ContextSummary`]) instead of one event each. This is
    /// the one classification both sides use: the agent's aggregator
    /// summarises exactly these kinds, and the server reads them from
    /// summaries as well as from events (good standing, slot series, the
    /// alert monitor, reports, stats).
    ///
    /// Every context kind is summarised and every abuse kind stays
    /// individual: no server decision needs a context line on its own
    /// (correlation reads abuse evidence per minute and good standing per
    /// address; slot exhaustion is judged by the agent's own detector, which
    /// sees every line before aggregation).
    pub const fn is_summarised(self) -> bool {
        self.is_context() && !matches!(self, EventKind::Unspecified)
    }

    /// Whether `secs` is a valid length of a summary's interval: a divisor
    /// of 60, or a multiple of 60 that divides 3600, so that an interval
    /// never straddles a minute (or an hour) and the minute series the
    /// server draws from summaries stay exact.
    pub fn summary_interval_is_valid(secs: u32) -> bool {
        secs > 0 && (60u32.is_multiple_of(secs) || (secs.is_multiple_of(60) && 3600u32.is_multiple_of(secs)))
    }

    /// What one line of this kind counts towards its scenario's thresholds.
    /// Exim drops a session for too many bad commands only after it has seen
    /// several, so such a drop counts three; a synchronization error (input
    /// before the banner, or pipelining that was not offered: the check Exim
    /// has to catch bots) counts two; every other abuse line counts one;
    /// context counts nothing.
    pub const fn weight(self) -> u32 {
        match self {
            EventKind::TooManyNonmail | EventKind::TooManySyntax | EventKind::TooManyUnrecognized => 3,
            EventKind::SyncError => 2,
            k if k.is_abuse() => 1,
            _ => 0,
        }
    }

    /// Whether a line of this kind ends an SMTP session that had opened (so
    /// the connection no longer holds one of the host's slots): `closed by
    /// QUIT`, `lost`, timeouts, `closed by DROP`, the `dropped: too many ...`
    /// forms, `no MAIL in SMTP connection` and connect-ACL drops.
    pub const fn ends_session(self) -> bool {
        matches!(
            self,
            EventKind::Closed
                | EventKind::Lost
                | EventKind::CommandTimeout
                | EventKind::ClosedByDrop
                | EventKind::TooManyNonmail
                | EventKind::TooManySyntax
                | EventKind::TooManyUnrecognized
                | EventKind::NoMail
                | EventKind::AclDropped
                | EventKind::NoAuthAttempts
        )
    }

    /// Whether a line of this kind is a successful delivery or login that
    /// earns its address good standing.
    pub const fn earns_standing(self) -> bool {
        matches!(self, EventKind::Accepted | EventKind::Login)
    }
}

impl Service {
    /// Every service, in wire order (without `Unspecified`).
    pub const ALL: [Service; 6] =
        [Service::Smtp, Service::Imap, Service::Pop3, Service::Managesieve, Service::Submission, Service::DovecotOther];

    /// The service of a wire value: `UNSPECIFIED` (older agents, which read
    /// only Exim) and values this build does not know are SMTP and
    /// "dovecot" respectively.
    pub fn from_wire(value: i32) -> Service {
        match Service::try_from(value) {
            Ok(Service::Unspecified) => Service::Smtp,
            Ok(s) => s,
            Err(_) => Service::DovecotOther,
        }
    }

    /// The lowercase name used in storage, JSON and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            Service::Unspecified | Service::Smtp => "smtp",
            Service::Imap => "imap",
            Service::Pop3 => "pop3",
            Service::Managesieve => "managesieve",
            Service::Submission => "submission",
            Service::DovecotOther => "dovecot",
        }
    }

    /// The service named `name` (the inverse of [`Service::as_str`]).
    pub fn from_name(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one event counts towards its scenario: the kind's weight times the
/// authentication attempts the line reports (at least one). Dovecot writes
/// one line per session, `auth failed, 3 attempts`: three guesses.
pub const fn event_weight(kind: EventKind, attempts: u32) -> u64 {
    let n = if attempts == 0 { 1 } else { attempts };
    let n = if n > MAX_ATTEMPTS_PER_LINE { MAX_ATTEMPTS_PER_LINE } else { n };
    kind.weight() as u64 * n as u64
}

/// The most attempts one line is believed to report; a larger figure (a
/// forged event) counts as this many.
pub const MAX_ATTEMPTS_PER_LINE: u32 = 100;

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_follow_wire_order() {
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i + 1, "{kind}");
            assert_eq!(EventKind::from_name(kind.as_str()), Some(kind));
            // The stored name is the proto name without its prefix, lower case.
            let proto = kind.as_str_name().strip_prefix("EVENT_KIND_").unwrap().to_ascii_lowercase();
            assert_eq!(kind.as_str(), proto);
        }
        assert_eq!(EventKind::from_name("unspecified"), None);
        assert_eq!(EventKind::from_name("AUTH_FAILED"), None);
    }

    #[test]
    fn context_kinds_are_never_abuse() {
        for kind in [
            EventKind::Connect,
            EventKind::RefusedTooMany,
            EventKind::RefusedLoad,
            EventKind::Lost,
            EventKind::CommandTimeout,
            EventKind::TlsError,
            EventKind::NoHostName,
            EventKind::Accepted,
            EventKind::Closed,
            EventKind::NoMail,
            EventKind::ClosedByDrop,
            EventKind::Login,
            EventKind::NoAuthAttempts,
        ] {
            assert!(kind.is_context(), "{kind}");
            assert_eq!(kind.weight(), 0, "{kind}");
        }
        for kind in EventKind::ALL.into_iter().filter(|k| k.is_abuse()) {
            assert!(kind.weight() >= 1, "{kind}");
        }
        assert!(EventKind::AuthFailed.is_abuse() && EventKind::RefusedPerHost.is_abuse());
    }

    #[test]
    fn summarised_kinds_are_exactly_the_context_kinds() {
        for kind in EventKind::ALL {
            assert_eq!(kind.is_summarised(), kind.is_context(), "{kind}");
            assert!(!(kind.is_summarised() && kind.is_abuse()), "{kind}");
        }
        assert!(!EventKind::Unspecified.is_summarised());
        assert!(EventKind::Connect.is_summarised() && EventKind::Accepted.is_summarised());
        assert!(EventKind::Login.is_summarised() && EventKind::RefusedTooMany.is_summarised());
        assert!(!EventKind::AuthFailed.is_summarised() && !EventKind::RefusedPerHost.is_summarised());
        let valid: Vec<u32> = (0..=7200).filter(|s| EventKind::summary_interval_is_valid(*s)).collect();
        assert_eq!(
            valid,
            [1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60, 120, 180, 240, 300, 360, 600, 720, 900, 1200, 1800, 3600]
        );
    }

    #[test]
    fn services_round_trip_and_old_agents_are_smtp() {
        for s in Service::ALL {
            assert_eq!(Service::from_name(s.as_str()), Some(s));
            assert_eq!(Service::from_wire(s as i32), s);
        }
        assert_eq!(Service::from_wire(0), Service::Smtp);
        assert_eq!(Service::from_wire(999), Service::DovecotOther);
    }

    #[test]
    fn logins_earn_standing_and_attempts_multiply_auth_failures() {
        assert!(EventKind::Login.earns_standing() && EventKind::Accepted.earns_standing());
        assert_eq!(event_weight(EventKind::AuthFailed, 0), 1);
        assert_eq!(event_weight(EventKind::AuthFailed, 3), 3);
        assert_eq!(event_weight(EventKind::AuthFailed, u32::MAX), u64::from(MAX_ATTEMPTS_PER_LINE));
        assert_eq!(event_weight(EventKind::Login, 5), 0);
    }
}
