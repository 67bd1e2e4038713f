//! The agent's Prometheus endpoint (`[metrics] listen`, off by default).
//!
//! A minimal HTTP/1.1 responder: `GET /metrics` returns the text exposition
//! format, anything else 404. Metrics: lines read, events by kind, lines
//! skipped as ambiguous, local
//! blocks by rule, detection evictions, spool size and pending batches,
//! uplink state and reconnects, events the server rejected by reason,
//! firewall entries, reconciles and drift
//! repairs.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::detect::{DetectStats, Rule};
use crate::firewall::reconcile::FirewallStats;
use crate::parse::EventKind;
use crate::pipeline::{PipelineStats, SharedSpool};
use crate::uplink::UplinkStats;

/// Events parsed, per kind (indexed like [`EventKind::ALL`]), and lines
/// skipped as ambiguous.
#[derive(Debug)]
pub struct KindCounters {
    counts: Vec<AtomicU64>,
    /// Lines skipped because their client text holds a second host-like
    /// address (`ParseStats::ambiguous`).
    pub ambiguous: AtomicU64,
}

impl Default for KindCounters {
    fn default() -> Self {
        Self { counts: EventKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(), ambiguous: AtomicU64::new(0) }
    }
}

impl KindCounters {
    /// Counts one event of `kind`.
    pub fn add(&self, kind: EventKind) {
        if let Some(index) = EventKind::ALL.iter().position(|k| *k == kind)
            && let Some(counter) = self.counts.get(index)
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events of `kind` so far.
    pub fn get(&self, kind: EventKind) -> u64 {
        EventKind::ALL
            .iter()
            .position(|k| *k == kind)
            .and_then(|index| self.counts.get(index))
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }
}

/// Everything the endpoint reports; absent parts are left out.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Pipeline counters.
    pub pipeline: Option<Arc<PipelineStats>>,
    /// Events by kind.
    pub kinds: Option<Arc<KindCounters>>,
    /// Detection counters.
    pub detect: Option<Arc<DetectStats>>,
    /// Firewall counters.
    pub firewall: Option<Arc<FirewallStats>>,
    /// Uplink counters.
    pub uplink: Option<Arc<UplinkStats>>,
    /// The spool.
    pub spool: Option<SharedSpool>,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn one(value: u64) -> Vec<(String, u64)> {
    vec![(String::new(), value)]
}

/// Renders the exposition text.
pub fn render(sources: &Sources) -> String {
    let mut out = String::new();
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    if let Some(p) = &sources.pipeline {
        metric(&mut out, "fleetban_agent_lines_total", "counter", "Log lines read.", &one(load(&p.lines)));
        metric(&mut out, "fleetban_agent_batches_total", "counter", "Batches spooled.", &one(load(&p.batches)));
        let a = &p.aggregate;
        metric(
            &mut out,
            "fleetban_agent_summaries_total",
            "counter",
            "Context summaries (per address, service and interval) spooled.",
            &one(load(&a.summaries)),
        );
        metric(
            &mut out,
            "fleetban_agent_summarised_lines_total",
            "counter",
            "Context lines counted into summaries instead of sent as events.",
            &one(load(&a.lines)),
        );
        metric(
            &mut out,
            "fleetban_agent_summary_early_flushes_total",
            "counter",
            "Summaries flushed before their interval ended because [aggregate] max_addresses was reached.",
            &one(load(&a.early_flushes)),
        );
    }
    if let Some(k) = &sources.kinds {
        let samples: Vec<(String, u64)> =
            EventKind::ALL.iter().map(|kind| (format!("{{kind=\"{}\"}}", kind.as_str()), k.get(*kind))).collect();
        metric(&mut out, "fleetban_agent_events_total", "counter", "Events parsed, by kind.", &samples);
        metric(
            &mut out,
            "fleetban_agent_ambiguous_lines_total",
            "counter",
            "Lines skipped because client text names a second host, so the client is uncertain.",
            &one(load(&k.ambiguous)),
        );
    }
    if let Some(d) = &sources.detect {
        let samples: Vec<(String, u64)> = Rule::ALL
            .iter()
            .enumerate()
            .map(|(i, rule)| (format!("{{rule=\"{}\"}}", rule.as_str()), load(&d.decisions[i])))
            .collect();
        metric(&mut out, "fleetban_agent_local_blocks_total", "counter", "Local blocks decided, by rule.", &samples);
        let shadow: Vec<(String, u64)> = Rule::ALL
            .iter()
            .enumerate()
            .map(|(i, rule)| (format!("{{rule=\"{}\"}}", rule.as_str()), load(&d.shadow_decisions[i])))
            .collect();
        metric(
            &mut out,
            "fleetban_agent_shadow_decisions_total",
            "counter",
            "Decisions of rules in shadow mode (nothing blocked), by rule.",
            &shadow,
        );
        metric(
            &mut out,
            "fleetban_agent_open_sessions",
            "gauge",
            "SMTP sessions open now (opened, not yet ended), as detection tracks them.",
            &one(load(&d.open_sessions)),
        );
        metric(
            &mut out,
            "fleetban_agent_protected_spared_total",
            "counter",
            "Decisions not made because the sender's verified reverse DNS is protected.",
            &one(load(&d.protected_spared)),
        );
        metric(
            &mut out,
            "fleetban_agent_detect_tracked",
            "gauge",
            "Addresses tracked by detection.",
            &one(load(&d.tracked)),
        );
        metric(
            &mut out,
            "fleetban_agent_detect_evictions_total",
            "counter",
            "Tracked addresses evicted at the memory cap.",
            &one(load(&d.evictions)),
        );
        metric(
            &mut out,
            "fleetban_agent_detect_stale_events_total",
            "counter",
            "Events skipped by detection as older than the longest window.",
            &one(load(&d.stale_skipped)),
        );
    }
    if let Some(spool) = &sources.spool {
        let status = spool.lock().unwrap_or_else(PoisonError::into_inner).status();
        metric(&mut out, "fleetban_agent_spool_bytes", "gauge", "Bytes in the spool.", &one(status.bytes));
        metric(
            &mut out,
            "fleetban_agent_spool_pending_batches",
            "gauge",
            "Batches spooled and not acknowledged.",
            &one(status.pending_batches),
        );
        metric(
            &mut out,
            "fleetban_agent_spool_dropped_events_total",
            "counter",
            "Events dropped because the spool was full.",
            &one(status.dropped_events),
        );
    }
    if let Some(u) = &sources.uplink {
        metric(
            &mut out,
            "fleetban_agent_uplink_connected",
            "gauge",
            "1 while a server session is open.",
            &one(u64::from(u.connected.load(Ordering::Relaxed))),
        );
        let server = u.server();
        let connected_to: Vec<(String, u64)> = if server.is_empty() {
            Vec::new()
        } else {
            let label = server.replace('\\', "\\\\").replace('"', "\\\"");
            vec![(format!("{{server=\"{label}\"}}"), u64::from(u.connected.load(Ordering::Relaxed)))]
        };
        metric(
            &mut out,
            "fleetban_agent_uplink_server",
            "gauge",
            "The server of the open (or last) session, by URL and address dialled: 1 while connected, 0 after.",
            &connected_to,
        );
        metric(
            &mut out,
            "fleetban_agent_uplink_reconnects_total",
            "counter",
            "Session reconnects.",
            &one(load(&u.reconnects)),
        );
        metric(
            &mut out,
            "fleetban_agent_uplink_batches_sent_total",
            "counter",
            "Batches sent.",
            &one(load(&u.batches_sent)),
        );
        let rejected: Vec<(String, u64)> =
            u.rejected().into_iter().map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), n)).collect();
        metric(
            &mut out,
            "fleetban_agent_rejected_events_total",
            "counter",
            "Events the server rejected (not stored), by reason: too_old, in_future, invalid_remote, ...",
            &rejected,
        );
        metric(
            &mut out,
            "fleetban_agent_uplink_last_ack_seq",
            "gauge",
            "Highest batch seq acknowledged.",
            &one(load(&u.last_ack_seq)),
        );
    }
    if let Some(f) = &sources.firewall {
        metric(
            &mut out,
            "fleetban_agent_firewall_entries",
            "gauge",
            "Entries in the firewall.",
            &one(load(&f.entries)),
        );
        metric(
            &mut out,
            "fleetban_agent_firewall_blocklist_version",
            "gauge",
            "Blocklist version applied.",
            &one(load(&f.version)),
        );
        metric(
            &mut out,
            "fleetban_agent_firewall_reconciles_total",
            "counter",
            "Full reconciles.",
            &one(load(&f.reconciles)),
        );
        metric(
            &mut out,
            "fleetban_agent_firewall_reconcile_repairs_total",
            "counter",
            "Entries repaired because the firewall drifted.",
            &one(load(&f.drift_repaired)),
        );
        metric(
            &mut out,
            "fleetban_agent_firewall_errors_total",
            "counter",
            "Failed firewall commits.",
            &one(load(&f.errors)),
        );
        metric(
            &mut out,
            "fleetban_agent_connections_killed_total",
            "counter",
            "Established connections of newly blocked ranges ended, so the MTA freed their slots.",
            &one(load(&f.connections_killed)),
        );
        metric(
            &mut out,
            "fleetban_agent_connections_would_kill_total",
            "counter",
            "Connections the dry-run backend would have ended.",
            &one(load(&f.connections_would_kill)),
        );
        metric(
            &mut out,
            "fleetban_agent_connection_kill_errors_total",
            "counter",
            "Connections that could not be ended, and failed listings of the host's connections.",
            &one(load(&f.kill_errors)),
        );
        metric(
            &mut out,
            "fleetban_agent_connection_kill_supported",
            "gauge",
            "1 when the kernel ends the connections of blocked ranges (socket destroy), else 0.",
            &one(u64::from(f.kill_support.load(Ordering::Relaxed) == 1)),
        );
    }
    out
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, sources: Sources, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Serving metrics on /metrics.");
    }
    loop {
        let (mut stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "Metrics accept failed.");
                    continue;
                }
            },
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let mut len = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while len < request.len() {
                    let n = stream.read(&mut request[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if request[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&request[..len]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let response = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                let body = render(&sources);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n".to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_metrics() {
        let kinds = Arc::new(KindCounters::default());
        kinds.add(EventKind::AuthFailed);
        kinds.add(EventKind::AuthFailed);
        kinds.ambiguous.store(4, Ordering::Relaxed);
        let firewall = Arc::new(FirewallStats::default());
        firewall.entries.store(7, Ordering::Relaxed);
        let uplink = Arc::new(UplinkStats::default());
        let ack = fleetban_proto::v1::Ack {
            seq: 1,
            rejected_events: 5,
            rejections: vec![fleetban_proto::v1::Rejection {
                reason: "too_old".into(),
                events: 5,
                detail: String::new(),
            }],
        };
        crate::uplink::note_rejections(&ack, &uplink);
        *uplink.server.lock().unwrap() = "https://fleet.example:1 (192.0.2.7:1)".into();
        uplink.connected.store(true, Ordering::Relaxed);
        firewall.drift_repaired.store(3, Ordering::Relaxed);
        let sources = Sources {
            kinds: Some(kinds),
            firewall: Some(firewall),
            detect: Some(Arc::default()),
            uplink: Some(uplink),
            pipeline: Some(Arc::default()),
            spool: None,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, sources, async {
            let _ = stopped.await;
        }));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).await.unwrap();
            text
        };
        let text = get("/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("fleetban_agent_events_total{kind=\"auth_failed\"} 2"), "{text}");
        assert!(text.contains("fleetban_agent_ambiguous_lines_total 4"), "{text}");
        assert!(text.contains("fleetban_agent_firewall_entries 7"));
        assert!(text.contains("fleetban_agent_firewall_reconcile_repairs_total 3"));
        assert!(text.contains("fleetban_agent_local_blocks_total{rule=\"conn_rate\"} 0"));
        assert!(text.contains("fleetban_agent_uplink_reconnects_total 0"));
        assert!(
            text.contains("fleetban_agent_uplink_server{server=\"https://fleet.example:1 (192.0.2.7:1)\"} 1"),
            "{text}"
        );
        assert!(text.contains("fleetban_agent_rejected_events_total{reason=\"too_old\"} 5"), "{text}");
        assert!(text.contains("fleetban_agent_lines_total 0"));
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
