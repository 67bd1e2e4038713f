//! The agent's configuration file, `/etc/fleetban/agent.toml`.
//!
//! This is the contract every later feature extends: keys are only ever
//! added, never renamed. Unknown keys are refused (`deny_unknown_fields`) so a
//! typo fails at start instead of being silently ignored, and every value is
//! validated on load; an error always names the key it is about.
//! `deploy/agent.example.toml` documents every key with its unit and default.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fleetban_proto::detect::{Rule, Thresholds};
use fleetban_proto::policy::{Rules, Scenario};
use ipnet::IpNet;
use serde::Deserialize;

/// Default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/fleetban/agent.toml";

/// Errors from loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (the message
    /// names the key and the line).
    #[error("invalid config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A key has a value outside its allowed range.
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted name of the offending key, e.g. `spool.fsync_ms`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole `agent.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// URL of the fleetban-server gRPC endpoint, e.g.
    /// `https://fleet.example.net:50051`. `http://` is accepted only for a
    /// loopback server. A name with several addresses is several servers
    /// (see `servers`). This or `servers` is required; no default. Use
    /// [`AgentConfig::server_urls`] rather than reading it directly.
    #[serde(default)]
    pub server: String,
    /// URLs of several fleetban-server replicas (on one database), e.g.
    /// `["https://a.example.net:50051", "https://b.example.net:50051"]`,
    /// each checked like `server`. The agent starts at one chosen by its id
    /// and moves to the next whenever a connection fails or a session is
    /// lost. Instead of `server`, not with it. Default: none.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Optional PEM file with the CA that signed the server certificate.
    /// Default: none (the system roots are used).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Directory for credentials, the spool, checkpoints and dry-run state.
    /// Default: `/var/lib/fleetban`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Zone of Exim's timestamps: `"local"`, `"UTC"` or an IANA zone name such
    /// as `"Europe/Berlin"`. Default: `"local"`.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The log files to follow, one `[[source]]` table each. Default: none
    /// (at least one is required by `run`).
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    /// The on-disk spool of event batches.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The local firewall backend.
    #[serde(default)]
    pub firewall: FirewallConfig,
    /// Ranges that are never blocked locally.
    #[serde(default)]
    pub allowlist: AllowlistConfig,
    /// The host's own public addresses, in addition to those found on its
    /// interfaces (e.g. a NAT address). Reported to the server and never
    /// blocked. Default: empty.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Local detection thresholds.
    #[serde(default)]
    pub detect: DetectConfig,
    /// The agent's Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Context lines summarised per address and interval
    /// ([`crate::aggregate::AggregateConfig`]).
    #[serde(default)]
    pub aggregate: crate::aggregate::AggregateConfig,
}

