//! A whole fleet in network namespaces, for end-to-end tests.
//!
//! [`Fleet::start`] builds one L2 segment ([`crate::netns::Segment`]) with:
//!
//! | namespace | addresses | runs |
//! |---|---|---|
//! | `srv` | 192.0.2.1 | `fleetban-server serve` (gRPC with TLS on 192.0.2.1:50051, HTTP on 127.0.0.1:8080) |
//! | `mx1`..`mx3` | 192.0.2.11–13, 2001:db8:1::11–13 | `fleetban-smtp-sim` (or a real Exim, [`Mta::Exim`]) on port 25 writing the Exim log, `fleetban-agent run` with the nftables backend |
//! | `att` | 198.51.100.10–99 (a few), 2001:db8:bad::1–4 | nothing: the test opens connections from it |
//! | `cli` | 203.0.113.50 | nothing: the legitimate client |
//!
//! [`FleetOptions::hosts`] sets how many mail hosts there are (three by
//! default) and [`FleetOptions::mta`] what listens on their port 25: the
//! simulator, or a real Exim daemon started by [`crate::exim`] that logs to
//! the same `exim_mainlog` the agent tails. [`FleetOptions::replicas`] above
//! one runs that many servers in `srv` behind HAProxy, which then holds
//! 192.0.2.1:50051 and 127.0.0.1:8080 ([`crate::replicas`]).
//!
//! Postgres runs on the test's side (the namespace the test started in) and
//! the server in `srv` reaches it over its Unix socket; agents run inside
//! their host's namespace (`ip netns exec`) and reach the server over the
//! bridge like real hosts, so cutting a host's bridge port cuts its uplink
//! and nothing else.
//! Everything is torn down on drop: processes killed, namespaces deleted
//! (which destroys links and nft tables), the work directory removed.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use fleetban_server::pgembed::EmbeddedPostgres;

use crate::exim::{EximDaemon, EximOptions};
use crate::netns::{Netns, Segment, unique_tag};
pub use crate::sock::{connect, connect_bound};

/// The server's address on the segment.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The gRPC port.
pub const GRPC_PORT: u16 = 50051;
/// The legitimate client.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);

/// Host `i` (0-based) v4 address.
pub fn mx_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 11 + i as u8)
}

/// Host `i` (0-based) v6 address.
pub fn mx_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11 + i as u16)
}

/// The attacker's IPv4 addresses (198.51.100.x for these x).
pub const ATTACKER_V4_LAST: &[u8] = &[10, 20, 31, 32, 33, 34, 35, 40, 41, 42, 43, 44, 45, 46, 47, 48];

/// Attacker IPv4 address 198.51.100.`last` (must be in [`ATTACKER_V4_LAST`]).
pub fn att_v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, last))
}

/// Attacker IPv6 address 2001:db8:bad::`n` (n in 1..=4).
pub fn att_v6(n: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, n))
}

/// What listens on each mail host's port 25.
#[derive(Debug, Clone, Default)]
pub enum Mta {
    /// `fleetban-smtp-sim` (no mail server needed).
    #[default]
    Simulator,
    /// A real Exim daemon ([`crate::exim`]); its `smtp_accept_max` is
    /// [`FleetOptions::smtp_accept_max`].
    Exim(EximOptions),
}

/// Per-test knobs.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// How many mail hosts (`mx1`..): at most 9.
    pub hosts: usize,
    /// What listens on their port 25.
    pub mta: Mta,
    /// Extra TOML appended to every agent's `[detect]` table.
    pub detect: String,
    /// Extra TOML appended to every agent's `[firewall]` table.
    pub firewall: String,
    /// Agent `[allowlist] cidrs`.
    pub agent_allowlist: Vec<String>,
    /// Lines for the server's `[correlate]` table.
    pub correlate: String,
    /// `smtp_accept_max` of the simulated or real Exim (and the agents'
    /// `[detect] smtp_accept_max`).
    pub smtp_accept_max: usize,
    /// Also run a real Dovecot (IMAP 143, POP3 110; [`crate::dovecot`]) on
    /// every mail host, tailed by its agent as a second, `dovecot` source.
    pub dovecot: bool,
    /// Lines appended to every Dovecot's configuration (with
    /// [`FleetOptions::dovecot`]).
    pub dovecot_extra: String,
    /// How many `fleetban-server serve` processes share the database: 1 (the
    /// default) is one server on the agents' address; more run behind
    /// HAProxy ([`crate::replicas`]), at most 9.
    pub replicas: usize,
    /// Lines of every agent's `[aggregate]` table (empty: the defaults,
    /// context summarised per minute).
    pub aggregate: String,
}

