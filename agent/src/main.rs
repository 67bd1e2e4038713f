//! `fleetban-agent`: parses arguments and hands over to the library.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use fleetban_agent::backfill::{self, ProgressMode};
use fleetban_agent::bench::{self, BenchOptions};
use fleetban_agent::config::{AgentConfig, DEFAULT_PATH};
use fleetban_agent::parse::{LogKind, Timezone, genlog, report};
use fleetban_agent::run::{self, LogLineParser};
use fleetban_agent::status;

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
    /// Run the agent: follow the configured logs, parse and spool events.
    Run(ConfigArgs),
    /// Print the agent's state as JSON (works whether or not it runs).
    Status(ConfigArgs),
    /// Validate a configuration file: exits non-zero and names the offending
    /// key on an error; warnings (host-dependent) fail only with --strict.
    CheckConfig(CheckArgs),
    /// Import old log files (plain or .gz) into the spool; stop the agent first.
    Backfill(BackfillArgs),
    /// Parse Exim log files and print the events found.
    Parse(ParseArgs),
    /// Write a deterministic, realistic Exim main log (for benchmarks).
    GenLog(GenLogArgs),
    /// Enroll this host with the fleet server: trades a token for the agent's
    /// credentials (stored in the state directory, mode 0600) and prints the
    /// agent id.
    Enroll(EnrollArgs),
    /// Manage the local firewall.
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// Whether this host's firewall blocks an address, and because of which
    /// block (or that none does, and whether it is allowlisted).
    Why(WhyArgs),
    /// Measure file -> parse -> spool throughput and peak RSS.
    BenchIngest(BenchArgs),
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// Server gRPC URL (default: `server`, or the first of `servers` that
    /// answers, from the config file).
    #[arg(long, env = "FLEETBAN_SERVER", value_name = "URL")]
    server: Option<String>,
    /// Enrollment token from `fleetban-server enroll-token create`.
    #[arg(long, env = "FLEETBAN_ENROLL_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: String,
    /// Agent config file (for `state_dir`, `ca_file`, `addresses`); when the
    /// default file is absent, the defaults are used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Allow plaintext http:// to a server that is not on loopback.
    #[arg(long)]
    insecure: bool,
    /// The agent's name in the fleet (default: the host name). Enrolling
    /// again with the same name replaces this host's credentials; a name
    /// another host holds is refused.
    #[arg(long, env = "FLEETBAN_AGENT_NAME", value_name = "NAME")]
    name: Option<String>,
}

#[derive(Debug, Args)]
struct WhyArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The address.
    ip: std::net::IpAddr,
}