/// `[detect]`: local abuse rules and their thresholds. The server may replace
/// any of them with a `Policy` update (a zero value there keeps the local one).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Whether local detection runs at all. Default: `true`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Exim's connection ceiling (`smtp_accept_max`); `0` = learn it as the
    /// highest `TCP/IP connection count` seen. Default: 0 (learn; 100 assumed
    /// until a higher count is seen, cPanel's default).
    #[serde(default)]
    pub smtp_accept_max: u32,
    /// Fraction of `smtp_accept_max` a connect line's count must reach to
    /// raise the slot alarm, 0 < ratio <= 1. Default: 0.9.
    #[serde(default = "default_slot_alarm_ratio")]
    pub slot_alarm_ratio: f64,
    /// On a slot alarm, addresses holding at least this share of the slot
    /// ceiling in open sessions (opened and not yet ended) are blocked,
    /// 0 < share <= 1. Default: 0.1.
    #[serde(default = "default_slot_share")]
    pub slot_share: f64,
    /// Obsolete (slot holders are now the addresses with open sessions);
    /// accepted and ignored so that older configs still load.
    #[serde(default)]
    pub slot_window_secs: Option<u32>,
    /// An open session whose end is never logged is forgotten after this
    /// many seconds (Exim's `smtp_receive_timeout` plus the longest DATA
    /// phase), 60 to 86400. Default: 900.
    #[serde(default = "default_session_timeout_secs")]
    pub session_timeout_secs: u32,
    /// Connects from one address within `conn_rate_window_secs` that trigger
    /// a block (twice as many for an address in good standing). Default: 30.
    #[serde(default = "default_conn_rate")]
    pub conn_rate: u32,
    /// Window of the connection-rate rule, in seconds. Default: 60.
    #[serde(default = "default_conn_rate_window_secs")]
    pub conn_rate_window_secs: u32,
    /// Authentication failures from one address within `auth_window_secs`
    /// that trigger a block (the `auth` rule's `per_host`). Default: 10.
    #[serde(default = "default_auth_failures")]
    pub auth_failures: u32,
    /// Distinct user names failing from one address within
    /// `auth_window_secs` that trigger a block (password spraying).
    /// Default: 5.
    #[serde(default = "default_auth_distinct_users")]
    pub auth_distinct_users: u32,
    /// Window of the auth-failure rules, in seconds. Default: 3600.
    #[serde(default = "default_long_window_secs")]
    pub auth_window_secs: u32,
    /// Weighted protocol-abuse events (sync errors, protocol and syntax
    /// errors; a drop for too many bad commands counts 3) from one address
    /// within `abuse_window_secs` that trigger a block (the `protocol`
    /// rule's `per_host`). Default: 10.
    #[serde(default = "default_abuse_events")]
    pub abuse_events: u32,
    /// Window of the protocol-abuse rule, in seconds. Default: 3600.
    #[serde(default = "default_long_window_secs")]
    pub abuse_window_secs: u32,
    /// Per-scenario overrides, e.g. `[detect.rules.relay] per_host = 5`
    /// (scenarios: auth, relay, dictionary, protocol, conn_limit, acl; keys:
    /// per_host, window_secs, distinct_users, good_standing_factor,
    /// enforce). They win over the keys above. Default: the shipped rules
    /// (see `deploy/server.example.toml`).
    #[serde(default)]
    pub rules: std::collections::BTreeMap<String, fleetban_proto::policy::RuleTable>,
    /// Rules that run in shadow mode: they decide and report, but block
    /// nothing (`slot_exhaustion`, `conn_rate` or a scenario name). The
    /// server's policy may change this. Default: none.
    #[serde(default)]
    pub shadow_rules: Vec<String>,
    /// Verified reverse-DNS domains (Exim's `H=name`, never the HELO) whose
    /// senders are never blocked automatically. Default: the big mailbox
    /// providers and ESPs (`fleetban_proto::policy::DEFAULT_PROTECTED_DOMAINS`).
    #[serde(default)]
    pub protected_domains: Option<Vec<String>>,
    /// How long accepted mail or a login keeps an address in good standing,
    /// in seconds. Default: 604800 (7 days).
    #[serde(default = "default_good_standing_secs")]
    pub good_standing_secs: u32,
    /// Prefix length an IPv6 offender is blocked as, 48 to 128 (the same
    /// value as the server's, which may push it). Default: 64.
    #[serde(default = "default_ipv6_block_prefix")]
    pub ipv6_block_prefix: u8,
    /// How long a local block lasts, in seconds (the server may extend it as
    /// a fleet block). Default: 3600.
    #[serde(default = "default_local_block_ttl_secs")]
    pub local_block_ttl_secs: u32,
    /// Hard cap on the addresses tracked at once; the least recently seen is
    /// evicted (and counted) beyond it. Minimum 1000. Default: 100000.
    #[serde(default = "default_max_tracked")]
    pub max_tracked: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            smtp_accept_max: 0,
            slot_alarm_ratio: default_slot_alarm_ratio(),
            slot_share: default_slot_share(),
            slot_window_secs: None,
            session_timeout_secs: default_session_timeout_secs(),
            conn_rate: default_conn_rate(),
            conn_rate_window_secs: default_conn_rate_window_secs(),
            auth_failures: default_auth_failures(),
            auth_distinct_users: default_auth_distinct_users(),
            auth_window_secs: default_long_window_secs(),
            abuse_events: default_abuse_events(),
            abuse_window_secs: default_long_window_secs(),
            rules: std::collections::BTreeMap::new(),
            shadow_rules: Vec::new(),
            protected_domains: None,
            good_standing_secs: default_good_standing_secs(),
            ipv6_block_prefix: default_ipv6_block_prefix(),
            local_block_ttl_secs: default_local_block_ttl_secs(),
            max_tracked: default_max_tracked(),
        }
    }
}

/// `[metrics]`: the agent's Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `/metrics` on, e.g. `"127.0.0.1:9465"`. Default:
    /// none (no endpoint).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// One followed log file (`[[source]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Log format of the file: `"exim"` (`exim_mainlog`) or `"dovecot"`
    /// (Dovecot's `log_path`, or the syslog file it logs to, e.g.
    /// `/var/log/maillog`). Default: `"exim"`.
    #[serde(default)]
    pub kind: SourceKind,
    /// Path of the live log file, e.g. `/var/log/exim_mainlog`. Required.
    pub path: PathBuf,
    /// Where to start in a file the agent has never seen before: `"end"` or
    /// `"beginning"`. Default: `"end"`.
    #[serde(default)]
    pub start_at: StartAt,
}

/// Log format of a source: the parser's [`crate::parse::LogKind`].
pub type SourceKind = crate::parse::LogKind;

