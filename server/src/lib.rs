//! fleetban server: the fleet's shared memory.
//!
//! Agents stream parsed events over gRPC; the server stores them in Postgres,
//! correlates attackers across hosts, decides fleet blocks and pushes the
//! versioned blocklist back to every agent. Operators use the REST API, the
//! `fleetban` CLI (`src/bin/fleetban/`, a typed client of [`api`]) and the
//! dashboard.
//!
//! # Layout
//!
//! - `pgembed` (feature `testkit`): a throwaway Postgres cluster for the
//!   demo, the benchmarks and the tests; not in the packaged server.
//! - [`config`]: `server.toml`, overridden by flags.
//! - [`db`]: the connection pool and the embedded migrations.
//! - [`auth`]: enrollment tokens and agent credentials.
//! - [`tls`]: TLS of the gRPC listener and `pki init`.
//! - [`ingest`]: validation and exactly-once storage of event batches.
//! - [`summaries`]: agents' context summaries (counts per address and
//!   interval instead of one event per context line): validation, storage.
//! - [`blocks`]: the versioned fleet blocklist and its policy checks.
//! - [`correlate`]: the fleet policy that turns evidence into blocks.
//! - [`backlog`]: coalesced correlation work of committed batches.
//! - [`proxyproto`]: PROXY protocol headers from trusted load balancers.
//! - [`push`]: LISTEN/NOTIFY fan-out of blocklist changes to sessions.
//! - [`replica`]: this process as one of several replicas on one database,
//!   and the advisory-lock leadership of the fleet-wide sweeps.
//! - [`session`]: the gRPC `AgentService` (Enroll, Connect).
//! - [`heartbeat`]: the sessions' heartbeats (seen, connected, credentials
//!   still valid), several agents per statement.
//! - [`api`]: the HTTP side: REST API, dashboard, metrics, OpenAPI, health.
//! - [`replay`]: past traffic of many hosts through detection and
//!   correlation with a candidate policy (`fleetban-server replay`).
//! - [`report`]: plain-text abuse reports.
//! - [`asn`]: autonomous-system data (iptoasn import and lookup).
//! - [`feeds`]: blocklist feeds (`[[feed]]`) and ASN block rules kept as
//!   blocks, with their status.
//! - [`geo`]: ASN and country policy: ASN block rules, evidence
//!   multipliers, the country database.
//! - [`serve`]: runs the gRPC and HTTP listeners until shutdown.
//! - [`conn`]: connection discipline of both listeners (caps, deadlines).
//! - [`guard`]: throttle of failed agent authentication; marks
//!   authenticated gRPC connections.
//! - [`timeseries`]: per-minute abuse, slot and block series for the
//!   dashboard, kept by ingest.
//! - [`table`]: operators' aligned tables and token rows, shared by the
//!   `fleetban` CLI (`src/bin/fleetban/`) and the admin commands.
//! - [`timefmt`]: times in those tables (relative on a terminal).
//! - [`text`]: escaping of client-supplied text for logs and terminals.
//! - [`units`]: durations as operators write them (`90s`, `6h`, `7d`).
//! - [`telemetry`]: names of the metrics the domain records (described and
//!   exported by `api::metrics`).
//! - [`transfer`]: bulk import/export formats of the blocklist and allowlist.
//! - [`notify`]: systemd readiness (`READY=1` once listening, `STOPPING=1`).
//! - [`alerts`]: notifications (`[[notify]]`): events queued in Postgres,
//!   delivered by webhook, Slack or email with retries.

pub mod alerts;
pub mod api;
pub mod applied;
pub mod asn;
pub mod auth;
pub mod backlog;
pub mod blocks;
pub mod config;
pub mod conn;
pub mod correlate;
pub mod db;
pub mod eventlog;
pub mod feeds;
pub mod geo;
pub mod guard;
pub mod heartbeat;
pub mod ingest;
pub mod notify;
pub mod periodic;
pub mod pgcopy;
#[cfg(any(test, feature = "testkit"))]
pub mod pgembed;
pub mod proxyproto;
pub mod push;
pub mod replay;
pub mod replica;
pub mod report;
pub mod retention;
pub mod serve;
pub mod session;
pub mod summaries;
pub mod table;
pub mod telemetry;
pub mod text;
pub mod timefmt;
pub mod timeseries;
pub mod tls;
pub mod transfer;
pub mod units;

/// The server's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
#[ctor::ctor]
fn test_database() {
    pgembed::ensure_test_database_url();
}
