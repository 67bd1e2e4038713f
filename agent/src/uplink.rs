//! The uplink: the agent's one long-lived `Connect` session to the server.
//!
//! A session authenticates with metadata (`x-fleetban-agent-id`,
//! `x-fleetban-agent-secret`), opens with `Hello` (hostname, version, the
//! host's own addresses, the blocklist version the firewall holds, the next
//! batch seq) and waits for `Welcome`. Then, concurrently:
//!
//! - durable spool batches are sent in seq order, at most `window` unacked
//!   at a time; on `Ack` the spool is acked (acked segments are deleted); a
//!   `Nack`ed batch is dropped (the server refused it as a whole, resending
//!   it unchanged cannot help) and counted;
//! - `BlocklistSnapshot` / `BlocklistDelta` go to the firewall thread, and
//!   the version applied is reported with `Applied` after a jittered
//!   [`applied_delay`] that coalesces the deltas applied meanwhile (the
//!   server pushes a block to every agent at once; replies sent the moment
//!   each agent applies it would compete with that fan-out for the server's
//!   CPU, and a burst of blocks would cost a reply each); a delta that does not
//!   start at the version held ends the session, and the next `Hello` asks
//!   for the catch-up;
//! - local blocks are sent as `LocalBlock`; heartbeats every
//!   `Welcome.heartbeat_secs`; `Policy` updates go to detection; spool losses
//!   are reported as `SpoolLoss`.
//!
//! When a session ends it is reopened after a jittered exponential backoff
//! (doubling from 0.5 s up to 30 s, reset by every session that got its
//! `Welcome`). With several servers (`servers`, or one name with several
//! addresses) every attempt goes to the next one of the ring
//! ([`crate::failover`]): a pass over the ring without a `Welcome` is one
//! backoff step, the addresses inside a pass are tried after a quick
//! 100 ms. Batches sent but not acked are sent again by the next session,
//! starting after `max(spool acked seq, Welcome.last_acked_seq)`: the server
//! stores each `(agent, seq)` once, so nothing is lost and nothing is stored
//! twice. On shutdown no new batch is sent, and the acks of those in flight
//! are awaited for up to [`DRAIN_TIMEOUT`].
//!
//! TLS: `https://` servers are verified against `ca_file` (or the WebPKI
//! roots); `http://` is accepted only for loopback servers or with
//! `insecure` (tests, lab setups).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fleetban_proto::v1::agent_frame::Frame;
use fleetban_proto::v1::agent_service_client::AgentServiceClient;
use fleetban_proto::v1::server_frame::Frame as In;
use fleetban_proto::v1::{
    AgentFrame, Applied, EnrollRequest, EventBatch, Heartbeat, Hello, IpAddress, LocalBlock, Policy, Revocations,
    SpoolLoss,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use crate::failover::{Backoff, Outcome, Reconnect, Servers, Target};
use crate::firewall::worker::{DeltaReply, FirewallHandle, Request};
use crate::pipeline::SharedSpool;
use crate::spool::{Loss, SpoolError};

pub use fleetban_proto::{AGENT_ID_HEADER, AGENT_SECRET_HEADER};
/// File of the credentials inside the state directory.
pub const CREDENTIALS_FILE: &str = "credentials.json";
/// How long shutdown waits for the acks of batches in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Mean delay of an `Applied` report after the first blocklist change it
/// covers; see [`applied_delay`].
pub const APPLIED_DELAY: Duration = Duration::from_millis(500);

/// How long the agent waits before reporting what it applied: uniformly
/// 300–700 ms, so that the fleet's replies to one push arrive after the
/// push reached everyone and spread out instead of together. Every change
/// applied in that time goes into the same report, and heartbeats carry the
/// version too; the server stores reports every 500 ms anyway.
pub fn applied_delay() -> Duration {
    let mean = APPLIED_DELAY.as_millis() as u64;
    Duration::from_millis(fastrand::u64(mean * 3 / 5..=mean * 7 / 5))
}

/// Longest wait for `Welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest frame accepted from the server (a snapshot of a large blocklist).
const MAX_DECODE_BYTES: usize = 256 * 1024 * 1024;

/// Errors of the uplink.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The server URL or TLS settings cannot be used.
    #[error("server {server}: {message}")]
    Config {
        /// The URL.
        server: String,
        /// What is wrong.
        message: String,
    },
    /// The credentials file is missing or unreadable.
    #[error("credentials {path}: {message} (run `fleetban-agent enroll` first)")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The connection failed (TCP, TLS or HTTP/2); `cause` is the whole
    /// chain of the transport error on one line.
    #[error("cannot connect: {cause}")]
    Connect {
        /// What failed, with its causes.
        cause: String,
        /// A TCP connection was refused.
        refused: bool,
        /// The server's certificate was refused, and why.
        tls: Option<TlsProblem>,
    },
    /// The server answered with an error.
    #[error("server said {:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The firewall failed to apply a blocklist.
    #[error("firewall: {0}")]
    Firewall(String),
    /// The firewall holds another version than a delta starts at.
    #[error("blocklist version gap; resynchronising")]
    Resync,
}

/// Why the server's certificate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsProblem {
    /// Not signed by a CA this agent trusts (`ca_file`, or the WebPKI roots).
    UnknownIssuer,
    /// Not issued for the host name in `server`.
    WrongName,
    /// Expired or not yet valid.
    Expired,
    /// Another certificate problem.
    Other,
}

impl From<tonic::Status> for UplinkError {
    fn from(status: tonic::Status) -> Self {
        UplinkError::Status(status)
    }
}