/// Start position in a file never seen before.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartAt {
    /// Skip what the file already holds; read only new lines.
    #[default]
    End,
    /// Read the file from its first byte.
    Beginning,
}

/// `[spool]`: the durable queue of event batches between parsing and the
/// server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Upper bound of the spool on disk, in bytes. When it is full the oldest
    /// unacknowledged segment is dropped and the loss is counted and reported.
    /// Minimum 1048576 (1 MiB). Default: 536870912 (512 MiB).
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
    /// Group-commit interval, in milliseconds: the spool is fsynced at most
    /// this often (and always before a batch is offered to the server).
    /// 1 to 10000. Default: 100.
    #[serde(default = "default_spool_fsync_ms")]
    pub fsync_ms: u64,
    /// How long a batch that holds only context (accepted mail, logins,
    /// connects, session ends and the summaries of `[aggregate]`) waits for
    /// more lines before it is sent, in milliseconds. A batch with an abuse
    /// line is sent 100 ms after that line, together with every context line
    /// before it. The server decides on abuse lines only and judges good
    /// standing over days, so context can wait; a busy host then sends about
    /// one batch per this interval instead of ten per second. 100 to 10000.
    /// Default: 1000.
    #[serde(default = "default_spool_context_batch_ms")]
    pub context_batch_ms: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_spool_max_bytes(),
            fsync_ms: default_spool_fsync_ms(),
            context_batch_ms: default_spool_context_batch_ms(),
        }
    }
}

/// TCP ports a block covers in the `smtp` scope, before `[firewall]
/// extra_ports`.
pub const SMTP_PORTS: [u16; 3] = [25, 465, 587];

/// TCP ports the `smtp` scope also covers when a `dovecot` source is
/// configured: POP3 (110), IMAP (143), IMAPS (993), POP3S (995) and
/// ManageSieve (4190), so an address guessing passwords over IMAP is
/// blocked where it guesses.
pub const MAIL_ACCESS_PORTS: [u16; 5] = [110, 143, 993, 995, 4190];

/// `[firewall]`: how local and fleet blocks reach the kernel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    /// Backend: `"nftables"`, `"ipset"`, `"csf"` or `"dry-run"`.
    /// Default: `"nftables"`.
    #[serde(default)]
    pub backend: FirewallBackend,
    /// What a block covers: `"smtp"` (TCP 25, 465, 587; with a `dovecot`
    /// source also 110, 143, 993, 995, 4190) or `"all"` traffic.
    /// Default: `"smtp"`.
    #[serde(default)]
    pub scope: FirewallScope,
    /// Interval of the full reconcile (read the kernel back, repair drift),
    /// in seconds, 5 to 86400. Default: 60.
    #[serde(default = "default_reconcile_secs")]
    pub reconcile_secs: u64,
    /// TCP ports the `smtp` scope covers besides 25, 465 and 587 (e.g. an
    /// alternate SMTP port such as 26 or 2525). Default: none.
    #[serde(default)]
    pub extra_ports: Vec<u16>,
    /// When a range is blocked, end the TCP connections it already holds to
    /// the covered ports, so the MTA frees their slots at once instead of
    /// after its receive timeout (kernel socket destroy, as `ss -K`).
    /// Default: `true`.
    #[serde(default = "default_end_connections")]
    pub end_connections: bool,
}

fn default_end_connections() -> bool {
    true
}

impl FirewallConfig {
    /// The TCP ports of the `smtp` scope: 25, 465, 587 and `extra_ports`,
    /// sorted, without repeats.
    pub fn smtp_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> =
            SMTP_PORTS.iter().chain(&self.extra_ports).copied().filter(|&port| port != 0).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

impl AgentConfig {
    /// The TCP ports a block covers in the `smtp` scope: the firewall's
    /// [`FirewallConfig::smtp_ports`], and [`MAIL_ACCESS_PORTS`] when a
    /// source is a Dovecot log. Sorted, without repeats.
    pub fn covered_ports(&self) -> Vec<u16> {
        let mut ports = self.firewall.smtp_ports();
        if self.sources.iter().any(|s| s.kind == SourceKind::Dovecot) {
            ports.extend(MAIL_ACCESS_PORTS);
            ports.sort_unstable();
            ports.dedup();
        }
        ports
    }
}

impl Default for FirewallConfig {
    fn default() -> Self {
        Self {
            backend: FirewallBackend::default(),
            scope: FirewallScope::default(),
            reconcile_secs: default_reconcile_secs(),
            extra_ports: Vec::new(),
            end_connections: default_end_connections(),
        }
    }
}

/// Firewall backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirewallBackend {
    /// Own `table inet fleetban` with interval sets.
    #[default]
    Nftables,
    /// `hash:net` sets plus one iptables rule per family.
    Ipset,
    /// ConfigServer Security & Firewall (`csf -td` / `-d`).
    Csf,
    /// Records what it would do; touches nothing.
    DryRun,
}

