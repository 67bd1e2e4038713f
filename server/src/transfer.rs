//! Bulk import and export of the blocklist and the allowlist: the file
//! formats, parsed and rendered without touching the database (the API's
//! `POST /api/v1/import` and `GET /api/v1/export` apply and read them).
//!
//! Formats (`--format`):
//! - `plain`: one address or CIDR per line; `#` starts a comment, and a
//!   comment after the address is its reason. Rows go to the list the import
//!   names (`list`, blocks by default).
//! - `csv`: `cidr,list,reason,ttl_secs` (an optional header line naming
//!   those columns; `list` is `block` or `allow`, empty = the import's list;
//!   `ttl_secs` empty = the import's TTL). Fields may be double-quoted.
//! - `json`: an array of `{"cidr", "list", "reason", "ttl_secs"}` objects
//!   (`note` is accepted for `reason`); an entry's "line" is its position.
//! - `csf-deny`: CSF's `csf.deny`: `203.0.113.5 # reason - Fri Nov 27
//!   00:00:00 2026` (the date CSF appends is dropped from the reason), into
//!   the blocklist.
//! - `csf-allow`: CSF's `csf.allow`, into the allowlist.
//!
//! In both CSF formats, advanced filters (`tcp|in|d=22|s=1.2.3.4`: a port,
//! protocol or direction) are *not* a plain entry: fleetban's blocks and
//! allowlist entries cover an address on every port it enforces, so such a
//! line is skipped with that reason rather than widened or narrowed.
//! `Include` lines are skipped too. Every skipped line is reported with its
//! number and why; nothing is dropped silently. Addresses are stored in
//! canonical form (`::ffff:a.b.c.d` is the IPv4 address).

use std::fmt::Write as _;

use fleetban_proto::canonical_net;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// One address or CIDR per line, `# reason`.
    Plain,
    /// `cidr,list,reason,ttl_secs`.
    Csv,
    /// An array of objects.
    Json,
    /// CSF's `csf.deny`.
    CsfDeny,
    /// CSF's `csf.allow`.
    CsfAllow,
}

impl Format {
    /// Parses a `--format` value.
    pub fn parse(name: &str) -> Option<Format> {
        match name {
            "plain" => Some(Format::Plain),
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            "csf-deny" => Some(Format::CsfDeny),
            "csf-allow" => Some(Format::CsfAllow),
            _ => None,
        }
    }
}

/// Which list a row goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum List {
    /// The fleet blocklist.
    Block,
    /// The allowlist.
    Allow,
}

impl List {
    fn parse(name: &str) -> Option<List> {
        match name.trim().to_ascii_lowercase().as_str() {
            "block" | "blocks" | "deny" => Some(List::Block),
            "allow" | "allowlist" => Some(List::Allow),
            _ => None,
        }
    }
}

/// One row to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Line number in the file (1-based; the entry's position for JSON).
    pub line: usize,
    /// Where it goes.
    pub list: List,
    /// The range, canonical, host bits cleared.
    pub cidr: IpNet,
    /// Why (may be empty).
    pub reason: String,
    /// Lifetime, seconds; `None` = the import's default.
    pub ttl_secs: Option<u64>,
}

/// A line that is not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Skipped {
    /// Line number (1-based; the entry's position for JSON).
    pub line: usize,
    /// Why it was skipped.
    pub reason: String,
}

/// Longest reason kept, characters (longer ones are cut).
pub const MAX_REASON_CHARS: usize = 256;

fn cut(text: &str) -> String {
    text.trim().chars().filter(|c| !c.is_control()).take(MAX_REASON_CHARS).collect()
}

/// An address or CIDR, canonical with host bits cleared.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(text.parse::<std::net::IpAddr>().ok()?),
    };
    Some(canonical_net(net.trunc()))
}

