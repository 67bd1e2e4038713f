//! `fleetban agents rename|revoke|remove`, `fleetban tokens`, `fleetban
//! enroll-token` and `fleetban audit`: the life of identities and
//! credentials, over the same REST API as every other command.
//!
//! Revoking and removing ask for confirmation when standard input is a
//! terminal; anywhere else they need `--yes`, so a script never blocks on a
//! prompt and never acts without having said so. Agents are named by id or
//! by name (case-insensitive; an ambiguous name is refused with the ids to
//! choose from); tokens by id, API tokens also by name. Listings never show a
//! token, only its id and first characters.

use std::io::{BufRead, IsTerminal, Write};

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{CliError, Client, expiry, opt, parse_duration, pretty, when};
use fleetban_server::api::agents::{Agent, UpdateAgent};
use fleetban_server::api::audit::AuditEntry;
use fleetban_server::api::auth::{Role, TokenInfo};
use fleetban_server::api::tokens::{CreateEnrollToken, CreateToken, CreatedEnrollToken, CreatedToken};
use fleetban_server::auth::EnrollmentToken;
use fleetban_server::table::{API_TOKEN_HEADERS, ENROLL_TOKEN_HEADERS, api_token_row, enroll_token_row, table};
use fleetban_server::text::escape;

/// `fleetban agents ...`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Rename an agent; its id, credentials and history stay.
    Rename {
        /// Agent id or current name.
        agent: String,
        /// The new name.
        name: String,
    },
    /// Revoke an agent: its session is closed and its host cannot connect
    /// until the agent is removed and the host enrolls again.
    Revoke {
        /// Agent id or name.
        agent: String,
        /// Do not ask for confirmation (needed when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Remove an agent from the fleet: it is revoked, leaves the list and
    /// frees its name; its events, evidence and blocks stay.
    Remove {
        /// Agent id or name.
        agent: String,
        /// Do not ask for confirmation (needed when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// `fleetban tokens ...`: API tokens.
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// List API tokens (id, name, role, first characters, use, expiry).
    List {
        /// Also expired and revoked ones.
        #[arg(long)]
        all: bool,
    },
    /// Create an API token; it is printed once.
    Create {
        /// `admin` (read and write) or `read`.
        #[arg(long, value_parser = ["admin", "read"])]
        role: String,
        /// Name shown in the audit log (default `<role>-<id>`).
        #[arg(long)]
        name: Option<String>,
        /// Expire after this long (`12h`, `30d`, `2w`); default never.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Revoke an API token: it authenticates nothing from now on.
    Revoke {
        /// Token id, or its name. (Not called `token`: that is the global
        /// `--token` the CLI authenticates with.)
        #[arg(value_name = "ID|NAME")]
        which: String,
        /// Do not ask for confirmation (needed when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// `fleetban enroll-token ...`: tokens agents enroll with.
#[derive(Debug, Subcommand)]
pub enum EnrollTokenCommand {
    /// List enrollment tokens (id, first characters, uses left, expiry).
    List {
        /// Also expired, used-up and revoked ones.
        #[arg(long)]
        all: bool,
    },
    /// Create an enrollment token; it is printed once.
    Create {
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Expire after this long (`90m`, `24h`, `7d`).
        #[arg(long, default_value = "24h")]
        expires: String,
        /// Who or what it is for.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Revoke an enrollment token: no agent can enroll with it any more.
    Revoke {
        /// Token id.
        id: i64,
        /// Do not ask for confirmation (needed when not on a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// Columns of the audit log.
const AUDIT_HEADERS: &[&str] = &["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"];

/// `--expires` in seconds.
fn expires_secs(value: &str) -> Result<u64, CliError> {
    parse_duration(value)
        .map(|d| d.as_secs())
        .ok_or_else(|| CliError::BadArgument(format!("bad --expires {value:?}: expected e.g. 12h, 30d, 2w")))
}

/// Asks `question` on the terminal; without a terminal, `--yes` is needed.
fn confirm(question: &str, yes: bool) -> Result<(), CliError> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::BadArgument(format!("{question}: not confirmed; pass --yes when not on a terminal")));
    }
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{question} [y/N] ");
    let _ = stderr.flush();
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer).map_err(|e| CliError::BadArgument(format!("cannot read the answer: {e}")))?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(CliError::BadArgument("cancelled".to_owned()))
    }
}

/// An agent named by id or by name: its id and name.
async fn resolve_agent(client: &Client, target: &str) -> Result<(Uuid, String), CliError> {
    if let Ok(id) = target.parse::<Uuid>() {
        let (_, agent) = client.get_as::<Agent>(&format!("/api/v1/agents/{id}"), &[]).await?;
        return Ok((id, agent.name));
    }
    let (_, agents) = client.get_as::<Vec<Agent>>("/api/v1/agents", &[]).await?;
    let wanted = target.to_lowercase();
    let matches: Vec<(Uuid, String)> =
        agents.into_iter().filter(|a| a.name.to_lowercase() == wanted).map(|a| (a.id, a.name)).collect();
    match matches.as_slice() {
        [] => Err(CliError::Api {
            status: 404,
            message: format!("not found: no agent named {:?} (`fleetban agents` lists them)", escape(target)),
        }),
        [one] => Ok(one.clone()),
        several => Err(CliError::BadArgument(format!(
            "several agents are named {:?}: {}; give the id",
            escape(target),
            several.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Runs `fleetban agents <command>`.
pub(super) async fn agents(client: &Client, json: bool, command: &AgentsCommand) -> Result<String, CliError> {
    match command {
        AgentsCommand::Rename { agent, name } => {
            let (id, old) = resolve_agent(client, agent).await?;
            let (raw, renamed) = client
                .call::<Agent>(
                    Method::PATCH,
                    &format!("/api/v1/agents/{id}"),
                    &[],
                    Some(&UpdateAgent { name: name.clone() }),
                )
                .await?;
            if json {
                return Ok(raw);
            }
            Ok(format!("Renamed agent {id} from {:?} to {:?}.\n", escape(&old), escape(&renamed.name)))
        }
        AgentsCommand::Revoke { agent, yes } => {
            let (id, name) = resolve_agent(client, agent).await?;
            confirm(&format!("Revoke agent {:?} ({id}); its host can no longer connect?", escape(&name)), *yes)?;
            client.call_empty(Method::POST, &format!("/api/v1/agents/{id}/revoke"), &[]).await?;
            Ok(if json {
                pretty(&json!({ "revoked": id }))
            } else {
                format!("Revoked agent {:?} ({id}).\n", escape(&name))
            })
        }
        AgentsCommand::Remove { agent, yes } => {
            let (id, name) = resolve_agent(client, agent).await?;
            confirm(
                &format!("Remove agent {:?} ({id}) from the fleet; it is revoked and its name freed?", escape(&name)),
                *yes,
            )?;
            client.call_empty(Method::DELETE, &format!("/api/v1/agents/{id}"), &[]).await?;
            Ok(if json {
                pretty(&json!({ "removed": id }))
            } else {
                format!("Removed agent {:?} ({id}) from the fleet; its history stays.\n", escape(&name))
            })
        }
    }
}

/// Runs `fleetban tokens <command>`.
pub(super) async fn tokens(client: &Client, json: bool, command: &TokensCommand) -> Result<String, CliError> {
    match command {
        TokensCommand::List { all } => {
            let (raw, list) = client.get_as::<Vec<TokenInfo>>("/api/v1/tokens", &[("all", all.to_string())]).await?;
            if json {
                return Ok(raw);
            }
            let rows: Vec<Vec<String>> = list.iter().map(api_token_row).collect();
            Ok(table(API_TOKEN_HEADERS, &rows))
        }
        TokensCommand::Create { role, name, expires } => {
            let role = Role::parse(role).ok_or_else(|| CliError::BadArgument(format!("bad --role {role:?}")))?;
            let body =
                CreateToken { role, name: name.clone(), ttl_secs: expires.as_deref().map(expires_secs).transpose()? };
            let (raw, created) = client.call::<CreatedToken>(Method::POST, "/api/v1/tokens", &[], Some(&body)).await?;
            if json {
                return Ok(raw);
            }
            Ok(format!(
                "Created {} token {:?} (id {}, expires {}); it is shown only once:\n{}\n",
                created.role.as_str(),
                escape(&created.name),
                created.id,
                expiry(created.expires_at),
                created.token
            ))
        }
        TokensCommand::Revoke { which: token, yes } => {
            let (id, name) = match token.parse::<i64>() {
                Ok(id) => (id, None),
                Err(_) => {
                    let (_, list) = client.get_as::<Vec<TokenInfo>>("/api/v1/tokens", &[]).await?;
                    let ids: Vec<i64> = list.iter().filter(|t| t.name == *token).map(|t| t.id).collect();
                    match ids.as_slice() {
                        [] => {
                            return Err(CliError::Api {
                                status: 404,
                                message: format!("not found: no active token named {:?}", escape(token)),
                            });
                        }
                        [id] => (*id, Some(token.clone())),
                        several => {
                            return Err(CliError::BadArgument(format!(
                                "several active tokens are named {:?}: ids {}; give the id",
                                escape(token),
                                several.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
                            )));
                        }
                    }
                }
            };
            let label = match &name {
                Some(name) => format!("API token {id} ({:?})", escape(name)),
                None => format!("API token {id}"),
            };
            confirm(&format!("Revoke {label}; it authenticates nothing from now on?"), *yes)?;
            client.call_empty(Method::DELETE, &format!("/api/v1/tokens/{id}"), &[]).await?;
            Ok(if json { pretty(&json!({ "revoked": id })) } else { format!("Revoked {label}.\n") })
        }
    }
}

/// Runs `fleetban enroll-token <command>`.
pub(super) async fn enroll_tokens(
    client: &Client,
    json: bool,
    command: &EnrollTokenCommand,
) -> Result<String, CliError> {
    match command {
        EnrollTokenCommand::List { all } => {
            let (raw, list) =
                client.get_as::<Vec<EnrollmentToken>>("/api/v1/enroll-tokens", &[("all", all.to_string())]).await?;
            if json {
                return Ok(raw);
            }
            let rows: Vec<Vec<String>> = list.iter().map(enroll_token_row).collect();
            Ok(table(ENROLL_TOKEN_HEADERS, &rows))
        }
        EnrollTokenCommand::Create { uses, expires, note } => {
            let body =
                CreateEnrollToken { uses: Some(*uses), ttl_secs: Some(expires_secs(expires)?), note: note.clone() };
            let (raw, created) =
                client.call::<CreatedEnrollToken>(Method::POST, "/api/v1/enroll-tokens", &[], Some(&body)).await?;
            if json {
                return Ok(raw);
            }
            Ok(format!(
                "Created enrollment token {} for {} enrollment(s), expires {}; it is shown only once:\n{}\n",
                created.id,
                created.uses,
                when(created.expires_at),
                created.token
            ))
        }
        EnrollTokenCommand::Revoke { id, yes } => {
            confirm(&format!("Revoke enrollment token {id}; no agent can enroll with it any more?"), *yes)?;
            client.call_empty(Method::DELETE, &format!("/api/v1/enroll-tokens/{id}"), &[]).await?;
            Ok(if json { pretty(&json!({ "revoked": id })) } else { format!("Revoked enrollment token {id}.\n") })
        }
    }
}

/// Runs `fleetban audit`.
pub(super) async fn audit(
    client: &Client,
    json: bool,
    since: &str,
    action: Option<&str>,
    limit: u32,
) -> Result<String, CliError> {
    let mut query = vec![("since", since.to_owned()), ("limit", limit.to_string())];
    if let Some(action) = action {
        query.push(("action", action.to_owned()));
    }
    let (raw, log) = client.get_as::<Vec<AuditEntry>>("/api/v1/audit", &query).await?;
    if json {
        return Ok(raw);
    }
    let rows: Vec<Vec<String>> = log
        .iter()
        .map(|e| {
            let detail = match &e.detail {
                Value::Object(map) if map.is_empty() => "-".to_owned(),
                Value::Null => "-".to_owned(),
                other => other.to_string(),
            };
            vec![when(e.at), e.actor.clone(), e.action.clone(), opt(e.target.as_deref()), detail]
        })
        .collect();
    Ok(table(AUDIT_HEADERS, &rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_do_not_shadow_the_global_token() {
        use clap::Parser;
        let cli =
            super::super::Cli::try_parse_from(["fleetban", "--token", "fbt_x", "tokens", "revoke", "ci"]).unwrap();
        assert_eq!(cli.token.as_deref(), Some("fbt_x"));
        let super::super::Command::Tokens { command: TokensCommand::Revoke { which, yes } } = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!((which.as_str(), yes), ("ci", false));
    }

    #[test]
    fn confirmation_without_a_terminal_needs_yes() {
        assert!(confirm("Remove agent mx1?", true).is_ok());
        // Test runners give no terminal on standard input.
        if !std::io::stdin().is_terminal() {
            let error = confirm("Remove agent mx1?", false).unwrap_err();
            assert!(error.to_string().contains("--yes"), "{error}");
        }
    }
}
