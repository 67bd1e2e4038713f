//! Exactly-once storage of agents' event batches.
//!
//! For each [`EventBatch`] the session hands over, ingest validates every
//! event, then in ONE transaction records `(agent_id, seq)` in
//! `agent_batches`, bulk-inserts the valid events (one binary `COPY`, never a
//! row per statement) and updates the per-address evidence
//! (`offender_hosts`, `offenders`) for abuse kinds; only after the commit may
//! the session acknowledge the batch. Batches of several agents that queue
//! while the writers are busy share that transaction (group commit, see
//! [`Ingest::commit`]); each is still stored exactly once or not at all.
//!
//! Invariants:
//! - A batch whose `(agent_id, seq)` is already recorded is reported as a
//!   duplicate and nothing is written again: at-least-once on the wire,
//!   exactly-once in the store.
//! - Invalid events (bad address, time too far in the future or older than
//!   `max_event_age_days`, unknown kind, over-long or NUL-bearing strings) are
//!   counted in `agent_batches.rejected` and reported back per reason
//!   (`Ack.rejections`, [`EventError::reason`]), never stored. A batch that is
//!   invalid as a whole (seq 0, too many events, bad source position) is
//!   refused with [`BatchError::Invalid`] and nothing is written.
//! - Day partitions of `events` are created before the batch transaction
//!   (DDL takes locks on the parent table that must not be held for a whole
//!   batch); days already known to exist are cached.
//! - Evidence rows are touched in address order, so concurrent batches that
//!   share addresses wait for each other instead of deadlocking; a deadlock or
//!   serialization failure is retried.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetban_proto::kind::MAX_ATTEMPTS_PER_LINE;
use fleetban_proto::v1::{Event, EventBatch, EventKind, Service};
use sqlx::PgPool;

use crate::pgcopy::CopyBuf;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Largest encoded gRPC message accepted from an agent, bytes (4 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// How far in the future an event may lie (clock skew allowance).
pub const MAX_FUTURE: Duration = Duration::from_secs(600);
/// How old an event may be unless the server config says otherwise
/// (`max_event_age_days`): older ones would land in partitions retention
/// already dropped (or create partitions for long-gone days).
pub const DEFAULT_MAX_EVENT_AGE: Duration = Duration::from_secs(30 * 86_400);
/// Longest raw log line kept, bytes.
pub const MAX_RAW_BYTES: usize = 16 * 1024;
/// Longest `detail`, bytes.
pub const MAX_DETAIL_BYTES: usize = 2 * 1024;
/// Longest `auth_user` or `helo`, bytes.
pub const MAX_NAME_BYTES: usize = 512;
/// Longest source path in a batch position, bytes.
pub const MAX_PATH_BYTES: usize = 4096;

const MAX_ATTEMPTS: u32 = 4;

/// Why one event was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The remote address is missing or not 4/16 octets.
    #[error("invalid remote address")]
    Remote,
    /// The local address is not 4/16 octets.
    #[error("invalid local address")]
    Local,
    /// The kind is unspecified or unknown to this server.
    #[error("unknown event kind {0}")]
    Kind(i32),
    /// The time is more than the maximum age (`max_event_age_days`) behind
    /// the server's clock.
    #[error("event older than {max_age_days} days")]
    TooOld {
        /// The limit, days.
        max_age_days: u64,
    },
    /// The time is more than [`MAX_FUTURE`] ahead of the server's clock.
    #[error("event time more than {} s in the future", MAX_FUTURE.as_secs())]
    InFuture,
    /// A port or counter does not fit its column.
    #[error("{0} out of range")]
    Number(&'static str),
    /// A string is too long or holds a NUL byte.
    #[error("{0} too long or not storable")]
    Text(&'static str),
}

impl EventError {
    /// The stable reason code sent in `Ack.rejections` (the agent's metric
    /// label).
    pub fn reason(&self) -> &'static str {
        match self {
            EventError::Remote => "invalid_remote",
            EventError::Local => "invalid_local",
            EventError::Kind(_) => "unknown_kind",
            EventError::TooOld { .. } => "too_old",
            EventError::InFuture => "in_future",
            EventError::Number(_) => "number_out_of_range",
            EventError::Text(_) => "text_too_long",
        }
    }

    /// What the agent's operator can do about it.
    pub fn detail(&self) -> String {
        match self {
            EventError::TooOld { max_age_days } => format!(
                "events older than {max_age_days} days are not stored (server key max_event_age_days); \
                 backfill only newer logs, or raise max_event_age_days on the server (at most events_retention_days)"
            ),
            EventError::InFuture => format!(
                "event times more than {} s ahead of the server's clock: check the agent host's clock and its \
                 `timezone` key",
                MAX_FUTURE.as_secs()
            ),
            EventError::Kind(kind) => {
                format!("the server does not know event kind {kind}: upgrade the server before the agents")
            }
            other => format!("{other}: the agent sent a malformed event; please report it with the agent's version"),
        }
    }
}

/// Events of one batch rejected for one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// [`EventError::reason`].
    pub reason: &'static str,
    /// How many events.
    pub events: u32,
    /// [`EventError::detail`] of the first of them.
    pub detail: String,
}

/// Why a batch as a whole was not stored.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch is invalid as a whole; the agent must not resend it as is.
    #[error("{0}")]
    Invalid(String),
    /// The database failed; the batch was not stored and may be resent.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

/// One validated event, ready for its columns.
#[derive(Debug, Clone)]
struct Row {
    index: i32,
    time: OffsetDateTime,
    kind: EventKind,
    remote: IpAddr,
    remote_port: Option<i32>,
    local: Option<IpAddr>,
    local_port: Option<i32>,
    connection_count: Option<i32>,
    auth_user: Option<String>,
    helo: Option<String>,
    detail: Option<String>,
    duration_ms: Option<i64>,
    raw: Option<String>,
    host_name: Option<String>,
    /// The service; SMTP is stored as null (the column's meaning for rows
    /// from before it existed).
    service: Service,
    /// What the line counts as evidence: its authentication attempts (at
    /// least one, at most `MAX_ATTEMPTS_PER_LINE`).
    times: i32,
}

fn text(value: String, max: usize, what: &'static str) -> Result<Option<String>, EventError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > max || value.contains('\0') {
        return Err(EventError::Text(what));
    }
    Ok(Some(value))
}

fn port(value: u32, what: &'static str) -> Result<Option<i32>, EventError> {
    match value {
        0 => Ok(None),
        1..=65535 => Ok(Some(value as i32)),
        _ => Err(EventError::Number(what)),
    }
}

