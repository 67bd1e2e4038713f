//! The reconciler: keeps a backend equal to the desired set.
//!
//! *Desired* is the fleet blocklist (from the server's snapshots and deltas)
//! plus the local blocks, minus the allowlist and the host's own addresses,
//! made disjoint by [`super::plan::desired`]. *Actual* is what the backend
//! really holds, read back. Only the difference is applied, in one commit.
//!
//! - **Full reconcile** ([`Reconciler::reconcile`]): `setup` (recreates a
//!   deleted table or rule), read back, diff, commit. Run at start (never
//!   wipe-and-reload: entries that are already right stay untouched) and
//!   every `reconcile_secs`; what it had to change beyond what the reconciler
//!   believed was there is counted as drift repaired.
//! - **Incremental apply** (after a snapshot, a delta or a local block): the
//!   diff against what the last commit left (read-back of a large set takes
//!   seconds, a delta must take milliseconds). If such a commit fails (the
//!   table was deleted under us, an element expired a moment early), a full
//!   reconcile runs at once.
//!
//! The fleet blocklist, its version and the local blocks are persisted in
//! `state_dir/blocklist.pb` ([`super::state`]; written atomically, at most
//! once a second and at shutdown), so a restart reconciles against the same desired set and
//! reports the version it really holds: no entry is removed just because the
//! server has not answered yet. [`super::lengths`] is the index that lets an
//! incremental change prove it touches only its own range.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleetban_proto::v1::{BlocklistDelta, BlocklistSnapshot};
use ipnet::IpNet;
use tracing::{debug, info, warn};

use super::kill::Killer;
use super::lengths::PrefixLengths;
use super::plan::{self, Diff};
use super::state::{self, entry_of};
use super::{Backend, Entry, FirewallError};

/// Shortest interval between two writes of the persisted blocklist.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Counters of the firewall, for status and metrics.
#[derive(Debug, Default)]
pub struct FirewallStats {
    /// Entries the backend holds after the last commit.
    pub entries: AtomicU64,
    /// Blocklist version applied.
    pub version: AtomicU64,
    /// Time of the last successful full reconcile, unix ms (0 = never).
    pub last_reconcile_ms: AtomicI64,
    /// Full reconciles run.
    pub reconciles: AtomicU64,
    /// Entries added or removed by full reconciles because the backend had
    /// drifted from what the agent last wrote.
    pub drift_repaired: AtomicU64,
    /// Commits that failed.
    pub errors: AtomicU64,
    /// Local blocks applied.
    pub local_blocks: AtomicU64,
    /// Established connections of newly blocked ranges ended
    /// ([`super::kill`]).
    pub connections_killed: AtomicU64,
    /// Connections a dry run would have ended.
    pub connections_would_kill: AtomicU64,
    /// Connections that could not be ended, and failed listings.
    pub kill_errors: AtomicU64,
    /// What ending connections can do here: 0 = not set up, then
    /// [`super::kill::KillSupport`]'s codes (1 socket-destroy, 2 dry run,
    /// 3 unsupported).
    pub kill_support: AtomicU8,
}

/// What happened to a delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied; the firewall is at the delta's `to_version`.
    Applied,
    /// Already held (its `to_version` is not newer).
    Stale,
    /// The delta starts at another version than the one held: a snapshot or
    /// a catch-up is needed.
    Gap,
}

/// Errors of the reconciler.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The backend failed.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    /// A server entry could not be used.
    #[error("invalid blocklist entry {block_id}: {message}")]
    InvalidEntry {
        /// The block id.
        block_id: i64,
        /// What is wrong.
        message: String,
    },
}

/// One change to the inputs of the desired set.
#[derive(Debug, Clone)]
enum Change {
    /// An entry was added (or renewed).
    Add(Entry),
    /// The last input entry of a range was removed.
    Remove(IpNet),
}

impl Change {
    fn net(&self) -> IpNet {
        match self {
            Change::Add(entry) => entry.net,
            Change::Remove(net) => *net,
        }
    }
}

/// The reconciler. See the module documentation.
pub struct Reconciler {
    backend: Box<dyn Backend>,
    fleet: HashMap<i64, Entry>,
    /// How many fleet entries hold each range (for incremental removals).
    fleet_nets: HashMap<IpNet, u32>,
    /// How many `believed` entries have each prefix length, per family.
    lengths: PrefixLengths,
    /// How many input entries (fleet and local) have each prefix length.
    input_lengths: PrefixLengths,
    local: HashMap<IpNet, Entry>,
    /// When each local block was made, unix ms (0 = not known: made by an
    /// agent that did not record it, older than any revocation).
    local_made: HashMap<IpNet, i64>,
    exclude: Vec<IpNet>,
    /// The never-blocked ranges as last persisted (for inspection by
    /// `fleetban-agent firewall list` and `why`, which do not run the
    /// wiring that sets [`Reconciler::set_exclusions`]).
    persisted_exclude: Vec<IpNet>,
    version: u64,
    /// What the backend holds according to the last commit or read-back.
    believed: HashMap<IpNet, Entry>,
    /// A full reconcile ran since start (before it, `believed` is unknown).
    reconciled: bool,
    state_file: Option<PathBuf>,
    dirty: bool,
    last_persist: Instant,
    stats: Arc<FirewallStats>,
    /// Ends the connections of newly added ranges; `None` = never.
    killer: Option<Killer>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("backend", &self.backend.name())
            .field("fleet", &self.fleet.len())
            .field("local", &self.local.len())
            .field("version", &self.version)
            .finish()
    }
}

