//! The list formats of blocklist feeds, parsed without touching the
//! database.
//!
//! - `drop`: Spamhaus DROP/EDROP: `CIDR ; SBLnnn`, lines starting with `;`
//!   are comments; the text after `;` is the entry's label.
//! - `plain`: one address or CIDR per line; `#` starts a comment (whole line
//!   or after the entry).
//! - `csv`: one entry per row in the configured column (1-based), fields
//!   separated by `,`, optionally double-quoted; `#` lines are comments and
//!   a header row can be skipped; the other columns are ignored.
//!
//! Every line that is not a comment, blank or a valid entry is skipped and
//! counted (never fatal): text that is not UTF-8, lines longer than
//! [`MAX_LINE_BYTES`], bad addresses, ranges with host bits set (a typo
//! such as `192.0.2.1/8` would otherwise widen to a /8). Entries are kept in
//! canonical form ([`fleetban_proto::canonical_net`]) and deduplicated.

use std::collections::BTreeMap;
use std::net::IpAddr;

use fleetban_proto::canonical_net;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Longest line accepted, bytes; longer lines are bad lines.
pub const MAX_LINE_BYTES: usize = 1024;

/// Longest label kept, characters.
const MAX_LABEL_CHARS: usize = 64;

/// A feed's list format (`format` in `[[feed]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FeedFormat {
    /// Spamhaus DROP/EDROP: `CIDR ; SBLnnn`, `;` comments.
    Drop,
    /// One address or CIDR per line, `#` comments.
    Plain,
    /// Comma-separated values, the entry in `csv_column`.
    Csv,
}

impl FeedFormat {
    /// The configured name.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedFormat::Drop => "drop",
            FeedFormat::Plain => "plain",
            FeedFormat::Csv => "csv",
        }
    }
}

/// How to read a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseOptions {
    /// The format.
    pub format: FeedFormat,
    /// `csv`: the column holding the entry, 1-based.
    pub csv_column: usize,
    /// `csv`: the first row that is not a comment is a header.
    pub csv_header: bool,
}

/// A parsed list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedList {
    /// Distinct entries (canonical) with their label (`SBL123`, a `#`
    /// comment), if any.
    pub entries: BTreeMap<IpNet, Option<String>>,
    /// Lines skipped as malformed.
    pub bad_lines: u64,
    /// Lines that were entries (duplicates included) or malformed: the base
    /// of the bad-line ratio.
    pub data_lines: u64,
    /// The first few malformed lines: line number and why.
    pub samples: Vec<(u64, String)>,
}

/// Malformed lines remembered for the status and the log.
const MAX_SAMPLES: usize = 5;

impl ParsedList {
    fn bad(&mut self, number: u64, why: impl Into<String>) {
        self.bad_lines += 1;
        self.data_lines += 1;
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push((number, why.into()));
        }
    }

    /// Bad lines as a percentage of data lines (0 for an empty list).
    pub fn bad_percent(&self) -> u64 {
        (self.bad_lines * 100).checked_div(self.data_lines).unwrap_or(0)
    }
}

/// Parses one address or CIDR; host bits must be clear.
pub fn parse_entry(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty entry".into());
    }
    let net = if text.contains('/') {
        let net: IpNet = text.parse().map_err(|_| format!("not a CIDR: {}", clip(text)))?;
        if net.trunc() != net {
            return Err(format!("host bits set in {net}"));
        }
        net
    } else {
        let ip: IpAddr = text.parse().map_err(|_| format!("not an address: {}", clip(text)))?;
        IpNet::from(ip)
    };
    Ok(canonical_net(net))
}

/// Up to 40 characters of `text`, for messages.
fn clip(text: &str) -> String {
    let clipped: String = text.chars().take(40).collect();
    crate::text::escape(&clipped).into_owned()
}

fn label(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let kept: String = text.chars().filter(|c| !c.is_control()).take(MAX_LABEL_CHARS).collect();
    Some(kept)
}

/// One CSV field of `line` (1-based `column`), unquoted.
fn csv_field(line: &str, column: usize) -> Option<String> {
    crate::transfer::csv_fields(line).into_iter().nth(column.checked_sub(1)?)
}