impl Default for FleetOptions {
    fn default() -> Self {
        FleetOptions {
            hosts: 3,
            mta: Mta::Simulator,
            detect: String::new(),
            firewall: String::new(),
            agent_allowlist: Vec::new(),
            correlate: String::new(),
            smtp_accept_max: 20,
            dovecot: false,
            dovecot_extra: String::new(),
            replicas: 1,
            aggregate: String::new(),
        }
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub(crate) fn new(child: Child) -> Proc {
        Proc { child: Some(child) }
    }

    /// No process (yet).
    pub(crate) fn new_empty() -> Proc {
        Proc { child: None }
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on a child we own and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One mail host.
#[derive(Debug)]
pub struct Host {
    /// Short name (`mx1`).
    pub short: String,
    /// Segment index of its namespace.
    pub index: usize,
    /// Its work directory (agent state, config, Exim log).
    pub dir: PathBuf,
    /// The simulated Exim (not running with [`Mta::Exim`]).
    pub smtp: Proc,
    /// The real Exim daemon ([`Mta::Exim`]).
    pub exim: Option<EximDaemon>,
    /// The real Dovecot ([`FleetOptions::dovecot`]).
    pub dovecot: Option<crate::dovecot::DovecotDaemon>,
    /// The agent.
    pub agent: Proc,
}

impl Host {
    /// The Exim main log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("exim_mainlog")
    }
}

/// The whole fleet.
#[derive(Debug)]
pub struct Fleet {
    /// Work directory.
    pub dir: PathBuf,
    /// The mail hosts.
    pub hosts: Vec<Host>,
    /// The server process (replica 0 with [`FleetOptions::replicas`] > 1).
    pub server: Proc,
    /// The other replicas and the load balancer in front of them
    /// ([`FleetOptions::replicas`] > 1).
    pub cluster: Option<crate::replicas::Cluster>,
    // Drop order: processes, then Postgres, then namespaces.
    /// The embedded Postgres (in the `srv` namespace).
    pub pg: EmbeddedPostgres,
    /// Runtime for database queries (its sockets live in `srv`).
    pub rt: tokio::runtime::Runtime,
    /// Pool on the fleet database.
    pub pool: sqlx::PgPool,
    segment: Segment,
    srv: usize,
    att: usize,
    cli: usize,
    pub(crate) bins: PathBuf,
    pub(crate) options: FleetOptions,
}

/// Directory of the workspace's binaries (next to the test executable's `deps/`).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().ok_or_else(|| anyhow!("no parent of {}", exe.display()))?;
    let dir = if deps.ends_with("deps") { deps.parent().unwrap_or(deps) } else { deps };
    Ok(dir.to_path_buf())
}

/// The directory holding the agent, server and simulator binaries of the
/// running test's profile; fails when one is missing (`cargo test
/// --workspace` builds them; so does `cargo build -p fleetban-agent -p
/// fleetban-server -p fleetban-tests --bins`). `FLEETBAN_BIN_DIR` names
/// another directory, for a target directory shared by several checkouts,
/// where the binaries next to the test may come from another one.
pub fn binaries() -> anyhow::Result<PathBuf> {
    let bins = match std::env::var_os("FLEETBAN_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => bin_dir()?,
    };
    for name in ["fleetban-agent", "fleetban-server", "fleetban", "fleetban-smtp-sim"] {
        if !bins.join(name).is_file() {
            bail!(
                "{} is missing: build the binaries first (cargo build -p fleetban-agent -p fleetban-server \
                 -p fleetban-tests --bins, with the same profile as the test)",
                bins.join(name).display()
            );
        }
    }
    Ok(bins)
}

impl Fleet {
    /// Builds the topology and starts everything.
    pub fn start(bins: PathBuf, options: FleetOptions) -> anyhow::Result<Fleet> {
        let tag = unique_tag();
        let dir = std::env::temp_dir().join(format!("fleetban-e2e-{tag}"));
        fs::create_dir_all(&dir)?;
        let mut segment = Segment::create(&tag)?;
        let srv = segment.add_machine("srv", &[IpAddr::V4(SERVER)])?;
        if !(1..=9).contains(&options.hosts) {
            bail!("FleetOptions::hosts is {}; 1 to 9 are supported", options.hosts);
        }
        if !(1..=9).contains(&options.replicas) {
            bail!("FleetOptions::replicas is {}; 1 to 9 are supported", options.replicas);
        }
        let mut host_idx = Vec::new();
        for i in 0..options.hosts {
            host_idx.push(segment.add_machine(&format!("mx{}", i + 1), &[IpAddr::V4(mx_v4(i)), IpAddr::V6(mx_v6(i))])?);
        }
        let mut att_addrs: Vec<IpAddr> = ATTACKER_V4_LAST.iter().map(|&l| att_v4(l)).collect();
        att_addrs.extend((1..=4).map(att_v6));
        let att = segment.add_machine("att", &att_addrs)?;
        let cli = segment.add_machine("cli", &[IpAddr::V4(CLIENT)])?;

        // Postgres runs in the namespace the test started in (its spawner
        // thread lives there for the whole process); the server in `srv`
        // reaches it through its Unix socket, which no namespace confines.
        let pg = EmbeddedPostgres::start().context("embedded postgres")?;
        let db_url = format!(
            "postgres://{}@localhost/{}?host={}&port={}",
            fleetban_server::pgembed::USER,
            fleetban_server::pgembed::USER,
            pg.dir().display(),
            pg.port()
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let pool = rt.block_on(fleetban_server::db::connect(&db_url, 4))?;
        rt.block_on(fleetban_server::db::migrate(&pool))?;

        // TLS: agents verify the server by its address.
        let pki = dir.join("pki");
        run_ok(Command::new(bins.join("fleetban-server")).args([
            "pki",
            "init",
            "--dir",
            path_str(&pki)?,
            "--server-name",
            &SERVER.to_string(),
        ]))?;
        let server_toml = dir.join("server.toml");
        fs::write(
            &server_toml,
            format!(
                "database_url = \"{}\"\ngrpc_listen = \"{SERVER}:{GRPC_PORT}\"\nhttp_listen = \"127.0.0.1:8080\"\n\
                 heartbeat_secs = 5\n{}[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[correlate]\n{}\n",
                db_url,
                // Behind HAProxy the replicas learn each agent's address from
                // the PROXY header HAProxy (on the srv namespace's loopback)
                // sends.
                if options.replicas > 1 { "proxy_protocol_from = [\"127.0.0.1/32\"]\n" } else { "" },
                pki.join("server.pem").display(),
                pki.join("server.key").display(),
                options.correlate
            ),
        )?;
        let mut fleet = Fleet {
            dir,
            hosts: Vec::new(),
            server: Proc { child: None },
            cluster: None,
            pg,
            rt,
            pool,
            segment,
            srv,
            att,
            cli,
            bins,
            options,
        };
        fleet.start_server()?;
        let token = String::from_utf8(
            run_ok(Command::new(fleet.bins.join("fleetban-server")).env("RUST_LOG", "warn").args([
                "enroll-token",
                "create",
                "--config",
                path_str(&server_toml)?,
                "--uses",
                &fleet.options.hosts.to_string(),
                "--ttl",
                "1h",
            ]))?
            .stdout,
        )?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
        for (i, &index) in host_idx.iter().enumerate() {
            let short = format!("mx{}", i + 1);
            let hdir = fleet.dir.join(&short);
            fs::create_dir_all(&hdir)?;
            fs::write(hdir.join("exim_mainlog"), "")?;
            fleet.write_agent_config(&hdir)?;
            let ns = fleet.segment.machine(index);
            run_ok(
                ns.command(path_str(&fleet.bins.join("fleetban-agent"))?)
                    .args(["enroll", "--server", &format!("https://{SERVER}:{GRPC_PORT}"), "--token", &token])
                    // The namespaces share the test machine's host name.
                    .args(["--name", &short])
                    .arg("--config")
                    .arg(hdir.join("agent.toml")),
            )?;
            let (smtp, exim) = match &fleet.options.mta {
                Mta::Simulator => {
                    let smtp = Proc::new(
                        ns.command(path_str(&fleet.bins.join("fleetban-smtp-sim"))?)
                            .arg("--log")
                            .arg(hdir.join("exim_mainlog"))
                            .args([
                                "--listen",
                                "[::]:25",
                                "--max-connections",
                                &fleet.options.smtp_accept_max.to_string(),
                            ])
                            .stdout(Stdio::null())
                            .stderr(log_file(&hdir.join("smtp-sim.out"))?)
                            .spawn()?,
                    );
                    (smtp, None)
                }
                Mta::Exim(exim) => {
                    let options = EximOptions {
                        hostname: format!("{short}.example.net"),
                        smtp_accept_max: u32::try_from(fleet.options.smtp_accept_max)?,
                        ..exim.clone()
                    };
                    // Logs to `<hdir>/exim_mainlog`, the file the agent tails.
                    let daemon =
                        EximDaemon::start(ns, &hdir, 25, &options).with_context(|| format!("{short}: exim"))?;
                    (Proc { child: None }, Some(daemon))
                }
            };
            let dovecot = if fleet.options.dovecot {
                let daemon =
                    crate::dovecot::DovecotDaemon::start(ns, &hdir, IpAddr::V4(mx_v4(i)), &fleet.options.dovecot_extra)
                        .with_context(|| format!("{short}: dovecot"))?;
                Some(daemon)
            } else {
                None
            };
            fleet.hosts.push(Host { short, index, dir: hdir, smtp, exim, dovecot, agent: Proc { child: None } });
            fleet.start_agent(i)?;
        }
        // Ready: every agent connected and every listener answering.
        let hosts = fleet.options.hosts;
        fleet.wait_agents_connected(i64::try_from(hosts)?, Duration::from_secs(20))?;
        for i in 0..hosts {
            let addr = SocketAddr::new(IpAddr::V4(mx_v4(i)), 25);
            let ok =
                fleet.in_client(move || wait_until(Duration::from_secs(10), || smtp_banner(addr, None).is_ok()))?;
            if !ok {
                bail!("mx{} port 25 never answered", i + 1);
            }
        }
        Ok(fleet)
    }

    fn write_agent_config(&self, hdir: &Path) -> anyhow::Result<()> {
        let allow = self.options.agent_allowlist.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ");
        let toml = format!(
            "server = \"https://{SERVER}:{GRPC_PORT}\"\nca_file = \"{}\"\nstate_dir = \"{}\"\ntimezone = \"UTC\"\n\
             [[source]]\nkind = \"exim\"\npath = \"{}\"\nstart_at = \"beginning\"\n{}\
             [spool]\nfsync_ms = 20\n\
             [firewall]\nbackend = \"nftables\"\nscope = \"smtp\"\nreconcile_secs = 5\n{}\n\
             [allowlist]\ncidrs = [{allow}]\n\
             [detect]\nsmtp_accept_max = {}\n{}\n",
            self.dir.join("pki/ca.pem").display(),
            hdir.join("state").display(),
            hdir.join("exim_mainlog").display(),
            if self.options.dovecot {
                format!(
                    "[[source]]\nkind = \"dovecot\"\npath = \"{}\"\nstart_at = \"beginning\"\n",
                    hdir.join("dovecot.log").display()
                )
            } else {
                String::new()
            },
            self.options.firewall,
            self.options.smtp_accept_max,
            self.options.detect,
        );
        let toml = format!("{toml}[aggregate]\n{}\n", self.options.aggregate);
        fs::write(hdir.join("agent.toml"), toml)?;
        Ok(())
    }

    /// Starts (or restarts) the server process; with replicas, every replica
    /// that is not running (and the load balancer first).
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        if self.options.replicas > 1 {
            return self.start_cluster();
        }
        let child = self
            .server_ns()
            .command(path_str(&self.bins.join("fleetban-server"))?)
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join("server.toml"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log_file(&self.dir.join("server.out"))?)
            .stderr(log_file(&self.dir.join("server.out"))?)
            .spawn()?;
        self.server = Proc::new(child);
        let addr = SocketAddr::new(IpAddr::V4(SERVER), GRPC_PORT);
        let up = join(self.server_ns().spawn(move || {
            wait_until(Duration::from_secs(20), || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        }))?;
        if !up {
            bail!("server did not listen on {addr}; see {}", self.dir.join("server.out").display());
        }
        Ok(())
    }

    /// Starts (or restarts) host `i`'s agent.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let host = &self.hosts[i];
        let ns = self.segment.machine(host.index);
        let child = ns
            .command(path_str(&self.bins.join("fleetban-agent"))?)
            .arg("run")
            .arg("--config")
            .arg(host.dir.join("agent.toml"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log_file(&host.dir.join("agent.out"))?)
            .stderr(log_file(&host.dir.join("agent.out"))?)
            .spawn()?;
        self.hosts[i].agent = Proc::new(child);
        Ok(())
    }

    /// Waits until `n` agents hold a session with the server.
    pub fn wait_agents_connected(&self, n: i64, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            // The server marks an agent connected while its session is open.
            let count: i64 = self
                .rt
                .block_on(
                    sqlx::query_scalar::<_, i64>("select count(*) from agents where connected").fetch_one(&self.pool),
                )
                .unwrap_or(0);
            if count >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {count} of {n} agents connected; see {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The attacker namespace.
    pub fn attacker(&self) -> &Netns {
        self.segment.machine(self.att)
    }

    /// The legitimate client namespace.
    pub fn client(&self) -> &Netns {
        self.segment.machine(self.cli)
    }

    /// The server namespace.
    pub fn server_ns(&self) -> &Netns {
        self.segment.machine(self.srv)
    }

    /// Host `i`'s namespace.
    pub fn host_ns(&self, i: usize) -> &Netns {
        self.segment.machine(self.hosts[i].index)
    }

    /// Cuts (`up = false`) or restores host `i`'s link to the segment.
    pub fn set_host_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        Ok(self.segment.set_link(&self.hosts[i].short, up)?)
    }

    /// Runs `f` on a thread in the attacker namespace and waits for it.
    pub fn in_attacker<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        join(self.attacker().spawn(f))
    }

    /// Runs `f` on a thread in the client namespace and waits for it.
    pub fn in_client<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        join(self.client().spawn(f))
    }

