//! `fleetban-server`: parses arguments and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fleetban_server::config::{Overrides, ServerConfig};
use fleetban_server::{api, asn, auth, db, notify, serve, table, tls};
use tracing::{info, warn};

/// The audit log's actor for changes made by `fleetban-server` commands.
const ADMIN_ACTOR: &str = "fleetban-server";

/// fleetban server: fleet-wide SMTP abuse correlation and blocklist push.
#[derive(Debug, Parser)]
#[command(name = "fleetban-server", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the configuration and the database come from.
#[derive(Debug, Args)]
struct Source {
    /// The server TOML (see deploy/server.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Postgres URL; overrides `database_url` in the config.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending database migrations (idempotent) and exit.
    Migrate {
        #[command(flatten)]
        source: Source,
    },
    /// Run the server: gRPC for agents, HTTP for operators.
    Serve {
        #[command(flatten)]
        source: Source,
        /// Address of the gRPC listener for agents (default 0.0.0.0:50051).
        #[arg(long)]
        grpc_listen: Option<SocketAddr>,
        /// Address of the HTTP listener: API, dashboard, health (default
        /// 127.0.0.1:8080).
        #[arg(long)]
        http_listen: Option<SocketAddr>,
        /// PEM certificate chain of the gRPC listener.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of the gRPC listener.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// PEM CA bundle: require agents to present a client certificate
        /// signed by it (mutual TLS).
        #[arg(long)]
        client_ca: Option<PathBuf>,
        /// Allow plaintext gRPC on a non-loopback listener.
        #[arg(long)]
        insecure: bool,
    },
    /// Check a configuration as `serve` would, without serving: every key,
    /// the database URL's form, plaintext rules and the TLS files; with
    /// `--connect` also the database. Exits non-zero naming the problem.
    CheckConfig {
        #[command(flatten)]
        source: Source,
        /// Allow plaintext gRPC on a non-loopback listener (as `serve --insecure`).
        #[arg(long)]
        insecure: bool,
        /// Also connect to the database.
        #[arg(long)]
        connect: bool,
    },
    /// Enrollment tokens for new agents.
    EnrollToken {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// A minimal PKI for fleets without their own.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// REST API tokens for operators, the CLI and the dashboard.
    Token {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
    /// The ASN database (abuse reports and attacker views show AS data).
    Asn {
        #[command(subcommand)]
        command: AsnCommand,
    },
    /// Replay past traffic of many hosts through detection and correlation
    /// with a candidate policy: what it would have blocked, when, on what
    /// evidence, and what the live policy did differently.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// The candidate policy: a server TOML whose [correlate] table is used.
    #[arg(long)]
    policy: PathBuf,
    /// The live policy to compare with (a server TOML); default: --config,
    /// else the shipped defaults.
    #[arg(long)]
    live_policy: Option<PathBuf>,
    /// One directory of Exim logs per host (the directory's name is the
    /// host's); a single log file also works.
    #[arg(long, num_args = 1.., required_unless_present = "from_db", conflicts_with = "from_db")]
    logs: Vec<PathBuf>,
    /// Replay the live store's events instead (read only).
    #[arg(long, requires = "since")]
    from_db: bool,
    /// With --from-db: how far back (`90m`, `24h`, `7d`).
    #[arg(long, value_parser = auth::parse_duration)]
    since: Option<Duration>,
    /// Where the live store is, for --from-db.
    #[command(flatten)]
    source: Source,
    /// A Postgres URL whose user may create databases: the replay works in
    /// throwaway databases there, dropped after. Default: the server of the
    /// live store (--config, --database-url or DATABASE_URL).
    #[arg(long, env = "FLEETBAN_SCRATCH_DATABASE_URL", hide_env_values = true)]
    scratch_database_url: Option<String>,
    /// The agent binary whose parser reads --logs. Default: `fleetban-agent`
    /// next to this binary, else on PATH.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Time zone of log stamps that carry none (IANA name).
    #[arg(long, default_value = "UTC")]
    tz: String,
    /// Exim's smtp_accept_max on the hosts; 0 = learn it as agents do.
    #[arg(long, default_value_t = 0)]
    smtp_accept_max: u32,
    /// Log time between two correlation steps, milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    step_ms: u64,
    /// Print JSON (candidate, live, difference) instead of the report.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it (it is shown only once).
    Create {
        #[command(flatten)]
        source: Source,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid (`90s`, `15m`, `24h`, `7d`).
        #[arg(long, visible_alias = "expires", default_value = "24h", value_parser = auth::parse_duration)]
        ttl: Duration,
        /// A note for the operator (who or what the token is for).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// List enrollment tokens (never the tokens themselves).
    List {
        #[command(flatten)]
        source: Source,
        /// Also expired, used-up and revoked ones.
        #[arg(long)]
        all: bool,
    },
    /// Revoke an enrollment token: no agent can enroll with it any more.
    Revoke {
        #[command(flatten)]
        source: Source,
        /// The token's id (from `list`).
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
enum ApiTokenCommand {
    /// Create an API token and print it once (only its hash is stored).
    Create {
        #[command(flatten)]
        source: Source,
        /// `admin` (read and write) or `read` (read only).
        #[arg(long, value_parser = ["admin", "read"])]
        role: String,
        /// Name shown in the audit log (default `<role>-<id>`).
        #[arg(long)]
        name: Option<String>,
        /// Expire after this long (`90s`, `15m`, `24h`, `30d`); default never.
        #[arg(long, value_parser = auth::parse_duration)]
        expires: Option<Duration>,
    },
    /// List API tokens (never the tokens themselves).
    List {
        #[command(flatten)]
        source: Source,
        /// Also expired and revoked ones.
        #[arg(long)]
        all: bool,
    },
    /// Revoke an API token: it authenticates nothing from now on.
    Revoke {
        #[command(flatten)]
        source: Source,
        /// The token's id (from `list`).
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
enum AsnCommand {
    /// Replace the ASN table with an iptoasn `ip2asn-combined.tsv` file.
    Import {
        #[command(flatten)]
        source: Source,
        /// The uncompressed TSV file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Write a CA (ca.pem, ca.key) and a server certificate (server.pem,
    /// server.key) into a directory; agents trust ca.pem.
    Init {
        /// Directory to write into (created if missing; existing files are
        /// never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// The name agents use to reach the server (DNS name or IP address).
        #[arg(long)]
        server_name: String,
    },
}

/// mimalloc: ingest allocates and frees large per-batch buffers (decoded
/// frames, COPY data) on every core; glibc's allocator spent a tenth of the
/// server's CPU consolidating them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries what commands print (tokens, paths).
    // Colours only on a terminal (journald stores the codes verbatim).
    // Postgres notices are not for operators (sessions also ask for warnings
    // only, see `db::connect`); sqlx's warnings (slow statements) stay.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(fleetban_proto::stderr_log_colours())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx::postgres::notice=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Replay(args) => replay(args).await?,
        Command::Migrate { source } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            info!("Migrations applied.");
        }
        Command::Serve { source, grpc_listen, http_listen, tls_cert, tls_key, client_ca, insecure } => {
            let overrides =
                Overrides { grpc_listen, http_listen, tls_cert, tls_key, client_ca, insecure, database_url: None };
            let cfg = resolve(&source, overrides)?;
            let tls = tls::server_config(cfg.tls.as_ref(), cfg.grpc_listen, cfg.insecure)?;
            let pool = db::connect(&database_url(&cfg)?, cfg.db_max_connections).await?;
            db::migrate(&pool).await?;
            let options = serve::Options {
                tls,
                correlate: cfg.policy(),
                heartbeat: Duration::from_secs(cfg.heartbeat_secs),
                retention: fleetban_server::retention::Retention {
                    events: Duration::from_secs(u64::from(cfg.events_retention_days) * 86_400),
                    change_log: Duration::from_secs(u64::from(cfg.change_log_retention_days) * 86_400),
                },
                limits: cfg.limits.clone(),
                proxy_protocol_from: cfg.proxy_protocol_from.clone(),
                max_event_age: Duration::from_secs(u64::from(cfg.max_event_age_days) * 86_400),
                feeds: std::sync::Arc::new(fleetban_server::feeds::Feeds::new(
                    cfg.feed.clone(),
                    cfg.geo.block_asn.clone(),
                )?),
                geo: std::sync::Arc::new(fleetban_server::geo::GeoPolicy::load(&cfg.geo)?),
                channels: fleetban_server::alerts::Channels::new(cfg.notify.clone()),
                alerts: cfg.alerts.clone(),
                replica: fleetban_server::replica::Replica::new(
                    cfg.replica_name.clone().unwrap_or_else(fleetban_server::replica::default_name),
                ),
                ..Default::default()
            };
            check_descriptors(&cfg);
            run(pool, options, cfg.grpc_listen, cfg.http_listen, shutdown_signal()).await?;
        }
        Command::CheckConfig { source, insecure, connect } => {
            let overrides = Overrides { insecure, ..Overrides::default() };
            let cfg = resolve(&source, overrides)?;
            let url = database_url(&cfg)?;
            tls::server_config(cfg.tls.as_ref(), cfg.grpc_listen, cfg.insecure)?;
            fleetban_server::geo::GeoPolicy::load(&cfg.geo)?;
            if connect {
                db::connect(&url, 2).await?;
            }
            let what = source.config.as_ref().map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
            println!("{what}: OK{}", if connect { " (database reachable)" } else { "" });
        }
        Command::EnrollToken { command: TokenCommand::Create { source, uses, ttl, note } } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            let token = auth::new_enrollment_token(&pool, uses, ttl, &note).await?;
            let detail = serde_json::json!({
                "uses": uses, "prefix": token.prefix, "expires_at": auth::rfc3339(token.expires_at), "note": note,
            });
            api::auth::audit(&pool, ADMIN_ACTOR, "enroll_token.create", &token.id.to_string(), detail).await?;
            info!(id = token.id, uses, ttl_secs = ttl.as_secs(), "Enrollment token created.");
            println!("{}", token.token);
        }
        Command::EnrollToken { command: TokenCommand::List { source, all } } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            let tokens = auth::list_enrollment_tokens(&pool, all).await?;
            let rows: Vec<Vec<String>> = tokens.iter().map(table::enroll_token_row).collect();
            print!("{}", table::table(table::ENROLL_TOKEN_HEADERS, &rows));
        }
        Command::EnrollToken { command: TokenCommand::Revoke { source, id } } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            auth::revoke_enrollment_token(&pool, id).await?;
            api::auth::audit(&pool, ADMIN_ACTOR, "enroll_token.revoke", &id.to_string(), serde_json::json!({})).await?;
            println!("Revoked enrollment token {id}.");
        }
        Command::Token { command: ApiTokenCommand::Create { source, role, name, expires } } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            let role = api::auth::Role::parse(&role).context("role must be admin or read")?;
            let token = api::auth::create_token_expiring(&pool, role, name.as_deref(), expires).await?;
            let detail = serde_json::json!({
                "id": token.id, "role": role.as_str(), "prefix": token.prefix,
                "expires_at": token.expires_at.map(auth::rfc3339),
            });
            api::auth::audit(&pool, ADMIN_ACTOR, "token.create", &token.name, detail).await?;
            let until = token.expires_at.map(|t| format!(", expires {}", auth::rfc3339(t))).unwrap_or_default();
            eprintln!("Created {} token {:?} (id {}{until}); it is shown only once:", token.role, token.name, token.id);
            println!("{}", token.token);
        }
        Command::Token { command: ApiTokenCommand::List { source, all } } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            let tokens = api::auth::list_tokens(&pool, all).await?;
            let rows: Vec<Vec<String>> = tokens.iter().map(table::api_token_row).collect();
            print!("{}", table::table(table::API_TOKEN_HEADERS, &rows));
        }
        Command::Token { command: ApiTokenCommand::Revoke { source, id } } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            let name = api::auth::revoke_token(&pool, id).await?;
            api::auth::audit(&pool, ADMIN_ACTOR, "token.revoke", &name, serde_json::json!({ "id": id })).await?;
            println!("Revoked API token {id} ({name:?}).");
        }
        Command::Asn { command: AsnCommand::Import { source, file } } => {
            let cfg = resolve(&source, Overrides::default())?;
            let pool = db::connect(&database_url(&cfg)?, 2).await?;
            db::migrate(&pool).await?;
            let reader = std::fs::File::open(&file).with_context(|| format!("open {}", file.display()))?;
            let stats = asn::import(&pool, std::io::BufReader::new(reader)).await?;
            let detail =
                serde_json::json!({ "ranges": stats.ranges, "unrouted": stats.unrouted, "malformed": stats.malformed });
            api::auth::audit(&pool, ADMIN_ACTOR, "asn.import", &file.display().to_string(), detail).await?;
            println!(
                "Imported {} ASN ranges ({} unrouted and {} malformed lines skipped).",
                stats.ranges, stats.unrouted, stats.malformed
            );
        }
        Command::Pki { command: PkiCommand::Init { dir, server_name } } => {
            let files = tls::pki_init(&dir, &server_name)?;
            println!("CA certificate (give to agents): {}", files.ca_cert.display());
            println!("CA key (keep offline):           {}", files.ca_key.display());
            println!("server certificate:              {}", files.server_cert.display());
            println!("server key:                      {}", files.server_key.display());
            println!(
                "serve with: fleetban-server serve --tls-cert {} --tls-key {}",
                files.server_cert.display(),
                files.server_key.display()
            );
        }
    }
    Ok(())
}

