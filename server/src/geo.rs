//! ASN and country policy (`[geo]` in the server TOML): what the fleet
//! does about whole networks.
//!
//! - **ASN block rules** (`[[geo.block_asn]]`): every range the imported
//!   ASN table (`asn_ranges`, [`crate::asn`]) gives an AS becomes a block
//!   with `source = policy` (reason `asn`), kept by the same refresher as
//!   blocklist feeds ([`crate::feeds`], list name `asn:<number>`): carved
//!   around the allowlist, `never_block` and the fleet's own addresses,
//!   extended while the rule stands, retired when the table no longer
//!   gives the range, held when the table shrank by more than half.
//! - **Evidence multipliers** (`[[geo.evidence]]`): for an address of a
//!   given AS or country, every automatic threshold of the correlation
//!   (`per_host`, `fleet`, `distinct_users`) is multiplied by
//!   `factor_percent` / 100: 200 requires twice the evidence, 50 half. An
//!   AS rule wins over a country rule. Factors are bounded to
//!   [`MIN_FACTOR_PERCENT`]..=[`MAX_FACTOR_PERCENT`], a rule that never
//!   blocks (threshold 0) stays off, a lowered threshold is at least 1, and
//!   good standing, protected senders, the allowlist and `never_block`
//!   still win (they are checked after and apart from the thresholds).
//! - **Country** of an address: from the operator's country database in
//!   MaxMind DB format (`country_mmdb_path`: DB-IP "IP to Country Lite" or
//!   MaxMind GeoLite2-Country), else the country of its AS in `asn_ranges`.
//!
//! Correlation calls [`GeoPolicy::adjust_rules`] once per judged range.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetban_proto::policy::{Rules, Scenario};
use ipnet::IpNet;
use serde::Deserialize;
use sqlx::PgConnection;

pub use crate::feeds::asn::{AsnBlockRule, range_cidrs};
use crate::telemetry::POLICY_THRESHOLD_ADJUSTED;

/// Lowest evidence multiplier, percent: no rule halves the evidence more.
pub const MIN_FACTOR_PERCENT: u32 = 50;
/// Highest evidence multiplier, percent.
pub const MAX_FACTOR_PERCENT: u32 = 1_000;

/// `[geo]`: ASN and country policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
    /// A country database in MaxMind DB format (DB-IP "IP to Country
    /// Lite" or MaxMind GeoLite2-Country `.mmdb`), read at start. Default:
    /// none (countries come from the imported ASN table).
    pub country_mmdb_path: Option<PathBuf>,
    /// ASNs whose every range is blocked. Default: none.
    pub block_asn: Vec<AsnBlockRule>,
    /// Evidence multipliers by AS or country. Default: none.
    pub evidence: Vec<EvidenceRule>,
}

/// `[[geo.evidence]]`: an evidence multiplier for one AS or one country.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceRule {
    /// The AS number (exactly one of `asn` and `country`).
    pub asn: Option<u32>,
    /// The two-letter country code, e.g. `"NL"`.
    pub country: Option<String>,
    /// Thresholds are multiplied by this / 100 (50 to 1000): 200 needs twice
    /// the evidence, 50 half. Required.
    pub factor_percent: u32,
}

/// A `[geo]` value that cannot work, or a country database that cannot be
/// read.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// A value is out of range; the message names the key.
    #[error("geo.{key}: {problem}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The country database cannot be read.
    #[error("geo.country_mmdb_path: cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The country database is not a MaxMind DB.
    #[error("geo.country_mmdb_path: {path} is not a MaxMind DB file: {source}")]
    Mmdb {
        /// The file.
        path: PathBuf,
        /// Why.
        source: maxminddb::MaxMindDbError,
    },
}

impl GeoConfig {
    /// Checks every value (not the database file: [`GeoPolicy::load`]).
    pub fn validate(&self) -> Result<(), GeoError> {
        let invalid = |key, problem: String| Err(GeoError::Invalid { key, problem });
        for rule in &self.block_asn {
            if rule.asn == 0 {
                return invalid("block_asn.asn", "AS 0 is not routed".into());
            }
            if !(60..=604_800).contains(&rule.refresh_secs) {
                return invalid("block_asn.refresh_secs", format!("AS{}: must be 60 to 604800", rule.asn));
            }
            if rule.ttl_secs < rule.refresh_secs.saturating_mul(2)
                || Duration::from_secs(rule.ttl_secs) > crate::blocks::MAX_TTL
            {
                return invalid("block_asn.ttl_secs", format!("AS{}: must be at least twice refresh_secs", rule.asn));
            }
            if rule.max_shrink_percent > 100 {
                return invalid("block_asn.max_shrink_percent", format!("AS{}: must be 0 to 100", rule.asn));
            }
        }
        for rule in &self.evidence {
            match (&rule.asn, &rule.country) {
                (Some(_), None) => {}
                (None, Some(c)) if c.len() == 2 && c.chars().all(|c| c.is_ascii_alphabetic()) => {}
                (None, Some(c)) => return invalid("evidence.country", format!("{c:?} is not a two-letter code")),
                _ => return invalid("evidence", "give exactly one of asn and country".into()),
            }
            if !(MIN_FACTOR_PERCENT..=MAX_FACTOR_PERCENT).contains(&rule.factor_percent) {
                return invalid(
                    "evidence.factor_percent",
                    format!("must be {MIN_FACTOR_PERCENT} to {MAX_FACTOR_PERCENT}, got {}", rule.factor_percent),
                );
            }
        }
        Ok(())
    }
}

/// What is known of an address's network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// Its AS, if the ASN table holds its range.
    pub asn: Option<u32>,
    /// Its two-letter country (upper case), from the country database or
    /// the ASN table.
    pub country: Option<String>,
}

