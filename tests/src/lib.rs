//! Shared helpers for fleetban's cross-crate integration and end-to-end tests.
//!
//! The tests themselves live in `tests/tests/`; they drive real agents and a
//! real server (on the embedded Postgres unless `DATABASE_URL` is set).
//!
//! # Layout
//!
//! - `demo`, `demo_script`: the `fleetban-demo` command: an in-process fleet
//!   with dry-run firewalls and a scripted attack.
//! - `sock`: TCP connections from a chosen source address, with a timeout.
//! - `netns`: network namespaces and the bridged segment the end-to-end
//!   tests build.
//! - `smtp_sim`: an SMTP responder writing Exim-format log lines (the
//!   `fleetban-smtp-sim` binary).
//! - `dovecot`: a real Dovecot (IMAP, POP3) with a throwaway configuration,
//!   started in a namespace, and minimal IMAP/POP3 login clients.
//! - `exim`: a real Exim daemon (self-contained configuration, started in
//!   a namespace) and an SMTP client for driving it.
//! - `traffic`: the precision benchmark: a generator of a labelled
//!   multi-host day of realistic Exim traffic (the `fleetban-traffic`
//!   binary) and the scorer of a detector's decisions against its labels.
//! - `precision`: the benchmark end to end: a generated fleet replayed
//!   through the real detection and correlation, scored.
//! - `slots`: freeing the Exim slots a blocked attacker holds (the
//!   `exim_slots` test and the `fleetban-slots` benchmark).
//! - `imap_block`: failed IMAP logins against real Dovecot until the
//!   guesser is blocked on its host and fleet-wide (the
//!   `fleetban-imap-block` benchmark).
//! - `fleetsim`: the fleet simulator of `fleetban-bench fleet`: thousands
//!   of simulated hosts with realistic log rates against the real server
//!   binary, in separate processes.
//! - `fleet`: the whole fleet (Postgres, server, mail hosts with agents, an
//!   attacker and a client) in namespaces.
//! - `replicas`: the fleet's server as several replicas behind HAProxy.
//! - `drill`: traffic with one source port per session and the accounting
//!   of the failure drills (lines written against events stored).

pub mod demo;
pub mod demo_script;
pub mod dovecot;
pub mod drill;
pub mod exim;
pub mod fleet;
pub mod fleetsim;
pub mod imap_block;
pub mod netns;
pub mod precision;
pub mod replicas;
pub mod slots;
pub mod smtp_sim;
pub mod sock;
pub mod traffic;
