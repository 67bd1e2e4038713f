//! Network namespaces for end-to-end tests: a private L2 segment (a bridge in
//! its own namespace) with one namespace per simulated machine.
//!
//! Nothing is configured in the namespace the tests start in: every link,
//! address and route lives inside the namespaces created here, they carry only
//! documentation addresses (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
//! 2001:db8::/32), and no namespace has a route or link to the outside.
//! Namespace names carry the process id and a counter, so concurrent runs do
//! not collide; [`Netns`] deletes its namespace on drop (the kernel then
//! destroys its veth ends and everything it held, nft tables included).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;

/// Why a namespace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command could not be started.
    #[error("{cmd}: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("{cmd}: exit {status}: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("setns {name}: {source}")]
    Setns {
        /// The namespace.
        name: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Runs `program args`, failing on a non-zero exit.
pub fn run(program: &str, args: &[&str]) -> Result<Output, NetnsError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out =
        Command::new(program).args(args).output().map_err(|source| NetnsError::Spawn { cmd: cmd.clone(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// True when the process can create namespaces and firewall rules.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A unique tag for this process's next topology (`<pid>x<n>`).
pub fn unique_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Addresses are fixed by the test: no duplicate address detection delay.
        ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.accept_dad=0"])?;
        ns.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args`.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec <ns> args`.
    pub fn exec(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Moves the calling thread into this namespace (sockets it opens and
    /// processes it spawns afterwards live there).
    pub fn enter_current_thread(&self) -> Result<(), NetnsError> {
        enter(&self.name)
    }

    /// Runs `f` on a new thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T, NetnsError>> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name)?;
            Ok(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn enter(name: &str) -> Result<(), NetnsError> {
    let file = File::open(format!("/run/netns/{name}"))
        .map_err(|source| NetnsError::Setns { name: name.to_owned(), source })?;
    // SAFETY: setns(2) on a valid namespace fd; it only changes the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns { name: name.to_owned(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// On-link routes every machine gets: the whole segment is one L2 bridge.
const ONLINK: &[&str] = &["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"];

/// A bridge namespace and the machines plugged into it.
#[derive(Debug)]
pub struct Segment {
    tag: String,
    // Machines first: dropped before the bridge.
    machines: Vec<Netns>,
    bridge: Netns,
}

impl Segment {
    /// Creates the bridge namespace `fb<tag>br`.
    pub fn create(tag: &str) -> Result<Segment, NetnsError> {
        let bridge = Netns::create(&format!("fb{tag}br"))?;
        bridge.ip(&["link", "add", "br0", "type", "bridge"])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        Ok(Segment { tag: tag.to_owned(), machines: Vec::new(), bridge })
    }

    /// Creates machine namespace `fb<tag><short>` plugged into the bridge
    /// with `addrs` (host addresses, /32 and /128) on its `eth0`. Returns its
    /// index for [`Segment::machine`].
    pub fn add_machine(&mut self, short: &str, addrs: &[IpAddr]) -> Result<usize, NetnsError> {
        let ns = Netns::create(&format!("fb{}{short}", self.tag))?;
        let port = format!("v{short}");
        self.bridge.ip(&["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
        self.bridge.ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        for addr in addrs {
            match addr {
                IpAddr::V4(_) => ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "eth0"])?,
                IpAddr::V6(_) => ns.ip(&["addr", "add", &format!("{addr}/128"), "dev", "eth0", "nodad"])?,
            };
        }
        for net in ONLINK {
            ns.ip(&["route", "add", net, "dev", "eth0"])?;
        }
        self.machines.push(ns);
        Ok(self.machines.len() - 1)
    }

    /// The machine at `index`.
    pub fn machine(&self, index: usize) -> &Netns {
        &self.machines[index]
    }

    /// Takes machine `short`'s bridge port down (`up = false`) or up again:
    /// its link to everything else is cut while its own state is kept.
    pub fn set_link(&self, short: &str, up: bool) -> Result<(), NetnsError> {
        self.bridge.ip(&["link", "set", &format!("v{short}"), if up { "up" } else { "down" }])?;
        Ok(())
    }
}
