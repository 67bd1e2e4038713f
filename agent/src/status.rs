//! `fleetban-agent status`: what the agent has read, spooled and sent.
//!
//! Everything comes from the state directory (the spool's records and
//! counters), read without the spool lock and without changing anything, so
//! the command works the same whether the agent is running or not. The
//! uplink and firewall parts come from the runtime status the running agent
//! rewrites every few seconds (`agent-status.json`); when the agent is not
//! running, `connected` is `false` and the firewall figures are the last ones
//! it wrote (`null` if it never ran).

use serde::Serialize;

use crate::config::{AgentConfig, FirewallBackend, FirewallScope};
use crate::service::RuntimeStatus;
use crate::spool::{self, SpoolError, SpoolStatus};
use crate::uplink::Credentials;

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
    /// The server of the open (or last) session: its URL, with the address
    /// dialled when the URL does not name it; `null` when not known.
    pub server: Option<String>,
    /// Highest batch seq the server acknowledged; `null` if none yet.
    pub last_ack_seq: Option<u64>,
    /// Whether the agent holds credentials (`fleetban-agent enroll` ran).
    pub enrolled: bool,
    /// Session reconnects since the agent started; `null` when not known.
    pub reconnects: Option<u64>,
    /// When the running agent last wrote its runtime status; `null` if never.
    pub updated_at: Option<String>,
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
    /// Time of the last full reconcile (RFC 3339); `null` when not known.
    pub last_reconcile: Option<String>,
    /// Entries repaired because the firewall had drifted, since the agent
    /// started; `null` when not known.
    pub drift_repaired: Option<u64>,
    /// Established connections of blocked ranges ended since the agent
    /// started (so the MTA freed their slots); `null` when not known.
    pub connections_killed: Option<u64>,
    /// Connections a dry run would have ended; `null` when not known.
    pub connections_would_kill: Option<u64>,
    /// How connections of blocked ranges are ended, or why they cannot be;
    /// `null` when not known.
    pub connection_kill: Option<String>,
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
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
    let runtime = RuntimeStatus::load(&config.state_dir);
    let running = runtime.as_ref().is_some_and(|r| alive(r.pid));
    Ok(Status {
        sources,
        spool: snapshot.status,
        uplink: UplinkStatus {
            connected: runtime.as_ref().map(|r| running && r.uplink.connected),
            server: runtime.as_ref().map(|r| r.uplink.connected_to.clone()).filter(|s| !s.is_empty()),
            last_ack_seq: (snapshot.acked_seq > 0).then_some(snapshot.acked_seq),
            enrolled: Credentials::path(&config.state_dir).exists(),
            reconnects: runtime.as_ref().map(|r| r.uplink.reconnects),
            updated_at: runtime.as_ref().map(|r| r.updated_at.clone()),
        },
        firewall: FirewallStatus {
            backend: config.firewall.backend,
            scope: config.firewall.scope,
            entries: runtime.as_ref().map(|r| r.firewall.entries),
            blocklist_version: runtime.as_ref().map(|r| r.firewall.blocklist_version),
            last_reconcile: runtime.as_ref().and_then(|r| r.firewall.last_reconcile.clone()),
            drift_repaired: runtime.as_ref().map(|r| r.firewall.drift_repaired),
            connections_killed: runtime.as_ref().map(|r| r.firewall.connections_killed),
            connections_would_kill: runtime.as_ref().map(|r| r.firewall.connections_would_kill),
            connection_kill: runtime.as_ref().map(|r| r.firewall.connection_kill.clone()),
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
        let position = SourcePosition { path: "/var/log/a".into(), fingerprint: 0xabc, offset: 99, open_from: None };
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
                "uplink": {"connected": null, "server": null, "last_ack_seq": null, "enrolled": false, "reconnects": null, "updated_at": null},
                "firewall": {"backend": "nftables", "scope": "smtp", "entries": null, "blocklist_version": null,
                             "last_reconcile": null, "drift_repaired": null, "connections_killed": null,
                             "connections_would_kill": null, "connection_kill": null},
            })
        );
        assert!(status["spool"]["bytes"].as_u64().unwrap() > 8);
        spool.ack(1).unwrap();
        let status = serde_json::to_value(collect(&config).unwrap()).unwrap();
        assert_eq!(status["uplink"]["last_ack_seq"], 1);
        assert_eq!(status["spool"]["pending_batches"], 0);
    }

    #[test]
    fn status_fills_uplink_and_firewall_from_the_runtime_status() {
        use crate::service::{RuntimeFirewall, RuntimeUplink, STATUS_FILE};
        let dir = tempfile::tempdir().unwrap();
        let text = format!("server = \"https://a.example:1\"\nstate_dir = \"{}\"\n", dir.path().display());
        let config = AgentConfig::from_toml(&text, Path::new("agent.toml")).unwrap();
        Credentials { agent_id: "a".into(), agent_secret: "s".into() }.store(dir.path()).unwrap();
        let mut runtime = RuntimeStatus {
            updated_at: "2026-11-27T03:00:00Z".into(),
            pid: std::process::id(),
            uplink: RuntimeUplink {
                connected: true,
                reconnects: 2,
                connected_to: "https://fleet.example:1 (192.0.2.7:1)".into(),
                ..RuntimeUplink::default()
            },
            firewall: RuntimeFirewall {
                entries: 42,
                blocklist_version: 9,
                last_reconcile: Some("2026-11-27T02:59:00Z".into()),
                drift_repaired: 3,
                connections_killed: 57,
                connection_kill: crate::firewall::kill::describe(1).into(),
                ..RuntimeFirewall::default()
            },
        };
        std::fs::write(dir.path().join(STATUS_FILE), serde_json::to_vec(&runtime).unwrap()).unwrap();
        let status = serde_json::to_value(collect(&config).unwrap()).unwrap();
        assert_eq!(status["uplink"]["connected"], true);
        assert_eq!(status["uplink"]["enrolled"], true);
        assert_eq!(status["uplink"]["reconnects"], 2);
        assert_eq!(status["uplink"]["server"], "https://fleet.example:1 (192.0.2.7:1)");
        assert_eq!(status["firewall"]["entries"], 42);
        assert_eq!(status["firewall"]["blocklist_version"], 9);
        assert_eq!(status["firewall"]["last_reconcile"], "2026-11-27T02:59:00Z");
        assert_eq!(status["firewall"]["drift_repaired"], 3);
        assert_eq!(status["firewall"]["connections_killed"], 57);
        assert_eq!(status["firewall"]["connection_kill"], "socket-destroy");
        // The agent that wrote it is gone: not connected.
        runtime.pid = u32::MAX - 1;
        std::fs::write(dir.path().join(STATUS_FILE), serde_json::to_vec(&runtime).unwrap()).unwrap();
        let status = serde_json::to_value(collect(&config).unwrap()).unwrap();
        assert_eq!(status["uplink"]["connected"], false);
    }
}
