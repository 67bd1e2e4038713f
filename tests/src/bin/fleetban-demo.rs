//! `fleetban-demo`: the whole fleet on one machine. See
//! [`fleetban_tests::demo`].

use std::time::Duration;

use clap::Parser;
use fleetban_tests::demo::{self, DemoOptions};

/// Runs an embedded Postgres, the server and simulated mail hosts with real
/// agents, replays a scripted attack and prints the timeline.
#[derive(Debug, Parser)]
#[command(name = "fleetban-demo")]
struct Cli {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Number of simulated hosts (mx1, mx2, ...), 2 to 16.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=16))]
    hosts: u16,
    /// Use this Postgres instead of an embedded one.
    #[arg(long, env = "FLEETBAN_DEMO_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

async fn stop_signal(deadline: Option<tokio::time::Instant>) {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "Cannot listen for Ctrl-C.");
            std::future::pending::<()>().await;
        }
    };
    match deadline {
        Some(deadline) => {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = ctrl_c => {}
            }
        }
        None => ctrl_c.await,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let options =
        DemoOptions { hosts: usize::from(cli.hosts), database_url: cli.database_url, ..DemoOptions::default() };
    let deadline = cli.duration.map(|secs| tokio::time::Instant::now() + Duration::from_secs(secs));
    demo::run(options, stop_signal(deadline)).await?;
    Ok(())
}
