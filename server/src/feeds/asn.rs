//! `[[geo.block_asn]]` rules: every range the imported ASN table gives an
//! AS, kept as a blocklist of its own (`asn:<number>`, `source = policy`)
//! by the same refresher as the feeds.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use sqlx::PgPool;

use super::{ListSpec, ParsedList};
use crate::blocks::BlockSource;

/// `[[geo.block_asn]]`: block every range of one AS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsnBlockRule {
    /// The AS number. Required.
    pub asn: u32,
    /// How often the AS's ranges are re-read from the ASN table, seconds
    /// (60 to 604800). Default 3600.
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// How long its blocks last without a refresh, seconds; at least twice
    /// `refresh_secs`. Default 10800.
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// Block ranges broader than `[correlate] min_prefix_v4`/`v6` (an AS's
    /// ranges often are). Default false: such ranges are refused and
    /// counted in the rule's status.
    #[serde(default)]
    pub allow_broad: bool,
    /// A re-read that lost more than this share of the AS's ranges is
    /// refused (the previous ranges stay blocked), percent (0 to 100; 100
    /// accepts any shrink, e.g. after a deliberate re-import). Default 50.
    #[serde(default = "default_max_shrink_percent")]
    pub max_shrink_percent: u32,
}

fn default_max_shrink_percent() -> u32 {
    50
}

fn default_refresh_secs() -> u64 {
    3_600
}
fn default_ttl_secs() -> u64 {
    10_800
}

impl AsnBlockRule {
    /// The list name of the rule: `asn:<number>`.
    pub fn name(&self) -> String {
        format!("asn:{}", self.asn)
    }

    pub(crate) fn spec(&self) -> ListSpec {
        ListSpec {
            name: self.name(),
            kind: "asn",
            origin: format!("AS{}", self.asn),
            source: BlockSource::Policy,
            reason: "asn",
            refresh: Duration::from_secs(self.refresh_secs),
            ttl: Duration::from_secs(self.ttl_secs),
            allow_broad: self.allow_broad,
            max_entries: None,
            max_bad_lines_percent: 100,
            max_shrink_percent: self.max_shrink_percent,
        }
    }

    /// The AS's ranges in the ASN table, as CIDRs.
    pub(crate) async fn entries(&self, pool: &PgPool) -> Result<ParsedList, sqlx::Error> {
        let ranges: Vec<(IpNet, IpNet, String)> =
            sqlx::query_as("select range_start, range_end, name from asn_ranges where asn = $1 order by range_start")
                .bind(i64::from(self.asn))
                .fetch_all(pool)
                .await?;
        let mut list = ParsedList::default();
        for (start, end, name) in ranges {
            let label = Some(format!("AS{} {}", self.asn, crate::text::escape(&name)));
            for net in range_cidrs(start.addr(), end.addr()) {
                list.data_lines += 1;
                list.entries.entry(fleetban_proto::canonical_net(net)).or_insert_with(|| label.clone());
            }
        }
        Ok(list)
    }
}

/// The CIDRs covering exactly `start..=end` (same family; empty otherwise).
pub fn range_cidrs(start: IpAddr, end: IpAddr) -> Vec<IpNet> {
    match (start, end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => ipnet::Ipv4Subnets::new(s, e, 0).map(IpNet::V4).collect(),
        (IpAddr::V6(s), IpAddr::V6(e)) => ipnet::Ipv6Subnets::new(s, e, 0).map(IpNet::V6).collect(),
        _ => Vec::new(),
    }
}
