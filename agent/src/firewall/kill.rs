//! Ending the established TCP connections of a range the moment it is
//! blocked, so the MTA frees the slots they hold.
//!
//! A drop rule stops a blocked address's *new* packets, but a connection it
//! already holds stays in Exim's process table until `smtp_receive_timeout`
//! (five minutes by default): the attacker's FIN never arrives either. After
//! every commit that added ranges, the firewall thread asks the [`Killer`]
//! to end the connections from those ranges: it lists the host's TCP sockets
//! through the kernel's socket-diagnostics netlink interface
//! (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`) and destroys each matching
//! one with `SOCK_DESTROY`, what `ss -K` does. The kernel closes the socket
//! with `ECONNABORTED` and sends the peer a reset; the MTA's process sees
//! its read fail, logs the session's end and exits, and its slot is free.
//! Nothing is signalled or killed in the MTA itself.
//!
//! Which sockets: remote address inside one of the newly added ranges (an
//! IPv4-mapped IPv6 peer counts as its IPv4 address), state established or
//! close-wait, and a local port the block covers: in the `smtp` scope the
//! SMTP ports (25, 465, 587 and `[firewall] extra_ports`), in the `all`
//! scope any port something on this host listens on, so only *inbound*
//! connections are ended, never one this host opened (the uplink to the
//! fleet server, DNS, outbound mail). The ranges come from the reconciler's
//! plan, which never holds the fleet server's address, the host's own
//! addresses or an allowlisted range.
//!
//! Kernels built without `CONFIG_INET_DIAG_DESTROY` answer `EOPNOTSUPP`;
//! the killer finds out with a probe when it is built, says so once in the
//! log and in `fleetban-agent status`, and does nothing more: the held
//! connections then end at the MTA's own timeout, as without fleetban. The
//! `dry-run` backend lists and counts what it would end, and ends nothing.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ipnet::IpNet;
use tracing::{info, warn};

use super::reconcile::FirewallStats;
use crate::config::FirewallScope;

/// `NETLINK_SOCK_DIAG`.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
/// `SOCK_DIAG_BY_FAMILY`: list sockets.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY`: close one socket.
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// TCP states, as the kernel numbers them.
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;
/// Longest wait for one netlink answer.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// What the killer can do on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillSupport {
    /// The kernel destroys sockets.
    SocketDestroy,
    /// Dry run: connections are listed and counted, not ended.
    DryRun,
    /// The kernel (or the agent's privileges) does not allow it.
    Unsupported(Unsupported),
}

/// Why connections cannot be ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// The kernel was built without `CONFIG_INET_DIAG_DESTROY`.
    Kernel,
    /// The agent lacks `CAP_NET_ADMIN`.
    Permission,
    /// Socket diagnostics are not available (no `inet_diag`).
    Diagnostics,
}

impl KillSupport {
    /// Status code kept in [`FirewallStats::kill_support`]; 0 = not set up.
    pub fn code(&self) -> u8 {
        match self {
            KillSupport::SocketDestroy => 1,
            KillSupport::DryRun => 2,
            KillSupport::Unsupported(Unsupported::Kernel) => 3,
            KillSupport::Unsupported(Unsupported::Permission) => 4,
            KillSupport::Unsupported(Unsupported::Diagnostics) => 5,
        }
    }
}

/// What `status` says of a [`KillSupport::code`].
pub fn describe(code: u8) -> &'static str {
    match code {
        1 => "socket-destroy",
        2 => "dry-run: listed and counted, not ended",
        3 => {
            "unsupported: the kernel was built without CONFIG_INET_DIAG_DESTROY; held connections end at the MTA's \
              own timeout"
        }
        4 => "unsupported: the agent lacks CAP_NET_ADMIN; held connections end at the MTA's own timeout",
        5 => "unsupported: no socket diagnostics (inet_diag); held connections end at the MTA's own timeout",
        _ => "off ([firewall] end_connections = false)",
    }
}

