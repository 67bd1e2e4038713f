//! The server configuration: `server.toml`, overridden by command-line flags
//! and environment (`DATABASE_URL`).
//!
//! `deploy/server.example.toml` documents every key with its unit and
//! default. Unknown keys are an error that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::correlate::CorrelateConfig;

/// Longest an HTTP request may take before it is answered 408 (the API's
/// timeout; `limits.http_idle_timeout_secs` must exceed it).
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The whole server TOML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Postgres URL. Default: none (`DATABASE_URL` or `--database-url`).
    pub database_url: Option<String>,
    /// gRPC listener for agents. Default `0.0.0.0:50051`.
    pub grpc_listen: SocketAddr,
    /// HTTP listener for the API, dashboard and metrics. Default
    /// `127.0.0.1:8080`.
    pub http_listen: SocketAddr,
    /// Largest database pool, connections. Default 32. The block push keeps
    /// two connections of its own besides (LISTEN, and reading changes).
    pub db_max_connections: u32,
    /// TLS for the gRPC listener. Default: none (plaintext, which is only
    /// allowed on loopback or with `insecure = true`).
    pub tls: Option<TlsConfig>,
    /// Allow plaintext gRPC on a non-loopback listener. Default false.
    pub insecure: bool,
    /// Interval at which agents send heartbeats, seconds; a session silent
    /// for three intervals is considered dead. Default 15.
    pub heartbeat_secs: u64,
    /// How long events, per-address evidence and batch records are kept,
    /// days (whole day partitions are dropped). Default 30.
    pub events_retention_days: u32,
    /// Oldest event ingest stores, days: an agent's events (a backfill of
    /// old logs, a spool that waited long for the server) further behind the
    /// server's clock are rejected, and the agent is told why
    /// (`too_old`). At most `events_retention_days`. Default 30.
    pub max_event_age_days: u32,
    /// How long the blocklist change log is kept, days; an agent further
    /// behind gets a snapshot. Default 7.
    pub change_log_retention_days: u32,
    /// The addresses agents reach this server at (its public addresses, a
    /// load balancer's), besides the listeners' own: never blocked, so that
    /// no decision can cut agents off from their server. Default: none.
    pub advertised_addresses: Vec<std::net::IpAddr>,
    /// Load balancers in front of the gRPC listener that send a PROXY
    /// protocol header (version 1 or 2; HAProxy `send-proxy-v2`) on every
    /// connection they forward: connections from these ranges must start with
    /// one, and the client address it carries is the one connection limits,
    /// the failed-authentication throttle and the logs use. Connections from
    /// elsewhere are read as before. Default: none.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// This server's name among the replicas on one database, shown in
    /// logs, `/metrics` (`fleetban_replica_info`) and `GET /api/v1/replicas`;
    /// 1 to 64 characters, letters, digits, `.`, `_`, `-`. Default: the host
    /// name and the process id (`central-1-4711`).
    pub replica_name: Option<String>,
    /// Correlation policy.
    pub correlate: CorrelateConfig,
    /// Connection discipline of both listeners and the throttle of failed
    /// agent authentication.
    pub limits: LimitsConfig,
    /// Blocklist feeds (`[[feed]]`), fetched periodically into blocks with
    /// `source = feed`; see [`crate::feeds::FeedConfig`]. Default: none.
    pub feed: Vec<crate::feeds::FeedConfig>,
    /// ASN and country policy (`[geo]`); see [`crate::geo::GeoConfig`].
    /// Default: none.
    pub geo: crate::geo::GeoConfig,
    /// Notification channels (`[[notify]]`). Default: none.
    pub notify: Vec<crate::alerts::ChannelConfig>,
    /// When the server raises its own events (`[alerts]`).
    pub alerts: crate::alerts::AlertsConfig,
}

