//! The time zone in which zone-less Exim timestamps are read.
//!
//! Exim writes local wall-clock time unless `log_timezone` adds an offset.
//! The agent converts such times to UTC with the configured zone (`timezone`
//! in the agent config: `"local"`, `"UTC"` or an IANA name). Lookups go
//! through `jiff`'s zone database; [`super::Parser`] caches the offset per
//! quarter hour of wall-clock time, so the hot path does one comparison.
//! Ambiguous wall-clock times (the repeated hour when clocks go back) take
//! the earlier offset; times in a gap (clocks go forward) the later one.

use std::str::FromStr;

use jiff::tz::TimeZone;

/// A time-zone setting could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum TimezoneError {
    /// `"local"` was asked for and the system zone cannot be determined.
    #[error("the system time zone cannot be determined: {0}")]
    System(String),
    /// The name is not in the time-zone database.
    #[error("unknown time zone {name:?}: {message}")]
    Unknown {
        /// The name as configured.
        name: String,
        /// Why it could not be loaded.
        message: String,
    },
}

/// How zone-less timestamps are converted to UTC.
#[derive(Debug, Clone)]
pub enum Timezone {
    /// Timestamps are already UTC.
    Utc,
    /// A zone from the time-zone database (or the system's zone).
    Zone(TimeZone),
}

impl Timezone {
    /// Resolves a config value: `"local"` (the system zone), `"UTC"`, or an
    /// IANA name such as `"Europe/Berlin"`.
    pub fn from_config(value: &str) -> Result<Timezone, TimezoneError> {
        match value {
            "UTC" | "utc" | "Etc/UTC" | "Z" => Ok(Timezone::Utc),
            "local" => {
                let tz = TimeZone::try_system().map_err(|e| TimezoneError::System(e.to_string()))?;
                Ok(Timezone::Zone(tz))
            }
            name => TimeZone::get(name)
                .map(Timezone::Zone)
                .map_err(|e| TimezoneError::Unknown { name: name.to_owned(), message: e.to_string() }),
        }
    }

    /// The UTC offset, in seconds east, in force at a wall-clock time given
    /// as civil seconds (the wall-clock reading as if it were UTC).
    pub fn offset_at_civil(&self, civil_secs: i64) -> i32 {
        let Timezone::Zone(tz) = self else { return 0 };
        let Ok(as_utc) = jiff::Timestamp::from_second(civil_secs) else { return 0 };
        let dt = as_utc.to_zoned(TimeZone::UTC).datetime();
        match tz.to_ambiguous_timestamp(dt).compatible() {
            // The difference is a zone offset, well inside i32.
            Ok(ts) => (civil_secs - ts.as_second()) as i32,
            Err(_) => 0,
        }
    }
}

impl FromStr for Timezone {
    type Err = TimezoneError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Timezone::from_config(s)
    }
}

impl<'de> serde::Deserialize<'de> for Timezone {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Timezone::from_config(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names() {
        assert!(matches!(Timezone::from_config("UTC").unwrap(), Timezone::Utc));
        let berlin = Timezone::from_config("Europe/Berlin").unwrap();
        // 2026-01-15 12:00 (winter, +01:00) and 2026-07-15 12:00 (summer, +02:00).
        assert_eq!(berlin.offset_at_civil(1_768_478_400), 3600);
        assert_eq!(berlin.offset_at_civil(1_784_116_800), 7200);
        let err = Timezone::from_config("Mars/Olympus").unwrap_err();
        assert!(err.to_string().contains("Mars/Olympus"));
    }
}
