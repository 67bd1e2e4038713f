//! `fleetban`: the operator CLI, a typed client of the REST API.
//!
//! `fleetban --url URL --token T <command>` (or `FLEETBAN_URL`,
//! `FLEETBAN_TOKEN`). Every command is one or a few API calls whose answers
//! are read into the API's own response types ([`fleetban_server::api`]), so
//! the OpenAPI and API tests guard the CLI too; the output is an aligned
//! table, or the API's JSON as received with `--json` for scripts. Any
//! failure is one [`CliError`] whose message fits one line; the binary
//! prints it and exits 1.
//!
//! Agent names, host names, raw log lines, user names and notes come from
//! agents and mail clients: every table cell and every other text printed
//! for a terminal goes through [`fleetban_server::text::escape`], so a
//! control character shows as `\n` or `\u{1b}` instead of acting on the
//! terminal. `--json` prints the API's JSON as it is (JSON escapes control
//! characters itself).

mod feeds;
mod kinds;
mod lifecycle;
mod ranges;
mod transfer;

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fleetban_server::api::agents::Agent;
use fleetban_server::api::allowlist::AllowEntry;
use fleetban_server::api::attackers::{Attacker, AttackerDetail, BlockRef};
use fleetban_server::api::blocks::{Block, CreateBlock};
use fleetban_server::api::error::ErrorBody;
use fleetban_server::api::events::Event;
use fleetban_server::api::shadow::ShadowDecision;
use fleetban_server::api::stats::Stats;
use fleetban_server::asn::AsnInfo;
use fleetban_server::table::table;
use fleetban_server::text::{escape, one_line};
use fleetban_server::timefmt;
use ipnet::IpNet;
use reqwest::{Method, StatusCode};
mod notify;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// A call without a request body.
const NO_BODY: Option<&Value> = None;