/// Firewall scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirewallScope {
    /// TCP ports 25, 465 and 587 only.
    #[default]
    Smtp,
    /// All traffic from the blocked range.
    All,
}

/// `[allowlist]`: ranges the agent never blocks, whatever the server says.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowlistConfig {
    /// CIDRs or single addresses, e.g. `["192.0.2.0/24", "2001:db8::1"]`.
    /// Default: empty.
    #[serde(default)]
    pub cidrs: Vec<AllowEntry>,
}

/// One allowlist entry: a CIDR, or a bare address meaning a host route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowEntry(pub IpNet);

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_allow_entry(&text).map(AllowEntry).map_err(serde::de::Error::custom)
    }
}

fn parse_allow_entry(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!("`{text}` has host bits set (did you mean `{}`?)", net.trunc()));
        }
        return Ok(net);
    }
    text.parse::<IpAddr>().map(IpNet::from).map_err(|_| format!("`{text}` is not an IP address or CIDR"))
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleetban")
}

fn default_timezone() -> String {
    "local".to_owned()
}

fn default_spool_max_bytes() -> u64 {
    512 * 1024 * 1024
}

fn default_spool_fsync_ms() -> u64 {
    100
}

fn default_spool_context_batch_ms() -> u64 {
    1000
}

fn default_reconcile_secs() -> u64 {
    60
}

fn default_true() -> bool {
    true
}

fn default_slot_alarm_ratio() -> f64 {
    0.9
}

fn default_slot_share() -> f64 {
    0.1
}

fn default_session_timeout_secs() -> u32 {
    900
}

fn default_good_standing_secs() -> u32 {
    604_800
}

fn default_conn_rate() -> u32 {
    30
}

fn default_conn_rate_window_secs() -> u32 {
    60
}

fn default_auth_failures() -> u32 {
    10
}

fn default_auth_distinct_users() -> u32 {
    5
}

fn default_long_window_secs() -> u32 {
    3600
}

fn default_abuse_events() -> u32 {
    10
}

fn default_ipv6_block_prefix() -> u8 {
    64
}

fn default_local_block_ttl_secs() -> u32 {
    3600
}

fn default_max_tracked() -> usize {
    100_000
}

