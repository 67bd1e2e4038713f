//! Blocklist feeds: lists the operator subscribes to (`[[feed]]` in the
//! server TOML: Spamhaus DROP/EDROP, plain or CSV lists, by URL or file)
//! turned into fleet blocks with `source = feed`, and the ASN block rules of
//! [`crate::geo`] (`source = policy`), which are kept the same way.
//!
//! A refresh of one list runs on one replica at a time (a transaction-level
//! advisory lock per list; a replica that finds it held skips it) and is one
//! transaction, held open during the fetch (at most `timeout_secs`) so that
//! the lock covers it:
//!
//! 1. fetch and parse ([`parse`]); malformed lines are skipped and counted;
//! 2. refuse the new list and keep the previous one when the fetch failed,
//!    more than `max_bad_lines_percent` of its lines were malformed, it has
//!    more than `max_entries` entries, or it shrank by more than
//!    `max_shrink_percent` against the last accepted list: the status says
//!    why (`failed` or `held`), the log warns and
//!    `fleetban_feed_refreshes_total{outcome}` counts it;
//! 3. otherwise carve every entry: the ranges the policy never blocks
//!    (live allowlist entries, `never_block`, the fleet's own addresses) are
//!    cut out of it ([`carve`]), and each remaining piece is created (or its
//!    expiry extended) through [`blocks::create_in`], which checks the same
//!    policy again, so the allowlist and never-block ranges always win;
//! 4. the list's live blocks that are no longer in it are retired (a
//!    `remove` change, cause `expired`); all of it reaches agents through
//!    the normal blocklist push.
//!
//! Blocks last `ttl_secs` and are extended by a refresh once less than half
//! of it is left, so a list that stops refreshing expires on its own and a
//! steady list does not rewrite its blocks at every refresh. An allowlist
//! entry added later inside a feed's block suppresses it on the agents at
//! once (as for any block) and the next refresh re-carves the entry.
//! The status of every list is in `feeds` (`GET /api/v1/feeds`,
//! `fleetban feeds`). A feed taken out of the configuration is no longer
//! refreshed: its blocks run out their TTL.

pub mod parse;

pub mod asn;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;

use self::asn::AsnBlockRule;
use crate::blocks::{self, BlockError, BlockPolicy, BlockSource, NewBlock};
use crate::telemetry::{FEED_BAD_LINES, FEED_ENTRIES, FEED_LAST_SUCCESS, FEED_REFRESHES};
pub use parse::{FeedFormat, ParseOptions, ParsedList};

/// Most pieces one entry may be carved into; an entry that would need more
/// is refused.
pub const MAX_PIECES: usize = 4_096;

/// How often the refresher looks for lists that are due.
pub const TICK: Duration = Duration::from_secs(10);

/// One `[[feed]]` of the server TOML.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Name of the feed (letters, digits, `-`, `_`, `.`; 1 to 64
    /// characters), recorded on its blocks and used by `fleetban feed
    /// refresh NAME`. Required.
    pub name: String,
    /// `http://` or `https://` URL of the list. Exactly one of `url` and
    /// `path`.
    pub url: Option<String>,
    /// A file holding the list. Exactly one of `url` and `path`.
    pub path: Option<PathBuf>,
    /// `drop` (Spamhaus DROP/EDROP), `plain` (one address or CIDR per
    /// line, `#` comments) or `csv`. Required.
    pub format: FeedFormat,
    /// `csv`: the column holding the address or CIDR, 1-based. Default 1.
    #[serde(default = "default_csv_column")]
    pub csv_column: u32,
    /// `csv`: the first row is a header. Default false.
    #[serde(default)]
    pub csv_header: bool,
    /// How often the list is fetched, seconds (60 to 604800). Default 3600.
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// How long its blocks last without a refresh, seconds; at least twice
    /// `refresh_secs`. Default 10800 (3 h).
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// Most entries accepted; a longer list is refused (the previous one
    /// stays). Default: no limit besides `max_bytes`.
    pub max_entries: Option<u64>,
    /// Largest list fetched, bytes. Default 16777216 (16 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Longest a fetch may take, seconds (1 to 600). Default 30.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// A list with more malformed lines than this share of its data lines
    /// is refused, percent (0 to 100). Default 10.
    #[serde(default = "default_max_bad_lines_percent")]
    pub max_bad_lines_percent: u32,
    /// A list that lost more than this share of the last accepted list's
    /// entries is refused, percent (0 to 100; 100 accepts any shrink).
    /// Default 50.
    #[serde(default = "default_max_shrink_percent")]
    pub max_shrink_percent: u32,
    /// Accept entries broader than `[correlate] min_prefix_v4`/`v6` (like a
    /// forced manual block). The allowlist and `never_block` still win.
    /// Default false: such entries are refused and counted.
    #[serde(default)]
    pub allow_broad: bool,
}