impl From<tonic::transport::Error> for UplinkError {
    fn from(error: tonic::transport::Error) -> Self {
        let mut cause = error.to_string();
        let (mut refused, mut tls) = (false, None);
        let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&error);
        while let Some(current) = next {
            // An io::Error's source() skips the error it wraps.
            let inner = current.downcast_ref::<std::io::Error>().and_then(|io| {
                refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
                io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static))
            });
            for candidate in [Some(current), inner].into_iter().flatten() {
                if let Some(rustls::Error::InvalidCertificate(certificate)) = candidate.downcast_ref::<rustls::Error>()
                {
                    use rustls::CertificateError as C;
                    tls = Some(match certificate {
                        C::UnknownIssuer => TlsProblem::UnknownIssuer,
                        C::NotValidForName | C::NotValidForNameContext { .. } => TlsProblem::WrongName,
                        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
                            TlsProblem::Expired
                        }
                        _ => TlsProblem::Other,
                    });
                }
            }
            let message = current.to_string();
            if !cause.contains(&message) {
                cause.push_str(": ");
                cause.push_str(&message);
            }
            next = current.source();
        }
        UplinkError::Connect { cause: cause.replace('\n', " "), refused, tls }
    }
}

impl UplinkError {
    /// The server refused the agent's credentials (or the enrollment token).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, UplinkError::Status(status)
            if matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied))
    }

    /// What the operator should do about this error, naming the config key
    /// or the command; `enrolling` for `fleetban-agent enroll`.
    pub fn hint(&self, server: &ServerOptions, enrolling: bool) -> Option<String> {
        let url = &server.server;
        match self {
            UplinkError::Connect { tls: Some(TlsProblem::UnknownIssuer), .. } => Some(match &server.ca_file {
                None => format!(
                    "the certificate of {url} is not signed by a CA this host trusts: set `ca_file` in agent.toml \
                     to the fleet's CA certificate (the ca.pem of `fleetban-server pki init`)"
                ),
                Some(path) => format!(
                    "`ca_file` {} did not sign the certificate of {url}: point `ca_file` at the CA that did",
                    path.display()
                ),
            }),
            UplinkError::Connect { tls: Some(TlsProblem::WrongName), .. } => Some(format!(
                "the certificate of {url} is not issued for that host name: use the name it was issued for \
                 (`fleetban-server pki init --server-name`) in `server`"
            )),
            UplinkError::Connect { tls: Some(TlsProblem::Expired), .. } => Some(format!(
                "the certificate of {url} is expired or not yet valid: check the clocks of both hosts, renew it"
            )),
            UplinkError::Connect { refused: true, .. } => Some(format!(
                "nothing accepts connections at {url}: is fleetban-server running there, and is `server` right?"
            )),
            UplinkError::Status(_) if self.is_auth_failure() && enrolling => Some(
                "create a new enrollment token on the server with `fleetban-server enroll-token create` \
                 and enroll with it"
                    .into(),
            ),
            UplinkError::Status(_) if self.is_auth_failure() => Some(format!(
                "{url} does not accept this agent's credentials (revoked, or enrolled with another server or \
                 database): re-enroll with `fleetban-agent enroll --server {url} --token TOKEN --config \
                 /etc/fleetban/agent.toml` (a token from `fleetban-server enroll-token create`), then restart \
                 fleetban-agent"
            )),
            _ => None,
        }
    }
}

/// The agent's identity, stored in `state_dir/credentials.json` (mode 0600).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credentials {
    /// Server-assigned agent id.
    pub agent_id: String,
    /// The secret; never logged.
    pub agent_secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("agent_id", &self.agent_id).finish_non_exhaustive()
    }
}

/// Format of `credentials.json` this agent writes and the newest it reads
/// (a file without `format` is format 1).
const CREDENTIALS_FORMAT: u32 = 1;

/// `credentials.json` as stored: the credentials and their format.
#[derive(Serialize, Deserialize)]
struct StoredCredentials {
    #[serde(default = "credentials_format_1")]
    format: u32,
    #[serde(flatten)]
    credentials: Credentials,
}

fn credentials_format_1() -> u32 {
    1
}

