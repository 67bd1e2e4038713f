//! Abuse reports: a plain-text account, for the operator of an attacking
//! network, of what an address or range did to the fleet.
//!
//! [`gather`] reads the evidence (per-host counts from `offender_hosts`,
//! connection counts and raw log lines from `events`, blocks from `blocks`,
//! the AS from `asn_ranges`); [`render`] turns it into text. All times are
//! UTC. With `redact`, the fleet's own host names, agent names and addresses
//! are replaced by `server-N` / `[our address]` everywhere, including inside
//! the quoted log lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::IpNet;
use sqlx::PgPool;
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

use crate::asn::{self, AsnInfo};
use crate::eventlog;

/// Evidence lines quoted in a report.
pub const MAX_LINES: i64 = 50;

/// Everything a report says.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportData {
    /// The reported address or range.
    pub target: IpNet,
    /// When the report was made.
    pub generated_at: OffsetDateTime,
    /// The AS of the target, when an ASN database is loaded.
    pub asn: Option<AsnInfo>,
    /// Abuse per address inside the target.
    pub addresses: Vec<AddressSummary>,
    /// Abuse events by kind.
    pub kinds: BTreeMap<String, i64>,
    /// Distinct servers of ours that saw abuse from the target.
    pub servers: i64,
    /// Connections from the target recorded in our logs (retained events).
    pub connections: i64,
    /// First and last abuse seen.
    pub first_seen: Option<OffsetDateTime>,
    /// Last abuse seen.
    pub last_seen: Option<OffsetDateTime>,
    /// Blocks overlapping the target, newest first.
    pub blocks: Vec<BlockSummary>,
    /// Evidence lines, newest first.
    pub lines: Vec<EvidenceLine>,
    /// Total evidence lines available (may exceed `lines.len()`).
    pub total_lines: i64,
    /// The fleet's servers: id, name, host name.
    pub fleet: Vec<(Uuid, String, String)>,
    /// The fleet's own addresses.
    pub fleet_addresses: Vec<String>,
}

/// Abuse from one address.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AddressSummary {
    /// The address.
    pub address: IpNet,
    /// Servers it hit.
    pub servers: i64,
    /// Abuse events.
    pub events: i64,
    /// First seen.
    pub first_seen: OffsetDateTime,
    /// Last seen.
    pub last_seen: OffsetDateTime,
}

/// A block overlapping the target.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct BlockSummary {
    /// The blocked range.
    pub cidr: IpNet,
    /// Reason.
    pub reason: String,
    /// Created.
    pub created_at: OffsetDateTime,
    /// Expiry; `None` = permanent.
    pub expires_at: Option<OffsetDateTime>,
    /// When it ended, if it did.
    pub revoked_at: Option<OffsetDateTime>,
}

/// One quoted log line.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EvidenceLine {
    /// Log time.
    pub time: OffsetDateTime,
    /// The server (agent id).
    pub agent_id: Uuid,
    /// Event kind.
    pub kind: String,
    /// The raw line.
    pub raw: String,
}