impl DetectConfig {
    /// The thresholds `[detect]` describes: its auth and protocol keys set those
    /// scenarios' per-host parts, `[detect.rules.*]` tables win over them.
    pub fn thresholds(&self) -> Thresholds {
        let c = self;
        let mut rules = Rules::default();
        let mut auth = *rules.get(Scenario::Auth);
        auth.per_host = c.auth_failures;
        auth.distinct_users = c.auth_distinct_users;
        auth.window_secs = c.auth_window_secs;
        rules.set(Scenario::Auth, auth);
        let mut protocol = *rules.get(Scenario::Protocol);
        protocol.per_host = c.abuse_events;
        protocol.window_secs = c.abuse_window_secs;
        rules.set(Scenario::Protocol, protocol);
        for (name, table) in &c.rules {
            if let Some(scenario) = Scenario::from_name(name) {
                let mut rule = table.resolve(scenario);
                // Keys the table leaves out keep the values set above.
                let current = rules.get(scenario);
                rule.per_host = table.per_host.unwrap_or(current.per_host);
                rule.window_secs = table.window_secs.unwrap_or(current.window_secs);
                rule.distinct_users = table.distinct_users.unwrap_or(current.distinct_users);
                rules.set(scenario, rule);
            }
        }
        for name in &c.shadow_rules {
            if let Some(Rule::Scenario(scenario)) = Rule::from_name(name) {
                let mut rule = *rules.get(scenario);
                rule.shadow = true;
                rules.set(scenario, rule);
            }
        }
        let shadow = |rule: Rule| c.shadow_rules.iter().any(|n| n == rule.as_str());
        Thresholds {
            smtp_accept_max: c.smtp_accept_max,
            slot_alarm_ratio: c.slot_alarm_ratio,
            slot_share: c.slot_share,
            session_timeout_ms: i64::from(c.session_timeout_secs) * 1000,
            conn_rate: c.conn_rate,
            conn_rate_window_ms: i64::from(c.conn_rate_window_secs) * 1000,
            rules,
            good_standing_ms: i64::from(c.good_standing_secs) * 1000,
            protected_domains: c.protected_domains.clone().unwrap_or_else(|| Thresholds::default().protected_domains),
            ipv6_block_prefix: c.ipv6_block_prefix,
            local_block_ttl_secs: c.local_block_ttl_secs,
            slot_shadow: shadow(Rule::SlotExhaustion),
            conn_rate_shadow: shadow(Rule::ConnRate),
        }
    }
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), error: source })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = toml::from_str(text)
            .map_err(|error| ConfigError::Syntax { path: path.to_owned(), message: error.to_string() })?;
        config.validate().map_err(|(key, message)| ConfigError::Invalid { path: path.to_owned(), key, message })?;
        Ok(config)
    }

    /// Checks every value; returns the offending key and why.
    fn validate(&self) -> Result<(), (String, String)> {
        match (self.server.is_empty(), self.servers.is_empty()) {
            (true, true) => {
                return Err((
                    "server".into(),
                    "is required: set `server = \"https://...\"` or `servers = [\"https://...\", ...]`".into(),
                ));
            }
            (false, false) => {
                return Err((
                    "server".into(),
                    "and `servers` are both set: list every server in `servers` and remove `server`".into(),
                ));
            }
            (false, true) => validate_server(&self.server).map_err(|message| ("server".to_owned(), message))?,
            (true, false) => {
                let mut seen = std::collections::HashSet::new();
                for (index, url) in self.servers.iter().enumerate() {
                    let key = format!("servers[{index}]");
                    validate_server(url).map_err(|message| (key.clone(), message))?;
                    if !seen.insert(url) {
                        return Err((key, format!("{url} is listed twice")));
                    }
                }
            }
        }
        if let Some(ca) = &self.ca_file
            && ca.as_os_str().is_empty()
        {
            return Err(("ca_file".into(), "must not be empty (leave the key out for none)".into()));
        }
        if self.state_dir.as_os_str().is_empty() || !self.state_dir.is_absolute() {
            return Err(("state_dir".into(), "must be an absolute path".into()));
        }
        validate_timezone(&self.timezone).map_err(|message| ("timezone".to_owned(), message))?;
        let mut seen = std::collections::HashSet::new();
        for (index, source) in self.sources.iter().enumerate() {
            let key = format!("source[{index}].path");
            if source.path.as_os_str().is_empty() || !source.path.is_absolute() {
                return Err((key, "must be an absolute path".into()));
            }
            if source.path.file_name().is_none() {
                return Err((key, "must name a file".into()));
            }
            if source.path.to_str().is_none() {
                return Err((key, "must be valid UTF-8".into()));
            }
            if !seen.insert(&source.path) {
                return Err((key, format!("{} is configured twice", source.path.display())));
            }
        }
        if self.spool.max_bytes < 1024 * 1024 {
            return Err(("spool.max_bytes".into(), "must be at least 1048576 (1 MiB)".into()));
        }
        if !(1..=10_000).contains(&self.spool.fsync_ms) {
            return Err(("spool.fsync_ms".into(), "must be between 1 and 10000 milliseconds".into()));
        }
        if !(100..=10_000).contains(&self.spool.context_batch_ms) {
            return Err((
                "spool.context_batch_ms".into(),
                "must be between 100 and 10000 milliseconds (abuse lines are always sent after 100 ms)".into(),
            ));
        }
        if !(5..=86_400).contains(&self.firewall.reconcile_secs) {
            return Err(("firewall.reconcile_secs".into(), "must be between 5 and 86400 seconds".into()));
        }
        if self.firewall.extra_ports.contains(&0) {
            return Err(("firewall.extra_ports".into(), "port 0 is not a port; list TCP ports 1 to 65535".into()));
        }
        for (index, address) in self.addresses.iter().enumerate() {
            if address.is_unspecified() {
                return Err((format!("addresses[{index}]"), format!("{address} is not a host address")));
            }
        }
        self.aggregate.validate().map_err(|(key, message)| (format!("aggregate.{key}"), message))?;
        self.detect.validate().map_err(|(key, message)| (format!("detect.{key}"), message))
    }

    /// The server URLs, in the order configured: `servers`, or `server`
    /// alone.
    pub fn server_urls(&self) -> Vec<String> {
        if self.servers.is_empty() { vec![self.server.clone()] } else { self.servers.clone() }
    }

    /// Directory of the spool inside the state directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }
}

