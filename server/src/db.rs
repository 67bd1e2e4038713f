//! The connection pool and the schema.
//!
//! Migrations under `migrations/` are embedded into the binary and applied by
//! `fleetban-server migrate` and at every `serve` start; sqlx records applied
//! versions, so applying them again is a no-op.

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Every migration of the schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Errors from connecting to or migrating the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool could not connect.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// Opens a pool of at most `max_connections` to `url`.
///
/// Sessions run with `jit = off`: fleetban's statements are short and run
/// thousands of times a second. With JIT on, any of them whose cost estimate
/// crosses `jit_above_cost` compiles code on every execution and throws it
/// away; under ingest load the correlation query spent all of its time in
/// LLVM that way (pg_stat_statements: 41 s of JIT in 41 s of execution).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, Error> {
    let options = PgConnectOptions::from_str(url).map_err(Error::Connect)?.options([("jit", "off")]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(Error::Connect)
}

/// Applies every pending migration; idempotent.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await.map_err(Error::Migrate)
}
