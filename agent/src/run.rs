//! `fleetban-agent run`: the long-running agent.
//!
//! Opens the spool in the state directory (cutting a torn tail left by a
//! crash), starts the [`crate::pipeline`] over every configured source with
//! the Exim parser, and runs until the shutdown future resolves; then it
//! stops reading, flushes every pending batch and syncs the spool. It needs
//! no server: events are spooled until an uplink sends them. Under systemd it
//! reports `READY=1` after the firewall's first reconcile and `STOPPING=1`
//! when the shutdown begins ([`crate::notify`]).

use std::future::Future;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::notify;
use crate::parse::{LogKind, Parser, Timezone};
use crate::pipeline::{LineParser, Pipeline, PipelineError, PipelineOptions, SourceSpec};
use crate::service::{ServiceOptions, Services};
use crate::spool::{Spool, SpoolError, SpoolOptions};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration cannot be used as it is.
    #[error("{0}")]
    Config(String),
    /// The spool cannot be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Detection, the firewall, the uplink or metrics could not start.
    #[error(transparent)]
    Services(#[from] crate::service::ServiceError),
}

/// The log parser as a pipeline step: keeps the raw line as evidence for
/// abuse events only, so the bulk (connects, arrivals) stays small.
#[derive(Debug)]
pub struct LogLineParser(Parser);

impl LogLineParser {
    /// A parser of `kind` logs for the configured time zone.
    pub fn new(kind: LogKind, timezone: Timezone) -> Self {
        Self(Parser::for_kind(kind, timezone))
    }
}

impl LineParser for LogLineParser {
    fn parse_line(&mut self, line: &[u8]) -> Option<fleetban_proto::v1::Event> {
        let event = self.0.feed(line)?;
        Some(event.to_proto(event.kind.is_abuse()))
    }
}

/// The zone of the config's `timezone` key.
pub fn timezone(config: &AgentConfig) -> Result<Timezone, RunError> {
    Timezone::from_config(&config.timezone).map_err(|error| RunError::Config(format!("key `timezone`: {error}")))
}

/// Opens the spool of `config` for writing.
pub fn open_spool(config: &AgentConfig) -> Result<Spool, RunError> {
    let (spool, recovery) = Spool::open(&config.spool_dir(), SpoolOptions::with_max_bytes(config.spool.max_bytes))?;
    if !recovery.damage.is_empty() {
        warn!(damaged_records = recovery.damage.len(), "Spool had damaged records; they were cut off.");
    }
    Ok(spool)
}