/// Validates one event against `now`; events older than `max_age` are
/// rejected.
fn validate(index: usize, event: Event, now: OffsetDateTime, max_age: Duration) -> Result<Row, EventError> {
    let kind = EventKind::try_from(event.kind).map_err(|_| EventError::Kind(event.kind))?;
    if kind == EventKind::Unspecified {
        return Err(EventError::Kind(event.kind));
    }
    let remote = event.remote.as_ref().and_then(|a| IpAddr::try_from(a).ok()).ok_or(EventError::Remote)?;
    let local = match &event.local {
        None => None,
        Some(a) => Some(IpAddr::try_from(a).map_err(|_| EventError::Local)?),
    };
    let too_old = EventError::TooOld { max_age_days: max_age.as_secs() / 86_400 };
    let time = OffsetDateTime::from_unix_timestamp_nanos(i128::from(event.time_ms) * 1_000_000)
        .map_err(|_| if event.time_ms < 0 { too_old.clone() } else { EventError::InFuture })?;
    if time > now + MAX_FUTURE {
        return Err(EventError::InFuture);
    }
    if time < now - max_age {
        return Err(too_old);
    }
    let connection_count = match event.connection_count {
        0 => None,
        n => Some(i32::try_from(n).map_err(|_| EventError::Number("connection_count"))?),
    };
    let duration_ms = match event.duration_ms {
        0 => None,
        n => Some(i64::try_from(n).map_err(|_| EventError::Number("duration_ms"))?),
    };
    Ok(Row {
        // MAX_BATCH_EVENTS is checked before any event is validated.
        index: index as i32,
        time,
        kind,
        remote,
        remote_port: port(event.remote_port, "remote_port")?,
        local,
        local_port: port(event.local_port, "local_port")?,
        connection_count,
        auth_user: text(event.auth_user, MAX_NAME_BYTES, "auth_user")?,
        helo: text(event.helo, MAX_NAME_BYTES, "helo")?,
        detail: text(event.detail, MAX_DETAIL_BYTES, "detail")?,
        duration_ms,
        raw: text(event.raw, MAX_RAW_BYTES, "raw")?,
        host_name: text(event.host_name, MAX_NAME_BYTES, "host_name")?.map(|n| n.to_ascii_lowercase()),
        service: Service::from_wire(event.service),
        times: event.attempts.clamp(1, MAX_ATTEMPTS_PER_LINE) as i32,
    })
}

/// What happened to a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The batch seq.
    pub seq: u64,
    /// Events stored by this call (0 for a duplicate).
    pub stored: u32,
    /// Context summaries stored by this call (0 for a duplicate).
    pub summaries: u32,
    /// Events rejected as invalid.
    pub rejected: u32,
    /// The rejected events per reason, in reason order; they add up to
    /// `rejected`.
    pub rejections: Vec<Rejection>,
    /// The batch had already been stored; nothing was written.
    pub duplicate: bool,
    /// Distinct remote addresses of stored abuse events, for correlation.
    pub abuse_addresses: Vec<IpAddr>,
}

/// Evidence of one (address, kind) within a batch.
#[derive(Debug, Clone)]
struct Evidence {
    first: OffsetDateTime,
    last: OffsetDateTime,
    events: i64,
    sample: Option<String>,
}

/// The batch writer; cheap to clone, shared by every session of a server.
#[derive(Debug, Clone)]
pub struct Ingest {
    pool: PgPool,
    /// Events older than this are rejected (`max_event_age_days`).
    max_event_age: Duration,
    known_days: Arc<Mutex<HashSet<Date>>>,
    /// Serialises partition creation within this process.
    creating: Arc<tokio::sync::Mutex<()>>,
    /// Batch transactions in flight at once (see [`Ingest::new`]).
    writers: Arc<tokio::sync::Semaphore>,
    /// Batches waiting for a group commit ([`Ingest::commit`]).
    queue: Arc<Mutex<VecDeque<(Pending, Reply)>>>,
    /// Group commits so far, and the batches they stored.
    groups: Arc<GroupCounters>,
    /// Good standing this process wrote lately: address → (minute of the
    /// latest accepted mail written, verified name written). A busy sender's
    /// row is rewritten at most once a minute (standing is judged in days),
    /// so batches of every agent do not queue on the same rows.
    standing_written: Arc<Mutex<StandingWritten>>,
}

/// Counters of [`Ingest`]'s group commits.
#[derive(Debug, Default)]
struct GroupCounters {
    commits: std::sync::atomic::AtomicU64,
    batches: std::sync::atomic::AtomicU64,
}

/// Group commits so far ([`Ingest::group_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// Transactions that stored at least one batch.
    pub commits: u64,
    /// Batches those transactions stored.
    pub batches: u64,
}

/// Address → (minute of the latest standing written, verified name written).
type StandingWritten = HashMap<IpAddr, (i64, Option<String>)>;

/// Most addresses [`Ingest`] remembers having written standing for; past it
/// the memory is cleared (the next writes go through again).
const MAX_STANDING_REMEMBERED: usize = 200_000;

impl Ingest {
    /// A writer on `pool`. At most a quarter of the pool's connections (at
    /// least 2) write batches at once; the rest stay free for the API,
    /// correlation and the push listener. More concurrent batch
    /// transactions only contend for the same index pages and evidence
    /// rows: on the 2-core bench machine 16 writers cost 10-15 % more CPU
    /// per event than 4.
    pub fn new(pool: PgPool) -> Self {
        let writers = (pool.options().get_max_connections() / 4).max(2) as usize;
        Ingest {
            pool,
            max_event_age: DEFAULT_MAX_EVENT_AGE,
            known_days: Arc::default(),
            creating: Arc::default(),
            writers: Arc::new(tokio::sync::Semaphore::new(writers)),
            queue: Arc::default(),
            groups: Arc::default(),
            standing_written: Arc::default(),
        }
    }

    /// How many transactions stored how many batches so far.
    pub fn group_stats(&self) -> GroupStats {
        use std::sync::atomic::Ordering::Relaxed;
        GroupStats { commits: self.groups.commits.load(Relaxed), batches: self.groups.batches.load(Relaxed) }
    }

    /// Rejects events older than `age` instead of [`DEFAULT_MAX_EVENT_AGE`].
    pub fn with_max_event_age(mut self, age: Duration) -> Self {
        self.max_event_age = age;
        self
    }

    /// Leaves out of `evidence` the standing rows this process wrote within
    /// the same minute with the same name.
    fn skip_written_standing(&self, evidence: &mut BatchEvidence) {
        let mut written = self.standing_written.lock().unwrap_or_else(|e| e.into_inner());
        if written.len() > MAX_STANDING_REMEMBERED {
            written.clear();
        }
        evidence.standing.retain(|address, s| {
            let minute = s.last_accepted.or(s.last_seen).map_or(0, |t| t.unix_timestamp() / 60);
            !matches!(written.get(address), Some((m, name)) if *m >= minute && (s.host_name.is_none() || *name == s.host_name))
        });
    }

    /// Remembers the standing rows of a committed batch.
    fn remember_standing(&self, evidence: &BatchEvidence) {
        let mut written = self.standing_written.lock().unwrap_or_else(|e| e.into_inner());
        for (address, s) in &evidence.standing {
            let minute = s.last_accepted.or(s.last_seen).map_or(0, |t| t.unix_timestamp() / 60);
            written.insert(*address, (minute, s.host_name.clone()));
        }
    }

    /// Validates and stores `batch` from `agent_id` exactly once.
    pub async fn store(&self, agent_id: Uuid, batch: EventBatch) -> Result<Outcome, BatchError> {
        self.store_at(agent_id, batch, OffsetDateTime::now_utc()).await
    }

