//! The agent's configuration file, `/etc/fleetban/agent.toml`.
//!
//! This is the contract every later feature extends: keys are only ever
//! added, never renamed. Unknown keys are refused (`deny_unknown_fields`) so a
//! typo fails at start instead of being silently ignored, and every value is
//! validated on load; an error always names the key it is about.
//! `deploy/agent.example.toml` documents every key with its unit and default.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

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
    /// loopback server. Required; no default.
    pub server: String,
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
}

/// One followed log file (`[[source]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Log format of the file. Only `"exim"` exists. Default: `"exim"`.
    #[serde(default)]
    pub kind: SourceKind,
    /// Path of the live log file, e.g. `/var/log/exim_mainlog`. Required.
    pub path: PathBuf,
    /// Where to start in a file the agent has never seen before: `"end"` or
    /// `"beginning"`. Default: `"end"`.
    #[serde(default)]
    pub start_at: StartAt,
}

/// Log format of a source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Exim main log (`exim_mainlog`).
    #[default]
    Exim,
}

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
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self { max_bytes: default_spool_max_bytes(), fsync_ms: default_spool_fsync_ms() }
    }
}

/// `[firewall]`: how local and fleet blocks reach the kernel.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    /// Backend: `"nftables"`, `"ipset"`, `"csf"` or `"dry-run"`.
    /// Default: `"nftables"`.
    #[serde(default)]
    pub backend: FirewallBackend,
    /// What a block covers: `"smtp"` (TCP 25, 465, 587) or `"all"` traffic.
    /// Default: `"smtp"`.
    #[serde(default)]
    pub scope: FirewallScope,
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
        validate_server(&self.server).map_err(|message| ("server".to_owned(), message))?;
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
        Ok(())
    }

    /// Directory of the spool inside the state directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
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

fn validate_timezone(zone: &str) -> Result<(), String> {
    if zone == "local" || zone == "UTC" {
        return Ok(());
    }
    let valid = !zone.is_empty()
        && !zone.starts_with('/')
        && !zone.split('/').any(|part| part.is_empty() || part == "." || part == "..")
        && zone.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
    if valid { Ok(()) } else { Err(format!("`{zone}` is not \"local\", \"UTC\" or an IANA zone name")) }
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
        assert_eq!(config.firewall.backend, FirewallBackend::Nftables);
        assert_eq!(config.firewall.scope, FirewallScope::Smtp);
        assert!(config.allowlist.cidrs.is_empty());
    }

    #[test]
    fn defaults_apply() {
        let config = parse("server = \"https://a.example:1\"\n").expect("valid");
        assert_eq!(config.state_dir, Path::new("/var/lib/fleetban"));
        assert_eq!(config.timezone, "local");
        assert_eq!(config.spool.max_bytes, 512 * 1024 * 1024);
        assert_eq!(config.spool.fsync_ms, 100);
        assert_eq!(config.firewall.backend, FirewallBackend::Nftables);
        assert_eq!(config.firewall.scope, FirewallScope::Smtp);
        assert!(config.sources.is_empty());
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
    fn errors_name_the_key() {
        let base = "server = \"https://a.example:1\"\n";
        let cases: &[(&str, &str)] = &[
            ("server = \"https://a.example:1\"\nstate_dri = \"/x\"\n", "state_dri"),
            ("server = \"ftp://a.example\"\n", "server"),
            ("server = \"http://192.0.2.1:50051\"\n", "server"),
            ("server = \"https://:50051\"\n", "server"),
            ("server = \"https://a.example:99999\"\n", "server"),
            ("# no server key\n", "server"),
            ("[spool]\nmax_bytes = 10\n", "spool.max_bytes"),
            ("[spool]\nfsync_ms = 0\n", "spool.fsync_ms"),
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
            ("state_dir = \"relative\"\n", "state_dir"),
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