/// Pipeline options from the config.
pub fn pipeline_options(config: &AgentConfig) -> PipelineOptions {
    PipelineOptions {
        fsync_interval: Duration::from_millis(config.spool.fsync_ms),
        context_batch_age: Duration::from_millis(config.spool.context_batch_ms),
        aggregate: config.aggregate,
        summary_delay: crate::pipeline::summary_delay(&config.aggregate),
        ..PipelineOptions::default()
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    if config.sources.is_empty() {
        return Err(RunError::Config("no [[source]] is configured".into()));
    }
    let timezone = timezone(&config)?;
    let spool = open_spool(&config)?;
    let sources: Vec<SourceSpec> = config
        .sources
        .iter()
        .map(|source| SourceSpec { path: source.path.clone(), start_at: source.start_at, kind: source.kind })
        .collect();
    // Detection and the firewall start first (the firewall reconciles at
    // once); the uplink and metrics attach to the running pipeline's spool.
    let mut services = Services::start(&config, timezone, ServiceOptions::default())?;
    let pipeline = Pipeline::start(spool, &sources, |s| services.parser(s.kind), pipeline_options(&config))?;
    services.attach(pipeline.spool(), pipeline.durable(), Some(pipeline.stats())).await?;
    // Ready for systemd only once the firewall holds the desired set: a
    // failed first reconcile is retried periodically, and said so in the
    // status line instead of holding the start back. A shutdown while the
    // reconcile still runs is not held back either.
    let backend = services.backend_name();
    let sources = config.sources.len();
    tokio::pin!(shutdown);
    let first = tokio::select! {
        outcome = services.first_reconcile() => Some(outcome),
        () = &mut shutdown => None,
    };
    if let Some(outcome) = first {
        let status = match outcome {
            Ok(changes) => format!("Running: {sources} source(s), {backend} firewall reconciled ({changes} changes)."),
            Err(error) => {
                format!("Running: {sources} source(s); {backend} firewall reconcile failed, retrying: {error}")
            }
        };
        info!(servers = %config.server_urls().join(", "), "Agent running.");
        notify::ready(&status);
        shutdown.await;
    }
    info!("Shutting down.");
    notify::stopping();
    let stopped = tokio::task::spawn_blocking(move || pipeline.shutdown())
        .await
        .map_err(|_| RunError::Pipeline(PipelineError::Panicked("shutdown".into())));
    services.shutdown().await;
    stopped??;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            warn!(%error, "Cannot listen for SIGTERM; only Ctrl-C stops the agent.");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetban_proto::v1::EventKind;

    #[test]
    fn exim_parser_keeps_the_raw_line_only_for_abuse() {
        let mut parser = LogLineParser::new(LogKind::Exim, Timezone::Utc);
        let auth = b"2026-11-27 01:57:50.552 [8679] dovecot_plain authenticator failed for (scanner.invalid) [192.0.2.110]:35157 I=[192.0.2.10]:25: 535 Incorrect authentication data (set_id=admin0@example.test)\n";
        let event = parser.parse_line(auth).expect("auth failure parses");
        assert_eq!(event.kind, EventKind::AuthFailed as i32);
        assert_eq!(event.auth_user, "admin0@example.test");
        assert!(event.raw.starts_with("2026-11-27 01:57:50.552 [8679] dovecot_plain"));
        let connect = b"2026-11-27 01:57:34.409 [7954] SMTP connection from [192.0.2.50]:35722 I=[192.0.2.10]:25 (TCP/IP connection count = 1)\n";
        let event = parser.parse_line(connect).expect("connect parses");
        assert_eq!(event.kind, EventKind::Connect as i32);
        assert!(event.raw.is_empty());
        assert!(parser.parse_line(b"  continuation\n").is_none());
    }

    #[test]
    fn an_exim_and_a_dovecot_source_share_one_spool_exactly_once() {
        use crate::pipeline::SourceSpec;
        use crate::spool::{SpoolOptions, read_all};
        use fleetban_proto::v1::Service;
        use std::io::Write as _;
        use std::sync::atomic::Ordering;

        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let exim = dir.path().join("exim_mainlog");
        let maillog = dir.path().join("maillog");
        let sources = [
            SourceSpec { path: exim.clone(), start_at: crate::config::StartAt::Beginning, kind: LogKind::Exim },
            SourceSpec { path: maillog.clone(), start_at: crate::config::StartAt::Beginning, kind: LogKind::Dovecot },
        ];
        let options = PipelineOptions {
            batch_age: Duration::from_millis(20),
            fsync_interval: Duration::from_millis(10),
            watch: false,
            poll_interval: Duration::from_millis(10),
            ..PipelineOptions::default()
        };
        let append = |path: &std::path::Path, line: String| {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            writeln!(f, "{line}").unwrap();
        };
        let mut lines = 0;
        for round in 0..2u32 {
            for n in 0..5u32 {
                append(
                    &exim,
                    format!(
                        "2026-11-27 01:57:50 dovecot_plain authenticator failed for (x) [192.0.2.{}]:35157 I=[192.0.2.10]:25: 535 Incorrect authentication data (set_id=u{round}{n})",
                        100 + n
                    ),
                );
                append(
                    &maillog,
                    format!(
                        "Nov 27 01:57:50 mail dovecot[9]: imap-login: Disconnected (auth failed, 2 attempts in 4 secs): user=<u{round}{n}>, method=PLAIN, rip=198.51.100.{}, lip=192.0.2.10, session=<x>",
                        100 + n
                    ),
                );
                append(
                    &maillog,
                    format!(
                        "Nov 27 01:57:51 mail dovecot[9]: pop3-login: Login: user=<u{round}{n}>, method=PLAIN, rip=203.0.113.{}, lip=192.0.2.10, mpid=1, session=<y>",
                        100 + n
                    ),
                );
                lines += 3;
            }
            let (spool, _) = Spool::open(&spool_dir, SpoolOptions::with_max_bytes(1 << 20)).unwrap();
            let pipeline =
                Pipeline::start(spool, &sources, |s| LogLineParser::new(s.kind, Timezone::Utc), options).unwrap();
            // Each run reads only the lines appended since the last one.
            let want = 15;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pipeline.stats().lines.load(Ordering::Relaxed) < want {
                assert!(std::time::Instant::now() < deadline, "timed out");
                std::thread::sleep(Duration::from_millis(10));
            }
            pipeline.shutdown().unwrap();
        }
        let records = read_all(&spool_dir).unwrap();
        let summaries: Vec<_> = records.iter().flat_map(|b| b.summaries.clone()).collect();
        let events: Vec<_> = records.into_iter().flat_map(|b| b.events).collect();
        let summarised: u32 = summaries.iter().flat_map(|s| &s.counts).map(|c| c.lines).sum();
        assert_eq!(events.len() + summarised as usize, lines, "every line once, across the restart");
        // Logins are context: with aggregation on (the default) the first of
        // each address, service and interval goes out alone (good standing
        // must not wait), the rest in summaries.
        let summarised_logins: u32 = summaries
            .iter()
            .filter(|s| s.service == Service::Pop3 as i32)
            .flat_map(|s| &s.counts)
            .filter(|c| c.kind == EventKind::Login as i32)
            .map(|c| c.lines)
            .sum();

        let count = |kind: EventKind, service: Service| {
            events
                .iter()
                .filter(|e| e.kind == kind as i32 && fleetban_proto::v1::Service::from_wire(e.service) == service)
                .count()
        };
        assert_eq!(count(EventKind::AuthFailed, Service::Smtp), 10);
        assert_eq!(count(EventKind::AuthFailed, Service::Imap), 10);
        assert_eq!(count(EventKind::Login, Service::Pop3) + summarised_logins as usize, 10);
        assert!(events.iter().filter(|e| e.service == Service::Imap as i32).all(|e| e.attempts == 2));
    }
}
