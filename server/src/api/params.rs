//! Parsing and validation of the query and body values the endpoints share:
//! addresses and ranges, times and durations, page sizes and cursors.
//!
//! Every function returns [`ApiError::BadRequest`] with a message that names
//! the parameter, so a client always learns which value was wrong, and none
//! panics on any input (a property test feeds them arbitrary strings).
//! Addresses come back in their canonical form
//! ([`fleetban_proto::canonical_net`]: `::ffff:127.0.0.1` is `127.0.0.1`), so
//! every policy check sees the IPv4 address behind a mapped spelling. Times
//! are refused outside [`EARLIEST`]..=[`LATEST`], which Postgres and the
//! cursor arithmetic both handle.

use std::net::IpAddr;

use fleetban_proto::{canonical_ip, canonical_net};
use ipnet::IpNet;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;

use super::error::ApiError;

/// Page size when `limit` is absent.
pub const DEFAULT_LIMIT: i64 = 100;
/// Largest page size.
pub const MAX_LIMIT: i64 = 1000;
/// The earliest time a parameter may name (no event is older than Unix time).
pub const EARLIEST: OffsetDateTime = OffsetDateTime::UNIX_EPOCH;
/// The latest time a parameter may name.
pub const LATEST: OffsetDateTime = datetime!(9999-12-31 23:59:59 UTC);
/// Longest input a parser looks at, bytes; longer values are refused
/// before any parsing.
const MAX_VALUE_BYTES: usize = 256;

fn too_long(name: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::bad_request(format!("{name}: longer than {MAX_VALUE_BYTES} bytes")));
    }
    Ok(())
}

/// Refuses a time outside [`EARLIEST`]..=[`LATEST`].
fn in_range(name: &str, t: OffsetDateTime) -> Result<OffsetDateTime, ApiError> {
    if (EARLIEST..=LATEST).contains(&t) {
        Ok(t)
    } else {
        Err(ApiError::bad_request(format!("{name}: {t} is outside {EARLIEST} to {LATEST}")))
    }
}

/// Validates `limit` (1..=[`MAX_LIMIT`], default [`DEFAULT_LIMIT`]).
pub fn limit(value: Option<i64>) -> Result<i64, ApiError> {
    match value {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}, got {n}"))),
    }
}

/// Parses an address (`203.0.113.7`) as a host range, or a CIDR
/// (`203.0.113.0/24`) with its host bits cleared; in canonical form.
pub fn cidr(name: &str, value: &str) -> Result<IpNet, ApiError> {
    too_long(name, value)?;
    let value = value.trim();
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(IpNet::from(canonical_ip(ip)));
    }
    value
        .parse::<IpNet>()
        .map(canonical_net)
        .map_err(|_| ApiError::bad_request(format!("{name}: {value:?} is not an IP address or CIDR")))
}

/// Parses a single address, in canonical form.
pub fn ip(name: &str, value: &str) -> Result<IpAddr, ApiError> {
    too_long(name, value)?;
    value
        .trim()
        .parse::<IpAddr>()
        .map(canonical_ip)
        .map_err(|_| ApiError::bad_request(format!("{name}: {value:?} is not an IP address")))
}

pub use crate::units::duration;

/// Parses a point in time: RFC 3339 (`2026-11-27T01:00:00Z`) or a duration
/// before now (`1h` = one hour ago).
/// Refused outside [`EARLIEST`]..=[`LATEST`].
pub fn time(name: &str, value: &str) -> Result<OffsetDateTime, ApiError> {
    too_long(name, value)?;
    if let Ok(t) = OffsetDateTime::parse(value.trim(), &Rfc3339) {
        return in_range(name, t);
    }
    let t = duration(value)
        .and_then(|d| time::Duration::try_from(d).ok())
        .and_then(|d| OffsetDateTime::now_utc().checked_sub(d))
        .ok_or_else(|| {
            ApiError::bad_request(format!("{name}: {value:?} is neither an RFC 3339 time nor a duration like 1h"))
        })?;
    in_range(name, t)
}

/// Formats a keyset cursor of a `(time, id)` ordering.
pub fn time_cursor(t: OffsetDateTime, id: i64) -> String {
    format!("{}.{}", t.unix_timestamp_nanos(), id)
}

