//! Connection discipline of both listeners: what one client may hold of the
//! server before it has proven anything.
//!
//! A [`GatedListener`] wraps a `TcpListener` and a [`Gate`]. At accept the
//! gate admits the connection or closes it at once (counted in
//! `fleetban_connections_refused_total`):
//!
//! - at most `max_connections` open in total, and `max_per_source` from one
//!   source (an IPv4 address, or an IPv6 /64, see [`source_key`]);
//! - on the gRPC listener, at most `max_unauthenticated` (and
//!   `max_unauthenticated_per_source`) connections that do not carry an
//!   authenticated agent session yet. [`crate::guard`] marks a connection
//!   authenticated ([`Gate::authenticated`]) when a `Connect` on it is
//!   accepted; from then on it counts only against the totals, so idle
//!   strangers fill their own pool and never the room of enrolled agents.
//!
//! Every admitted connection is a [`GatedStream`], which enforces deadlines
//! in its own reads and writes (so an idle peer is closed even though nothing
//! polls it but the server's wait for data):
//!
//! - gRPC: the connection must carry an authenticated session within
//!   `first_deadline` of accept (TLS handshake, HTTP/2 preface, `Connect`),
//!   else it fails with `TimedOut` and the server drops it;
//! - HTTP: the first byte must arrive within `first_deadline`, and a
//!   connection without traffic for `idle_timeout` is closed (hyper's own
//!   header-read timeout, set in [`crate::serve`], covers slow headers).
//!
//! Accepted sockets get TCP keepalive. An accept error (out of descriptors)
//! pauses accepting briefly instead of spinning; it never ends the server.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

use crate::proxyproto::ProxyError;

/// Open connections, by listener.
pub const CONNECTIONS_OPEN: &str = "fleetban_connections_open";
/// gRPC connections without an authenticated session.
pub const CONNECTIONS_UNAUTHENTICATED: &str = "fleetban_connections_unauthenticated";
/// Connections closed at accept, by listener and limit.
pub const CONNECTIONS_REFUSED: &str = "fleetban_connections_refused_total";
/// Connections closed for a deadline, by listener and phase.
pub const CONNECTIONS_TIMED_OUT: &str = "fleetban_connections_timed_out_total";

/// Pause after an accept error other than a failed handshake (descriptors
/// exhausted, out of memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Refused connections handled in one poll before yielding to other tasks.
const REFUSALS_PER_POLL: usize = 64;
/// At most one warning about refusals or accept errors per listener per
/// this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Which listener a gate guards; names metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Agents (gRPC): connections must authenticate.
    Grpc,
    /// Operators (HTTP): no authentication phase on the connection.
    Http,
}

impl Listener {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Grpc => "grpc",
            Listener::Http => "http",
        }
    }
}

/// What one gate enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateLimits {
    /// Most open connections.
    pub max_connections: usize,
    /// Most open connections from one source.
    pub max_per_source: usize,
    /// Most unauthenticated connections (gRPC only).
    pub max_unauthenticated: usize,
    /// Most unauthenticated connections from one source (gRPC only).
    pub max_unauthenticated_per_source: usize,
    /// gRPC: accept to authenticated session; HTTP: accept to first byte.
    pub first_deadline: Duration,
    /// HTTP: a connection without traffic this long is closed.
    pub idle_timeout: Option<Duration>,
    /// TCP keepalive idle time of accepted sockets.
    pub tcp_keepalive: Option<Duration>,
}

impl GateLimits {
    /// The gRPC listener's limits from `[limits]`.
    pub fn grpc(cfg: &crate::config::LimitsConfig) -> Self {
        GateLimits {
            max_connections: cfg.grpc_max_connections as usize,
            max_per_source: cfg.grpc_max_connections_per_source as usize,
            max_unauthenticated: cfg.grpc_max_unauthenticated as usize,
            max_unauthenticated_per_source: cfg.grpc_max_unauthenticated_per_source as usize,
            first_deadline: Duration::from_secs(cfg.grpc_auth_timeout_secs),
            idle_timeout: None,
            tcp_keepalive: keepalive(cfg.tcp_keepalive_secs),
        }
    }