/// Settings of a [`Killer`].
#[derive(Debug, Clone)]
pub struct KillOptions {
    /// What a block covers.
    pub scope: FirewallScope,
    /// Ports of the `smtp` scope.
    pub ports: Vec<u16>,
    /// List and count only.
    pub dry_run: bool,
    /// Network namespace to work in (`/run/netns/NAME`); `None` = the
    /// agent's own.
    pub netns: Option<String>,
}

/// One TCP socket as the kernel lists it.
#[derive(Debug, Clone)]
struct Sock {
    family: u8,
    state: u8,
    local: SocketAddr,
    remote: SocketAddr,
    /// The raw `inet_diag_sockid`, echoed back to destroy this socket.
    id: [u8; SOCKID_LEN],
}

/// Ranges to match remote addresses against, by prefix length.
#[derive(Debug, Default)]
struct Matcher {
    v4: HashMap<u8, HashSet<u32>>,
    v6: HashMap<u8, HashSet<u128>>,
}

impl Matcher {
    fn new(nets: &[IpNet]) -> Self {
        let mut matcher = Matcher::default();
        for net in nets {
            match net.trunc() {
                IpNet::V4(n) => {
                    matcher.v4.entry(n.prefix_len()).or_default().insert(u32::from(n.network()));
                }
                IpNet::V6(n) => {
                    matcher.v6.entry(n.prefix_len()).or_default().insert(u128::from(n.network()));
                }
            }
        }
        matcher
    }

    /// The range holding `ip`, if any.
    fn find(&self, ip: IpAddr) -> Option<IpNet> {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                self.v4.iter().find_map(|(&len, set)| {
                    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
                    set.contains(&(bits & mask))
                        .then(|| IpNet::new(IpAddr::V4(Ipv4Addr::from(bits & mask)), len).ok())
                        .flatten()
                })
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                self.v6.iter().find_map(|(&len, set)| {
                    let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
                    set.contains(&(bits & mask))
                        .then(|| IpNet::new(IpAddr::V6(Ipv6Addr::from(bits & mask)), len).ok())
                        .flatten()
                })
            }
        }
    }

    fn has_v4(&self) -> bool {
        !self.v4.is_empty()
    }
}

/// Ends the connections of newly blocked ranges. See the module docs.
pub struct Killer {
    options: KillOptions,
    socket: Option<OwnedFd>,
    support: KillSupport,
    seq: u32,
    stats: Arc<FirewallStats>,
}

impl std::fmt::Debug for Killer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Killer").field("options", &self.options).field("support", &self.support).finish()
    }
}

impl Killer {
    /// A killer; probes once whether the kernel destroys sockets and says
    /// so in the log when it does not.
    pub fn new(options: KillOptions, stats: Arc<FirewallStats>) -> Self {
        let mut killer = Killer { options, socket: None, support: KillSupport::SocketDestroy, seq: 0, stats };
        killer.support = if killer.options.dry_run { KillSupport::DryRun } else { killer.probe() };
        if let KillSupport::Unsupported(why) = &killer.support {
            warn!(
                reason = describe(killer.support.code()),
                ?why,
                "Cannot end the established connections of blocked ranges: they keep their MTA slots until the \
                 MTA's own timeout."
            );
        }
        killer.publish();
        killer
    }

    /// What the killer can do.
    pub fn support(&self) -> &KillSupport {
        &self.support
    }

    fn publish(&self) {
        self.stats.kill_support.store(self.support.code(), Ordering::Relaxed);
    }

    /// Destroys a socket that cannot exist: `ENOENT` means the kernel can
    /// destroy sockets, `EOPNOTSUPP` that it was built without it.
    fn probe(&mut self) -> KillSupport {
        let id = [0u8; SOCKID_LEN];
        match self.destroy(libc::AF_INET as u8, &id) {
            Ok(()) => KillSupport::SocketDestroy,
            Err(error) => match error.raw_os_error() {
                Some(libc::ENOENT) => KillSupport::SocketDestroy,
                Some(libc::EOPNOTSUPP) => KillSupport::Unsupported(Unsupported::Kernel),
                Some(libc::EPERM) | Some(libc::EACCES) => KillSupport::Unsupported(Unsupported::Permission),
                _ => {
                    warn!(%error, "Socket diagnostics failed.");
                    KillSupport::Unsupported(Unsupported::Diagnostics)
                }
            },
        }
    }

