//! Admission of agent calls on the gRPC listener, in front of
//! [`crate::session`]: the throttle of failed authentication and the marking
//! of authenticated connections.
//!
//! [`AgentGuardLayer`] wraps the `AgentService` router. For `Enroll` and
//! `Connect` it
//!
//! - answers `RESOURCE_EXHAUSTED` at once, without a database lookup or a log
//!   line, when the caller's source (see [`crate::conn::source_key`]) has
//!   spent its [`AuthThrottle`] bucket of failed calls
//!   (`fleetban_agent_auth_throttled_total`);
//! - charges the bucket when the call ends `UNAUTHENTICATED` (bad token, bad
//!   or revoked credentials), read from the response's `grpc-status`;
//! - marks the connection authenticated in the gRPC [`Gate`] when a `Connect`
//!   is accepted, which lifts the connection's handshake deadline and frees
//!   its place among the unauthenticated connections.
//!
//! The bucket holds `auth_failure_burst` failures and regains
//! `auth_failures_per_minute`; at most [`MAX_TRACKED_SOURCES`] sources are
//! tracked, and a full bucket is dropped before a new source is refused
//! tracking, so memory stays bounded whatever the number of attackers.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};
use tracing::warn;

use crate::conn::{Gate, source_key};

/// `Enroll` or `Connect` refused by the throttle.
pub const AUTH_THROTTLED: &str = "fleetban_agent_auth_throttled_total";
/// Most sources whose failures are tracked at once.
pub const MAX_TRACKED_SOURCES: usize = 65_536;
/// How often a full table may be swept for buckets that refilled.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

const ENROLL_PATH: &str = "/fleetban.v1.AgentService/Enroll";
const CONNECT_PATH: &str = "/fleetban.v1.AgentService/Connect";

/// A token bucket of failures.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug, Default)]
struct Buckets {
    map: HashMap<IpAddr, Bucket>,
    last_sweep: Option<Instant>,
}

/// Failed authentication per source, as token buckets.
#[derive(Debug)]
pub struct AuthThrottle {
    burst: f64,
    per_sec: f64,
    buckets: Mutex<Buckets>,
}

impl AuthThrottle {
    /// `burst` failures at once, `per_minute` regained each minute.
    pub fn new(burst: u32, per_minute: u32) -> Self {
        AuthThrottle {
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            buckets: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let gained = now.saturating_duration_since(bucket.updated).as_secs_f64() * self.per_sec;
        bucket.tokens = (bucket.tokens + gained).min(self.burst);
        bucket.updated = now;
    }

    /// Whether a call from `ip` may try to authenticate now.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allows_at(ip, Instant::now())
    }

    fn allows_at(&self, ip: IpAddr, now: Instant) -> bool {
        let mut buckets = self.lock();
        match buckets.map.get_mut(&source_key(ip)) {
            None => true,
            Some(bucket) => {
                self.refill(bucket, now);
                bucket.tokens >= 1.0
            }
        }
    }

    /// Charges a failed call from `ip`; true when this failure spent the
    /// source's last token (it is throttled from now on).
    pub fn failed(&self, ip: IpAddr) -> bool {
        self.failed_at(ip, Instant::now())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> bool {
        let key = source_key(ip);
        let mut buckets = self.lock();
        if !buckets.map.contains_key(&key) && buckets.map.len() >= MAX_TRACKED_SOURCES {
            let sweep_due = buckets.last_sweep.is_none_or(|last| now.duration_since(last) >= SWEEP_INTERVAL);
            if sweep_due {
                buckets.last_sweep = Some(now);
                let (burst, per_sec) = (self.burst, self.per_sec);
                buckets
                    .map
                    .retain(|_, b| b.tokens + now.saturating_duration_since(b.updated).as_secs_f64() * per_sec < burst);
            }
            if buckets.map.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let bucket = buckets.map.entry(key).or_insert(Bucket { tokens: self.burst, updated: now });
        self.refill(bucket, now);
        let had = bucket.tokens >= 1.0;
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
        had && bucket.tokens < 1.0
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().map.len()
    }
}

/// The peer of a request, from the connection info tonic attaches.
fn peer<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.get_ref().remote_addr()))
}

/// The layer; see the module documentation.
#[derive(Debug, Clone)]
pub struct AgentGuardLayer {
    throttle: Arc<AuthThrottle>,
    gate: Option<Arc<Gate>>,
}