    /// The HTTP listener's limits from `[limits]`.
    pub fn http(cfg: &crate::config::LimitsConfig) -> Self {
        GateLimits {
            max_connections: cfg.http_max_connections as usize,
            max_per_source: cfg.http_max_connections_per_source as usize,
            max_unauthenticated: cfg.http_max_connections as usize,
            max_unauthenticated_per_source: cfg.http_max_connections_per_source as usize,
            first_deadline: Duration::from_secs(cfg.http_header_timeout_secs),
            idle_timeout: Some(Duration::from_secs(cfg.http_idle_timeout_secs)),
            tcp_keepalive: keepalive(cfg.tcp_keepalive_secs),
        }
    }
}

fn keepalive(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// The unit per-source limits count: an IPv4 address (also when it arrives
/// IPv4-mapped), or the /64 of an IPv6 address, since one host holds a whole
/// /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match fleetban_proto::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` reached.
    MaxConnections,
    /// `max_per_source` reached for the source.
    PerSource,
    /// `max_unauthenticated` reached.
    Unauthenticated,
    /// `max_unauthenticated_per_source` reached for the source.
    UnauthenticatedPerSource,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerSource => "per_source",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::UnauthenticatedPerSource => "unauthenticated_per_source",
        }
    }
}

/// Counts of a gate, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounts {
    /// Open connections.
    pub open: usize,
    /// Open connections without an authenticated session.
    pub unauthenticated: usize,
}

#[derive(Debug, Default)]
struct SourceCount {
    open: usize,
    unauthenticated: usize,
}

#[derive(Debug, Default)]
struct State {
    open: usize,
    unauthenticated: usize,
    sources: HashMap<IpAddr, SourceCount>,
    /// Open connections by peer, so that a request can mark its connection.
    conns: HashMap<SocketAddr, Arc<AtomicBool>>,
    last_warning: Option<Instant>,
}

/// The admission state of one listener.
#[derive(Debug)]
pub struct Gate {
    listener: Listener,
    limits: GateLimits,
    state: Mutex<State>,
}

impl Gate {
    /// A gate for `listener` enforcing `limits`.
    pub fn new(listener: Listener, limits: GateLimits) -> Arc<Self> {
        Arc::new(Gate { listener, limits, state: Mutex::default() })
    }

    /// The limits in force.
    pub fn limits(&self) -> &GateLimits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a set of counters; a panic elsewhere cannot leave it
        // half-updated in a way worse than the poisoning itself.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Open and unauthenticated connections now.
    pub fn counts(&self) -> GateCounts {
        let state = self.lock();
        GateCounts { open: state.open, unauthenticated: state.unauthenticated }
    }

    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Admission, Refusal> {
        let key = source_key(peer.ip());
        let needs_auth = self.listener == Listener::Grpc;
        let mut state = self.lock();
        if state.open >= self.limits.max_connections {
            return Err(Refusal::MaxConnections);
        }
        let (open, unauthenticated) =
            state.sources.get(&key).map_or((0, 0), |count| (count.open, count.unauthenticated));
        if open >= self.limits.max_per_source {
            return Err(Refusal::PerSource);
        }
        if needs_auth {
            if state.unauthenticated >= self.limits.max_unauthenticated {
                return Err(Refusal::Unauthenticated);
            }
            if unauthenticated >= self.limits.max_unauthenticated_per_source {
                return Err(Refusal::UnauthenticatedPerSource);
            }
        }
        let authenticated = Arc::new(AtomicBool::new(!needs_auth));
        state.open += 1;
        let count = state.sources.entry(key).or_default();
        count.open += 1;
        if needs_auth {
            count.unauthenticated += 1;
            state.unauthenticated += 1;
        }
        state.conns.insert(peer, authenticated.clone());
        self.publish(&state);
        Ok(Admission { gate: self.clone(), peer, key, authenticated })
    }

