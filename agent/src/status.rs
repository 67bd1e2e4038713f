//! `fleetban-agent status`: what the agent has read, spooled and sent.
//!
//! Everything comes from the state directory (the spool's records and
//! counters), read without the spool lock and without changing anything, so
//! the command works the same whether the agent is running or not. Fields
//! that belong to steps not present in this build (the uplink's connection,
//! the firewall's contents) are `null`.

use serde::Serialize;

use crate::config::{AgentConfig, FirewallBackend, FirewallScope};
use crate::spool::{self, SpoolError, SpoolStatus};

/// The whole status document.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// One entry per configured source, in config order.
    pub sources: Vec<SourceStatus>,
    /// Spool counters.
    pub spool: SpoolStatus,
    /// The server session.
    pub uplink: UplinkStatus,
    /// The local firewall.
    pub firewall: FirewallStatus,
}

/// The durable read position of one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    /// The configured path.
    pub path: String,
    /// Fingerprint of the file the position is in, as 16 hex digits; `null`
    /// before the first checkpoint.
    pub fingerprint: Option<String>,
    /// Byte offset just past the last line spooled; `null` before the first
    /// checkpoint.
    pub offset: Option<u64>,
}

/// The server session.
#[derive(Debug, Clone, Serialize)]
pub struct UplinkStatus {
    /// Whether a session is up; `null` when not known.
    pub connected: Option<bool>,
    /// Highest batch seq the server acknowledged; `null` if none yet.
    pub last_ack_seq: Option<u64>,
}

/// The local firewall.
#[derive(Debug, Clone, Serialize)]
pub struct FirewallStatus {
    /// Configured backend.
    pub backend: FirewallBackend,
    /// Configured scope.
    pub scope: FirewallScope,
    /// Entries held; `null` when not known.
    pub entries: Option<u64>,
    /// Blocklist version applied; `null` when not known.
    pub blocklist_version: Option<u64>,
}

/// Formats a fingerprint the way `status` prints it.
pub fn format_fingerprint(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

/// Reads the status of the agent configured by `config`.
pub fn collect(config: &AgentConfig) -> Result<Status, SpoolError> {
    let snapshot = spool::inspect(&config.spool_dir())?;
    let sources = config
        .sources
        .iter()
        .map(|source| {
            let path = source.path.to_string_lossy().into_owned();
            let position = snapshot.positions.get(&path);
            SourceStatus {
                fingerprint: position.map(|position| format_fingerprint(position.fingerprint)),
                offset: position.map(|position| position.offset),
                path,
            }
        })
        .collect();
    Ok(Status {
        sources,
        spool: snapshot.status,
        uplink: UplinkStatus { connected: None, last_ack_seq: (snapshot.acked_seq > 0).then_some(snapshot.acked_seq) },
        firewall: FirewallStatus {
            backend: config.firewall.backend,
            scope: config.firewall.scope,
            entries: None,
            blocklist_version: None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Spool, SpoolOptions};
    use fleetban_proto::v1::{Event, SourcePosition};
    use std::path::Path;

    #[test]
    fn status_reads_positions_and_counters_while_the_spool_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "server = \"https://a.example:1\"\nstate_dir = \"{}\"\n[[source]]\npath = \"/var/log/a\"\n[[source]]\npath = \"/var/log/b\"\n",
            dir.path().display()
        );
        let config = AgentConfig::from_toml(&text, Path::new("agent.toml")).unwrap();
        let empty = serde_json::to_value(collect(&config).unwrap()).unwrap();
        assert_eq!(empty["sources"][0]["offset"], serde_json::Value::Null);
        assert_eq!(empty["spool"]["pending_batches"], 0);

        let (mut spool, _) = Spool::open(&config.spool_dir(), SpoolOptions::with_max_bytes(1 << 20)).unwrap();
        let position = SourcePosition { path: "/var/log/a".into(), fingerprint: 0xabc, offset: 99 };
        spool.append(&[Event::default(), Event::default()], &position).unwrap();
        spool.sync().unwrap();
        let status = serde_json::to_value(collect(&config).unwrap()).unwrap();
        assert_eq!(
            status,
            serde_json::json!({
                "sources": [
                    {"path": "/var/log/a", "fingerprint": "0000000000000abc", "offset": 99},
                    {"path": "/var/log/b", "fingerprint": null, "offset": null},
                ],
                "spool": {"pending_batches": 1, "pending_events": 2, "bytes": status["spool"]["bytes"], "dropped_events": 0},
                "uplink": {"connected": null, "last_ack_seq": null},
                "firewall": {"backend": "nftables", "scope": "smtp", "entries": null, "blocklist_version": null},
            })
        );
        assert!(status["spool"]["bytes"].as_u64().unwrap() > 8);
        spool.ack(1).unwrap();
        let status = serde_json::to_value(collect(&config).unwrap()).unwrap();
        assert_eq!(status["uplink"]["last_ack_seq"], 1);
        assert_eq!(status["spool"]["pending_batches"], 0);
    }
}
