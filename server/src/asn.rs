//! Autonomous-system data: which network an address belongs to.
//!
//! `fleetban-server asn import FILE` loads the public iptoasn
//! `ip2asn-combined.tsv` (one range per line: `range_start`, `range_end`,
//! `AS_number`, `country_code`, `AS_description`, tab-separated) into
//! `asn_ranges`, replacing what was there in one transaction. Ranges of AS 0
//! ("Not routed") are skipped; malformed lines are skipped and counted, never
//! fatal. Abuse reports and the attacker views show the AS number, name and
//! country of an address when the table holds its range.

use std::io::BufRead;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Rows inserted per statement.
const CHUNK: usize = 5_000;

/// One range of the iptoasn table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsnRange {
    /// First address.
    pub start: IpAddr,
    /// Last address.
    pub end: IpAddr,
    /// AS number.
    pub asn: u32,
    /// Two-letter country code (`None` in the file becomes empty).
    pub country: String,
    /// AS description.
    pub name: String,
}

/// What an address's AS is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AsnInfo {
    /// AS number.
    pub asn: i64,
    /// AS description.
    pub name: String,
    /// Two-letter country code; empty when unknown.
    pub country: String,
}

/// Why a line of the file was not a range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// Fewer than five tab-separated fields.
    #[error("expected 5 tab-separated fields")]
    Fields,
    /// A bad address.
    #[error("bad address {0:?}")]
    Address(String),
    /// Start and end of different families, or start after end.
    #[error("range {0} - {1} is inverted or mixes address families")]
    Range(IpAddr, IpAddr),
    /// A bad AS number.
    #[error("bad AS number {0:?}")]
    Asn(String),
}

/// Errors of an import.
#[derive(Debug, thiserror::Error)]
pub enum AsnError {
    /// The file could not be read.
    #[error("cannot read the ASN file: {0}")]
    Io(#[from] std::io::Error),
    /// The file is gzip-compressed.
    #[error("the ASN file is gzip-compressed; decompress it first (gunzip ip2asn-combined.tsv.gz)")]
    Compressed,
    /// No line of the file was a range.
    #[error("no valid range in the ASN file ({skipped} malformed lines)")]
    Empty {
        /// Malformed lines.
        skipped: u64,
    },
    /// The database failed.
    #[error("ASN database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Counts of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportStats {
    /// Ranges stored.
    pub ranges: u64,
    /// Lines of AS 0 ("Not routed"), skipped.
    pub unrouted: u64,
    /// Malformed lines, skipped.
    pub malformed: u64,
}

/// Parses one line; `Ok(None)` for a blank line or an unrouted range.
pub fn parse_line(line: &str) -> Result<Option<AsnRange>, LineError> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let mut fields = line.splitn(5, '\t');
    let mut next = || fields.next().ok_or(LineError::Fields);
    let (start, end, asn, country, name) = (next()?, next()?, next()?, next()?, next()?);
    let start: IpAddr = start.trim().parse().map_err(|_| LineError::Address(start.to_owned()))?;
    let end: IpAddr = end.trim().parse().map_err(|_| LineError::Address(end.to_owned()))?;
    if start.is_ipv4() != end.is_ipv4() || start > end {
        return Err(LineError::Range(start, end));
    }
    let asn: u32 = asn.trim().parse().map_err(|_| LineError::Asn(asn.to_owned()))?;
    if asn == 0 {
        return Ok(None);
    }
    let country = match country.trim() {
        "None" => String::new(),
        c => c.to_owned(),
    };
    Ok(Some(AsnRange { start, end, asn, country, name: name.trim().to_owned() }))
}

/// Replaces `asn_ranges` with the ranges read from `reader`.
pub async fn import(pool: &PgPool, mut reader: impl BufRead) -> Result<ImportStats, AsnError> {
    if reader.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        return Err(AsnError::Compressed);
    }
    let mut stats = ImportStats::default();
    let mut ranges = Vec::new();
    let mut line = String::new();
    let mut number = 0u64;
    loop {
        line.clear();
        // A line that is not UTF-8 is counted like any malformed line.
        let read = match reader.read_line(&mut line) {
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                stats.malformed += 1;
                let mut skip = Vec::new();
                reader.read_until(b'\n', &mut skip)?;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        if read == 0 {
            break;
        }
        number += 1;
        match parse_line(&line) {
            Ok(Some(range)) => ranges.push(range),
            Ok(None) => {
                if !line.trim().is_empty() {
                    stats.unrouted += 1;
                }
            }
            Err(error) => {
                stats.malformed += 1;
                if stats.malformed <= 10 {
                    tracing::warn!(%error, line = number, "Skipping a malformed ASN line.");
                }
            }
        }
    }
    if ranges.is_empty() {
        return Err(AsnError::Empty { skipped: stats.malformed });
    }
    // Overlapping starts would violate the primary key: keep the first.
    ranges.sort_by_key(|a| a.start);
    ranges.dedup_by(|b, a| {
        let dup = a.start == b.start;
        if dup {
            stats.malformed += 1;
        }
        dup
    });

    let mut tx = pool.begin().await?;
    sqlx::query("delete from asn_ranges").execute(&mut *tx).await?;
    for chunk in ranges.chunks(CHUNK) {
        let starts: Vec<IpNet> = chunk.iter().map(|r| IpNet::from(r.start)).collect();
        let ends: Vec<IpNet> = chunk.iter().map(|r| IpNet::from(r.end)).collect();
        let asns: Vec<i64> = chunk.iter().map(|r| i64::from(r.asn)).collect();
        let countries: Vec<&str> = chunk.iter().map(|r| r.country.as_str()).collect();
        let names: Vec<&str> = chunk.iter().map(|r| r.name.as_str()).collect();
        sqlx::query(
            "insert into asn_ranges (range_start, range_end, asn, country, name) \
             select * from unnest($1::inet[], $2::inet[], $3::bigint[], $4::text[], $5::text[])",
        )
        .bind(&starts)
        .bind(&ends)
        .bind(&asns)
        .bind(&countries)
        .bind(&names)
        .execute(&mut *tx)
        .await?;
        stats.ranges += chunk.len() as u64;
    }
    tx.commit().await?;
    Ok(stats)
}

