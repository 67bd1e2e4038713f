//! Which server the uplink dials next, and how long it waits first.
//!
//! An agent is configured with one server URL (`server`) or several
//! (`servers`); a URL whose host name resolves to several addresses counts
//! as several servers. [`Servers`] walks them in a fixed ring: the name of
//! every URL is resolved again at each connection attempt (so a DNS change
//! takes effect without a restart), and every address is tried in turn. A
//! failed connect or a lost session moves on to the next address. The ring
//! starts at a place derived from the agent id ([`start_index`]), so a fleet
//! spreads over the replicas instead of all agents piling onto the first.
//! TLS is always verified against the URL's host name, never the address.
//!
//! [`Reconnect`] is the backoff across the ring: an attempt that fails while
//! untried addresses remain in the current pass waits only
//! [`Backoff::quick`] (a dead replica costs one quick retry); a whole pass
//! without a `Welcome` is one step of the jittered exponential backoff
//! ([`Backoff::delay`]: from 0.5 s doubling to 30 s, jittered down to half).
//! A session that got its `Welcome` resets the steps. Both are plain values
//! with no I/O, so the fleet simulator reuses them to model reconnect storms.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The jittered exponential backoff of reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first step's delay before jitter.
    pub initial: Duration,
    /// The largest delay before jitter.
    pub cap: Duration,
    /// The delay before the next address while the pass is not complete
    /// (jittered between half and all of it).
    pub quick: Duration,
}

impl Backoff {
    /// The agent's backoff: 0.5 s doubling to 30 s; 100 ms between the
    /// addresses of one pass.
    pub const DEFAULT: Backoff = Backoff {
        initial: Duration::from_millis(500),
        cap: Duration::from_secs(30),
        quick: Duration::from_millis(100),
    };

    /// The delay of step `step` (0-based): `initial * 2^step` capped at
    /// `cap`, jittered down to half by `jitter` in `[0, 1]` (1 = the full
    /// delay).
    pub fn delay_with(&self, step: u32, jitter: f64) -> Duration {
        let base = self.base(step);
        base / 2 + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// [`Backoff::delay_with`] with a random jitter.
    pub fn delay(&self, step: u32) -> Duration {
        self.delay_with(step, fastrand::f64())
    }

    /// The quick delay between two addresses of one pass, jittered.
    pub fn quick_delay(&self) -> Duration {
        self.quick / 2 + self.quick.mul_f64(fastrand::f64() / 2.0)
    }

    /// The delay of step `step` before jitter.
    pub fn base(&self, step: u32) -> Duration {
        let factor = 1u32 << step.min(16);
        self.initial.saturating_mul(factor).min(self.cap)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::DEFAULT
    }
}

/// What happened to a connection attempt, for [`Reconnect::next_delay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The session got its `Welcome` and later ended.
    Welcomed,
    /// The attempt failed before a `Welcome`.
    Failed,
}

/// The reconnect schedule across a ring of servers: quick retries inside a
/// pass, one backoff step per pass without a `Welcome`.
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    /// Failed attempts in the current pass.
    tried: usize,
    /// Whole passes without a `Welcome`.
    failed_passes: u32,
}

impl Reconnect {
    /// A schedule with `backoff`.
    pub fn new(backoff: Backoff) -> Self {
        Reconnect { backoff, tried: 0, failed_passes: 0 }
    }

    /// Whole passes over the ring that failed since the last `Welcome`.
    pub fn failed_passes(&self) -> u32 {
        self.failed_passes
    }

    /// The delay before the next attempt after `outcome`, when a pass holds
    /// `pass_len` addresses (at least one is assumed).
    pub fn next_delay(&mut self, outcome: Outcome, pass_len: usize) -> Duration {
        self.next_delay_with(outcome, pass_len, fastrand::f64())
    }