impl AgentGuardLayer {
    /// Throttles with `throttle`; marks authenticated connections in `gate`.
    pub fn new(throttle: Arc<AuthThrottle>, gate: Option<Arc<Gate>>) -> Self {
        AgentGuardLayer { throttle, gate }
    }
}

impl<S> Layer<S> for AgentGuardLayer {
    type Service = AgentGuard<S>;

    fn layer(&self, inner: S) -> AgentGuard<S> {
        AgentGuard { inner, throttle: self.throttle.clone(), gate: self.gate.clone() }
    }
}

/// The service of [`AgentGuardLayer`].
#[derive(Debug, Clone)]
pub struct AgentGuard<S> {
    inner: S,
    throttle: Arc<AuthThrottle>,
    gate: Option<Arc<Gate>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Enroll,
    Connect,
    Other,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AgentGuard<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = match request.uri().path() {
            ENROLL_PATH => Call::Enroll,
            CONNECT_PATH => Call::Connect,
            _ => Call::Other,
        };
        let peer = peer(&request);
        if call != Call::Other
            && let Some(peer) = peer
            && !self.throttle.allows(peer.ip())
        {
            metrics::counter!(AUTH_THROTTLED).increment(1);
            let status = Status::resource_exhausted("too many failed authentication attempts from this address");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        // The clone that was made ready is the one called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let throttle = self.throttle.clone();
        let gate = self.gate.clone();
        Box::pin(async move {
            let response = inner.call(request).await?;
            if call == Call::Other {
                return Ok(response);
            }
            let Some(peer) = peer else {
                return Ok(response);
            };
            // A failed call answers with its status in the headers
            // (trailers-only); an accepted stream has none yet.
            let status = response.headers().get("grpc-status").map(|v| v.as_bytes());
            let unauthenticated = status == Some(b"16".as_slice());
            if unauthenticated && throttle.failed(peer.ip()) {
                warn!(
                    source = %source_key(peer.ip()),
                    "Throttling agent authentication from a source after repeated failures."
                );
            } else if status.is_none()
                && call == Call::Connect
                && let Some(gate) = &gate
            {
                gate.authenticated(peer);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_throttled_after_its_burst_and_regains_slowly() {
        let throttle = AuthThrottle::new(3, 6);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let attacker: IpAddr = "192.0.2.66".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(!throttle.failed_at(attacker, t0));
        assert!(!throttle.failed_at(attacker, t0));
        assert!(throttle.allows_at(attacker, t0));
        assert!(throttle.failed_at(attacker, t0), "the third failure spends the burst");
        assert!(!throttle.allows_at(attacker, t0));
        assert!(throttle.allows_at(other, t0), "other sources are unaffected");
        // Mapped and plain spellings are one source; so is one IPv6 /64.
        assert!(!throttle.allows_at("::ffff:192.0.2.66".parse().unwrap(), t0));
        for _ in 0..3 {
            throttle.failed_at("2001:db8:1:2::1".parse().unwrap(), t0);
        }
        assert!(!throttle.allows_at("2001:db8:1:2:ffff::9".parse().unwrap(), t0));
        assert!(throttle.allows_at("2001:db8:1:3::1".parse().unwrap(), t0));
        assert!(!throttle.allows_at(attacker, at(9)), "6 per minute: one token takes 10 s");
        assert!(throttle.allows_at(attacker, at(11)));
        assert!(throttle.failed_at(attacker, at(11)));
        assert!(!throttle.allows_at(attacker, at(11)));
    }

    #[test]
    fn memory_is_bounded_and_refilled_sources_are_dropped_first() {
        let throttle = AuthThrottle::new(2, 60);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_SOURCES as u32 {
            throttle.failed_at(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert_eq!(throttle.tracked(), MAX_TRACKED_SOURCES);
        // A new source while the table is full of unrefilled buckets: not
        // tracked, nothing grows.
        let late: IpAddr = "203.0.113.9".parse().unwrap();
        throttle.failed_at(late, t0);
        assert_eq!(throttle.tracked(), MAX_TRACKED_SOURCES);
        // Once they refilled, the sweep drops them and the new one is tracked.
        throttle.failed_at(late, t0 + Duration::from_secs(5));
        assert_eq!(throttle.tracked(), 1);
    }
}