impl Credentials {
    /// Path of the credentials in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(CREDENTIALS_FILE)
    }

    /// Reads the credentials from `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Credentials, UplinkError> {
        let path = Self::path(state_dir);
        let text = std::fs::read(&path)
            .map_err(|error| UplinkError::Credentials { path: path.clone(), message: error.to_string() })?;
        let stored: StoredCredentials = serde_json::from_slice(&text)
            .map_err(|error| UplinkError::Credentials { path: path.clone(), message: error.to_string() })?;
        if stored.format > CREDENTIALS_FORMAT {
            return Err(UplinkError::Credentials {
                path,
                message: format!(
                    "written in format {} by a newer agent; this agent reads format {CREDENTIALS_FORMAT}: upgrade \
                     the agent, or enroll again",
                    stored.format
                ),
            });
        }
        Ok(stored.credentials)
    }

    /// Writes the credentials to `state_dir` atomically with mode 0600.
    pub fn store(&self, state_dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(state_dir)?;
        let path = Self::path(state_dir);
        let stored = StoredCredentials { format: CREDENTIALS_FORMAT, credentials: self.clone() };
        let bytes = serde_json::to_vec_pretty(&stored).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&path, &bytes, 0o600)?;
        Ok(path)
    }
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// `https://host:port` (or `http://` for loopback / insecure).
    pub server: String,
    /// CA of the server certificate; `None` = WebPKI roots.
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` to a non-loopback server.
    pub insecure: bool,
}

impl ServerOptions {
    /// The gRPC endpoint, with TLS when the URL is `https://`.
    pub fn endpoint(&self) -> Result<Endpoint, UplinkError> {
        let config = |message: String| UplinkError::Config { server: self.server.clone(), message };
        let endpoint = Endpoint::from_shared(self.server.clone())
            .map_err(|error| config(error.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let uri = endpoint.uri().clone();
        match uri.scheme_str() {
            Some("https") => {
                let mut tls = ClientTlsConfig::new();
                tls = match &self.ca_file {
                    Some(path) => {
                        let pem = std::fs::read(path)
                            .map_err(|error| config(format!("ca_file {}: {error}", path.display())))?;
                        tls.ca_certificate(Certificate::from_pem(pem))
                    }
                    None => tls.with_webpki_roots(),
                };
                endpoint.tls_config(tls).map_err(|error| config(error.to_string()))
            }
            Some("http") => {
                let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                if loopback || self.insecure {
                    Ok(endpoint)
                } else {
                    Err(config("http:// is only allowed for a loopback server (or with --insecure)".into()))
                }
            }
            _ => Err(config("the URL must start with https:// or http://".into())),
        }
    }
}

/// Trades an enrollment token for credentials, named after `hostname` and
/// without a host id (so the server cannot tell a re-enrollment of this host
/// from another host: see [`enroll_as`]).
pub async fn enroll(
    server: &ServerOptions,
    token: &str,
    hostname: &str,
    addresses: &[IpAddr],
) -> Result<Credentials, UplinkError> {
    let enrollment = Enrollment { token, name: None, host_id: None, hostname, addresses };
    Ok(enroll_as(server, &enrollment).await?.credentials)
}

/// What `fleetban-agent enroll` presents.
#[derive(Debug, Clone, Copy)]
pub struct Enrollment<'a> {
    /// The enrollment token.
    pub token: &'a str,
    /// The agent's name in the fleet; `None` = the hostname.
    pub name: Option<&'a str>,
    /// The host id ([`crate::host::host_id`]); `None` = none.
    pub host_id: Option<&'a str>,
    /// The host's name.
    pub hostname: &'a str,
    /// The host's own addresses.
    pub addresses: &'a [IpAddr],
}

/// The outcome of [`enroll_as`].
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The credentials to store.
    pub credentials: Credentials,
    /// The server replaced the credentials of this host's existing agent
    /// (same agent id; the old secret no longer works).
    pub reenrolled: bool,
}