/// Drops the date CSF appends to a comment (` - Fri Nov 27 00:00:00 2026`).
fn csf_reason(comment: &str) -> String {
    let comment = comment.trim();
    if let Some((reason, date)) = comment.rsplit_once(" - ") {
        let looks_like_date = date.contains(':') && date.split_whitespace().count() >= 4;
        if looks_like_date {
            return cut(reason);
        }
    }
    cut(comment)
}

/// Parses `text` in `format`; rows without a list of their own go to `list`.
pub fn parse(format: Format, list: List, text: &str) -> (Vec<Row>, Vec<Skipped>) {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    if format == Format::Json {
        parse_json(list, text, &mut rows, &mut skipped);
        return (rows, skipped);
    }
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut skip = |reason: String| skipped.push(Skipped { line, reason });
        match format {
            Format::Plain | Format::CsfDeny | Format::CsfAllow => {
                let (entry, comment) = trimmed.split_once('#').unwrap_or((trimmed, ""));
                let entry = entry.trim();
                let list = match format {
                    Format::CsfDeny => List::Block,
                    Format::CsfAllow => List::Allow,
                    _ => list,
                };
                if format != Format::Plain {
                    if entry.to_ascii_lowercase().starts_with("include") {
                        skip("CSF Include line: import the included file itself".into());
                        continue;
                    }
                    if entry.contains('|') {
                        skip(format!(
                            "advanced CSF filter {:?} (protocol, direction or port): fleetban entries cover an \
                             address on every port it enforces, so it is not imported",
                            cut(entry)
                        ));
                        continue;
                    }
                }
                let Some(cidr) = parse_net(entry) else {
                    skip(format!("{:?} is not an IP address or CIDR", cut(entry)));
                    continue;
                };
                let reason = if format == Format::Plain { cut(comment) } else { csf_reason(comment) };
                rows.push(Row { line, list, cidr, reason, ttl_secs: None });
            }
            Format::Csv => {
                let fields = csv_fields(trimmed);
                let first = fields.first().map(String::as_str).unwrap_or_default();
                if line == 1 && first.eq_ignore_ascii_case("cidr") {
                    continue;
                }
                let Some(cidr) = parse_net(first) else {
                    skip(format!("{:?} is not an IP address or CIDR", cut(first)));
                    continue;
                };
                let row_list = match fields.get(1).map(|s| s.trim()).filter(|s| !s.is_empty()) {
                    None => list,
                    Some(name) => match List::parse(name) {
                        Some(l) => l,
                        None => {
                            skip(format!("list {:?} is neither block nor allow", cut(name)));
                            continue;
                        }
                    },
                };
                let reason = fields.get(2).map(|s| cut(s)).unwrap_or_default();
                let ttl_secs = match fields.get(3).map(|s| s.trim()).filter(|s| !s.is_empty()) {
                    None => None,
                    Some(t) => match t.parse::<u64>() {
                        Ok(secs) if secs > 0 => Some(secs),
                        _ => {
                            skip(format!("ttl_secs {:?} is not a positive number of seconds", cut(t)));
                            continue;
                        }
                    },
                };
                rows.push(Row { line, list: row_list, cidr, reason, ttl_secs });
            }
            Format::Json => {}
        }
    }
    (rows, skipped)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    cidr: String,
    #[serde(default)]
    list: Option<String>,
    #[serde(default, alias = "note")]
    reason: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u64>,
}

