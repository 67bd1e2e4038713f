//! Facts about the host the agent runs on: its name, its interfaces'
//! addresses (never blocked), and the host id it enrolls with.

use std::net::IpAddr;
use std::path::Path;

use tracing::warn;

use crate::config::AgentConfig;

/// File of the host id inside the state directory.
pub const HOST_ID_FILE: &str = "host-id";

/// The host id the agent enrolls with, kept in `state_dir/host-id`.
///
/// When the file is missing (or unreadable as an id) it is derived, and
/// stored: the SHA-256 of a fixed label, `/etc/machine-id` and the absolute
/// path of `state_dir`, so it is the same after the state directory was
/// wiped, different for two agents with their own state directories on one
/// machine, and does not reveal the machine id. Without a machine id it is
/// random. A host cloned from another keeps the original's id until the
/// clone has its own machine id and no copied `host-id` file.
pub fn host_id(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join(HOST_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if valid_host_id(text.trim()) => return Ok(text.trim().to_owned()),
        Ok(_) => warn!(path = %path.display(), "The host id file is not a host id; deriving it again."),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let machine_id = std::fs::read_to_string("/etc/machine-id").ok().map(|m| m.trim().to_owned());
    let id = derive_host_id(machine_id.as_deref().filter(|m| !m.is_empty()), state_dir);
    std::fs::create_dir_all(state_dir)?;
    crate::fsutil::write_atomic(&path, format!("{id}\n").as_bytes(), 0o644)?;
    Ok(id)
}

fn valid_host_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// 32 hex digits from the machine id and the state directory, or random.
fn derive_host_id(machine_id: Option<&str>, state_dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"fleetban host id v1\n");
    match machine_id {
        Some(machine_id) => {
            hash.update(machine_id.as_bytes());
            hash.update(b"\n");
            let dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
            hash.update(dir.as_os_str().as_encoded_bytes());
        }
        None => {
            let mut random = [0u8; 32];
            let read =
                std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random));
            if read.is_err() {
                random.iter_mut().for_each(|b| *b = fastrand::u8(..));
            }
            hash.update(random);
        }
    }
    hex::encode(&hash.finalize()[..16])
}

/// The host's name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The addresses of the host's interfaces, without loopback, link-local and
/// unspecified ones.
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; every node
    // and address pointer is checked for null and read per its family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut node = head;
        while !node.is_null() {
            let addr = (*node).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            node = (*node).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.retain(|ip| {
        !ip.is_loopback()
            && !ip.is_unspecified()
            && !ip.is_multicast()
            && match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            }
    });
    out.sort();
    out.dedup();
    out
}

/// The host's own addresses: its interfaces plus the configured ones
/// (`addresses` in the agent config), sorted, without duplicates.
pub fn own_addresses(config: Option<&AgentConfig>) -> Vec<IpAddr> {
    let mut addresses = interface_addresses();
    if let Some(config) = config {
        addresses.extend(config.addresses.iter().copied());
    }
    addresses.sort();
    addresses.dedup();
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_id_is_kept_derived_per_state_dir_and_hides_the_machine_id() {
        let dir = tempfile::tempdir().unwrap();
        let a = host_id(dir.path()).unwrap();
        assert!(valid_host_id(&a) && a.len() == 32, "{a}");
        assert_eq!(host_id(dir.path()).unwrap(), a, "kept in the state directory");
        std::fs::write(dir.path().join(HOST_ID_FILE), "operator-set-id\n").unwrap();
        assert_eq!(host_id(dir.path()).unwrap(), "operator-set-id");

        let machine = "0123456789abcdef0123456789abcdef";
        let one = derive_host_id(Some(machine), Path::new("/var/lib/fleetban"));
        assert_eq!(one, derive_host_id(Some(machine), Path::new("/var/lib/fleetban")), "stable");
        assert_ne!(one, derive_host_id(Some(machine), Path::new("/var/lib/fleetban-2")), "per state dir");
        assert_ne!(one, derive_host_id(Some("fedcba9876543210fedcba9876543210"), Path::new("/var/lib/fleetban")));
        assert!(!one.contains(&machine[..8]));
        assert_ne!(derive_host_id(None, Path::new("/x")), derive_host_id(None, Path::new("/x")), "random");
    }

    #[test]
    fn interfaces_exclude_loopback() {
        assert!(interface_addresses().iter().all(|ip| !ip.is_loopback()));
        assert!(!hostname().is_empty());
    }

    #[test]
    fn own_addresses_add_the_configured_ones_once() {
        let config = AgentConfig::from_toml(
            "server = \"https://a.example:1\"\naddresses = [\"192.0.2.25\", \"192.0.2.25\"]\n",
            Path::new("agent.toml"),
        )
        .unwrap();
        let extra: IpAddr = "192.0.2.25".parse().unwrap();
        let own = own_addresses(Some(&config));
        assert_eq!(own.iter().filter(|ip| **ip == extra).count(), 1);
        assert!(own.iter().all(|ip| !ip.is_loopback()), "{own:?}");
        assert!(own.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates: {own:?}");
    }
}