    /// Marks the connection from `peer` as carrying an authenticated agent
    /// session: it no longer counts as unauthenticated and its deadline is
    /// lifted. Unknown peers (already closed) are ignored.
    pub fn authenticated(&self, peer: SocketAddr) {
        let mut state = self.lock();
        let Some(flag) = state.conns.get(&peer).cloned() else {
            return;
        };
        if flag.swap(true, Ordering::AcqRel) {
            return;
        }
        state.unauthenticated = state.unauthenticated.saturating_sub(1);
        if let Some(count) = state.sources.get_mut(&source_key(peer.ip())) {
            count.unauthenticated = count.unauthenticated.saturating_sub(1);
        }
        self.publish(&state);
    }

    fn release(&self, admission: &Admission) {
        let mut state = self.lock();
        state.open = state.open.saturating_sub(1);
        let was_unauthenticated = !admission.authenticated.load(Ordering::Acquire);
        if was_unauthenticated {
            state.unauthenticated = state.unauthenticated.saturating_sub(1);
        }
        if let Some(count) = state.sources.get_mut(&admission.key) {
            count.open = count.open.saturating_sub(1);
            if was_unauthenticated {
                count.unauthenticated = count.unauthenticated.saturating_sub(1);
            }
            if count.open == 0 {
                state.sources.remove(&admission.key);
            }
        }
        if state.conns.get(&admission.peer).is_some_and(|flag| Arc::ptr_eq(flag, &admission.authenticated)) {
            state.conns.remove(&admission.peer);
        }
        self.publish(&state);
    }

    /// Mirrors the counts into the metrics (under the lock, so in order).
    fn publish(&self, state: &State) {
        metrics::gauge!(CONNECTIONS_OPEN, "listener" => self.listener.as_str()).set(state.open as f64);
        if self.listener == Listener::Grpc {
            metrics::gauge!(CONNECTIONS_UNAUTHENTICATED).set(state.unauthenticated as f64);
        }
    }

    fn refused(&self, refusal: Refusal, peer: SocketAddr) {
        metrics::counter!(CONNECTIONS_REFUSED, "listener" => self.listener.as_str(), "reason" => refusal.as_str())
            .increment(1);
        if self.may_warn() {
            warn!(
                listener = self.listener.as_str(), limit = refusal.as_str(), source = %source_key(peer.ip()),
                "Refusing connections: a connection limit is reached (further refusals are only counted for a while)."
            );
        }
    }

    fn bad_proxy_header(&self, proxy: SocketAddr, error: &ProxyError) {
        metrics::counter!(CONNECTIONS_REFUSED, "listener" => self.listener.as_str(), "reason" => "proxy_header")
            .increment(1);
        if self.may_warn() {
            warn!(
                listener = self.listener.as_str(), balancer = %proxy.ip(), %error,
                "Closing a balancer connection without a valid PROXY header (further ones are only counted for a while)."
            );
        }
    }

    fn accept_failed(&self, error: &io::Error) {
        if self.may_warn() {
            warn!(%error, listener = self.listener.as_str(), "Cannot accept connections; pausing briefly.");
        }
    }

    fn may_warn(&self) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        if state.last_warning.is_some_and(|last| now.duration_since(last) < WARN_INTERVAL) {
            return false;
        }
        state.last_warning = Some(now);
        true
    }

    fn timed_out(&self, phase: &'static str) {
        metrics::counter!(CONNECTIONS_TIMED_OUT, "listener" => self.listener.as_str(), "phase" => phase).increment(1);
    }
}

/// One admitted connection's place in its gate; released on drop.
#[derive(Debug)]
struct Admission {
    gate: Arc<Gate>,
    peer: SocketAddr,
    key: IpAddr,
    authenticated: Arc<AtomicBool>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.gate.release(self);
    }
}

/// A listener that admits connections through a [`Gate`]. It is a stream of
/// connections for tonic and has [`GatedListener::accept`] for the HTTP loop.
#[derive(Debug)]
pub struct GatedListener {
    listener: TcpListener,
    gate: Arc<Gate>,
    backoff: Option<Pin<Box<Sleep>>>,
    /// Balancers whose connections start with a PROXY header.
    proxies: Vec<IpNet>,
    /// Connections of balancers whose PROXY header is being read.
    headers: FuturesUnordered<HeaderRead>,
}

