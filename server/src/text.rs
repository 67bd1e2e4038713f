//! Client-supplied text made safe for a log line or a terminal.
//!
//! Host names, versions, reasons, raw log lines and user names come from
//! agents, enrollment callers and mail clients. Written verbatim, a newline
//! forges a log line and an escape sequence rewrites the operator's terminal.
//! [`Escaped`] (for `tracing` fields: `hostname = %Escaped(&name)`) and
//! [`escape`] (for CLI table cells) write every control character, the
//! Unicode bidirectional overrides and the backslash itself as a visible
//! escape (`\n`, `\u{1b}`, `\\`), so the output is one line and can be read
//! back unambiguously. Printable text, including non-ASCII, is unchanged.

use std::borrow::Cow;
use std::fmt;

/// Whether `c` is written escaped.
fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        // Bidirectional embeddings, overrides and isolates reorder what a
        // terminal shows; zero-width marks hide text.
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

fn write_escaped(out: &mut impl fmt::Write, c: char) -> fmt::Result {
    match c {
        '\\' => out.write_str("\\\\"),
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        c if needs_escape(c) => write!(out, "\\u{{{:x}}}", u32::from(c)),
        c => out.write_char(c),
    }
}

/// An error and its sources on one line: each cause appended after `: `
/// unless the text already holds it, newlines turned into spaces.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// `text` with control characters escaped; borrowed when nothing needed it.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        // Writing into a String cannot fail.
        let _ = write_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

/// Displays a string with control characters escaped, for log fields:
/// `warn!(hostname = %Escaped(&req.hostname), "...")`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            write_escaped(f, c)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>);

    impl fmt::Display for Chain {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn an_error_chain_is_one_line_without_repeats() {
        let inner = Chain("Connection refused (os error 111)", None);
        let middle = Chain("error connecting: Connection refused (os error 111)", Some(Box::new(inner)));
        let outer = Chain("pool timed out\nwhile waiting", Some(Box::new(middle)));
        assert_eq!(
            one_line(&outer),
            "pool timed out while waiting: error connecting: Connection refused (os error 111)"
        );
    }

    #[test]
    fn control_characters_are_escaped_and_text_kept() {
        assert_eq!(escape("mx1.example.net"), "mx1.example.net");
        assert!(matches!(escape("mx1"), Cow::Borrowed(_)));
        assert_eq!(escape("münchen-mx"), "münchen-mx");
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape("\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(escape("tab\there\r"), "tab\\there\\r");
        assert_eq!(escape("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        assert_eq!(escape("\u{9b}2J"), "\\u{9b}2J", "C1 control sequence introducer");
        // The backslash is escaped too, so an escape in the output is never
        // ambiguous with the same characters typed by the client.
        assert_eq!(escape("a\\nb"), "a\\\\nb");
        assert_eq!(Escaped("x\ny\u{7f}").to_string(), "x\\ny\\u{7f}");
    }

    #[test]
    fn output_has_no_control_characters() {
        let all: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let escaped = escape(&all);
        assert!(!escaped.chars().any(needs_escape_but_backslash), "{escaped}");
        assert_eq!(Escaped(&all).to_string(), escaped);
    }

    fn needs_escape_but_backslash(c: char) -> bool {
        c != '\\' && needs_escape(c)
    }
}
