//! The failure drills' traffic and accounting, shared by the end-to-end
//! tests (`tests/tests/e2e.rs`, `tests/tests/replicas.rs`).
//!
//! Drill traffic binds a distinct source port per SMTP session, so the
//! `[ip]:port` of a connect line in a host's Exim log identifies it; the
//! accounting compares the lines a host's log holds with the rows its agent
//! stored, by port. Both sides are counted in one place each:
//! [`Fleet::written_connects`] reads the log and [`Fleet::stored_connects`]
//! queries the store, so a change in how sessions are stored is adapted
//! there.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fleet::{self, Fleet};
use crate::netns::{Netns, NetnsError};

/// Polite sessions (banner, `QUIT`) from `from` to `to`, one per source
/// port of `ports`, one every `pace`, for at most `max_time`; the thread
/// returns how many completed.
pub fn traffic(
    ns: &Netns,
    from: IpAddr,
    to: SocketAddr,
    ports: Range<u16>,
    pace: Duration,
    max_time: Duration,
) -> JoinHandle<Result<usize, NetnsError>> {
    ns.spawn(move || {
        let started = Instant::now();
        let mut ok = 0;
        for port in ports {
            if started.elapsed() > max_time {
                break;
            }
            if fleet::smtp_quit(to, SocketAddr::new(from, port), Duration::from_millis(300)).is_ok() {
                ok += 1;
            }
            std::thread::sleep(pace);
        }
        ok
    })
}

/// (written, stored, lost, duplicated, catch-up time): lines in the log,
/// rows in the store, ports on one side only, rows beyond one per port, and
/// how long after the accounting started the store was complete.
pub type Accounting = (i64, i64, i64, i64, Duration);

/// Waits until host `i` stored as many sessions from `remote` with a source
/// port in `ports` as its log holds lines (or `within` passed) and returns
/// the [`Accounting`].
pub fn account(fleet: &Fleet, i: usize, remote: IpAddr, ports: Range<u16>, within: Duration) -> Accounting {
    let written = fleet.written_connects(i, remote, ports.clone()).unwrap_or_default();
    let started = Instant::now();
    let deadline = started + within;
    loop {
        let stored = fleet.stored_connects(i, remote, ports.clone()).unwrap_or_default();
        let lost = written.keys().filter(|p| !stored.contains_key(p)).count() as i64;
        let dup: i64 = stored.values().map(|n| n - 1).sum();
        let extra = stored.keys().filter(|p| !written.contains_key(p)).count() as i64;
        if (lost == 0 && extra == 0) || Instant::now() > deadline {
            return (written.values().sum(), stored.values().sum(), lost + extra, dup, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every live block is in every host's nftables (or `within`
/// passed); returns how long it took.
pub fn converge(fleet: &Fleet, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let cidrs = fleet.live_cidrs().unwrap_or_default();
        let ok = (0..fleet.hosts.len()).all(|i| {
            let nft = fleet.nft_entries(i).unwrap_or_default();
            cidrs.iter().all(|c| nft.contains(c.trim_end_matches("/32")))
        });
        if ok {
            return Some(started.elapsed());
        }
        if started.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
