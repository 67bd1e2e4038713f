//! A small SMTP responder that stands in for an Exim daemon in end-to-end
//! tests when `exim4` is not installed.
//!
//! It holds every accepted connection in its own thread (like Exim's
//! per-connection processes), enforces `smtp_accept_max`, and appends to its
//! log exactly the lines Exim 4.96 writes with `log_selector =
//! +smtp_connection +incoming_port` (see the corpus file
//! `real-exim-4.96-full-selectors.log`):
//!
//! - `SMTP connection from [ip]:port I=[local]:25 (TCP/IP connection count = N)`
//! - `Connection from [ip]:port I=[local]:25 refused: too many connections`
//! - `dovecot_plain authenticator failed for (helo) [ip]:port I=[local]:25: 535 Incorrect authentication data (set_id=user)`
//! - `SMTP connection from (helo) [ip]:port I=[local]:25 closed by QUIT`
//!
//! Each line is one `write(2)` on an `O_APPEND` file, so lines never
//! interleave. The dialogue: `220` banner, `EHLO`/`HELO` → `250`, `AUTH PLAIN
//! <b64>` (the user is the part after the first NUL) → always `535`, `QUIT` →
//! `221`, anything else → `250`. An idle connection is closed after
//! `idle_timeout` without a log line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use time::macros::format_description;

/// The simulator's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Exim's `smtp_accept_max`.
    pub max_connections: usize,
    /// Close a connection idle this long.
    pub idle_timeout: Duration,
}

struct Shared {
    log: Mutex<File>,
    active: AtomicUsize,
    config: SimConfig,
}

/// Renders an address the way Exim brackets it (IPv4-mapped addresses as IPv4).
fn show(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Shared {
    fn write(&self, body: &str) {
        let now = OffsetDateTime::now_utc();
        let stamp = now
            .format(format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"))
            .unwrap_or_default();
        let line = format!("{stamp} [{}] {body}\n", std::process::id());
        if let Ok(mut file) = self.log.lock() {
            // One write per line: O_APPEND keeps it atomic.
            if let Err(error) = file.write_all(line.as_bytes()) {
                eprintln!("smtp-sim: log write failed: {error}");
            }
        }
    }
}

/// Serves `listener` forever, appending to `log`.
pub fn serve(listener: TcpListener, log: &Path, config: SimConfig) -> std::io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(log)?;
    let shared = Arc::new(Shared { log: Mutex::new(file), active: AtomicUsize::new(0), config });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else { continue };
        let shared = Arc::clone(&shared);
        let n = shared.active.fetch_add(1, Ordering::SeqCst) + 1;
        let (ip, port, lip, lport) = (show(peer.ip()), peer.port(), show(local.ip()), local.port());
        if n > shared.config.max_connections {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            shared.write(&format!("Connection from [{ip}]:{port} I=[{lip}]:{lport} refused: too many connections"));
            let mut stream = stream;
            let _ = stream.write_all(b"421 Too many concurrent SMTP connections; please try again later.\r\n");
            continue;
        }
        shared.write(&format!("SMTP connection from [{ip}]:{port} I=[{lip}]:{lport} (TCP/IP connection count = {n})"));
        std::thread::spawn(move || {
            converse(&shared, stream, peer, local);
            shared.active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

fn converse(shared: &Shared, mut stream: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let (ip, port, lip, lport) = (show(peer.ip()), peer.port(), show(local.ip()), local.port());
    let _ = stream.set_read_timeout(Some(shared.config.idle_timeout));
    if stream.write_all(b"220 mx.example.test ESMTP Exim 4.96\r\n").is_err() {
        return;
    }
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut helo = String::from("unknown");
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let cmd = line.trim_end();
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO ") || upper.starts_with("HELO ") {
            helo = cmd[5..].trim().to_owned();
            b"250 mx.example.test Hello\r\n"
        } else if upper.starts_with("AUTH PLAIN ") {
            let user = auth_plain_user(cmd[11..].trim()).unwrap_or_default();
            shared.write(&format!(
                "dovecot_plain authenticator failed for ({helo}) [{ip}]:{port} I=[{lip}]:{lport}: \
                 535 Incorrect authentication data (set_id={user})"
            ));
            b"535 Incorrect authentication data\r\n"
        } else if upper == "QUIT" {
            shared.write(&format!("SMTP connection from ({helo}) [{ip}]:{port} I=[{lip}]:{lport} closed by QUIT"));
            let _ = stream.write_all(b"221 mx.example.test closing connection\r\n");
            return;
        } else {
            b"250 OK\r\n"
        };
        if stream.write_all(reply).is_err() {
            return;
        }
    }
}

/// The authentication identity of an `AUTH PLAIN` response
/// (`authzid NUL authcid NUL password`, base64).
fn auth_plain_user(b64: &str) -> Option<String> {
    let raw = base64_decode(b64)?;
    let mut parts = raw.split(|&b| b == 0);
    let _authzid = parts.next()?;
    let user = parts.next()?;
    Some(String::from_utf8_lossy(user).into_owned())
}

/// Standard base64 (RFC 4648) encoding.
pub fn base64_encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_plain_round_trip() {
        let b64 = base64_encode(b"\0admin@example.test\0secret");
        assert_eq!(auth_plain_user(&b64).as_deref(), Some("admin@example.test"));
        assert_eq!(base64_encode(b"ab"), "YWI=");
    }
}
