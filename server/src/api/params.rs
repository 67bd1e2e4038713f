//! Parsing and validation of the query and body values the endpoints share:
//! addresses and ranges, times and durations, page sizes and cursors.
//!
//! Every function returns [`ApiError::BadRequest`] with a message that names
//! the parameter, so a client always learns which value was wrong.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::error::ApiError;

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: i64 = 100;
/// Largest page size.
pub const MAX_LIMIT: i64 = 1000;

/// Validates `limit` (1..=[`MAX_LIMIT`], default [`DEFAULT_LIMIT`]).
pub fn limit(value: Option<i64>) -> Result<i64, ApiError> {
    match value {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}, got {n}"))),
    }
}

/// Parses an address (`203.0.113.7`) as a host range, or a CIDR
/// (`203.0.113.0/24`) with its host bits cleared.
pub fn cidr(name: &str, value: &str) -> Result<IpNet, ApiError> {
    let value = value.trim();
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    value
        .parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| ApiError::bad_request(format!("{name}: {value:?} is not an IP address or CIDR")))
}

/// Parses a single address.
pub fn ip(name: &str, value: &str) -> Result<IpAddr, ApiError> {
    value.trim().parse::<IpAddr>().map_err(|_| ApiError::bad_request(format!("{name}: {value:?} is not an IP address")))
}

/// Parses a duration: a number with a unit `s`, `m`, `h`, `d` or `w`
/// (`90s`, `15m`, `6h`, `7d`); a bare number is seconds.
pub fn duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return None,
    };
    number.checked_mul(unit_secs).map(Duration::from_secs)
}

/// Parses a point in time: RFC 3339 (`2026-11-27T01:00:00Z`) or a duration
/// before now (`1h` = one hour ago).
pub fn time(name: &str, value: &str) -> Result<OffsetDateTime, ApiError> {
    if let Ok(t) = OffsetDateTime::parse(value.trim(), &Rfc3339) {
        return Ok(t);
    }
    duration(value)
        .and_then(|d| time::Duration::try_from(d).ok())
        .and_then(|d| OffsetDateTime::now_utc().checked_sub(d))
        .ok_or_else(|| {
            ApiError::bad_request(format!("{name}: {value:?} is neither an RFC 3339 time nor a duration like 1h"))
        })
}

/// Formats a keyset cursor of a `(time, id)` ordering.
pub fn time_cursor(t: OffsetDateTime, id: i64) -> String {
    format!("{}.{}", t.unix_timestamp_nanos(), id)
}

/// Parses a cursor made by [`time_cursor`].
pub fn parse_time_cursor(value: &str) -> Result<(OffsetDateTime, i64), ApiError> {
    let bad = || ApiError::bad_request(format!("cursor: {value:?} is not a cursor returned by this API"));
    let (nanos, id) = value.split_once('.').ok_or_else(bad)?;
    let nanos: i128 = nanos.parse().map_err(|_| bad())?;
    let id: i64 = id.parse().map_err(|_| bad())?;
    let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| bad())?;
    Ok((t, id))
}

/// Parses an id cursor (the last id of the previous page).
pub fn parse_id_cursor(value: &str) -> Result<i64, ApiError> {
    value.parse().map_err(|_| ApiError::bad_request(format!("cursor: {value:?} is not a cursor returned by this API")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(duration("6h"), Some(Duration::from_secs(21_600)));
        assert_eq!(duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(duration("1w"), Some(Duration::from_secs(604_800)));
        for bad in ["", "h", "1y", "-1h", "1.5h", "99999999999999999999d"] {
            assert_eq!(duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn cidrs_are_truncated_and_hosts_accepted() {
        assert_eq!(cidr("cidr", "203.0.113.9/24").unwrap().to_string(), "203.0.113.0/24");
        assert_eq!(cidr("cidr", "203.0.113.9").unwrap().to_string(), "203.0.113.9/32");
        assert_eq!(cidr("cidr", "2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
        let err = cidr("cidr", "203.0.113.300").unwrap_err();
        assert!(err.to_string().contains("cidr"), "{err}");
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_790_000_000_123_456_789).unwrap();
        assert_eq!(parse_time_cursor(&time_cursor(t, 42)).unwrap(), (t, 42));
        assert!(parse_time_cursor("x.1").is_err());
        assert!(parse_time_cursor("12").is_err());
        assert!(parse_id_cursor("abc").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some(MAX_LIMIT)).unwrap(), MAX_LIMIT);
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(MAX_LIMIT + 1)).is_err());
    }
}
