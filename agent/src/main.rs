//! `fleetban-agent`: parses arguments and hands over to the library.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use fleetban_agent::parse::{Timezone, genlog, report};

/// fleetban agent: tails the Exim log, blocks abusers locally, and streams
/// events to the fleet server.
#[derive(Debug, Parser)]
#[command(name = "fleetban-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse Exim log files and print the events found.
    Parse(ParseArgs),
    /// Write a deterministic, realistic Exim main log (for benchmarks).
    GenLog(GenLogArgs),
}

#[derive(Debug, Args)]
struct ParseArgs {
    /// Print one JSON object per event instead of a summary.
    #[arg(long)]
    json: bool,
    /// Time zone of timestamps without an offset: `local`, `UTC` or an IANA name.
    #[arg(long, value_name = "ZONE", default_value = "local")]
    tz: String,
    /// Log files to read (`-` for stdin; gzip is detected and decompressed).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct GenLogArgs {
    /// Number of lines to write.
    #[arg(long)]
    lines: u64,
    /// Seed; the same seed always gives the same log.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file (default: stdout).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

fn parse_cmd(args: ParseArgs) -> anyhow::Result<()> {
    let tz = Timezone::from_config(&args.tz).with_context(|| format!("--tz {}", args.tz))?;
    let opts = report::ParseOptions { json: args.json, tz };
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let stats = report::run(&args.files, &opts, &mut out)?;
    eprintln!("{}", report::stats_line(&stats));
    Ok(())
}

fn gen_log_cmd(args: GenLogArgs) -> anyhow::Result<()> {
    let out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(File::create(path).with_context(|| format!("cannot create {}", path.display()))?),
        None => Box::new(io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(1 << 16, out);
    let stats = genlog::write_log(args.lines, args.seed, &mut out).context("cannot write the log")?;
    eprintln!("lines={} bytes={}", stats.lines, stats.bytes);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Parse(args) => parse_cmd(args),
        Command::GenLog(args) => gen_log_cmd(args),
    }
}