/// Trades an enrollment token for credentials. With the same name and host
/// id as an existing agent, the server replaces that agent's credentials
/// instead of creating another agent.
pub async fn enroll_as(server: &ServerOptions, enrollment: &Enrollment<'_>) -> Result<Enrolled, UplinkError> {
    let channel = server.endpoint()?.connect().await?;
    let response = AgentServiceClient::new(channel)
        .enroll(EnrollRequest {
            token: enrollment.token.to_owned(),
            hostname: enrollment.hostname.to_owned(),
            version: crate::VERSION.to_owned(),
            addresses: enrollment.addresses.iter().map(|ip| IpAddress::from(*ip)).collect(),
            name: enrollment.name.unwrap_or_default().to_owned(),
            host_id: enrollment.host_id.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    if response.agent_id.is_empty() || response.agent_secret.is_empty() {
        return Err(UplinkError::Protocol("Enroll returned no credentials".into()));
    }
    Ok(Enrolled {
        credentials: Credentials { agent_id: response.agent_id, agent_secret: response.agent_secret },
        reenrolled: response.reenrolled,
    })
}

/// [`enroll_as`] with the first of `servers` that answers: a server that
/// cannot be reached is skipped; an answer (credentials, or a refusal,
/// which every replica of the fleet would give alike) ends the search.
pub async fn enroll_any(servers: &[ServerOptions], enrollment: &Enrollment<'_>) -> Result<Enrolled, UplinkError> {
    let mut last = UplinkError::Protocol("no server configured".into());
    for (index, server) in servers.iter().enumerate() {
        match enroll_as(server, enrollment).await {
            Err(error @ UplinkError::Connect { .. }) if index + 1 < servers.len() => {
                warn!(server = %server.server, %error, "Cannot reach the server; enrolling with the next one.");
                last = error;
            }
            result => return result,
        }
    }
    Err(last)
}

/// Counters of the uplink, for status and metrics.
#[derive(Debug, Default)]
pub struct UplinkStats {
    /// A session is open (Welcome received).
    pub connected: AtomicBool,
    /// The server of the open (or last) session: its URL, and the address
    /// dialled when the URL does not name it (`https://a:50051
    /// (192.0.2.1:50051)`); empty before the first session.
    pub server: Mutex<String>,
    /// Sessions opened (Welcome received).
    pub sessions: AtomicU64,
    /// Session ends followed by a reconnect.
    pub reconnects: AtomicU64,
    /// Batches sent (resends included).
    pub batches_sent: AtomicU64,
    /// Highest seq acked.
    pub last_ack_seq: AtomicU64,
    /// Batches refused by the server.
    pub batches_nacked: AtomicU64,
    /// Local blocks reported.
    pub local_blocks_sent: AtomicU64,
    /// Snapshots and deltas applied.
    pub blocklists_applied: AtomicU64,
    /// When the current (or last) session opened, unix ms.
    pub connected_since_ms: AtomicI64,
    /// Events the server rejected per reason (`Ack.rejections`), and the
    /// rate limit of their log.
    pub rejections: Mutex<Rejections>,
}

/// Events the server rejected: counts per reason and the log's rate limit.
#[derive(Debug, Default)]
pub struct Rejections {
    /// Events per reason label.
    pub counts: BTreeMap<String, u64>,
    /// When each reason was last logged.
    pub log: RejectionLog,
}

impl UplinkStats {
    /// The server of the open (or last) session (see [`UplinkStats::server`]).
    pub fn server(&self) -> String {
        self.server.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The rejected events per reason, for metrics.
    pub fn rejected(&self) -> BTreeMap<String, u64> {
        self.rejections.lock().unwrap_or_else(PoisonError::into_inner).counts.clone()
    }
}

/// Most distinct rejection reasons counted; further ones count as `other`.
const MAX_REJECTION_REASONS: usize = 16;
/// A rejection reason is logged at once, then at most once per this
/// interval with the events and batches since.
pub const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(300);

/// A server-sent reason as a metric label: a short `[a-z0-9_]` code, else
/// `other`. An older server sends no reasons: `unspecified`.
pub fn rejection_label(reason: &str) -> &str {
    let valid = !reason.is_empty()
        && reason.len() <= 32
        && reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid { reason } else { "other" }
}

/// Rate limit of the rejection log: per reason, the first rejection is
/// logged, then the totals at most once per [`REJECTION_LOG_INTERVAL`].
#[derive(Debug, Default)]
pub struct RejectionLog {
    reasons: BTreeMap<String, PendingRejections>,
}

#[derive(Debug)]
struct PendingRejections {
    logged_at: Option<tokio::time::Instant>,
    events: u64,
    batches: u64,
}

impl RejectionLog {
    /// Records `events` rejected for `reason` in one batch at `now`; returns
    /// the events and batches to log now (since the last line of the
    /// reason), or `None` while the reason was logged recently.
    pub fn record(&mut self, reason: &str, events: u64, now: tokio::time::Instant) -> Option<(u64, u64)> {
        let pending = self.reasons.entry(reason.to_owned()).or_insert(PendingRejections {
            logged_at: None,
            events: 0,
            batches: 0,
        });
        pending.events += events;
        pending.batches += 1;
        let due = pending.logged_at.is_none_or(|at| now.duration_since(at) >= REJECTION_LOG_INTERVAL);
        if !due {
            return None;
        }
        pending.logged_at = Some(now);
        let out = (pending.events, pending.batches);
        (pending.events, pending.batches) = (0, 0);
        Some(out)
    }
}

/// Counts and logs (rate-limited) the events an `Ack` reports rejected.
pub fn note_rejections(ack: &fleetban_proto::v1::Ack, stats: &UplinkStats) {
    let unspecified;
    let rejections: &[fleetban_proto::v1::Rejection] = if ack.rejections.is_empty() {
        if ack.rejected_events == 0 {
            return;
        }
        unspecified = [fleetban_proto::v1::Rejection {
            reason: "unspecified".into(),
            events: ack.rejected_events,
            detail: "the server does not say why (it predates rejection reasons); see its log".into(),
        }];
        &unspecified
    } else {
        &ack.rejections
    };
    let now = tokio::time::Instant::now();
    let mut state = stats.rejections.lock().unwrap_or_else(PoisonError::into_inner);
    for rejection in rejections {
        let mut label = rejection_label(&rejection.reason).to_owned();
        if !state.counts.contains_key(&label) && state.counts.len() >= MAX_REJECTION_REASONS {
            label = "other".into();
        }
        *state.counts.entry(label.clone()).or_default() += u64::from(rejection.events);
        if let Some((events, batches)) = state.log.record(&label, u64::from(rejection.events), now) {
            // The detail is the server's text: one line, bounded.
            let detail: String =
                rejection.detail.chars().take(512).map(|c| if c.is_control() { ' ' } else { c }).collect();
            warn!(
                reason = %label, events, batches, seq = ack.seq, %detail,
                "The server rejected events (not stored); counted in fleetban_agent_rejected_events_total{{reason}}, \
                 logged again at most every {} s.",
                REJECTION_LOG_INTERVAL.as_secs()
            );
        }
    }
}

/// The callback that receives the fleet's allowlist ranges.
pub type OnAllowlist = Box<dyn Fn(&[IpNet]) + Send + Sync>;

/// The callback told of blocks an operator revoked: `(range, revoked at,
/// unix ms by the agent's clock)` (detection forgets the evidence before it).
pub type OnRevoked = Box<dyn Fn(&[(IpNet, i64)]) + Send + Sync>;

/// The callback that receives the address of every connection the uplink
/// opens to the server (so that it is never blocked).
pub type OnServerAddress = Arc<dyn Fn(IpAddr) + Send + Sync>;

/// What the uplink works with.
pub struct UplinkContext {
    /// Server address and TLS.
    pub server: ServerOptions,
    /// The identity.
    pub credentials: Credentials,
    /// Hostname sent in `Hello`.
    pub hostname: String,
    /// Own addresses sent in `Hello`.
    pub addresses: Vec<IpAddr>,
    /// The spool to send from and ack into.
    pub spool: SharedSpool,
    /// The highest durable seq of the spool.
    pub durable: watch::Receiver<u64>,
    /// The firewall thread.
    pub firewall: FirewallHandle,
    /// Local blocks to report.
    pub local_blocks: mpsc::Receiver<LocalBlock>,
    /// Called with every `Policy` the server pushes.
    pub on_policy: Box<dyn Fn(&Policy) + Send + Sync>,
    /// Called with the ranges of every `Allowlist` the server pushes (the
    /// fleet's allowlist, replacing the previous one).
    pub on_allowlist: OnAllowlist,
    /// Called with the blocks an operator revoked, before the firewall drops
    /// the local blocks they cover.
    pub on_revoked: OnRevoked,
    /// Called with the peer address of every connection to the server,
    /// before anything is sent on it.
    pub on_server_address: OnServerAddress,
    /// Unacked batches in flight, at most.
    pub window: usize,
    /// Counters.
    pub stats: Arc<UplinkStats>,
}

impl std::fmt::Debug for UplinkContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UplinkContext").field("server", &self.server.server).field("window", &self.window).finish()
    }
}

/// A TCP connector that reports the peer address of every connection it
/// opens (tonic adds TLS on top for `https://`, verified against the URL's
/// name): the address of the live connection, whatever the server's name
/// resolved to. With `target` it dials that address only (the failover ring
/// chose it); without, every address the URL's name resolves to in turn.
fn connector(
    on_peer: OnServerAddress,
    target: Option<SocketAddr>,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>>> + Send,
> + Send
+ 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let on_peer = on_peer.clone();
        async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host} has no address"));
            let addrs: Vec<SocketAddr> = match target {
                Some(addr) => vec![addr],
                None => tokio::net::lookup_host((host.as_str(), port)).await?.collect(),
            };
            for addr in addrs {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        on_peer(stream.peer_addr()?.ip().to_canonical());
                        return Ok(hyper_util::rt::TokioIo::new(stream));
                    }
                    Err(error) => last = error,
                }
            }
            Err(last)
        }
    })
}

