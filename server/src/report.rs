//! Abuse reports: a plain-text account, for the operator of an attacking
//! network, of what an address or range did to the fleet.
//!
//! [`gather`] reads the evidence (per-host counts from `offender_hosts`,
//! connection counts and raw log lines from `events`, blocks from `blocks`,
//! the AS from `asn_ranges`); [`render`] turns it into text. All times are
//! UTC. With `redact`, the fleet's own host names, agent names and addresses
//! are replaced by `server-N` / `[our address]` everywhere, including inside
//! the quoted log lines, and every mailbox and user name in them
//! ([`redact_mailboxes`]).
//!
//! The text agrees with itself: the summary's total is the sum of the kinds
//! and of the addresses' events; the evidence is lines of those abuse kinds
//! only, and says how many of the counted events still have their line; the
//! block state (blocked now / no longer blocked / never blocked) is the one
//! at the time of the report; every count takes its singular or plural.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::IpNet;
use sqlx::PgPool;
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

use fleetban_proto::v1::EventKind;

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
    /// The target's two-letter country when known apart from its AS (the
    /// country database's, `[geo] country_mmdb_path`); shown when it is not
    /// the AS's.
    pub country: Option<String>,
    /// Abuse per address inside the target.
    pub addresses: Vec<AddressSummary>,
    /// Abuse events by kind.
    pub kinds: BTreeMap<String, i64>,
    /// Retained abuse events by service (`smtp`, `imap`, `pop3`, ...).
    pub services: BTreeMap<String, i64>,
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
    /// The service (`smtp`, `imap`, ...); `None` for a sample line kept
    /// past retention.
    pub service: Option<String>,
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
    // Connects arrive as single events (older agents, aggregation off) or
    // counted in context summaries.
    let connections: i64 = sqlx::query_scalar(
        "select (select count(*) from events where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
                 and kind = 'connect') \
              + (select coalesce(sum(connects), 0) from context_summaries \
                 where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr))::bigint",
    )
    .bind(target)
    .fetch_one(pool)
    .await?;
    let blocks = sqlx::query_as::<_, BlockSummary>(
        "select cidr, reason, created_at, expires_at, revoked_at from blocks where cidr && $1 order by id desc limit 20",
    )
    .bind(target)
    .fetch_all(pool)
    .await?;
    // Evidence is the abuse kinds' lines only, the events the summary counts
    // (context lines such as lost connections are not abuse).
    let abuse_kinds: Vec<&str> = EventKind::ALL.into_iter().filter(|k| k.is_abuse()).map(EventKind::as_str).collect();
    let mut lines: Vec<EvidenceLine> = Vec::new();
    for slice in eventlog::slices(eventlog::latest_possible(), None) {
        lines.extend(
            sqlx::query_as::<_, EvidenceLine>(
                "select time, agent_id, kind, coalesce(service, 'smtp') as service, raw from events \
                 where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
                   and time >= $2 and time < $3 and raw is not null and kind = any($5) \
                 order by time desc, id desc limit $4",
            )
            .bind(target)
            .bind(slice.from.unwrap_or(OffsetDateTime::UNIX_EPOCH))
            .bind(slice.to_exclusive())
            .bind(MAX_LINES - lines.len() as i64)
            .bind(&abuse_kinds)
            .fetch_all(pool)
            .await?,
        );
        if lines.len() as i64 >= MAX_LINES {
            break;
        }
    }
    let mut total_lines: i64 =
        sqlx::query_scalar("select count(*) from events where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) and raw is not null and kind = any($2)")
            .bind(target)
            .bind(&abuse_kinds)
            .fetch_one(pool)
            .await?;
    if lines.is_empty() {
        // Events past retention: fall back to the sample lines of the evidence.
        lines = sqlx::query_as::<_, EvidenceLine>(
            "select last_seen as time, agent_id, kind, null::text as service, sample_raw as raw from offender_hosts \
             where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) and sample_raw is not null order by last_seen desc limit $2",
        )
        .bind(target)
        .bind(MAX_LINES)
        .fetch_all(pool)
        .await?;
        total_lines = lines.len() as i64;
    }
    let services: Vec<(String, i64)> = sqlx::query_as(
        "select coalesce(service, 'smtp'), count(*) from events \
         where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr) and kind = any($2) group by 1",
    )
    .bind(target)
    .bind(&abuse_kinds)
    .fetch_all(pool)
    .await?;
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
        country: None,
        addresses,
        kinds: kinds.into_iter().collect(),
        services: services.into_iter().collect(),
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
        "auth_failed" => "password guessing (failed SMTP AUTH, IMAP or POP3 logins)",
        "relay_denied" => "relay attempts (relaying denied)",
        "rcpt_rejected" => "recipient probing (rejected RCPT)",
        "sync_error" => "SMTP protocol synchronisation errors (pipelining abuse)",
        "too_many_nonmail" => "too many non-mail commands",
        "too_many_syntax" | "too_many_unrecognized" | "syntax_error" => "syntax errors / unrecognised commands",
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