impl DetectConfig {
    /// Checks every threshold; returns the offending key (without the
    /// `detect.` prefix) and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fraction = |key: &str, value: f64| {
            if value > 0.0 && value <= 1.0 {
                Ok(())
            } else {
                Err((key.to_owned(), format!("must be a fraction in (0, 1], not {value}")))
            }
        };
        fraction("slot_alarm_ratio", self.slot_alarm_ratio)?;
        fraction("slot_share", self.slot_share)?;
        let positive = [
            ("conn_rate", self.conn_rate),
            ("conn_rate_window_secs", self.conn_rate_window_secs),
            ("auth_failures", self.auth_failures),
            ("auth_distinct_users", self.auth_distinct_users),
            ("auth_window_secs", self.auth_window_secs),
            ("abuse_events", self.abuse_events),
            ("abuse_window_secs", self.abuse_window_secs),
            ("local_block_ttl_secs", self.local_block_ttl_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err((key.to_owned(), "must be at least 1".into()));
            }
        }
        if !(60..=86_400).contains(&self.session_timeout_secs) {
            return Err(("session_timeout_secs".into(), "must be between 60 and 86400 seconds".into()));
        }
        if self.good_standing_secs == 0 {
            return Err(("good_standing_secs".into(), "must be at least 1".into()));
        }
        for name in self.rules.keys() {
            if fleetban_proto::policy::Scenario::from_name(name).is_none() {
                return Err((
                    format!("rules.{name}"),
                    "is not a scenario (auth, relay, dictionary, protocol, conn_limit, acl)".into(),
                ));
            }
        }
        for name in &self.shadow_rules {
            if fleetban_proto::detect::Rule::from_name(name).is_none() {
                return Err((
                    "shadow_rules".into(),
                    format!(
                        "{name:?} is not a rule (slot_exhaustion, conn_rate, auth, relay, dictionary, protocol, conn_limit, acl)"
                    ),
                ));
            }
        }
        if let Err(error) = self.thresholds().rules.validate() {
            return Err((format!("rules.{}.{}", error.scenario, error.key), error.problem.into()));
        }
        for (key, value) in [
            ("conn_rate_window_secs", self.conn_rate_window_secs),
            ("auth_window_secs", self.auth_window_secs),
            ("abuse_window_secs", self.abuse_window_secs),
        ] {
            if value > 86_400 {
                return Err((key.to_owned(), "must be at most 86400 seconds".into()));
            }
        }
        if !(48..=128).contains(&self.ipv6_block_prefix) {
            return Err(("ipv6_block_prefix".into(), "must be between 48 and 128".into()));
        }
        if self.max_tracked < 1000 {
            return Err(("max_tracked".into(), "must be at least 1000".into()));
        }
        Ok(())
    }
}

fn validate_server(server: &str) -> Result<(), String> {
    let (scheme, rest) = server.split_once("://").ok_or("must be a URL such as https://fleet.example.net:50051")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(host, _)| host)
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if let Some((_, port)) = authority.rsplit_once(':')
        && !authority.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(format!("has an invalid port `{port}`"));
    }
    match scheme {
        "https" => Ok(()),
        "http" => {
            let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback { Ok(()) } else { Err("http:// is only allowed for a loopback server; use https://".into()) }
        }
        other => Err(format!("unsupported scheme `{other}://` (use https://)")),
    }
}