/// `[limits]`: what one client may hold of the server. See
/// [`crate::conn`] and [`crate::guard`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// TCP keepalive idle time of accepted connections on both listeners,
    /// seconds; 0 turns it off. Default 60.
    pub tcp_keepalive_secs: u64,
    /// Most open connections on the gRPC listener. Default 16384.
    pub grpc_max_connections: u32,
    /// Most open gRPC connections from one source (an IPv4 address or an
    /// IPv6 /64). Default 256.
    pub grpc_max_connections_per_source: u32,
    /// Most gRPC connections that do not (yet) carry an authenticated agent
    /// session: TLS and HTTP/2 handshakes, enrollments, refused sessions.
    /// Established agent sessions never count. Default 512.
    pub grpc_max_unauthenticated: u32,
    /// Most such connections from one source. Default 16.
    pub grpc_max_unauthenticated_per_source: u32,
    /// How long a gRPC connection may go from accept to an authenticated
    /// agent session (TLS handshake, HTTP/2 preface and `Connect`), seconds;
    /// it is closed then. An enrollment must finish within it. Default 20.
    pub grpc_auth_timeout_secs: u64,
    /// Most open connections on the HTTP listener. Default 1024.
    pub http_max_connections: u32,
    /// Most open HTTP connections from one source (a reverse proxy is one
    /// source). Default 128.
    pub http_max_connections_per_source: u32,
    /// How long an HTTP client may take to send a request's headers, from
    /// accept or from the previous response, seconds. Default 10.
    pub http_header_timeout_secs: u64,
    /// An HTTP connection with no traffic either way for this long is closed,
    /// seconds; more than the 30 s request timeout. Default 60.
    pub http_idle_timeout_secs: u64,
    /// Failed `Enroll`/`Connect` calls one source may make in a burst before
    /// it is throttled. Default 10.
    pub auth_failure_burst: u32,
    /// Failed calls per minute one source regains after the burst. Default 6.
    pub auth_failures_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            tcp_keepalive_secs: 60,
            grpc_max_connections: 16_384,
            grpc_max_connections_per_source: 256,
            grpc_max_unauthenticated: 512,
            grpc_max_unauthenticated_per_source: 16,
            grpc_auth_timeout_secs: 20,
            http_max_connections: 1024,
            http_max_connections_per_source: 128,
            http_header_timeout_secs: 10,
            http_idle_timeout_secs: 60,
            auth_failure_burst: 10,
            auth_failures_per_minute: 6,
        }
    }
}

impl LimitsConfig {
    /// Checks that every limit can work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: &str| Err(ConfigError::Invalid { key, problem: problem.into() });
        let positive = [
            ("limits.grpc_max_connections", self.grpc_max_connections),
            ("limits.grpc_max_connections_per_source", self.grpc_max_connections_per_source),
            ("limits.grpc_max_unauthenticated", self.grpc_max_unauthenticated),
            ("limits.grpc_max_unauthenticated_per_source", self.grpc_max_unauthenticated_per_source),
            ("limits.http_max_connections", self.http_max_connections),
            ("limits.http_max_connections_per_source", self.http_max_connections_per_source),
            ("limits.auth_failure_burst", self.auth_failure_burst),
            ("limits.auth_failures_per_minute", self.auth_failures_per_minute),
        ];
        for (key, value) in positive {
            if value == 0 {
                return invalid(key, "must be at least 1");
            }
        }
        for (key, secs) in [
            ("limits.grpc_auth_timeout_secs", self.grpc_auth_timeout_secs),
            ("limits.http_header_timeout_secs", self.http_header_timeout_secs),
            ("limits.http_idle_timeout_secs", self.http_idle_timeout_secs),
        ] {
            if secs == 0 || secs > 3600 {
                return invalid(key, "must be 1 to 3600");
            }
        }
        if self.tcp_keepalive_secs > 7200 {
            return invalid("limits.tcp_keepalive_secs", "must be 0 (off) to 7200");
        }
        if self.grpc_max_unauthenticated > self.grpc_max_connections {
            return invalid("limits.grpc_max_unauthenticated", "must not exceed grpc_max_connections");
        }
        if self.grpc_max_unauthenticated_per_source > self.grpc_max_connections_per_source {
            return invalid(
                "limits.grpc_max_unauthenticated_per_source",
                "must not exceed grpc_max_connections_per_source",
            );
        }
        if self.http_idle_timeout_secs <= HTTP_REQUEST_TIMEOUT.as_secs() {
            return invalid("limits.http_idle_timeout_secs", "must exceed the 30 s request timeout");
        }
        Ok(())
    }
}