/// The delay of backoff step `attempt` (0-based): exponential from 0.5 s,
/// capped at 30 s, jittered down to half ([`Backoff::DEFAULT`]).
pub fn backoff(attempt: u32) -> Duration {
    Backoff::DEFAULT.delay(attempt)
}

/// The delay before reconnect attempt `attempt` (0-based) after the server
/// refused the agent's credentials: they will not start working by
/// themselves, so from 1 min doubling to [`AUTH_BACKOFF_CAP`], jittered down
/// by up to a quarter.
pub fn auth_backoff(attempt: u32) -> Duration {
    let base_ms = 60_000u64.saturating_mul(1u64 << attempt.min(16)).min(AUTH_BACKOFF_CAP.as_millis() as u64);
    Duration::from_millis(base_ms - fastrand::u64(0..=base_ms / 4))
}

/// Longest wait between two tries with refused credentials.
pub const AUTH_BACKOFF_CAP: Duration = Duration::from_secs(3600);

/// Which failed sessions are logged: a new error at once; the same error
/// again only at each backoff step (attempts 1, 2, 4, 8, ...), and at least
/// every 20th attempt once the backoff is at its cap, with the count of
/// the retries in between.
#[derive(Debug, Default)]
pub struct ReconnectLog {
    last: Option<String>,
    suppressed: u64,
}

impl ReconnectLog {
    /// Whether to log `error` on reconnect attempt `attempt` (0-based,
    /// counted since the last good session); returns the retries not logged
    /// since the previous line.
    pub fn due(&mut self, error: &str, attempt: u32) -> Option<u64> {
        let repeated = self.last.as_deref() == Some(error);
        if repeated && !(attempt.is_power_of_two() || attempt.is_multiple_of(20)) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(error.to_owned());
        Some(std::mem::take(&mut self.suppressed))
    }

    /// A session got its `Welcome`: the next error is new.
    pub fn reset(&mut self) {
        *self = ReconnectLog::default();
    }
}

/// Runs sessions with the one server of `ctx.server` until `shutdown`
/// resolves (every address its name resolves to is a server of the ring).
pub async fn run(ctx: UplinkContext, shutdown: impl Future<Output = ()>) {
    let servers = Servers::new(vec![ctx.server.server.clone()], &ctx.credentials.agent_id);
    run_with(ctx, servers, shutdown).await;
}

/// Runs sessions until `shutdown` resolves, each with the next server of
/// `servers` (`ctx.server` gives the TLS settings of all of them).
pub async fn run_with(mut ctx: UplinkContext, mut servers: Servers, shutdown: impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stats = ctx.stats.clone();
    tokio::pin!(shutdown);
    let mut attempt = 0u32;
    let mut schedule = Reconnect::new(Backoff::DEFAULT);
    let mut log = ReconnectLog::default();
    loop {
        let mut welcomed = false;
        let target = servers.next().await;
        let result = {
            let session = session(&mut ctx, &target, stop_rx.clone(), &mut welcomed);
            tokio::pin!(session);
            tokio::select! {
                result = &mut session => result,
                () = &mut shutdown => {
                    let _ = stop_tx.send(true);
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT + Duration::from_secs(1), session).await;
                    stats.connected.store(false, Ordering::Relaxed);
                    info!("Uplink stopped.");
                    return;
                }
            }
        };
        ctx.stats.connected.store(false, Ordering::Relaxed);
        if welcomed {
            attempt = 0;
            log.reset();
        }
        let outcome = if welcomed { Outcome::Welcomed } else { Outcome::Failed };
        let delay = match &result {
            Err(UplinkError::Resync) => {
                servers.retry(&target);
                Duration::ZERO
            }
            Err(error) if error.is_auth_failure() => {
                // Every replica shares the database: the next one refuses
                // the credentials too.
                schedule.next_delay(outcome, servers.pass_len());
                auth_backoff(attempt)
            }
            _ => schedule.next_delay(outcome, servers.pass_len()),
        };
        match result {
            Ok(()) => info!(server = %target, "Uplink session closed by the server; reconnecting."),
            Err(error) => {
                let text = error.to_string();
                if let Some(retries) = log.due(&text, attempt) {
                    let retry_in_secs = delay.as_secs_f64();
                    let options = ServerOptions { server: target.url.clone(), ..ctx.server.clone() };
                    let hint = error.hint(&options, false).unwrap_or_default();
                    if error.is_auth_failure() {
                        tracing::error!(
                            error = %text, server = %target, %hint, retry_in_secs, retries_not_logged = retries,
                            "The server refused this agent's credentials; retrying with a long backoff."
                        );
                    } else {
                        warn!(
                            error = %text, server = %target, %hint, retry_in_secs, retries_not_logged = retries,
                            "Uplink session ended; reconnecting."
                        );
                    }
                } else {
                    debug!(error = %text, server = %target, attempt, "Uplink session ended again; reconnecting.");
                }
            }
        }
        attempt = attempt.saturating_add(1);
        ctx.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut shutdown => {
                info!("Uplink stopped.");
                return;
            }
        }
    }
}