/// `n` and the noun, singular or plural (`1 address`, `2 addresses`).
fn count(n: i64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// Whether the target's range is blocked now, was, or never was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// A block covering the target is in force.
    Blocked,
    /// Blocks existed; every one has expired or was lifted.
    NoLongerBlocked,
    /// No block ever covered the target.
    NeverBlocked,
}

impl BlockState {
    /// The state of `data` at its `generated_at`.
    pub fn of(data: &ReportData) -> BlockState {
        let now = data.generated_at;
        if data.blocks.iter().any(|b| b.is_live(now)) {
            BlockState::Blocked
        } else if data.blocks.is_empty() {
            BlockState::NeverBlocked
        } else {
            BlockState::NoLongerBlocked
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            BlockState::Blocked => "blocked",
            BlockState::NoLongerBlocked => "no longer blocked",
            BlockState::NeverBlocked => "never blocked",
        }
    }
}

impl BlockSummary {
    /// In force at `now`: not lifted and not expired.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// Removes mailbox and user names from a quoted log line: every
/// `local@domain` (senders `F=<..>`, recipients `<..>`, `set_id=a@b`), the
/// login of `set_id=` and of `A=authenticator:user`, and Exim's `U=` local
/// user. A report goes to a third party; the mailboxes of our customers do
/// not.
pub fn redact_mailboxes(line: &str) -> String {
    const USER: &str = "[user]";
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    // A value after one of these keys ends at whitespace, `)` or `>`.
    let keys = ["set_id=", "A=", "U="];
    while !rest.is_empty() {
        let key = keys
            .iter()
            .find(|k| rest.starts_with(**k) && out.chars().last().is_none_or(|c| c.is_whitespace() || c == '('));
        if let Some(key) = key {
            out.push_str(key);
            rest = &rest[key.len()..];
            let end = rest.find(|c: char| c.is_whitespace() || c == ')' || c == '>').unwrap_or(rest.len());
            let value = &rest[..end];
            match (*key, value.split_once(':')) {
                // `A=dovecot_login:user`: the authenticator's name stays.
                ("A=", Some((authenticator, _))) => {
                    out.push_str(authenticator);
                    out.push(':');
                    out.push_str(USER);
                }
                ("A=", None) => out.push_str(value),
                _ if value.is_empty() => {}
                _ => out.push_str(USER),
            }
            rest = &rest[end..];
            continue;
        }
        let Some(c) = rest.chars().next() else { break };
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    redact_delivery_targets(&redact_addresses(&out))
}

/// A delivery line's `=> local_part <address>`: the word after the arrow is
/// a mailbox even without an `@`.
fn redact_delivery_targets(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut words = line.split(' ').peekable();
    let mut first = true;
    while let Some(word) = words.next() {
        if !first {
            out.push(' ');
        }
        first = false;
        out.push_str(word);
        if matches!(word, "=>" | "->" | "**" | "==")
            && let Some(next) = words.peek()
            && !next.starts_with('<')
            && !next.starts_with('[')
            && !next.is_empty()
        {
            words.next();
            out.push_str(" [mailbox]");
        }
    }
    out
}

/// Replaces every `local@domain` by `[mailbox]`.
fn redact_addresses(line: &str) -> String {
    let boundary =
        |c: char| c.is_whitespace() || matches!(c, '<' | '>' | '(' | ')' | '"' | '\'' | '=' | ',' | ';' | '[' | ']');
    let mut out = String::with_capacity(line.len());
    let mut word_start = 0;
    let flush = |out: &mut String, word: &str| {
        if word.contains('@') && word != "@" {
            out.push_str("[mailbox]");
        } else {
            out.push_str(word);
        }
    };
    for (i, c) in line.char_indices() {
        if boundary(c) {
            flush(&mut out, &line[word_start..i]);
            out.push(c);
            word_start = i + c.len_utf8();
        }
    }
    flush(&mut out, &line[word_start..]);
    out
}

/// Renders the report text.
pub fn render(data: &ReportData, redact: bool) -> String {
    let redactor = Redactor::new(data, redact);
    let scrub = |text: &str| {
        let text = redactor.text(text);
        if redact { redact_mailboxes(&text) } else { text }
    };
    let mut out = String::new();
    let single = data.target.prefix_len() == data.target.max_prefix_len();
    let target = if single { data.target.addr().to_string() } else { data.target.to_string() };
    let state = BlockState::of(data);
    // SMTP only unless Dovecot's services saw abuse too.
    let other_services: Vec<&str> = data.services.keys().map(String::as_str).filter(|s| *s != "smtp").collect();
    let (what, events) = if other_services.is_empty() {
        ("SMTP", ["abusive SMTP event", "abusive SMTP events"])
    } else {
        ("mail (SMTP, IMAP, POP3)", ["abusive mail event", "abusive mail events"])
    };
    let _ = writeln!(out, "Abuse report: {what} abuse from {target}");
    let _ = writeln!(out, "Generated: {}", utc(data.generated_at));
    if let Some(asn) = &data.asn {
        let country = if asn.country.is_empty() { String::new() } else { format!(", {}", asn.country) };
        let _ = writeln!(out, "Network: AS{} {}{country}", asn.asn, asn.name);
    }
    if let Some(country) = data.country.as_deref().filter(|c| data.asn.as_ref().is_none_or(|a| a.country != *c)) {
        let _ = writeln!(out, "Country: {country}");
    }
    let _ = writeln!(out, "State: {} (at the time of this report)", state.as_str());
    let _ = writeln!(out);
    let _ = writeln!(out, "Summary");
    let total: i64 = data.kinds.values().sum();
    match (data.first_seen, data.last_seen) {
        (Some(first), Some(last)) if total > 0 => {
            let who = if single {
                target.clone()
            } else {
                format!("{} in {target}", count(data.addresses.len() as i64, "address", "addresses"))
            };
            let _ = writeln!(
                out,
                "  Between {} and {}, {who} caused {} against {} of our mail servers.",
                utc(first),
                utc(last),
                count(total, events[0], events[1]),
                data.servers,
            );
        }
        _ => {
            let _ = writeln!(out, "  No abuse evidence is on record for {target}.");
        }
    }
    if data.connections > 0 {
        let _ = writeln!(
            out,
            "  Our logs also hold {} from {target} (abusive or not).",
            count(data.connections, "SMTP connection", "SMTP connections")
        );
    }
    if !data.kinds.is_empty() {
        let _ = writeln!(out, "  By kind:");
        for (kind, events) in &data.kinds {
            let _ = writeln!(out, "    {kind:<24} {events:>8}  {}", describe(kind));
        }
    }
    if !other_services.is_empty() {
        let _ = writeln!(out, "  By service (events whose log lines we hold):");
        for (service, events) in &data.services {
            let _ = writeln!(out, "    {:<24} {events:>8}", service.to_ascii_uppercase());
        }
    }
    if !single {
        let _ = writeln!(out);
        let _ = writeln!(out, "Addresses");
        for a in &data.addresses {
            let _ = writeln!(
                out,
                "  {:<40} {:>13} {:>15}  {} .. {}",
                a.address.addr().to_string(),
                count(a.servers, "server", "servers"),
                count(a.events, "event", "events"),
                utc(a.first_seen),
                utc(a.last_seen)
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Action taken");
    let now = data.generated_at;
    if data.blocks.is_empty() {
        let _ = writeln!(out, "  Never blocked: we have not blocked {target}.");
    }
    for b in data.blocks.iter().filter(|b| b.is_live(now)) {
        let until = match b.expires_at {
            Some(expires) => format!("until {}", utc(expires)),
            None => "until further notice".to_owned(),
        };
        let _ = writeln!(
            out,
            "  Blocked now: {} on all our mail servers since {}, {until} (reason: {}).",
            b.cidr,
            utc(b.created_at),
            scrub(&b.reason)
        );
    }
    for b in data.blocks.iter().filter(|b| !b.is_live(now)) {
        let ended = match (b.revoked_at, b.expires_at) {
            (Some(ended), _) => format!("lifted {}", utc(ended)),
            (None, Some(expires)) => format!("expired {}", utc(expires)),
            // Not live without either cannot happen; said plainly anyway.
            (None, None) => "ended".to_owned(),
        };
        let _ = writeln!(
            out,
            "  No longer blocked: {} was blocked from {}, {ended} (reason: {}).",
            b.cidr,
            utc(b.created_at),
            scrub(&b.reason)
        );
    }
    let _ = writeln!(out);
    let shown = data.lines.len() as i64;
    let _ = writeln!(
        out,
        "Evidence: {} from our mail servers ({}), newest first, times UTC",
        count(shown, "log line", "log lines"),
        if other_services.is_empty() { "Exim" } else { "Exim and Dovecot" },
    );
    if data.total_lines == total {
        let _ = writeln!(out, "  ({shown} of the {} above.)", count(total, "abusive event", "abusive events"));
    } else {
        let _ = writeln!(
            out,
            "  ({shown} of the {} whose log lines we still hold; the summary counts {}, older lines are no \
             longer retained.)",
            count(data.total_lines, "event", "events"),
            count(total, "abusive event", "abusive events"),
        );
    }
    for line in &data.lines {
        let service = match line.service.as_deref() {
            Some(s) if s != "smtp" => format!(" ({})", s.to_ascii_uppercase()),
            _ => String::new(),
        };
        let _ = writeln!(out, "  {}  {}  {}{service}", utc(line.time), redactor.label(&line.agent_id), line.kind);
        let _ = writeln!(out, "    {}", scrub(line.raw.trim_end()));
    }
    let _ = writeln!(out);
    let closing = match state {
        BlockState::Blocked => {
            "Please investigate the host(s) above: they are likely compromised or misused. The block is lifted \
             automatically when it expires; repeated abuse extends it."
        }
        BlockState::NoLongerBlocked | BlockState::NeverBlocked => {
            "Please investigate the host(s) above: they are likely compromised or misused. Further abuse will \
             be blocked on all our mail servers."
        }
    };
    let _ = writeln!(out, "{closing}");
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
            country: None,
            addresses: vec![AddressSummary {
                address: "203.0.113.7/32".parse().unwrap(),
                servers: 2,
                events: 30,
                first_seen: datetime!(2026-11-27 01:00:00 UTC),
                last_seen: datetime!(2026-11-27 01:05:00 UTC),
            }],
            kinds: [("auth_failed".to_owned(), 25), ("refused_too_many".to_owned(), 5)].into_iter().collect(),
            services: [("smtp".to_owned(), 30)].into_iter().collect(),
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
                service: Some("smtp".into()),
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
        assert!(text.contains("State: blocked"), "{text}");
        assert!(text.contains("Between 2026-11-27 01:00:00 UTC and 2026-11-27 01:05:00 UTC"), "{text}");
        assert!(text.contains("203.0.113.7 caused 30 abusive SMTP events against 2 of our mail servers"), "{text}");
        assert!(!text.contains("1 address in"), "a single address is not counted: {text}");
        assert!(text.contains("Our logs also hold 40 SMTP connections from 203.0.113.7"), "{text}");
        assert!(text.contains("auth_failed") && text.contains("password guessing"), "{text}");
        assert!(text.contains("Blocked now: 203.0.113.7/32 on all our mail servers since 2026-11-27 01:05:01 UTC, until 2026-11-27 07:05:01 UTC"), "{text}");
        assert!(text.contains("(1 of the 30 abusive events above.)"), "{text}");
        assert!(text.contains("mx2.example.net  auth_failed"), "{text}");
        assert!(text.contains("535 Incorrect authentication data"), "{text}");
        assert!(text.contains("set_id=a@b"), "not redacted: {text}");
    }

    #[test]
    fn dovecot_evidence_names_its_service() {
        let mut data = sample();
        data.services = [("smtp".to_owned(), 20), ("imap".to_owned(), 10)].into_iter().collect();
        data.lines.push(EvidenceLine {
            time: datetime!(2026-11-27 01:04:00 UTC),
            agent_id: Uuid::from_u128(1),
            kind: "auth_failed".into(),
            service: Some("imap".into()),
            raw: "Nov 27 01:04:00 imap-login: Info: Disconnected (auth failed, 3 attempts in 9 secs): user=<a>, \
                  method=PLAIN, rip=203.0.113.7, lip=192.0.2.10"
                .into(),
        });
        let text = render(&data, false);
        assert!(text.contains("Abuse report: mail (SMTP, IMAP, POP3) abuse from 203.0.113.7"), "{text}");
        assert!(text.contains("caused 30 abusive mail events"), "{text}");
        assert!(text.contains("IMAP") && text.contains("SMTP                           20"), "{text}");
        assert!(text.contains("mx1.example.net  auth_failed (IMAP)"), "{text}");
        assert!(text.contains("(Exim and Dovecot)"), "{text}");
        // SMTP alone reads as before.
        let smtp = render(&sample(), false);
        assert!(smtp.contains("Abuse report: SMTP abuse from") && !smtp.contains("By service"), "{smtp}");
    }

    #[test]
    fn counts_agree_and_take_their_number() {
        let mut data = sample();
        data.kinds = [("auth_failed".to_owned(), 1)].into_iter().collect();
        data.addresses[0].events = 1;
        data.addresses[0].servers = 1;
        data.servers = 1;
        data.connections = 0;
        data.total_lines = 1;
        let text = render(&data, false);
        assert!(text.contains("caused 1 abusive SMTP event against 1 of our mail servers."), "{text}");
        assert!(!text.contains("connections from"), "no contradicting zero: {text}");
        assert!(text.contains("Evidence: 1 log line from"), "{text}");
        assert!(text.contains("(1 of the 1 abusive event above.)"), "{text}");
        // Events counted whose lines are past retention are said to be.
        data.total_lines = 0;
        data.lines.clear();
        data.kinds.insert("refused_too_many".into(), 3);
        let text = render(&data, false);
        assert!(text.contains("caused 4 abusive SMTP events"), "{text}");
        assert!(text.contains("Evidence: 0 log lines"), "{text}");
        assert!(text.contains("the summary counts 4 abusive events, older lines are no longer retained"), "{text}");
        // A range lists its addresses with their counts.
        data.target = "203.0.113.0/24".parse().unwrap();
        let text = render(&data, false);
        assert!(text.contains("1 address in 203.0.113.0/24 caused 4"), "{text}");
        assert!(text.contains("1 server") && text.contains("1 event "), "{text}");
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
        assert!(text.contains("(set_id=[user])"), "{text}");
        // The attacker's address is never redacted.
        assert!(text.contains("203.0.113.7"), "{text}");
    }

    #[test]
    fn redaction_removes_every_mailbox_and_user_name() {
        let lines = [
            "2026-11-27 01:00:00 dovecot_login authenticator failed for (x) [203.0.113.7]:5 I=[192.0.2.10]:587: \
             535 Incorrect authentication data (set_id=info@customer.example)",
            "2026-11-27 01:00:00 dovecot_plain authenticator failed for (x) [203.0.113.7]:5: 535 Incorrect \
             authentication data (set_id=jsmith)",
            "2026-11-27 01:00:00 1abcde-000001-AB <= bounce+x@esp.example H=(x) [203.0.113.7]:5 P=esmtpsa \
             A=dovecot_login:alice@customer.example S=1234 id=m1@esp.example",
            "2026-11-27 01:00:00 H=(x) [203.0.113.7]:5 A=dovecot_plain:bob F=<bob@customer.example> rejected \
             RCPT <victim@elsewhere.example>: relay not permitted",
            "2026-11-27 01:00:00 1abcde-000001-AB => carol <carol@customer.example> R=virtual_user T=virtual \
             H=[203.0.113.7] U=carolunix",
        ];
        for line in lines {
            let out = redact_mailboxes(line);
            for secret in ["info", "customer.example", "jsmith", "bounce", "alice", "bob", "victim", "carol", "m1@"] {
                let leaked = out.split(|c: char| !c.is_alphanumeric() && c != '.' && c != '@').any(|w| {
                    w == secret
                        || w.starts_with(secret) && secret.ends_with('@')
                        || w.contains(secret) && secret.contains('.')
                });
                assert!(!leaked, "{secret} left in {out}");
            }
            assert!(out.contains("[203.0.113.7]"), "the attacker stays: {out}");
        }
        assert!(redact_mailboxes(lines[2]).contains("A=dovecot_login:[user]"), "{}", redact_mailboxes(lines[2]));
        assert!(redact_mailboxes(lines[3]).contains("F=<[mailbox]> rejected RCPT <[mailbox]>"));
        assert!(redact_mailboxes(lines[4]).contains("U=[user]"));
    }

    #[test]
    fn the_block_state_is_current() {
        let mut data = sample();
        // Lifted before the report: not "blocked".
        data.blocks[0].revoked_at = Some(datetime!(2026-11-27 02:00:00 UTC));
        let text = render(&data, false);
        assert!(text.contains("State: no longer blocked"), "{text}");
        assert!(text.contains("No longer blocked: 203.0.113.7/32 was blocked from 2026-11-27 01:05:01 UTC, lifted 2026-11-27 02:00:00 UTC"), "{text}");
        assert!(!text.contains("Blocked now") && !text.contains("The block is lifted"), "{text}");
        // Expired.
        data.blocks[0].revoked_at = None;
        data.blocks[0].expires_at = Some(datetime!(2026-11-27 02:30:00 UTC));
        let text = render(&data, false);
        assert!(
            text.contains("State: no longer blocked") && text.contains("expired 2026-11-27 02:30:00 UTC"),
            "{text}"
        );
        // Never.
        data.blocks.clear();
        let text = render(&data, false);
        assert!(text.contains("State: never blocked") && text.contains("Never blocked: we have not blocked"), "{text}");
    }

    #[test]
    fn no_block_and_no_asn_are_said_plainly() {
        let mut data = sample();
        data.blocks.clear();
        data.asn = None;
        let text = render(&data, false);
        assert!(text.contains("Never blocked"), "{text}");
        assert!(!text.contains("Network:"), "{text}");
    }

    #[test]
    fn the_country_databases_country_is_shown_when_it_adds_something() {
        let mut data = sample();
        data.country = Some("NL".into());
        assert!(!render(&data, false).contains("Country:"), "the AS line already says NL");
        data.country = Some("BE".into());
        assert!(render(&data, false).contains("\nCountry: BE\n"));
        data.asn = None;
        assert!(render(&data, true).contains("\nCountry: BE\n"));
    }
}