/// `[tls]`: certificate and key of the gRPC listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, agents must present a client certificate
    /// signed by it (mutual TLS). Default: none.
    pub client_ca_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            database_url: None,
            grpc_listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            db_max_connections: 32,
            tls: None,
            insecure: false,
            heartbeat_secs: 15,
            events_retention_days: 30,
            max_event_age_days: 30,
            change_log_retention_days: 7,
            advertised_addresses: Vec::new(),
            proxy_protocol_from: Vec::new(),
            replica_name: None,
            correlate: CorrelateConfig::default(),
            limits: LimitsConfig::default(),
            feed: Vec::new(),
            geo: crate::geo::GeoConfig::default(),
            notify: Vec::new(),
            alerts: crate::alerts::AlertsConfig::default(),
        }
    }
}

/// A configuration that cannot be read or cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped key; the message
    /// names the key.
    #[error("{path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML error, naming the key.
        source: toml::de::Error,
    },
    /// A correlation value cannot work.
    #[error(transparent)]
    Correlate(#[from] crate::correlate::ConfigError),
    /// A `[[notify]]` or `[alerts]` value cannot work.
    #[error(transparent)]
    Alerts(#[from] crate::alerts::config::ConfigError),
    /// A top-level value cannot work.
    #[error("{key}: {problem}")]
    Invalid {
        /// The offending key (or flag).
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// Values given on the command line (or in the environment); each one that
/// is set replaces the TOML's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--database-url` / `DATABASE_URL`.
    pub database_url: Option<String>,
    /// `--grpc-listen`.
    pub grpc_listen: Option<SocketAddr>,
    /// `--http-listen`.
    pub http_listen: Option<SocketAddr>,
    /// `--tls-cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`.
    pub tls_key: Option<PathBuf>,
    /// `--client-ca`.
    pub client_ca: Option<PathBuf>,
    /// `--insecure` (only ever turns it on).
    pub insecure: bool,
}

impl ServerConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.into(), source },
            other => other,
        })
    }

    /// The file at `path` if given, else the defaults, with `overrides`
    /// applied and the result validated.
    pub fn resolve(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(path) => Self::load(path)?,
            None => ServerConfig::default(),
        };
        cfg.apply(overrides)?;
        Ok(cfg)
    }

    /// Replaces the values `overrides` sets.
    pub fn apply(&mut self, o: Overrides) -> Result<(), ConfigError> {
        if let Some(url) = o.database_url {
            self.database_url = Some(url);
        }
        if let Some(addr) = o.grpc_listen {
            self.grpc_listen = addr;
        }
        if let Some(addr) = o.http_listen {
            self.http_listen = addr;
        }
        self.insecure |= o.insecure;
        match (o.tls_cert, o.tls_key) {
            (Some(cert_file), Some(key_file)) => {
                let client_ca_file = o.client_ca.or_else(|| self.tls.as_ref().and_then(|t| t.client_ca_file.clone()));
                self.tls = Some(TlsConfig { cert_file, key_file, client_ca_file });
            }
            (None, None) => {
                if let Some(ca) = o.client_ca {
                    let tls = self.tls.as_mut().ok_or(ConfigError::Invalid {
                        key: "--client-ca",
                        problem: "needs --tls-cert and --tls-key (or [tls] in the config)".into(),
                    })?;
                    tls.client_ca_file = Some(ca);
                }
            }
            _ => {
                return Err(ConfigError::Invalid {
                    key: "--tls-cert/--tls-key",
                    problem: "give both or neither".into(),
                });
            }
        }
        self.validate()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.replica_name {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                return Err(ConfigError::Invalid {
                    key: "replica_name",
                    problem: "must be 1 to 64 letters, digits, `.`, `_` or `-`".into(),
                });
            }
        }
        if self.heartbeat_secs == 0 || self.heartbeat_secs > 3600 {
            return Err(ConfigError::Invalid { key: "heartbeat_secs", problem: "must be 1 to 3600".into() });
        }
        if self.events_retention_days == 0 || self.events_retention_days > 3650 {
            return Err(ConfigError::Invalid { key: "events_retention_days", problem: "must be 1 to 3650".into() });
        }
        if self.max_event_age_days == 0 || self.max_event_age_days > self.events_retention_days {
            return Err(ConfigError::Invalid {
                key: "max_event_age_days",
                problem: format!(
                    "must be 1 to events_retention_days ({}): older events would be dropped by retention",
                    self.events_retention_days
                ),
            });
        }
        if self.change_log_retention_days == 0 || self.change_log_retention_days > 3650 {
            return Err(ConfigError::Invalid { key: "change_log_retention_days", problem: "must be 1 to 3650".into() });
        }
        if let Some(url) = &self.database_url {
            crate::db::parse_url(url)
                .map_err(|error| ConfigError::Invalid { key: "database_url", problem: error.to_string() })?;
        }
        if self.db_max_connections < 2 {
            return Err(ConfigError::Invalid { key: "db_max_connections", problem: "must be at least 2".into() });
        }
        if let Some(net) = self.proxy_protocol_from.iter().find(|net| net.prefix_len() == 0) {
            return Err(ConfigError::Invalid {
                key: "proxy_protocol_from",
                problem: format!(
                    "{net} would let any client choose the address it is counted under; list the balancers' addresses"
                ),
            });
        }
        self.correlate.validate()?;
        self.limits.validate()?;
        let mut names = std::collections::BTreeSet::new();
        for feed in &self.feed {
            feed.validate().map_err(|problem| ConfigError::Invalid { key: "feed", problem })?;
            if !names.insert(feed.name.as_str()) {
                return Err(ConfigError::Invalid { key: "feed", problem: format!("two feeds named {:?}", feed.name) });
            }
        }
        self.geo.validate().map_err(|error| ConfigError::Invalid { key: "geo", problem: error.to_string() })?;
        crate::alerts::config::validate_channels(&self.notify)?;
        self.alerts.validate()?;
        Ok(())
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: ServerConfig =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: PathBuf::from("<config>"), source })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ServerConfig {
    /// The correlation policy with the server's own addresses (specific
    /// listen addresses and `advertised_addresses`) added to `never_block`.
    pub fn policy(&self) -> CorrelateConfig {
        let mut policy = self.correlate.clone();
        let listen = [self.grpc_listen.ip(), self.http_listen.ip()].into_iter().filter(|ip| !ip.is_unspecified());
        for ip in listen.chain(self.advertised_addresses.iter().copied()) {
            let net = ipnet::IpNet::from(fleetban_proto::canonical_ip(ip));
            if !policy.never_block.contains(&net) {
                policy.never_block.push(net);
            }
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.example.toml");
        let mut cfg = ServerConfig::load(&path).unwrap();
        // Every scenario's table is spelled out, with the shipped values.
        assert_eq!(cfg.correlate.rules.len(), fleetban_proto::policy::Scenario::ALL.len());
        assert_eq!(cfg.correlate.resolved_rules(), fleetban_proto::policy::Rules::default());
        cfg.correlate.rules.clear();
        let defaults =
            ServerConfig { database_url: cfg.database_url.clone(), tls: cfg.tls.clone(), ..ServerConfig::default() };
        assert_eq!(cfg, defaults, "deploy/server.example.toml must document the defaults");
    }

    #[test]
    fn replica_names_are_checked() {
        let cfg = ServerConfig::parse("replica_name = \"central-1.example_b\"\n").unwrap();
        assert_eq!(cfg.replica_name.as_deref(), Some("central-1.example_b"));
        for bad in ["", "with space", "a/b", &"x".repeat(65)] {
            let error = ServerConfig::parse(&format!("replica_name = {bad:?}\n")).unwrap_err().to_string();
            assert!(error.contains("replica_name"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn the_servers_own_addresses_are_never_blocked() {
        let cfg = ServerConfig::parse(
            "grpc_listen = \"198.51.100.10:50051\"\nhttp_listen = \"0.0.0.0:8080\"\n\
             advertised_addresses = [\"203.0.113.5\", \"::ffff:192.0.2.9\"]\n",
        )
        .unwrap();
        let policy = cfg.policy();
        for own in ["198.51.100.10/32", "203.0.113.5/32", "192.0.2.9/32"] {
            assert!(policy.never_block.contains(&own.parse().unwrap()), "{own}");
        }
        assert!(!policy.never_block.iter().any(|n| n.to_string() == "0.0.0.0/32"));
        assert_eq!(policy.never_block.len(), CorrelateConfig::default().never_block.len() + 3);
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let err = ServerConfig::parse("[correlate]\nmin_host = 3\n").unwrap_err().to_string();
        assert!(err.contains("min_host"), "{err}");
        let err = ServerConfig::parse("grpc_listen = 5\n").unwrap_err().to_string();
        assert!(err.contains("grpc_listen"), "{err}");
        let err = ServerConfig::parse("[correlate]\nipv6_block_prefix = 56\n").unwrap_err().to_string();
        assert!(err.contains("correlate.ipv6_block_prefix"), "{err}");
        let err = ServerConfig::parse("max_event_age_days = 40\n").unwrap_err().to_string();
        assert!(err.contains("max_event_age_days"), "{err}");
        let cfg = ServerConfig::parse("max_event_age_days = 40\nevents_retention_days = 90\n").unwrap();
        assert_eq!(cfg.max_event_age_days, 40);
        let err = ServerConfig::parse("database_url = \"db.example/fleetban\"\n").unwrap_err().to_string();
        assert!(err.contains("database_url") && err.contains("postgres://"), "{err}");
        let err = ServerConfig::parse("heartbeat_secs = 0\n").unwrap_err().to_string();
        assert!(err.contains("heartbeat_secs"), "{err}");
        let err = ServerConfig::parse("[limits]\nhttp_idle_timeout_secs = 5\n").unwrap_err().to_string();
        assert!(err.contains("limits.http_idle_timeout_secs"), "{err}");
        let err = ServerConfig::parse("proxy_protocol_from = [\"0.0.0.0/0\"]\n").unwrap_err().to_string();
        assert!(err.contains("proxy_protocol_from") && err.contains("0.0.0.0/0"), "{err}");
        let cfg = ServerConfig::parse("proxy_protocol_from = [\"192.0.2.2/32\", \"2001:db8::/64\"]\n").unwrap();
        assert_eq!(cfg.proxy_protocol_from.len(), 2);
        let err = ServerConfig::parse("proxy_protocol_from = [\"balancer\"]\n").unwrap_err().to_string();
        assert!(err.contains("proxy_protocol_from"), "{err}");
        let err = ServerConfig::parse("[limits]\ngrpc_max_unauthenticated = 0\n").unwrap_err().to_string();
        assert!(err.contains("limits.grpc_max_unauthenticated"), "{err}");
        let err = ServerConfig::parse("[limits]\ngrpc_max_connection = 5\n").unwrap_err().to_string();
        assert!(err.contains("grpc_max_connection"), "{err}");
    }

    #[test]
    fn feeds_and_geo_policy_are_checked_at_load() {
        let cfg = ServerConfig::parse(
            "[[feed]]\nname = \"drop\"\nurl = \"https://example.invalid/drop.txt\"\nformat = \"drop\"\n\
             [[geo.block_asn]]\nasn = 64500\n[[geo.evidence]]\ncountry = \"NL\"\nfactor_percent = 200\n",
        )
        .unwrap();
        assert_eq!((cfg.feed[0].refresh_secs, cfg.feed[0].ttl_secs, cfg.feed[0].max_shrink_percent), (3600, 10800, 50));
        assert_eq!(cfg.geo.block_asn[0].asn, 64500);
        let feed = |extra: &str| format!("[[feed]]\nname = \"x\"\nformat = \"plain\"\n{extra}");
        let two = format!("{}{}", feed("path = \"/a\"\n"), feed("path = \"/b\"\n"));
        for (text, want) in [
            (feed("url = \"ftp://example.invalid/\"\n"), "http"),
            (feed(""), "exactly one of url and path"),
            (feed("path = \"/a\"\nrefresh_secs = 3600\nttl_secs = 3600\n"), "ttl_secs"),
            (feed("path = \"/a\"\nrefresh = 60\n"), "refresh"),
            (feed("path = \"/a\"\nmax_shrink_percent = 120\n"), "max_shrink_percent"),
            (feed("path = \"/a\"\ncsv_column = 0\n"), "csv_column"),
            ("[[feed]]\nname = \"x y\"\npath = \"/a\"\nformat = \"plain\"\n".to_owned(), "name"),
            ("[[feed]]\nname = \"x\"\npath = \"/a\"\nformat = \"json\"\n".to_owned(), "json"),
            (two, "two feeds named"),
            ("[geo]\ncountry_mmdb = \"/x\"\n".to_owned(), "country_mmdb"),
            ("[[geo.evidence]]\ncountry = \"NL\"\nfactor_percent = 5000\n".to_owned(), "geo.evidence.factor_percent"),
            ("[[geo.block_asn]]\nasn = 0\n".to_owned(), "geo.block_asn.asn"),
        ] {
            let err = ServerConfig::parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn notify_channels_are_read_and_checked() {
        let cfg = ServerConfig::parse(
            "[alerts]\nagent_offline_secs = 600\n\n[[notify]]\nname = \"chat\"\nkind = \"slack\"\n\
             url = \"https://chat.example.net/hooks/x\"\nevents = [\"block\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.notify.len(), 1);
        assert_eq!(cfg.notify[0].events, [crate::alerts::AlertKind::Block]);
        assert_eq!(cfg.alerts.agent_offline_secs, 600);
        let err = ServerConfig::parse("[[notify]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"https://x.example\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("notify[hook].secret"), "{err}");
        let err = ServerConfig::parse("[alerts]\ncheck_interval_secs = 0\n").unwrap_err().to_string();
        assert!(err.contains("alerts.check_interval_secs"), "{err}");
        let err = ServerConfig::parse("[alerts]\noffline_secs = 5\n").unwrap_err().to_string();
        assert!(err.contains("offline_secs"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let mut cfg = ServerConfig::parse("grpc_listen = \"0.0.0.0:1\"\ndatabase_url = \"postgres://file\"\n").unwrap();
        cfg.apply(Overrides {
            database_url: Some("postgres://flag".into()),
            grpc_listen: Some("127.0.0.1:2".parse().unwrap()),
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.database_url.as_deref(), Some("postgres://flag"));
        assert_eq!(cfg.grpc_listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(cfg.http_listen, ServerConfig::default().http_listen, "unset flags keep the file's value");
        assert_eq!(cfg.tls.unwrap().key_file, PathBuf::from("k.pem"));
        let half = Overrides { tls_cert: Some("c.pem".into()), ..Default::default() };
        assert!(ServerConfig::default().apply(half).unwrap_err().to_string().contains("--tls-key"));
        let ca_only = Overrides { client_ca: Some("ca.pem".into()), ..Default::default() };
        assert!(ServerConfig::default().apply(ca_only).is_err());
    }
}