    /// The CIDRs in host `i`'s nftables sets (`nft list table inet fleetban`).
    pub fn nft_entries(&self, i: usize) -> anyhow::Result<String> {
        let out = self.host_ns(i).command("nft").args(["list", "table", "inet", "fleetban"]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The live block covering `addr`: (id, cidr, source).
    pub fn live_block(&self, addr: IpAddr) -> anyhow::Result<Option<(i64, String, String)>> {
        let row = self.rt.block_on(
            sqlx::query_as::<_, (i64, String, String)>(
                "select id, cidr::text, source from blocks where revoked_at is null \
                 and (expires_at is null or expires_at > now()) and cidr >>= $1::inet order by masklen(cidr) limit 1",
            )
            .bind(addr.to_string())
            .fetch_optional(&self.pool),
        )?;
        Ok(row)
    }

    /// Events stored for `addr` (any agent, any kind).
    pub fn stored_events(&self, addr: IpAddr) -> anyhow::Result<i64> {
        let n = self.rt.block_on(
            sqlx::query_scalar::<_, i64>("select count(*) from events where remote = $1::inet")
                .bind(addr.to_string())
                .fetch_one(&self.pool),
        )?;
        Ok(n)
    }

    /// Every block that ever covered `addr`, live, expired or revoked:
    /// (id, cidr, source, reason).
    pub fn blocks_ever(&self, addr: IpAddr) -> anyhow::Result<Vec<(i64, String, String, String)>> {
        let rows = self.rt.block_on(
            sqlx::query_as::<_, (i64, String, String, String)>(
                "select id, cidr::text, source, reason from blocks where cidr >>= $1::inet order by id",
            )
            .bind(addr.to_string())
            .fetch_all(&self.pool),
        )?;
        Ok(rows)
    }

    /// The CIDRs of every live block.
    pub fn live_cidrs(&self) -> anyhow::Result<Vec<String>> {
        let rows = self.rt.block_on(
            sqlx::query_scalar::<_, String>(
                "select cidr::text from blocks where revoked_at is null and (expires_at is null or expires_at > now())",
            )
            .fetch_all(&self.pool),
        )?;
        Ok(rows)
    }

    /// Deletes block `id` the way `DELETE /api/v1/blocks/{id}` does.
    /// An admin API token, made the way an operator makes one
    /// (`fleetban-server token create --role admin`).
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let token = String::from_utf8(
            run_ok(Command::new(self.bins.join("fleetban-server")).env("RUST_LOG", "warn").args([
                "token",
                "create",
                "--config",
                path_str(&self.dir.join("server.toml"))?,
                "--role",
                "admin",
                "--name",
                "e2e-operator",
            ]))?
            .stdout,
        )?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
        if token.is_empty() {
            bail!("fleetban-server token create printed no token");
        }
        Ok(token)
    }

    /// Deletes block `id` the way an operator does: `fleetban unblock ID`
    /// (the CLI, over the REST API's `DELETE /api/v1/blocks/{id}`) with an
    /// admin token, run inside the server's namespace.
    pub fn unblock_via_api(&self, token: &str, id: i64) -> anyhow::Result<()> {
        let out = self
            .server_ns()
            .command(path_str(&self.bins.join("fleetban"))?)
            .args(["--url", "http://127.0.0.1:8080", "--token", token, "unblock", &id.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("fleetban unblock {id} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Runs the operator CLI `fleetban ARGS` (with an admin token, against the
    /// server's REST API, inside the server's namespace, stdin not a
    /// terminal); returns its exit success, stdout and stderr.
    pub fn cli(&self, token: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = self
            .server_ns()
            .command(path_str(&self.bins.join("fleetban"))?)
            .args(["--url", "http://127.0.0.1:8080", "--token", token])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// When host `i`'s agent last finished a full firewall reconcile, unix ms
    /// (from the status file the running agent rewrites every 5 s).
    pub fn agent_last_reconcile_ms(&self, i: usize) -> Option<i64> {
        let text = fs::read(self.hosts[i].dir.join("state/agent-status.json")).ok()?;
        let status: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let at = status["firewall"]["last_reconcile"].as_str()?;
        let at = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok()?;
        i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
    }

    /// Revokes block `id` directly in the store (for drills that must not
    /// depend on the HTTP API).
    pub fn revoke_block(&self, id: i64) -> anyhow::Result<()> {
        self.rt.block_on(fleetban_server::blocks::revoke(&self.pool, id, "unblocked by the e2e test"))?;
        Ok(())
    }

    /// Creates a manual block the way `POST /api/v1/blocks` does.
    pub fn manual_block(&self, cidr: &str) -> anyhow::Result<i64> {
        let new = fleetban_server::blocks::NewBlock {
            cidr: cidr.parse()?,
            reason: "e2e manual block".into(),
            source: fleetban_server::blocks::BlockSource::Manual,
            evidence: serde_json::json!({}),
            ttl: Some(Duration::from_secs(3600)),
            created_by: Some("e2e".into()),
            force: false,
        };
        let policy = fleetban_server::correlate::CorrelateConfig::default();
        // Right after a Postgres restart drill a pooled connection of this
        // harness may still be a broken one; the pool's ping before the next
        // acquire finds it and drops it.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.rt.block_on(fleetban_server::blocks::create(&self.pool, &policy, new.clone())) {
                Ok(block) => return Ok(block.id),
                Err(fleetban_server::blocks::BlockError::Database(sqlx::Error::Io(error))) if attempt < 3 => {
                    eprintln!("manual block: {error}; retrying on another connection");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Adds `cidr` to the fleet allowlist table (what `POST /api/v1/allowlist` writes).
    pub fn allowlist(&self, cidr: &str) -> anyhow::Result<()> {
        self.rt.block_on(
            sqlx::query("insert into allowlist (cidr, note) values ($1::cidr, 'e2e')").bind(cidr).execute(&self.pool),
        )?;
        Ok(())
    }

    /// Agent id of host `i` (by its reported address).
    pub fn agent_id(&self, i: usize) -> anyhow::Result<uuid::Uuid> {
        let id = self.rt.block_on(
            sqlx::query_scalar::<_, uuid::Uuid>("select agent_id from agent_addresses where address = $1::inet")
                .bind(mx_v4(i).to_string())
                .fetch_one(&self.pool),
        )?;
        Ok(id)
    }

    /// How many connects host `i`'s agent stored from `remote`: single
    /// events plus the connects counted in its context summaries.
    pub fn stored_connects(&self, i: usize, remote: IpAddr) -> anyhow::Result<i64> {
        let agent = self.agent_id(i)?;
        let n = self.rt.block_on(
            sqlx::query_scalar::<_, i64>(
                "select (select count(*) from events where agent_id = $1 and kind = 'connect' and remote = $2::inet) \
                      + (select coalesce(sum(connects), 0) from context_summaries \
                         where agent_id = $1 and remote = $2::inet)::bigint",
            )
            .bind(agent)
            .bind(remote.to_string())
            .fetch_one(&self.pool),
        )?;
        Ok(n)
    }

    /// Per remote port, how many connect lines host `i`'s Exim log holds
    /// from `remote` with a source port in `ports`.
    pub fn written_connects(
        &self,
        i: usize,
        remote: IpAddr,
        ports: std::ops::Range<u16>,
    ) -> anyhow::Result<std::collections::BTreeMap<u16, i64>> {
        let text = fs::read_to_string(self.hosts[i].log())?;
        let needle = format!("SMTP connection from [{remote}]:");
        let mut out = std::collections::BTreeMap::new();
        for line in text.lines() {
            let Some(pos) = line.find(&needle) else { continue };
            let rest = &line[pos + needle.len()..];
            if !rest.contains("(TCP/IP connection count") {
                continue;
            }
            let port: u16 = rest.split(' ').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            if ports.contains(&port) {
                *out.entry(port).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    /// Stops (`false`) or restarts (`true`) Postgres.
    pub fn set_postgres(&mut self, up: bool) -> anyhow::Result<()> {
        if up {
            self.pg.start_again()?;
        } else {
            self.pg.stop();
        }
        Ok(())
    }

    /// The listing of set `name` in host `i`'s `inet fleetban` table.
    pub fn nft_set(&self, i: usize, name: &str) -> anyhow::Result<String> {
        let out = self.host_ns(i).command("nft").args(["list", "set", "inet", "fleetban", name]).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Server log (for failure messages); with replicas, each replica's.
    pub fn server_log_tail(&self) -> String {
        if self.options.replicas > 1 {
            return self.replica_log_tails();
        }
        tail_file(&self.dir.join("server.out"), 30)
    }

    /// Agent log tail of host `i`.
    pub fn agent_log_tail(&self, i: usize) -> String {
        tail_file(&self.hosts[i].dir.join("agent.out"), 30)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            host.agent.kill9();
            host.smtp.kill9();
            if let Some(exim) = host.exim.as_mut() {
                exim.kill();
            }
        }
        self.server.kill9();
        if let Some(cluster) = self.cluster.as_mut() {
            cluster.kill_all();
        }
        if std::env::var_os("FLEETBAN_E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("keeping {}", self.dir.display());
        }
    }
}

pub(crate) fn join<T>(h: std::thread::JoinHandle<Result<T, crate::netns::NetnsError>>) -> anyhow::Result<T> {
    h.join().map_err(|_| anyhow!("namespace thread panicked"))?.map_err(Into::into)
}

pub(crate) fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

pub(crate) fn log_file(p: &Path) -> anyhow::Result<fs::File> {
    Ok(fs::OpenOptions::new().create(true).append(true).open(p)?)
}

pub(crate) fn run_ok(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

pub(crate) fn tail_file(p: &Path, n: usize) -> String {
    let text = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `f` every 20 ms until it is true or `within` passed.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connect timeout of probes: a blocked (dropped) SYN shows as a timeout.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(150);

/// One polite SMTP session (banner, `QUIT`) from `from`, at most `timeout` per step.
pub fn smtp_quit(to: SocketAddr, from: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let stream = connect_bound(to, from, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    stream.write_all(b"QUIT\r\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    Ok(())
}

/// Connects and reads the `220` banner.
pub fn smtp_banner(to: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let mut stream = connect(to, from, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 3];
    stream.read_exact(&mut buf)?;
    if &buf != b"220" {
        return Err(std::io::Error::other(format!("banner {:?}", String::from_utf8_lossy(&buf))));
    }
    Ok(stream)
}

/// One SMTP session from `from` that fails `AUTH PLAIN` once per user in `users`.
pub fn auth_failures(to: SocketAddr, from: IpAddr, users: &[String]) -> std::io::Result<()> {
    let stream = smtp_banner(to, Some(from))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    stream.write_all(b"EHLO scanner.invalid\r\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    for user in users {
        let b64 = crate::smtp_sim::base64_encode(format!("\0{user}\0wrong-password").as_bytes());
        stream.write_all(format!("AUTH PLAIN {b64}\r\n").as_bytes())?;
        line.clear();
        reader.read_line(&mut line)?;
        if !line.starts_with("535") {
            return Err(std::io::Error::other(format!("AUTH answered {line:?}")));
        }
    }
    stream.write_all(b"QUIT\r\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    Ok(())
}
