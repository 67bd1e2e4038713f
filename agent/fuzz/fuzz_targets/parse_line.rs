//! Fuzzes the Exim line parser: no input may panic, every event's address
//! must be written in brackets somewhere in the line (the parser never
//! invents or mangles an address), and no other host-like address in the
//! line may differ from it (client text carrying a second host makes the
//! line ambiguous, and an ambiguous line yields no event).
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

/// Whether every host-like `[addr]` (after a space or `H=`, followed by the
/// end, a space, `:`, `)` or `,`) in the line holds `ip`.
fn host_like_all(data: &[u8], ip: IpAddr) -> bool {
    let mut i = 0;
    while let Some(open) = data[i..].iter().position(|b| *b == b'[') {
        let p = i + open;
        i = p + 1;
        let after_space = p > 0 && data[p - 1] == b' ';
        let after_h = p >= 2 && &data[p - 2..p] == b"H=" && (p == 2 || data[p - 3] == b' ');
        if !(after_space || after_h) {
            continue;
        }
        let Some(close) = data[p..].iter().position(|b| *b == b']').map(|c| p + c) else { break };
        let Some(found) = std::str::from_utf8(&data[p + 1..close]).ok().and_then(|s| s.parse::<IpAddr>().ok()) else {
            continue;
        };
        let found = match found {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(found, IpAddr::V4),
            v4 => v4,
        };
        let mut end = close + 1;
        if data.get(end) == Some(&b':') && data.get(end + 1).is_some_and(u8::is_ascii_digit) {
            let digits = data[end + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
            let port: u32 = std::str::from_utf8(&data[end + 1..end + 1 + digits]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            if digits > 5 || port == 0 || port > 65_535 {
                // Not a host to the parser either.
                continue;
            }
            end += 1 + digits;
        }
        let terminated = matches!(data.get(end), None | Some(b' ' | b':' | b')' | b','));
        if terminated && found != ip {
            return false;
        }
    }
    true
}

fuzz_target!(|data: &[u8]| {
    if let Some(ev) = parse_line(data) {
        // Two formats name the client without brackets.
        let bare = matches!(ev.kind, EventKind::NoHostName | EventKind::RelayDenied);
        assert!(bare || bracketed(data, ev.ip), "address {} not bracketed in the line", ev.ip);
        assert!(bare || host_like_all(data, ev.ip), "another host-like address than {} in the line", ev.ip);
        let _ = ev.to_proto(true);
    }
    let mut parser = Parser::new(Timezone::Utc);
    for line in data.split(|b| *b == b'\n') {
        let _ = parser.feed(line);
    }
});