    /// [`Ingest::store`] with event times validated against `now` (the
    /// replay stores past traffic at the time it happened).
    pub async fn store_at(
        &self,
        agent_id: Uuid,
        batch: EventBatch,
        now: OffsetDateTime,
    ) -> Result<Outcome, BatchError> {
        let seq = i64::try_from(batch.seq)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| BatchError::Invalid(format!("batch seq {} out of range", batch.seq)))?;
        if batch.events.len() > MAX_BATCH_EVENTS {
            return Err(BatchError::Invalid(format!(
                "batch has {} events, at most {MAX_BATCH_EVENTS} allowed",
                batch.events.len()
            )));
        }
        if batch.summaries.len() > crate::summaries::MAX_BATCH_SUMMARIES {
            return Err(BatchError::Invalid(format!(
                "batch has {} summaries, at most {} allowed",
                batch.summaries.len(),
                crate::summaries::MAX_BATCH_SUMMARIES
            )));
        }
        let (path, fingerprint, offset) = match &batch.position {
            None => (None, None, None),
            Some(p) => {
                if p.path.len() > MAX_PATH_BYTES || p.path.contains('\0') {
                    return Err(BatchError::Invalid("source path too long or not storable".into()));
                }
                let offset =
                    i64::try_from(p.offset).map_err(|_| BatchError::Invalid("source offset out of range".into()))?;
                // The fingerprint is an opaque 64-bit value; stored bit for bit.
                (Some(p.path.clone()), Some(p.fingerprint as i64), Some(offset))
            }
        };

        let total = batch.events.len();
        let mut rows = Vec::with_capacity(total);
        let mut by_reason: BTreeMap<&'static str, Rejection> = BTreeMap::new();
        for (index, event) in batch.events.into_iter().enumerate() {
            match validate(index, event, now, self.max_event_age) {
                Ok(row) => rows.push(row),
                Err(error) => {
                    let reason = error.reason();
                    by_reason
                        .entry(reason)
                        .or_insert_with(|| Rejection { reason, events: 0, detail: error.detail() })
                        .events += 1;
                }
            }
        }
        // Summaries are validated like events and rejected under the same
        // reasons.
        let total_summaries = batch.summaries.len();
        let mut summaries = Vec::with_capacity(total_summaries);
        for (index, summary) in batch.summaries.into_iter().enumerate() {
            match crate::summaries::validate(index, summary, now, self.max_event_age) {
                Ok(row) => summaries.push(row),
                Err(error) => {
                    let reason = error.reason();
                    by_reason
                        .entry(reason)
                        .or_insert_with(|| Rejection { reason, events: 0, detail: error.detail() })
                        .events += 1;
                }
            }
        }
        let rejected = (total - rows.len() + total_summaries - summaries.len()) as u32;
        let rejections: Vec<Rejection> = by_reason.into_values().collect();
        for rejection in &rejections {
            tracing::debug!(
                %agent_id, seq, reason = rejection.reason, events = rejection.events,
                "Rejected invalid events of a batch."
            );
        }

        let days = batch_days(&rows, &summaries);
        self.ensure_partitions(&days).await?;
        let events = copy_events(agent_id, seq, &rows);
        let summary_copy = crate::summaries::copy_summaries(agent_id, seq, &summaries);
        let mut evidence = BatchEvidence::of(&rows);
        evidence.add_summaries(&summaries);
        self.skip_written_standing(&mut evidence);
        let abuse_addresses: Vec<IpAddr> = evidence.offenders.keys().copied().collect();

        let record = BatchRecord {
            agent_id,
            seq,
            events: rows.len() as i32,
            rejected: rejected as i32,
            path,
            fingerprint,
            offset,
        };
        let pending =
            Pending { record, events, summaries: summary_copy, summary_rows: summaries.len(), evidence, days };
        if self.commit(pending).await? {
            Ok(Outcome {
                seq: batch.seq,
                stored: rows.len() as u32,
                summaries: summaries.len() as u32,
                rejected,
                rejections,
                duplicate: false,
                abuse_addresses,
            })
        } else {
            Ok(Outcome {
                seq: batch.seq,
                stored: 0,
                summaries: 0,
                rejected,
                rejections,
                duplicate: true,
                abuse_addresses: Vec::new(),
            })
        }
    }

    /// Queues `pending` for the next group commit and waits for its
    /// outcome: true when stored, false when it was a duplicate.
    ///
    /// Whoever gets a writer slot takes the batches queued by then (up to
    /// [`MAX_GROUP_BATCHES`] / [`MAX_GROUP_EVENTS`]) and writes them in one
    /// transaction on a task of its own, so a session that goes away while
    /// waiting never cancels the write of other agents' batches. Under light
    /// load a group is a single batch and nothing waits for company.
    async fn commit(&self, pending: Pending) -> Result<bool, sqlx::Error> {
        let (reply, mut outcome) = tokio::sync::oneshot::channel();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back((pending, reply));
        loop {
            tokio::select! {
                biased;
                result = &mut outcome => return result.unwrap_or_else(|_| Err(sqlx::Error::WorkerCrashed)),
                // The semaphore is never closed, so acquiring only waits.
                Ok(permit) = self.writers.clone().acquire_owned() => {
                    let group = self.take_group();
                    if group.is_empty() {
                        // Ours is being written by another group.
                        drop(permit);
                        return (&mut outcome).await.unwrap_or_else(|_| Err(sqlx::Error::WorkerCrashed));
                    }
                    let ingest = self.clone();
                    tokio::spawn(async move {
                        ingest.write_group(group).await;
                        drop(permit);
                    });
                }
            }
        }
    }

    /// The oldest queued batches, as many as one group takes.
    fn take_group(&self) -> Vec<(Pending, Reply)> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut group = Vec::new();
        let mut events = 0;
        while let Some((pending, _)) = queue.front() {
            let n = pending.record.events as usize + pending.summary_rows;
            if !group.is_empty() && (group.len() >= MAX_GROUP_BATCHES || events + n > MAX_GROUP_EVENTS) {
                break;
            }
            events += n;
            group.extend(queue.pop_front());
        }
        group
    }

    /// Writes `group` in one transaction and answers each batch. A
    /// deadlock, serialization failure or dropped partition is retried; any
    /// other failure of a group of several writes each batch on its own, so
    /// that one batch the database refuses fails alone.
    async fn write_group(&self, group: Vec<(Pending, Reply)>) {
        let (pending, replies): (Vec<Pending>, Vec<Reply>) = group.into_iter().unzip();
        match self.write_retrying(&pending).await {
            Ok(stored) => self.stored(&pending, replies, stored),
            Err(error) if pending.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(error));
                }
            }
            Err(error) => {
                tracing::debug!(%error, batches = pending.len(), "A group of batches failed; writing each alone.");
                for (p, reply) in pending.iter().zip(replies) {
                    let one = std::slice::from_ref(p);
                    match self.write_retrying(one).await {
                        Ok(stored) => self.stored(one, vec![reply], stored),
                        Err(error) => {
                            let _ = reply.send(Err(error));
                        }
                    }
                }
            }
        }
    }

    /// [`Ingest::write`], retrying a deadlock, a serialization failure or
    /// a dropped partition.
    async fn write_retrying(&self, group: &[Pending]) -> Result<Vec<bool>, sqlx::Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.write(group).await {
                Err(error) if attempt < MAX_ATTEMPTS && retryable(&error) => {
                    if is_missing_partition(&error) {
                        self.forget_days();
                        let mut days: Vec<Date> = group.iter().flat_map(|p| p.days.iter().copied()).collect();
                        days.sort_unstable();
                        days.dedup();
                        self.ensure_partitions(&days).await?;
                    }
                    tracing::debug!(%error, batches = group.len(), attempt, "Retrying a batch transaction.");
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                result => return result,
            }
        }
    }

    /// Counts a committed group and answers each of its batches (`stored`:
    /// false for a duplicate).
    fn stored(&self, group: &[Pending], replies: Vec<Reply>, stored: Vec<bool>) {
        let n = stored.iter().filter(|s| **s).count() as u64;
        if n > 0 {
            use std::sync::atomic::Ordering::Relaxed;
            self.groups.commits.fetch_add(1, Relaxed);
            self.groups.batches.fetch_add(n, Relaxed);
            metrics::counter!(crate::telemetry::INGEST_GROUP_COMMITS).increment(1);
        }
        for ((p, reply), stored) in group.iter().zip(replies).zip(stored) {
            if stored {
                self.remember_standing(&p.evidence);
            }
            let _ = reply.send(Ok(stored));
        }
    }

    /// Creates the day partitions (of `events` and `context_summaries`)
    /// `days` need that are not known to exist.
    async fn ensure_partitions(&self, days: &[Date]) -> Result<(), sqlx::Error> {
        if self.unknown_days(days).is_empty() {
            return Ok(());
        }
        let _creating = self.creating.lock().await;
        for day in self.unknown_days(days) {
            let created = sqlx::query("select fleetban_ensure_event_partition($1)").bind(day).execute(&self.pool).await;
            match created {
                Ok(_) => {}
                // Another server process created it between the function's
                // check and its `create table`.
                Err(error) if sqlstate(&error).as_deref() == Some("42P07") => {}
                Err(error) => return Err(error),
            }
            self.known_days.lock().unwrap_or_else(|e| e.into_inner()).insert(day);
        }
        Ok(())
    }

    /// The days of `days` not known to have a partition.
    fn unknown_days(&self, days: &[Date]) -> Vec<Date> {
        let known = self.known_days.lock().unwrap_or_else(|e| e.into_inner());
        days.iter().copied().filter(|d| !known.contains(d)).collect()
    }

    fn forget_days(&self) {
        self.known_days.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// One transaction: the batch records, the events, the summaries, the
    /// evidence of every batch of `group`. Returns per batch whether it was
    /// stored (false: it was already stored, and nothing of it is written
    /// again).
    async fn write(&self, group: &[Pending]) -> Result<Vec<bool>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut agent = Vec::with_capacity(group.len());
        let mut seq = Vec::with_capacity(group.len());
        let (mut events, mut rejected, mut path, mut fingerprint, mut offset) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for p in group {
            let r = &p.record;
            agent.push(r.agent_id);
            seq.push(r.seq);
            events.push(r.events);
            rejected.push(r.rejected);
            path.push(r.path.as_deref());
            fingerprint.push(r.fingerprint);
            offset.push(r.offset);
        }
        let inserted: Vec<(Uuid, i64)> = sqlx::query_as(
            "insert into agent_batches (agent_id, seq, events, rejected, source_path, source_fingerprint, source_offset) \
             select * from unnest($1::uuid[], $2::int8[], $3::int4[], $4::int4[], $5::text[], $6::int8[], $7::int8[]) \
             on conflict (agent_id, seq) do nothing returning agent_id, seq",
        )
        .bind(&agent)
        .bind(&seq)
        .bind(&events)
        .bind(&rejected)
        .bind(&path)
        .bind(&fingerprint)
        .bind(&offset)
        .fetch_all(&mut *tx)
        .await?;
        // A batch sent twice within one group is stored by its first copy.
        let mut inserted: HashSet<(Uuid, i64)> = inserted.into_iter().collect();
        let stored: Vec<bool> = group.iter().map(|p| inserted.remove(&(p.record.agent_id, p.record.seq))).collect();
        if !stored.contains(&true) {
            tx.rollback().await?;
            return Ok(stored);
        }
        let written = || group.iter().zip(&stored).filter(|(_, s)| **s).map(|(p, _)| p);
        if let Some(events) = crate::pgcopy::concat(written().filter_map(|p| p.events.as_deref())) {
            let mut copy = tx.copy_in_raw(COPY_EVENTS).await?;
            copy.send(events).await?;
            copy.finish().await?;
        }
        if let Some(summaries) = crate::pgcopy::concat(written().filter_map(|p| p.summaries.as_deref())) {
            let mut copy = tx.copy_in_raw(crate::summaries::COPY_SUMMARIES).await?;
            copy.send(summaries).await?;
            copy.finish().await?;
        }
        let evidence = GroupEvidence::of(written().map(|p| (p.record.agent_id, &p.evidence)));
        evidence.write(&mut tx).await?;
        let series: Vec<(Uuid, &crate::timeseries::BatchSeries)> =
            written().map(|p| (p.record.agent_id, &p.evidence.series)).collect();
        crate::timeseries::BatchSeries::write_all(&series, &mut tx).await?;
        tx.commit().await?;
        Ok(stored)
    }
}

