//! Three `fleetban-server serve` replicas on one Postgres and real
//! `fleetban-agent` processes configured with `servers = [...]`, all on
//! loopback: agents stream events while one replica is killed with
//! SIGKILL (the leader) or Postgres is restarted, and
//!
//! - the killed replica's agents are connected to the others within the
//!   reconnect backoff;
//! - every line written is stored exactly once (rows counted against lines
//!   by `(remote, remote_port)`, each line's own);
//! - a block made through one replica's API reaches every agent's firewall
//!   (the dry-run backend's state file), wherever the agent is connected;
//! - the leadership moves to a live replica and the fleet-wide sweeps keep
//!   running there (a short block made after the kill expires, once);
//! - `fleetban-agent status` names the server the agent is connected to.
//!
//! Postgres is the test's own cluster (so it can be restarted; the
//! servers are given its URL, never `DATABASE_URL`); the binaries come
//! from `FLEETBAN_BIN_DIR` or the test's target directory.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use fleetban_server::pgembed::EmbeddedPostgres;
use sqlx::PgPool;
use uuid::Uuid;

/// Agents in the fleet (two per replica at the start).
const AGENTS: usize = 6;
/// Lines each agent's log gets.
const LINES: usize = 1500;
/// How long a killed replica's agents may take to be served by another:
/// the first backoff step (at most 0.5 s) plus the connection and `Hello`,
/// with room for a loaded machine.
const RECONNECT_BOUND: Duration = Duration::from_secs(5);

struct Proc(Option<Child>);

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn term(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: kill(2) on a child we own; no memory is touched.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
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
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Replica {
    name: String,
    grpc: SocketAddr,
    http: SocketAddr,
    config: PathBuf,
    proc: Proc,
}

struct Agent {
    name: String,
    id: Uuid,
    dir: PathBuf,
    log: PathBuf,
    proc: Proc,
    written: usize,
}

struct Cluster {
    dir: tempfile::TempDir,
    bins: PathBuf,
    pg: EmbeddedPostgres,
    rt: tokio::runtime::Runtime,
    pool: PgPool,
    replicas: Vec<Replica>,
    agents: Vec<Agent>,
    admin: String,
}

fn bins() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("FLEETBAN_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()?;
            let deps = exe.parent().ok_or_else(|| anyhow!("no parent of {}", exe.display()))?;
            if deps.ends_with("deps") { deps.parent().unwrap_or(deps).to_path_buf() } else { deps.to_path_buf() }
        }
    };
    for name in ["fleetban-server", "fleetban-agent"] {
        if !dir.join(name).is_file() {
            bail!("{} is missing: cargo build -p fleetban-server -p fleetban-agent first", dir.join(name).display());
        }
    }
    Ok(dir)
}

fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn run_ok(command: &mut Command) -> anyhow::Result<String> {
    let out = command.output().with_context(|| format!("{command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if ok()? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request; returns the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, token: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("no status: {text}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // Chunked bodies: keep the JSON between the first `{`/`[` and the last.
    let json = match (body.find(['{', '[']), body.rfind(['}', ']'])) {
        (Some(start), Some(end)) if end >= start => body[start..=end].to_owned(),
        _ => body,
    };
    Ok((status, json))
}

/// A connect line of `agent` with its own `[remote]:port` (`index`).
fn line(agent: usize, index: usize) -> String {
    let now = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S");
    format!(
        "{now} SMTP connection from [198.51.100.{}]:{} I=[192.0.2.1]:25 (TCP/IP connection count = 1)\n",
        agent + 1,
        1024 + index
    )
}

impl Cluster {
    fn start() -> anyhow::Result<Cluster> {
        let bins = bins()?;
        let dir = tempfile::Builder::new().prefix("fleetban-replicas-").tempdir()?;
        let pg = EmbeddedPostgres::start().context("embedded postgres")?;
        let db_url = pg.url();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let pool = rt.block_on(fleetban_server::db::connect(&db_url, 4))?;
        rt.block_on(fleetban_server::db::migrate(&pool))?;
        let mut replicas = Vec::new();
        for i in 1..=3 {
            let (grpc, http) = (free_port()?, free_port()?);
            let name = format!("r{i}");
            let config = dir.path().join(format!("{name}.toml"));
            fs::write(
                &config,
                format!(
                    "database_url = \"{db_url}\"\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\n\
                     heartbeat_secs = 2\nreplica_name = \"{name}\"\n"
                ),
            )?;
            replicas.push(Replica { name, grpc, http, config, proc: Proc(None) });
        }
        let mut cluster = Cluster { dir, bins, pg, rt, pool, replicas, agents: Vec::new(), admin: String::new() };
        // r1 first, so that it leads.
        cluster.start_replica(0)?;
        cluster.wait_leader(Some("r1"))?;
        cluster.start_replica(1)?;
        cluster.start_replica(2)?;
        let server = |args: &[&str]| {
            run_ok(
                Command::new(cluster.bins.join("fleetban-server"))
                    .args(args)
                    .arg("--config")
                    .arg(&cluster.replicas[0].config)
                    .env_remove("DATABASE_URL")
                    .env("RUST_LOG", "warn"),
            )
            .map(|out| out.lines().last().unwrap_or_default().trim().to_owned())
        };
        cluster.admin = server(&["token", "create", "--role", "admin"])?;
        let token = server(&["enroll-token", "create", "--uses", &AGENTS.to_string(), "--ttl", "1h"])?;
        for i in 0..AGENTS {
            cluster.add_agent(i, &token)?;
        }
        Ok(cluster)
    }

    fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(|r| format!("http://{}", r.grpc)).collect()
    }

    fn start_replica(&mut self, i: usize) -> anyhow::Result<()> {
        let replica = &mut self.replicas[i];
        let out = fs::File::create(self.dir.path().join(format!("{}.out", replica.name)))?;
        let child = Command::new(self.bins.join("fleetban-server"))
            .arg("serve")
            .arg("--config")
            .arg(&replica.config)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        replica.proc = Proc(Some(child));
        let (grpc, http) = (replica.grpc, replica.http);
        wait_until(&format!("{} to listen", replica.name), Duration::from_secs(30), || {
            Ok(TcpStream::connect(grpc).is_ok() && TcpStream::connect(http).is_ok())
        })?;
        Ok(())
    }

    /// Enrolls and starts agent `i`, whose ring starts at replica `i % 3`.
    fn add_agent(&mut self, i: usize, token: &str) -> anyhow::Result<()> {
        let name = format!("mx{}", i + 1);
        let dir = self.dir.path().join(&name);
        fs::create_dir_all(&dir)?;
        let log = dir.join("exim_mainlog");
        fs::write(&log, "")?;
        let config = dir.join("agent.toml");
        self.write_agent_config(&dir, &log, &self.urls())?;
        let out = run_ok(
            Command::new(self.bins.join("fleetban-agent"))
                .args(["enroll", "--token", token, "--name", &name, "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn"),
        )?;
        let id: Uuid = out.lines().last().unwrap_or_default().trim().parse()?;
        // Order the ring so that this agent's start is replica i % 3: every
        // replica serves agents from the start.
        let urls = self.urls();
        let start = fleetban_agent::failover::start_index(&id.to_string(), urls.len());
        let mut ordered = vec![String::new(); urls.len()];
        for k in 0..urls.len() {
            ordered[(start + k) % urls.len()] = urls[(i + k) % urls.len()].clone();
        }
        self.write_agent_config(&dir, &log, &ordered)?;
        let out = fs::File::create(dir.join("agent.out"))?;
        let child = Command::new(self.bins.join("fleetban-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        self.agents.push(Agent { name, id, dir, log, proc: Proc(Some(child)), written: 0 });
        Ok(())
    }

    /// Aggregation is off: the exactly-once checks identify every stored
    /// line by its `[ip]:port`, which only single events keep (summaries'
    /// exactly-once is checked by the agent's crash tests and the
    /// namespace drills, which count totals).
    fn write_agent_config(&self, dir: &Path, log: &Path, urls: &[String]) -> anyhow::Result<()> {
        let servers = urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ");
        fs::write(
            dir.join("agent.toml"),
            format!(
                "servers = [{servers}]\nstate_dir = \"{}\"\ntimezone = \"UTC\"\n\
                 [[source]]\npath = \"{}\"\nstart_at = \"beginning\"\n\
                 [spool]\nfsync_ms = 20\n[firewall]\nbackend = \"dry-run\"\nreconcile_secs = 5\n\
                 [detect]\nenabled = false\n[aggregate]\nenabled = false\n",
                dir.join("state").display(),
                log.display()
            ),
        )?;
        Ok(())
    }

    fn query<T>(&self, future: impl Future<Output = Result<T, sqlx::Error>>) -> anyhow::Result<T> {
        Ok(self.rt.block_on(future)?)
    }

    /// Which replica (by name) serves each agent now; `None` when the
    /// agent is not connected.
    fn placement(&self) -> anyhow::Result<Vec<Option<String>>> {
        let mut out = Vec::new();
        for agent in &self.agents {
            let name: Option<String> = self.query(
                sqlx::query_scalar(
                    "select r.name from agents a join replicas r on r.id = a.replica_id \
                      where a.id = $1 and a.connected",
                )
                .bind(agent.id)
                .fetch_optional(&self.pool),
            )?;
            out.push(name);
        }
        Ok(out)
    }

    /// Each agent's session id while it is connected.
    fn sessions(&self) -> anyhow::Result<Vec<Option<Uuid>>> {
        let mut out = Vec::new();
        for agent in &self.agents {
            let session: Option<Option<Uuid>> = self.query(
                sqlx::query_scalar("select session_id from agents where id = $1 and connected")
                    .bind(agent.id)
                    .fetch_optional(&self.pool),
            )?;
            out.push(session.flatten());
        }
        Ok(out)
    }

    /// The leader by `GET /api/v1/replicas` of a live replica.
    fn leader(&self) -> anyhow::Result<Option<String>> {
        let replica = self.replicas.iter().find(|r| r.proc.0.is_some()).ok_or_else(|| anyhow!("no replica runs"))?;
        let (status, body) = http(replica.http, "GET", "/api/v1/replicas", &self.admin, None)?;
        if status != 200 {
            bail!("GET /api/v1/replicas: {status} {body}");
        }
        let json: serde_json::Value = serde_json::from_str(&body)?;
        Ok(json["leader"].as_str().map(str::to_owned))
    }

    fn wait_leader(&self, expected: Option<&str>) -> anyhow::Result<Duration> {
        wait_until("the leader", Duration::from_secs(20), || {
            if self.admin.is_empty() {
                // Before the API token exists: the database tells.
                let leaders: Vec<String> = self.query(
                    sqlx::query_scalar(
                        "select name from replicas where lock_pid in \
                        (select pid from pg_locks where locktype = 'advisory' and granted)",
                    )
                    .fetch_all(&self.pool),
                )?;
                return Ok(leaders.len() == 1 && expected.is_none_or(|e| leaders[0] == e));
            }
            let leader = self.leader()?;
            Ok(match expected {
                Some(name) => leader.as_deref() == Some(name),
                None => leader.is_some(),
            })
        })
    }

    /// Appends `n` lines to every agent's log, `chunk` at a time, `pause`
    /// apart.
    fn write_lines(&mut self, n: usize, chunk: usize, pause: Duration) -> anyhow::Result<()> {
        let mut left = n;
        while left > 0 {
            let take = left.min(chunk);
            for (i, agent) in self.agents.iter_mut().enumerate() {
                let text: String = (agent.written..agent.written + take).map(|k| line(i, k)).collect();
                fs::OpenOptions::new().append(true).open(&agent.log)?.write_all(text.as_bytes())?;
                agent.written += take;
            }
            left -= take;
            std::thread::sleep(pause);
        }
        Ok(())
    }

    /// [`Cluster::write_lines`] on a thread; [`Cluster::join_writer`]
    /// counts the lines in.
    fn write_in_background(
        &self,
        n: usize,
        chunk: usize,
        pause: Duration,
    ) -> std::thread::JoinHandle<anyhow::Result<usize>> {
        let logs: Vec<(PathBuf, usize)> = self.agents.iter().map(|a| (a.log.clone(), a.written)).collect();
        std::thread::spawn(move || {
            let mut done = 0;
            while done < n {
                let take = (n - done).min(chunk);
                for (i, (log, written)) in logs.iter().enumerate() {
                    let text: String = (written + done..written + done + take).map(|k| line(i, k)).collect();
                    fs::OpenOptions::new().append(true).open(log)?.write_all(text.as_bytes())?;
                }
                done += take;
                std::thread::sleep(pause);
            }
            Ok(done)
        })
    }

    fn join_writer(&mut self, writer: std::thread::JoinHandle<anyhow::Result<usize>>) -> anyhow::Result<()> {
        let done = writer.join().map_err(|_| anyhow!("the writer panicked"))??;
        for agent in &mut self.agents {
            agent.written += done;
        }
        Ok(())
    }

    /// Waits until every agent's lines are stored, then checks each is
    /// stored exactly once.
    fn check_exactly_once(&self, limit: Duration) -> anyhow::Result<()> {
        for agent in &self.agents {
            let count = || -> anyhow::Result<(i64, i64)> {
                self.query(
                    sqlx::query_as(
                        "select count(*), count(distinct (remote, remote_port)) from events where agent_id = $1",
                    )
                    .bind(agent.id)
                    .fetch_one(&self.pool),
                )
            };
            wait_until(&format!("{}'s {} lines", agent.name, agent.written), limit, || {
                Ok(count()?.0 >= agent.written as i64)
            })?;
            // Nothing is left in its spool: no resend can come later.
            wait_until(&format!("{}'s spool to drain", agent.name), limit, || {
                let status = run_ok(
                    Command::new(self.bins.join("fleetban-agent"))
                        .args(["status", "--config"])
                        .arg(agent.dir.join("agent.toml")),
                )?;
                let json: serde_json::Value = serde_json::from_str(&status)?;
                Ok(json["spool"]["pending_batches"] == 0)
            })?;
            let (rows, distinct) = count()?;
            assert_eq!(rows, agent.written as i64, "{}: rows stored against lines written", agent.name);
            assert_eq!(distinct, rows, "{}: no line stored twice", agent.name);
        }
        Ok(())
    }

    /// Whether each agent's dry-run firewall holds `cidr` (unexpired).
    fn everywhere(&self, cidr: &str) -> anyhow::Result<Vec<bool>> {
        let mut out = Vec::new();
        for agent in &self.agents {
            let path = agent.dir.join("state").join(fleetban_agent::firewall::dryrun::FILE_NAME);
            let held = match fs::read(&path) {
                Ok(bytes) => {
                    let records: Vec<fleetban_agent::firewall::dryrun::Record> =
                        serde_json::from_slice(&bytes).unwrap_or_default();
                    // An expired entry is not held (the backend reads it
                    // back as absent, as the kernel drops a timed-out one).
                    let now = jiff::Timestamp::now();
                    records.iter().any(|r| {
                        r.cidr == cidr
                            && r.expires_at
                                .as_deref()
                                .is_none_or(|at| at.parse::<jiff::Timestamp>().is_ok_and(|at| at > now))
                    })
                }
                Err(_) => false,
            };
            out.push(held);
        }
        Ok(out)
    }

    fn block(&self, via: usize, cidr: &str, ttl_secs: Option<u64>) -> anyhow::Result<i64> {
        let body = serde_json::json!({ "cidr": cidr, "reason": "replica drill", "ttl_secs": ttl_secs }).to_string();
        let (status, text) = http(self.replicas[via].http, "POST", "/api/v1/blocks", &self.admin, Some(&body))?;
        if status != 201 {
            bail!("POST /api/v1/blocks via {}: {status} {text}", self.replicas[via].name);
        }
        let json: serde_json::Value = serde_json::from_str(&text)?;
        json["id"].as_i64().ok_or_else(|| anyhow!("no block id in {text}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.proc.term();
        }
        for replica in &mut self.replicas {
            replica.proc.term();
        }
        if std::thread::panicking() || std::env::var_os("FLEETBAN_KEEP_TEST_DIR").is_some() {
            eprintln!("replica drill files kept in {}", self.dir.path().display());
            let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
        }
    }
}

#[test]
fn a_killed_replica_loses_nothing_and_its_agents_and_the_leadership_move() -> anyhow::Result<()> {
    let mut cluster = Cluster::start()?;
    wait_until("every agent connected", Duration::from_secs(30), || {
        Ok(cluster.placement()?.iter().all(Option::is_some))
    })?;
    let before = cluster.placement()?;
    for replica in &cluster.replicas {
        let served = before.iter().filter(|p| p.as_deref() == Some(replica.name.as_str())).count();
        assert_eq!(served, AGENTS / 3, "every replica serves its agents: {before:?}");
    }
    let leader = cluster.leader()?.ok_or_else(|| anyhow!("no leader"))?;
    assert_eq!(leader, "r1");

    // A block through r2 reaches every agent, wherever it is connected.
    cluster.block(1, "203.0.113.77/32", None)?;
    let took = wait_until("203.0.113.77 on every agent", Duration::from_secs(10), || {
        Ok(cluster.everywhere("203.0.113.77/32")?.iter().all(|&b| b))
    })?;
    eprintln!("block through r2 on every agent after {took:?}");

    // Stream, and kill the leader (r1) with SIGKILL mid-stream: the second
    // half of the lines is written while its agents move.
    cluster.write_lines(LINES / 2, 50, Duration::from_millis(20))?;
    let victims: Vec<usize> = (0..AGENTS).filter(|&i| before[i].as_deref() == Some("r1")).collect();
    let writer = cluster.write_in_background(LINES / 2, 50, Duration::from_millis(20));
    let killed_at = Instant::now();
    cluster.replicas[0].proc.kill9();
    let mut reconnected: Vec<Option<Duration>> = vec![None; AGENTS];
    let mut led: Option<Duration> = None;
    wait_until("r1's agents on r2 or r3, and a new leader", Duration::from_secs(30), || {
        let now = cluster.placement()?;
        for &i in &victims {
            if reconnected[i].is_none() && matches!(now[i].as_deref(), Some("r2" | "r3")) {
                reconnected[i] = Some(killed_at.elapsed());
            }
        }
        if led.is_none() && matches!(cluster.leader()?.as_deref(), Some("r2" | "r3")) {
            led = Some(killed_at.elapsed());
        }
        Ok(victims.iter().all(|&i| reconnected[i].is_some()) && led.is_some())
    })?;
    let led = led.unwrap_or(Duration::MAX);
    eprintln!("a new leader {led:?} after the kill");
    assert!(led <= Duration::from_secs(5), "the leadership took {led:?} to move");
    cluster.join_writer(writer)?;
    for &i in &victims {
        let took = reconnected[i].unwrap_or(Duration::MAX);
        eprintln!("{} served by another replica {took:?} after the kill", cluster.agents[i].name);
        assert!(took <= RECONNECT_BOUND, "{} took {took:?} to reconnect", cluster.agents[i].name);
    }
    // The agents of r2 and r3 stayed where they were.
    let after = cluster.placement()?;
    for i in (0..AGENTS).filter(|i| !victims.contains(i)) {
        assert_eq!(after[i], before[i], "{} was not on the killed replica", cluster.agents[i].name);
    }

    // The leadership stays moved.
    let new_leader = cluster.leader()?.ok_or_else(|| anyhow!("no leader"))?;
    assert!(new_leader == "r2" || new_leader == "r3", "{new_leader}");

    // Nothing lost, nothing stored twice.
    cluster.check_exactly_once(Duration::from_secs(60))?;

    // The sweeps run on the new leader: a short block made now through r3
    // expires, once, and leaves every agent's firewall; the permanent one
    // stays.
    let short = cluster.block(2, "203.0.113.78/32", Some(2))?;
    wait_until("203.0.113.78 on every agent", Duration::from_secs(10), || {
        Ok(cluster.everywhere("203.0.113.78/32")?.iter().all(|&b| b))
    })?;
    wait_until("the short block to expire", Duration::from_secs(30), || {
        let cause: Option<String> = cluster.query(
            sqlx::query_scalar("select revoked_cause from blocks where id = $1").bind(short).fetch_one(&cluster.pool),
        )?;
        Ok(cause.as_deref() == Some("expired"))
    })?;
    let removes: i64 = cluster.query(
        sqlx::query_scalar("select count(*) from block_changes where block_id = $1 and op = 'remove'")
            .bind(short)
            .fetch_one(&cluster.pool),
    )?;
    assert_eq!(removes, 1, "expired once");
    // Every agent applied the removal (reported with `Applied`).
    let version: i64 = cluster.query(
        sqlx::query_scalar("select version from block_changes where block_id = $1 and op = 'remove'")
            .bind(short)
            .fetch_one(&cluster.pool),
    )?;
    wait_until("every agent to apply the expiry", Duration::from_secs(15), || {
        let behind: i64 = cluster.query(
            sqlx::query_scalar("select count(*) from agents where blocklist_version < $1")
                .bind(version)
                .fetch_one(&cluster.pool),
        )?;
        Ok(behind == 0)
    })?;
    wait_until("203.0.113.78 gone from every agent", Duration::from_secs(15), || {
        Ok(cluster.everywhere("203.0.113.78/32")?.iter().all(|&b| !b))
    })?;
    assert!(cluster.everywhere("203.0.113.77/32")?.iter().all(|&b| b));

    // `fleetban-agent status` names the live replica a moved agent uses.
    let moved_agent = &cluster.agents[victims[0]];
    let live: Vec<String> = cluster.urls()[1..].to_vec();
    wait_until("status to name the new server", Duration::from_secs(15), || {
        let text = run_ok(
            Command::new(cluster.bins.join("fleetban-agent"))
                .args(["status", "--config"])
                .arg(moved_agent.dir.join("agent.toml")),
        )?;
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let server = json["uplink"]["server"].as_str().unwrap_or_default().to_owned();
        Ok(json["uplink"]["connected"] == true && live.iter().any(|url| server.starts_with(url.as_str())))
    })?;
    Ok(())
}

/// The Postgres-restart drill of the single-server e2e, with three replicas:
/// Postgres stops for two seconds and comes back while every agent streams;
/// every replica's sessions end, the agents spool and retry, and nothing
/// is lost or stored twice. The leadership comes back (its connection died
/// with Postgres), and a block made afterwards reaches every agent.
#[test]
fn a_postgres_restart_under_replicas_loses_nothing() -> anyhow::Result<()> {
    let mut cluster = Cluster::start()?;
    wait_until("every agent connected", Duration::from_secs(30), || {
        Ok(cluster.placement()?.iter().all(Option::is_some))
    })?;
    cluster.write_lines(200, 50, Duration::from_millis(20))?;
    let sessions_before = cluster.sessions()?;
    // About 4 s of lines: Postgres goes down 1 s in, for 2 s.
    let writer = cluster.write_in_background(2000, 25, Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(1));
    cluster.pg.stop();
    std::thread::sleep(Duration::from_secs(2));
    cluster.pg.start_again().context("restart postgres")?;
    let restarted = Instant::now();
    cluster.join_writer(writer)?;

    cluster.check_exactly_once(Duration::from_secs(60))?;
    eprintln!("every line stored once {:?} after Postgres came back", restarted.elapsed());
    // Sessions whose statement hit a dropped connection ended and were
    // reopened; those that only waited for the pool went on.
    let sessions_after = cluster.sessions()?;
    assert!(sessions_after.iter().all(Option::is_some), "every agent connected: {sessions_after:?}");
    let renewed = sessions_after.iter().zip(&sessions_before).filter(|(now, before)| now != before).count();
    eprintln!("{renewed} of {AGENTS} agents in a new session after the restart");
    let took = cluster.wait_leader(None)?;
    eprintln!("a leader again (seen {took:?} after the check began)");
    cluster.block(2, "203.0.113.79/32", None)?;
    wait_until("203.0.113.79 on every agent", Duration::from_secs(15), || {
        Ok(cluster.everywhere("203.0.113.79/32")?.iter().all(|&b| b))
    })?;
    Ok(())
}