fn default_csv_column() -> u32 {
    1
}
fn default_refresh_secs() -> u64 {
    3_600
}
fn default_ttl_secs() -> u64 {
    10_800
}
fn default_max_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_max_bad_lines_percent() -> u32 {
    10
}
fn default_max_shrink_percent() -> u32 {
    50
}

/// Checks a list name: 1 to 64 of `[A-Za-z0-9._:-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

impl FeedConfig {
    /// Checks that the feed can work; the message names the feed and key.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if !valid_name(name) || name.contains(':') {
            return Err(format!("name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"));
        }
        match (&self.url, &self.path) {
            (Some(url), None) => {
                let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
                if !ok {
                    return Err(format!("{name}: url must be an http:// or https:// URL"));
                }
            }
            (None, Some(_)) => {}
            _ => return Err(format!("{name}: give exactly one of url and path")),
        }
        if self.csv_column == 0 {
            return Err(format!("{name}: csv_column is 1-based"));
        }
        if !(60..=604_800).contains(&self.refresh_secs) {
            return Err(format!("{name}: refresh_secs must be 60 to 604800"));
        }
        if self.ttl_secs < self.refresh_secs.saturating_mul(2) || Duration::from_secs(self.ttl_secs) > blocks::MAX_TTL {
            return Err(format!(
                "{name}: ttl_secs must be at least twice refresh_secs ({}), or blocks lapse between refreshes",
                self.refresh_secs
            ));
        }
        if self.max_bytes == 0 || !(1..=600).contains(&self.timeout_secs) {
            return Err(format!("{name}: max_bytes must be positive and timeout_secs 1 to 600"));
        }
        if self.max_bad_lines_percent > 100 || self.max_shrink_percent > 100 {
            return Err(format!("{name}: max_bad_lines_percent and max_shrink_percent are 0 to 100"));
        }
        Ok(())
    }

    fn parse_options(&self) -> ParseOptions {
        ParseOptions {
            format: self.format,
            csv_column: usize::try_from(self.csv_column).unwrap_or(usize::MAX),
            csv_header: self.csv_header,
        }
    }

    fn spec(&self) -> ListSpec {
        ListSpec {
            name: self.name.clone(),
            kind: "feed",
            origin: self
                .url
                .clone()
                .unwrap_or_else(|| self.path.as_deref().unwrap_or_else(|| "".as_ref()).display().to_string()),
            source: BlockSource::Feed,
            reason: "feed",
            refresh: Duration::from_secs(self.refresh_secs),
            ttl: Duration::from_secs(self.ttl_secs),
            allow_broad: self.allow_broad,
            max_entries: self.max_entries,
            max_bad_lines_percent: self.max_bad_lines_percent,
            max_shrink_percent: self.max_shrink_percent,
        }
    }
}

/// What a refresh needs to know about a list, whatever it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListSpec {
    /// Its name (`evidence.feed` of its blocks, `feeds.name`).
    pub name: String,
    /// `feed` or `asn`.
    pub kind: &'static str,
    /// Where it comes from: URL, path, `AS64500`.
    pub origin: String,
    /// The source of its blocks.
    pub source: BlockSource,
    /// The reason of its blocks.
    pub reason: &'static str,
    pub refresh: Duration,
    pub ttl: Duration,
    pub allow_broad: bool,
    pub max_entries: Option<u64>,
    pub max_bad_lines_percent: u32,
    pub max_shrink_percent: u32,
}

