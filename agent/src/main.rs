//! `fleetban-agent`: parses arguments and hands over to the library.

use clap::Parser;

/// fleetban agent: tails the Exim log, blocks abusers locally, and streams
/// events to the fleet server.
#[derive(Debug, Parser)]
#[command(name = "fleetban-agent", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    println!("fleetban-agent {}", fleetban_agent::VERSION);
    Ok(())
}
