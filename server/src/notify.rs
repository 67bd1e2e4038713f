//! systemd readiness protocol (`Type=notify` in
//! `deploy/systemd/fleetban-server.service`).
//!
//! `fleetban-server serve` sends [`ready`] once the migrations are applied
//! and both listeners are bound (connections are accepted from then on), so
//! units ordered after it and `systemctl start` see a server that answers;
//! [`stopping`] is sent when a graceful shutdown begins. Both write one
//! datagram to `$NOTIFY_SOCKET` and do nothing when it is unset; a failure to
//! notify is logged and never stops the server.

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

/// `STOPPING=1`: a graceful shutdown has begun (sessions drain).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("Stopping: draining agent sessions.")]);
}