/// The SQL expression (a lateral subquery body) that finds the AS of the
/// inet expression `addr`; used by the API's attacker and report queries.
pub fn lookup_sql(addr: &str) -> String {
    format!(
        "select r.asn, r.name, r.country from (select * from asn_ranges where range_start <= {addr} \
         order by range_start desc limit 1) r where r.range_end >= {addr}"
    )
}

/// The AS of `ip`, if a loaded range holds it.
pub async fn lookup(pool: &PgPool, ip: IpAddr) -> Result<Option<AsnInfo>, sqlx::Error> {
    sqlx::query_as::<_, AsnInfo>(&lookup_sql("$1::inet")).bind(IpNet::from(ip)).fetch_optional(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "1.0.0.0\t1.0.0.255\t13335\tUS\tCLOUDFLARENET\n\
                          1.0.1.0\t1.0.3.255\t0\tNone\tNot routed\n\
                          203.0.113.0\t203.0.113.255\t64500\tNL\tEXAMPLE-NET documentation range\n\
                          this line is broken\n\
                          2001:db8::\t2001:db8:ffff:ffff:ffff:ffff:ffff:ffff\t64501\tDE\tEXAMPLE-V6\n\
                          9.9.9.9\t9.9.9.1\t1\tUS\tinverted\n";

    #[test]
    fn parses_lines() {
        let range = parse_line("203.0.113.0\t203.0.113.255\t64500\tNL\tEXAMPLE NET\r\n").unwrap().unwrap();
        assert_eq!(range.asn, 64500);
        assert_eq!(range.name, "EXAMPLE NET");
        assert_eq!(parse_line("1.0.1.0\t1.0.3.255\t0\tNone\tNot routed").unwrap(), None);
        assert_eq!(parse_line("1.0.1.0\t1.0.3.255"), Err(LineError::Fields));
        assert!(matches!(parse_line("1.0.1.0\t::1\t5\tUS\tx"), Err(LineError::Range(..))));
        assert!(matches!(parse_line("1.0.1.0\t1.0.1.9\tAS5\tUS\tx"), Err(LineError::Asn(_))));
        assert_eq!(parse_line("x\t1.1.1.1\t1\tUS\ty"), Err(LineError::Address("x".into())));
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn imports_and_looks_up(pool: PgPool) {
        let stats = import(&pool, SAMPLE.as_bytes()).await.unwrap();
        assert_eq!(stats, ImportStats { ranges: 3, unrouted: 1, malformed: 2 });
        let info = lookup(&pool, "203.0.113.77".parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(info, AsnInfo { asn: 64500, name: "EXAMPLE-NET documentation range".into(), country: "NL".into() });
        let v6 = lookup(&pool, "2001:db8::5".parse().unwrap()).await.unwrap().unwrap();
        assert_eq!((v6.asn, v6.country.as_str()), (64501, "DE"));
        // Between ranges and in the unrouted gap: nothing.
        assert_eq!(lookup(&pool, "1.0.2.1".parse().unwrap()).await.unwrap(), None);
        assert_eq!(lookup(&pool, "198.51.100.1".parse().unwrap()).await.unwrap(), None);

        // A second import replaces the table.
        import(&pool, "198.51.100.0\t198.51.100.255\t64502\tFR\tOTHER\n".as_bytes()).await.unwrap();
        assert_eq!(lookup(&pool, "203.0.113.77".parse().unwrap()).await.unwrap(), None);
        assert_eq!(lookup(&pool, "198.51.100.1".parse().unwrap()).await.unwrap().unwrap().asn, 64502);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn refuses_gzip_and_empty_files(pool: PgPool) {
        assert!(matches!(import(&pool, &[0x1f, 0x8b, 8, 0][..]).await, Err(AsnError::Compressed)));
        assert!(matches!(import(&pool, "garbage\n".as_bytes()).await, Err(AsnError::Empty { skipped: 1 })));
    }
}
