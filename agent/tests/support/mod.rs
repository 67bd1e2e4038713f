//! Network namespaces for firewall tests and benchmarks: a server namespace
//! with listeners on ports 25 and 80, and a client namespace holding the
//! source addresses, joined by a veth pair. Only documentation ranges are
//! used, nothing is routed outside, and both namespaces are deleted on drop.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The server's addresses.
pub const SERVER_V4: &str = "203.0.113.1";
pub const SERVER_V6: &str = "2001:db8:1::1";

/// Source addresses the client namespace holds.
pub const CLIENT_SOURCES: &[&str] = &[
    "192.0.2.1",
    "192.0.2.10",
    "192.0.2.77",
    "192.0.2.254",
    "198.51.100.10",
    "198.51.100.20",
    "2001:db8:bad::1",
    "2001:db8:bad::2",
    "2001:db8:600d::1",
];

/// Whether the tests can create namespaces; prints a loud message if not.
pub fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("\n!!!!!!!!!! SKIPPED {test}: firewall kernel tests need root (network namespaces) !!!!!!!!!!\n");
    false
}

fn sh(args: &[&str]) {
    let output = Command::new(args[0]).args(&args[1..]).output().expect("run command");
    assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// A pair of namespaces; deleted on drop.
pub struct Netns {
    pub server: String,
    pub client: String,
    stop: Arc<AtomicBool>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let id = format!("{}{}", std::process::id() % 100_000, tag);
        let server = format!("fbs{id}");
        let client = format!("fbc{id}");
        let _ = Command::new("ip").args(["netns", "del", &server]).output();
        let _ = Command::new("ip").args(["netns", "del", &client]).output();
        sh(&["ip", "netns", "add", &server]);
        sh(&["ip", "netns", "add", &client]);
        let ns = Netns { server: server.clone(), client: client.clone(), stop: Arc::default() };
        sh(&["ip", "link", "add", "fbs0", "netns", &server, "type", "veth", "peer", "name", "fbc0", "netns", &client]);
        let s = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &server];
            full.extend_from_slice(args);
            sh(&full);
        };
        let c = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &client];
            full.extend_from_slice(args);
            sh(&full);
        };
        s(&["ip", "link", "set", "lo", "up"]);
        c(&["ip", "link", "set", "lo", "up"]);
        s(&["ip", "addr", "add", "203.0.113.1/24", "dev", "fbs0"]);
        s(&["ip", "-6", "addr", "add", "2001:db8:1::1/64", "dev", "fbs0", "nodad"]);
        c(&["ip", "addr", "add", "203.0.113.2/24", "dev", "fbc0"]);
        c(&["ip", "-6", "addr", "add", "2001:db8:1::2/64", "dev", "fbc0", "nodad"]);
        for source in CLIENT_SOURCES {
            if source.contains(':') {
                c(&["ip", "-6", "addr", "add", &format!("{source}/128"), "dev", "fbc0", "nodad"]);
            } else {
                c(&["ip", "addr", "add", &format!("{source}/32"), "dev", "fbc0"]);
            }
        }
        s(&["ip", "link", "set", "fbs0", "up"]);
        c(&["ip", "link", "set", "fbc0", "up"]);
        for net in ["192.0.2.0/24", "198.51.100.0/24"] {
            s(&["ip", "route", "add", net, "via", "203.0.113.2"]);
        }
        for net in ["2001:db8:bad::/48", "2001:db8:600d::/48"] {
            s(&["ip", "-6", "route", "add", net, "via", "2001:db8:1::2"]);
        }
        for port in [25u16, 80] {
            ns.listen(port);
        }
        // Wait until the listeners answer an allowed source.
        for _ in 0..100 {
            if ns.can_connect("203.0.113.2", 25) && ns.can_connect("2001:db8:1::2", 25) {
                return ns;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("namespace listeners did not come up");
    }

    /// Accepts (and drops) connections on `[::]:port` in the server namespace.
    fn listen(&self, port: u16) {
        let server = self.server.clone();
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            enter(&server);
            let listener = std::net::TcpListener::bind(("::", port)).expect("bind listener");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => drop(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv().unwrap();
    }

    /// Whether a TCP connect from `source` (in the client namespace) to the
    /// server's `port` succeeds within 700 ms.
    pub fn can_connect(&self, source: &str, port: u16) -> bool {
        let client = self.client.clone();
        let source: IpAddr = source.parse().unwrap();
        std::thread::spawn(move || {
            enter(&client);
            let target: IpAddr = if source.is_ipv4() { SERVER_V4.parse().unwrap() } else { SERVER_V6.parse().unwrap() };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let socket =
                    if source.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
                        .unwrap();
                socket.bind(SocketAddr::new(source, 0)).unwrap();
                matches!(
                    tokio::time::timeout(Duration::from_millis(700), socket.connect(SocketAddr::new(target, port)))
                        .await,
                    Ok(Ok(_))
                )
            })
        })
        .join()
        .unwrap()
    }

    /// An established TCP connection from the server namespace (the host,
    /// e.g. its uplink) to `remote:port` in the client namespace; returns
    /// (the host's end, the remote end).
    pub fn outbound(&self, remote: &str, port: u16) -> (std::net::TcpStream, std::net::TcpStream) {
        let addr = SocketAddr::new(remote.parse().unwrap(), port);
        let client = self.client.clone();
        let listener = std::thread::spawn(move || {
            enter(&client);
            std::net::TcpListener::bind(addr).expect("bind in the client namespace")
        })
        .join()
        .unwrap();
        let server = self.server.clone();
        let host = std::thread::spawn(move || {
            enter(&server);
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect out")
        })
        .join()
        .unwrap();
        let (remote_end, _) = listener.accept().expect("accept");
        (host, remote_end)
    }

    /// Runs a command in the server namespace.
    pub fn exec_server(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.server];
        full.extend_from_slice(args);
        let output = Command::new(full[0]).args(&full[1..]).output().expect("run");
        assert!(output.status.success(), "{full:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// Moves the calling thread into namespace `name`.
pub fn enter(name: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{name}")).expect("open netns");
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = Command::new("ip").args(["netns", "del", &self.server]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.client]).output();
    }
}
