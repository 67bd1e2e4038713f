//! The one way durations are written by operators: in the API's query
//! parameters, the CLI's flags and the admin commands' flags.

use std::time::Duration;

/// Parses a duration: a whole number with a unit `s`, `m`, `h`, `d` or `w`
/// (`90s`, `15m`, `6h`, `7d`, `2w`); a bare number is seconds. `None` for
/// anything else, and for a value that does not fit.
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

/// A [`duration`] that must be longer than zero (a TTL, an expiry), with an
/// error that says what is expected.
pub fn positive_duration(value: &str) -> Result<Duration, String> {
    match duration(value) {
        Some(d) if !d.is_zero() => Ok(d),
        Some(_) => Err(format!("invalid duration {value:?}: must be longer than zero")),
        None => Err(format!("invalid duration {value:?}: use a whole number with s, m, h, d or w, e.g. 24h")),
    }
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
        assert_eq!(duration("0"), Some(Duration::ZERO));
        for bad in ["", "h", "1y", "-1h", "1.5h", "6 hours", "99999999999999999999d", "999999999999999999w"] {
            assert_eq!(duration(bad), None, "{bad}");
        }
        assert_eq!(positive_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(positive_duration("0h").unwrap_err().contains("longer than zero"));
        assert!(positive_duration("soon").unwrap_err().contains("e.g. 24h"));
    }
}
