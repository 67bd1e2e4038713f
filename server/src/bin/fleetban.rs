//! `fleetban`: the operator CLI. Parses arguments and hands over to
//! [`fleetban_server::cli`]; prints the result, or one line of error and
//! exits 1.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use fleetban_server::cli::{self, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(&cli).await {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            // A closed pipe (`fleetban events | head`) is not an error.
            let _ = stdout.write_all(output.as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("fleetban: {error}");
            ExitCode::FAILURE
        }
    }
}
