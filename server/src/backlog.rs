//! The correlation backlog: abuse addresses of committed batches waiting to
//! be evaluated by [`Correlator::on_batch`].
//!
//! Sessions only record which addresses each agent touched and go on to the
//! next batch; one worker per server process evaluates the accumulated set.
//! An attack reported by many agents touches the same addresses batch after
//! batch, so while an evaluation runs the next one coalesces: correlation
//! work follows the number of distinct (agent, address) pairs, not the
//! number of batches, and never holds up ingest or acks.
//!
//! Invariants:
//! - An address recorded before an evaluation starts is evaluated by it or
//!   by the next one (the set is swapped out atomically).
//! - The backlog is bounded: past [`MAX_PENDING`] pairs new addresses are
//!   dropped and counted; they are evaluated again when the next batch about
//!   them arrives, since evidence is in the database, not in the backlog.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing::{info, warn};
use uuid::Uuid;

use crate::correlate::Correlator;

/// Most (agent, address) pairs held between two evaluations.
pub const MAX_PENDING: usize = 1_000_000;

#[derive(Debug, Default)]
struct Inner {
    pending: Mutex<(HashMap<Uuid, HashSet<IpAddr>>, usize)>,
    wake: Notify,
    dropped: AtomicU64,
    evaluations: AtomicU64,
}

/// The shared backlog; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    inner: Arc<Inner>,
}

impl Backlog {
    /// An empty backlog.
    pub fn new() -> Self {
        Backlog::default()
    }

    /// Records the abuse addresses of a batch `agent_id` committed.
    pub fn add(&self, agent_id: Uuid, addresses: &[IpAddr]) {
        if addresses.is_empty() {
            return;
        }
        {
            let mut guard = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            let (map, len) = &mut *guard;
            let set = map.entry(agent_id).or_default();
            for addr in addresses {
                if *len >= MAX_PENDING {
                    self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if set.insert(*addr) {
                    *len += 1;
                }
            }
        }
        self.inner.wake.notify_one();
    }

    /// Evaluations run so far.
    pub fn evaluations(&self) -> u64 {
        self.inner.evaluations.load(Ordering::Relaxed)
    }

    fn take(&self) -> HashMap<Uuid, HashSet<IpAddr>> {
        let mut guard = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 = 0;
        std::mem::take(&mut guard.0)
    }

    async fn evaluate(&self, correlator: &Correlator) {
        let work = self.take();
        if work.is_empty() {
            return;
        }
        for (agent_id, addresses) in work {
            let addresses: Vec<IpAddr> = addresses.into_iter().collect();
            match correlator.on_batch(agent_id, &addresses).await {
                Ok(blocks) => {
                    for block in blocks {
                        info!(%agent_id, cidr = %block.cidr, reason = %block.reason, "Fleet block decided.");
                    }
                }
                Err(error) => {
                    warn!(%error, %agent_id, addresses = addresses.len(), "Correlation failed; the next batch retries.")
                }
            }
        }
        self.inner.evaluations.fetch_add(1, Ordering::Relaxed);
        let dropped = self.inner.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            warn!(dropped, "Correlation backlog was full; addresses wait for their next batch.");
        }
    }

    /// Evaluates the backlog whenever it is not empty, until `shutdown`
    /// resolves; then evaluates what is left once.
    pub async fn run_worker(self, correlator: Correlator, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = self.inner.wake.notified() => self.evaluate(&correlator).await,
            }
        }
        self.evaluate(&correlator).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_addresses_coalesce_per_agent() {
        let backlog = Backlog::new();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let x: IpAddr = "192.0.2.1".parse().unwrap();
        let y: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..100 {
            backlog.add(a, &[x, y]);
        }
        backlog.add(b, &[x]);
        let work = backlog.take();
        assert_eq!(work[&a].len(), 2);
        assert_eq!(work[&b].len(), 1);
        assert!(backlog.take().is_empty(), "taken work is gone");
    }
}