fn resolve(source: &Source, mut overrides: Overrides) -> anyhow::Result<ServerConfig> {
    overrides.database_url = source.database_url.clone();
    Ok(ServerConfig::resolve(source.config.as_deref(), overrides)?)
}

fn database_url(cfg: &ServerConfig) -> anyhow::Result<String> {
    cfg.database_url.clone().context("no database: set database_url in the config, DATABASE_URL, or --database-url")
}

async fn run(
    pool: sqlx::PgPool,
    options: serve::Options,
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
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    info!(grpc = %grpc_addr, http = %http_addr, tls = options.tls.is_some(), "fleetban-server listening.");
    // Migrations ran before the listeners were bound; connections queue on
    // them from here on, so the server is ready.
    notify::ready(&format!("Listening: gRPC {grpc_addr}, HTTP {http_addr}"));
    let shutdown = async move {
        shutdown.await;
        notify::stopping();
    };
    serve::run(pool, options, serve::Listeners { grpc, http }, shutdown).await?;
    info!("fleetban-server stopped.");
    Ok(())
}

/// Raises the soft descriptor limit to the hard one and warns when the
/// connection caps of `[limits]` could still exhaust it: a cap above the
/// limit would let connections take the descriptors the database pool and
/// the other listener need.
fn check_descriptors(cfg: &ServerConfig) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    let needed = u64::from(cfg.limits.grpc_max_connections)
        + u64::from(cfg.limits.http_max_connections)
        + u64::from(cfg.db_max_connections)
        + 64;
    if needed > soft {
        warn!(
            descriptors = soft,
            needed,
            "The descriptor limit is below limits.grpc_max_connections + limits.http_max_connections + the pool; \
             lower the caps or raise LimitNOFILE, or connections can exhaust descriptors."
        );
    }
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

