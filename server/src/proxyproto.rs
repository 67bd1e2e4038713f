//! The PROXY protocol (versions 1 and 2) in front of gRPC connections that a
//! trusted load balancer forwards.
//!
//! Behind a TCP balancer (HAProxy in `mode tcp`) every agent connection
//! arrives from the balancer's address, so the per-source connection limits
//! and the failed-authentication throttle would treat the whole fleet as one
//! client. With `proxy_protocol_from` the server expects a PROXY header at
//! the start of every connection from those ranges (HAProxy `send-proxy-v2`
//! or `send-proxy`) and uses the client address it carries instead.
//!
//! Invariants:
//! - Only connections from `proxy_protocol_from` are read for a header;
//!   anyone else's PROXY header is just bytes of a broken TLS handshake, so a
//!   client cannot choose the address it is counted under.
//! - A trusted connection must start with a complete, valid header within
//!   the deadline, else it is closed (counted as `proxy_header`); nothing
//!   past the header is consumed, so TLS starts exactly where it would
//!   without a balancer.
//! - A header is bounded: at most [`MAX_V1_LEN`] bytes for version 1 (the
//!   protocol's own limit) and [`MAX_V2_LEN`] for version 2 (TLVs included),
//!   so a broken balancer cannot make the server buffer without limit.
//! - `LOCAL` (version 2) and `UNKNOWN` (version 1) headers, which balancers
//!   send for their own health checks, keep the balancer's address.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest version 1 header, CRLF included (the specification's limit).
pub const MAX_V1_LEN: usize = 107;
/// Longest version 2 header accepted, bytes (16 fixed + addresses + TLVs).
pub const MAX_V2_LEN: usize = 16 + 512;

/// The version 2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// The header is malformed; what is wrong.
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    /// The header is longer than allowed.
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    /// The header did not arrive within the deadline.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// Reading failed (the balancer closed the connection).
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

/// Reads the PROXY header at the start of `stream`, consuming exactly its
/// bytes, within `deadline`. Returns the client's address, or `None` for a
/// `LOCAL`/`UNKNOWN` header (the balancer speaking for itself).
pub async fn read_header(stream: &mut TcpStream, deadline: Duration) -> Result<Option<SocketAddr>, ProxyError> {
    match tokio::time::timeout(deadline, read(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyError::Timeout(deadline)),
    }
}

async fn read(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    // Both versions are told apart by their first bytes: version 2 by its
    // 12-byte signature, version 1 by "PROXY ". The shortest version 1 header
    // ("PROXY UNKNOWN\r\n") is 15 bytes, so 12 can always be read first.
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    if head == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        stream.read_exact(&mut fixed).await?;
        let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
        if 16 + len > MAX_V2_LEN {
            return Err(ProxyError::TooLong(MAX_V2_LEN));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        return parse_v2(fixed[0], fixed[1], &body);
    }
    if !head.starts_with(b"PROXY ") {
        return Err(ProxyError::Missing);
    }
    // Version 1: one byte at a time up to CRLF, so nothing after it is read.
    let mut line = head.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= MAX_V1_LEN {
            return Err(ProxyError::TooLong(MAX_V1_LEN));
        }
        line.push(stream.read_u8().await?);
    }
    parse_v1(&line)
}

/// Parses a whole version 1 line (with its CRLF).
pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if line.len() > MAX_V1_LEN {
        return Err(ProxyError::TooLong(MAX_V1_LEN));
    }
    let text = line
        .strip_suffix(b"\r\n")
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or(ProxyError::Malformed("version 1 line is not ASCII ending in CRLF"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyError::Missing);
    }
    let family = parts.next().ok_or(ProxyError::Malformed("version 1 without a protocol"))?;
    if family == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [source, _dest, port, _dport] = fields[..] else {
        return Err(ProxyError::Malformed("version 1 needs source, destination and both ports"));
    };
    let ip: IpAddr = match family {
        "TCP4" => source.parse::<Ipv4Addr>().map(IpAddr::V4),
        "TCP6" => source.parse::<Ipv6Addr>().map(IpAddr::V6),
        _ => return Err(ProxyError::Malformed("version 1 protocol is not TCP4, TCP6 or UNKNOWN")),
    }
    .map_err(|_| ProxyError::Malformed("version 1 source address"))?;
    // Ports are decimal without leading zeros or signs.
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyError::Malformed("version 1 source port"));
    }
    let port: u16 = port.parse().map_err(|_| ProxyError::Malformed("version 1 source port"))?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// Parses a version 2 header from its version/command byte, family byte and
