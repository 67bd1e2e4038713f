//! The pieces of an Exim line that name a peer: `[ip]:port`, the host
//! specification `H=name (helo) [ip]:port`, the `I=` local interface, and the
//! `KEY=value` tokens Exim appends after a host (`D=`, `C=`, `A=`, ...).
//!
//! Invariants: an address is accepted only when the whole bracketed text is a
//! valid IPv4 or IPv6 address (`::ffff:` mapped forms become IPv4); a host
//! specification is accepted only when what follows its closing bracket is
//! something Exim writes there (end of line, a space, `:` or `)`), so a
//! bracket glued to a quote, as in an injected command, is never a host.

use std::net::{IpAddr, Ipv4Addr};

/// A parsed host specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Host<'a> {
    pub ip: IpAddr,
    pub port: Option<u16>,
    pub helo: Option<&'a [u8]>,
    /// The verified reverse-DNS name (`H=name`, outside the parentheses).
    pub name: Option<&'a [u8]>,
    /// Index just past the host (after `]` or the port).
    pub end: usize,
}

/// The `KEY=value` tokens that follow a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tail<'a> {
    pub local_ip: Option<IpAddr>,
    pub local_port: Option<u16>,
    pub duration_ms: Option<u64>,
    pub commands: Option<&'a [u8]>,
    pub auth: Option<&'a [u8]>,
    /// Index of the first byte after the last recognised token (a space or
    /// the end of the line).
    pub end: usize,
}

/// Parses an IPv4 dotted quad strictly (no leading zeros, each octet <= 255).
fn parse_v4(s: &[u8]) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut idx = 0;
    let mut val: u32 = 0;
    let mut digits = 0;
    for &c in s {
        match c {
            b'0'..=b'9' => {
                if digits > 0 && val == 0 {
                    return None;
                }
                val = val * 10 + u32::from(c - b'0');
                digits += 1;
                if val > 255 {
                    return None;
                }
            }
            b'.' => {
                if digits == 0 || idx == 3 {
                    return None;
                }
                octets[idx] = val as u8;
                idx += 1;
                val = 0;
                digits = 0;
            }
            _ => return None,
        }
    }
    if idx != 3 || digits == 0 {
        return None;
    }
    octets[3] = val as u8;
    Some(Ipv4Addr::from(octets))
}

/// Parses the text of an address (no brackets): IPv4, or IPv6 with `::ffff:`
/// mapped addresses normalised to IPv4.
pub(crate) fn parse_ip(s: &[u8]) -> Option<IpAddr> {
    if s.len() < 2 || s.len() > 45 {
        return None;
    }
    if !s.contains(&b':') {
        return parse_v4(s).map(IpAddr::V4);
    }
    let text = std::str::from_utf8(s).ok()?;
    let v6: std::net::Ipv6Addr = text.parse().ok()?;
    Some(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    })
}

/// Parses up to five decimal digits as a port (1-65535) at `pos`; returns the
/// port and the index after it.
fn parse_port(b: &[u8], pos: usize) -> Option<(u16, usize)> {
    let mut end = pos;
    let mut val: u32 = 0;
    while end < b.len() && b[end].is_ascii_digit() && end - pos < 5 {
        val = val * 10 + u32::from(b[end] - b'0');
        end += 1;
    }
    if end == pos || (end < b.len() && b[end].is_ascii_digit()) || val == 0 || val > 65_535 {
        return None;
    }
    Some((val as u16, end))
}

/// Parses `[ip]` or `[ip]:port` at `pos`. Returns the address, the port and
/// the index after the whole thing.
pub(crate) fn parse_bracketed(b: &[u8], pos: usize) -> Option<(IpAddr, Option<u16>, usize)> {
    if b.get(pos) != Some(&b'[') {
        return None;
    }
    let close = pos + 1 + memchr::memchr(b']', b.get(pos + 1..(pos + 48).min(b.len()))?)?;
    let ip = parse_ip(&b[pos + 1..close])?;
    let mut end = close + 1;
    let mut port = None;
    if b.get(end) == Some(&b':') && b.get(end + 1).is_some_and(u8::is_ascii_digit) {
        let (p, e) = parse_port(b, end + 1)?;
        port = Some(p);
        end = e;
    }
    Some((ip, port, end))
}