/// A balancer's connection, its address and the client address its PROXY
/// header named.
type HeaderRead = Pin<Box<dyn Future<Output = (TcpStream, SocketAddr, Result<Option<SocketAddr>, ProxyError>)> + Send>>;

impl GatedListener {
    /// Admits connections of `listener` through `gate`.
    pub fn new(listener: TcpListener, gate: Arc<Gate>) -> Self {
        GatedListener { listener, gate, backoff: None, proxies: Vec::new(), headers: FuturesUnordered::new() }
    }

    /// Connections from `proxies` must start with a PROXY protocol header
    /// (see [`crate::proxyproto`]); the client address it carries is the one
    /// the gate counts and the stream reports.
    pub fn with_proxies(mut self, proxies: Vec<IpNet>) -> Self {
        self.proxies = proxies;
        self
    }

    fn is_balancer(&self, peer: SocketAddr) -> bool {
        let ip = fleetban_proto::canonical_ip(peer.ip());
        self.proxies.iter().any(|net| net.contains(&ip))
    }

    /// The gate.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The next admitted connection.
    pub async fn accept(&mut self) -> GatedStream {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<GatedStream> {
        let mut refused = 0;
        loop {
            if let Some(backoff) = &mut self.backoff {
                ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            // Balancer connections whose header is complete (or failed).
            while let Poll::Ready(Some((stream, proxy, header))) = self.headers.poll_next_unpin(cx) {
                match header {
                    Ok(client) => {
                        let peer = client.unwrap_or(proxy);
                        match self.gate.admit(peer) {
                            Ok(admission) => return Poll::Ready(GatedStream::new(stream, peer, admission)),
                            Err(refusal) => self.gate.refused(refusal, peer),
                        }
                    }
                    Err(error) => self.gate.bad_proxy_header(proxy, &error),
                }
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((mut stream, peer))) if self.is_balancer(peer) => {
                    // Headers in progress are bounded like unauthenticated
                    // connections; the deadline is the handshake's.
                    if self.headers.len() >= self.gate.limits.max_unauthenticated {
                        self.gate.refused(Refusal::Unauthenticated, peer);
                        continue;
                    }
                    let deadline = self.gate.limits.first_deadline;
                    self.headers.push(Box::pin(async move {
                        let header = crate::proxyproto::read_header(&mut stream, deadline).await;
                        (stream, peer, header)
                    }));
                }
                Poll::Ready(Ok((stream, peer))) => match self.gate.admit(peer) {
                    Ok(admission) => return Poll::Ready(GatedStream::new(stream, peer, admission)),
                    Err(refusal) => {
                        self.gate.refused(refusal, peer);
                        drop(stream);
                        refused += 1;
                        if refused >= REFUSALS_PER_POLL {
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                    }
                },
                Poll::Ready(Err(error)) => {
                    if !matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                    ) {
                        self.gate.accept_failed(&error);
                        self.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    }
                }
            }
        }
    }
}

impl tokio_stream::Stream for GatedListener {
    type Item = Result<GatedStream, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_accept(cx).map(|stream| Some(Ok(stream)))
    }
}

/// The idle deadline of a connection: reset lazily, only when it fires.
#[derive(Debug)]
struct Idle {
    timeout: Duration,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
}

/// An admitted connection: a `TcpStream` that enforces its deadlines in its
/// own reads and writes and releases its place in the gate when dropped.
#[derive(Debug)]
pub struct GatedStream {
    inner: TcpStream,
    local: Option<SocketAddr>,
    peer: SocketAddr,
    admission: Admission,
    /// gRPC: until authenticated; HTTP: until the first byte.
    first: Option<Pin<Box<Sleep>>>,
    received: bool,
    idle: Option<Idle>,
    /// A deadline passed: every later read and write fails.
    expired: bool,
}