    /// Ends the inbound connections from `nets` (just added to the
    /// firewall) on the covered ports; logs the count per range and returns
    /// the total ended (or, in a dry run, that would be ended).
    pub fn kill(&mut self, nets: &[IpNet]) -> u64 {
        if nets.is_empty() || matches!(self.support, KillSupport::Unsupported(_)) {
            return 0;
        }
        let matcher = Matcher::new(nets);
        let socks = match self.list(&matcher) {
            Ok(socks) => socks,
            Err(error) => {
                self.stats.kill_errors.fetch_add(1, Ordering::Relaxed);
                self.socket = None;
                warn!(%error, "Cannot list the host's TCP connections; held connections of blocked ranges stay.");
                return 0;
            }
        };
        let listening: HashSet<u16> = socks.iter().filter(|s| s.state == TCP_LISTEN).map(|s| s.local.port()).collect();
        let mut per_net: HashMap<IpNet, (u64, u64)> = HashMap::new();
        for sock in socks.iter().filter(|s| s.state == TCP_ESTABLISHED || s.state == TCP_CLOSE_WAIT) {
            let covered = match self.options.scope {
                FirewallScope::Smtp => self.options.ports.contains(&sock.local.port()),
                FirewallScope::All => listening.contains(&sock.local.port()),
            };
            if !covered {
                continue;
            }
            let Some(net) = matcher.find(sock.remote.ip()) else { continue };
            let counts = per_net.entry(net).or_default();
            if self.options.dry_run {
                counts.0 += 1;
                continue;
            }
            match self.destroy(sock.family, &sock.id) {
                Ok(()) => counts.0 += 1,
                // Ended on its own between the listing and now.
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => {
                    counts.1 += 1;
                    if error.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        self.support = KillSupport::Unsupported(Unsupported::Kernel);
                        self.publish();
                        warn!("The kernel cannot destroy sockets: held connections end at the MTA's own timeout.");
                        break;
                    }
                    warn!(%error, local = %sock.local, remote = %sock.remote, "Cannot end a blocked connection.");
                }
            }
        }
        let mut total = 0;
        for (net, (ended, failed)) in per_net {
            total += ended;
            if self.options.dry_run {
                info!(%net, connections = ended, "Dry run: would end the established connections of a blocked range.");
            } else {
                info!(%net, connections = ended, failed, "Ended the established connections of a blocked range.");
            }
            if failed > 0 {
                self.stats.kill_errors.fetch_add(failed, Ordering::Relaxed);
            }
        }
        let counter =
            if self.options.dry_run { &self.stats.connections_would_kill } else { &self.stats.connections_killed };
        counter.fetch_add(total, Ordering::Relaxed);
        total
    }

    /// The TCP sockets of the families `matcher` needs (IPv4 ranges also
    /// match IPv4-mapped peers of IPv6 sockets).
    fn list(&mut self, matcher: &Matcher) -> io::Result<Vec<Sock>> {
        let mut socks = self.dump(libc::AF_INET6 as u8)?;
        if matcher.has_v4() {
            socks.extend(self.dump(libc::AF_INET as u8)?);
        }
        Ok(socks)
    }

    fn socket(&mut self) -> io::Result<i32> {
        if self.socket.is_none() {
            self.socket = Some(open(self.options.netns.as_deref())?);
        }
        // Set just above.
        Ok(self.socket.as_ref().map_or(-1, AsRawFd::as_raw_fd))
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn dump(&mut self, family: u8) -> io::Result<Vec<Sock>> {
        let seq = self.next_seq();
        let states = (1u32 << TCP_ESTABLISHED) | (1u32 << TCP_CLOSE_WAIT) | (1u32 << TCP_LISTEN);
        let request = request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, family, states, &[0; SOCKID_LEN]);
        let fd = self.socket()?;
        send(fd, &request)?;
        let mut socks = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let len = recv(fd, &mut buf)?;
            for (kind, msg_seq, payload) in messages(&buf[..len]) {
                if msg_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(socks),
                    NLMSG_ERROR => {
                        let code = error_code(payload);
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(code));
                        }
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(sock) = parse_sock(payload) {
                            socks.push(sock);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn destroy(&mut self, family: u8, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
        let seq = self.next_seq();
        let request = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, family, u32::MAX, id);
        let fd = self.socket()?;
        send(fd, &request)?;
        let mut buf = vec![0u8; 4096];
        loop {
            let len = recv(fd, &mut buf)?;
            for (kind, msg_seq, payload) in messages(&buf[..len]) {
                if msg_seq == seq && kind == NLMSG_ERROR {
                    let code = error_code(payload);
                    return if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(code)) };
                }
            }
        }
    }
}

