//! Operators' tables: aligned columns of escaped text, shared by the
//! `fleetban` CLI and the server's admin commands (`fleetban-server token
//! list`, `enroll-token list`), so both show a token the same way.
//!
//! Cells come from agents, mail clients and operators: every cell goes
//! through [`crate::text::escape`], so a control character shows as `\n` or
//! `\u{1b}` instead of acting on the terminal.

use std::fmt::Write as _;

use crate::api::auth::TokenInfo;
use crate::auth::EnrollmentToken;
use crate::text::escape;
use crate::timefmt;

/// Renders rows as an aligned table under `headers`; every cell is escaped.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> =
        rows.iter().map(|row| row.iter().map(|cell| escape(cell).into_owned()).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Columns of an API token listing.
pub const API_TOKEN_HEADERS: &[&str] = &["ID", "NAME", "ROLE", "PREFIX", "CREATED", "LAST USED", "EXPIRES", "STATE"];
/// Columns of an enrollment token listing.
pub const ENROLL_TOKEN_HEADERS: &[&str] =
    &["ID", "PREFIX", "USES LEFT", "CREATED", "LAST USED", "EXPIRES", "STATE", "NOTE"];

/// A token's state: `revoked`, `active`, `used up` or `expired`.
fn token_state(revoked: bool, active: bool, uses_left: Option<i32>) -> String {
    let state = if revoked {
        "revoked"
    } else if active {
        "active"
    } else if uses_left.is_some_and(|n| n <= 0) {
        "used up"
    } else {
        "expired"
    };
    state.to_owned()
}

/// An optional value as a cell (`-` for none).
fn opt<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// One row of an API token listing; the token itself is never shown.
pub fn api_token_row(t: &TokenInfo) -> Vec<String> {
    vec![
        t.id.to_string(),
        t.name.clone(),
        t.role.clone(),
        opt(t.prefix.as_deref()),
        timefmt::cell(Some(t.created_at)),
        timefmt::cell(t.last_used_at),
        t.expires_at.map_or_else(|| "never".to_owned(), |at| timefmt::cell(Some(at))),
        token_state(t.revoked_at.is_some(), t.active, None),
    ]
}

/// One row of an enrollment token listing; the token itself is never shown.
pub fn enroll_token_row(t: &EnrollmentToken) -> Vec<String> {
    let uses = match t.uses_granted {
        Some(granted) => format!("{}/{granted}", t.uses_left),
        None => t.uses_left.to_string(),
    };
    vec![
        t.id.to_string(),
        opt(t.prefix.as_deref()),
        uses,
        timefmt::cell(Some(t.created_at)),
        timefmt::cell(t.last_used_at),
        timefmt::cell(Some(t.expires_at)),
        token_state(t.revoked_at.is_some(), t.active, Some(t.uses_left)),
        t.note.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn tables_align() {
        let text = table(&["ID", "NAME"], &[vec!["1".into(), "mx1".into()], vec!["100".into(), "m".into()]]);
        assert_eq!(text, "ID   NAME\n1    mx1\n100  m\n");
    }

    #[test]
    fn table_cells_are_escaped() {
        let rows = vec![vec!["1".into(), "mx\x1b[2J\nroot@evil".into(), "\u{202e}gpj.exe".into()]];
        let text = table(&["ID", "NAME", "FILE"], &rows);
        assert!(!text.contains('\x1b') && !text.contains('\u{202e}'), "{text:?}");
        assert_eq!(text.lines().count(), 2, "one line per row: {text:?}");
        assert!(text.contains("mx\\u{1b}[2J\\nroot@evil"), "{text}");
        // Columns are aligned on the escaped text.
        let widths: Vec<usize> =
            text.lines().map(|l| l.find("FILE").or_else(|| l.find("\\u{202e}")).unwrap()).collect();
        assert_eq!(widths[0], widths[1], "{text}");
    }

    #[test]
    fn token_rows_show_state_and_never_a_token() {
        let t = TokenInfo {
            id: 3,
            name: "ci".into(),
            role: "read".into(),
            prefix: Some("fbt_0123abcd".into()),
            created_at: datetime!(2026-11-28 10:00:00 UTC),
            last_used_at: None,
            expires_at: Some(datetime!(2026-11-29 10:00:00 UTC)),
            revoked_at: None,
            active: false,
        };
        let row = api_token_row(&t);
        // Times are shown as every table shows them (relative on a
        // terminal, UTC with the zone when piped).
        let created = timefmt::cell(Some(t.created_at));
        let expires = timefmt::cell(t.expires_at);
        assert_eq!(row, ["3", "ci", "read", "fbt_0123abcd", &created, "-", &expires, "expired"]);
        let e = EnrollmentToken {
            id: 1,
            prefix: Some("fbe_00112233".into()),
            note: "rollout".into(),
            uses_left: 0,
            uses_granted: Some(2),
            created_at: datetime!(2026-11-28 10:00:00 UTC),
            last_used_at: Some(datetime!(2026-11-28 11:00:00 UTC)),
            expires_at: datetime!(2026-11-29 10:00:00 UTC),
            revoked_at: None,
            active: false,
        };
        let row = enroll_token_row(&e);
        assert_eq!(row[2], "0/2");
        assert_eq!(row[6], "used up");
    }
}