fn parse_json(list: List, text: &str, rows: &mut Vec<Row>, skipped: &mut Vec<Skipped>) {
    let values: Vec<serde_json::Value> = match serde_json::from_str(text) {
        Ok(values) => values,
        Err(error) => {
            skipped
                .push(Skipped { line: error.line().max(1), reason: format!("not a JSON array of entries: {error}") });
            return;
        }
    };
    for (index, value) in values.into_iter().enumerate() {
        let line = index + 1;
        let row: JsonRow = match serde_json::from_value(value) {
            Ok(row) => row,
            Err(error) => {
                skipped.push(Skipped { line, reason: format!("bad entry: {error}") });
                continue;
            }
        };
        let Some(cidr) = parse_net(&row.cidr) else {
            skipped.push(Skipped { line, reason: format!("{:?} is not an IP address or CIDR", cut(&row.cidr)) });
            continue;
        };
        let row_list = match row.list.as_deref() {
            None => list,
            Some(name) => match List::parse(name) {
                Some(l) => l,
                None => {
                    skipped.push(Skipped { line, reason: format!("list {:?} is neither block nor allow", cut(name)) });
                    continue;
                }
            },
        };
        if row.ttl_secs == Some(0) {
            skipped.push(Skipped { line, reason: "ttl_secs must be positive".into() });
            continue;
        }
        rows.push(Row {
            line,
            list: row_list,
            cidr,
            reason: row.reason.as_deref().map(cut).unwrap_or_default(),
            ttl_secs: row.ttl_secs,
        });
    }
}

/// The fields of one CSV line (double quotes, `""` inside quotes).
pub(crate) fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

fn csv_quote(text: &str) -> String {
    if text.contains([',', '"', '\n']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_owned() }
}

/// One exported entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exported {
    /// The range.
    pub cidr: IpNet,
    /// Which list.
    pub list: List,
    /// Reason or note.
    pub reason: String,
    /// Remaining lifetime, seconds; `None` = permanent.
    pub ttl_secs: Option<u64>,
}