    /// [`Reconnect::next_delay`] with the jitter given (`[0, 1]`).
    pub fn next_delay_with(&mut self, outcome: Outcome, pass_len: usize, jitter: f64) -> Duration {
        match outcome {
            Outcome::Welcomed => {
                // The session worked: the next server gets a short first
                // step (everyone whose replica died reconnects within it).
                self.tried = 0;
                self.failed_passes = 0;
                self.backoff.delay_with(0, jitter)
            }
            Outcome::Failed => {
                self.tried += 1;
                if self.tried < pass_len.max(1) {
                    return self.backoff.quick / 2 + self.backoff.quick.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
                }
                self.tried = 0;
                let step = self.failed_passes;
                self.failed_passes = self.failed_passes.saturating_add(1);
                self.backoff.delay_with(step, jitter)
            }
        }
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect::new(Backoff::DEFAULT)
    }
}

/// Where the ring of `len` servers starts for agent `agent_id`: a stable
/// hash (FNV-1a) of the id, so the same agent starts at the same replica
/// after a restart and a fleet spreads evenly.
pub fn start_index(agent_id: &str, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in agent_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % len as u64) as usize
}

/// A resolved name: its addresses, or why there are none.
pub type Resolved = std::io::Result<Vec<SocketAddr>>;

/// Resolves `(host, port)` to addresses; the default is
/// `tokio::net::lookup_host`. Tests plug in their own.
pub type Resolver = Arc<dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = Resolved> + Send>> + Send + Sync>;

/// The system resolver (`getaddrinfo` through tokio).
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            Ok(addrs)
        })
    })
}

/// One connection attempt's target: the configured URL and the address
/// dialled for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index of the URL in the configured list.
    pub index: usize,
    /// The URL as configured (TLS verifies its host name).
    pub url: String,
    /// The address dialled; `None` when the name did not resolve.
    pub addr: Option<SocketAddr>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) if !self.url.contains(&addr.to_string()) => write!(f, "{} ({addr})", self.url),
            _ => f.write_str(&self.url),
        }
    }
}

/// The ring of servers the uplink dials, in order.
pub struct Servers {
    urls: Vec<String>,
    resolver: Resolver,
    /// The agent's id: where the ring starts, and where inside the
    /// addresses of one name.
    seed: String,
    /// The URL being worked through.
    url: usize,
    /// Its addresses already tried in this round.
    tried: Vec<SocketAddr>,
    /// An address to dial again at the next attempt ([`Servers::retry`]).
    again: Option<SocketAddr>,
    /// The size of a pass: the addresses of every URL as last resolved (a
    /// name that did not resolve counts one).
    sizes: Vec<usize>,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers").field("urls", &self.urls).field("url", &self.url).finish_non_exhaustive()
    }
}

impl Servers {
    /// The ring of `urls` (at least one) for agent `agent_id`, resolved by
    /// the system resolver.
    pub fn new(urls: Vec<String>, agent_id: &str) -> Self {
        let len = urls.len();
        Servers {
            url: start_index(agent_id, len),
            sizes: vec![1; len],
            urls,
            resolver: system_resolver(),
            seed: agent_id.to_owned(),
            tried: Vec::new(),
            again: None,
        }
    }

