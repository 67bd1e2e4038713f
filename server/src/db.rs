//! The connection pool and the schema.
//!
//! Migrations under `migrations/` are embedded into the binary and applied by
//! `fleetban-server migrate` and at every `serve` start; sqlx records applied
//! versions, so applying them again is a no-op.
//!
//! [`connect`] checks the URL's form first (it must start with
//! `postgres://`; errors never show the password) and opens one connection
//! directly before it builds the pool, so a database that cannot be reached
//! fails with the address it tried, the real cause (connection refused,
//! authentication failed, no such database) and what to do about it, rather
//! than sqlx's `pool timed out while waiting for an open connection`.
//! Sessions ask Postgres for warnings and worse only
//! (`client_min_messages = warning`): notices such as `relation
//! "_sqlx_migrations" already exists, skipping` are not for operators.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};

use crate::text::one_line;

/// Every migration of the schema, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The form a database URL must have, for messages.
pub const URL_FORM: &str = "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";

/// How long the first connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from connecting to or migrating the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL is not a Postgres URL.
    #[error("database URL {shown} {problem}; expected {URL_FORM}")]
    Url {
        /// The URL with any password replaced by `***`.
        shown: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The first connection failed.
    #[error("cannot connect to the database {target}: {cause}; {hint}")]
    Connect {
        /// `postgres://USER@HOST:PORT/DATABASE`, without the password.
        target: String,
        /// The underlying error, on one line.
        cause: String,
        /// What to check.
        hint: &'static str,
    },
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// `url` with the password of its user part (and a `password=` parameter)
/// replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _password)) => format!("{name}:***@{host}"),
            None => format!("{user}@{host}"),
        },
        None => authority.to_owned(),
    };
    let path = match path.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => path.to_owned(),
    };
    format!("{scheme}{authority}{path}")
}

/// Checks the form of `url` and parses it.
pub fn parse_url(url: &str) -> Result<PgConnectOptions, Error> {
    let invalid = |problem: String| Error::Url { shown: format!("`{}`", redact_url(url)), problem };
    if url.trim().is_empty() {
        return Err(invalid("is empty".into()));
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(invalid("must start with postgres://".into()));
    }
    // sqlx 0.8 connects to one host and ignores libpq's
    // `target_session_attrs`: a libpq multi-host URL would be tried as one
    // host named `a,b`, and could land on a read-only standby.
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host_part = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if host_part.contains(',') || url.contains("target_session_attrs") {
        return Err(invalid(
            "lists several hosts or target_session_attrs, which this server's driver (sqlx) does not support: \
             give the one URL of the writable primary (a virtual IP, HAProxy or a DNS name that follows it; see \
             deploy/README.md, \"Postgres highly available\")"
                .into(),
        ));
    }
    // sqlx's message can quote the URL, password included: not shown.
    PgConnectOptions::from_str(url).map_err(|_| invalid("cannot be parsed".into()))
}

/// `postgres://USER@HOST:PORT/DATABASE` of `options`, for messages.
pub fn target(options: &PgConnectOptions) -> String {
    let host = options.get_host();
    let host = if host.contains(':') && !host.starts_with('/') { format!("[{host}]") } else { host.to_owned() };
    format!(
        "postgres://{}@{host}:{}/{}",
        options.get_username(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    )
}

/// What to check when connecting failed with `error`.
pub fn hint(error: &sqlx::Error) -> &'static str {
    use std::io::ErrorKind;
    match error {
        sqlx::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => {
                "nothing listens there: is Postgres running, and are the host and port of the URL right?"
            }
            ErrorKind::TimedOut | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                "no answer: check the host name, the route and firewalls, and Postgres' listen_addresses"
            }
            ErrorKind::NotFound => "check the host name (it does not resolve) or the socket directory",
            ErrorKind::PermissionDenied => "the server may not open that address or socket",
            _ => "check the host and port of the URL and that Postgres accepts connections from this host",
        },
        sqlx::Error::Tls(_) => "TLS failed: check sslmode and sslrootcert in the URL and the server's certificate",
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => {
                "check the user and password in the URL (or PGPASSWORD) and pg_hba.conf on the database server"
            }
            Some("3D000") => "the database does not exist: create it (createdb -O USER DATABASE)",
            Some("53300") => "Postgres has no free connection slots: raise max_connections or lower db_max_connections",
            Some("57P03") => "Postgres is starting up or shutting down: wait and retry",
            _ => "see the Postgres server's log",
        },
        sqlx::Error::PoolTimedOut => "the database did not answer in time: check that it is up and reachable",
        _ => "check database_url (DATABASE_URL, --database-url) and that Postgres is up",
    }
}