async fn spool_call<T: Send + 'static>(
    spool: &SharedSpool,
    call: impl FnOnce(&mut crate::spool::Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, UplinkError> {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || call(&mut spool.lock().unwrap_or_else(PoisonError::into_inner)))
        .await
        .map_err(|_| UplinkError::Protocol("spool task panicked".into()))?
        .map_err(UplinkError::from)
}

async fn send(tx: &mpsc::Sender<AgentFrame>, frame: Frame) -> Result<(), UplinkError> {
    tx.send(AgentFrame { frame: Some(frame) }).await.map_err(|_| UplinkError::Protocol("stream closed".into()))
}

async fn session(
    ctx: &mut UplinkContext,
    target: &Target,
    mut stop: watch::Receiver<bool>,
    welcomed: &mut bool,
) -> Result<(), UplinkError> {
    let options = ServerOptions { server: target.url.clone(), ..ctx.server.clone() };
    let Some(addr) = target.addr else {
        return Err(UplinkError::Connect {
            cause: format!("{} does not resolve to an address", target.url),
            refused: false,
            tls: None,
        });
    };
    let channel: Channel =
        options.endpoint()?.connect_with_connector(connector(ctx.on_server_address.clone(), Some(addr))).await?;
    let (tx, rx) = mpsc::channel::<AgentFrame>(ctx.window + 16);
    let (next_seq, acked_seq) = spool_call(&ctx.spool, |spool| Ok((spool.next_seq(), spool.acked_seq()))).await?;
    let hello = Hello {
        agent_id: ctx.credentials.agent_id.clone(),
        version: crate::VERSION.to_owned(),
        hostname: ctx.hostname.clone(),
        addresses: ctx.addresses.iter().map(|ip| IpAddress::from(*ip)).collect(),
        blocklist_version: ctx.firewall.version(),
        next_seq,
    };
    send(&tx, Frame::Hello(hello)).await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let metadata = request.metadata_mut();
    let bad = |what: &str| UplinkError::Config { server: target.url.clone(), message: format!("invalid {what}") };
    metadata.insert(AGENT_ID_HEADER, ctx.credentials.agent_id.parse().map_err(|_| bad("agent id"))?);
    metadata.insert(AGENT_SECRET_HEADER, ctx.credentials.agent_secret.parse().map_err(|_| bad("agent secret"))?);
    let mut inbound = AgentServiceClient::new(channel)
        .max_decoding_message_size(MAX_DECODE_BYTES)
        .connect(request)
        .await?
        .into_inner();
    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(UplinkError::Protocol("no Welcome in time".into())),
        Ok(Err(status)) => return Err(status.into()),
        Ok(Ok(None)) => return Err(UplinkError::Protocol("stream closed before Welcome".into())),
        Ok(Ok(Some(frame))) => match frame.frame {
            Some(In::Welcome(welcome)) => welcome,
            other => return Err(UplinkError::Protocol(format!("expected Welcome, got {other:?}"))),
        },
    };
    *welcomed = true;
    let stats = ctx.stats.clone();
    *stats.server.lock().unwrap_or_else(PoisonError::into_inner) = target.to_string();
    stats.connected.store(true, Ordering::Relaxed);
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stats.connected_since_ms.store(crate::firewall::now_ms(), Ordering::Relaxed);
    info!(
        server = %target, server_version = %welcome.server_version,
        last_acked_seq = welcome.last_acked_seq, blocklist_version = ctx.firewall.version(), "Uplink session open."
    );
    if welcome.last_acked_seq > acked_seq {
        let seq = welcome.last_acked_seq;
        spool_call(&ctx.spool, move |spool| spool.ack(seq)).await?;
        stats.last_ack_seq.fetch_max(seq, Ordering::Relaxed);
    }
    let mut sent = acked_seq.max(welcome.last_acked_seq);
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    let loss = spool_call(&ctx.spool, |spool| Ok(spool.unreported_loss())).await?;
    if loss != Loss::default() {
        send(&tx, Frame::SpoolLoss(SpoolLoss { dropped_events: loss.events, dropped_batches: loss.batches })).await?;
        spool_call(&ctx.spool, move |spool| spool.loss_reported(loss)).await?;
    }
    let mut heartbeat = tokio::time::interval(Duration::from_secs(u64::from(welcome.heartbeat_secs.max(1))));
    heartbeat.reset();
    let mut stopping = *stop.borrow();
    let drain_deadline = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(drain_deadline);
    // The latest `Applied` not yet reported, and when it goes out.
    let mut applied: Option<Applied> = None;
    let applied_due = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(applied_due);
    loop {
        if stopping && in_flight.is_empty() {
            return Ok(());
        }
        // Fill the window from the spool.
        let durable = *ctx.durable.borrow_and_update();
        if !stopping && in_flight.len() < ctx.window && durable > sent {
            let room = ctx.window - in_flight.len();
            let after = sent;
            let batches: Vec<EventBatch> = spool_call(&ctx.spool, move |spool| spool.read_batches(after, room)).await?;
            for batch in batches {
                sent = batch.seq;
                in_flight.push_back(batch.seq);
                debug!(seq = batch.seq, events = batch.events.len(), "Sending batch.");
                send(&tx, Frame::Batch(batch)).await?;
                stats.batches_sent.fetch_add(1, Ordering::Relaxed);
            }
            if sent < durable && in_flight.len() < ctx.window {
                // The rest of the durable range is position records only.
                sent = durable;
            }
        }
        let room = !stopping && in_flight.len() < ctx.window;
        tokio::select! {
            biased;
            // Due once, then disarmed: never starved by a busy stream.
            () = &mut applied_due, if applied.is_some() => {
                if let Some(report) = applied.take() {
                    send(&tx, Frame::Applied(report)).await?;
                }
            }
            frame = inbound.message() => {
                let frame = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return if stopping { Ok(()) } else { Err(UplinkError::Protocol("server closed the stream".into())) },
                    Err(status) => return Err(status.into()),
                };
                if let Some(report) = handle_frame(ctx, frame, &mut in_flight).await?
                    && applied.replace(report).is_none()
                {
                    applied_due.as_mut().reset(tokio::time::Instant::now() + applied_delay());
                }
            }
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
            }
            () = &mut drain_deadline, if stopping => {
                warn!(in_flight = in_flight.len(), "Shutdown: batches still unacked; they are resent at the next start.");
                return Ok(());
            }
            changed = ctx.durable.changed(), if room => {
                if changed.is_err() {
                    stopping = true;
                    drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
            }
            block = ctx.local_blocks.recv(), if !stopping => {
                if let Some(block) = block {
                    send(&tx, Frame::LocalBlock(block)).await?;
                    stats.local_blocks_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = heartbeat.tick() => {
                let pending = spool_call(&ctx.spool, |spool| Ok(spool.status().pending_batches)).await?;
                send(&tx, Frame::Heartbeat(Heartbeat {
                    blocklist_version: ctx.firewall.version(),
                    firewall_entries: ctx.firewall.entries(),
                    pending_batches: pending,
                })).await?;
            }
        }
    }
}

