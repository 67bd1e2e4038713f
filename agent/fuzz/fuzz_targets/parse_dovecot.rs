//! Fuzzes the Dovecot line parser: no input may panic, and every event's
//! address must be the value of a `rip=` token in the line (the parser never
//! invents or mangles an address, and never reads one from a bracket).
#![no_main]

use std::net::IpAddr;

use fleetban_agent::parse::{LogKind, Parser, Timezone, parse_line_as};
use libfuzzer_sys::fuzz_target;

/// Whether some `rip=` token in the line holds `ip`.
fn in_rip(data: &[u8], ip: IpAddr) -> bool {
    let mut rest = data;
    while let Some(at) = rest.windows(4).position(|w| w == b"rip=") {
        rest = &rest[at + 4..];
        // A value ends at `,`, or at the line's end (the parser reads a line
        // without its `\r\n`).
        let end = rest.iter().position(|b| matches!(*b, b',' | b'\r' | b'\n')).unwrap_or(rest.len());
        let found = std::str::from_utf8(&rest[..end]).ok().and_then(|s| s.parse::<IpAddr>().ok());
        if found.map(|a| a.to_canonical()) == Some(ip) {
            return true;
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    if let Some(event) = parse_line_as(LogKind::Dovecot, data) {
        assert!(in_rip(data, event.ip), "address {} not in a rip= token", event.ip);
        assert!(event.user.is_none_or(|u| u.len() <= fleetban_agent::parse::dovecot::MAX_USER_BYTES));
    }
    let mut parser = Parser::for_kind(LogKind::Dovecot, Timezone::Utc);
    for line in data.split(|b| *b == b'\n') {
        let _ = parser.feed(line);
    }
});