/// The loaded `[geo]` policy.
#[derive(Default)]
pub struct GeoPolicy {
    by_asn: BTreeMap<u32, u32>,
    by_country: BTreeMap<String, u32>,
    countries: Option<maxminddb::Reader<Vec<u8>>>,
}

impl std::fmt::Debug for GeoPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoPolicy")
            .field("by_asn", &self.by_asn)
            .field("by_country", &self.by_country)
            .field("countries", &self.countries.as_ref().map(|r| r.metadata().database_type.clone()))
            .finish()
    }
}

impl GeoPolicy {
    /// Validates `config` and reads its country database.
    pub fn load(config: &GeoConfig) -> Result<Self, GeoError> {
        config.validate()?;
        let countries = match &config.country_mmdb_path {
            Some(path) => Some(open_mmdb(path)?),
            None => None,
        };
        let by_asn = config.evidence.iter().filter_map(|r| Some((r.asn?, r.factor_percent))).collect();
        let by_country = config
            .evidence
            .iter()
            .filter_map(|r| Some((r.country.as_ref()?.to_ascii_uppercase(), r.factor_percent)))
            .collect();
        Ok(GeoPolicy { by_asn, by_country, countries })
    }

    /// True when no evidence multiplier is configured.
    pub fn is_neutral(&self) -> bool {
        self.by_asn.is_empty() && self.by_country.is_empty()
    }

    /// The country of `ip` in the country database, if one is loaded and
    /// holds it.
    pub fn mmdb_country(&self, ip: IpAddr) -> Option<String> {
        let reader = self.countries.as_ref()?;
        let ip = fleetban_proto::canonical_ip(ip);
        let found = reader.lookup(ip).ok()?;
        let path = [maxminddb::PathElement::Key("country"), maxminddb::PathElement::Key("iso_code")];
        let code: String = found.decode_path(&path).ok()??;
        (code.len() == 2).then(|| code.to_ascii_uppercase())
    }

    /// The AS and country of `ip`.
    pub async fn origin(&self, conn: &mut PgConnection, ip: IpAddr) -> Result<Origin, sqlx::Error> {
        let ip = fleetban_proto::canonical_ip(ip);
        let info: Option<crate::asn::AsnInfo> = sqlx::query_as(&crate::asn::lookup_sql("$1::inet"))
            .bind(IpNet::from(ip))
            .fetch_optional(&mut *conn)
            .await?;
        let asn = info.as_ref().and_then(|i| u32::try_from(i.asn).ok());
        let country =
            self.mmdb_country(ip).or_else(|| info.map(|i| i.country.to_ascii_uppercase()).filter(|c| c.len() == 2));
        Ok(Origin { asn, country })
    }

    /// The evidence multiplier for `origin`, percent (100 = none): the AS's
    /// rule, else the country's.
    pub fn factor_percent(&self, origin: &Origin) -> u32 {
        origin
            .asn
            .and_then(|asn| self.by_asn.get(&asn))
            .or_else(|| origin.country.as_ref().and_then(|c| self.by_country.get(c)))
            .copied()
            .unwrap_or(100)
    }

    /// The rules `range` is judged with: `rules` scaled by the multiplier
    /// of its network (borrowed when none applies). The one call
    /// correlation makes.
    pub async fn adjust_rules<'r>(
        &self,
        conn: &mut PgConnection,
        range: IpNet,
        rules: &'r Rules,
    ) -> Result<Cow<'r, Rules>, sqlx::Error> {
        if self.is_neutral() {
            return Ok(Cow::Borrowed(rules));
        }
        let origin = self.origin(conn, range.addr()).await?;
        let factor = self.factor_percent(&origin);
        if factor == 100 {
            return Ok(Cow::Borrowed(rules));
        }
        let direction = if factor > 100 { "stronger" } else { "weaker" };
        metrics::counter!(POLICY_THRESHOLD_ADJUSTED, "direction" => direction).increment(1);
        Ok(Cow::Owned(scale(rules, factor)))
    }
}

fn open_mmdb(path: &Path) -> Result<maxminddb::Reader<Vec<u8>>, GeoError> {
    let bytes = std::fs::read(path).map_err(|source| GeoError::Io { path: path.into(), source })?;
    maxminddb::Reader::from_source(bytes).map_err(|source| GeoError::Mmdb { path: path.into(), source })
}

/// One threshold times `factor_percent` / 100, rounded up; 0 (off) stays
/// 0 and a lowered threshold is at least 1.
fn scale_threshold(threshold: u32, factor_percent: u32) -> u32 {
    if threshold == 0 {
        return 0;
    }
    let scaled = (u64::from(threshold) * u64::from(factor_percent)).div_ceil(100);
    u32::try_from(scaled).unwrap_or(u32::MAX).max(1)
}

/// `rules` with every automatic threshold scaled by `factor_percent`
/// (clamped to [`MIN_FACTOR_PERCENT`]..=[`MAX_FACTOR_PERCENT`]). Windows,
/// `min_hosts`, good-standing factors and shadow mode are unchanged.
pub fn scale(rules: &Rules, factor_percent: u32) -> Rules {
    let factor = factor_percent.clamp(MIN_FACTOR_PERCENT, MAX_FACTOR_PERCENT);
    let mut scaled = *rules;
    for scenario in Scenario::ALL {
        let mut rule = *rules.get(scenario);
        rule.per_host = scale_threshold(rule.per_host, factor);
        rule.fleet = scale_threshold(rule.fleet, factor);
        rule.distinct_users = scale_threshold(rule.distinct_users, factor);
        scaled.set(scenario, rule);
    }
    scaled
}

#[cfg(test)]
pub(crate) mod mmdb_writer;
#[cfg(test)]
mod tests;
