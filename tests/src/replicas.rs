//! Server replicas behind HAProxy in the end-to-end fleet.
//!
//! With [`FleetOptions::replicas`](crate::fleet::FleetOptions::replicas)
//! `= N > 1`, the `srv` namespace runs N `fleetban-server serve` processes on
//! the one Postgres, each with its own listeners, and HAProxy (Debian's
//! `/usr/sbin/haproxy`) in front of them on the addresses a single server
//! would hold:
//!
//! | listener | address | what |
//! |---|---|---|
//! | HAProxy `fleetban_grpc` | 192.0.2.1:50051 | `mode tcp`: TLS passes through to a replica, `balance leastconn` |
//! | HAProxy `fleetban_api` | 127.0.0.1:8080 | `mode http`, round robin (the operators' CLI) |
//! | replica `i` gRPC | 127.0.0.1:`50061 + i` | `--grpc-listen`, the server certificate for 192.0.2.1 |
//! | replica `i` HTTP | 127.0.0.1:`8081 + i` | `--http-listen`; HAProxy checks `GET /readyz` here |
//!
//! Agents dial `https://192.0.2.1:50051` as with one server and verify the
//! certificate for that address; HAProxy never terminates TLS, so whichever
//! replica answers presents the same certificate. Health checks run every
//! 500 ms against each replica's `/readyz` (the process serves and its
//! database answers): two failures take a replica out, one success puts it
//! back; `option redispatch` with `retries` sends a connection that finds a
//! dead replica before the checks noticed to another one.
//!
//! [`Cluster`] owns replicas `1..N` and HAProxy (replica 0 is
//! [`Fleet::server`]), all killed on drop. HAProxy logs to
//! `haproxy.log` in the fleet's work directory and answers on a stats
//! socket there; [`Haproxy::sessions`] reads its `show sess`, which says
//! which replica each agent's connection went to.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::fleet::{Fleet, GRPC_PORT, Proc, SERVER, join, log_file, mx_v4, path_str, run_ok, tail_file, wait_until};
use crate::netns::Netns;

/// The HAProxy binary (Debian's package).
pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// gRPC port of replica 0 on the `srv` loopback; replica `i` has `+ i`.
pub const REPLICA_GRPC_PORT: u16 = 50061;
/// HTTP port of replica 0 on the `srv` loopback; replica `i` has `+ i`.
pub const REPLICA_HTTP_PORT: u16 = 8081;
/// The HAProxy backend of the agents' connections.
pub const GRPC_BACKEND: &str = "fleetban_grpc";

/// Replica `i`'s gRPC listener.
pub fn replica_grpc(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), REPLICA_GRPC_PORT + i as u16)
}

/// Replica `i`'s HTTP listener.
pub fn replica_http(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), REPLICA_HTTP_PORT + i as u16)
}

/// HAProxy's name for replica `i`.
pub fn replica_name(i: usize) -> String {
    format!("r{i}")
}

/// The HAProxy configuration for `replicas` replicas: the agents' TCP
/// passthrough on `grpc_front`, the API on `http_front`, the stats socket
/// at `socket`, logs on stdout.
pub fn haproxy_config(grpc_front: SocketAddr, http_front: SocketAddr, replicas: usize, socket: &Path) -> String {
    let mut grpc_servers = String::new();
    let mut http_servers = String::new();
    for i in 0..replicas {
        let name = replica_name(i);
        let http = replica_http(i);
        grpc_servers.push_str(&format!(
            "    server {name} {} send-proxy-v2 check port {}\n",
            replica_grpc(i),
            http.port()
        ));
        http_servers.push_str(&format!("    server {name} {http} check\n"));
    }
    format!(
        "\
global
    log stdout format raw local0 info
    stats socket {socket} mode 600 level admin
    stats timeout 10s

defaults
    log global
    timeout connect 1s
    # Before the connection is a tunnel (both sides connected) and for HTTP.
    timeout client 1m
    timeout server 1m
    # An agent session is one long-lived TCP connection: a live one carries a
    # heartbeat every few seconds, a vanished one is freed after this.
    timeout tunnel 2m
    timeout client-fin 5s
    timeout server-fin 5s
    # A connection that finds a dead replica before the checks noticed is
    # retried on another one.
    retries 3
    option redispatch
    default-server inter 500ms fall 2 rise 1

frontend {GRPC_BACKEND}
    mode tcp
    option tcplog
    bind {grpc_front}
    default_backend {GRPC_BACKEND}

backend {GRPC_BACKEND}
    mode tcp
    balance leastconn
    option clitcpka
    option srvtcpka
    # The replica's readiness (it serves and its database answers) on its HTTP port.
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
{grpc_servers}
frontend fleetban_api
    mode http
    option httplog
    bind {http_front}
    timeout http-request 10s
    default_backend fleetban_api

backend fleetban_api
    mode http
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
{http_servers}",
        socket = socket.display(),
    )
}