impl GatedStream {
    fn new(inner: TcpStream, peer: SocketAddr, admission: Admission) -> Self {
        let limits = admission.gate.limits();
        let sock = socket2::SockRef::from(&inner);
        if let Some(idle) = limits.tcp_keepalive {
            let params = socket2::TcpKeepalive::new().with_time(idle).with_interval(idle / 4 + Duration::from_secs(1));
            // Best effort: a socket that refuses options still works.
            let _ = sock.set_tcp_keepalive(&params);
        }
        let _ = inner.set_nodelay(true);
        let now = Instant::now();
        let first = Some(Box::pin(tokio::time::sleep_until(now + limits.first_deadline)));
        let idle = limits.idle_timeout.map(|timeout| Idle {
            timeout,
            last: now,
            sleep: Box::pin(tokio::time::sleep_until(now + timeout)),
        });
        GatedStream {
            local: inner.local_addr().ok(),
            inner,
            peer,
            admission,
            first,
            received: false,
            idle,
            expired: false,
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Fails once a deadline has passed; registers the task for the next one.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(first) = &mut self.first {
            let met = match self.admission.gate.listener {
                Listener::Grpc => self.admission.authenticated.load(Ordering::Acquire),
                Listener::Http => self.received,
            };
            if met {
                self.first = None;
            } else if first.as_mut().poll(cx).is_ready() {
                let (phase, what) = match self.admission.gate.listener {
                    Listener::Grpc => ("handshake", "no authenticated agent session in time"),
                    Listener::Http => ("header", "no request in time"),
                };
                self.first = None;
                self.admission.gate.timed_out(phase);
                // Later polls fail too: the stream is dead.
                self.idle = None;
                self.expired = true;
                return Err(io::Error::new(io::ErrorKind::TimedOut, what));
            }
        }
        if self.expired {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connection deadline passed"));
        }
        if let Some(idle) = &mut self.idle
            && idle.sleep.as_mut().poll(cx).is_ready()
        {
            let due = idle.last + idle.timeout;
            if Instant::now() >= due {
                self.idle = None;
                self.expired = true;
                self.admission.gate.timed_out("idle");
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connection idle too long"));
            }
            idle.sleep.as_mut().reset(due);
            // Registers the waker for the new deadline (it is in the future).
            let _ = idle.sleep.as_mut().poll(cx);
        }
        Ok(())
    }

    fn activity(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.last = Instant::now();
        }
    }
}