/// Errors of the feed machinery (refreshes report fetch and parse failures
/// in their [`Outcome`], not as errors).
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// No feed or ASN rule of that name is configured.
    #[error("no feed named {0:?} is configured")]
    Unknown(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client of the feeds: {0}")]
    Client(#[from] reqwest::Error),
    /// The database failed.
    #[error("feed database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// What one refresh did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The new list replaced the previous one.
    Ok {
        /// Entries of the list.
        entries: u64,
        /// Live blocks it has now.
        blocks: u64,
        /// Blocks created or extended.
        written: u64,
        /// Blocks retired (entries gone from the list, or re-carved).
        retired: u64,
        /// Entries refused by policy (too broad, nothing left after carving).
        refused: u64,
        /// Malformed lines skipped.
        bad_lines: u64,
    },
    /// The fetch or parse failed; the previous list stays.
    Failed {
        /// Why.
        error: String,
    },
    /// The new list was refused (shrank too much, too long); the previous
    /// list stays.
    Held {
        /// Why.
        error: String,
    },
    /// Another replica is refreshing it, or it is not due yet.
    Skipped,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Ok { .. } => "ok",
            Outcome::Failed { .. } => "failed",
            Outcome::Held { .. } => "held",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The status of one list, as the API and the CLI show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeedStatus {
    /// The list's name.
    pub name: String,
    /// `feed` or `asn`.
    pub kind: String,
    /// URL, path, or `AS<number>`.
    pub origin: String,
    /// `never` (not run yet), `ok`, `failed` (fetch or parse failed, the
    /// previous list stays), `held` (the new list was refused, the previous
    /// list stays).
    pub status: String,
    /// Last refresh attempt.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_attempt: Option<OffsetDateTime>,
    /// Last accepted list.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success: Option<OffsetDateTime>,
    /// Why the last attempt did not replace the list; `null` after a success.
    pub last_error: Option<String>,
    /// Entries of the last accepted list.
    pub entries: i64,
    /// Live blocks of the list now.
    pub blocks: i64,
    /// Malformed lines of the last fetched list.
    pub bad_lines: i64,
    /// Entries of the last accepted list refused by policy.
    pub refused: i64,
    /// Refresh interval, seconds.
    pub refresh_secs: u64,
    /// TTL of its blocks, seconds.
    pub ttl_secs: u64,
}

#[derive(sqlx::FromRow)]
struct StatusRow {
    name: String,
    status: String,
    last_attempt: Option<OffsetDateTime>,
    last_success: Option<OffsetDateTime>,
    last_error: Option<String>,
    entries: i64,
    blocks: i64,
    bad_lines: i64,
    refused: i64,
}

/// Every configured list and the client that fetches them.
#[derive(Debug, Clone, Default)]
pub struct Feeds {
    feeds: Vec<FeedConfig>,
    asn_rules: Vec<AsnBlockRule>,
    client: reqwest::Client,
}

impl Feeds {
    /// The feeds and ASN block rules to keep.
    pub fn new(feeds: Vec<FeedConfig>, asn_rules: Vec<AsnBlockRule>) -> Result<Self, FeedError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("fleetban/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()?;
        Ok(Feeds { feeds, asn_rules, client })
    }

    /// True when nothing is configured.
    pub fn is_empty(&self) -> bool {
        self.feeds.is_empty() && self.asn_rules.is_empty()
    }

    fn specs(&self) -> Vec<ListSpec> {
        self.feeds.iter().map(FeedConfig::spec).chain(self.asn_rules.iter().map(AsnBlockRule::spec)).collect()
    }

    /// The status of every configured list, in configuration order.
    pub async fn status(&self, pool: &PgPool) -> Result<Vec<FeedStatus>, FeedError> {
        let specs = self.specs();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let rows: Vec<StatusRow> = sqlx::query_as(
            "select name, status, last_attempt, last_success, last_error, entries, blocks, bad_lines, refused \
             from feeds where name = any($1)",
        )
        .bind(&names)
        .fetch_all(pool)
        .await?;
        let mut rows: HashMap<String, StatusRow> = rows.into_iter().map(|r| (r.name.clone(), r)).collect();
        Ok(specs
            .into_iter()
            .map(|spec| {
                let row = rows.remove(&spec.name);
                FeedStatus {
                    kind: spec.kind.to_owned(),
                    origin: spec.origin,
                    status: row.as_ref().map_or_else(|| "never".to_owned(), |r| r.status.clone()),
                    last_attempt: row.as_ref().and_then(|r| r.last_attempt),
                    last_success: row.as_ref().and_then(|r| r.last_success),
                    last_error: row.as_ref().and_then(|r| r.last_error.clone()),
                    entries: row.as_ref().map_or(0, |r| r.entries),
                    blocks: row.as_ref().map_or(0, |r| r.blocks),
                    bad_lines: row.as_ref().map_or(0, |r| r.bad_lines),
                    refused: row.as_ref().map_or(0, |r| r.refused),
                    refresh_secs: spec.refresh.as_secs(),
                    ttl_secs: spec.ttl.as_secs(),
                    name: spec.name,
                }
            })
            .collect())
    }

    /// Refreshes the list `name` now (`force`) or if it is due. `Skipped`
    /// when another replica holds it (or it is not due).
    pub async fn refresh(
        &self,
        pool: &PgPool,
        policy: &dyn BlockPolicy,
        name: &str,
        force: bool,
    ) -> Result<Outcome, FeedError> {
        if let Some(feed) = self.feeds.iter().find(|f| f.name == name) {
            let fetch = async {
                let body = fetch(&self.client, feed).await?;
                Ok(parse::parse(&body, &feed.parse_options()))
            };
            return refresh_list(pool, policy, &feed.spec(), force, fetch).await;
        }
        if let Some(rule) = self.asn_rules.iter().find(|r| r.spec().name == name) {
            let spec = rule.spec();
            let fetch = async { rule.entries(pool).await.map_err(|e| format!("reading asn_ranges: {e}")) };
            return refresh_list(pool, policy, &spec, force, fetch).await;
        }
        Err(FeedError::Unknown(name.to_owned()))
    }

    /// Refreshes every list that is due, one after the other; failures are
    /// logged and recorded in the status.
    pub async fn refresh_due(&self, pool: &PgPool, policy: &dyn BlockPolicy) {
        for spec in self.specs() {
            if let Err(error) = self.refresh(pool, policy, &spec.name, false).await {
                tracing::warn!(%error, feed = %spec.name, "Feed refresh failed; retrying at the next tick.");
            }
        }
    }

    /// Refreshes due lists every `tick` until `shutdown` resolves.
    pub async fn run(
        self: Arc<Self>,
        pool: PgPool,
        policy: Arc<dyn BlockPolicy>,
        tick: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        if self.is_empty() {
            return;
        }
        let mut interval = tokio::time::interval(tick.max(Duration::from_millis(10)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = interval.tick() => {}
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = self.refresh_due(&pool, policy.as_ref()) => {}
            }
        }
    }
}

/// Fetches a feed's list: HTTP(S) with a timeout, or a file; at most
/// `max_bytes`.
async fn fetch(client: &reqwest::Client, feed: &FeedConfig) -> Result<Vec<u8>, String> {
    let limit = usize::try_from(feed.max_bytes).unwrap_or(usize::MAX);
    if let Some(path) = &feed.path {
        let meta = tokio::fs::metadata(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if meta.len() > feed.max_bytes {
            return Err(format!("{} is larger than max_bytes ({})", path.display(), feed.max_bytes));
        }
        return tokio::fs::read(path).await.map_err(|e| format!("cannot read {}: {e}", path.display()));
    }
    let url = feed.url.as_deref().unwrap_or_default();
    let mut response = client
        .get(url)
        .timeout(Duration::from_secs(feed.timeout_secs))
        .send()
        .await
        .map_err(|e| format!("fetch failed: {}", crate::text::one_line(&e)))?;
    if !response.status().is_success() {
        return Err(format!("HTTP status {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) =
        response.chunk().await.map_err(|e| format!("fetch failed: {}", crate::text::one_line(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(format!("the list is larger than max_bytes ({})", feed.max_bytes));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `net` without the `holes` (ranges of the same family only): the
/// smallest set of CIDRs covering exactly the addresses of `net` outside
/// every hole. `None` when that takes more than `limit` pieces.
pub fn carve(net: IpNet, holes: &[IpNet], limit: usize) -> Option<Vec<IpNet>> {
    let relevant: Vec<IpNet> = holes.iter().copied().filter(|h| h.contains(&net) || net.contains(h)).collect();
    let mut out = Vec::new();
    let mut stack = vec![net];
    while let Some(n) = stack.pop() {
        if relevant.iter().any(|h| h.contains(&n)) {
            continue;
        }
        if !relevant.iter().any(|h| n.contains(h)) {
            out.push(n);
        } else if let Ok(halves) = n.subnets(n.prefix_len() + 1) {
            // Pushed in reverse so that pieces come out in address order.
            let halves: Vec<IpNet> = halves.collect();
            stack.extend(halves.into_iter().rev());
        }
        if out.len() + stack.len() > limit {
            return None;
        }
    }
    Some(out)
}

/// A transaction-level advisory lock on the list `name`, if free.
async fn try_lock(conn: &mut PgConnection, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select pg_try_advisory_xact_lock(hashtext('fleetban_feed'), hashtext($1))")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// Refreshes one list: see the module documentation.
pub(crate) async fn refresh_list(
    pool: &PgPool,
    policy: &dyn BlockPolicy,
    spec: &ListSpec,
    force: bool,
    fetch: impl Future<Output = Result<ParsedList, String>>,
) -> Result<Outcome, FeedError> {
    let mut tx = pool.begin().await?;
    if !try_lock(&mut tx, &spec.name).await? {
        return Ok(Outcome::Skipped);
    }
    sqlx::query("insert into feeds (name) values ($1) on conflict (name) do nothing")
        .bind(&spec.name)
        .execute(&mut *tx)
        .await?;
    let (due, previous): (bool, i64) = sqlx::query_as(
        "select last_attempt is null or last_attempt <= now() - make_interval(secs => $2), \
                case when last_success is null then 0 else entries end \
         from feeds where name = $1",
    )
    .bind(&spec.name)
    .bind(spec.refresh.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    if !due && !force {
        return Ok(Outcome::Skipped);
    }
    let list = match fetch.await {
        Ok(list) => list,
        Err(error) => return finish_refused(tx, spec, Outcome::Failed { error }, 0).await,
    };
    if let Some(refusal) = judge(spec, &list, u64::try_from(previous).unwrap_or(0)) {
        return finish_refused(tx, spec, refusal, list.bad_lines).await;
    }
    let applied = match apply(&mut tx, policy, spec, &list.entries).await {
        Ok(applied) => applied,
        Err(error) => {
            drop(tx);
            let failed = Outcome::Failed { error: format!("applying the list failed: {error}") };
            let tx = pool.begin().await?;
            finish_refused(tx, spec, failed, list.bad_lines).await?;
            return Err(error);
        }
    };
    let entries = list.entries.len() as u64;
    sqlx::query(
        "update feeds set status = 'ok', last_attempt = now(), last_success = now(), last_error = null, \
         entries = $2, blocks = $3, bad_lines = $4, refused = $5 where name = $1",
    )
    .bind(&spec.name)
    .bind(i64::try_from(entries).unwrap_or(i64::MAX))
    .bind(i64::try_from(applied.blocks).unwrap_or(i64::MAX))
    .bind(i64::try_from(list.bad_lines).unwrap_or(i64::MAX))
    .bind(i64::try_from(applied.refused).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let outcome = Outcome::Ok {
        entries,
        blocks: applied.blocks,
        written: applied.written,
        retired: applied.retired,
        refused: applied.refused,
        bad_lines: list.bad_lines,
    };
    record(spec, &outcome, list.bad_lines);
    metrics::gauge!(FEED_ENTRIES, "feed" => spec.name.clone()).set(entries as f64);
    metrics::gauge!(FEED_LAST_SUCCESS, "feed" => spec.name.clone())
        .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
    tracing::info!(
        feed = %spec.name,
        entries,
        blocks = applied.blocks,
        written = applied.written,
        retired = applied.retired,
        refused = applied.refused,
        bad_lines = list.bad_lines,
        "Feed refreshed."
    );
    Ok(outcome)
}

/// Records a refusal of the new list (the previous one stays) in the status,
/// the log and the metrics.
async fn finish_refused(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    spec: &ListSpec,
    outcome: Outcome,
    bad_lines: u64,
) -> Result<Outcome, FeedError> {
    let (status, error) = match &outcome {
        Outcome::Failed { error } => ("failed", error.as_str()),
        Outcome::Held { error } => ("held", error.as_str()),
        _ => return Ok(outcome),
    };
    sqlx::query("update feeds set status = $2, last_attempt = now(), last_error = $3, bad_lines = $4 where name = $1")
        .bind(&spec.name)
        .bind(status)
        .bind(error)
        .bind(i64::try_from(bad_lines).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::warn!(feed = %spec.name, status, error, "Feed refresh refused; the previous list stays in force.");
    record(spec, &outcome, bad_lines);
    Ok(outcome)
}

fn record(spec: &ListSpec, outcome: &Outcome, bad_lines: u64) {
    metrics::counter!(FEED_REFRESHES, "feed" => spec.name.clone(), "outcome" => outcome.label()).increment(1);
    if bad_lines > 0 {
        metrics::counter!(FEED_BAD_LINES, "feed" => spec.name.clone()).increment(bad_lines);
    }
}

/// `Some(refusal)` when the new list must not replace the previous one
/// (which had `previous` entries).
fn judge(spec: &ListSpec, list: &ParsedList, previous: u64) -> Option<Outcome> {
    if list.bad_percent() > u64::from(spec.max_bad_lines_percent) {
        let first = list.samples.first().map(|(n, why)| format!("; line {n}: {why}")).unwrap_or_default();
        return Some(Outcome::Failed {
            error: format!(
                "{} of {} lines malformed (more than {}%){first}",
                list.bad_lines, list.data_lines, spec.max_bad_lines_percent
            ),
        });
    }
    let entries = list.entries.len() as u64;
    if let Some(max) = spec.max_entries
        && entries > max
    {
        return Some(Outcome::Held { error: format!("{entries} entries, more than max_entries ({max})") });
    }
    let kept_percent = 100 - u64::from(spec.max_shrink_percent.min(100));
    if previous > 0 && entries.saturating_mul(100) < previous.saturating_mul(kept_percent) {
        return Some(Outcome::Held {
            error: format!(
                "the list shrank from {previous} to {entries} entries (more than {}%)",
                spec.max_shrink_percent
            ),
        });
    }
    None
}

/// The ranges no list block may cover: the policy's `never_block`, the live
/// allowlist and the fleet's own addresses.
async fn holes(conn: &mut PgConnection, policy: &dyn BlockPolicy) -> Result<Vec<IpNet>, sqlx::Error> {
    let mut holes: Vec<IpNet> = policy.never_block().to_vec();
    let allow: Vec<IpNet> = sqlx::query_scalar("select cidr from live_allowlist").fetch_all(&mut *conn).await?;
    let own: Vec<IpNet> =
        sqlx::query_scalar("select distinct address from agent_addresses").fetch_all(&mut *conn).await?;
    holes.extend(allow);
    holes.extend(own.into_iter().map(|a| IpNet::from(fleetban_proto::canonical_ip(a.addr()))));
    Ok(holes)
}

/// Counts of [`apply`].
#[derive(Debug, Default)]
struct Applied {
    blocks: u64,
    written: u64,
    retired: u64,
    refused: u64,
}

/// Makes the list's live blocks exactly the carved `entries`.
async fn apply(
    conn: &mut PgConnection,
    policy: &dyn BlockPolicy,
    spec: &ListSpec,
    entries: &BTreeMap<IpNet, Option<String>>,
) -> Result<Applied, FeedError> {
    let holes = holes(conn, policy).await?;
    let existing: Vec<(i64, IpNet, Option<OffsetDateTime>)> = sqlx::query_as(
        "select id, cidr, expires_at from blocks \
         where revoked_at is null and source = $1 and evidence->>'feed' = $2",
    )
    .bind(spec.source.as_str())
    .bind(&spec.name)
    .fetch_all(&mut *conn)
    .await?;
    let existing: HashMap<IpNet, Option<OffsetDateTime>> = existing.into_iter().map(|(_, c, e)| (c, e)).collect();
    let now: OffsetDateTime = sqlx::query_scalar("select now()").fetch_one(&mut *conn).await?;
    let half = time::Duration::try_from(spec.ttl / 2).unwrap_or(time::Duration::ZERO);
    let mut applied = Applied::default();
    let mut wanted: BTreeSet<IpNet> = BTreeSet::new();
    for (entry, label) in entries {
        let min = match entry {
            IpNet::V4(_) => policy.min_prefix_v4(),
            IpNet::V6(_) => policy.min_prefix_v6(),
        };
        if entry.prefix_len() < min && !spec.allow_broad {
            applied.refused += 1;
            continue;
        }
        let Some(pieces) = carve(*entry, &holes, MAX_PIECES).filter(|p| !p.is_empty()) else {
            applied.refused += 1;
            continue;
        };
        let mut any = false;
        for piece in pieces {
            if let Some(Some(expires)) = existing.get(&piece)
                && *expires > now.saturating_add(half)
            {
                wanted.insert(piece);
                any = true;
                continue;
            }
            // Third-party data never counts towards correlation's prefix
            // escalation (`escalates`), like a sender in good standing.
            let evidence = serde_json::json!({
                "feed": spec.name,
                "entry": entry.to_string(),
                "label": label,
                "escalates": false,
            });
            let new = NewBlock {
                cidr: piece,
                reason: spec.reason.to_owned(),
                source: spec.source,
                evidence,
                ttl: Some(spec.ttl),
                created_by: None,
                force: spec.allow_broad,
            };
            match blocks::create_in(conn, policy, new).await {
                Ok(_) => {
                    wanted.insert(piece);
                    applied.written += 1;
                    any = true;
                }
                Err(BlockError::Refused(refusal)) => {
                    tracing::debug!(feed = %spec.name, %refusal, "Feed entry piece refused by policy.");
                }
                Err(BlockError::Database(error)) => return Err(error.into()),
            }
        }
        if !any {
            applied.refused += 1;
        }
    }
    let gone: Vec<i64> = sqlx::query_scalar(
        "select id from blocks where revoked_at is null and source = $1 and evidence->>'feed' = $2 \
         and not (cidr = any($3::cidr[])) order by id",
    )
    .bind(spec.source.as_str())
    .bind(&spec.name)
    .bind(wanted.iter().copied().collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    applied.retired = blocks::retire_in(conn, &gone, &format!("no longer in {} {}", spec.kind, spec.name)).await?;
    applied.blocks = sqlx::query_scalar::<_, i64>(
        "select count(*) from blocks where revoked_at is null and source = $1 and evidence->>'feed' = $2",
    )
    .bind(spec.source.as_str())
    .bind(&spec.name)
    .fetch_one(&mut *conn)
    .await?
    .try_into()
    .unwrap_or(0);
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn carve_cuts_holes_exactly() {
        let pieces = carve(net("198.51.100.0/24"), &[net("198.51.100.7/32"), net("10.0.0.0/8")], 100).unwrap();
        assert_eq!(pieces.len(), 8);
        assert_eq!(pieces[0], net("198.51.100.0/30"));
        assert!(pieces.iter().all(|p| !p.contains(&net("198.51.100.7/32"))));
        let covered: u32 = pieces.iter().map(|p| 1u32 << (32 - p.prefix_len())).sum();
        assert_eq!(covered, 255, "every address but the hole");
        assert_eq!(carve(net("198.51.100.0/24"), &[], 100).unwrap(), vec![net("198.51.100.0/24")]);
        assert!(carve(net("10.1.0.0/16"), &[net("10.0.0.0/8")], 100).unwrap().is_empty());
        // Another family's hole is no hole; a mapped entry was made IPv4 by parsing.
        assert_eq!(carve(net("2001:db8::/32"), &[net("0.0.0.0/0")], 100).unwrap().len(), 1);
        // Too many pieces: refused, never a partial list.
        let holes: Vec<IpNet> = (0..64).map(|i| net(&format!("198.51.100.{}/32", i * 4))).collect();
        assert_eq!(carve(net("198.51.100.0/24"), &holes, 10), None);
    }

    #[test]
    fn judge_refuses_bad_long_and_shrunk_lists() {
        let spec = FeedConfig {
            name: "t".into(),
            url: Some("http://127.0.0.1:1/".into()),
            path: None,
            format: FeedFormat::Plain,
            csv_column: 1,
            csv_header: false,
            refresh_secs: 60,
            ttl_secs: 120,
            max_entries: Some(5),
            max_bytes: 1024,
            timeout_secs: 1,
            max_bad_lines_percent: 10,
            max_shrink_percent: 50,
            allow_broad: false,
        }
        .spec();
        let list = |n: u8| {
            let text: String = (0..n).map(|i| format!("192.0.2.{i}\n")).collect();
            parse::parse(text.as_bytes(), &ParseOptions { format: FeedFormat::Plain, csv_column: 1, csv_header: false })
        };
        assert_eq!(judge(&spec, &list(4), 8), None, "half is not more than half");
        assert!(matches!(judge(&spec, &list(3), 8), Some(Outcome::Held { .. })));
        assert!(matches!(judge(&spec, &list(6), 0), Some(Outcome::Held { .. })), "max_entries");
        let mut bad = list(5);
        bad.bad_lines = 1;
        bad.data_lines = 6;
        assert!(matches!(judge(&spec, &bad, 0), Some(Outcome::Failed { .. })));
    }
}