/// One connection HAProxy holds (a line of `show sess`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbSession {
    /// The client's address and port.
    pub src: SocketAddr,
    /// The frontend (`fe=`).
    pub frontend: String,
    /// The backend (`be=`), `<NONE>` before one is chosen.
    pub backend: String,
    /// The server (`srv=`), `<none>` before one is chosen.
    pub server: String,
}

/// Parses `show sess` output; lines without a client address (the stats
/// socket's own session) are skipped.
pub fn parse_show_sess(text: &str) -> Vec<LbSession> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut src = None;
        let (mut frontend, mut backend, mut server) = (String::new(), String::new(), String::new());
        for token in line.split_whitespace() {
            if let Some(v) = token.strip_prefix("src=") {
                src = v.parse::<SocketAddr>().ok();
            } else if let Some(v) = token.strip_prefix("fe=") {
                frontend = v.to_owned();
            } else if let Some(v) = token.strip_prefix("be=") {
                backend = v.to_owned();
            } else if let Some(v) = token.strip_prefix("srv=") {
                server = v.to_owned();
            }
        }
        if let Some(src) = src {
            out.push(LbSession { src, frontend, backend, server });
        }
    }
    out
}

/// Parses `show stat` CSV into (proxy, server) → status (`UP`, `DOWN`, ...).
pub fn parse_show_stat(text: &str) -> BTreeMap<(String, String), String> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else { return BTreeMap::new() };
    let columns: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        return BTreeMap::new();
    };
    lines
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            Some(((fields.get(px)?.to_string(), fields.get(sv)?.to_string()), fields.get(st)?.to_string()))
        })
        .collect()
}

/// A running HAProxy, killed on drop.
#[derive(Debug)]
pub struct Haproxy {
    proc: Proc,
    socket: PathBuf,
    log: PathBuf,
}

impl Haproxy {
    /// Checks `config` (`haproxy -c`) and starts HAProxy in the foreground
    /// in `ns`, logging to `log`; waits until its stats socket answers.
    pub fn start(ns: &Netns, config: &Path, socket: &Path, log: &Path) -> anyhow::Result<Haproxy> {
        run_ok(Command::new(HAPROXY).args(["-c", "-q", "-f", path_str(config)?]))
            .with_context(|| format!("{HAPROXY} refuses {}", config.display()))?;
        let child = ns
            .command(HAPROXY)
            .args(["-db", "-f", path_str(config)?])
            .stdin(Stdio::null())
            .stdout(log_file(log)?)
            .stderr(log_file(log)?)
            .spawn()
            .with_context(|| format!("starting {HAPROXY}"))?;
        let mut haproxy = Haproxy { proc: Proc::new(child), socket: socket.to_owned(), log: log.to_owned() };
        let up = wait_until(Duration::from_secs(10), || haproxy.command("show info").is_ok());
        if !up || !haproxy.proc.running() {
            bail!("HAProxy did not start; see {}", log.display());
        }
        Ok(haproxy)
    }

    /// Runs one command on the stats socket and returns its answer.
    pub fn command(&self, command: &str) -> anyhow::Result<String> {
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("HAProxy stats socket {}", self.socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    }

    /// The client connections HAProxy holds now.
    pub fn sessions(&self) -> anyhow::Result<Vec<LbSession>> {
        Ok(parse_show_sess(&self.command("show sess")?))
    }

    /// Health of every server: (backend, server) → status.
    pub fn server_status(&self) -> anyhow::Result<BTreeMap<(String, String), String>> {
        Ok(parse_show_stat(&self.command("show stat")?))
    }

    /// The last `n` lines of HAProxy's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_file(&self.log, n)
    }
}

/// Replicas `1..N` and the load balancer.
#[derive(Debug)]
pub struct Cluster {
    /// HAProxy.
    pub haproxy: Haproxy,
    /// Replicas `1..N` (index `i - 1`); replica 0 is [`Fleet::server`].
    others: Vec<Proc>,
}

impl Cluster {
    /// Kills every replica it owns and HAProxy.
    pub fn kill_all(&mut self) {
        for proc in &mut self.others {
            proc.kill9();
        }
        self.haproxy.proc.kill9();
    }
}

