//! `unblock`, `allow` and `unallow`: the operator's actions that lift
//! blocks, and the confirmation every such action on a range asks for.
//!
//! - `unblock ID|ADDRESS|CIDR` removes the live blocks of exactly that
//!   range. An address only covered by a wider block is not silently left
//!   blocked: the error names the covering blocks (id, range, reason), and
//!   `--carve` adds an allowlist entry for the address instead, for the
//!   covering blocks' remaining time (the longest of them; permanent if one
//!   is) unless `--ttl` says otherwise.
//! - `allow` needs `--force` for a range broader than the minimum block
//!   prefix (/16 IPv4, /32 IPv6); the API enforces the same.
//! - Confirmation: when standard input is a terminal, an action on more than
//!   one address (a range, several blocks, or a bulk import) asks
//!   `Proceed? [y/N]` on standard error first; `--yes` skips the question.
//!   Without a terminal (scripts, pipes) the action proceeds as asked: a
//!   script has nobody to answer, and a CLI that blocked on a prompt would
//!   hang it.

use std::fmt::Write as _;
use std::io::{BufRead as _, IsTerminal as _, Write as _};

use ipnet::IpNet;
use reqwest::Method;
use serde_json::json;

use super::{CliError, Client, cidr_arg, list, pretty, ttl_secs, when};
use fleetban_server::api::allowlist::{Allowed, CreateAllow};
use fleetban_server::api::blocks::Block;
use fleetban_server::text::escape;

/// Whether `net` holds more than one address.
pub(crate) fn is_range(net: &IpNet) -> bool {
    net.prefix_len() < net.max_prefix_len()
}

/// Asks `question` on standard error when standard input is a terminal and
/// `yes` is not set; anything but `y`/`yes` aborts.
pub(crate) fn confirm(question: &str, yes: bool) -> Result<(), CliError> {
    let stdin = std::io::stdin();
    if yes || !stdin.is_terminal() {
        return Ok(());
    }
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{} Proceed? [y/N] ", escape(question));
    let _ = stderr.flush();
    let mut answer = String::new();
    if stdin.lock().read_line(&mut answer).is_err() {
        return Err(CliError::BadArgument("aborted: no answer".into()));
    }
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(CliError::BadArgument("aborted: nothing was changed".into())),
    }
}

/// What `unblock --carve` adds: an allowlist entry of the address for
/// `ttl_secs` (`None`: permanent).
/// `expiries` are the covering blocks' (`None`: permanent).
fn carve_ttl(expiries: &[Option<time::OffsetDateTime>], now: time::OffsetDateTime) -> Option<u64> {
    let mut longest: u64 = 0;
    for expires in expiries {
        match *expires {
            None => return None,
            Some(at) => {
                let left = (at - now).whole_seconds().max(1);
                longest = longest.max(u64::try_from(left).unwrap_or(1));
            }
        }
    }
    Some(longest.max(1))
}

fn describe(block: &Block) -> String {
    format!("block {} ({}, reason {:?})", block.id, block.cidr, block.reason)
}

