//! fleetban server: the fleet's shared memory.
//!
//! Agents stream parsed events over gRPC; the server stores them in Postgres,
//! correlates attackers across hosts, decides fleet blocks and pushes the
//! versioned blocklist back to every agent. Operators use the REST API, the
//! `fleetban` CLI and the dashboard.
//!
//! # Layout
//!
//! - [`pgembed`]: a throwaway Postgres cluster for the demo and tests.
//! - [`config`]: `server.toml`, overridden by flags.
//! - [`db`]: the connection pool and the embedded migrations.
//! - [`correlate`]: the fleet policy that turns evidence into blocks.
//! - [`session`]: the gRPC `AgentService`.
//! - [`api`]: the HTTP router (health today; REST API and dashboard).
//! - [`serve`]: runs the gRPC and HTTP listeners until shutdown.

pub mod api;
pub mod config;
pub mod correlate;
pub mod db;
pub mod pgembed;
pub mod serve;
pub mod session;

/// The server's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
#[ctor::ctor]
fn test_database() {
    pgembed::ensure_test_database_url();
}