impl Fleet {
    /// Starts HAProxy (once) and every replica that is not running, then
    /// waits until HAProxy sees every replica up.
    pub(crate) fn start_cluster(&mut self) -> anyhow::Result<()> {
        let replicas = self.options.replicas;
        if self.cluster.is_none() {
            let socket = self.dir.join("haproxy.sock");
            let config = self.dir.join("haproxy.cfg");
            let grpc_front = SocketAddr::new(IpAddr::V4(SERVER), GRPC_PORT);
            let http_front = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
            fs::write(&config, haproxy_config(grpc_front, http_front, replicas, &socket))?;
            let haproxy = Haproxy::start(self.server_ns(), &config, &socket, &self.dir.join("haproxy.log"))?;
            let others = (1..replicas).map(|_| Proc::new_empty()).collect();
            self.cluster = Some(Cluster { haproxy, others });
        }
        for i in 0..replicas {
            if !self.replica_proc(i)?.running() {
                self.start_replica(i)?;
            }
        }
        self.wait_replicas_up(&(0..replicas).collect::<Vec<_>>(), Duration::from_secs(10))
    }

    fn cluster(&self) -> anyhow::Result<&Cluster> {
        self.cluster.as_ref().ok_or_else(|| anyhow!("the fleet runs one server, not replicas"))
    }

    /// HAProxy in front of the replicas.
    pub fn haproxy(&self) -> anyhow::Result<&Haproxy> {
        Ok(&self.cluster()?.haproxy)
    }

    fn replica_proc(&mut self, i: usize) -> anyhow::Result<&mut Proc> {
        if i == 0 {
            return Ok(&mut self.server);
        }
        let cluster = self.cluster.as_mut().ok_or_else(|| anyhow!("the fleet runs one server, not replicas"))?;
        cluster.others.get_mut(i - 1).ok_or_else(|| anyhow!("there is no replica {i}"))
    }