/// The days (UTC) of the events and summaries of a batch, sorted, once each.
fn batch_days(rows: &[Row], summaries: &[crate::summaries::SummaryRow]) -> Vec<Date> {
    let mut days: Vec<Date> =
        rows.iter().map(|r| r.time.date()).chain(summaries.iter().map(|s| s.interval_start.date())).collect();
    days.sort_unstable();
    days.dedup();
    days
}

/// The `agent_batches` row of a batch.
#[derive(Debug)]
struct BatchRecord {
    agent_id: Uuid,
    seq: i64,
    events: i32,
    rejected: i32,
    path: Option<String>,
    fingerprint: Option<i64>,
    offset: Option<i64>,
}

/// A validated batch waiting for its group commit.
#[derive(Debug)]
struct Pending {
    record: BatchRecord,
    /// Its events' binary `COPY` stream.
    events: Option<Vec<u8>>,
    /// Its summaries' binary `COPY` stream.
    summaries: Option<Vec<u8>>,
    /// How many summaries that stream holds.
    summary_rows: usize,
    evidence: BatchEvidence,
    /// The days of its events and summaries.
    days: Vec<Date>,
}

/// Where the outcome of a queued batch goes.
type Reply = tokio::sync::oneshot::Sender<Result<bool, sqlx::Error>>;

/// Most batches one group commit takes.
const MAX_GROUP_BATCHES: usize = 256;
/// Most events (and summaries) one group commit takes, unless a single
/// batch has more.
const MAX_GROUP_EVENTS: usize = 20_000;

/// The `COPY` statement of a batch's events; [`copy_events`] writes its
/// fields in this order.
const COPY_EVENTS: &str = "copy events (agent_id, batch_seq, batch_index, time, kind, remote, remote_port, local, \
     local_port, connection_count, auth_user, helo, detail, duration_ms, raw, host_name, service) \
     from stdin with (format binary)";

/// The binary `COPY` stream of `rows`; `None` when there are none.
fn copy_events(agent_id: Uuid, seq: i64, rows: &[Row]) -> Option<Vec<u8>> {
    if rows.is_empty() {
        return None;
    }
    let bytes: usize = rows.iter().map(|r| 160 + r.raw.as_ref().map_or(0, String::len)).sum();
    let mut c = CopyBuf::with_capacity(bytes);
    for r in rows {
        c.row(17);
        c.uuid(agent_id);
        c.i64(seq);
        c.i32(r.index);
        c.timestamptz(r.time);
        c.text(r.kind.as_str());
        c.inet(r.remote);
        c.opt_i32(r.remote_port);
        c.opt_inet(r.local);
        c.opt_i32(r.local_port);
        c.opt_i32(r.connection_count);
        c.opt_text(r.auth_user.as_deref());
        c.opt_text(r.helo.as_deref());
        c.opt_text(r.detail.as_deref());
        c.opt_i64(r.duration_ms);
        c.opt_text(r.raw.as_deref());
        c.opt_text(r.host_name.as_deref());
        c.opt_text((r.service != Service::Smtp).then(|| r.service.as_str()));
    }
    Some(c.finish())
}

