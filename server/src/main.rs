//! `fleetban-server`: parses arguments and hands over to the library.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetban_server::{api, asn, db, pgembed, serve};
use tracing::{info, warn};

/// fleetban server: fleet-wide SMTP abuse correlation and blocklist push.
#[derive(Debug, Parser)]
#[command(name = "fleetban-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending database migrations (idempotent) and exit.
    Migrate {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Run the server: gRPC for agents, HTTP for operators.
    Serve {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// Address of the HTTP listener (API, dashboard, health).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_listen: SocketAddr,
        /// Address of the gRPC listener for agents.
        #[arg(long, default_value = "0.0.0.0:50051")]
        grpc_listen: SocketAddr,
    },
    /// Manage REST API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage the ASN database.
    Asn {
        #[command(subcommand)]
        command: AsnCommand,
    },
    /// Run a self-contained demo: an embedded Postgres and the server on
    /// loopback.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Address of the HTTP listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_listen: SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it once (only its hash is stored).
    Create {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// `admin` (read and write) or `read` (read only).
        #[arg(long, value_parser = ["admin", "read"])]
        role: String,
        /// Name shown in the audit log (default `<role>-<id>`).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AsnCommand {
    /// Replace the ASN table with an iptoasn `ip2asn-combined.tsv` file.
    Import {
        /// Postgres URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// The uncompressed TSV file.
        file: std::path::PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().command {
        Command::Migrate { database_url } => {
            let pool = db::connect(&database_url, 2).await?;
            db::migrate(&pool).await?;
            info!("Migrations applied.");
        }
        Command::Serve { database_url, http_listen, grpc_listen } => {
            let pool = db::connect(&database_url, 32).await?;
            db::migrate(&pool).await?;
            run(pool, grpc_listen, http_listen, shutdown_signal()).await?;
        }
        Command::Token { command: TokenCommand::Create { database_url, role, name } } => {
            let pool = db::connect(&database_url, 2).await?;
            db::migrate(&pool).await?;
            let role = api::auth::Role::parse(&role).context("role must be admin or read")?;
            let token = api::auth::create_token(&pool, role, name.as_deref()).await?;
            eprintln!("Created {} token {:?} (id {}); it is shown only once:", token.role, token.name, token.id);
            println!("{}", token.token);
        }
        Command::Asn { command: AsnCommand::Import { database_url, file } } => {
            let pool = db::connect(&database_url, 2).await?;
            db::migrate(&pool).await?;
            let reader = std::fs::File::open(&file).with_context(|| format!("open {}", file.display()))?;
            let stats = asn::import(&pool, std::io::BufReader::new(reader)).await?;
            println!(
                "Imported {} ASN ranges ({} unrouted and {} malformed lines skipped).",
                stats.ranges, stats.unrouted, stats.malformed
            );
        }
        Command::Demo { duration, http_listen } => {
            let pg = tokio::task::spawn_blocking(pgembed::EmbeddedPostgres::start)
                .await
                .context("embedded postgres start task")??;
            let pool = db::connect(&pg.url(), 16).await?;
            db::migrate(&pool).await?;
            println!("fleetban demo: embedded Postgres at {}", pg.url());
            println!("fleetban demo: health at http://{http_listen}/healthz");
            println!(
                "fleetban demo: simulated agents and the scripted attack are not implemented yet; \
                 the server runs until Ctrl-C{}",
                duration.map(|d| format!(" or {d} s")).unwrap_or_default()
            );
            let stop = async move {
                match duration {
                    Some(secs) => {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(secs)) => {}
                            _ = shutdown_signal() => {}
                        }
                    }
                    None => shutdown_signal().await,
                }
            };
            run(pool, "127.0.0.1:0".parse()?, http_listen, stop).await?;
            drop(pg);
            println!("fleetban demo: stopped, embedded Postgres removed");
        }
    }
    Ok(())
}

async fn run(
    pool: sqlx::PgPool,
    grpc_listen: SocketAddr,
    http_listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grpc = tokio::net::TcpListener::bind(grpc_listen)
        .await
        .with_context(|| format!("bind gRPC listener {grpc_listen}"))?;
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .with_context(|| format!("bind HTTP listener {http_listen}"))?;
    info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "fleetban-server listening.");
    serve::run(pool, grpc, http, shutdown).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(error) => {
            warn!(%error, "Cannot listen for SIGTERM; only Ctrl-C stops the server.");
            let _ = ctrl_c.await;
        }
    }
}