    /// The same ring with another resolver (tests).
    pub fn with_resolver(mut self, resolver: Resolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// The configured URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// How many addresses one pass over the ring tries (as last resolved).
    pub fn pass_len(&self) -> usize {
        self.sizes.iter().sum::<usize>().max(1)
    }

    /// The addresses of URL `index` now, starting at this agent's own place
    /// among them (so one name with several records spreads a fleet too);
    /// `None` when the name does not resolve.
    async fn resolve(&mut self, index: usize) -> Option<Vec<SocketAddr>> {
        let (host, port) = host_port(&self.urls[index])?;
        match (self.resolver)(host.clone(), port).await {
            Ok(mut addrs) => {
                let mut seen = std::collections::HashSet::new();
                addrs.retain(|addr| seen.insert(*addr));
                if !addrs.is_empty() {
                    let shift = start_index(&self.seed, addrs.len());
                    addrs.rotate_left(shift);
                }
                self.sizes[index] = addrs.len().max(1);
                Some(addrs)
            }
            Err(error) => {
                tracing::debug!(%error, host = %host, "Cannot resolve the server's name.");
                self.sizes[index] = 1;
                None
            }
        }
    }

    /// The next target. The current URL's name is resolved again at every
    /// attempt, and its first address not tried in this round is dialled;
    /// when every one was (or the name does not resolve), the next URL's. A
    /// URL whose name does not resolve is a target without an address (the
    /// attempt fails and the ring moves on).
    pub async fn next(&mut self) -> Target {
        if self.urls.is_empty() {
            return Target { index: 0, url: String::new(), addr: None };
        }
        // At most one full turn: each URL is resolved once here.
        for _ in 0..=self.urls.len() {
            let index = self.url;
            let url = self.urls[index].clone();
            let Some(addrs) = self.resolve(index).await else {
                if self.tried.is_empty() && self.again.is_none() {
                    // Counted as this URL's one (failed) attempt.
                    self.tried.push(SocketAddr::from(([0, 0, 0, 0], 0)));
                    return Target { index, url, addr: None };
                }
                self.advance();
                continue;
            };
            if let Some(again) = self.again.take()
                && addrs.contains(&again)
            {
                return Target { index, url, addr: Some(again) };
            }
            match addrs.iter().find(|addr| !self.tried.contains(addr)) {
                Some(&addr) => {
                    self.tried.push(addr);
                    return Target { index, url, addr: Some(addr) };
                }
                None => self.advance(),
            }
        }
        let url = self.urls[self.url].clone();
        Target { index: self.url, url, addr: None }
    }

    /// On to the next URL, with none of its addresses tried.
    fn advance(&mut self) {
        self.url = (self.url + 1) % self.urls.len();
        self.tried.clear();
    }

    /// Dials the same target again at the next call (after a resync,
    /// which is no fault of the server).
    pub fn retry(&mut self, target: &Target) {
        self.again = target.addr;
    }
}

/// The host name (without brackets) and port of a server URL; the port
/// defaults to 443 for `https://` and 80 for `http://`.
pub fn host_port(url: &str) -> Option<(String, u16)> {
    let uri: tonic::codegen::http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn fixed(table: Vec<(&'static str, Vec<SocketAddr>)>) -> Resolver {
        let table = Arc::new(table);
        Arc::new(move |host, _port| {
            let table = table.clone();
            Box::pin(async move {
                table
                    .iter()
                    .find(|(name, _)| *name == host)
                    .map(|(_, addrs)| addrs.clone())
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))
            })
        })
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_jitters_down_to_half() {
        let b = Backoff::DEFAULT;
        assert_eq!(b.delay_with(0, 1.0), Duration::from_millis(500));
        assert_eq!(b.delay_with(0, 0.0), Duration::from_millis(250));
        assert_eq!(b.delay_with(3, 1.0), Duration::from_secs(4));
        assert_eq!(b.delay_with(40, 1.0), Duration::from_secs(30));
        assert_eq!(b.delay_with(40, 0.0), Duration::from_secs(15));
        for step in 0..20 {
            let d = b.delay(step);
            assert!(d >= b.base(step) / 2 && d <= b.base(step), "{step}: {d:?}");
        }
    }

    #[test]
    fn a_pass_over_the_ring_is_one_backoff_step() {
        let mut r = Reconnect::default();
        // Three addresses: two quick retries, then the first step.
        assert_eq!(r.next_delay_with(Outcome::Failed, 3, 1.0), Duration::from_millis(100));
        assert_eq!(r.next_delay_with(Outcome::Failed, 3, 1.0), Duration::from_millis(100));
        assert_eq!(r.next_delay_with(Outcome::Failed, 3, 1.0), Duration::from_millis(500));
        assert_eq!(r.failed_passes(), 1);
        for _ in 0..2 {
            r.next_delay_with(Outcome::Failed, 3, 1.0);
        }
        assert_eq!(r.next_delay_with(Outcome::Failed, 3, 1.0), Duration::from_secs(1), "second pass: second step");
        // A session that worked resets the schedule.
        assert_eq!(r.next_delay_with(Outcome::Welcomed, 3, 1.0), Duration::from_millis(500));
        assert_eq!(r.failed_passes(), 0);
        assert_eq!(r.next_delay_with(Outcome::Failed, 3, 1.0), Duration::from_millis(100));
        // One server: every failure is a step, as before replicas.
        let mut one = Reconnect::default();
        let steps: Vec<Duration> = (0..4).map(|_| one.next_delay_with(Outcome::Failed, 1, 1.0)).collect();
        assert_eq!(steps, [500, 1000, 2000, 4000].map(Duration::from_millis));
    }

    #[test]
    fn the_start_spreads_a_fleet_and_is_stable() {
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            counts[start_index(&format!("agent-{i}"), 3)] += 1;
        }
        assert!(counts.iter().all(|&n| n > 800), "{counts:?}");
        assert_eq!(start_index("a", 3), start_index("a", 3));
        assert_eq!(start_index("a", 0), 0);
    }

