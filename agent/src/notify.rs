//! systemd readiness protocol (`Type=notify` in
//! `deploy/systemd/fleetban-agent.service`).
//!
//! [`ready`] tells the service manager that the agent is up: it is sent once
//! the firewall has finished its reconcile at start, the pipeline follows its
//! sources and the uplink and metrics are attached, so `systemctl start`
//! returns only when the host is protected. [`stopping`] is sent when a
//! shutdown begins. Both write one datagram to `$NOTIFY_SOCKET` and do
//! nothing when it is unset (run by hand, in tests, under another
//! supervisor); a failure to notify is logged and never stops the agent.

use sd_notify::NotifyState;
use tracing::{debug, warn};

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    match sd_notify::notify(states) {
        Ok(()) => debug!(?states, "Notified the service manager."),
        Err(error) => warn!(%error, "Cannot notify the service manager."),
    }
}

/// `READY=1` with a one-line status shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: a graceful shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("Stopping: flushing the spool.")]);
}
