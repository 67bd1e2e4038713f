//! TCP connections from a chosen source address (the test fleet's hosts,
//! attackers and clients live in network namespaces with several
//! addresses each), with a connect timeout.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// Opens a TCP connection to `to`, from `from` when given.
pub fn connect(to: SocketAddr, from: Option<IpAddr>, timeout: Duration) -> std::io::Result<TcpStream> {
    match from {
        None => TcpStream::connect_timeout(&to, timeout),
        Some(ip) => {
            let socket = match ip {
                IpAddr::V4(_) => socket2_like::new(libc::AF_INET)?,
                IpAddr::V6(_) => socket2_like::new(libc::AF_INET6)?,
            };
            socket2_like::bind(&socket, SocketAddr::new(ip, 0))?;
            socket2_like::connect_timeout(socket, to, timeout)
        }
    }
}

/// Opens a TCP connection to `to` from exactly `from` (address and port).
pub fn connect_bound(to: SocketAddr, from: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = match from {
        SocketAddr::V4(_) => socket2_like::new(libc::AF_INET)?,
        SocketAddr::V6(_) => socket2_like::new(libc::AF_INET6)?,
    };
    socket2_like::bind(&socket, from)?;
    socket2_like::connect_timeout(socket, to, timeout)
}

/// Minimal socket helpers for binding a client socket to a chosen source
/// address (std has no bind-before-connect).
mod socket2_like {
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    pub fn new(family: libc::c_int) -> std::io::Result<OwnedFd> {
        // SAFETY: socket(2) returns a new fd or -1.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage.
                unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage.
                unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }

    pub fn bind(fd: &OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
        let (sa, len) = sockaddr(addr);
        // SAFETY: sa/len describe a valid sockaddr.
        if unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(sa).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn connect_timeout(fd: OwnedFd, to: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        let (sa, len) = sockaddr(to);
        // SAFETY: sa/len describe a valid sockaddr.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(sa).cast(), len) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
            let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
            }
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut soerr: libc::c_int = 0;
            let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt into a c_int.
            unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    std::ptr::addr_of_mut!(soerr).cast(),
                    &mut l,
                )
            };
            if soerr != 0 {
                return Err(std::io::Error::from_raw_os_error(soerr));
            }
        }
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}