    /// Replica `i`'s log file.
    pub fn replica_log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("server-{}.out", replica_name(i)))
    }

    /// Starts (or restarts) replica `i` and waits until it listens.
    pub fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        let log = self.replica_log(i);
        let child = self
            .server_ns()
            .command(path_str(&self.bins.join("fleetban-server"))?)
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join("server.toml"))
            .args(["--grpc-listen", &replica_grpc(i).to_string(), "--http-listen", &replica_http(i).to_string()])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?)
            .spawn()?;
        *self.replica_proc(i)? = Proc::new(child);
        let (grpc, http) = (replica_grpc(i), replica_http(i));
        let up = join(self.server_ns().spawn(move || {
            wait_until(Duration::from_secs(20), || {
                [grpc, http].iter().all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            })
        }))?;
        if !up {
            bail!("replica {i} did not listen on {grpc} and {http}; see {}", log.display());
        }
        Ok(())
    }

    /// `kill -9` replica `i`.
    pub fn kill_replica(&mut self, i: usize) -> anyhow::Result<()> {
        self.replica_proc(i)?.kill9();
        Ok(())
    }

    /// Waits until HAProxy's health checks show replicas `up` as `UP` in
    /// the agents' backend.
    pub fn wait_replicas_up(&self, up: &[usize], within: Duration) -> anyhow::Result<()> {
        let haproxy = self.haproxy()?;
        let ok = wait_until(within, || {
            let status = haproxy.server_status().unwrap_or_default();
            up.iter()
                .all(|&i| status.get(&(GRPC_BACKEND.to_owned(), replica_name(i))).is_some_and(|s| s.starts_with("UP")))
        });
        if !ok {
            bail!(
                "HAProxy does not see replicas {up:?} up: {:?}\n{}",
                haproxy.server_status().unwrap_or_default(),
                haproxy.log_tail(20)
            );
        }
        Ok(())
    }

    /// For each mail host, the replicas its agent's connections through
    /// HAProxy go to now (normally exactly one).
    pub fn agent_replicas(&self) -> anyhow::Result<Vec<Vec<usize>>> {
        let sessions = self.haproxy()?.sessions()?;
        let mut out = vec![Vec::new(); self.hosts.len()];
        for s in sessions.iter().filter(|s| s.backend == GRPC_BACKEND) {
            let Some(host) = (0..self.hosts.len()).find(|&h| s.src.ip() == IpAddr::V4(mx_v4(h))) else { continue };
            let Some(replica) = s.server.strip_prefix('r').and_then(|n| n.parse::<usize>().ok()) else { continue };
            out[host].push(replica);
        }
        for r in &mut out {
            r.sort_unstable();
        }
        Ok(out)
    }

    /// Agent sessions replica `i` reports open (`fleetban_agent_sessions`
    /// on its `/metrics`); `None` when it does not answer.
    pub fn replica_sessions(&self, i: usize) -> Option<u64> {
        let addr = replica_http(i);
        let body = join(self.server_ns().spawn(move || http_get(addr, "/metrics"))).ok()?.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("fleetban_agent_sessions "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// Runs the operator CLI `fleetban ARGS` against replica `i`'s own API
    /// (not through HAProxy); returns its exit success, stdout and stderr.
    pub fn cli_on_replica(&self, i: usize, token: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = self
            .server_ns()
            .command(path_str(&self.bins.join("fleetban"))?)
            .args(["--url", &format!("http://{}", replica_http(i)), "--token", token])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The agents' session ids and connected flags, by host, as the store
    /// has them.
    pub fn agent_sessions(&self) -> anyhow::Result<Vec<(Option<uuid::Uuid>, bool)>> {
        let mut out = Vec::new();
        for h in 0..self.hosts.len() {
            let id = self.agent_id(h)?;
            let row = self.rt.block_on(
                sqlx::query_as::<_, (Option<uuid::Uuid>, bool)>(
                    "select session_id, connected from agents where id = $1",
                )
                .bind(id)
                .fetch_one(&self.pool),
            )?;
            out.push(row);
        }
        Ok(out)
    }

    /// The tails of every replica's log and HAProxy's.
    pub(crate) fn replica_log_tails(&self) -> String {
        let mut out = String::new();
        for i in 0..self.options.replicas {
            out.push_str(&format!("--- replica {i}:\n{}\n", tail_file(&self.replica_log(i), 15)));
        }
        if let Some(cluster) = &self.cluster {
            out.push_str(&format!("--- haproxy:\n{}\n", cluster.haproxy.log_tail(15)));
        }
        out
    }
}

/// A plain HTTP/1.1 GET; returns the body of a 200.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("GET {path} on {addr}: {}", status.trim());
    }
    let mut rest = String::new();
    reader.read_to_string(&mut rest)?;
    Ok(rest.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_sess_gives_each_client_its_server() {
        let text = "0x55f1c2a0e000: proto=tcpv4 src=192.0.2.11:41234 fe=fleetban_grpc be=fleetban_grpc srv=r2 \
                    ts=00 epoch=0x1 age=3s calls=5 rate=0 cpu=0 lat=0 rq[f=8c48000h,i=0,an=00h,rx=,wx=,ax=] \
                    rp[f=80048000h,i=0,an=00h,rx=,wx=,ax=] scf=[8,0h,fd=21,rex=,wex=] scb=[8,1h,fd=22,rex=,wex=] exp=\n\
                    0x55f1c2a0f000: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 age=0s\n";
        let sessions = parse_show_sess(text);
        assert_eq!(
            sessions,
            vec![LbSession {
                src: "192.0.2.11:41234".parse().unwrap(),
                frontend: "fleetban_grpc".into(),
                backend: "fleetban_grpc".into(),
                server: "r2".into(),
            }]
        );
    }

    #[test]
    fn show_stat_gives_each_server_its_status() {
        let text = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight\n\
                    fleetban_grpc,FRONTEND,,,0,1,,,,,,,,,,,,OPEN,\n\
                    fleetban_grpc,r0,0,0,1,1,,,,,,,,,,,,UP,1\n\
                    fleetban_grpc,r1,0,0,0,1,,,,,,,,,,,,DOWN,1\n";
        let status = parse_show_stat(text);
        assert_eq!(status.get(&("fleetban_grpc".into(), "r0".into())).map(String::as_str), Some("UP"));
        assert_eq!(status.get(&("fleetban_grpc".into(), "r1".into())).map(String::as_str), Some("DOWN"));
    }

    #[test]
    fn the_config_checks_and_passes_tls_through() {
        let dir = tempfile::tempdir().unwrap();
        let config = haproxy_config(
            "192.0.2.1:50051".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            3,
            &dir.path().join("haproxy.sock"),
        );
        // TLS is the replicas' business: nothing in front terminates it.
        assert!(!config.contains(" ssl"), "{config}");
        assert!(config.contains("server r2 127.0.0.1:50063 send-proxy-v2 check port 8083"), "{config}");
        if Path::new(HAPROXY).is_file() {
            let path = dir.path().join("haproxy.cfg");
            fs::write(&path, &config).unwrap();
            let out = Command::new(HAPROXY).args(["-c", "-f"]).arg(&path).output().unwrap();
            assert!(out.status.success(), "{}\n{config}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
