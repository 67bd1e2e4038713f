//! `fleetban-smtp-sim`: an SMTP responder that writes Exim-format log lines,
//! used by the end-to-end tests in place of an Exim daemon.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fleetban_tests::smtp_sim::{SimConfig, serve};

/// SMTP responder writing Exim 4.96 log lines (+smtp_connection +incoming_port).
#[derive(Debug, Parser)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:25")]
    listen: SocketAddr,
    /// Log file to append to.
    #[arg(long)]
    log: PathBuf,
    /// Exim's smtp_accept_max.
    #[arg(long, default_value_t = 20)]
    max_connections: usize,
    /// Idle connections are closed after this many seconds.
    #[arg(long, default_value_t = 3)]
    idle_timeout_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind(cli.listen).with_context(|| format!("bind {}", cli.listen))?;
    let config =
        SimConfig { max_connections: cli.max_connections, idle_timeout: Duration::from_secs(cli.idle_timeout_secs) };
    serve(listener, &cli.log, config).with_context(|| format!("log {}", cli.log.display()))
}