/// What one batch adds to the evidence tables, in address order (so that
/// concurrent batches over the same addresses lock rows in one order).
#[derive(Debug, Default)]
struct BatchEvidence {
    /// Per (address, kind): `offender_hosts`.
    hosts: BTreeMap<(IpAddr, &'static str), Evidence>,
    /// Per address: `offenders`.
    offenders: BTreeMap<IpAddr, Evidence>,
    /// Per (address, kind, minute): `evidence_minutes`.
    minutes: BTreeMap<(IpAddr, &'static str, OffsetDateTime), i32>,
    /// Per (address, failing user): `auth_users`.
    users: BTreeMap<(IpAddr, String), OffsetDateTime>,
    /// Per address with accepted mail or a verified name: `sender_standing`.
    standing: BTreeMap<IpAddr, Standing>,
    /// The dashboard's minute series (`crate::timeseries`).
    series: crate::timeseries::BatchSeries,
}

/// Good standing seen in one batch for one address.
#[derive(Debug, Default)]
struct Standing {
    host_name: Option<String>,
    last_accepted: Option<OffsetDateTime>,
    accepted: i64,
    last_seen: Option<OffsetDateTime>,
}

/// `t` truncated to its minute.
fn minute(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).and_then(|t| t.replace_second(0)).unwrap_or(t)
}

impl BatchEvidence {
    fn of(rows: &[Row]) -> Self {
        let mut ev = BatchEvidence::default();
        for r in rows {
            ev.series.add(r.kind, r.time, r.connection_count);
            let kind = r.kind.as_str();
            if r.kind.earns_standing() || r.host_name.is_some() {
                let s = ev.standing.entry(r.remote).or_default();
                if r.host_name.is_some() {
                    s.host_name.clone_from(&r.host_name);
                }
                if r.kind.earns_standing() {
                    s.accepted += 1;
                    s.last_accepted = Some(s.last_accepted.map_or(r.time, |t| t.max(r.time)));
                }
                s.last_seen = Some(s.last_seen.map_or(r.time, |t| t.max(r.time)));
            }
            if !r.kind.is_abuse() {
                continue;
            }
            let add = |e: &mut Evidence| {
                e.first = e.first.min(r.time);
                e.last = e.last.max(r.time);
                e.events += 1;
                if e.sample.is_none() {
                    e.sample.clone_from(&r.raw);
                }
            };
            let fresh = || Evidence { first: r.time, last: r.time, events: 0, sample: None };
            add(ev.hosts.entry((r.remote, kind)).or_insert_with(fresh));
            add(ev.offenders.entry(r.remote).or_insert_with(fresh));
            // A Dovecot line reports all the guesses of its session.
            *ev.minutes.entry((r.remote, kind, minute(r.time))).or_default() += r.times;
            if r.kind == EventKind::AuthFailed
                && let Some(user) = &r.auth_user
            {
                let seen = ev.users.entry((r.remote, user.clone())).or_insert(r.time);
                *seen = (*seen).max(r.time);
            }
        }
        ev
    }