/// Parses a cursor made by [`time_cursor`].
/// Its time must lie in [`EARLIEST`]..=[`LATEST`].
pub fn parse_time_cursor(value: &str) -> Result<(OffsetDateTime, i64), ApiError> {
    too_long("cursor", value)?;
    let bad = || ApiError::bad_request(format!("cursor: {value:?} is not a cursor returned by this API"));
    let (nanos, id) = value.split_once('.').ok_or_else(bad)?;
    let nanos: i128 = nanos.parse().map_err(|_| bad())?;
    let id: i64 = id.parse().map_err(|_| bad())?;
    let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| bad())?;
    if !(EARLIEST..=LATEST).contains(&t) {
        return Err(bad());
    }
    Ok((t, id))
}

/// Parses an id cursor (the last id of the previous page).
pub fn parse_id_cursor(value: &str) -> Result<i64, ApiError> {
    too_long("cursor", value)?;
    value.parse().map_err(|_| ApiError::bad_request(format!("cursor: {value:?} is not a cursor returned by this API")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Strategy, any, prop_oneof};

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
    fn mapped_addresses_come_back_as_ipv4() {
        assert_eq!(cidr("cidr", "::ffff:127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(cidr("cidr", "::ffff:0.0.0.0/96").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(cidr("cidr", "::ffff:198.51.100.9/120").unwrap().to_string(), "198.51.100.0/24");
        assert_eq!(ip("ip", "::ffff:203.0.113.7").unwrap().to_string(), "203.0.113.7");
    }

    #[test]
    fn the_reported_inputs_are_400() {
        for cursor in ["-377705116800000000000.1", "253402300800000000000.1", "-1.1", "1e3.1"] {
            assert_eq!(parse_time_cursor(cursor).unwrap_err().status_code(), 400, "{cursor}");
        }
        for since in ["2500000d", "0000-01-01T00:00:00Z", "1969-12-31T23:59:59Z"] {
            assert_eq!(time("since", since).unwrap_err().status_code(), 400, "{since}");
        }
        assert!(time("since", "1970-01-01T00:00:00Z").is_ok());
        assert_eq!(cidr("cidr", &"1".repeat(10_000)).unwrap_err().status_code(), 400);
    }

    /// Strings shaped like the values the parsers expect, and any string.
    fn values() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "-?[0-9]{0,30}\\.-?[0-9]{0,25}",
            "[0-9]{0,25}[smhdwy]?",
            "[0-9]{1,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})",
            "[0-9a-fA-F:.]{0,45}(/[0-9]{1,3})?",
            "::ffff:[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3})?",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2_000))]

        /// Any input is a value or a 400, never a panic; and what the events
        /// list computes from valid values (the end of its search, the
        /// slices) never panics either.
        #[test]
        fn parsers_answer_any_input_with_a_value_or_400(
            a in values(), b in values(), c in values(), n in any::<i64>()
        ) {
            let bad = |e: ApiError| e.status_code() == 400;
            proptest::prop_assert!(limit(Some(n)).map_or_else(bad, |l| (1..=MAX_LIMIT).contains(&l)));
            for value in [&a, &b, &c] {
                proptest::prop_assert!(cidr("ip", value).map_or_else(bad, |_| true));
                proptest::prop_assert!(ip("ip", value).map_or_else(bad, |ip| ip.to_canonical() == ip));
                proptest::prop_assert!(parse_id_cursor(value).map_or_else(bad, |_| true));
                let _ = duration(value);
            }
            let since = time("since", &a);
            let until = time("until", &b);
            let cursor = parse_time_cursor(&c);
            for t in [&since, &until] {
                proptest::prop_assert!(t.as_ref().map_or_else(|e| e.status_code() == 400, |t| (EARLIEST..=LATEST).contains(t)));
            }
            proptest::prop_assert!(cursor.as_ref().map_or_else(|e| e.status_code() == 400, |(t, _)| (EARLIEST..=LATEST).contains(t)));
            // As `events::list` does.
            let end = [cursor.ok().map(|c| c.0), until.ok()]
                .into_iter()
                .flatten()
                .fold(crate::eventlog::latest_possible(), OffsetDateTime::min);
            for slice in crate::eventlog::slices(end, since.ok()) {
                let _ = slice.to_exclusive();
            }
        }
    }

    #[test]
    fn limits() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit(Some(MAX_LIMIT)).unwrap(), MAX_LIMIT);
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(MAX_LIMIT + 1)).is_err());
    }
}