/// A `NETLINK_SOCK_DIAG` socket, in network namespace `netns` when given
/// (opened by a thread that entered it: a socket stays in the namespace it
/// was made in).
fn open(netns: Option<&str>) -> io::Result<OwnedFd> {
    let Some(name) = netns else { return open_here() };
    let path = std::path::Path::new("/run/netns").join(name);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = std::fs::File::open(&path)?;
                // SAFETY: setns on a valid namespace file descriptor changes
                // only this short-lived thread's network namespace.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                open_here()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

fn open_here() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval { tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: setsockopt with a valid timeval of the right size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

fn send(fd: i32, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; zeroed = the kernel (pid 0).
    let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: bytes and the address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&to as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for writes of its length.
        let len = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if len >= 0 {
            return Ok(len as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// A netlink request carrying one `inet_diag_req_v2` for TCP.
fn request(kind: u16, flags: u16, seq: u32, family: u8, states: u32, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    bytes.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    bytes.extend_from_slice(&kind.to_ne_bytes());
    bytes.extend_from_slice(&flags.to_ne_bytes());
    bytes.extend_from_slice(&seq.to_ne_bytes());
    bytes.extend_from_slice(&0u32.to_ne_bytes());
    bytes.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    bytes.extend_from_slice(&states.to_ne_bytes());
    bytes.extend_from_slice(id);
    bytes
}

/// The messages of one netlink datagram: (type, seq, payload).
fn messages(mut buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        out.push((kind, seq, &buf[NLMSG_HDR..len]));
        let aligned = (len + 3) & !3;
        buf = buf.get(aligned..).unwrap_or_default();
    }
    out
}

/// The errno of an `NLMSG_ERROR` payload (positive; 0 = an ack).
fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(libc::EIO, |b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// An `inet_diag_msg`.
fn parse_sock(payload: &[u8]) -> Option<Sock> {
    if payload.len() < MSG_LEN {
        return None;
    }
    let family = payload[0];
    let state = payload[1];
    let id: [u8; SOCKID_LEN] = payload[4..4 + SOCKID_LEN].try_into().ok()?;
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |bytes: &[u8]| -> Option<IpAddr> {
        if family == libc::AF_INET as u8 {
            let octets: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        } else if family == libc::AF_INET6 as u8 {
            let octets: [u8; 16] = bytes.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        } else {
            None
        }
    };
    Some(Sock {
        family,
        state,
        local: SocketAddr::new(addr(&id[4..20])?, sport),
        remote: SocketAddr::new(addr(&id[20..36])?, dport),
        id,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn the_matcher_finds_the_range_of_an_address_and_of_a_mapped_one() {
        let matcher = Matcher::new(&[net("198.51.100.0/24"), net("203.0.113.7/32"), net("2001:db8:1::/64")]);
        assert_eq!(matcher.find("198.51.100.9".parse().unwrap()), Some(net("198.51.100.0/24")));
        assert_eq!(matcher.find("::ffff:198.51.100.9".parse().unwrap()), Some(net("198.51.100.0/24")));
        assert_eq!(matcher.find("203.0.113.7".parse().unwrap()), Some(net("203.0.113.7/32")));
        assert_eq!(matcher.find("203.0.113.8".parse().unwrap()), None);
        assert_eq!(matcher.find("2001:db8:1::5".parse().unwrap()), Some(net("2001:db8:1::/64")));
        assert_eq!(matcher.find("2001:db8:2::5".parse().unwrap()), None);
        assert_eq!(matcher.find("192.0.2.1".parse().unwrap()), None);
    }

    #[test]
    fn netlink_messages_are_split_at_their_aligned_lengths_and_never_overrun() {
        let mut datagram = request(SOCK_DESTROY, NLM_F_REQUEST, 7, 2, 0, &[1; SOCKID_LEN]);
        datagram.extend_from_slice(&request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 8, 10, 0, &[2; SOCKID_LEN]));
        let parsed = messages(&datagram);
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].0, parsed[0].1, parsed[0].2.len()), (SOCK_DESTROY, 7, REQ_LEN));
        assert_eq!((parsed[1].0, parsed[1].1), (SOCK_DIAG_BY_FAMILY, 8));
        // A length past the end, or shorter than a header, stops the walk.
        let mut broken = datagram.clone();
        broken[0..4].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(messages(&broken).is_empty());
        broken[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(messages(&broken).is_empty());
        assert!(messages(&datagram[..10]).is_empty());
        // Short payloads are not sockets.
        assert!(parse_sock(&[0; MSG_LEN - 1]).is_none());
    }

    /// Needs root (`CAP_NET_ADMIN`) and a kernel with
    /// `CONFIG_INET_DIAG_DESTROY`; on loopback only.
    #[test]
    fn an_established_loopback_connection_in_a_blocked_range_is_ended_and_others_are_not() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: socket destroy needs root");
            return;
        }
        let stats = Arc::new(FirewallStats::default());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let options = KillOptions { scope: FirewallScope::Smtp, ports: vec![port], dry_run: false, netns: None };
        let mut killer = Killer::new(options, stats.clone());
        assert_eq!(killer.support(), &KillSupport::SocketDestroy, "this kernel should destroy sockets");

        // Two clients from two loopback addresses; the server side of each
        // is what an MTA would hold.
        let connect = |from: &str| {
            let socket = socket2_connect_to(from, port);
            let (served, _) = listener.accept().unwrap();
            (socket, served)
        };
        let (mut blocked_client, mut blocked_served) = connect("127.0.0.2");
        let (mut kept_client, mut kept_served) = connect("127.0.0.3");

        let ended = killer.kill(&[net("127.0.0.2/32")]);
        assert_eq!(ended, 1);
        assert_eq!(stats.connections_killed.load(Ordering::Relaxed), 1);
        // The served side of the blocked connection reads an error at once
        // (ECONNABORTED), as a waiting MTA process does.
        blocked_served.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 16];
        let read = blocked_served.read(&mut buf);
        assert!(
            matches!(&read, Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED)) || matches!(read, Ok(0)),
            "{read:?}"
        );
        // The client got a reset.
        blocked_client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(blocked_client.read(&mut buf).is_err() || blocked_client.write_all(b"x\r\n").is_err());
        // The other connection still works both ways.
        kept_client.write_all(b"ping").unwrap();
        kept_served.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let n = kept_served.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");

        // A port the scope does not cover is left alone.
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = socket2_connect_to("127.0.0.3", other.local_addr().unwrap().port());
        let (mut served, _) = other.accept().unwrap();
        assert_eq!(killer.kill(&[net("127.0.0.3/32")]), 1, "only the covered port's connection");
        served.set_nonblocking(true).unwrap();
        assert!(matches!(served.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    #[test]
    fn a_dry_run_counts_and_ends_nothing() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: socket listing of this test runs as root in CI");
            return;
        }
        let stats = Arc::new(FirewallStats::default());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let options = KillOptions { scope: FirewallScope::All, ports: Vec::new(), dry_run: true, netns: None };
        let mut killer = Killer::new(options, stats.clone());
        let _client = socket2_connect_to("127.0.0.4", port);
        let (mut served, _) = listener.accept().unwrap();
        assert_eq!(killer.kill(&[net("127.0.0.4/32")]), 1);
        assert_eq!(stats.connections_would_kill.load(Ordering::Relaxed), 1);
        assert_eq!(stats.connections_killed.load(Ordering::Relaxed), 0);
        served.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4];
        assert!(matches!(served.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock));
    }

    /// The reconciler ends the connections of what a commit adds (a local
    /// block here; snapshots and deltas go through the same commit), and
    /// nothing of ranges it did not add or of an allowlisted address.
    #[test]
    fn a_commit_that_adds_a_range_ends_its_connections_and_only_its() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: socket destroy needs root");
            return;
        }
        use super::super::dryrun::DryRun;
        use super::super::reconcile::Reconciler;
        use super::super::{Entry, now_ms};
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(FirewallStats::default());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let options = KillOptions { scope: FirewallScope::Smtp, ports: vec![port], dry_run: false, netns: None };
        // 127.0.0.9 is allowlisted: the plan carves it out of the /24.
        let allow = vec![net("127.0.9.9/32")];
        let mut reconciler =
            Reconciler::new(Box::new(DryRun::new(dir.path().join("dry.json"))), allow, None, stats.clone())
                .with_killer(Killer::new(options, stats.clone()));
        reconciler.reconcile(now_ms()).unwrap();
        let mut served = Vec::new();
        for from in ["127.0.9.5", "127.0.9.9", "127.0.8.5"] {
            let client = socket2_connect_to(from, port);
            let (stream, _) = listener.accept().unwrap();
            served.push((from, client, stream));
        }
        let entry = Entry { net: net("127.0.9.0/24"), expires_at_ms: None, reason: "test".into() };
        reconciler.add_local(entry, now_ms()).unwrap();
        assert_eq!(stats.connections_killed.load(Ordering::Relaxed), 1);
        let mut buf = [0u8; 4];
        for (from, _client, stream) in &mut served {
            stream.set_nonblocking(true).unwrap();
            let read = stream.read(&mut buf);
            let alive = matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            assert_eq!(alive, *from != "127.0.9.5", "{from}: {read:?}");
        }
    }

    /// In scope `all` only inbound connections (to a port something
    /// listens on) are ended: a connection this host opened to a blocked
    /// address, like the uplink to the fleet server, is left alone.
    #[test]
    fn scope_all_never_ends_a_connection_this_host_opened() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: socket destroy needs root");
            return;
        }
        let stats = Arc::new(FirewallStats::default());
        // Addresses no other test uses: blocking 127.0.0.1 would end every
        // loopback connection of the machine to a listening port.
        let listener = TcpListener::bind("127.0.0.11:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let options = KillOptions { scope: FirewallScope::All, ports: Vec::new(), dry_run: false, netns: None };
        let mut killer = Killer::new(options, stats.clone());
        // An outbound connection from 127.0.0.12 to a "server" at 127.0.0.11.
        let mut outbound = connect_from_to("127.0.0.12", "127.0.0.11", port);
        let (mut served, _) = listener.accept().unwrap();
        assert_eq!(killer.kill(&[net("127.0.0.11/32")]), 0, "the outbound side must not be ended");
        outbound.write_all(b"ok").unwrap();
        served.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2];
        served.read_exact(&mut buf).unwrap();
        // The inbound side of the same connection is ended when its peer is
        // blocked.
        assert_eq!(killer.kill(&[net("127.0.0.12/32")]), 1);
        assert!(matches!(served.read(&mut buf), Err(_) | Ok(0)));
    }

    /// A loopback connection from a chosen 127/8 source address to
    /// 127.0.0.1.
    fn socket2_connect_to(from: &str, port: u16) -> TcpStream {
        connect_from_to(from, "127.0.0.1", port)
    }

    /// A loopback connection from `from` to `to`:`port`.
    fn connect_from_to(from: &str, to: &str, port: u16) -> TcpStream {
        let from: Ipv4Addr = from.parse().unwrap();
        let to_addr: Ipv4Addr = to.parse().unwrap();
        // SAFETY: plain socket/bind/connect on a fresh descriptor owned by
        // the returned stream.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let stream = TcpStream::from_raw_fd(fd);
            let mut local: libc::sockaddr_in = std::mem::zeroed();
            local.sin_family = libc::AF_INET as libc::sa_family_t;
            local.sin_addr.s_addr = u32::from(from).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len), 0);
            let mut to = local;
            to.sin_addr.s_addr = u32::from(to_addr).to_be();
            to.sin_port = port.to_be();
            assert_eq!(libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len), 0);
            stream
        }
    }
}