    /// Adds what context summaries say: good standing (accepted mail and
    /// logins, the verified name) exactly as their lines would, and the
    /// slot series (highest connection count, refusals of a full host).
    fn add_summaries(&mut self, summaries: &[crate::summaries::SummaryRow]) {
        for r in summaries {
            self.series.add_summary(
                r.interval_start,
                r.max_connection_count.filter(|_| r.count(EventKind::Connect) > 0),
                r.count(EventKind::RefusedTooMany),
            );
            let (accepted, last_accepted) = r.standing();
            if accepted == 0 && r.host_name.is_none() {
                continue;
            }
            let s = self.standing.entry(r.remote).or_default();
            if r.host_name.is_some() {
                s.host_name.clone_from(&r.host_name);
            }
            if let Some(at) = last_accepted {
                s.accepted += i64::from(accepted);
                s.last_accepted = Some(s.last_accepted.map_or(at, |t| t.max(at)));
            }
            s.last_seen = Some(s.last_seen.map_or(r.last_seen, |t| t.max(r.last_seen)));
        }
    }
}

/// The evidence of a group of batches (of any agents), merged so that each
/// row is touched once, in key order (so that concurrent groups that share
/// addresses lock rows in one order).
#[derive(Debug, Default)]
struct GroupEvidence<'a> {
    /// Per (address, agent, kind): `offender_hosts`.
    hosts: BTreeMap<(IpAddr, Uuid, &'static str), Evidence>,
    /// Per address: `offenders`.
    offenders: BTreeMap<IpAddr, Evidence>,
    /// Per (address, agent, kind, minute): `evidence_minutes`.
    minutes: BTreeMap<(IpAddr, Uuid, &'static str, OffsetDateTime), i32>,
    /// Per (address, agent, failing user): `auth_users`.
    users: BTreeMap<(IpAddr, Uuid, &'a str), OffsetDateTime>,
    /// Per address: `sender_standing`.
    standing: BTreeMap<IpAddr, Standing>,
}

/// Folds `e` into the evidence of `key` in `map`.
fn merge<K: Ord>(map: &mut BTreeMap<K, Evidence>, key: K, e: &Evidence) {
    match map.entry(key) {
        std::collections::btree_map::Entry::Vacant(v) => {
            v.insert(e.clone());
        }
        std::collections::btree_map::Entry::Occupied(mut o) => {
            let into = o.get_mut();
            into.first = into.first.min(e.first);
            into.last = into.last.max(e.last);
            into.events += e.events;
            if into.sample.is_none() {
                into.sample.clone_from(&e.sample);
            }
        }
    }
}

impl<'a> GroupEvidence<'a> {
    fn of(batches: impl Iterator<Item = (Uuid, &'a BatchEvidence)>) -> Self {
        let mut g = GroupEvidence::default();
        for (agent, ev) in batches {
            for ((address, kind), e) in &ev.hosts {
                merge(&mut g.hosts, (*address, agent, *kind), e);
            }
            for (address, e) in &ev.offenders {
                merge(&mut g.offenders, *address, e);
            }
            for ((address, kind, minute), n) in &ev.minutes {
                *g.minutes.entry((*address, agent, kind, *minute)).or_default() += n;
            }
            for ((address, user), seen) in &ev.users {
                let at = g.users.entry((*address, agent, user.as_str())).or_insert(*seen);
                *at = (*at).max(*seen);
            }
            for (address, s) in &ev.standing {
                let into = g.standing.entry(*address).or_default();
                if s.host_name.is_some() {
                    into.host_name.clone_from(&s.host_name);
                }
                into.accepted += s.accepted;
                into.last_accepted = into.last_accepted.max(s.last_accepted);
                into.last_seen = into.last_seen.max(s.last_seen);
            }
        }
        g
    }

    /// Writes the evidence rows (per-host and per-address offenders,
    /// windowed counts, failing users, good standing) inside the group's
    /// transaction.
    async fn write(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        if !self.hosts.is_empty() {
            let mut address = Vec::with_capacity(self.hosts.len());
            let mut agent = Vec::with_capacity(self.hosts.len());
            let mut kind = Vec::with_capacity(self.hosts.len());
            let (mut first, mut last, mut events, mut sample) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((a, g, k), e) in &self.hosts {
                address.push(*a);
                agent.push(*g);
                kind.push(*k);
                first.push(e.first);
                last.push(e.last);
                events.push(e.events);
                sample.push(e.sample.as_deref());
            }
            // Per (address, agent, kind); `xmax = 0` marks rows this
            // statement inserted rather than updated.
            let created: Vec<(IpAddr, bool)> = sqlx::query_as(
                "insert into offender_hosts (address, agent_id, kind, first_seen, last_seen, events, sample_raw) \
                 select a, g, k, f, l, n, s from unnest($1::inet[], $2::uuid[], $3::text[], $4::timestamptz[], \
                 $5::timestamptz[], $6::int8[], $7::text[]) as t(a, g, k, f, l, n, s) \
                 on conflict (address, agent_id, kind) do update set \
                 first_seen = least(offender_hosts.first_seen, excluded.first_seen), \
                 last_seen = greatest(offender_hosts.last_seen, excluded.last_seen), \
                 events = offender_hosts.events + excluded.events, \
                 sample_raw = coalesce(excluded.sample_raw, offender_hosts.sample_raw) \
                 returning address, xmax = 0",
            )
            .bind(&address)
            .bind(&agent)
            .bind(&kind)
            .bind(&first)
            .bind(&last)
            .bind(&events)
            .bind(&sample)
            .fetch_all(&mut *tx)
            .await?;
            let mut address = Vec::with_capacity(self.offenders.len());
            let (mut first, mut last, mut events) = (Vec::new(), Vec::new(), Vec::new());
            for (a, e) in &self.offenders {
                address.push(*a);
                first.push(e.first);
                last.push(e.last);
                events.push(e.events);
            }
            // Rows are locked in address order (the map's order), so
            // concurrent groups over the same addresses cannot deadlock.
            sqlx::query(
                "insert into offenders (address, first_seen, last_seen, events, hosts) \
                 select t.a, t.f, t.l, t.n, 0 \
                 from unnest($1::inet[], $2::timestamptz[], $3::timestamptz[], $4::int8[]) as t(a, f, l, n) \
                 on conflict (address) do update set \
                 first_seen = least(offenders.first_seen, excluded.first_seen), \
                 last_seen = greatest(offenders.last_seen, excluded.last_seen), \
                 events = offenders.events + excluded.events",
            )
            .bind(&address)
            .bind(&first)
            .bind(&last)
            .bind(&events)
            .execute(&mut *tx)
            .await?;
            // The host count changes only when an (address, agent, kind) row
            // is new. This runs after the statement above took the offenders
            // row locks, so it sees every concurrent group that committed a
            // new host for the same address before us.
            let mut new_hosts: Vec<IpAddr> = created.into_iter().filter(|(_, new)| *new).map(|(a, _)| a).collect();
            if !new_hosts.is_empty() {
                new_hosts.sort_unstable();
                new_hosts.dedup();
                sqlx::query(
                    "update offenders o set hosts = \
                       (select count(distinct oh.agent_id) from offender_hosts oh where oh.address = o.address) \
                     where o.address = any($1::inet[])",
                )
                .bind(&new_hosts)
                .execute(&mut *tx)
                .await?;
            }
        }
        if !self.minutes.is_empty() {
            let (mut a, mut g, mut k, mut m, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((address, agent, kind, min), count) in &self.minutes {
                a.push(*address);
                g.push(*agent);
                k.push(*kind);
                m.push(*min);
                n.push(*count);
            }
            sqlx::query(
                "insert into evidence_minutes (address, agent_id, kind, minute, events) \
                 select a, g, k, m, n from unnest($1::inet[], $2::uuid[], $3::text[], $4::timestamptz[], $5::int4[]) \
                   as t(a, g, k, m, n) \
                 on conflict (address, agent_id, kind, minute) do update set events = evidence_minutes.events + excluded.events",
            )
            .bind(&a)
            .bind(&g)
            .bind(&k)
            .bind(&m)
            .bind(&n)
            .execute(&mut *tx)
            .await?;
        }
        if !self.users.is_empty() {
            let (mut a, mut g, mut u, mut t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((address, agent, user), seen) in &self.users {
                a.push(*address);
                g.push(*agent);
                u.push(*user);
                t.push(*seen);
            }
            sqlx::query(
                "insert into auth_users (address, agent_id, auth_user, last_seen) \
                 select a, g, u, t from unnest($1::inet[], $2::uuid[], $3::text[], $4::timestamptz[]) as x(a, g, u, t) \
                 on conflict (address, agent_id, auth_user) do update set \
                 last_seen = greatest(auth_users.last_seen, excluded.last_seen)",
            )
            .bind(&a)
            .bind(&g)
            .bind(&u)
            .bind(&t)
            .execute(&mut *tx)
            .await?;
        }
        if !self.standing.is_empty() {
            let (mut a, mut h, mut la, mut n, mut ls) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (address, s) in &self.standing {
                a.push(*address);
                h.push(s.host_name.as_deref());
                la.push(s.last_accepted);
                n.push(s.accepted);
                ls.push(s.last_seen);
            }
            sqlx::query(
                "insert into sender_standing (address, host_name, last_accepted, accepted, last_seen) \
                 select a, h, la, n, ls from unnest($1::inet[], $2::text[], $3::timestamptz[], $4::int8[], $5::timestamptz[]) \
                   as x(a, h, la, n, ls) \
                 on conflict (address) do update set \
                 host_name = coalesce(excluded.host_name, sender_standing.host_name), \
                 last_accepted = greatest(sender_standing.last_accepted, excluded.last_accepted), \
                 accepted = sender_standing.accepted + excluded.accepted, \
                 last_seen = greatest(sender_standing.last_seen, excluded.last_seen)",
            )
            .bind(&a)
            .bind(&h)
            .bind(&la)
            .bind(&n)
            .bind(&ls)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned())
}

/// Deadlock, serialization failure, or a day partition dropped under us.
fn retryable(error: &sqlx::Error) -> bool {
    crate::db::is_conflict(error) || is_missing_partition(error)
}

/// `no partition of relation "events" found for row` (check_violation on
/// the partitioned parent).
fn is_missing_partition(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.code().as_deref() == Some("23514") && e.table().is_none_or(|t| t == "events"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetban_proto::v1::{IpAddress, SourcePosition};

    fn ip(s: &str) -> Option<IpAddress> {
        Some(s.parse::<IpAddr>().unwrap().into())
    }

    fn event(kind: EventKind, remote: &str) -> Event {
        Event {
            time_ms: (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64,
            kind: kind as i32,
            remote: ip(remote),
            remote_port: 40000,
            local_port: 25,
            raw: format!("2026-11-27 10:00:00 H=({remote}) [{remote}] rejected"),
            ..Default::default()
        }
    }

    #[test]
    fn invalid_events_are_named() {
        let now = OffsetDateTime::now_utc();
        let ok = event(EventKind::AuthFailed, "192.0.2.1");
        assert!(validate(0, ok.clone(), now, DEFAULT_MAX_EVENT_AGE).is_ok());
        let cases: Vec<(Event, EventError)> = vec![
            (Event { remote: Some(IpAddress { octets: vec![1, 2, 3] }), ..ok.clone() }, EventError::Remote),
            (Event { remote: None, ..ok.clone() }, EventError::Remote),
            (Event { local: Some(IpAddress { octets: vec![1; 5] }), ..ok.clone() }, EventError::Local),
            (Event { kind: 0, ..ok.clone() }, EventError::Kind(0)),
            (Event { kind: 9999, ..ok.clone() }, EventError::Kind(9999)),
            (Event { time_ms: ok.time_ms + 11 * 60 * 1000, ..ok.clone() }, EventError::InFuture),
            (Event { time_ms: i64::MAX, ..ok.clone() }, EventError::InFuture),
            (Event { time_ms: ok.time_ms - 31 * 86_400_000, ..ok.clone() }, EventError::TooOld { max_age_days: 30 }),
            (Event { remote_port: 70000, ..ok.clone() }, EventError::Number("remote_port")),
            (Event { connection_count: u32::MAX, ..ok.clone() }, EventError::Number("connection_count")),
            (Event { helo: "x".repeat(MAX_NAME_BYTES + 1), ..ok.clone() }, EventError::Text("helo")),
            (Event { raw: "a\0b".into(), ..ok.clone() }, EventError::Text("raw")),
        ];
        for (e, expected) in cases {
            assert_eq!(validate(0, e, now, DEFAULT_MAX_EVENT_AGE).unwrap_err(), expected);
        }
        let near_future = Event { time_ms: ok.time_ms + 9 * 60 * 1000, ..ok };
        assert!(validate(0, near_future, now, DEFAULT_MAX_EVENT_AGE).is_ok());
    }

    async fn agent(pool: &PgPool) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query("insert into agents (id, name, hostname, secret_hash) values ($1, 'a', 'a', '\\x00')")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        id
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn the_event_age_limit_is_configurable_and_rejections_carry_their_reason(pool: PgPool) {
        let a = agent(&pool).await;
        let day_ms = 86_400_000;
        let backfilled = |days: i64| {
            let e = event(EventKind::AuthFailed, "192.0.2.7");
            Event { time_ms: e.time_ms - days * day_ms, ..e }
        };
        let mut events = vec![backfilled(40), backfilled(45), backfilled(1)];
        events.push(Event { remote: None, ..backfilled(1) });
        let batch = |seq| EventBatch { seq, events: events.clone(), position: None, summaries: Vec::new() };

        let default = Ingest::new(pool.clone()).store(a, batch(1)).await.unwrap();
        assert_eq!((default.stored, default.rejected), (1, 3));
        let reasons: Vec<(&str, u32)> = default.rejections.iter().map(|r| (r.reason, r.events)).collect();
        assert_eq!(reasons, [("invalid_remote", 1), ("too_old", 2)]);
        let too_old = &default.rejections[1];
        assert!(too_old.detail.contains("max_event_age_days") && too_old.detail.contains("30 days"), "{too_old:?}");

        let longer = Ingest::new(pool.clone()).with_max_event_age(Duration::from_secs(60 * 86_400));
        let outcome = longer.store(a, batch(2)).await.unwrap();
        assert_eq!((outcome.stored, outcome.rejected), (3, 1), "{outcome:?}");
        assert_eq!(outcome.rejections.iter().map(|r| r.reason).collect::<Vec<_>>(), ["invalid_remote"]);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn dovecot_events_keep_their_service_and_count_their_attempts(pool: PgPool) {
        let ingest = Ingest::new(pool.clone());
        let a = agent(&pool).await;
        let imap = Event {
            service: fleetban_proto::v1::Service::Imap as i32,
            attempts: 3,
            auth_user: "alice".into(),
            ..event(EventKind::AuthFailed, "192.0.2.7")
        };
        let smtp = event(EventKind::AuthFailed, "192.0.2.7");
        let forged = Event { attempts: u32::MAX, ..imap.clone() };
        let login =
            Event { service: fleetban_proto::v1::Service::Pop3 as i32, ..event(EventKind::Login, "198.51.100.9") };
        let batch =
            EventBatch { seq: 1, events: vec![imap, smtp, forged, login], position: None, summaries: Vec::new() };
        let outcome = ingest.store(a, batch).await.unwrap();
        assert_eq!((outcome.stored, outcome.rejected), (4, 0));
        let services: Vec<(String, Option<String>)> =
            sqlx::query_as("select kind, service from events order by batch_index").fetch_all(&pool).await.unwrap();
        let services: Vec<(&str, Option<&str>)> = services.iter().map(|(k, s)| (k.as_str(), s.as_deref())).collect();
        assert_eq!(
            services,
            [
                ("auth_failed", Some("imap")),
                ("auth_failed", None),
                ("auth_failed", Some("imap")),
                ("login", Some("pop3"))
            ]
        );
        // 3 guesses + 1 + the cap for a forged count, in one evidence row.
        let counted: i64 = sqlx::query_scalar(
            "select sum(events)::bigint from evidence_minutes where address = '192.0.2.7' and kind = 'auth_failed'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(counted, 4 + i64::from(MAX_ATTEMPTS_PER_LINE));
        // A POP3 login is good standing like accepted mail.
        let standing: i64 = sqlx::query_scalar("select count(*) from sender_standing where address = '198.51.100.9'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(standing, 1);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn batch_is_stored_once_with_evidence(pool: PgPool) {
        let ingest = Ingest::new(pool.clone());
        let (a, b) = (agent(&pool).await, agent(&pool).await);
        let mut events = vec![
            event(EventKind::AuthFailed, "192.0.2.7"),
            event(EventKind::AuthFailed, "192.0.2.7"),
            event(EventKind::Connect, "198.51.100.1"),
            event(EventKind::RelayDenied, "2001:db8::1"),
        ];
        events.push(Event { remote: Some(IpAddress { octets: vec![9] }), ..events[0].clone() });
        let position = Some(SourcePosition {
            path: "/var/log/exim_mainlog".into(),
            fingerprint: u64::MAX,
            offset: 42,
            open_from: None,
        });
        let batch = EventBatch { seq: 1, events, position, summaries: Vec::new() };
        let first = ingest.store(a, batch.clone()).await.unwrap();
        assert_eq!((first.stored, first.rejected, first.duplicate), (4, 1, false));
        assert_eq!(first.abuse_addresses.len(), 2);
        let again = ingest.store(a, batch.clone()).await.unwrap();
        assert_eq!((again.stored, again.duplicate), (0, true));
        let n: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await.unwrap();
        assert_eq!(n, 4, "a resent batch must not be stored twice");
        let (fp, rejected): (i64, i32) =
            sqlx::query_as("select source_fingerprint, rejected from agent_batches").fetch_one(&pool).await.unwrap();
        assert_eq!((fp as u64, rejected), (u64::MAX, 1));

        ingest.store(b, batch).await.unwrap();
        let (events, hosts): (i64, i32) =
            sqlx::query_as("select events, hosts from offenders where address = '192.0.2.7'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((events, hosts), (4, 2));
        let (n, sample): (i64, Option<String>) = sqlx::query_as(
            "select events, sample_raw from offender_hosts where address = '192.0.2.7' and agent_id = $1 and kind = 'auth_failed'",
        )
        .bind(a)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 2);
        assert!(sample.unwrap().contains("192.0.2.7"));
        let connects: i64 = sqlx::query_scalar("select count(*) from offenders where address = '198.51.100.1'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(connects, 0, "a connect is not abuse");
    }

    /// Many agents report the same addresses at the same time: every
    /// address's host count ends equal to its distinct agents, and every
    /// event of every batch is stored once, with the full row intact.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn concurrent_agents_keep_host_counts_exact(pool: PgPool) {
        let ingest = Ingest::new(pool.clone());
        let mut agents = Vec::new();
        for _ in 0..8 {
            agents.push(agent(&pool).await);
        }
        let addresses: Vec<String> = (0..40).map(|i| format!("203.0.113.{i}")).collect();
        let mut tasks = Vec::new();
        for (n, id) in agents.iter().copied().enumerate() {
            let ingest = ingest.clone();
            // Agent n reports addresses n.. so host counts differ per address.
            let events: Vec<Event> = addresses[n..]
                .iter()
                .map(|a| Event {
                    auth_user: "info@example.com".into(),
                    local: ip("192.0.2.25"),
                    local_port: 587,
                    duration_ms: 1500,
                    ..event(EventKind::AuthFailed, a)
                })
                .collect();
            tasks.push(tokio::spawn(async move {
                for seq in 1..=3 {
                    ingest
                        .store(id, EventBatch { seq, events: events.clone(), position: None, summaries: Vec::new() })
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rows: Vec<(IpAddr, i32, i64)> =
            sqlx::query_as("select address, hosts, events from offenders order by address")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(rows.len(), 40);
        for (address, hosts, events) in rows {
            let i: usize = address.to_string().rsplit('.').next().unwrap().parse().unwrap();
            let expected = (i + 1).min(8) as i32;
            assert_eq!(hosts, expected, "{address}");
            assert_eq!(events, 3 * i64::from(expected), "{address}");
        }
        let stored: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await.unwrap();
        assert_eq!(stored, 3 * (40 + 39 + 38 + 37 + 36 + 35 + 34 + 33));
        let (user, local, port, duration): (String, IpAddr, i32, i64) = sqlx::query_as(
            "select auth_user, local, local_port, duration_ms from events where remote = '203.0.113.39' limit 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            (user.as_str(), local, port, duration),
            ("info@example.com", "192.0.2.25".parse().unwrap(), 587, 1500)
        );
    }

    /// Many agents' batches, each sent twice at once, go through group
    /// commits: every batch is stored once, and the merged evidence equals
    /// what batch-by-batch writes give (hosts, events, windowed counts,
    /// failing users, the dashboard series).
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn group_commits_store_each_batch_once_with_exact_evidence(pool: PgPool) {
        let ingest = Ingest::new(pool.clone());
        let mut agents = Vec::new();
        for _ in 0..40 {
            agents.push(agent(&pool).await);
        }
        let attackers: Vec<String> = (0..10).map(|i| format!("203.0.113.{i}")).collect();
        let mut tasks = Vec::new();
        for (n, id) in agents.iter().copied().enumerate() {
            for seq in 1..=5u64 {
                let mut events: Vec<Event> = attackers
                    .iter()
                    .map(|a| Event { auth_user: format!("user{n}@example.com"), ..event(EventKind::AuthFailed, a) })
                    .collect();
                events.push(event(EventKind::Accepted, "198.51.100.7"));
                events.push(Event { connection_count: 3, ..event(EventKind::Connect, "198.51.100.7") });
                let batch = EventBatch { seq, events, position: None, summaries: Vec::new() };
                for _ in 0..2 {
                    let (ingest, batch) = (ingest.clone(), batch.clone());
                    tasks.push(tokio::spawn(async move { ingest.store(id, batch).await.unwrap() }));
                }
            }
        }
        let mut duplicates = 0;
        for t in tasks {
            duplicates += usize::from(t.await.unwrap().duplicate);
        }
        assert_eq!(duplicates, 40 * 5, "one copy of each batch is a duplicate");
        let groups = ingest.group_stats();
        assert_eq!(groups.batches, 40 * 5);
        assert!(groups.commits < groups.batches, "batches were grouped: {groups:?}");

        let count = |sql: &'static str| {
            let pool = pool.clone();
            async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
        };
        assert_eq!(count("select count(*) from agent_batches").await, 200);
        assert_eq!(count("select count(*) from events").await, 200 * 12);
        let offenders: Vec<(IpAddr, i32, i64)> =
            sqlx::query_as("select address, hosts, events from offenders order by address")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(offenders.len(), 10);
        for (address, hosts, events) in offenders {
            assert_eq!((hosts, events), (40, 200), "{address}");
        }
        assert_eq!(count("select count(*) from offender_hosts").await, 400);
        assert_eq!(count("select sum(events)::int8 from offender_hosts").await, 2000);
        assert_eq!(count("select sum(events)::int8 from evidence_minutes").await, 2000);
        assert_eq!(count("select count(*) from auth_users").await, 400);
        // Standing is rewritten at most once a minute per address, so only
        // its presence is exact.
        assert!(count("select accepted from sender_standing where address = '198.51.100.7'").await >= 1);
        assert_eq!(count("select sum(events)::int8 from abuse_minutes").await, 2000);
        assert_eq!(count("select count(distinct agent_id) from abuse_hours").await, 40);
        assert_eq!(count("select max(max_connections)::int8 from slot_minutes").await, 3);
    }

    /// A batch the database refuses fails alone: the rest of its group is
    /// written batch by batch and stored.
    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn a_refused_batch_does_not_fail_the_rest_of_its_group(pool: PgPool) {
        sqlx::query(
            "create function refuse_seq_3() returns trigger language plpgsql as \
             $$ begin if new.seq = 3 then raise exception 'refused for the test'; end if; return new; end $$",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "create trigger refuse_seq_3 before insert on agent_batches for each row execute function refuse_seq_3()",
        )
        .execute(&pool)
        .await
        .unwrap();
        let ingest = Ingest::new(pool.clone());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let id = agent(&pool).await;
            for seq in 1..=4u64 {
                let ingest = ingest.clone();
                let batch =
                    EventBatch { seq, events: vec![event(EventKind::Connect, "198.51.100.9")], ..Default::default() };
                tasks.push(tokio::spawn(async move { (seq, ingest.store(id, batch).await) }));
            }
        }
        for t in tasks {
            let (seq, result) = t.await.unwrap();
            match result {
                Err(BatchError::Database(error)) if seq == 3 => {
                    assert!(error.to_string().contains("refused for the test"), "{error}")
                }
                Ok(outcome) if seq != 3 => assert!(!outcome.duplicate && outcome.stored == 1),
                other => panic!("seq {seq}: {other:?}"),
            }
        }
        let stored: i64 = sqlx::query_scalar("select count(*) from agent_batches").fetch_one(&pool).await.unwrap();
        assert_eq!(stored, 60);
        let events: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await.unwrap();
        assert_eq!(events, 60);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn invalid_batches_are_refused_whole(pool: PgPool) {
        let ingest = Ingest::new(pool.clone());
        let a = agent(&pool).await;
        let zero = EventBatch { seq: 0, events: vec![], position: None, summaries: Vec::new() };
        assert!(matches!(ingest.store(a, zero).await, Err(BatchError::Invalid(_))));
        let big = EventBatch {
            seq: 1,
            events: vec![event(EventKind::Connect, "192.0.2.1"); MAX_BATCH_EVENTS + 1],
            position: None,
            summaries: Vec::new(),
        };
        assert!(matches!(ingest.store(a, big).await, Err(BatchError::Invalid(_))));
        let n: i64 = sqlx::query_scalar("select count(*) from agent_batches").fetch_one(&pool).await.unwrap();
        assert_eq!(n, 0);
    }

    #[sqlx::test(migrator = "crate::db::MIGRATOR")]
    async fn dropped_partition_is_recreated(pool: PgPool) {
        let ingest = Ingest::new(pool.clone());
        let a = agent(&pool).await;
        let batch = |seq| EventBatch {
            seq,
            events: vec![event(EventKind::Connect, "192.0.2.1")],
            position: None,
            summaries: Vec::new(),
        };
        ingest.store(a, batch(1)).await.unwrap();
        sqlx::query("select fleetban_drop_event_partitions(current_date + 2)").execute(&pool).await.unwrap();
        let out = ingest.store(a, batch(2)).await.unwrap();
        assert_eq!(out.stored, 1);
    }
}