#[derive(Debug, Subcommand)]
enum FirewallCommand {
    /// What this host's firewall holds (read from the kernel, CSF or the
    /// dry-run file) and from which block: fleet (id, reason) or local,
    /// with expiries.
    List {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove every entry, set, table and rule fleetban created (the agent
    /// normally leaves its entries in place to expire by themselves).
    Flush {
        /// Agent config file.
        #[arg(long, value_name = "FILE", env = "FLEETBAN_AGENT_CONFIG", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// The agent configuration file.
    #[arg(long, value_name = "FILE", env = "FLEETBAN_AGENT_CONFIG", default_value = DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Fail on warnings too (missing files, firewall tools not installed).
    #[arg(long)]
    strict: bool,
    /// Skip the checks against this host (files, programs): for a file
    /// meant for another machine.
    #[arg(long)]
    no_host: bool,
}

#[derive(Debug, Args)]
struct BackfillArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log files to import, oldest first (gzip is detected).
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    from: Vec<PathBuf>,
    /// Format of the files: `exim` or `dovecot`.
    #[arg(long, value_name = "KIND", default_value = "exim")]
    kind: LogKind,
}

#[derive(Debug, Args)]
struct ParseArgs {
    /// Print one JSON object per event instead of a summary.
    #[arg(long)]
    json: bool,
    /// Time zone of timestamps without an offset: `local`, `UTC` or an IANA name.
    #[arg(long, value_name = "ZONE", default_value = "local")]
    tz: String,
    /// Format of the files: `exim` or `dovecot`.
    #[arg(long, value_name = "KIND", default_value = "exim")]
    kind: LogKind,
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

#[derive(Debug, Args)]
struct BenchArgs {
    /// Lines to generate with gen-log's generator.
    #[arg(long, default_value_t = 2_000_000)]
    lines: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Ingest this log instead of a generated one.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Working directory for the log and the spool (default: a temporary one).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Group-commit interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    fsync_ms: u64,
}

fn load(args: &ConfigArgs) -> anyhow::Result<AgentConfig> {
    Ok(AgentConfig::load(&args.config)?)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(fleetban_proto::stderr_log_colours())
        .init();
}

fn run_cmd(args: ConfigArgs) -> anyhow::Result<()> {
    let config = load(&args)?;
    init_tracing();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run::run(config, run::shutdown_signal()))?;
    Ok(())
}

fn status_cmd(args: ConfigArgs) -> anyhow::Result<()> {
    let config = load(&args)?;
    let status = status::collect(&config)?;
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &status)?;
    writeln!(out)?;
    Ok(())
}

fn check_config_cmd(args: CheckArgs) -> anyhow::Result<ExitCode> {
    use fleetban_agent::check;
    let path = &args.config.config;
    let config = match AgentConfig::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let findings = check::check(&config, !args.no_host);
    for finding in &findings {
        eprintln!("{finding}");
    }
    if check::failed(&findings, args.strict) {
        eprintln!("{}: invalid", path.display());
        return Ok(ExitCode::FAILURE);
    }
    let warnings = findings.len();
    println!("{}: OK ({warnings} warning{})", path.display(), if warnings == 1 { "" } else { "s" });
    Ok(ExitCode::SUCCESS)
}

fn backfill_cmd(args: BackfillArgs) -> anyhow::Result<()> {
    let config = load(&args.config)?;
    init_tracing();
    let mut parser = LogLineParser::new(args.kind, run::timezone(&config)?);
    let mut spool = run::open_spool(&config).context("stop the agent before a backfill")?;
    let stats = backfill::backfill_with(
        &mut spool,
        &args.from,
        &mut parser,
        1000,
        Duration::from_millis(config.spool.fsync_ms),
        ProgressMode::detect(),
        &config.aggregate,
    )?;
    eprintln!(
        "backfill: {} files, {} lines, {} events and {} context summaries in {} batches",
        stats.files, stats.lines, stats.events, stats.summaries, stats.batches
    );
    Ok(())
}

fn bench_cmd(args: BenchArgs) -> anyhow::Result<()> {
    let options = BenchOptions {
        lines: args.lines,
        seed: args.seed,
        input: args.input,
        dir: args.dir,
        fsync_interval: Duration::from_millis(args.fsync_ms),
    };
    let report = bench::bench_ingest(&options)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn parse_cmd(args: ParseArgs) -> anyhow::Result<()> {
    let tz = Timezone::from_config(&args.tz).with_context(|| format!("--tz {}", args.tz))?;
    let opts = report::ParseOptions { json: args.json, tz, kind: args.kind };
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

fn enroll_cmd(args: EnrollArgs) -> anyhow::Result<()> {
    use fleetban_agent::uplink::{self, ServerOptions};
    init_tracing();
    let default_path = std::path::Path::new(DEFAULT_PATH);
    let config = match &args.config {
        Some(path) => Some(AgentConfig::load(path)?),
        None if default_path.exists() => Some(AgentConfig::load(default_path)?),
        None => None,
    };
    let urls = match (&args.server, &config) {
        (Some(server), _) => vec![server.clone()],
        (None, Some(config)) => config.server_urls(),
        (None, None) => anyhow::bail!("no server: pass --server URL or set `server` (or `servers`) in the config file"),
    };
    let server = urls.join(", ");
    let state_dir = config.as_ref().map_or_else(|| PathBuf::from("/var/lib/fleetban"), |c| c.state_dir.clone());
    let addresses = fleetban_agent::host::own_addresses(config.as_ref());
    let servers: Vec<ServerOptions> = urls
        .iter()
        .map(|url| ServerOptions {
            server: url.clone(),
            ca_file: config.as_ref().and_then(|c| c.ca_file.clone()),
            insecure: args.insecure,
        })
        .collect();
    let options = servers.first().cloned().context("no server configured")?;
    let host_id = fleetban_agent::host::host_id(&state_dir)
        .with_context(|| format!("cannot keep the host id in {}", state_dir.display()))?;
    let hostname = fleetban_agent::host::hostname();
    let enrollment = uplink::Enrollment {
        token: &args.token,
        name: args.name.as_deref(),
        host_id: Some(&host_id),
        hostname: &hostname,
        addresses: &addresses,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let enrolled = runtime.block_on(uplink::enroll_any(&servers, &enrollment)).map_err(|error| {
        // One line: the error carries its causes; no source chain to print a
        // second time.
        let hint = error.hint(&options, true).map(|hint| format!("; {hint}")).unwrap_or_default();
        anyhow::anyhow!("enrollment with {server} failed: {error}{hint}")
    })?;
    let credentials = enrolled.credentials;
    let path = credentials
        .store(&state_dir)
        .with_context(|| format!("cannot store the credentials in {}", state_dir.display()))?;
    let name = args.name.as_deref().unwrap_or(&hostname);
    if enrolled.reenrolled {
        eprintln!(
            "Enrolled again as {name:?}: agent {} keeps its id and history, its old secret no longer works; \
             credentials stored in {}. Restart a running agent to use them.",
            credentials.agent_id,
            path.display()
        );
    } else {
        eprintln!("Enrolled as {name:?}; credentials stored in {}.", path.display());
    }
    println!("{}", credentials.agent_id);
    Ok(())
}

/// Reads the backend and joins it with the state file; `ip` = `why`.
fn inspect_cmd(config: &std::path::Path, json: bool, ip: Option<std::net::IpAddr>) -> anyhow::Result<()> {
    use fleetban_agent::firewall::inspect::{self, Known};
    use fleetban_agent::firewall::reconcile::Reconciler;
    use fleetban_agent::firewall::{Exec, backend_for, now_ms};
    let config = AgentConfig::load(config)?;
    let backend = backend_for(&config, Exec::default());
    let name = backend.name();
    let mut reconciler = Reconciler::new(backend, Vec::new(), Some(config.state_dir.clone()), Default::default());
    let actual = reconciler.read_actual().with_context(|| format!("cannot read the {name} firewall"))?;
    let mut exclude: Vec<ipnet::IpNet> = reconciler.exclusions().to_vec();
    exclude.extend(config.allowlist.cidrs.iter().map(|entry| entry.0));
    let known = Known {
        fleet: reconciler.fleet_blocks().collect(),
        local: reconciler.local_blocks().collect(),
        exclude: &exclude,
    };
    let now = now_ms();
    let held = inspect::list(actual, &known, now);
    let text = match ip {
        None if json => serde_json::to_string_pretty(&held)? + "\n",
        None => inspect::list_table(&held),
        Some(ip) => {
            let why = inspect::why(ip, &held, &known, now);
            if json { serde_json::to_string_pretty(&why)? + "\n" } else { inspect::why_text(&why) }
        }
    };
    io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

fn firewall_cmd(command: FirewallCommand) -> anyhow::Result<()> {
    use fleetban_agent::firewall::reconcile::Reconciler;
    init_tracing();
    use fleetban_agent::firewall::{Exec, backend_for};
    match command {
        FirewallCommand::List { config, json } => inspect_cmd(&config.config, json, None),
        FirewallCommand::Flush { config } => {
            let config = AgentConfig::load(&config)?;
            let backend = backend_for(&config, Exec::default());
            let name = backend.name();
            let mut reconciler =
                Reconciler::new(backend, Vec::new(), Some(config.state_dir.clone()), Default::default());
            reconciler.flush().with_context(|| format!("cannot flush the {name} firewall"))?;
            eprintln!("Removed every {name} entry fleetban held.");
            Ok(())
        }
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let done = match Cli::parse().command {
        Command::CheckConfig(args) => return check_config_cmd(args),
        Command::Run(args) => run_cmd(args),
        Command::Status(args) => status_cmd(args),
        Command::Backfill(args) => backfill_cmd(args),
        Command::Parse(args) => parse_cmd(args),
        Command::GenLog(args) => gen_log_cmd(args),
        Command::BenchIngest(args) => bench_cmd(args),
        Command::Enroll(args) => enroll_cmd(args),
        Command::Firewall(command) => firewall_cmd(command),
        Command::Why(args) => inspect_cmd(&args.config.config, args.json, Some(args.ip)),
    };
    done.map(|()| ExitCode::SUCCESS)
}
