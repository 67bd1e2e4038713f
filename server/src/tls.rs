//! Transport security of the gRPC listener, and a minimal PKI for fleets
//! without their own.
//!
//! Agents authenticate with a secret in request metadata, so the channel must
//! be encrypted: the server refuses to serve plaintext gRPC on anything but a
//! loopback address unless the operator says `--insecure`, and says so loudly
//! whenever it serves plaintext. [`pki_init`] writes a CA and a server
//! certificate signed by it (rcgen, ECDSA P-256); agents trust the CA file.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::warn;

use crate::config::TlsConfig;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file to be written already exists.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// Plaintext on a non-loopback listener without `--insecure`.
    #[error(
        "refusing plaintext gRPC on {0}: agent secrets would cross the network unencrypted; \
         give --tls-cert and --tls-key, listen on loopback, or pass --insecure"
    )]
    PlaintextRefused(SocketAddr),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io { path: path.into(), source })
}

/// The tonic TLS configuration for `tls`, or `None` for plaintext. Plaintext
/// is allowed only on a loopback `listen` address or with `insecure`, and is
/// announced with a warning.
pub fn server_config(
    tls: Option<&TlsConfig>,
    listen: SocketAddr,
    insecure: bool,
) -> Result<Option<ServerTlsConfig>, TlsError> {
    let Some(tls) = tls else {
        if listen.ip().is_loopback() {
            warn!(%listen, "PLAINTEXT gRPC: no TLS configured; allowed because the listener is loopback only.");
        } else if insecure {
            warn!(
                %listen,
                "PLAINTEXT gRPC ON A NETWORK LISTENER (--insecure): agent secrets and events travel unencrypted."
            );
        } else {
            return Err(TlsError::PlaintextRefused(listen));
        }
        return Ok(None);
    };
    let identity = Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(config))
}

/// The files [`pki_init`] wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// CA certificate (give it to agents as their trust root).
    pub ca_cert: PathBuf,
    /// CA private key (keep offline).
    pub ca_key: PathBuf,
    /// Server certificate chain.
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
}

/// Writes a new CA and a server certificate for `server_name` (a DNS name or
/// an IP address) into `dir`: `ca.pem`, `ca.key`, `server.pem`, `server.key`.
/// Keys are written with mode 0600; existing files are never overwritten.
pub fn pki_init(dir: &Path, server_name: &str) -> Result<PkiFiles, TlsError> {
    let files = PkiFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    };
    for path in [&files.ca_cert, &files.ca_key, &files.server_cert, &files.server_key] {
        if path.exists() {
            return Err(TlsError::Exists(path.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(|source| TlsError::Io { path: dir.into(), source })?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "fleetban CA");
    ca_params.distinguished_name.push(DnType::OrganizationName, "fleetban");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    ca_params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![server_name.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, server_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_cert = params.signed_by(&server_key, &issuer)?;

    write_new(&files.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&files.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_new(&files.server_key, server_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&files.server_cert, server_cert.pem().as_bytes(), 0o644)?;
    Ok(files)
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io { path: path.into(), source };
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pki_writes_four_files_once_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let files = pki_init(dir.path(), "fleetban.example").unwrap();
        let cert = fs::read_to_string(&files.server_cert).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&files.server_key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(pki_init(dir.path(), "x"), Err(TlsError::Exists(_))));
    }

    #[test]
    fn plaintext_only_on_loopback_or_insecure() {
        let lo: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(server_config(None, lo, false).unwrap().is_none());
        assert!(matches!(server_config(None, any, false), Err(TlsError::PlaintextRefused(_))));
        assert!(server_config(None, any, true).unwrap().is_none());
    }
}
