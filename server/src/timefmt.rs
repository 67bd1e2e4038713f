//! Times in operators' tables (the `fleetban` CLI and the server's admin
//! commands).
//!
//! On a terminal a time is shown relative to now (`3 min ago`, `in 59 min`),
//! which is what an operator reads at a glance; piped or redirected output
//! shows the absolute time in UTC with its zone (`2026-11-28 10:15:00 UTC`),
//! which stays true when it is read later. `--json` prints the API's RFC 3339
//! timestamps unchanged: they always carry their offset (`Z`).

use std::io::IsTerminal as _;

use time::OffsetDateTime;

/// How table times are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Relative to now, for a terminal.
    Relative,
    /// Absolute, UTC, with the zone.
    Absolute,
}

impl Style {
    /// Relative when standard output is a terminal.
    pub fn for_stdout() -> Style {
        if std::io::stdout().is_terminal() { Style::Relative } else { Style::Absolute }
    }
}

/// `time` as a table cell in `style`, relative to `now`.
pub fn format(time: OffsetDateTime, now: OffsetDateTime, style: Style) -> String {
    match style {
        Style::Absolute => {
            let t = time.to_offset(time::UtcOffset::UTC);
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        }
        Style::Relative => {
            let secs = (time - now).whole_seconds();
            let span = span(secs.unsigned_abs());
            match secs {
                -9..=9 => "now".to_owned(),
                s if s < 0 => format!("{span} ago"),
                _ => format!("in {span}"),
            }
        }
    }
}

/// A duration in seconds, rounded down to its largest unit.
fn span(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=3_599 => format!("{} min", secs / 60),
        3_600..=86_399 => {
            let (h, m) = (secs / 3_600, secs % 3_600 / 60);
            if m == 0 || h >= 10 { format!("{h} h") } else { format!("{h} h {m} min") }
        }
        _ => format!("{} d", secs / 86_400),
    }
}

/// `time` as a table cell for standard output, relative to the clock;
/// `-` for none.
pub fn cell(time: Option<OffsetDateTime>) -> String {
    time.map_or_else(|| "-".to_owned(), |t| format(t, OffsetDateTime::now_utc(), Style::for_stdout()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-28 11:00:00 UTC);

    #[test]
    fn relative_times_read_at_a_glance() {
        let cases = [
            (datetime!(2026-11-28 10:57:00 UTC), "3 min ago"),
            (datetime!(2026-11-28 11:59:00 UTC), "in 59 min"),
            (datetime!(2026-11-28 10:59:30 UTC), "30 s ago"),
            (datetime!(2026-11-28 11:00:05 UTC), "now"),
            (datetime!(2026-11-28 08:30:00 UTC), "2 h 30 min ago"),
            (datetime!(2026-11-28 23:00:00 UTC), "in 12 h"),
            (datetime!(2026-11-25 11:00:00 UTC), "3 d ago"),
            // Another offset is the same instant.
            (datetime!(2026-11-28 12:57:00 +02:00), "3 min ago"),
        ];
        for (time, expected) in cases {
            assert_eq!(format(time, NOW, Style::Relative), expected, "{time}");
        }
    }

    #[test]
    fn absolute_times_carry_their_zone() {
        assert_eq!(format(datetime!(2026-11-28 12:57:03 +02:00), NOW, Style::Absolute), "2026-11-28 10:57:03 UTC");
    }
}