    #[tokio::test]
    async fn the_ring_walks_every_address_of_every_url_then_wraps() {
        let resolver = fixed(vec![
            ("a.example", vec![addr("192.0.2.1:1"), addr("192.0.2.2:1")]),
            ("b.example", vec![addr("198.51.100.1:1")]),
        ]);
        let urls =
            vec!["https://a.example:1".to_owned(), "https://b.example:1".to_owned(), "https://gone.example:1".into()];
        let mut ring = Servers::new(urls.clone(), "agent-x").with_resolver(resolver);
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(ring.next().await);
        }
        // Every address once per pass of 4 (the name that does not resolve
        // is one failed target), and the next pass repeats the order.
        assert_eq!(ring.pass_len(), 4);
        assert_eq!(seen[..4], seen[4..]);
        let mut addrs: Vec<Option<SocketAddr>> = seen[..4].iter().map(|t| t.addr).collect();
        addrs.sort();
        assert_eq!(addrs, [None, Some(addr("192.0.2.1:1")), Some(addr("192.0.2.2:1")), Some(addr("198.51.100.1:1"))]);
        for target in &seen {
            assert_eq!(target.url, urls[target.index], "TLS verifies the URL's name: {target}");
        }
        // Agents start at different places.
        let mut firsts = std::collections::BTreeSet::new();
        for i in 0..30 {
            let resolver = fixed(vec![("a.example", vec![addr("192.0.2.1:1"), addr("192.0.2.2:1")])]);
            let mut ring =
                Servers::new(vec!["https://a.example:1".into()], &format!("agent-{i}")).with_resolver(resolver);
            firsts.insert(ring.next().await.addr);
        }
        assert_eq!(firsts.len(), 2, "one name's addresses are spread over too");
    }

    #[tokio::test]
    async fn a_retry_dials_the_same_address_again() {
        let resolver = fixed(vec![("a.example", vec![addr("192.0.2.1:1"), addr("192.0.2.2:1")])]);
        let mut ring = Servers::new(vec!["https://a.example:1".into()], "agent-y").with_resolver(resolver);
        let first = ring.next().await;
        ring.retry(&first);
        assert_eq!(ring.next().await, first);
        assert_ne!(ring.next().await, first);
    }

    #[test]
    fn host_and_port_come_from_the_url() {
        assert_eq!(host_port("https://a.example:50051"), Some(("a.example".into(), 50051)));
        assert_eq!(host_port("https://a.example"), Some(("a.example".into(), 443)));
        assert_eq!(host_port("http://[::1]:7"), Some(("::1".into(), 7)));
        assert_eq!(host_port("not a url"), None);
    }
}