/// Whether the byte after a host may legitimately follow it.
pub(crate) fn host_terminator(b: &[u8], end: usize) -> bool {
    matches!(b.get(end), None | Some(b' ' | b':' | b')' | b','))
}

/// Parses a host specification at `pos`: optional `H=`, optional name,
/// optional `(helo)`, then `[ip]` with optional `:port`.
///
/// The name and HELO may not contain spaces (Exim refuses such HELO
/// arguments unless configured to accept junk), so a specification that only
/// parses by swallowing spaces is refused rather than guessed at.
pub(crate) fn parse_host(b: &[u8], mut pos: usize) -> Option<Host<'_>> {
    if b[pos..].starts_with(b"H=") {
        pos += 2;
    }
    let mut helo = None;
    let mut name = None;
    match *b.get(pos)? {
        b'[' => {}
        b'(' => {
            let (h, next) = parse_helo(b, pos)?;
            helo = Some(h);
            pos = next;
        }
        b'"' | b' ' => return None,
        _ => {
            // A host name from reverse DNS: up to the next space.
            let sp = pos + memchr::memchr(b' ', &b[pos..])?;
            if b[pos..sp].iter().any(|c| matches!(c, b'[' | b'(' | b'"')) {
                return None;
            }
            name = Some(&b[pos..sp]);
            pos = sp + 1;
            if b.get(pos) == Some(&b'(') {
                let (h, next) = parse_helo(b, pos)?;
                helo = Some(h);
                pos = next;
            }
        }
    }
    let (ip, port, end) = parse_bracketed(b, pos)?;
    if !host_terminator(b, end) {
        return None;
    }
    Some(Host { ip, port, helo, name, end })
}

/// Parses `(helo) ` at `pos` (which holds `(`); returns the HELO text and the
/// index of the `[` that must follow.
fn parse_helo(b: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = &b[pos + 1..];
    let sp = memchr::memchr(b' ', rest)?;
    // The HELO ends at `) ` and contains no space.
    if sp == 0 || rest[sp - 1] != b')' {
        return None;
    }
    let helo = &rest[..sp - 1];
    let next = pos + 1 + sp + 1;
    if b.get(next) != Some(&b'[') {
        return None;
    }
    Some((helo, next))
}

/// Parses an Exim duration such as `3.416s`, `21s`, `2m42s` or `1d2h3m4s`
/// into milliseconds. Returns `None` for anything else (e.g. the test suite's
/// munged `qqs`).
pub(crate) fn parse_duration(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut i = 0;
    while i < s.len() {
        let start = i;
        let mut whole: u64 = 0;
        while i < s.len() && s[i].is_ascii_digit() {
            whole = whole.checked_mul(10)?.checked_add(u64::from(s[i] - b'0'))?;
            i += 1;
        }
        if i == start {
            return None;
        }
        let mut frac_ms: u64 = 0;
        let mut has_frac = false;
        if i < s.len() && s[i] == b'.' {
            has_frac = true;
            i += 1;
            let fstart = i;
            let mut scale = 100;
            while i < s.len() && s[i].is_ascii_digit() {
                frac_ms += u64::from(s[i] - b'0') * scale;
                scale /= 10;
                i += 1;
            }
            if i == fstart {
                return None;
            }
        }
        let unit_ms: u64 = match s.get(i)? {
            b's' => 1000,
            b'm' => 60_000,
            b'h' => 3_600_000,
            b'd' => 86_400_000,
            b'w' => 604_800_000,
            _ => return None,
        };
        if has_frac && unit_ms != 1000 {
            return None;
        }
        i += 1;
        total = total.checked_add(whole.checked_mul(unit_ms)?.checked_add(frac_ms)?)?;
    }
    Some(total)
}