/// Handles one frame of the server; returns what to report as applied when
/// the frame changed the firewall's blocklist.
async fn handle_frame(
    ctx: &mut UplinkContext,
    frame: fleetban_proto::v1::ServerFrame,
    in_flight: &mut VecDeque<u64>,
) -> Result<Option<Applied>, UplinkError> {
    let stats = ctx.stats.clone();
    match frame.frame {
        Some(In::Ack(ack)) => {
            let seq = ack.seq;
            note_rejections(&ack, &stats);
            spool_call(&ctx.spool, move |spool| spool.ack(seq)).await?;
            in_flight.retain(|s| *s > seq);
            stats.last_ack_seq.fetch_max(seq, Ordering::Relaxed);
        }
        Some(In::Nack(nack)) => {
            warn!(seq = nack.seq, reason = %nack.reason, "Server refused a frame.");
            if nack.seq > 0 && in_flight.front() == Some(&nack.seq) {
                stats.batches_nacked.fetch_add(1, Ordering::Relaxed);
                let seq = nack.seq;
                spool_call(&ctx.spool, move |spool| spool.ack(seq)).await?;
                in_flight.retain(|s| *s > seq);
            }
        }
        Some(In::Snapshot(snapshot)) => {
            let applied = ctx.firewall.snapshot(snapshot).await.map_err(UplinkError::Firewall)?;
            stats.blocklists_applied.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(applied));
        }
        Some(In::Delta(delta)) => match ctx.firewall.delta(delta).await {
            DeltaReply::Applied(applied) => {
                stats.blocklists_applied.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(applied));
            }
            DeltaReply::Stale => {}
            DeltaReply::Gap => return Err(UplinkError::Resync),
            DeltaReply::Failed(message) => return Err(UplinkError::Firewall(message)),
        },
        Some(In::Policy(policy)) => {
            info!(?policy, "Server pushed a detection policy.");
            (ctx.on_policy)(&policy);
        }
        Some(In::Allowlist(list)) => {
            let total = list.ranges.len();
            let ranges: Vec<IpNet> = list.ranges.iter().filter_map(|c| IpNet::try_from(c).ok()).collect();
            if ranges.len() < total {
                warn!(invalid = total - ranges.len(), "Ignoring invalid ranges in the fleet allowlist.");
            }
            info!(ranges = ranges.len(), "Server pushed the fleet allowlist.");
            (ctx.on_allowlist)(&ranges);
        }
        Some(In::Revocations(list)) => {
            let now = crate::firewall::now_ms();
            let revoked = revocations(&list, now);
            if revoked.len() < list.revocations.len() {
                warn!(invalid = list.revocations.len() - revoked.len(), "Ignoring invalid revoked ranges.");
            }
            if !revoked.is_empty() {
                info!(revoked = revoked.len(), "Server announced blocks an operator revoked.");
                (ctx.on_revoked)(&revoked);
                if !ctx.firewall.send(Request::Revoke(revoked)).await {
                    return Err(UplinkError::Firewall("the firewall thread is gone".into()));
                }
            }
        }
        Some(In::Welcome(_)) => warn!("Ignoring a second Welcome."),
        None => warn!("Ignoring an empty server frame."),
    }
    Ok(None)
}