impl Reconciler {
    /// A reconciler over `backend`, never blocking `exclude`; when
    /// `state_dir` is given, the blocklist persisted there is loaded.
    pub fn new(
        backend: Box<dyn Backend>,
        exclude: Vec<IpNet>,
        state_dir: Option<PathBuf>,
        stats: Arc<FirewallStats>,
    ) -> Self {
        let mut reconciler = Self {
            backend,
            fleet: HashMap::new(),
            fleet_nets: HashMap::new(),
            lengths: PrefixLengths::default(),
            input_lengths: PrefixLengths::default(),
            local: HashMap::new(),
            local_made: HashMap::new(),
            exclude,
            persisted_exclude: Vec::new(),
            version: 0,
            believed: HashMap::new(),
            reconciled: false,
            state_file: state_dir.map(|dir| dir.join(state::STATE_FILE)),
            dirty: false,
            last_persist: Instant::now(),
            stats,
            killer: None,
        };
        reconciler.load_state();
        reconciler.rebuild_index();
        reconciler
    }

    /// Ends the established connections of every range a commit adds from
    /// now on (see [`super::kill`]).
    pub fn with_killer(mut self, killer: Killer) -> Self {
        self.killer = Some(killer);
        self
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The blocklist version held.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Entries held after the last commit.
    pub fn entries(&self) -> usize {
        self.believed.len()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<FirewallStats> {
        self.stats.clone()
    }

    fn desired(&self, now_ms: i64) -> HashMap<IpNet, Entry> {
        plan::desired(self.fleet.values().chain(self.local.values()), &self.exclude, now_ms)
    }

    /// Read back, diff, commit. See the module documentation.
    pub fn reconcile(&mut self, now_ms: i64) -> Result<usize, ReconcileError> {
        self.backend.setup()?;
        // The backend's remaining timeouts are relative to the moment it is
        // read, so it is read with the real clock.
        let actual: HashMap<IpNet, Entry> =
            self.backend.read(super::now_ms())?.into_iter().map(|entry| (entry.net, entry)).collect();
        let desired = self.desired(now_ms);
        let diff = plan::diff(&desired, &actual, now_ms);
        let drift = if self.reconciled {
            self.prune_believed(now_ms);
            plan::diff(&self.believed, &actual, now_ms).changes()
        } else {
            0
        };
        let changes = diff.changes();
        self.commit(diff, now_ms)?;
        self.believed = desired;
        self.recount();
        self.reconciled = true;
        self.stats.reconciles.fetch_add(1, Ordering::Relaxed);
        self.stats.last_reconcile_ms.store(now_ms, Ordering::Relaxed);
        self.stats.entries.store(self.believed.len() as u64, Ordering::Relaxed);
        if drift > 0 {
            self.stats.drift_repaired.fetch_add(drift as u64, Ordering::Relaxed);
            warn!(drift, backend = self.backend.name(), "Firewall had drifted; repaired.");
        }
        debug!(changes, entries = self.believed.len(), "Firewall reconciled.");
        Ok(changes)
    }

    fn prune_believed(&mut self, now_ms: i64) {
        self.believed.retain(|_, entry| entry.expires_at_ms.is_none_or(|at| at > now_ms));
    }

    fn commit(&mut self, diff: Diff, now_ms: i64) -> Result<(), ReconcileError> {
        if diff.is_empty() {
            return Ok(());
        }
        for entry in diff.remove {
            self.backend.stage_remove(entry);
        }
        let added: Vec<IpNet> = diff.add.iter().map(|entry| entry.net).collect();
        for entry in diff.add {
            self.backend.stage_add(entry);
        }
        self.backend.commit(now_ms).inspect_err(|_| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        })?;
        // New packets of the added ranges are dropped from here on; the
        // connections they already hold are ended now.
        if let Some(killer) = &mut self.killer {
            killer.kill(&added);
        }
        Ok(())
    }

    /// Applies the difference between the desired set and what the last
    /// commit left; falls back to a full reconcile when that fails.
    fn apply(&mut self, now_ms: i64) -> Result<usize, ReconcileError> {
        self.dirty = true;
        if !self.reconciled {
            return self.reconcile(now_ms);
        }
        self.prune_believed(now_ms);
        let desired = self.desired(now_ms);
        let diff = plan::diff(&desired, &self.believed, now_ms);
        let changes = diff.changes();
        match self.commit(diff, now_ms) {
            Ok(()) => {
                self.believed = desired;
                self.recount();
                self.stats.entries.store(self.believed.len() as u64, Ordering::Relaxed);
                Ok(changes)
            }
            Err(error) => {
                warn!(%error, "Incremental firewall change failed; reconciling in full.");
                self.reconcile(now_ms)
            }
        }
    }

    /// Replaces the fleet blocklist with `snapshot` and applies it.
    pub fn apply_snapshot(&mut self, snapshot: &BlocklistSnapshot, now_ms: i64) -> Result<usize, ReconcileError> {
        let mut fleet = HashMap::with_capacity(snapshot.entries.len());
        for block in &snapshot.entries {
            match entry_of(block) {
                Ok(entry) => {
                    fleet.insert(block.block_id, entry);
                }
                Err(error) => warn!(%error, "Skipping an invalid blocklist entry."),
            }
        }
        self.fleet = fleet;
        self.rebuild_index();
        self.version = snapshot.version;
        self.stats.version.store(self.version, Ordering::Relaxed);
        info!(version = snapshot.version, entries = snapshot.entries.len(), "Applying blocklist snapshot.");
        self.apply(now_ms)
    }

    /// Applies `delta` if it starts at the version held.
    pub fn apply_delta(&mut self, delta: &BlocklistDelta, now_ms: i64) -> Result<DeltaOutcome, ReconcileError> {
        if delta.to_version <= self.version {
            return Ok(DeltaOutcome::Stale);
        }
        if delta.from_version != self.version {
            return Ok(DeltaOutcome::Gap);
        }
        let mut changes = Vec::with_capacity(delta.removed.len() + delta.added.len());
        for id in &delta.removed {
            if let Some(old) = self.fleet.remove(id) {
                self.unindex(old.net);
                changes.push(Change::Remove(old.net));
            }
        }
        for block in &delta.added {
            match entry_of(block) {
                Ok(entry) => {
                    self.index(entry.net);
                    if let Some(old) = self.fleet.insert(block.block_id, entry.clone()) {
                        self.unindex(old.net);
                        changes.push(Change::Remove(old.net));
                    }
                    changes.push(Change::Add(entry));
                }
                Err(error) => warn!(%error, "Skipping an invalid blocklist entry."),
            }
        }
        self.version = delta.to_version;
        self.stats.version.store(self.version, Ordering::Relaxed);
        self.apply_changes(&changes, now_ms)?;
        Ok(DeltaOutcome::Applied)
    }

    /// Adds a local block and applies it at once.
    pub fn add_local(&mut self, entry: Entry, now_ms: i64) -> Result<usize, ReconcileError> {
        let change = Change::Add(entry.clone());
        let net = entry.net;
        self.local_made.insert(net, now_ms);
        if self.local.insert(net, entry).is_none() {
            self.input_lengths.add(net);
        }
        self.stats.local_blocks.fetch_add(1, Ordering::Relaxed);
        self.apply_changes(std::slice::from_ref(&change), now_ms)
    }

    /// Operators revoked blocks: `(range, revoked at, unix ms)`. Drops every
    /// local block that overlaps a revoked range and was made no later than
    /// its revocation (a later one rests on evidence seen after it), and
    /// applies the result. Returns the local blocks dropped.
    pub fn revoke_local(&mut self, revoked: &[(IpNet, i64)], now_ms: i64) -> Result<Vec<Entry>, ReconcileError> {
        let made = &self.local_made;
        let gone: Vec<IpNet> = self
            .local
            .keys()
            .filter(|net| {
                let at = made.get(*net).copied().unwrap_or(0);
                revoked
                    .iter()
                    .any(|(range, revoked_at)| (range.contains(*net) || net.contains(range)) && at <= *revoked_at)
            })
            .copied()
            .collect();
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let mut dropped = Vec::with_capacity(gone.len());
        for net in gone {
            self.local_made.remove(&net);
            if let Some(entry) = self.local.remove(&net) {
                dropped.push(entry);
            }
        }
        self.rebuild_index();
        self.apply(now_ms)?;
        Ok(dropped)
    }

    /// The fleet blocklist held: block id and entry.
    pub fn fleet_blocks(&self) -> impl Iterator<Item = (i64, &Entry)> {
        self.fleet.iter().map(|(id, entry)| (*id, entry))
    }

    /// The never-blocked ranges: those set since start, else the ones
    /// persisted by the running agent.
    pub fn exclusions(&self) -> &[IpNet] {
        if self.exclude.is_empty() { &self.persisted_exclude } else { &self.exclude }
    }

    /// What the backend holds now, read back without changing anything
    /// (no setup: a missing table is an error, not created).
    pub fn read_actual(&mut self) -> Result<Vec<Entry>, FirewallError> {
        self.backend.read(super::now_ms())
    }

    /// The local blocks held, with when each was made (unix ms, 0 = not
    /// known).
    pub fn local_blocks(&self) -> impl Iterator<Item = (&Entry, i64)> {
        self.local.values().map(|entry| (entry, self.local_made.get(&entry.net).copied().unwrap_or(0)))
    }

    fn index(&mut self, net: IpNet) {
        *self.fleet_nets.entry(net).or_default() += 1;
        self.input_lengths.add(net);
    }

    fn unindex(&mut self, net: IpNet) {
        self.input_lengths.remove(net);
        if let Some(count) = self.fleet_nets.get_mut(&net) {
            *count -= 1;
            if *count == 0 {
                self.fleet_nets.remove(&net);
            }
        }
    }

    fn rebuild_index(&mut self) {
        self.fleet_nets.clear();
        for entry in self.fleet.values() {
            *self.fleet_nets.entry(entry.net).or_default() += 1;
        }
        self.input_lengths = PrefixLengths::of(self.fleet.values().chain(self.local.values()).map(|e| &e.net));
    }

    fn recount(&mut self) {
        self.lengths = PrefixLengths::of(self.believed.keys());
    }

    /// Applies a few changes without recomputing the whole desired set when
    /// each one provably touches only its own range: no exclusion overlaps
    /// it, no held range contains it, and no held range is longer (so none
    /// can lie inside it or have been absorbed by it). Anything else takes
    /// the general path.
    fn apply_changes(&mut self, changes: &[Change], now_ms: i64) -> Result<usize, ReconcileError> {
        self.dirty = true;
        let Some(diff) = self.fast_diff(changes, now_ms) else { return self.apply(now_ms) };
        let count = diff.changes();
        let (removed, added): (Vec<IpNet>, Vec<Entry>) =
            (diff.remove.iter().map(|e| e.net).collect(), diff.add.clone());
        match self.commit(diff, now_ms) {
            Ok(()) => {
                for net in removed {
                    if self.believed.remove(&net).is_some() {
                        self.lengths.remove(net);
                    }
                }
                for entry in added {
                    let net = entry.net;
                    if self.believed.insert(net, entry).is_none() {
                        self.lengths.add(net);
                    }
                }
                self.stats.entries.store(self.believed.len() as u64, Ordering::Relaxed);
                Ok(count)
            }
            Err(error) => {
                warn!(%error, "Incremental firewall change failed; reconciling in full.");
                self.reconcile(now_ms)
            }
        }
    }

    fn fast_diff(&self, changes: &[Change], now_ms: i64) -> Option<Diff> {
        if !self.reconciled {
            return None;
        }
        let mut seen = std::collections::HashSet::new();
        let mut diff = Diff::default();
        for change in changes {
            let net = change.net();
            if !seen.insert(net) || self.exclude.iter().any(|x| x.contains(&net) || net.contains(x)) {
                return None;
            }
            let present = self.lengths.family(net);
            let inputs = self.input_lengths.family(net);
            let len = usize::from(net.prefix_len());
            // An input inside this range may be held, absorbed or cut around.
            if inputs[len + 1..].iter().any(|n| *n > 0) {
                return None;
            }
            let contained = (0..len)
                .rev()
                .filter(|l| present[*l] > 0)
                .filter_map(|l| IpNet::new(net.addr(), l as u8).ok().map(|n| n.trunc()))
                .any(|outer| self.believed.contains_key(&outer));
            // An input containing this range was cut around it or absorbs it.
            let input_container = (0..len)
                .rev()
                .filter(|l| inputs[*l] > 0)
                .filter_map(|l| IpNet::new(net.addr(), l as u8).ok().map(|n| n.trunc()))
                .any(|outer| self.fleet_nets.contains_key(&outer) || self.local.contains_key(&outer));
            if contained || input_container {
                return None;
            }
            let held = self.believed.get(&net);
            match change {
                Change::Add(entry) => {
                    if entry.expires_at_ms.is_some_and(|at| at <= now_ms) {
                        continue;
                    }
                    match held {
                        None => diff.add.push(entry.clone()),
                        Some(held) if plan::same_expiry(held.expires_at_ms, entry.expires_at_ms) => {}
                        Some(held) if plan::outlasts(entry.expires_at_ms, held.expires_at_ms) => {
                            diff.remove.push(held.clone());
                            diff.add.push(entry.clone());
                        }
                        Some(_) => return None,
                    }
                }
                Change::Remove(_) => {
                    if self.fleet_nets.contains_key(&net) || self.local.contains_key(&net) {
                        return None;
                    }
                    if let Some(held) = held {
                        diff.remove.push(held.clone());
                    }
                }
            }
        }
        Some(diff)
    }

    /// Replaces the ranges that are never blocked and applies the change.
    pub fn set_exclusions(&mut self, exclude: Vec<IpNet>, now_ms: i64) -> Result<usize, ReconcileError> {
        self.exclude = exclude;
        self.apply(now_ms)
    }

    /// Drops expired local blocks and fleet entries from memory.
    pub fn expire(&mut self, now_ms: i64) {
        let live = |entry: &Entry| entry.expires_at_ms.is_none_or(|at| at > now_ms);
        self.local.retain(|_, entry| live(entry));
        let local = &self.local;
        self.local_made.retain(|net, _| local.contains_key(net));
        self.fleet.retain(|_, entry| live(entry));
        self.rebuild_index();
        self.prune_believed(now_ms);
        self.recount();
        self.stats.entries.store(self.believed.len() as u64, Ordering::Relaxed);
    }

    /// Persists the blocklist if it changed and the last write is old
    /// enough (or `force`).
    pub fn persist(&mut self, force: bool) {
        if !self.dirty || (!force && self.last_persist.elapsed() < PERSIST_INTERVAL) {
            return;
        }
        let Some(path) = self.state_file.clone() else { return };
        self.last_persist = Instant::now();
        let local_made = |net: &IpNet| self.local_made.get(net).copied().unwrap_or(0);
        let bytes = state::encode(
            self.version,
            self.fleet.iter().map(|(id, entry)| (*id, entry)),
            self.local.values().map(|entry| (entry, local_made(&entry.net))),
            &self.exclude,
        );
        match crate::fsutil::write_atomic(&path, &bytes, 0o600) {
            Ok(()) => self.dirty = false,
            Err(error) => warn!(%error, path = %path.display(), "Cannot persist the blocklist."),
        }
    }

    fn load_state(&mut self) {
        let Some(path) = &self.state_file else { return };
        let Some(state) = state::load(path) else { return };
        self.persisted_exclude = state.exclude;
        for (id, entry) in state.fleet {
            self.fleet.insert(id, entry);
        }
        for (entry, made) in state.local {
            if made > 0 {
                self.local_made.insert(entry.net, made);
            }
            self.local.insert(entry.net, entry);
        }
        self.version = state.version;
        self.stats.version.store(self.version, Ordering::Relaxed);
        info!(
            version = self.version,
            fleet = self.fleet.len(),
            local = self.local.len(),
            "Loaded the persisted blocklist."
        );
    }

    /// The agent stops: persists, and leaves the entries in place.
    pub fn shutdown(&mut self) -> Result<(), FirewallError> {
        self.persist(true);
        self.backend.shutdown()
    }

    /// Removes everything the backend owns and forgets the blocklist.
    pub fn flush(&mut self) -> Result<(), FirewallError> {
        self.backend.flush()?;
        self.fleet.clear();
        self.local.clear();
        self.local_made.clear();
        self.believed.clear();
        self.rebuild_index();
        self.recount();
        self.version = 0;
        self.dirty = true;
        self.persist(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::Staged;
    use crate::firewall::dryrun::DryRun;
    use crate::firewall::state::STATE_FILE;
    use fleetban_proto::v1::BlockEntry;
    use prost::Message as _;
    use std::sync::Mutex;

    /// A backend in memory that records its commits.
    #[derive(Clone, Default)]
    struct Memory {
        held: Arc<Mutex<HashMap<IpNet, Entry>>>,
        commits: Arc<Mutex<Vec<(usize, usize)>>>,
        staged: Staged,
    }

    impl Backend for Memory {
        fn name(&self) -> &'static str {
            "memory"
        }
        fn setup(&mut self) -> Result<(), FirewallError> {
            Ok(())
        }
        fn read(&mut self, now_ms: i64) -> Result<Vec<Entry>, FirewallError> {
            Ok(self
                .held
                .lock()
                .unwrap()
                .values()
                .filter(|e| e.expires_at_ms.is_none_or(|a| a > now_ms))
                .cloned()
                .collect())
        }
        fn staged(&mut self) -> &mut Staged {
            &mut self.staged
        }
        fn commit(&mut self, _now_ms: i64) -> Result<(), FirewallError> {
            let (removes, adds) = self.staged.take();
            self.commits.lock().unwrap().push((removes.len(), adds.len()));
            let mut held = self.held.lock().unwrap();
            for e in removes {
                held.remove(&e.net);
            }
            for e in adds {
                held.insert(e.net, e);
            }
            Ok(())
        }
        fn flush(&mut self) -> Result<(), FirewallError> {
            self.held.lock().unwrap().clear();
            Ok(())
        }
    }

    fn block(id: i64, cidr: &str, expires: i64) -> BlockEntry {
        BlockEntry {
            block_id: id,
            cidr: Some(cidr.parse::<IpNet>().unwrap().into()),
            expires_at_ms: expires,
            reason: "t".into(),
        }
    }

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn start_keeps_correct_entries_and_repairs_drift() {
        let memory = Memory::default();
        // Already in the kernel from the last run: one right, one stale.
        memory.held.lock().unwrap().insert(
            "192.0.2.1/32".parse().unwrap(),
            Entry { net: "192.0.2.1/32".parse().unwrap(), expires_at_ms: None, reason: String::new() },
        );
        memory.held.lock().unwrap().insert(
            "192.0.2.9/32".parse().unwrap(),
            Entry { net: "192.0.2.9/32".parse().unwrap(), expires_at_ms: None, reason: String::new() },
        );
        let stats = Arc::new(FirewallStats::default());
        let mut r =
            Reconciler::new(Box::new(memory.clone()), vec!["198.51.100.0/24".parse().unwrap()], None, stats.clone());
        let snapshot = BlocklistSnapshot {
            version: 5,
            entries: vec![
                block(1, "192.0.2.1/32", 0),
                block(2, "203.0.113.0/24", NOW + 60_000),
                block(3, "198.51.100.7/32", 0),
            ],
        };
        assert_eq!(r.apply_snapshot(&snapshot, NOW).unwrap(), 2);
        let held = memory.held.lock().unwrap().keys().map(|n| n.to_string()).collect::<std::collections::BTreeSet<_>>();
        assert_eq!(held.into_iter().collect::<Vec<_>>(), ["192.0.2.1/32", "203.0.113.0/24"]);
        // Only the difference was committed, in one batch: the stale entry
        // removed, the /24 added, the right entry untouched.
        assert_eq!(*memory.commits.lock().unwrap(), [(1, 1)]);
        assert_eq!(stats.drift_repaired.load(Ordering::Relaxed), 0);

        // Someone flushes the set: the next reconcile repairs it.
        memory.held.lock().unwrap().clear();
        assert_eq!(r.reconcile(NOW + 1000).unwrap(), 2);
        assert_eq!(memory.held.lock().unwrap().len(), 2);
        assert_eq!(stats.drift_repaired.load(Ordering::Relaxed), 2);
        // Nothing to do now.
        assert_eq!(r.reconcile(NOW + 2000).unwrap(), 0);
    }

    #[test]
    fn deltas_apply_in_order_and_gaps_are_refused() {
        let memory = Memory::default();
        let mut r = Reconciler::new(Box::new(memory.clone()), vec![], None, Arc::default());
        r.apply_snapshot(&BlocklistSnapshot { version: 3, entries: vec![block(1, "192.0.2.1/32", 0)] }, NOW).unwrap();
        let delta = BlocklistDelta {
            from_version: 3,
            to_version: 4,
            added: vec![block(2, "192.0.2.2/32", 0)],
            removed: vec![1],
        };
        assert_eq!(r.apply_delta(&delta, NOW).unwrap(), DeltaOutcome::Applied);
        assert_eq!(r.apply_delta(&delta, NOW).unwrap(), DeltaOutcome::Stale);
        let gap = BlocklistDelta { from_version: 7, to_version: 9, ..BlocklistDelta::default() };
        assert_eq!(r.apply_delta(&gap, NOW).unwrap(), DeltaOutcome::Gap);
        let held: Vec<_> = memory.held.lock().unwrap().keys().map(|n| n.to_string()).collect();
        assert_eq!(held, ["192.0.2.2/32"]);
        assert_eq!(r.version(), 4);
        // A local block inside a fleet block that outlives it is absorbed;
        // one elsewhere is added.
        r.add_local(
            Entry {
                net: "198.51.100.5/32".parse().unwrap(),
                expires_at_ms: Some(NOW + 5000),
                reason: "conn_rate".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(memory.held.lock().unwrap().len(), 2);
    }

    #[test]
    fn removing_a_container_brings_back_what_it_absorbed() {
        let memory = Memory::default();
        let mut r = Reconciler::new(Box::new(memory.clone()), vec![], None, Arc::default());
        r.apply_snapshot(
            &BlocklistSnapshot { version: 1, entries: vec![block(1, "192.0.2.0/24", NOW + 900_000)] },
            NOW,
        )
        .unwrap();
        r.add_local(
            Entry {
                net: "192.0.2.7/32".parse().unwrap(),
                expires_at_ms: Some(NOW + 60_000),
                reason: "conn_rate".into(),
            },
            NOW,
        )
        .unwrap();
        assert_eq!(memory.held.lock().unwrap().len(), 1, "absorbed by the /24");
        let delta = BlocklistDelta { from_version: 1, to_version: 2, added: vec![], removed: vec![1] };
        r.apply_delta(&delta, NOW).unwrap();
        let held: Vec<_> = memory.held.lock().unwrap().keys().map(|n| n.to_string()).collect();
        assert_eq!(held, ["192.0.2.7/32"]);
    }

    /// Random deltas and local blocks, applied incrementally, always leave
    /// the backend equal to the desired set computed from scratch.
    #[test]
    fn incremental_changes_match_a_full_recompute() {
        let mut rng = fastrand::Rng::with_seed(7);
        let memory = Memory::default();
        let mut r =
            Reconciler::new(Box::new(memory.clone()), vec!["192.0.2.128/30".parse().unwrap()], None, Arc::default());
        let mut live: Vec<i64> = Vec::new();
        let mut next_id = 1;
        let mut version = 0;
        r.apply_snapshot(&BlocklistSnapshot { version, entries: vec![] }, NOW).unwrap();
        let random_net = |rng: &mut fastrand::Rng| -> String {
            match rng.u8(0..4) {
                0 => format!("192.0.2.0/{}", rng.u8(22..=26)),
                1 => format!("2001:db8:{}::/{}", rng.u8(0..4), [48u8, 64, 128][rng.usize(0..3)]),
                _ => format!("192.0.2.{}/32", rng.u8(0..=255)),
            }
        };
        for _ in 0..2000 {
            if rng.u8(0..5) == 0 {
                let net: IpNet = random_net(&mut rng).parse::<IpNet>().unwrap().trunc();
                let entry =
                    Entry { net, expires_at_ms: Some(NOW + i64::from(rng.u32(5..100)) * 1000), reason: "l".into() };
                r.add_local(entry, NOW).unwrap();
            } else {
                let mut removed = Vec::new();
                for _ in 0..rng.usize(0..3) {
                    if !live.is_empty() {
                        removed.push(live.swap_remove(rng.usize(0..live.len())));
                    }
                }
                let mut added = Vec::new();
                for _ in 0..rng.usize(0..3) {
                    let net: IpNet = random_net(&mut rng).parse::<IpNet>().unwrap().trunc();
                    // (Entries expiring within 2 s are left to expire by themselves.)
                    let expires = if rng.bool() { 0 } else { NOW + i64::from(rng.u32(5..100)) * 1000 };
                    added.push(block(next_id, &net.to_string(), expires));
                    live.push(next_id);
                    next_id += 1;
                }
                let delta = BlocklistDelta { from_version: version, to_version: version + 1, added, removed };
                version += 1;
                assert_eq!(r.apply_delta(&delta, NOW).unwrap(), DeltaOutcome::Applied);
            }
            let want = r.desired(NOW);
            let held = memory.held.lock().unwrap().clone();
            let mut want_nets: Vec<_> = want.values().map(|e| (e.net, e.expires_at_ms)).collect();
            let mut held_nets: Vec<_> = held.values().map(|e| (e.net, e.expires_at_ms)).collect();
            want_nets.sort();
            held_nets.sort();
            // Expiries within the tolerance are not rewritten.
            assert_eq!(
                held_nets.iter().map(|h| h.0).collect::<Vec<_>>(),
                want_nets.iter().map(|w| w.0).collect::<Vec<_>>()
            );
            for (held, want) in held_nets.iter().zip(&want_nets) {
                assert!(plan::same_expiry(held.1, want.1), "{held:?} vs {want:?}");
            }
        }
    }

    /// An operator's revocation drops the local block the agent made before
    /// it (also one that was only absorbed by a fleet block, and one loaded
    /// from the state file), keeps one made after it on new evidence, and
    /// leaves other ranges alone.
    #[test]
    fn revocation_drops_local_blocks_made_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Memory::default();
        let mut r = Reconciler::new(Box::new(memory.clone()), vec![], Some(dir.path().to_owned()), Arc::default());
        r.apply_snapshot(
            &BlocklistSnapshot { version: 1, entries: vec![block(13, "198.51.100.5/32", NOW + 900_000)] },
            NOW,
        )
        .unwrap();
        let local =
            |net: &str| Entry { net: net.parse().unwrap(), expires_at_ms: Some(NOW + 600_000), reason: "auth".into() };
        r.add_local(local("198.51.100.5/32"), NOW).unwrap();
        r.add_local(local("198.51.100.6/32"), NOW).unwrap();
        r.add_local(local("2001:db8:bad::/64"), NOW).unwrap();
        r.persist(true);
        // A restart in between: the time each block was made is kept.
        drop(r);
        let mut r = Reconciler::new(Box::new(memory.clone()), vec![], Some(dir.path().to_owned()), Arc::default());
        r.reconcile(NOW + 1_000).unwrap();
        // The server removes the fleet block: the local one still holds it.
        let delta = BlocklistDelta { from_version: 1, to_version: 2, added: vec![], removed: vec![13] };
        r.apply_delta(&delta, NOW + 2_000).unwrap();
        assert!(memory.held.lock().unwrap().contains_key(&"198.51.100.5/32".parse().unwrap()));
        // The revocation (at NOW + 1500) drops it, and the /64 whose /128 was
        // revoked.
        let dropped = r
            .revoke_local(
                &[
                    ("198.51.100.5/32".parse().unwrap(), NOW + 1_500),
                    ("2001:db8:bad::7/128".parse().unwrap(), NOW + 1_500),
                ],
                NOW + 2_000,
            )
            .unwrap();
        let mut dropped: Vec<String> = dropped.iter().map(|e| e.net.to_string()).collect();
        dropped.sort();
        assert_eq!(dropped, ["198.51.100.5/32", "2001:db8:bad::/64"]);
        let held: Vec<String> = memory.held.lock().unwrap().keys().map(|n| n.to_string()).collect();
        assert_eq!(held, ["198.51.100.6/32"]);
        // New evidence after the revocation blocks again, and the same
        // revocation heard again (a reconnect) leaves that block alone.
        r.add_local(local("198.51.100.5/32"), NOW + 3_000).unwrap();
        assert!(r.revoke_local(&[("198.51.100.5/32".parse().unwrap(), NOW + 1_500)], NOW + 4_000).unwrap().is_empty());
        assert_eq!(memory.held.lock().unwrap().len(), 2);
        // A full reconcile does not bring the dropped blocks back.
        r.reconcile(NOW + 5_000).unwrap();
        assert_eq!(memory.held.lock().unwrap().len(), 2);
        assert!(!memory.held.lock().unwrap().contains_key(&"2001:db8:bad::/64".parse().unwrap()));
    }

    /// An allowlist entry cuts its range out of the blocks it overlaps;
    /// once it is gone (unallowed or expired) the blocks are whole again.
    #[test]
    fn removing_an_allowlist_entry_restores_what_it_suppressed() {
        let memory = Memory::default();
        let mut r = Reconciler::new(Box::new(memory.clone()), vec![], None, Arc::default());
        r.apply_snapshot(
            &BlocklistSnapshot {
                version: 1,
                entries: vec![block(1, "198.51.100.0/24", NOW + 900_000), block(2, "203.0.113.9/32", 0)],
            },
            NOW,
        )
        .unwrap();
        let held = |m: &Memory| {
            let mut v: Vec<String> = m.held.lock().unwrap().keys().map(|n| n.to_string()).collect();
            v.sort();
            v
        };
        r.set_exclusions(vec!["198.51.100.55/32".parse().unwrap(), "203.0.113.0/24".parse().unwrap()], NOW).unwrap();
        let cut = held(&memory);
        assert_eq!(cut.len(), 8, "the /24 without .55: {cut:?}");
        assert!(!cut.iter().any(|n| n.starts_with("203.0.113.")), "{cut:?}");
        r.set_exclusions(vec![], NOW + 1_000).unwrap();
        assert_eq!(held(&memory), ["198.51.100.0/24", "203.0.113.9/32"]);
    }

    /// A state file written by an older agent (fleet and local parts only,
    /// no time made): it loads, and its local blocks count as made before
    /// any revocation.
    #[test]
    fn an_older_state_file_loads_and_its_local_blocks_yield_to_a_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = BlocklistSnapshot { version: 4, entries: vec![block(7, "192.0.2.0/24", NOW + 600_000)] };
        let local = BlocklistSnapshot { version: 0, entries: vec![block(0, "198.51.100.5/32", NOW + 600_000)] };
        let mut bytes = Vec::new();
        fleet.encode_length_delimited(&mut bytes).unwrap();
        local.encode_length_delimited(&mut bytes).unwrap();
        std::fs::write(dir.path().join(STATE_FILE), bytes).unwrap();
        let memory = Memory::default();
        let mut r = Reconciler::new(Box::new(memory.clone()), vec![], Some(dir.path().to_owned()), Arc::default());
        assert_eq!((r.version(), r.local_blocks().count()), (4, 1));
        assert!(r.exclusions().is_empty());
        r.reconcile(NOW).unwrap();
        assert_eq!(memory.held.lock().unwrap().len(), 2);
        let dropped = r.revoke_local(&[("198.51.100.5/32".parse().unwrap(), NOW - 3_600_000)], NOW).unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(memory.held.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_persisted_blocklist_carries_its_format_and_a_newer_one_is_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Reconciler::new(Box::new(Memory::default()), vec![], Some(dir.path().to_owned()), Arc::default());
        r.apply_snapshot(
            &BlocklistSnapshot { version: 3, entries: vec![block(1, "192.0.2.0/24", NOW + 600_000)] },
            NOW,
        )
        .unwrap();
        r.persist(true);
        let path = dir.path().join(STATE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"FBBLOCK2");
        let again = Reconciler::new(Box::new(Memory::default()), vec![], Some(dir.path().to_owned()), Arc::default());
        assert_eq!(again.version(), 3);
        // A file of a future format is not parsed as this one.
        let mut future = bytes.clone();
        future[7] = b'3';
        std::fs::write(&path, &future).unwrap();
        let newer = Reconciler::new(Box::new(Memory::default()), vec![], Some(dir.path().to_owned()), Arc::default());
        assert_eq!(newer.version(), 0);
    }

    #[test]
    fn persisted_blocklist_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fw.json");
        let mut r =
            Reconciler::new(Box::new(DryRun::new(path.clone())), vec![], Some(dir.path().to_owned()), Arc::default());
        r.apply_snapshot(
            &BlocklistSnapshot { version: 8, entries: vec![block(1, "192.0.2.0/24", NOW + 600_000)] },
            NOW,
        )
        .unwrap();
        r.add_local(
            Entry {
                net: "2001:db8::/64".parse().unwrap(),
                expires_at_ms: Some(NOW + 600_000),
                reason: "auth_failures".into(),
            },
            NOW,
        )
        .unwrap();
        r.shutdown().unwrap();
        let memory = Memory::default();
        let mut again = Reconciler::new(Box::new(memory.clone()), vec![], Some(dir.path().to_owned()), Arc::default());
        assert_eq!(again.version(), 8);
        again.reconcile(NOW + 1000).unwrap();
        assert_eq!(memory.held.lock().unwrap().len(), 2);
    }
}