/// Whether `tok` looks like an Exim `KEY=value` log field (`I=`, `Ci=`,
/// `X=`, `CV=`, `SNI=`, `DN=`, `A=`, ...): one to four letters, the first
/// upper-case, then `=`.
pub(crate) fn field_key(tok: &[u8]) -> Option<&[u8]> {
    let eq = memchr::memchr(b'=', tok.get(..6.min(tok.len()))?)?;
    if eq == 0 || !tok[0].is_ascii_uppercase() || !tok[..eq].iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    Some(&tok[..eq])
}

/// Scans the `KEY=value` tokens that start at `pos` (which is a space or the
/// end of the line), stopping at the first token that is not one.
pub(crate) fn scan_tail(b: &[u8], mut pos: usize) -> Tail<'_> {
    let mut tail = Tail { end: pos, ..Tail::default() };
    while pos < b.len() && b[pos] == b' ' {
        let start = pos + 1;
        let stop = memchr::memchr(b' ', &b[start..]).map_or(b.len(), |i| start + i);
        let tok = &b[start..stop];
        let Some(key) = field_key(tok) else { break };
        let val = &tok[key.len() + 1..];
        match key {
            b"I" => {
                if let Some((ip, port, e)) = parse_bracketed(val, 0)
                    && (e == val.len() || (e + 1 == val.len() && matches!(val[e], b':' | b')')))
                {
                    tail.local_ip = Some(ip);
                    tail.local_port = port;
                }
            }
            b"D" => tail.duration_ms = parse_duration(val),
            b"C" if !val.is_empty() && !val.starts_with(b"\"") => tail.commands = Some(val),
            b"A" => tail.auth = Some(val),
            b"H" => break,
            _ => {}
        }
        pos = stop;
        tail.end = pos;
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips() {
        assert_eq!(parse_ip(b"192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_ip(b"::ffff:192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_ip(b"2001:db8::66"), Some("2001:db8::66".parse().unwrap()));
        for bad in [
            &b"256.1.1.1"[..],
            b"1.2.3",
            b"01.2.3.4",
            b"1.2.3.4.5",
            b"ip4.ip4.ip4.ip4",
            b"V4NET.0.0.0",
            b"::1%eth0",
            b"",
        ] {
            assert_eq!(parse_ip(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn hosts() {
        let b = b"H=host.example (helo) [192.0.2.1]:25 I=[192.0.2.2]:587: x";
        let h = parse_host(b, 0).unwrap();
        assert_eq!(h.ip, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(h.port, Some(25));
        assert_eq!(h.helo, Some(&b"helo"[..]));
        let t = scan_tail(b, h.end);
        assert_eq!(t.local_ip, Some("192.0.2.2".parse().unwrap()));
        assert_eq!(t.local_port, Some(587));
        let b = b"H=([192.168.2.33]) [24.106.174.74]: 535";
        assert_eq!(parse_host(b, 0).unwrap().helo, Some(&b"[192.168.2.33]"[..]));
        assert!(parse_host(b"H=(test) [8.8.8.8]\" H=(x) [1.2.3.4]", 0).is_none());
        assert!(parse_host(b"H=(a b) [8.8.8.8]", 0).is_none());
        assert!(parse_host(b"[1.2.3.4]:99999 x", 0).is_none());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(b"3.416s"), Some(3416));
        assert_eq!(parse_duration(b"21s"), Some(21_000));
        assert_eq!(parse_duration(b"2m42s"), Some(162_000));
        assert_eq!(parse_duration(b"1d1s"), Some(86_401_000));
        assert_eq!(parse_duration(b"qqs"), None);
        assert_eq!(parse_duration(b"q.qqqs"), None);
        assert_eq!(parse_duration(b"99999999999999999999s"), None);
    }
}