/// The I/O methods first do the I/O (so that data already received counts
/// as received), then check the deadlines, which also registers the task
/// for the next one; a passed deadline fails the call whatever the I/O did.
impl AsyncRead for GatedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection deadline passed")));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.received = true;
            this.activity();
        }
        this.poll_deadlines(cx)?;
        result
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection deadline passed")));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity();
        }
        this.poll_deadlines(cx)?;
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection deadline passed")));
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity();
        }
        this.poll_deadlines(cx)?;
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.poll_deadlines(cx)?;
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for GatedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo { local_addr: self.local, remote_addr: Some(self.peer) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> GateLimits {
        GateLimits {
            max_connections: 4,
            max_per_source: 3,
            max_unauthenticated: 3,
            max_unauthenticated_per_source: 2,
            first_deadline: Duration::from_millis(300),
            idle_timeout: None,
            tcp_keepalive: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        let key = |s: &str| source_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
    }

    #[tokio::test]
    async fn caps_apply_per_source_and_to_unauthenticated_connections() {
        let gate = Gate::new(Listener::Grpc, limits());
        let a1: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let a2: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        let a3: SocketAddr = "192.0.2.1:1002".parse().unwrap();
        let first = gate.admit(a1).unwrap();
        let second = gate.admit(a2).unwrap();
        assert_eq!(gate.admit(a3).unwrap_err(), Refusal::UnauthenticatedPerSource);
        // An authenticated session frees its unauthenticated place.
        gate.authenticated(a1);
        assert_eq!(gate.counts(), GateCounts { open: 2, unauthenticated: 1 });
        let third = gate.admit(a3).unwrap();
        assert_eq!(gate.admit("192.0.2.1:1003".parse().unwrap()).unwrap_err(), Refusal::PerSource);
        let other = gate.admit("198.51.100.1:1".parse().unwrap()).unwrap();
        assert_eq!(gate.admit("203.0.113.1:1".parse().unwrap()).unwrap_err(), Refusal::MaxConnections);
        drop(other);
        // Three unauthenticated in total: second, third, and this one.
        let fourth = gate.admit("203.0.113.1:1".parse().unwrap()).unwrap();
        drop(fourth);
        drop(second);
        drop(third);
        drop(first);
        assert_eq!(gate.counts(), GateCounts::default());
        assert!(gate.lock().sources.is_empty() && gate.lock().conns.is_empty(), "no state is left behind");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_its_deadline_and_an_authenticated_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut gated = GatedListener::new(listener, Gate::new(Listener::Grpc, limits()));
        let gate = gated.gate().clone();
        let _idle = TcpStream::connect(addr).await.unwrap();
        let mut server_idle = gated.accept().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut server_auth = gated.accept().await;
        gate.authenticated(server_auth.peer());
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let error = server_idle.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2), "closed at the deadline");
        // The authenticated connection outlives the deadline and still works.
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.write_all(b"ping").await.unwrap();
        let n = server_auth.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        drop(server_idle);
        assert_eq!(gate.counts(), GateCounts { open: 1, unauthenticated: 0 });
    }

    #[tokio::test]
    async fn a_balancers_connections_are_counted_under_the_clients_its_proxy_header_names() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Loopback is the balancer; each connection names another client.
        let mut gated = GatedListener::new(listener, Gate::new(Listener::Grpc, limits()))
            .with_proxies(vec!["127.0.0.0/8".parse().unwrap()]);
        let gate = gated.gate().clone();
        let mut clients = Vec::new();
        for i in 0..3u8 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("PROXY TCP4 198.51.100.{i} 192.0.2.1 4000{i} 50051\r\nTLS").as_bytes()).await.unwrap();
            clients.push(c);
        }
        let mut peers = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut stream = gated.accept().await;
            let mut buf = [0u8; 3];
            stream.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"TLS", "the stream starts right after the header");
            peers.push(stream.peer());
            held.push(stream);
        }
        peers.sort();
        let want: Vec<SocketAddr> = (0..3u8).map(|i| format!("198.51.100.{i}:4000{i}").parse().unwrap()).collect();
        assert_eq!(peers, want);
        // Three clients at two unauthenticated connections per source would
        // not fit if they were counted as the balancer's one address.
        assert_eq!(gate.counts(), GateCounts { open: 3, unauthenticated: 3 });
        assert_eq!(gate.lock().sources.len(), 3);
        // A balancer connection without a header is closed, not admitted.
        let mut bare = TcpStream::connect(addr).await.unwrap();
        bare.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").await.unwrap();
        let admitted = tokio::time::timeout(Duration::from_millis(500), gated.accept()).await;
        assert!(admitted.is_err(), "a headerless balancer connection was admitted");
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(2), bare.read(&mut buf)).await.unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)), "the headerless connection is closed: {closed:?}");
    }

    #[tokio::test]
    async fn a_proxy_header_from_anyone_else_is_not_believed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut gated = GatedListener::new(listener, Gate::new(Listener::Grpc, limits()))
            .with_proxies(vec!["192.0.2.0/24".parse().unwrap()]);
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"PROXY TCP4 203.0.113.1 192.0.2.1 1 50051\r\n").await.unwrap();
        let mut stream = gated.accept().await;
        assert_eq!(stream.peer().ip(), c.local_addr().unwrap().ip(), "counted under its own address");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"PROXY", "the bytes are passed on untouched (and fail the TLS handshake)");
    }

    #[tokio::test]
    async fn http_connections_need_a_first_byte_and_close_when_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http_limits = GateLimits { idle_timeout: Some(Duration::from_millis(500)), ..limits() };
        let mut gated = GatedListener::new(listener, Gate::new(Listener::Http, http_limits));
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut silent = gated.accept().await;
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut talking = gated.accept().await;
        let mut buf = [0u8; 8];
        assert_eq!(silent.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        // Traffic keeps a connection alive past both deadlines...
        for _ in 0..4 {
            talker.write_all(b"x").await.unwrap();
            assert_eq!(talking.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // ...and silence closes it.
        let started = Instant::now();
        assert_eq!(talking.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