/// The ranges of `list` with when each was revoked by the agent's clock
/// (`now_ms` minus the age the server gave); invalid ranges are left out.
pub fn revocations(list: &Revocations, now_ms: i64) -> Vec<(IpNet, i64)> {
    list.revocations
        .iter()
        .filter_map(|r| {
            let net = IpNet::try_from(r.cidr.as_ref()?).ok()?.trunc();
            let age = i64::try_from(r.age_ms).unwrap_or(i64::MAX);
            Some((net, now_ms.saturating_sub(age)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_carry_their_format_and_older_and_newer_files_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials { agent_id: "a1".into(), agent_secret: "s1".into() };
        credentials.store(dir.path()).unwrap();
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Credentials::path(dir.path())).unwrap()).unwrap();
        assert_eq!(stored["format"], 1);
        assert_eq!(Credentials::load(dir.path()).unwrap(), credentials);
        // A file of an older agent (no format) loads.
        std::fs::write(Credentials::path(dir.path()), br#"{"agent_id": "a2", "agent_secret": "s2"}"#).unwrap();
        assert_eq!(Credentials::load(dir.path()).unwrap().agent_id, "a2");
        // A newer format is refused with what to do, not misread.
        std::fs::write(Credentials::path(dir.path()), br#"{"format": 2, "agent_id": "a3", "agent_secret": "s3"}"#)
            .unwrap();
        let error = Credentials::load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("format 2") && error.contains("upgrade the agent"), "{error}");
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        for attempt in 0..40 {
            let delay = backoff(attempt);
            let base = (500u64 << attempt.min(16)).min(30_000);
            assert!(
                delay >= Duration::from_millis(base / 2) && delay <= Duration::from_millis(base),
                "{attempt}: {delay:?}"
            );
        }
        assert!(backoff(30) <= Duration::from_secs(30));
        assert!(backoff(30) >= Duration::from_secs(15));
    }

    #[test]
    fn rejections_are_counted_per_reason_and_logged_once_per_interval() {
        use fleetban_proto::v1::{Ack, Rejection};
        let stats = UplinkStats::default();
        let too_old = |events| Ack {
            seq: 1,
            rejected_events: events + 1,
            rejections: vec![
                Rejection { reason: "too_old".into(), events, detail: "max_event_age_days".into() },
                Rejection { reason: "Bad Label!".into(), events: 1, detail: String::new() },
            ],
        };
        for _ in 0..116 {
            note_rejections(&too_old(50), &stats);
        }
        // An older server: a count without reasons.
        note_rejections(&Ack { seq: 2, rejected_events: 3, rejections: Vec::new() }, &stats);
        let counts = stats.rejected();
        assert_eq!(counts.get("too_old"), Some(&5800));
        assert_eq!(counts.get("other"), Some(&116));
        assert_eq!(counts.get("unspecified"), Some(&3));

        let mut log = RejectionLog::default();
        let start = tokio::time::Instant::now();
        assert_eq!(log.record("too_old", 50, start), Some((50, 1)), "the first is logged at once");
        for i in 1..116 {
            assert_eq!(log.record("too_old", 50, start + Duration::from_secs(i)), None);
        }
        assert_eq!(log.record("in_future", 2, start), Some((2, 1)), "each reason has its own line");
        let later = start + REJECTION_LOG_INTERVAL;
        assert_eq!(log.record("too_old", 50, later), Some((116 * 50, 116)), "then the totals since");
    }

    #[test]
    fn refused_credentials_back_off_long_and_repeats_are_logged_per_step() {
        assert!(auth_backoff(0) >= Duration::from_secs(45) && auth_backoff(0) <= Duration::from_secs(60));
        assert!(auth_backoff(20) <= AUTH_BACKOFF_CAP && auth_backoff(20) >= AUTH_BACKOFF_CAP * 3 / 4);
        let refused = UplinkError::from(tonic::Status::unauthenticated("unknown agent or wrong secret"));
        assert!(refused.is_auth_failure());
        assert!(!UplinkError::Protocol("x".into()).is_auth_failure());
        let server = ServerOptions { server: "https://fleet.example.net:50051".into(), ca_file: None, insecure: false };
        let hint = refused.hint(&server, false).unwrap();
        assert!(hint.contains("fleetban-agent enroll --server https://fleet.example.net:50051"), "{hint}");
        assert!(refused.hint(&server, true).unwrap().contains("enroll-token create"));

        let mut log = ReconnectLog::default();
        let text = refused.to_string();
        let logged: Vec<u32> = (0..100).filter(|attempt| log.due(&text, *attempt).is_some()).collect();
        assert_eq!(logged, [0, 1, 2, 4, 8, 16, 20, 32, 40, 60, 64, 80]);
        // Attempts 81 to 99 repeated the error silently.
        assert_eq!(log.due("another error", 100), Some(19), "a new error is logged at once, with the count");
        assert_eq!(log.due(&text, 82), Some(0));
        assert_eq!(log.due(&text, 83), None);
        assert_eq!(log.due(&text, 84), None);
        assert_eq!(log.due(&text, 100), Some(2), "with the retries in between");
    }

    #[test]
    fn credentials_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let credentials = Credentials { agent_id: "id".into(), agent_secret: "s3cret".into() };
        let path = credentials.store(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Credentials::load(dir.path()).unwrap(), credentials);
        assert!(!format!("{credentials:?}").contains("s3cret"));
        assert!(Credentials::load(&dir.path().join("missing")).unwrap_err().to_string().contains("enroll"));
    }

    #[test]
    fn plaintext_only_for_loopback_or_insecure() {
        let options = |server: &str, insecure| ServerOptions { server: server.into(), ca_file: None, insecure };
        assert!(options("http://127.0.0.1:50051", false).endpoint().is_ok());
        assert!(options("http://[::1]:50051", false).endpoint().is_ok());
        assert!(options("http://192.0.2.1:50051", false).endpoint().is_err());
        assert!(options("http://192.0.2.1:50051", true).endpoint().is_ok());
        assert!(options("https://fleet.example.net:50051", false).endpoint().is_ok());
        let missing =
            ServerOptions { ca_file: Some("/nonexistent/ca.pem".into()), ..options("https://a.example:1", false) };
        assert!(missing.endpoint().unwrap_err().to_string().contains("ca_file"));
    }
}