/// Parses a whole list.
pub fn parse(body: &[u8], options: &ParseOptions) -> ParsedList {
    let mut list = ParsedList::default();
    let mut header_pending = options.format == FeedFormat::Csv && options.csv_header;
    for (index, raw) in body.split(|b| *b == b'\n').enumerate() {
        let number = index as u64 + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.len() > MAX_LINE_BYTES {
            list.bad(number, format!("line longer than {MAX_LINE_BYTES} bytes"));
            continue;
        }
        let Ok(line) = std::str::from_utf8(raw) else {
            list.bad(number, "not UTF-8");
            continue;
        };
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() {
            continue;
        }
        let (entry, tag) = match options.format {
            FeedFormat::Drop => {
                if line.starts_with(';') {
                    continue;
                }
                match line.split_once(';') {
                    Some((entry, tag)) => (entry.to_owned(), label(tag)),
                    None => (line.to_owned(), None),
                }
            }
            FeedFormat::Plain => {
                if line.starts_with('#') {
                    continue;
                }
                match line.split_once('#') {
                    Some((entry, tag)) => (entry.to_owned(), label(tag)),
                    None => (line.to_owned(), None),
                }
            }
            FeedFormat::Csv => {
                if line.starts_with('#') {
                    continue;
                }
                if header_pending {
                    header_pending = false;
                    continue;
                }
                match csv_field(line, options.csv_column) {
                    Some(field) => (field, None),
                    None => {
                        list.bad(number, format!("no column {}", options.csv_column));
                        continue;
                    }
                }
            }
        };
        if entry.chars().any(char::is_control) {
            list.bad(number, "control characters");
            continue;
        }
        match parse_entry(&entry) {
            Ok(net) => {
                list.data_lines += 1;
                list.entries.entry(net).or_insert(tag);
            }
            Err(why) => list.bad(number, why),
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(format: FeedFormat) -> ParseOptions {
        ParseOptions { format, csv_column: 1, csv_header: false }
    }

    fn nets(list: &ParsedList) -> Vec<String> {
        list.entries.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn drop_format_with_hostile_lines() {
        let mut body = b"; Spamhaus DROP List 2026/11/28\n; Expires: x\n\
            192.0.2.0/24 ; SBL123\r\n\
            198.51.100.0/25;SBL456\n\
            203.0.113.7/24 ; SBL9 host bits\n\
            not-an-ip ; SBL1\n\
            \n\
            2001:db8::/32 ; SBL77\n\
            ::ffff:203.0.113.128/121 ; mapped\n\
            192.0.2.0/24 ; duplicate\n"
            .to_vec();
        body.extend_from_slice(b"\xff\xfe/24 ; not utf-8\n");
        body.extend_from_slice(&[b'1'; 2000]);
        body.extend_from_slice(b"\n198.51.100.200/33\n");
        let list = parse(&body, &opts(FeedFormat::Drop));
        assert_eq!(nets(&list), ["192.0.2.0/24", "198.51.100.0/25", "203.0.113.128/25", "2001:db8::/32"]);
        assert_eq!(list.entries[&"192.0.2.0/24".parse().unwrap()].as_deref(), Some("SBL123"));
        assert_eq!(list.bad_lines, 5, "{:?}", list.samples);
        assert_eq!(list.data_lines, 10);
        assert_eq!(list.bad_percent(), 50);
        assert!(list.samples[0].1.contains("host bits"), "{:?}", list.samples);
    }

    #[test]
    fn plain_format_with_comments() {
        let body = "# a list\n203.0.113.5\n203.0.113.6 # scanner\n  198.51.100.0/24  \n\
                    2001:db8::1\nhttp://example.invalid/\n203.0.113.5\n1.2.3.4.5\n\t\n";
        let list = parse(body.as_bytes(), &opts(FeedFormat::Plain));
        assert_eq!(nets(&list), ["198.51.100.0/24", "203.0.113.5/32", "203.0.113.6/32", "2001:db8::1/128"]);
        assert_eq!(list.entries[&"203.0.113.6/32".parse().unwrap()].as_deref(), Some("scanner"));
        assert_eq!(list.bad_lines, 2);
    }

    #[test]
    fn csv_format_by_column() {
        let body = "first_seen,ip,score\n# comment\n2026-11-01,203.0.113.9,5\n\
                    2026-11-02,\"198.51.100.0/24\",7\n2026-11-03\n2026-11-04,,1\n\"2026\",\"203.0.113.10\",\"x,y\"\n";
        let options = ParseOptions { format: FeedFormat::Csv, csv_column: 2, csv_header: true };
        let list = parse(body.as_bytes(), &options);
        assert_eq!(nets(&list), ["198.51.100.0/24", "203.0.113.9/32", "203.0.113.10/32"]);
        assert_eq!(list.bad_lines, 2, "{:?}", list.samples);
        // Without the header option the header row is a bad line.
        let list = parse(body.as_bytes(), &ParseOptions { csv_header: false, ..options });
        assert_eq!(list.bad_lines, 3);
    }

    #[test]
    fn empty_and_binary_bodies_do_not_panic() {
        assert_eq!(parse(b"", &opts(FeedFormat::Drop)), ParsedList::default());
        let noise: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        for format in [FeedFormat::Drop, FeedFormat::Plain, FeedFormat::Csv] {
            let list = parse(&noise, &opts(format));
            assert!(list.entries.is_empty());
            assert!(list.bad_lines > 0);
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512), column in 0usize..4) {
            for format in [FeedFormat::Drop, FeedFormat::Plain, FeedFormat::Csv] {
                let list = parse(&body, &ParseOptions { format, csv_column: column, csv_header: column == 2 });
                proptest::prop_assert!(list.bad_lines <= list.data_lines);
            }
        }
    }
}