/// Reads the evidence about `target`; `None` when the fleet knows nothing
/// about it.
pub async fn gather(pool: &PgPool, target: IpNet) -> Result<Option<ReportData>, sqlx::Error> {
    let addresses = sqlx::query_as::<_, AddressSummary>(
        "select address, count(distinct agent_id) as servers, sum(events)::bigint as events, \
                min(first_seen) as first_seen, max(last_seen) as last_seen \
         from offender_hosts where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) group by address order by 3 desc, address limit 100",
    )
    .bind(target)
    .fetch_all(pool)
    .await?;
    let kinds: Vec<(String, i64)> = sqlx::query_as(
        "select kind, sum(events)::bigint from offender_hosts where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) group by kind order by 2 desc, kind",
    )
    .bind(target)
    .fetch_all(pool)
    .await?;
    let (servers, first_seen, last_seen): (i64, Option<OffsetDateTime>, Option<OffsetDateTime>) = sqlx::query_as(
        "select count(distinct agent_id), min(first_seen), max(last_seen) from offender_hosts where address between fleetban_first($1::cidr) and fleetban_last($1::cidr)",
    )
    .bind(target)
    .fetch_one(pool)
    .await?;
    let connections: i64 = sqlx::query_scalar("select count(*) from events where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) and kind = 'connect'")
        .bind(target)
        .fetch_one(pool)
        .await?;
    let blocks = sqlx::query_as::<_, BlockSummary>(
        "select cidr, reason, created_at, expires_at, revoked_at from blocks where cidr && $1 order by id desc limit 20",
    )
    .bind(target)
    .fetch_all(pool)
    .await?;
    let mut lines: Vec<EvidenceLine> = Vec::new();
    for slice in eventlog::slices(eventlog::latest_possible(), None) {
        lines.extend(
            sqlx::query_as::<_, EvidenceLine>(
                "select time, agent_id, kind, raw from events \
                 where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
                   and time >= $2 and time < $3 and raw is not null and kind <> 'connect' \
                 order by time desc, id desc limit $4",
            )
            .bind(target)
            .bind(slice.from.unwrap_or(OffsetDateTime::UNIX_EPOCH))
            .bind(slice.to_exclusive())
            .bind(MAX_LINES - lines.len() as i64)
            .fetch_all(pool)
            .await?,
        );
        if lines.len() as i64 >= MAX_LINES {
            break;
        }
    }
    let mut total_lines: i64 =
        sqlx::query_scalar("select count(*) from events where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) and raw is not null and kind <> 'connect'")
            .bind(target)
            .fetch_one(pool)
            .await?;
    if lines.is_empty() {
        // Events past retention: fall back to the sample lines of the evidence.
        lines = sqlx::query_as::<_, EvidenceLine>(
            "select last_seen as time, agent_id, kind, sample_raw as raw from offender_hosts \
             where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) and sample_raw is not null order by last_seen desc limit $2",
        )
        .bind(target)
        .bind(MAX_LINES)
        .fetch_all(pool)
        .await?;
        total_lines = lines.len() as i64;
    }
    if addresses.is_empty() && blocks.is_empty() && lines.is_empty() && connections == 0 {
        return Ok(None);
    }
    let fleet: Vec<(Uuid, String, String)> =
        sqlx::query_as("select id, name, hostname from agents order by enrolled_at, id").fetch_all(pool).await?;
    let fleet_addresses: Vec<String> =
        sqlx::query_scalar("select distinct host(address) from agent_addresses").fetch_all(pool).await?;
    let asn = asn::lookup(pool, target.network()).await?;
    Ok(Some(ReportData {
        target,
        generated_at: OffsetDateTime::now_utc(),
        asn,
        addresses,
        kinds: kinds.into_iter().collect(),
        servers,
        connections,
        first_seen,
        last_seen,
        blocks,
        lines,
        total_lines,
        fleet,
        fleet_addresses,
    }))
}

/// `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(t: OffsetDateTime) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let t = t.to_offset(time::UtcOffset::UTC);
    match t.format(&format) {
        Ok(s) => format!("{s} UTC"),
        Err(_) => t.to_string(),
    }
}

/// A plain-language description of an event kind.
fn describe(kind: &str) -> &'static str {
    match kind {
        "refused_too_many" | "refused_per_host" => "connection flooding (refused: too many connections)",
        "auth_failed" => "SMTP AUTH password guessing (failed authentication)",
        "relay_denied" => "relay attempts (relaying denied)",
        "rcpt_rejected" => "recipient probing (rejected RCPT)",
        "sync_error" => "SMTP protocol synchronisation errors (pipelining abuse)",
        "too_many_nonmail" => "too many non-mail commands",
        "too_many_syntax" | "too_many_unrecognized" | "syntax_error" => "SMTP syntax errors / unrecognised commands",
        "protocol_error" => "SMTP protocol errors",
        "acl_rejected" | "acl_dropped" => "rejected or dropped by our mail policy",
        _ => "other abuse",
    }
}

/// Replaces the fleet's names and addresses for a redacted report.
struct Redactor {
    labels: BTreeMap<Uuid, String>,
    replacements: Vec<(String, String)>,
}

