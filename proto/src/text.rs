//! Bounds on text that crosses the wire from an agent, and the one way to
//! cut text to a byte bound.

/// Longest `LocalBlock.reason` the server keeps, bytes (a rule name, or a
/// rule name with a short qualifier).
pub const LOCAL_BLOCK_MAX_REASON_BYTES: usize = 128;
/// Longest `LocalBlock.evidence` the server keeps, bytes.
pub const LOCAL_BLOCK_MAX_EVIDENCE_BYTES: usize = 4096;

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    &text[..text.floor_char_boundary(max)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("aéb", 3), "aé");
        assert_eq!(truncate("€", 2), "");
        assert_eq!(truncate("", 0), "");
    }
}