/// Renders `entries` in `format`; what a format cannot hold (allowlist
/// entries in `csf-deny`, blocks in `csf-allow`) is left out. Each format
/// reads back with [`parse`].
pub fn render(format: Format, entries: &[Exported]) -> String {
    let mut out = String::new();
    let one_line = |text: &str| text.replace(['\n', '\r', '#'], " ");
    match format {
        Format::Json => {
            out = serde_json::to_string_pretty(entries).unwrap_or_else(|_| "[]".into());
            out.push('\n');
        }
        Format::Csv => {
            out.push_str("cidr,list,reason,ttl_secs\n");
            for e in entries {
                let list = if e.list == List::Block { "block" } else { "allow" };
                let ttl = e.ttl_secs.map(|t| t.to_string()).unwrap_or_default();
                let _ = writeln!(out, "{},{list},{},{ttl}", e.cidr, csv_quote(&e.reason));
            }
        }
        Format::Plain | Format::CsfDeny | Format::CsfAllow => {
            let want = match format {
                Format::CsfAllow => Some(List::Allow),
                Format::CsfDeny => Some(List::Block),
                _ => None,
            };
            for e in entries.iter().filter(|e| want.is_none_or(|w| w == e.list)) {
                let host = if e.cidr.prefix_len() == e.cidr.max_prefix_len() {
                    e.cidr.addr().to_string()
                } else {
                    e.cidr.to_string()
                };
                if e.reason.is_empty() {
                    let _ = writeln!(out, "{host}");
                } else {
                    let _ = writeln!(out, "{host} # {}", one_line(&e.reason));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn csf_deny_with_reasons_dates_and_advanced_filters() {
        let text = "# csf.deny\n\
                    203.0.113.5 # lfd: too many failed logins - Fri Nov 27 00:00:00 2026\n\
                    198.51.100.0/24 # Manually denied: spam run\n\
                    \n\
                    tcp|in|d=22|s=192.0.2.4 # ssh only\n\
                    Include /etc/csf/csf.local.deny\n\
                    not-an-address # x\n\
                    ::ffff:192.0.2.9\n";
        let (rows, skipped) = parse(Format::CsfDeny, List::Allow, text);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            rows[0],
            Row {
                line: 2,
                list: List::Block,
                cidr: net("203.0.113.5/32"),
                reason: "lfd: too many failed logins".into(),
                ttl_secs: None
            }
        );
        assert_eq!((rows[1].line, rows[1].reason.as_str()), (3, "Manually denied: spam run"));
        assert_eq!(rows[2].cidr, net("192.0.2.9/32"), "mapped addresses are IPv4");
        assert_eq!(skipped.iter().map(|s| s.line).collect::<Vec<_>>(), [5, 6, 7]);
        assert!(skipped[0].reason.contains("advanced CSF filter"), "{skipped:?}");
        assert!(skipped[1].reason.contains("Include"));
    }

    #[test]
    fn csf_allow_goes_to_the_allowlist() {
        let (rows, skipped) =
            parse(Format::CsfAllow, List::Block, "192.0.2.10 # office\nudp|out|d=53|d=192.0.2.53\n2001:db8::/48\n");
        assert_eq!(
            rows.iter().map(|r| (r.list, r.cidr)).collect::<Vec<_>>(),
            [(List::Allow, net("192.0.2.10/32")), (List::Allow, net("2001:db8::/48"))]
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].line, 2);
    }

    #[test]
    fn plain_csv_and_json() {
        let (rows, skipped) = parse(Format::Plain, List::Allow, "192.0.2.1\n192.0.2.7/24 # partner\nx\n");
        assert_eq!(rows[1].cidr, net("192.0.2.0/24"), "host bits are cleared");
        assert_eq!((rows[1].list, rows[1].reason.as_str()), (List::Allow, "partner"));
        assert_eq!(skipped[0].line, 3);

        let csv = "cidr,list,reason,ttl_secs\n192.0.2.1,block,\"spam, lots\",3600\n192.0.2.2,allow,,\n\
                   192.0.2.3,,default list,\n192.0.2.4,maybe,,\n192.0.2.5,block,,soon\n";
        let (rows, skipped) = parse(Format::Csv, List::Block, csv);
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].reason.as_str(), rows[0].ttl_secs), ("spam, lots", Some(3600)));
        assert_eq!((rows[1].list, rows[2].list), (List::Allow, List::Block));
        assert_eq!(skipped.iter().map(|s| s.line).collect::<Vec<_>>(), [5, 6]);

        let json = r#"[{"cidr": "192.0.2.1", "reason": "r", "ttl_secs": 60}, {"cidr": "x"},
                       {"cidr": "192.0.2.2", "list": "allow", "note": "n"}, {"cidr": "192.0.2.3", "extra": 1}]"#;
        let (rows, skipped) = parse(Format::Json, List::Block, json);
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 3]);
        assert_eq!((rows[1].list, rows[1].reason.as_str()), (List::Allow, "n"));
        assert_eq!(skipped.iter().map(|s| s.line).collect::<Vec<_>>(), [2, 4]);
        let (rows, skipped) = parse(Format::Json, List::Block, "{not json");
        assert!(rows.is_empty() && skipped.len() == 1);
    }

    #[test]
    fn every_format_reads_back_what_it_renders() {
        let entries = vec![
            Exported {
                cidr: net("192.0.2.1/32"),
                list: List::Block,
                reason: "brute, \"force\"".into(),
                ttl_secs: Some(60),
            },
            Exported { cidr: net("198.51.100.0/24"), list: List::Allow, reason: "partner".into(), ttl_secs: None },
            Exported { cidr: net("2001:db8::/64"), list: List::Block, reason: String::new(), ttl_secs: None },
        ];
        for format in [Format::Csv, Format::Json] {
            let (rows, skipped) = parse(format, List::Block, &render(format, &entries));
            assert!(skipped.is_empty(), "{format:?}: {skipped:?}");
            let back: Vec<Exported> = rows
                .into_iter()
                .map(|r| Exported { cidr: r.cidr, list: r.list, reason: r.reason, ttl_secs: r.ttl_secs })
                .collect();
            assert_eq!(back, entries, "{format:?}");
        }
        let deny = render(Format::CsfDeny, &entries);
        assert_eq!(deny, "192.0.2.1 # brute, \"force\"\n2001:db8::/64\n");
        let (rows, _) = parse(Format::CsfAllow, List::Block, &render(Format::CsfAllow, &entries));
        assert_eq!(rows.iter().map(|r| r.cidr).collect::<Vec<_>>(), [net("198.51.100.0/24")]);
    }
}
