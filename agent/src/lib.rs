//! fleetban agent: the part that runs on every mail host.
//!
//! It follows the Exim main log, turns lines into typed events, detects abuse
//! locally within milliseconds, spools events durably and streams them to the
//! fleet server, and keeps the host firewall equal to the fleet blocklist plus
//! its own local blocks.
//!
//! # Layout
//!
//! The agent is built up issue by issue; each step is a leaf module that knows
//! nothing of the others, wired together by `pipeline`:
//!
//! - [`parse`]: one Exim log line to one typed `Event` (prefix, zone,
//!   continuation lines), plus the `parse` and `gen-log` commands' logic.
//! - [`tail`]: follows log files through rotation, identified by fingerprint.
//! - [`aggregate`]: context lines (connects, accepted mail, ...) counted
//!   per address and interval into summaries instead of single events.
//! - [`spool`]: the append-only, CRC-checked on-disk log of event batches,
//!   whose records also carry the read positions.
//! - [`detect`]: local abuse rules (slot exhaustion, connection rate, auth
//!   failures, protocol abuse) with bounded memory.
//! - [`uplink`]: the gRPC session to the server (enroll, Connect).
//! - [`failover`]: which server (of `servers`, or of the addresses of one
//!   name) the uplink dials next, and the reconnect backoff.
//! - [`host`]: the host's name, own addresses and host id.
//! - [`firewall`]: backends (nftables, ipset, CSF, dry-run) and the
//!   reconciler that keeps them equal to the desired set.
//! - [`pipeline`]: connects the steps with bounded channels.
//! - [`service`]: detection, the firewall thread, the uplink, metrics and
//!   the runtime status around a running pipeline.
//!
//! Around them: [`config`] (`agent.toml`), [`run`] (the `run` command),
//! [`status`], [`metrics`] (`/metrics`), [`backfill`] and [`bench`]
//! (`bench-ingest`), [`check`] (the `check-config` command) and [`notify`]
//! (systemd readiness).

pub mod aggregate;
pub mod backfill;
pub mod bench;
pub mod check;
pub mod config;
pub mod detect;
pub mod failover;
pub mod firewall;
pub mod fsutil;
pub mod host;
pub mod metrics;
pub mod notify;
pub mod parse;
pub mod pipeline;
pub mod run;
pub mod service;
pub mod spool;
pub mod status;
pub mod tail;
pub mod uplink;

/// The agent's version, reported to the server in `Hello` and `Enroll`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