/// The same resolution `run` does ([`crate::parse::Timezone::from_config`]),
/// so a zone `run` would refuse fails the load (and `check-config`) too.
/// `"local"` is resolved as well: an agent on a host whose system zone
/// cannot be determined must be told so before it starts.
fn validate_timezone(zone: &str) -> Result<(), String> {
    let valid = !zone.is_empty()
        && !zone.starts_with('/')
        && !zone.split('/').any(|part| part.is_empty() || part == "." || part == "..")
        && zone.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
    if !valid {
        return Err(format!("`{zone}` is not \"local\", \"UTC\" or an IANA zone name"));
    }
    crate::parse::Timezone::from_config(zone).map(drop).map_err(|error| match error {
        crate::parse::TimezoneError::Unknown { .. } => format!(
            "`{zone}` is not in the time-zone database; use \"local\", \"UTC\" or an IANA name such as \"Europe/Berlin\" \
             (see `timedatectl list-timezones`)"
        ),
        system => format!("{system}; set an IANA name such as \"Europe/Berlin\" or \"UTC\""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml(text, Path::new("agent.toml"))
    }

    #[test]
    fn example_file_parses_with_every_key() {
        let text = include_str!("../../deploy/agent.example.toml");
        let config = parse(text).expect("example config is valid");
        assert_eq!(config.server, "https://fleet.example.net:50051");
        assert_eq!(config.ca_file.as_deref(), Some(Path::new("/etc/fleetban/ca.pem")));
        assert_eq!(config.state_dir, Path::new("/var/lib/fleetban"));
        assert_eq!(config.timezone, "local");
        assert_eq!(config.sources.len(), 1);
        assert_eq!(config.sources[0].path, Path::new("/var/log/exim_mainlog"));
        assert_eq!(config.sources[0].start_at, StartAt::End);
        assert_eq!(config.spool.max_bytes, 536_870_912);
        assert_eq!(config.spool.fsync_ms, 100);
        assert_eq!(config.spool.context_batch_ms, 1000);
        assert_eq!(config.firewall.backend, FirewallBackend::Nftables);
        assert_eq!(config.firewall.scope, FirewallScope::Smtp);
        assert!(config.allowlist.cidrs.is_empty());
        assert_eq!(config.firewall.reconcile_secs, 60);
        assert_eq!(config.detect, DetectConfig::default());
        assert_eq!(config.metrics.listen, Some("127.0.0.1:9465".parse().unwrap()));
        assert_eq!(config.addresses, vec!["198.51.100.25".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn detect_defaults_are_the_documented_ones() {
        let detect = DetectConfig::default();
        assert_eq!(detect.smtp_accept_max, 0);
        assert_eq!(detect.slot_alarm_ratio, 0.9);
        assert_eq!(detect.slot_share, 0.1);
        assert_eq!(detect.slot_window_secs, None);
        assert_eq!(detect.session_timeout_secs, 900);
        assert_eq!(detect.conn_rate, 30);
        assert_eq!(detect.auth_failures, 10);
        assert_eq!(detect.auth_distinct_users, 5);
        assert_eq!(detect.auth_window_secs, 3600);
        assert_eq!(detect.abuse_events, 10);
        assert_eq!(detect.abuse_window_secs, 3600);
        assert_eq!(detect.good_standing_secs, 604_800);
        assert!(detect.protected_domains.is_none() && detect.shadow_rules.is_empty() && detect.rules.is_empty());
        // The shipped per-host thresholds are the shared model's.
        let th = detect.thresholds();
        assert_eq!(th.rules, fleetban_proto::policy::Rules::default());
        assert_eq!(detect.ipv6_block_prefix, 64);
        assert_eq!(detect.max_tracked, 100_000);
    }

    #[test]
    fn defaults_apply() {
        let config = parse("server = \"https://a.example:1\"\n").expect("valid");
        assert_eq!(config.state_dir, Path::new("/var/lib/fleetban"));
        assert_eq!(config.timezone, "local");
        assert_eq!(config.spool.max_bytes, 512 * 1024 * 1024);
        assert_eq!(config.spool.fsync_ms, 100);
        assert_eq!(config.spool.context_batch_ms, 1000);
        assert_eq!(config.firewall.backend, FirewallBackend::Nftables);
        assert_eq!(config.firewall.scope, FirewallScope::Smtp);
        assert!(config.sources.is_empty());
        assert_eq!(config.metrics.listen, None);
        assert_eq!(config.firewall.reconcile_secs, 60);
        assert!(config.detect.enabled);
    }

    #[test]
    fn full_config_values() {
        let config = parse(
            r#"
server = "http://127.0.0.1:50051"
state_dir = "/tmp/fb"
timezone = "Europe/Berlin"
[[source]]
kind = "exim"
path = "/var/log/a"
start_at = "beginning"
[[source]]
path = "/var/log/b"
[[source]]
kind = "dovecot"
path = "/var/log/maillog"
[spool]
max_bytes = 2097152
fsync_ms = 5
[firewall]
backend = "dry-run"
scope = "all"
[allowlist]
cidrs = ["192.0.2.0/24", "2001:db8::1"]
"#,
        )
        .expect("valid");
        assert_eq!(config.sources[0].start_at, StartAt::Beginning);
        assert_eq!(config.sources[1].start_at, StartAt::End);
        assert_eq!(config.sources[1].kind, SourceKind::Exim);
        assert_eq!(config.sources[2].kind, SourceKind::Dovecot);
        assert_eq!(config.covered_ports(), [25, 110, 143, 465, 587, 993, 995, 4190]);
        let exim_only = AgentConfig { sources: config.sources[..2].to_vec(), ..config.clone() };
        assert_eq!(exim_only.covered_ports(), [25, 465, 587]);
        assert_eq!(config.firewall.backend, FirewallBackend::DryRun);
        assert_eq!(config.firewall.scope, FirewallScope::All);
        assert_eq!(config.allowlist.cidrs[0].0, "192.0.2.0/24".parse::<IpNet>().unwrap());
        assert_eq!(config.allowlist.cidrs[1].0, "2001:db8::1/128".parse::<IpNet>().unwrap());
        assert_eq!(config.spool_dir(), Path::new("/tmp/fb/spool"));
    }

    fn error_of(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn one_server_or_several_but_not_both() {
        let one = parse("server = \"https://a.example:1\"\n").unwrap();
        assert_eq!(one.server_urls(), ["https://a.example:1"]);
        let several =
            parse("servers = [\"https://a.example:1\", \"https://b.example:1\", \"http://127.0.0.1:7\"]\n").unwrap();
        assert_eq!(several.server_urls(), ["https://a.example:1", "https://b.example:1", "http://127.0.0.1:7"]);
        let both = error_of("server = \"https://a.example:1\"\nservers = [\"https://b.example:1\"]\n");
        assert!(both.contains("`server`") && both.contains("`servers`"), "{both}");
        let neither = error_of("state_dir = \"/x\"\n");
        assert!(neither.contains("`server`") && neither.contains("servers"), "{neither}");
    }

    #[test]
    fn errors_name_the_key() {
        let base = "server = \"https://a.example:1\"\n";
        let cases: &[(&str, &str)] = &[
            ("server = \"https://a.example:1\"\nstate_dri = \"/x\"\n", "state_dri"),
            ("server = \"ftp://a.example\"\n", "server"),
            ("server = \"http://192.0.2.1:50051\"\n", "server"),
            ("server = \"https://:50051\"\n", "server"),
            ("server = \"https://a.example:99999\"\n", "server"),
            ("# no server key\n", "server"),
            ("servers = []\n", "server"),
            ("servers = [\"https://a.example:1\", \"ftp://b.example\"]\n", "servers[1]"),
            ("servers = [\"https://a.example:1\", \"http://192.0.2.1:1\"]\n", "servers[1]"),
            ("servers = [\"https://a.example:1\", \"https://a.example:1\"]\n", "servers[1]"),
            ("servers = \"https://a.example:1\"\n", "servers"),
            ("[spool]\nmax_bytes = 10\n", "spool.max_bytes"),
            ("[spool]\nfsync_ms = 0\n", "spool.fsync_ms"),
            ("[spool]\ncontext_batch_ms = 50\n", "spool.context_batch_ms"),
            ("[spool]\ncontext_batch_ms = 60000\n", "spool.context_batch_ms"),
            ("[spool]\nfsync_ms = \"fast\"\n", "fsync_ms"),
            ("[spool]\nmax_byte = 10\n", "max_byte"),
            ("[firewall]\nbackend = \"pf\"\n", "backend"),
            ("[firewall]\nscope = \"udp\"\n", "scope"),
            ("[firewall]\nzone = \"x\"\n", "zone"),
            ("[allowlist]\ncidrs = [\"not-an-ip\"]\n", "cidrs"),
            ("[allowlist]\ncidrs = [\"192.0.2.1/24\"]\n", "cidrs"),
            ("[[source]]\npath = \"relative.log\"\n", "source[0].path"),
            ("[[source]]\npath = \"/a\"\nstart_at = \"middle\"\n", "start_at"),
            ("[[source]]\npath = \"/a\"\nkind = \"postfix\"\n", "kind"),
            ("[[source]]\npath = \"/a\"\n[[source]]\npath = \"/a\"\n", "source[1].path"),
            ("timezone = \"../etc/passwd\"\n", "timezone"),
            ("timezone = \"Europe/Berln\"\n", "timezone"),
            ("state_dir = \"relative\"\n", "state_dir"),
            ("[firewall]\nreconcile_secs = 1\n", "firewall.reconcile_secs"),
            ("[firewall]\nextra_ports = [26, 0]\n", "firewall.extra_ports"),
            ("[detect]\nslot_share = 1.5\n", "detect.slot_share"),
            ("[detect]\nslot_alarm_ratio = 0.0\n", "detect.slot_alarm_ratio"),
            ("[detect]\nconn_rate = 0\n", "detect.conn_rate"),
            ("[detect]\nipv6_block_prefix = 32\n", "detect.ipv6_block_prefix"),
            ("[detect]\nmax_tracked = 10\n", "detect.max_tracked"),
            ("[detect]\nshadow_rules = [\"slots\"]\n", "detect.shadow_rules"),
            ("[detect.rules.brute]\nper_host = 3\n", "detect.rules.brute"),
            ("[detect.rules.relay]\ndistinct_users = 3\n", "detect.rules.relay.distinct_users"),
            ("[detect]\nsession_timeout_secs = 5\n", "detect.session_timeout_secs"),
            ("[detect]\nconn_rat = 5\n", "conn_rat"),
            ("[metrics]\nlisten = \"nowhere\"\n", "listen"),
            ("addresses = [\"0.0.0.0\"]\n", "addresses[0]"),
        ];
        for (text, key) in cases {
            let text = if text.starts_with("server") || text.starts_with('#') {
                text.to_string()
            } else {
                format!("{base}{text}")
            };
            let message = error_of(&text);
            assert!(message.contains(key), "error for {text:?} does not name `{key}`: {message}");
        }
    }
}
