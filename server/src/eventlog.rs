//! Reading the newest events without an ordered index on time.
//!
//! `events` is append-only and arrives in time order, so it carries a BRIN
//! index on `time` (a few bytes per 128 pages, next to free to maintain)
//! instead of a btree: at ingest rates the btree cost as much as the rest of
//! the row. BRIN answers "rows in this time range" but not "the newest N
//! rows", so readers that want the newest events matching a filter search
//! [`slices`] of time from the newest backwards — 5 minutes, then the hour,
//! the day, the week, then everything older — and stop as soon as they have
//! enough rows. Each slice is a bounded range scan (or a bitmap-and with the
//! address index) followed by a small sort; a busy fleet is answered from the
//! first slice.
//!
//! The arithmetic saturates: any `end` and `since` a caller passes, however
//! near the ends of the representable range, give slices and never panic.

use time::{Duration, OffsetDateTime};

/// Successive slice boundaries, as distances back from the end.
const STEPS: [Duration; 4] = [Duration::minutes(5), Duration::hours(1), Duration::days(1), Duration::days(7)];

/// One slice of time: `from <= time <= to` when `to_inclusive`, else
/// `from <= time < to`; no lower bound when `from` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Inclusive lower bound, if any.
    pub from: Option<OffsetDateTime>,
    /// Upper bound.
    pub to: OffsetDateTime,
    /// Whether `to` itself belongs to the slice (only the newest slice).
    pub to_inclusive: bool,
}

impl Slice {
    /// The upper bound as an exclusive one, for `time < $to` in SQL.
    /// Postgres stores microseconds, so one microsecond past `to` includes
    /// `to` and nothing after it.
    pub fn to_exclusive(&self) -> OffsetDateTime {
        if self.to_inclusive { self.to.saturating_add(Duration::microseconds(1)) } else { self.to }
    }
}

/// A bound no stored event's time exceeds: ingest refuses events stamped
/// more than [`crate::ingest::MAX_FUTURE`] ahead of the clock; a minute of
/// slack covers the time between ingest and this read.
pub fn latest_possible() -> OffsetDateTime {
    let ahead = Duration::try_from(crate::ingest::MAX_FUTURE).unwrap_or(Duration::minutes(10));
    OffsetDateTime::now_utc().saturating_add(ahead).saturating_add(Duration::minutes(1))
}

/// Disjoint slices covering `[since, end]`, newest first; `since` `None`
/// means no lower bound. Empty when `since` is after `end`.
pub fn slices(end: OffsetDateTime, since: Option<OffsetDateTime>) -> Vec<Slice> {
    let mut out = Vec::new();
    if since.is_some_and(|s| s > end) {
        return out;
    }
    let mut to = end;
    let mut to_inclusive = true;
    for step in STEPS {
        // Near the earliest representable time there is nothing older:
        // the rest is one last slice.
        let Some(from) = end.checked_sub(step) else {
            break;
        };
        if since.is_some_and(|s| s >= from) {
            out.push(Slice { from: since, to, to_inclusive });
            return out;
        }
        out.push(Slice { from: Some(from), to, to_inclusive });
        to = from;
        to_inclusive = false;
    }
    out.push(Slice { from: since, to, to_inclusive });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const END: OffsetDateTime = datetime!(2026-11-27 12:00:00 UTC);

    #[test]
    fn slices_tile_the_range_without_gaps_or_overlap() {
        let all = slices(END, None);
        assert_eq!(all.len(), 5);
        assert_eq!(all[0], Slice { from: Some(END - Duration::minutes(5)), to: END, to_inclusive: true });
        for pair in all.windows(2) {
            assert_eq!(pair[0].from, Some(pair[1].to), "each slice starts where the older one ends");
            assert!(!pair[1].to_inclusive);
        }
        assert_eq!(all[4].from, None);
        assert_eq!(all[4].to, END - Duration::days(7));
    }

    #[test]
    fn since_cuts_the_search_short() {
        let since = END - Duration::minutes(30);
        let s = slices(END, Some(since));
        assert_eq!(s.len(), 2);
        assert_eq!(s[1], Slice { from: Some(since), to: END - Duration::minutes(5), to_inclusive: false });
        // Exactly on a step: that slice is the last one.
        let s = slices(END, Some(END - Duration::hours(1)));
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].from, Some(END - Duration::hours(1)));
        assert!(slices(END, Some(END + Duration::seconds(1))).is_empty());
        assert_eq!(slices(END, Some(END)).len(), 1);
    }

    #[test]
    fn extreme_ends_neither_panic_nor_leave_gaps() {
        let min = time::PrimitiveDateTime::MIN.assume_utc();
        let max = time::PrimitiveDateTime::MAX.assume_utc();
        let s = slices(min, None);
        assert_eq!(s, vec![Slice { from: None, to: min, to_inclusive: true }]);
        let s = slices(min + Duration::hours(2), Some(min));
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], Slice { from: Some(min), to: min + Duration::hours(1), to_inclusive: false });
        assert_eq!(slices(max, None)[0].to_exclusive(), max, "saturates at the latest time");
        assert_eq!(slices(max, None).len(), 5);
    }

    #[test]
    fn inclusive_end_becomes_one_microsecond_later() {
        let s = slices(END, None);
        assert_eq!(s[0].to_exclusive(), END + Duration::microseconds(1));
        assert_eq!(s[1].to_exclusive(), s[1].to);
    }
}