/// `fleetban unblock TARGET [--carve [--ttl T]] [--yes]`.
pub(crate) async fn unblock(
    client: &Client,
    target: &str,
    carve: bool,
    ttl: Option<&str>,
    yes: bool,
    json_out: bool,
) -> Result<String, CliError> {
    let ttl = ttl_secs(ttl)?;
    if ttl.is_some() && !carve {
        return Err(CliError::BadArgument("--ttl applies to --carve only".into()));
    }
    if let Ok(id) = target.parse::<i64>() {
        if carve {
            return Err(CliError::BadArgument("--carve takes an address or CIDR, not a block id".into()));
        }
        client.call_empty(Method::DELETE, &format!("/api/v1/blocks/{id}"), &[]).await?;
        return Ok(if json_out { pretty(&json!({ "removed": [id] })) } else { format!("Removed block {id}.\n") });
    }
    let cidr = cidr_arg(target)?;
    let (_, exact) =
        client.get_as::<Vec<Block>>("/api/v1/blocks", &[("cidr", cidr.to_string()), ("active", "true".into())]).await?;
    // Live blocks strictly wider than the target that still cover it.
    let (_, covering) = client
        .get_as::<Vec<Block>>("/api/v1/blocks", &[("contains", cidr.to_string()), ("active", "true".into())])
        .await?;
    let covering: Vec<Block> = covering.into_iter().filter(|b| b.cidr != cidr).collect();
    if exact.is_empty() && covering.is_empty() {
        // An agent may still hold a block of its own that the server did
        // not make a fleet block (trust_local_blocks off, or spared): only
        // an allowlist entry reaches that.
        return Err(CliError::Api {
            status: 404,
            message: format!(
                "not found: no live block of {cidr} (if a host blocked it on its own without a fleet block, \
                 `fleetban allow {cidr} --ttl 1h` lifts it on every host)"
            ),
        });
    }
    if exact.is_empty() && !carve {
        let names: Vec<String> = covering.iter().map(describe).collect();
        return Err(CliError::Api {
            status: 404,
            message: escape(&format!(
                "not found: no live block of {cidr}; it is covered by {}: unblock that, or use --carve to exempt \
                 {cidr} from it",
                names.join(", ")
            ))
            .into_owned(),
        });
    }
    if is_range(&cidr) || exact.len() > 1 || carve {
        let mut what = Vec::new();
        if !exact.is_empty() {
            what.push(format!("remove {}", exact.iter().map(describe).collect::<Vec<_>>().join(", ")));
        }
        if carve && !covering.is_empty() {
            what.push(format!("exempt {cidr} from {}", covering.iter().map(describe).collect::<Vec<_>>().join(", ")));
        }
        confirm(&format!("This will {}.", what.join(" and ")), yes)?;
    }
    let mut out = String::new();
    let mut removed = Vec::new();
    for block in &exact {
        let id = block.id;
        client.call_empty(Method::DELETE, &format!("/api/v1/blocks/{id}"), &[]).await?;
        removed.push(id);
        let _ = writeln!(out, "Removed block {id} ({}).", block.cidr);
    }
    let mut carved: Option<Allowed> = None;
    if carve && !covering.is_empty() {
        let ttl = ttl.or_else(|| {
            carve_ttl(&covering.iter().map(|b| b.expires_at).collect::<Vec<_>>(), time::OffsetDateTime::now_utc())
        });
        let ids: Vec<String> = covering.iter().map(|b| b.id.to_string()).collect();
        let body = CreateAllow {
            cidr: cidr.to_string(),
            note: format!("carved out of block {}", ids.join(", ")),
            ttl_secs: ttl,
            force: false,
        };
        let (_, allowed) = client.call::<Allowed>(Method::POST, "/api/v1/allowlist", &[], Some(&body)).await?;
        let until = match allowed.entry.expires_at {
            None => "permanently".to_owned(),
            Some(at) => format!("until {} UTC", when(at)),
        };
        let _ = writeln!(
            out,
            "Exempted {cidr} from {} {until} (allowlist entry {}).",
            escape(&covering.iter().map(describe).collect::<Vec<_>>().join(", ")),
            allowed.entry.id
        );
        carved = Some(allowed);
    } else if !covering.is_empty() {
        let _ = writeln!(
            out,
            "{cidr} is still covered by {}; use --carve to exempt it.",
            escape(&covering.iter().map(describe).collect::<Vec<_>>().join(", "))
        );
    }
    Ok(if json_out {
        pretty(&json!({ "removed": removed, "covered_by": covering, "carved": carved.map(|c| c.entry) }))
    } else {
        out
    })
}

/// `fleetban allow CIDR [--note N] [--ttl T] [--force] [--yes]`.
pub(crate) async fn allow(
    client: &Client,
    cidr: &str,
    note: &str,
    ttl: Option<&str>,
    force: bool,
    yes: bool,
    json_out: bool,
) -> Result<String, CliError> {
    let net = cidr_arg(cidr)?;
    let body = CreateAllow { cidr: cidr.to_owned(), note: note.to_owned(), ttl_secs: ttl_secs(ttl)?, force };
    if is_range(&net) {
        confirm(&format!("Allowlisting {net} lifts every block inside it on every host."), yes)?;
    }
    let (raw, allowed) = client.call::<Allowed>(Method::POST, "/api/v1/allowlist", &[], Some(&body)).await?;
    if json_out {
        return Ok(raw);
    }
    let suppressed = &allowed.suppressed_blocks;
    let mut out = format!("Allowlisted {}.\n", allowed.entry.cidr);
    if !suppressed.is_empty() {
        let _ = writeln!(
            out,
            "Suppressed {} overlapping block(s) inside it until it is removed: {}.",
            suppressed.len(),
            list(suppressed)
        );
    }
    Ok(out)
}

/// `fleetban unallow CIDR [--yes]`.
pub(crate) async fn unallow(client: &Client, cidr: &str, yes: bool, json_out: bool) -> Result<String, CliError> {
    let cidr = cidr_arg(cidr)?;
    if is_range(&cidr) {
        confirm(&format!("Removing {cidr} from the allowlist enforces the blocks inside it again."), yes)?;
    }
    client.call_empty(Method::DELETE, "/api/v1/allowlist", &[("cidr", cidr.to_string())]).await?;
    Ok(if json_out {
        pretty(&json!({ "removed": cidr.to_string() }))
    } else {
        format!("Removed {cidr} from the allowlist; blocks it suppressed are enforced again.\n")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carve_lasts_as_long_as_the_longest_cover() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let at = |secs: i64| Some(now + time::Duration::seconds(secs));
        assert_eq!(carve_ttl(&[at(600), at(3_600)], now), Some(3_600));
        assert_eq!(carve_ttl(&[at(600), None], now), None);
        assert_eq!(carve_ttl(&[at(-5)], now), Some(1));
    }

    #[test]
    fn ranges_are_told_from_hosts() {
        assert!(!is_range(&"198.51.100.5/32".parse().unwrap()));
        assert!(is_range(&"198.51.100.0/24".parse().unwrap()));
        assert!(!is_range(&"2001:db8::1/128".parse().unwrap()));
    }
}
