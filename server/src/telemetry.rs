//! Names of the metrics the server's domain modules record.
//!
//! Ingest, push and the sessions record through the `metrics` facade under
//! these names; the HTTP layer (`api::metrics`) describes and exports them.
//! Keeping the names here lets the domain record a metric without depending
//! on the HTTP layer.

/// Events stored by ingest.
pub const INGEST_EVENTS: &str = "fleetban_ingest_events_total";
/// Events rejected by ingest.
pub const INGEST_INVALID_EVENTS: &str = "fleetban_ingest_invalid_events_total";
/// Batches by result.
pub const INGEST_BATCHES: &str = "fleetban_ingest_batches_total";
/// Transactions ingest committed, each holding one or more agents' batches
/// (`fleetban_ingest_batches_total` / this = batches per group commit).
pub const INGEST_GROUP_COMMITS: &str = "fleetban_ingest_group_commits_total";
/// Seconds from a block change's commit to its delivery to an agent.
pub const PUSH_LAG: &str = "fleetban_push_lag_seconds";
/// Pushes delivered to sessions, by `path`: `direct` (the hub wrote them
/// onto the session's stream) or `queued` (the session's task handled them:
/// a gap, a resync, a full stream).
pub const PUSH_DELIVERIES: &str = "fleetban_push_deliveries_total";
/// Times an agent's push queue overflowed, so it gets a snapshot instead.
pub const PUSH_LAGGED: &str = "fleetban_push_lagged_total";
/// Agent heartbeats written, and the statements that wrote them
/// (`crate::heartbeat`: several agents per statement).
pub const HEARTBEATS: &str = "fleetban_agent_heartbeats_total";
/// Statements that wrote agent heartbeats.
pub const HEARTBEAT_STATEMENTS: &str = "fleetban_agent_heartbeat_statements_total";
/// Agent sessions open on this replica.
pub const AGENT_SESSIONS: &str = "fleetban_agent_sessions";
/// Refreshes of blocklist feeds and ASN rules, by `feed` and `outcome`
/// (`ok`, `failed`, `held`).
pub const FEED_REFRESHES: &str = "fleetban_feed_refreshes_total";
/// Malformed lines skipped in fetched feed lists, by `feed`.
pub const FEED_BAD_LINES: &str = "fleetban_feed_bad_lines_total";
/// Entries of each feed's last accepted list, by `feed`.
pub const FEED_ENTRIES: &str = "fleetban_feed_entries";
/// Unix time of each feed's last accepted list, by `feed`.
pub const FEED_LAST_SUCCESS: &str = "fleetban_feed_last_success_timestamp_seconds";
/// Correlation decisions whose thresholds an ASN or country evidence
/// multiplier changed, by `direction` (`stronger`, `weaker`).
pub const POLICY_THRESHOLD_ADJUSTED: &str = "fleetban_policy_threshold_adjustments_total";
/// Notification messages delivered, by channel.
pub const NOTIFY_DELIVERED: &str = "fleetban_notify_delivered_total";
/// Failed notification delivery attempts (each retry counts), by channel.
pub const NOTIFY_ATTEMPT_FAILURES: &str = "fleetban_notify_attempt_failures_total";
/// Notification messages dead-lettered after their last attempt, by channel.
pub const NOTIFY_DEAD_LETTERS: &str = "fleetban_notify_dead_letters_total";
/// Events the server's monitor raised (agent offline, propagation lag, slot
/// exhaustion), by kind.
pub const ALERTS_RAISED: &str = "fleetban_alerts_raised_total";
/// Notification messages in the queue, fleet-wide, by channel and state
/// (`pending`, `dead`), read from Postgres at each scrape.
pub const NOTIFY_QUEUE: &str = "fleetban_notify_messages";
/// 1 while this replica leads the fleet-wide sweeps, else 0.
pub const REPLICA_LEADER: &str = "fleetban_replica_leader";
/// Always 1, labelled with this replica's `replica` name and `id`.
pub const REPLICA_INFO: &str = "fleetban_replica_info";
/// Replicas alive on the database (rows refreshed recently), fleet-wide.
pub const REPLICAS_ALIVE: &str = "fleetban_replicas_alive";
