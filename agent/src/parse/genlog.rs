//! A deterministic generator of realistic Exim main logs, for benchmarks and
//! load tests (`fleetban-agent gen-log --lines N --seed S`).
//!
//! The mix resembles a busy cPanel host: about 94% connects, arrivals,
//! deliveries, clean closes and housekeeping, about 6% abuse lines of every kind, a
//! few continuation and housekeeping lines, many distinct addresses (IPv4
//! from 10.0.0.0/8 with a small hot set of repeat offenders, IPv6 from
//! 2001:db8::/32), and both timestamp styles (Exim's default and
//! `+millisec +pid`). The same seed always gives the same bytes.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::render::{self, MsgId, Style, Wrap};
use super::{Event, EventKind};

/// SplitMix64: small, fast, and good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// What [`write_log`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GenStats {
    /// Lines written.
    pub lines: u64,
    /// Bytes written.
    pub bytes: u64,
}

const HELOS: [&str; 8] =
    ["mail.example.net", "User", "ylmf-pc", "scanner.invalid", "[10.1.2.3]", "localhost", "WIN-7Q2B", "mx.example.org"];
const DRIVERS: [&str; 3] = ["dovecot_login", "dovecot_plain", "login"];
const USERS: [&str; 5] = ["admin@example.com", "info@example.com", "test", "sales@example.org", "root"];

fn address(rng: &mut Rng) -> IpAddr {
    match rng.below(100) {
        0..=9 => IpAddr::V4(Ipv4Addr::new(10, 66, 0, rng.below(50) as u8)),
        10..=14 => {
            let hi = rng.next_u64();
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                0x0db8,
                (hi >> 48) as u16,
                (hi >> 32) as u16,
                0,
                0,
                0,
                (hi & 0xffff) as u16 | 1,
            ))
        }
        _ => {
            let n = rng.next_u64() as u32;
            IpAddr::V4(Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8))
        }
    }
}

fn event<'a>(kind: EventKind, time_ms: i64, rng: &mut Rng) -> Event<'a> {
    let helo = HELOS[rng.below(HELOS.len() as u64) as usize];
    Event {
        time_ms,
        kind,
        ip: address(rng),
        port: Some(1024 + rng.below(64_000) as u16),
        local_ip: None,
        local_port: None,
        count: None,
        user: None,
        helo: Some(helo),
        detail: None,
        duration_ms: None,
        host_name: None,
        service: super::Service::Smtp,
        attempts: 0,
        raw: b"",
    }
}

/// Writes `lines` generated lines to `out`.
pub fn write_log(lines: u64, seed: u64, out: &mut impl Write) -> io::Result<GenStats> {
    let mut rng = Rng::new(seed);
    // 2026-01-01T00:00:00Z plus up to a year, from the seed.
    let mut time_ms: i64 = 1_767_225_600_000 + (rng.below(365 * 86_400) as i64) * 1000;
    let mut stats = GenStats::default();
    let mut line = String::with_capacity(512);
    let local = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    while stats.lines < lines {
        time_ms += rng.below(12) as i64;
        let full = rng.below(2) == 0;
        let style = Style {
            millis: full,
            pid: full.then(|| 1000 + rng.below(60_000) as u32),
            msgid: MsgId::None,
            wrap: Wrap::None,
            ..Style::default()
        };
        let t = if full { time_ms } else { time_ms - time_ms % 1000 };
        let roll = rng.below(1000);
        let mut ev = event(EventKind::Connect, t, &mut rng);
        if full {
            ev.local_ip = Some(local);
            ev.local_port = Some([25, 465, 587][rng.below(3) as usize]);
        }
        line.clear();
        match roll {
            0..=319 => {
                ev.helo = None;
                ev.count = Some(1 + rng.below(100) as u32);
                line.push_str(&render::render(&ev, &style));
            }
            320..=539 | 975..=989 => {
                let mut s = render::render(&Event { kind: EventKind::ClosedByDrop, ..ev }, &style);
                s.truncate(s.len() - "DROP in ACL".len());
                s.push_str("QUIT");
                line.push_str(&s);
            }
            540..=719 => {
                ev.kind = EventKind::Accepted;
                ev.detail = Some(USERS[rng.below(USERS.len() as u64) as usize]);
                if rng.below(4) == 0 {
                    ev.user = ev.detail;
                }
                let style = Style { msgid: if full { MsgId::New } else { MsgId::Old }, ..style };
                line.push_str(&render::render(&ev, &style));
            }
            720..=899 => {
                let mut s = render::render(&Event { kind: EventKind::Accepted, detail: Some("x"), ..ev }, &style);
                let at = s.find("<= ").unwrap_or(s.len());
                s.truncate(at);
                if roll < 820 {
                    s.push_str("=> user@example.org R=dkim_lookuphost T=dkim_remote_smtp H=mx.example.org [192.0.2.77] C=\"250 OK\"");
                } else {
                    s.push_str("Completed");
                }
                line.push_str(&s);
            }
            900..=919 => {
                ev.kind = EventKind::NoMail;
                ev.duration_ms = Some(rng.below(30_000));
                ev.detail = Some(["EHLO,AUTH,QUIT", "EHLO", "EHLO,STARTTLS"][rng.below(3) as usize]);
                line.push_str(&render::render(&ev, &style));
            }
            920..=929 => {
                ev.kind = EventKind::Lost;
                ev.duration_ms = Some(rng.below(30_000));
                line.push_str(&render::render(&ev, &style));
            }
            930..=944 => {
                ev.kind = EventKind::AuthFailed;
                ev.detail = Some(DRIVERS[rng.below(3) as usize]);
                ev.user = Some(USERS[rng.below(USERS.len() as u64) as usize]);
                let style = Style { auth_h_prefix: rng.below(2) == 0, ..style };
                line.push_str(&render::render(&ev, &style));
            }
            945..=974 => {
                let (kind, detail) = match roll {
                    945..=947 => (EventKind::RelayDenied, "relay not permitted"),
                    948..=950 => (EventKind::RcptRejected, "Unrouteable address"),
                    951..=954 => (EventKind::RefusedTooMany, ""),
                    955..=956 => (EventKind::SyncError, "input sent without waiting for greeting"),
                    957..=958 => (EventKind::TooManyNonmail, "NOOP"),
                    959..=960 => (EventKind::ProtocolError, "AUTH command used when not advertised"),
                    961..=962 => (EventKind::SyntaxError, "unrecognized command"),
                    963..=964 => (EventKind::AclRejected, "Host is ratelimited"),
                    965 => (EventKind::ClosedByDrop, ""),
                    966..=967 => (EventKind::TlsError, "(tls lib accept fn): TCP connection closed by peer"),
                    968..=969 => (EventKind::CommandTimeout, ""),
                    970 => (EventKind::TooManyUnrecognized, "GET / HTTP/1.1"),
                    971..=972 => (EventKind::NoHostName, ""),
                    _ => (EventKind::TooManySyntax, "AUTH LOGIN"),
                };
                ev.kind = kind;
                ev.detail = (!detail.is_empty()).then_some(detail);
                line.push_str(&render::render(&ev, &style));
            }
            990..=994 => {
                let mut s = render::render(&ev, &style);
                let at = s.find("SMTP").unwrap_or(s.len());
                s.truncate(at);
                s.push_str("Start queue run: pid=12345");
                line.push_str(&s);
            }
            _ => line.push_str(" Suggested action: use keep_environment."),
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
        stats.lines += 1;
        stats.bytes += line.len() as u64;
    }
    out.flush()?;
    Ok(stats)
}