/// `fleetban-server replay`.
async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    use fleetban_server::replay;
    use std::io::IsTerminal;

    let candidate =
        ServerConfig::load(&args.policy).with_context(|| format!("--policy {}", args.policy.display()))?.correlate;
    let live_path = args.live_policy.as_ref().or(args.source.config.as_ref());
    let live = match live_path {
        Some(path) => ServerConfig::load(path).with_context(|| format!("live policy {}", path.display()))?.correlate,
        None => fleetban_server::correlate::CorrelateConfig::default(),
    };
    let hosts = if args.from_db {
        let cfg = resolve(&args.source, Overrides::default())?;
        let pool = db::connect(&database_url(&cfg)?, 2).await?;
        let since = args.since.context("--from-db needs --since")?;
        replay::load_db(&pool, since).await?
    } else {
        let agent_bin = match &args.agent_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("fleetban-agent")))
                .filter(|bin| bin.is_file())
                .unwrap_or_else(|| PathBuf::from("fleetban-agent")),
        };
        let (logs, tz) = (args.logs.clone(), args.tz.clone());
        tokio::task::spawn_blocking(move || replay::load_logs(&logs, &agent_bin, &tz)).await??
    };
    let total: u64 = hosts.iter().map(|h| h.events.len() as u64).sum();
    info!(hosts = hosts.len(), events = total, "Replaying.");
    // The scratch databases are created on --scratch-database-url, else on
    // the live store's server (its user needs CREATEDB), and dropped after.
    let admin_url = match &args.scratch_database_url {
        Some(url) => url.clone(),
        None => resolve(&args.source, Overrides::default())?.database_url.context(
            "replay needs a Postgres where it may create scratch databases: pass --scratch-database-url, \
             or --config/--database-url/DATABASE_URL of a server whose user has CREATEDB",
        )?,
    };
    let options = replay::Options { step: Duration::from_millis(args.step_ms), smtp_accept_max: args.smtp_accept_max };
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total * 2)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} events ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("candidate");
    let candidate_out = replay::run_scratch(&admin_url, &hosts, &candidate, &options, &|n| bar.set_position(n)).await?;
    bar.set_message("live policy");
    let live_out = replay::run_scratch(&admin_url, &hosts, &live, &options, &|n| bar.set_position(total + n)).await?;
    bar.finish_and_clear();
    let diff = replay::Difference::of(&candidate_out, &live_out);
    if args.json {
        let json = serde_json::json!({ "candidate": candidate_out, "live": live_out, "difference": diff });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", replay::render(&candidate_out, &live_out, &diff));
    }
    Ok(())
}
