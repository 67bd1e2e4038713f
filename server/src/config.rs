//! The server configuration: `server.toml`, overridden by command-line flags
//! and environment (`DATABASE_URL`).
//!
//! `deploy/server.example.toml` documents every key with its unit and
//! default. Unknown keys are an error that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::correlate::CorrelateConfig;

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
    /// Largest database pool, connections. Default 32.
    pub db_max_connections: u32,
    /// TLS for the gRPC listener. Default: none (plaintext, which is only
    /// allowed on loopback or with `insecure = true`).
    pub tls: Option<TlsConfig>,
    /// Allow plaintext gRPC on a non-loopback listener. Default false.
    pub insecure: bool,
    /// Correlation policy.
    pub correlate: CorrelateConfig,
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
            correlate: CorrelateConfig::default(),
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

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: ServerConfig =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: PathBuf::from("<config>"), source })?;
        cfg.correlate.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/server.example.toml");
        let cfg = ServerConfig::load(&path).unwrap();
        let defaults =
            ServerConfig { database_url: cfg.database_url.clone(), tls: cfg.tls.clone(), ..ServerConfig::default() };
        assert_eq!(cfg, defaults, "deploy/server.example.toml must document the defaults");
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let err = ServerConfig::parse("[correlate]\nmin_host = 3\n").unwrap_err().to_string();
        assert!(err.contains("min_host"), "{err}");
        let err = ServerConfig::parse("grpc_listen = 5\n").unwrap_err().to_string();
        assert!(err.contains("grpc_listen"), "{err}");
        let err = ServerConfig::parse("[correlate]\nipv6_block_prefix = 56\n").unwrap_err().to_string();
        assert!(err.contains("correlate.ipv6_block_prefix"), "{err}");
    }
}
