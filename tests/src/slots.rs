//! Freeing the MTA slots a blocked attacker holds, against real Exim: the
//! cycle the `exim_slots` test asserts and `fleetban-slots` measures.
//!
//! One cycle on host `mx1` of a [`Fleet`] running real Exim: flooder
//! addresses open and hold connections until every slot
//! (`smtp_accept_max`) is taken, each reading its `220` banner so Exim
//! really serves it; a legitimate client is refused (`421`); an operator
//! blocks the flooders through the server; a legitimate client that tries
//! every 10 ms from then on gets `220`. Measured: from the block's creation
//! on the server to the client's first `220` (polling `nft` takes longer
//! than that, so the moment the set changes is not a usable reference;
//! the set is checked afterwards). Every flooder
//! connection must have been ended by the host (a reset or end of stream
//! on the flooder's side), not left open until `smtp_receive_timeout`.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::exim::{Polite, Session, polite_session};
use crate::fleet::{self, Fleet, connect};

/// What one cycle measured.
#[derive(Debug, Clone)]
pub struct Cycle {
    /// The legitimate client's reply code while the slots were full.
    pub refused_with: u16,
    /// From the block's creation on the server (the operator's command
    /// returned) to the legitimate client's first `220`: propagation to the
    /// agent, the firewall commit, ending the held connections and Exim
    /// freeing the slots.
    pub create_to_220: Duration,
    /// Flooder connections the host ended (reset or end of stream) within
    /// 2 s of the block, of all that were open.
    pub ended: usize,
    /// Flooder connections open before the block.
    pub held: usize,
}

/// Opens `per_flooder` connections from each of `flooders` to `to`, reading
/// each banner; returns the open streams.
pub fn flood(fleet: &Fleet, to: SocketAddr, flooders: &[IpAddr], per_flooder: usize) -> anyhow::Result<Vec<TcpStream>> {
    let flooders = flooders.to_vec();
    fleet.in_attacker(move || {
        let mut held = Vec::new();
        for _ in 0..per_flooder {
            for &from in &flooders {
                let Ok(mut stream) = connect(to, Some(from), Duration::from_secs(2)) else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
                let mut banner = [0u8; 3];
                if stream.read_exact(&mut banner).is_ok() && &banner == b"220" {
                    held.push(stream);
                }
            }
        }
        held
    })
}

/// Whether every address of `addrs` is in host `i`'s nftables sets.
fn nft_holds_all(fleet: &Fleet, i: usize, addrs: &[IpAddr]) -> bool {
    let nft = fleet.nft_entries(i).unwrap_or_default();
    addrs.iter().all(|a| nft.contains(&a.to_string()))
}

/// Whether `stream`'s connection was ended by the other side: a reset, or
/// end of stream, within `within`.
fn ended(stream: &TcpStream, within: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(within));
    let mut reader = stream;
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            // Data (nothing is expected after the banner): keep reading.
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => return false,
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// One cycle on host 0 (see the module docs): the flooders' slots are
/// filled, `legit` is refused, `block_cidrs` are blocked through the
/// server, the time until `legit` is served is measured, then the blocks
/// are revoked and the host is left with free slots.
pub fn manual_block_cycle(
    fleet: &Fleet,
    flooders: &[IpAddr],
    per_flooder: usize,
    block_cidrs: &[String],
    legit: IpAddr,
) -> anyhow::Result<Cycle> {
    let smtp = SocketAddr::new(IpAddr::V4(fleet::mx_v4(0)), 25);
    let held = flood(fleet, smtp, flooders, per_flooder)?;
    ensure!(!held.is_empty(), "no flooder connection was served");

    // Every slot is taken: the legitimate client is refused.
    let refused_with =
        match fleet.in_client(move || polite_session(smtp, legit, "mta.example.org", Duration::from_secs(3)))? {
            Polite::Refused(code) => code,
            other => bail!("with {} connections held the legitimate client was not refused: {other:?}", held.len()),
        };

    // From now on the client tries every 10 ms (at most 10 s) until served.
    let client = fleet.client().spawn(move || -> Option<Instant> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(mut session) = Session::connect(smtp, legit, Duration::from_secs(2))
                && let Ok((220, _)) = session.reply()
            {
                let at = Instant::now();
                let _ = session.command("QUIT");
                return Some(at);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    });

    let created = Instant::now();
    let mut ids = Vec::new();
    for cidr in block_cidrs {
        ids.push(fleet.manual_block(cidr)?);
    }
    let served_at = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
        .context("client namespace")?
        .context("the legitimate client was not served within 10 s of the block")?;
    ensure!(
        nft_holds_all(fleet, 0, flooders),
        "the flooders are not in mx1's nftables set:\n{}",
        fleet.agent_log_tail(0)
    );
    let held_count = held.len();
    let ended_count = held.iter().filter(|stream| ended(stream, Duration::from_secs(2))).count();

    for id in ids {
        fleet.revoke_block(id)?;
    }
    let lifted = fleet::wait_until(Duration::from_secs(10), || {
        let nft = fleet.nft_entries(0).unwrap_or_default();
        flooders.iter().all(|a| !nft.contains(&a.to_string()))
    });
    ensure!(lifted, "the revoked blocks stayed in mx1's nftables set");
    drop(held);
    Ok(Cycle {
        refused_with,
        create_to_220: served_at.saturating_duration_since(created),
        ended: ended_count,
        held: held_count,
    })
}

/// The `q`-quantile (0..=1) of `values`, nearest rank; zero when empty.
pub fn quantile(values: &[Duration], q: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let ms = |v: u64| Duration::from_millis(v);
        let values: Vec<Duration> = (1..=100).rev().map(ms).collect();
        assert_eq!(quantile(&values, 0.5), ms(50));
        assert_eq!(quantile(&values, 0.99), ms(99));
        assert_eq!(quantile(&values, 1.0), ms(100));
        assert_eq!(quantile(&[ms(7)], 0.99), ms(7));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