/// the `len` bytes after the fixed part.
pub fn parse_v2(ver_cmd: u8, family: u8, body: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Malformed("version 2 signature with another version"));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None),
        1 => {}
        _ => return Err(ProxyError::Malformed("version 2 command is neither LOCAL nor PROXY")),
    }
    match family {
        // UNSPEC: the balancer does not know; keep its address.
        0x00 => Ok(None),
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            let b = body.get(..12).ok_or(ProxyError::Malformed("version 2 IPv4 addresses truncated"))?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([b[8], b[9]]))))
        }
        // TCP over IPv6.
        0x21 => {
            let b = body.get(..36).ok_or(ProxyError::Malformed("version 2 IPv6 addresses truncated"))?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), u16::from_be_bytes([b[32], b[33]]))))
        }
        _ => Err(ProxyError::Malformed("version 2 family is not TCP over IPv4 or IPv6")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn v2(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | cmd);
        out.push(family);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_tcp4(src: [u8; 4], port: u16) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[192, 0, 2, 1]);
        body.extend_from_slice(&port.to_be_bytes());
        body.extend_from_slice(&50051u16.to_be_bytes());
        v2(1, 0x11, &body)
    }

    /// Sends `bytes` then `after` on a loopback connection and reads the
    /// header on the accepting side; returns the result and what follows it.
    async fn through(bytes: Vec<u8>, after: &'static [u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&bytes).await.unwrap();
            c.write_all(after).await.unwrap();
            c.shutdown().await.unwrap();
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let result = read_header(&mut server, Duration::from_secs(2)).await;
        let mut rest = Vec::new();
        if result.is_ok() {
            server.read_to_end(&mut rest).await.unwrap();
        }
        client.await.unwrap();
        (result, rest)
    }

    #[tokio::test]
    async fn version_2_gives_the_client_address_and_leaves_the_tls_bytes() {
        let (result, rest) = through(v2_tcp4([203, 0, 113, 9], 40_000), b"\x16\x03\x01hello").await;
        assert_eq!(result.unwrap(), Some("203.0.113.9:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01hello", "the bytes after the header are untouched");
        let mut body = vec![0x20, 0x01, 0x0d, 0xb8];
        body.extend_from_slice(&[0; 11]);
        body.push(7);
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&[0x1f, 0x90, 0xc3, 0x53]);
        // A TLV after the addresses is skipped with them.
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xaa]);
        let (result, rest) = through(v2(1, 0x21, &body), b"next").await;
        assert_eq!(result.unwrap(), Some("[2001:db8::7]:8080".parse().unwrap()));
        assert_eq!(rest, b"next");
    }

    #[tokio::test]
    async fn version_1_gives_the_client_address_and_reads_nothing_past_crlf() {
        let line = b"PROXY TCP4 198.51.100.22 192.0.2.1 35646 50051\r\n".to_vec();
        let (result, rest) = through(line, b"\x16\x03").await;
        assert_eq!(result.unwrap(), Some("198.51.100.22:35646".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03");
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 50051\r\n".to_vec();
        assert_eq!(through(line, b"").await.0.unwrap(), Some("[2001:db8::1]:1".parse().unwrap()));
    }

    #[tokio::test]
    async fn health_checks_keep_the_balancers_address() {
        assert_eq!(through(v2(0, 0x00, &[]), b"").await.0.unwrap(), None, "v2 LOCAL");
        assert_eq!(through(b"PROXY UNKNOWN\r\n".to_vec(), b"").await.0.unwrap(), None, "v1 UNKNOWN");
    }

    #[tokio::test]
    async fn a_connection_without_a_valid_header_is_refused() {
        // A TLS ClientHello straight away: the balancer is not sending headers.
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh".to_vec();
        assert!(matches!(through(hello, b"").await.0, Err(ProxyError::Missing)));
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 999.1.1.1 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.9 192.0.2.1 +1 2\r\n",
            b"PROXY TCP4 192.0.2.9 192.0.2.1 70000 2\r\n",
            b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.9 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.9 1 2\r\n",
        ];
        for line in bad {
            assert!(matches!(through(line.to_vec(), b"").await.0, Err(ProxyError::Malformed(_))), "{line:?}");
        }
        let long = format!("PROXY TCP4 {} \r\n", "1".repeat(200)).into_bytes();
        assert!(matches!(through(long, b"").await.0, Err(ProxyError::TooLong(MAX_V1_LEN))));
        assert!(matches!(through(v2(1, 0x11, &[1, 2, 3]), b"").await.0, Err(ProxyError::Malformed(_))));
        assert!(matches!(through(v2(1, 0x31, &[0; 216]), b"").await.0, Err(ProxyError::Malformed(_))), "AF_UNIX");
        assert!(matches!(through(v2(1, 0x11, &[0; 600]), b"").await.0, Err(ProxyError::TooLong(MAX_V2_LEN))));
        // Truncated: the balancer closed mid-header.
        assert!(matches!(through(b"PROXY TCP4 192.0.2".to_vec(), b"").await.0, Err(ProxyError::Io(_))));
    }

    #[tokio::test]
    async fn a_silent_balancer_connection_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let result = read_header(&mut server, Duration::from_millis(200)).await;
        assert!(matches!(result, Err(ProxyError::Timeout(_))), "{result:?}");
    }
}
