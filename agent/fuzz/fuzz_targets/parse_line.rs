//! Fuzzes the Exim line parser: no input may panic, and every event's
//! address must be written in brackets somewhere in the line (the parser
//! never invents or mangles an address).
#![no_main]

use std::net::IpAddr;

use fleetban_agent::parse::{EventKind, Parser, Timezone, parse_line};
use libfuzzer_sys::fuzz_target;

/// Whether some `[...]` in the line holds `ip`.
fn bracketed(data: &[u8], ip: IpAddr) -> bool {
    let mut rest = data;
    while let Some(open) = rest.iter().position(|b| *b == b'[') {
        rest = &rest[open + 1..];
        let Some(close) = rest.iter().position(|b| *b == b']') else { break };
        let found = std::str::from_utf8(&rest[..close]).ok().and_then(|s| s.parse::<IpAddr>().ok()).map(|a| match a {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
            v4 => v4,
        });
        if found == Some(ip) {
            return true;
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    if let Some(ev) = parse_line(data) {
        // Two formats name the client without brackets.
        let bare = matches!(ev.kind, EventKind::NoHostName | EventKind::RelayDenied);
        assert!(bare || bracketed(data, ev.ip), "address {} not bracketed in the line", ev.ip);
        let _ = ev.to_proto(true);
    }
    let mut parser = Parser::new(Timezone::Utc);
    for line in data.split(|b| *b == b'\n') {
        let _ = parser.feed(line);
    }
});
