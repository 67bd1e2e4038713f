//! Property tests of the Dovecot parser: no input panics it, and no user
//! name moves the client's address.

use std::net::IpAddr;

use proptest::prelude::*;

use super::super::{EventKind, LogKind, parse_line_as};

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![any::<[u8; 4]>().prop_map(IpAddr::from), any::<[u8; 16]>().prop_map(IpAddr::from),]
        .prop_map(|ip| ip.to_canonical())
}

/// Client-chosen user names, leaning on the characters of the format.
fn arb_user() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("rip=198.51.100.66".to_owned()),
            Just(", ".to_owned()),
            Just(">".to_owned()),
            Just("<".to_owned()),
            Just("lip=".to_owned()),
            Just("user=<".to_owned()),
            Just("[198.51.100.66]".to_owned()),
            Just("): ".to_owned()),
            Just("rip=2001:db8::66".to_owned()),
            "[a-z0-9@.]{1,8}",
            any::<char>().prop_map(String::from),
        ],
        0..10,
    )
    .prop_map(|v| v.concat())
}

const PREFIXES: [&str; 4] = [
    "Nov 28 12:00:00 imap-login: Info: ",
    "2026-11-28 12:00:00 pop3-login: Info: ",
    "Nov 28 12:00:00 mail dovecot[812]: imap-login: ",
    "<22>1 2026-11-28T12:00:00Z mail dovecot 812 - - pop3-login: ",
];

const REASONS: [&str; 4] = [
    "Disconnected: Aborted login by logging out (auth failed, 3 attempts in 9 secs)",
    "Login",
    "Disconnected: Too many invalid commands (no auth attempts in 0 secs)",
    "Disconnected (no auth attempts in 0 secs)",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_line_as(LogKind::Dovecot, &bytes);
    }

    #[test]
    fn mutated_lines_never_panic_or_invent_an_address(
        cut in 0usize..200,
        insert in prop::collection::vec(any::<u8>(), 0..8),
        at in 0usize..200,
    ) {
        let line = b"Nov 28 12:00:00 mail dovecot[812]: imap-login: Disconnected (auth failed, 2 attempts in 4 secs): user=<bob>, method=PLAIN, rip=203.0.113.7, lip=192.0.2.10, session=<x>";
        let mut m = line.to_vec();
        m.truncate(m.len().saturating_sub(cut % 60));
        let at = at.min(m.len());
        m.splice(at..at, insert.iter().copied());
        if let Some(e) = parse_line_as(LogKind::Dovecot, &m) {
            // The address read is written in the line after `rip=`.
            let text = format!("rip={}", e.ip);
            let s = String::from_utf8_lossy(&m);
            prop_assert!(s.contains(&text) || s.contains("rip=::ffff:"), "{s}: {}", e.ip);
        }
    }

    #[test]
    fn a_user_name_never_moves_the_client(
        user in arb_user(),
        ip in arb_ip(),
        prefix in proptest::sample::select(PREFIXES.to_vec()),
        reason in proptest::sample::select(REASONS.to_vec()),
    ) {
        let line = format!("{prefix}{reason}: user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.10, mpid=7, secured, session=<AbC/1>");
        let e = parse_line_as(LogKind::Dovecot, line.as_bytes());
        let e = e.unwrap_or_else(|| panic!("no event: {line}"));
        prop_assert_eq!(e.ip, ip);
        prop_assert_eq!(e.local_ip, Some("192.0.2.10".parse::<IpAddr>().unwrap()));
        let expected = match reason {
            "Login" => EventKind::Login,
            r if r.contains("auth failed") => EventKind::AuthFailed,
            r if r.contains("Too many") => EventKind::TooManyUnrecognized,
            _ => EventKind::NoAuthAttempts,
        };
        prop_assert_eq!(e.kind, expected);
        if user.len() <= super::MAX_USER_BYTES && !user.is_empty() {
            prop_assert_eq!(e.user, Some(user.as_str()));
        }
    }
}