/// Timeout of one API call.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// fleetban operator CLI: inspect the fleet, block and unblock, report abuse.
#[derive(Debug, Parser)]
#[command(name = "fleetban", version)]
pub struct Cli {
    /// Base URL of the fleetban server's HTTP listener.
    #[arg(long, env = "FLEETBAN_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// API token (`fleetban-server token create`).
    #[arg(long, env = "FLEETBAN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List agents; or rename, revoke or remove one.
    Agents {
        /// Without a command: list the fleet's agents.
        #[command(subcommand)]
        command: Option<lifecycle::AgentsCommand>,
    },
    /// API tokens: list, create, revoke.
    Tokens {
        /// What to do.
        #[command(subcommand)]
        command: lifecycle::TokensCommand,
    },
    /// Enrollment tokens for agents: list, create, revoke.
    EnrollToken {
        /// What to do.
        #[command(subcommand)]
        command: lifecycle::EnrollTokenCommand,
    },
    /// The audit log (who did what, when, to what), newest first.
    Audit {
        /// Since (`1h`, `24h`, `7d` or RFC 3339).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only this action (`agent.remove`), or a prefix ending in a dot (`agent.`).
        #[arg(long)]
        action: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// List live blocks (`--all`: also expired and removed ones).
    Blocks {
        /// Include expired and removed blocks.
        #[arg(long)]
        all: bool,
        /// Only blocks containing this address or range.
        #[arg(long)]
        contains: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// What rules in shadow mode would have blocked (nothing was).
    Shadow {
        /// Decided since (`1h`, `24h`, `7d` or RFC 3339).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only this rule (`auth`, `slot_exhaustion`, `prefix`, ...).
        #[arg(long)]
        rule: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Block an address or range on every agent.
    Block {
        /// Address or CIDR.
        cidr: String,
        /// Lifetime (`90s`, `30m`, `6h`, `7d`); default permanent.
        #[arg(long)]
        ttl: Option<String>,
        /// Why.
        #[arg(long)]
        reason: String,
        /// Allow a range broader than the configured minimum prefix.
        #[arg(long)]
        force: bool,
    },
    /// Remove a block by id, or every live block of a range; an address
    /// only covered by a wider block names it (`--carve` exempts the address).
    Unblock {
        /// Block id or CIDR.
        target: String,
        /// When a wider block covers the target, add an allowlist entry for
        /// the target instead (for the covering blocks' remaining time).
        #[arg(long)]
        carve: bool,
        /// Lifetime of the `--carve` exemption (`90s`, `30m`, `6h`, `7d`).
        #[arg(long)]
        ttl: Option<String>,
        /// Do not ask for confirmation on a terminal.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Allowlist a range (live blocks overlapping it are not enforced inside
    /// it until it is removed).
    Allow {
        /// Address or CIDR.
        cidr: String,
        /// Why.
        #[arg(long, default_value = "")]
        note: String,
        /// Lifetime (`6h`, `30d`); default permanent.
        #[arg(long)]
        ttl: Option<String>,
        /// Allow a range broader than the minimum block prefix (/16, /32).
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation on a terminal.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// List the allowlist.
    Allowlist,
    /// Remove a range from the allowlist.
    Unallow {
        /// The CIDR as listed.
        cidr: String,
        /// Do not ask for confirmation on a terminal.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Import blocks and allowlist entries in bulk, in one transaction.
    Import {
        /// The file.
        file: std::path::PathBuf,
        /// `plain`, `csv`, `json`, `csf-deny` (into the blocklist) or
        /// `csf-allow` (into the allowlist).
        #[arg(long, default_value = "plain")]
        format: String,
        /// Where rows without a list go (`block` or `allow`; default block).
        #[arg(long)]
        list: Option<String>,
        /// Report what the import would do; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Import ranges broader than /16 (IPv4) or /32 (IPv6) too.
        #[arg(long)]
        force: bool,
        /// Reason of rows that carry none.
        #[arg(long)]
        reason: Option<String>,
        /// Lifetime of rows that carry none (`6h`, `30d`); default permanent.
        #[arg(long)]
        ttl: Option<String>,
        /// Do not ask for confirmation on a terminal.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Export the live blocklist and allowlist (re-importable).
    Export {
        /// `plain`, `csv`, `json`, `csf-deny` or `csf-allow`.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Only `block` or `allow` entries.
        #[arg(long)]
        list: Option<String>,
    },
    /// Attacking addresses ranked by hosts hit and events.
    Attackers {
        /// Seen since (`1h`, `24h`, `7d` or RFC 3339).
        #[arg(long, default_value = "24h")]
        since: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One address: evidence per host, timeline, blocks.
    Attacker {
        /// The address.
        ip: String,
    },
    /// Stored events, newest first.
    Events {
        /// Remote address or range.
        #[arg(long)]
        ip: Option<String>,
        /// Agent id or name.
        #[arg(long)]
        agent: Option<String>,
        /// Event kind.
        #[arg(long, value_parser = kinds::parser())]
        kind: Option<String>,
        /// Since (`1h` or RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print the abuse report for an address or range.
    Report {
        /// Address or CIDR.
        target: String,
        /// Replace our own host names and addresses.
        #[arg(long)]
        redact: bool,
    },
    /// Fleet statistics.
    Stats,
    /// Blocklist feeds and ASN block rules with their status.
    Feeds,
    /// Act on one blocklist feed.
    Feed {
        #[command(subcommand)]
        command: feeds::FeedCommand,
    },
    /// Notification channels with their queues; `notify test NAME` sends a
    /// test message.
    Notify {
        /// Without a command: list the channels.
        #[command(subcommand)]
        command: Option<notify::NotifyCommand>,
    },
}

/// Why a command failed; every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No token was given.
    #[error("no API token: pass --token or set FLEETBAN_TOKEN")]
    NoToken,
    /// The URL is not usable.
    #[error("bad --url {0:?}: expected http://host:port or https://host:port")]
    BadUrl(String),
    /// A command-line value is invalid.
    #[error("{0}")]
    BadArgument(String),
    /// The server could not be reached or did not answer.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The server URL.
        url: String,
        /// What went wrong, on one line.
        reason: String,
    },
    /// The API answered with an error.
    #[error("{status} {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
    /// The API answered something that is not the expected JSON.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
}

/// An API client.
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(cli: &Cli) -> Result<Self, CliError> {
        let base = cli.url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) || reqwest::Url::parse(&base).is_err() {
            return Err(CliError::BadUrl(cli.url.clone()));
        }
        let token = cli.token.clone().filter(|t| !t.trim().is_empty()).ok_or(CliError::NoToken)?;
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .user_agent(concat!("fleetban-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Unreachable { url: base.clone(), reason: one_line(&e) })?;
        Ok(Client { http, base, token: token.trim().to_owned() })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<reqwest::Response, CliError> {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token).query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response =
            request.send().await.map_err(|e| CliError::Unreachable { url: self.base.clone(), reason: one_line(&e) })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|body| body.error.message)
            .unwrap_or_else(|_| text.lines().next().unwrap_or_default().to_owned());
        let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
        Err(CliError::Api { status: status.as_u16(), message: format!("{reason}: {}", escape(&message)) })
    }

    /// Calls the API: its JSON as received (for `--json`, ending in a line
    /// break) and read into the API's response type `T`.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<(String, T), CliError> {
        let response = self.send(method, path, query, body).await?;
        let mut text = response.text().await.map_err(|e| CliError::Decode(one_line(&e)))?;
        let value = serde_json::from_str(&text).map_err(|e| CliError::Decode(one_line(&e)))?;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        Ok((text, value))
    }

    /// `GET path`: see [`Client::call`].
    async fn get_as<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<(String, T), CliError> {
        self.call(Method::GET, path, query, NO_BODY).await
    }

    /// A call whose answer has no body (`204 No Content`).
    async fn call_empty(&self, method: Method, path: &str, query: &[(&str, String)]) -> Result<(), CliError> {
        let response = self.send(method, path, query, NO_BODY).await?;
        if response.status() != StatusCode::NO_CONTENT {
            return Err(CliError::Decode(format!("expected no content, got {}", response.status())));
        }
        Ok(())
    }
}

/// Parses `90s`, `30m`, `6h`, `7d`, `2w` or bare seconds; zero is refused.
pub fn parse_duration(value: &str) -> Option<Duration> {
    fleetban_server::units::positive_duration(value).ok()
}

fn ttl_secs(ttl: Option<&str>) -> Result<Option<u64>, CliError> {
    ttl.map(|t| {
        parse_duration(t)
            .map(|d| d.as_secs())
            .ok_or_else(|| CliError::BadArgument(format!("bad --ttl {t:?}: expected e.g. 90s, 30m, 6h, 7d")))
    })
    .transpose()
}

/// A time as a table cell: relative on a terminal, else UTC with the zone
/// ([`timefmt`]).
fn when(at: OffsetDateTime) -> String {
    timefmt::cell(Some(at))
}

/// An optional time as a table cell (`-` for none).
fn when_opt(at: Option<OffsetDateTime>) -> String {
    timefmt::cell(at)
}

/// An expiry as a table cell (`never` for none).
fn expiry(at: Option<OffsetDateTime>) -> String {
    at.map_or_else(|| "never".to_owned(), when)
}

/// An optional value as a table cell (`-` for none).
fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Values as one cell, comma-separated.
fn list<T: ToString>(values: &[T]) -> String {
    values.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// A value as `--json` prints what the CLI itself says (pretty JSON).
fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// An address or CIDR argument, canonical (host bits cleared).
fn cidr_arg(value: &str) -> Result<IpNet, CliError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    value
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| CliError::BadArgument(format!("{value:?} is not an IP address or CIDR")))
}

fn asn_text(asn: Option<&AsnInfo>) -> String {
    let Some(asn) = asn else { return "-".to_owned() };
    let country = if asn.country.is_empty() { String::new() } else { format!(" ({})", asn.country) };
    format!("AS{} {}{country}", asn.asn, asn.name)
}

/// Columns of a block listing.
const BLOCK_HEADERS: &[&str] = &["ID", "CIDR", "SOURCE", "ACTIVE", "CREATED", "EXPIRES", "HOSTS", "EVENTS", "REASON"];

/// One row of a block listing.
fn block_row(b: &Block) -> Vec<String> {
    vec![
        b.id.to_string(),
        b.cidr.to_string(),
        b.source.clone(),
        match (b.active, b.suppressed.as_deref()) {
            (false, _) => "no".into(),
            (true, Some("whole")) => "allowlisted".into(),
            (true, Some(_)) => "partly".into(),
            (true, None) => "yes".into(),
        },
        when(b.created_at),
        expiry(b.expires_at),
        b.evidence.agents.to_string(),
        b.evidence.events.to_string(),
        b.reason.clone(),
    ]
}

/// One row of a block listing from an attacker's page (no evidence counts).
fn block_ref_row(b: &BlockRef) -> Vec<String> {
    vec![
        b.id.to_string(),
        b.cidr.to_string(),
        b.source.clone(),
        if b.active { "yes" } else { "no" }.to_owned(),
        when(b.created_at),
        expiry(b.expires_at),
        "-".to_owned(),
        "-".to_owned(),
        b.reason.clone(),
    ]
}

/// Runs one command; returns what to print on standard output.
pub async fn run(cli: &Cli) -> Result<String, CliError> {
    let client = Client::new(cli)?;
    let json = cli.json;
    match &cli.command {
        Command::Agents { command: Some(command) } => lifecycle::agents(&client, json, command).await,
        Command::Tokens { command } => lifecycle::tokens(&client, json, command).await,
        Command::Feeds => feeds::list(&client, json).await,
        Command::Feed { command } => feeds::feed(&client, json, command).await,
        Command::EnrollToken { command } => lifecycle::enroll_tokens(&client, json, command).await,
        Command::Audit { since, action, limit } => {
            lifecycle::audit(&client, json, since, action.as_deref(), *limit).await
        }
        Command::Agents { command: None } => {
            let (raw, agents) = client.get_as::<Vec<Agent>>("/api/v1/agents", &[]).await?;
            if json {
                return Ok(raw);
            }
            let rows: Vec<Vec<String>> = agents
                .iter()
                .map(|a| {
                    let state = if a.revoked_at.is_some() {
                        "revoked"
                    } else if a.connected {
                        "online"
                    } else {
                        "offline"
                    };
                    vec![
                        a.id.to_string(),
                        a.name.clone(),
                        a.hostname.clone(),
                        state.to_owned(),
                        a.version.clone(),
                        when_opt(a.last_seen),
                        a.blocklist_version.to_string(),
                        a.firewall_entries.to_string(),
                        list(&a.addresses),
                    ]
                })
                .collect();
            Ok(table(
                &["ID", "NAME", "HOSTNAME", "STATE", "VERSION", "LAST SEEN", "BLOCKLIST", "FW", "ADDRESSES"],
                &rows,
            ))
        }
        Command::Blocks { all, contains, limit } => {
            let mut query = vec![("active", (!all).to_string()), ("limit", limit.to_string())];
            if let Some(c) = contains {
                query.push(("contains", c.clone()));
            }
            let (raw, blocks) = client.get_as::<Vec<Block>>("/api/v1/blocks", &query).await?;
            Ok(if json { raw } else { table(BLOCK_HEADERS, &blocks.iter().map(block_row).collect::<Vec<_>>()) })
        }
        Command::Shadow { since, rule, limit } => {
            let mut query = vec![("since", since.clone()), ("limit", limit.to_string())];
            if let Some(rule) = rule {
                query.push(("rule", rule.clone()));
            }
            let (raw, decisions) = client.get_as::<Vec<ShadowDecision>>("/api/v1/shadow", &query).await?;
            if json {
                return Ok(raw);
            }
            let rows: Vec<Vec<String>> = decisions
                .iter()
                .map(|d| {
                    // The evidence is the rule's own record (an object
                    // whose fields depend on the rule).
                    let ev = &d.evidence;
                    let why = ev
                        .get("verdict")
                        .and_then(Value::as_str)
                        .filter(|v| !v.is_empty())
                        .or_else(|| ev.get("local").and_then(|l| l.get("evidence")).and_then(Value::as_str))
                        .unwrap_or_default()
                        .to_owned();
                    vec![when(d.decided_at), d.cidr.to_string(), d.rule.clone(), d.source.clone(), why]
                })
                .collect();
            Ok(table(&["DECIDED (UTC)", "RANGE", "RULE", "SOURCE", "EVIDENCE"], &rows))
        }
        Command::Block { cidr, ttl, reason, force } => {
            let body = CreateBlock {
                cidr: cidr.clone(),
                ttl_secs: ttl_secs(ttl.as_deref())?,
                reason: reason.clone(),
                force: *force,
            };
            let (raw, block) = client.call::<Block>(Method::POST, "/api/v1/blocks", &[], Some(&body)).await?;
            if json {
                return Ok(raw);
            }
            let expires = match block.expires_at {
                None => "permanent".into(),
                Some(at) => format!("until {} UTC", when(at)),
            };
            Ok(format!("Blocked {} (block {}, {expires}).\n", block.cidr, block.id))
        }
        Command::Unblock { target, carve, ttl, yes } => {
            ranges::unblock(&client, target, *carve, ttl.as_deref(), *yes, json).await
        }
        Command::Allow { cidr, note, ttl, force, yes } => {
            ranges::allow(&client, cidr, note, ttl.as_deref(), *force, *yes, json).await
        }
        Command::Allowlist => {
            let (raw, entries) = client.get_as::<Vec<AllowEntry>>("/api/v1/allowlist", &[]).await?;
            if json {
                return Ok(raw);
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.id.to_string(),
                        e.cidr.to_string(),
                        when(e.created_at),
                        expiry(e.expires_at),
                        opt(e.created_by.as_deref()),
                        e.note.clone(),
                    ]
                })
                .collect();
            Ok(table(&["ID", "CIDR", "ADDED", "EXPIRES", "BY", "NOTE"], &rows))
        }
        Command::Unallow { cidr, yes } => ranges::unallow(&client, cidr, *yes, json).await,
        Command::Import { file, format, list, dry_run, force, reason, ttl, yes } => {
            transfer::import(
                &client,
                file,
                format,
                list.as_deref(),
                *dry_run,
                *force,
                reason.as_deref(),
                ttl.as_deref(),
                *yes,
                json,
            )
            .await
        }
        Command::Export { format, list } => transfer::export(&client, format, list.as_deref()).await,
        Command::Attackers { since, limit } => {
            let (raw, attackers) = client
                .get_as::<Vec<Attacker>>("/api/v1/attackers", &[("since", since.clone()), ("limit", limit.to_string())])
                .await?;
            if json {
                return Ok(raw);
            }
            let rows: Vec<Vec<String>> = attackers
                .iter()
                .map(|a| {
                    vec![
                        a.ip.to_string(),
                        a.hosts.to_string(),
                        a.events.to_string(),
                        if a.blocked { "yes" } else { "no" }.to_owned(),
                        when(a.first_seen),
                        when(a.last_seen),
                        asn_text(a.asn.as_ref()),
                        list(&a.kinds),
                    ]
                })
                .collect();
            Ok(table(&["IP", "HOSTS", "EVENTS", "BLOCKED", "FIRST SEEN", "LAST SEEN", "AS", "KINDS"], &rows))
        }
        Command::Attacker { ip } => {
            let ip: IpAddr = ip.parse().map_err(|_| CliError::BadArgument(format!("{ip:?} is not an IP address")))?;
            let (raw, detail) = client.get_as::<AttackerDetail>(&format!("/api/v1/attackers/{ip}"), &[]).await?;
            if json {
                return Ok(raw);
            }
            let mut out = String::new();
            let _ = writeln!(out, "{ip}  AS: {}", escape(&asn_text(detail.asn.as_ref())));
            if let Some(s) = &detail.summary {
                let _ = writeln!(
                    out,
                    "hosts {}  events {}  blocked {}  first {}  last {}",
                    s.hosts,
                    s.events,
                    if s.blocked { "yes" } else { "no" },
                    when(s.first_seen),
                    when(s.last_seen)
                );
            }
            out.push('\n');
            let rows: Vec<Vec<String>> = detail
                .hosts
                .iter()
                .map(|h| {
                    vec![
                        h.agent.clone(),
                        h.hostname.clone(),
                        h.kind.clone(),
                        h.events.to_string(),
                        when(h.first_seen),
                        when(h.last_seen),
                    ]
                })
                .collect();
            out.push_str(&table(&["AGENT", "HOSTNAME", "KIND", "EVENTS", "FIRST SEEN", "LAST SEEN"], &rows));
            if !detail.blocks.is_empty() {
                out.push('\n');
                out.push_str(&table(BLOCK_HEADERS, &detail.blocks.iter().map(block_ref_row).collect::<Vec<_>>()));
            }
            out.push_str("\nTimeline (newest first):\n");
            for e in &detail.timeline {
                let _ = writeln!(
                    out,
                    "  {}  {}  {} ({})",
                    escape(&when(e.time)),
                    escape(&e.agent),
                    escape(&e.kind),
                    escape(&e.service)
                );
                if let Some(raw) = &e.raw {
                    let _ = writeln!(out, "    {}", escape(raw));
                }
            }
            Ok(out)
        }
        Command::Events { ip, agent, kind, since, limit } => {
            let mut query = vec![("limit", limit.to_string())];
            for (key, value) in [("ip", ip), ("agent", agent), ("kind", kind), ("since", since)] {
                if let Some(value) = value {
                    query.push((key, value.clone()));
                }
            }
            let (raw, events) = client.get_as::<Vec<Event>>("/api/v1/events", &query).await?;
            if json {
                return Ok(raw);
            }
            let rows: Vec<Vec<String>> = events
                .iter()
                .map(|e| {
                    vec![
                        when(e.time),
                        e.agent.clone(),
                        e.kind.clone(),
                        e.service.clone(),
                        e.remote.to_string(),
                        opt(e.raw.as_deref()),
                    ]
                })
                .collect();
            Ok(table(&["TIME", "AGENT", "KIND", "SERVICE", "REMOTE", "RAW"], &rows))
        }
        Command::Report { target, redact } => {
            let response = client
                .send(
                    Method::GET,
                    "/api/v1/reports/abuse",
                    &[("target", target.clone()), ("redact", redact.to_string())],
                    NO_BODY,
                )
                .await?;
            let text = response.text().await.map_err(|e| CliError::Decode(one_line(&e)))?;
            if json {
                return Ok(pretty(&json!({ "target": target, "report": text })));
            }
            // The report is multi-line text: keep its line breaks, escape the
            // rest of each line.
            let mut out = String::with_capacity(text.len());
            for line in text.split_inclusive('\n') {
                let (body, newline) = line.strip_suffix('\n').map_or((line, ""), |body| (body, "\n"));
                out.push_str(&escape(body));
                out.push_str(newline);
            }
            Ok(out)
        }
        Command::Notify { command } => notify::run(&client, json, command.as_ref()).await,
        Command::Stats => {
            let (raw, stats) = client.get_as::<Stats>("/api/v1/stats", &[]).await?;
            if json {
                return Ok(raw);
            }
            let mut rows = vec![
                vec!["events/s (1 min)".to_owned(), format!("{:.2}", stats.events_per_sec_1m)],
                vec!["events/s (1 h)".to_owned(), format!("{:.2}", stats.events_per_sec_1h)],
                vec!["active blocks".to_owned(), stats.active_blocks.to_string()],
                vec!["agents connected".to_owned(), format!("{} / {}", stats.agents_connected, stats.agents_total)],
                vec!["blocklist version".to_owned(), stats.blocklist_version.to_string()],
                vec!["max versions behind".to_owned(), stats.max_versions_behind.to_string()],
                vec!["propagation lag".to_owned(), format!("{:.1} s", stats.propagation_lag_secs)],
            ];
            for (source, n) in &stats.blocks_by_source {
                rows.push(vec![format!("blocks ({source})"), n.to_string()]);
            }
            for (kind, n) in &stats.events_by_kind_1h {
                rows.push(vec![format!("events 1 h ({kind})"), n.to_string()]);
            }
            Ok(table(&["STAT", "VALUE"], &rows))
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_duration("6h"), Some(Duration::from_secs(21_600)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("6 hours"), None);
        assert!(ttl_secs(Some("soon")).is_err());
        assert_eq!(ttl_secs(None).unwrap(), None);
    }

    #[test]
    fn missing_token_and_bad_url_are_clear() {
        let cli = Cli::try_parse_from(["fleetban", "--url", "http://127.0.0.1:1", "agents"]).unwrap();
        let cli = Cli { token: None, ..cli };
        assert!(matches!(Client::new(&cli), Err(CliError::NoToken)));
        let cli = Cli::try_parse_from(["fleetban", "--url", "ftp://x", "--token", "t", "agents"]).unwrap();
        assert!(matches!(Client::new(&cli), Err(CliError::BadUrl(_))));
    }
}