impl Redactor {
    fn new(data: &ReportData, redact: bool) -> Self {
        let mut labels = BTreeMap::new();
        let mut replacements = Vec::new();
        for (i, (id, name, hostname)) in data.fleet.iter().enumerate() {
            let label = if redact {
                format!("server-{}", i + 1)
            } else if hostname.is_empty() {
                name.clone()
            } else {
                hostname.clone()
            };
            if redact {
                for own in [hostname, name] {
                    if !own.is_empty() {
                        replacements.push((own.clone(), label.clone()));
                    }
                }
            }
            labels.insert(*id, label);
        }
        if redact {
            for address in &data.fleet_addresses {
                replacements.push((address.clone(), "[our address]".to_owned()));
            }
        }
        // Longest first, so `mx1.example.net` goes before `mx1`.
        replacements.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        Redactor { labels, replacements }
    }

    fn label(&self, id: &Uuid) -> String {
        self.labels.get(id).cloned().unwrap_or_else(|| "server-?".to_owned())
    }

    fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (from, to) in &self.replacements {
            out = out.replace(from.as_str(), to);
        }
        out
    }
}

/// Renders the report text.
pub fn render(data: &ReportData, redact: bool) -> String {
    let redactor = Redactor::new(data, redact);
    let mut out = String::new();
    let target = if data.target.prefix_len() == data.target.max_prefix_len() {
        data.target.addr().to_string()
    } else {
        data.target.to_string()
    };
    let _ = writeln!(out, "Abuse report: SMTP abuse from {target}");
    let _ = writeln!(out, "Generated: {}", utc(data.generated_at));
    if let Some(asn) = &data.asn {
        let country = if asn.country.is_empty() { String::new() } else { format!(", {}", asn.country) };
        let _ = writeln!(out, "Network: AS{} {}{country}", asn.asn, asn.name);
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Summary");
    let total: i64 = data.kinds.values().sum();
    match (data.first_seen, data.last_seen) {
        (Some(first), Some(last)) => {
            let _ = writeln!(
                out,
                "  Between {} and {}, {} address{} in {target} made {total} abusive SMTP connection attempts \
                 against {} of our mail servers.",
                utc(first),
                utc(last),
                data.addresses.len(),
                if data.addresses.len() == 1 { "" } else { "es" },
                data.servers,
            );
        }
        _ => {
            let _ = writeln!(out, "  No abuse evidence is on record for {target}.");
        }
    }
    let _ = writeln!(out, "  Connections from {target} recorded in our logs: {}.", data.connections);
    if !data.kinds.is_empty() {
        let _ = writeln!(out, "  By kind:");
        for (kind, count) in &data.kinds {
            let _ = writeln!(out, "    {kind:<24} {count:>8}  {}", describe(kind));
        }
    }
    if data.addresses.len() > 1 || data.target.prefix_len() < data.target.max_prefix_len() {
        let _ = writeln!(out);
        let _ = writeln!(out, "Addresses");
        for a in &data.addresses {
            let _ = writeln!(
                out,
                "  {:<40} {:>3} servers {:>8} events  {} .. {}",
                a.address.addr().to_string(),
                a.servers,
                a.events,
                utc(a.first_seen),
                utc(a.last_seen)
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Action taken");
    let now = data.generated_at;
    let live: Vec<&BlockSummary> =
        data.blocks.iter().filter(|b| b.revoked_at.is_none() && b.expires_at.is_none_or(|e| e > now)).collect();
    if live.is_empty() {
        let _ = writeln!(out, "  No block is in force now.");
    }
    for b in &data.blocks {
        let until = match (b.revoked_at, b.expires_at) {
            (Some(ended), _) => format!("ended {}", utc(ended)),
            (None, Some(expires)) if expires <= now => format!("expired {}", utc(expires)),
            (None, Some(expires)) => format!("in force until {}", utc(expires)),
            (None, None) => "in force until further notice".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {} blocked on all our mail servers since {}, {until} (reason: {}).",
            b.cidr,
            utc(b.created_at),
            redactor.text(&b.reason)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Evidence: log lines from our mail servers (Exim), newest first, times UTC ({} of {})",
        data.lines.len(),
        data.total_lines
    );
    for line in &data.lines {
        let _ = writeln!(out, "  {}  {}  {}", utc(line.time), redactor.label(&line.agent_id), line.kind);
        let _ = writeln!(out, "    {}", redactor.text(line.raw.trim_end()));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Please investigate the host(s) above: they are likely compromised or misused. The block is lifted \
         automatically when it expires; repeated abuse extends it."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn sample() -> ReportData {
        let mx1 = Uuid::from_u128(1);
        let mx2 = Uuid::from_u128(2);
        ReportData {
            target: "203.0.113.7/32".parse().unwrap(),
            generated_at: datetime!(2026-11-27 03:00:00 UTC),
            asn: Some(AsnInfo { asn: 64500, name: "EXAMPLE-NET".into(), country: "NL".into() }),
            addresses: vec![AddressSummary {
                address: "203.0.113.7/32".parse().unwrap(),
                servers: 2,
                events: 30,
                first_seen: datetime!(2026-11-27 01:00:00 UTC),
                last_seen: datetime!(2026-11-27 01:05:00 UTC),
            }],
            kinds: [("auth_failed".to_owned(), 25), ("refused_too_many".to_owned(), 5)].into_iter().collect(),
            servers: 2,
            connections: 40,
            first_seen: Some(datetime!(2026-11-27 01:00:00 UTC)),
            last_seen: Some(datetime!(2026-11-27 01:05:00 UTC)),
            blocks: vec![BlockSummary {
                cidr: "203.0.113.7/32".parse().unwrap(),
                reason: "fleet_correlation".into(),
                created_at: datetime!(2026-11-27 01:05:01 UTC),
                expires_at: Some(datetime!(2026-11-27 07:05:01 UTC)),
                revoked_at: None,
            }],
            lines: vec![EvidenceLine {
                time: datetime!(2026-11-27 01:05:00 UTC),
                agent_id: mx2,
                kind: "auth_failed".into(),
                raw: "2026-11-27 01:05:00 dovecot_login authenticator failed for (mx2.example.net) [203.0.113.7]:5 \
                      I=[192.0.2.10]:587: 535 Incorrect authentication data (set_id=a@b)"
                    .into(),
            }],
            total_lines: 30,
            fleet: vec![(mx1, "mx1".into(), "mx1.example.net".into()), (mx2, "mx2".into(), "mx2.example.net".into())],
            fleet_addresses: vec!["192.0.2.10".into()],
        }
    }

    #[test]
    fn report_says_what_when_how_many_and_the_block() {
        let text = render(&sample(), false);
        assert!(text.contains("Abuse report: SMTP abuse from 203.0.113.7\n"), "{text}");
        assert!(text.contains("Network: AS64500 EXAMPLE-NET, NL"), "{text}");
        assert!(text.contains("Between 2026-11-27 01:00:00 UTC and 2026-11-27 01:05:00 UTC"), "{text}");
        assert!(text.contains("made 30 abusive SMTP connection attempts against 2 of our mail servers"), "{text}");
        assert!(text.contains("recorded in our logs: 40."), "{text}");
        assert!(text.contains("auth_failed") && text.contains("password guessing"), "{text}");
        assert!(text.contains("203.0.113.7/32 blocked on all our mail servers since 2026-11-27 01:05:01 UTC, in force until 2026-11-27 07:05:01 UTC"), "{text}");
        assert!(text.contains("(1 of 30)"), "{text}");
        assert!(text.contains("mx2.example.net  auth_failed"), "{text}");
        assert!(text.contains("535 Incorrect authentication data"), "{text}");
    }

    #[test]
    fn redaction_hides_our_names_and_addresses_everywhere() {
        let text = render(&sample(), true);
        assert!(!text.contains("example.net"), "{text}");
        assert!(!text.contains("mx2"), "{text}");
        assert!(!text.contains("192.0.2.10"), "{text}");
        assert!(text.contains("server-2  auth_failed"), "{text}");
        assert!(text.contains("for (server-2) [203.0.113.7]"), "{text}");
        assert!(text.contains("I=[[our address]]:587"), "{text}");
        // The attacker's address is never redacted.
        assert!(text.contains("203.0.113.7"), "{text}");
    }

    #[test]
    fn no_block_and_no_asn_are_said_plainly() {
        let mut data = sample();
        data.blocks.clear();
        data.asn = None;
        let text = render(&data, false);
        assert!(text.contains("No block is in force now."), "{text}");
        assert!(!text.contains("Network:"), "{text}");
    }
}