/// Whether `error` means the database cannot be reached or is not accepting
/// work at the moment (rather than a bad statement).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exception; 57P01-57P03: shutdown, crash,
            // cannot connect now; 53300: too many connections.
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Whether `error` is a deadlock or a serialization failure: the statement
/// lost to a concurrent one and may simply be tried again.
pub fn is_conflict(error: &sqlx::Error) -> bool {
    matches!(error.as_database_error().and_then(|e| e.code()).as_deref(), Some("40P01" | "40001"))
}

/// Opens a pool of at most `max_connections` to `url`, after one direct
/// connection that shows the real error if the database cannot be reached.
///
/// Sessions run with `jit = off`: fleetban's statements are short and run
/// thousands of times a second. With JIT on, any of them whose cost estimate
/// crosses `jit_above_cost` compiles code on every execution and throws it
/// away; under ingest load the correlation query spent all of its time in
/// LLVM that way (pg_stat_statements: 41 s of JIT in 41 s of execution).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, Error> {
    let options = parse_url(url)?.options([("jit", "off"), ("client_min_messages", "warning")]);
    let failed =
        |error: &sqlx::Error| Error::Connect { target: target(&options), cause: one_line(error), hint: hint(error) };
    match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
        }
        Ok(Err(error)) => return Err(failed(&error)),
        Err(_) => {
            return Err(Error::Connect {
                target: target(&options),
                cause: format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
                hint: "check the host name, the route and firewalls, and Postgres' listen_addresses",
            });
        }
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        // Every connection is pinged before it is handed out (sqlx's
        // default): after a Postgres restart or failover a connection that
        // broke goes back to the pool, and pinging only connections idle for
        // a while handed broken ones out again (the restart drills caught it).
        .connect_with(options.clone())
        .await
        .map_err(|error| failed(&error))
}

/// Applies every pending migration; idempotent.
pub async fn migrate(pool: &PgPool) -> Result<(), Error> {
    MIGRATOR.run(pool).await.map_err(Error::Migrate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("postgres://fleetban:s3cret@db:5432/fleetban"),
            "postgres://fleetban:***@db:5432/fleetban"
        );
        assert_eq!(redact_url("fleetban:s3cret@db/fleetban"), "fleetban:***@db/fleetban");
        assert_eq!(redact_url("postgres://db/x?user=a&password=s3cret"), "postgres://db/x?user=a&password=***");
        assert_eq!(redact_url("postgres://fleetban@db/x"), "postgres://fleetban@db/x");
    }

    #[test]
    fn libpq_multi_host_urls_are_refused_with_what_to_do() {
        for url in [
            "postgres://fleetban:pw@db1:5432,db2:5432/fleetban",
            "postgres://fleetban@db1,db2/fleetban",
            "postgres://fleetban@db1/fleetban?target_session_attrs=read-write",
        ] {
            let error = parse_url(url).unwrap_err().to_string();
            assert!(error.contains("writable primary") && !error.contains("pw"), "{url}: {error}");
        }
        assert!(parse_url("postgres://fleetban:a,b@db-primary.example:5432/fleetban").is_ok(), "a comma in a password");
    }

    #[test]
    fn a_url_without_the_scheme_says_what_is_expected() {
        for url in ["fleetban:s3cret@db.example/fleetban", "db.example:5432/fleetban", "mysql://u:s3cret@db/x", ""] {
            let message = parse_url(url).unwrap_err().to_string();
            assert!(message.contains("postgres://"), "{url}: {message}");
            assert!(message.contains(URL_FORM), "{url}: {message}");
            assert!(!message.contains("s3cret"), "{url}: {message}");
        }
        assert!(parse_url("postgresql://u:p@db.example:5433/x").is_ok());
    }

    #[tokio::test]
    async fn an_unreachable_database_names_the_address_and_the_cause() {
        // Nothing listens on port 1 of loopback.
        let error = connect("postgres://fleetban:s3cret@127.0.0.1:1/fleetban", 2).await.unwrap_err();
        let message = error.to_string();
        assert!(message.contains("postgres://fleetban@127.0.0.1:1/fleetban"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
        assert!(!message.contains("pool timed out"), "{message}");
        let Error::Connect { hint: given, .. } = error else { panic!("{message}") };
        assert_eq!(given, hint(&sqlx::Error::Io(std::io::ErrorKind::ConnectionRefused.into())), "{message}");
    }

    #[test]
    fn lost_connections_are_unavailability_and_bad_statements_are_not() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::Protocol("x".into())));
    }
}
