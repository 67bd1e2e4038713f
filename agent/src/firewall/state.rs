//! The persisted blocklist, `state_dir/blocklist.pb`: the fleet blocklist
//! with its version, the local blocks with when each was made, and the
//! never-blocked ranges in force (for inspection), so that a restarted agent
//! reconciles against the same desired set and reports the version it
//! really holds.
//!
//! The file is `FBBLOCK`, a format byte, then three length-delimited
//! protobuf messages: a `BlocklistSnapshot` of the fleet blocks, one of the
//! local blocks (whose `block_id` carries when the block was made, unix ms)
//! and an `Allowlist` of the never-blocked ranges. A file without the magic
//! is format 1, the same parts as older agents wrote them (the third
//! absent). A file of a newer format or a damaged one is not misread: the
//! agent starts empty and the server's snapshot restores the fleet blocks.

use std::path::Path;

use fleetban_proto::v1::{Allowlist, BlockEntry, BlocklistSnapshot, Cidr};
use ipnet::IpNet;
use prost::Message as _;
use tracing::warn;

use super::Entry;
use super::reconcile::ReconcileError;

/// File name of the persisted blocklist inside the state directory.
pub const STATE_FILE: &str = "blocklist.pb";
/// First bytes of the persisted blocklist, before the format byte.
const STATE_MAGIC: &[u8; 7] = b"FBBLOCK";
/// The format this agent writes and the newest it reads.
const STATE_FORMAT: u8 = b'2';

/// What a persisted blocklist holds.
#[derive(Debug, Default, PartialEq)]
pub struct Persisted {
    /// The fleet blocklist's version.
    pub version: u64,
    /// The fleet blocks by block id.
    pub fleet: Vec<(i64, Entry)>,
    /// The local blocks with when each was made (unix ms, 0 = not known).
    pub local: Vec<(Entry, i64)>,
    /// The never-blocked ranges in force when it was written.
    pub exclude: Vec<IpNet>,
}

/// The range of a block entry, truncated to its prefix.
fn cidr_to_net(cidr: Option<&Cidr>, block_id: i64) -> Result<IpNet, ReconcileError> {
    let cidr = cidr.ok_or(ReconcileError::InvalidEntry { block_id, message: "no cidr".into() })?;
    let net =
        IpNet::try_from(cidr).map_err(|error| ReconcileError::InvalidEntry { block_id, message: error.to_string() })?;
    Ok(net.trunc())
}

/// A firewall entry from a block entry of the wire format.
pub fn entry_of(block: &BlockEntry) -> Result<Entry, ReconcileError> {
    Ok(Entry {
        net: cidr_to_net(block.cidr.as_ref(), block.block_id)?,
        expires_at_ms: (block.expires_at_ms > 0).then_some(block.expires_at_ms),
        reason: block.reason.clone(),
    })
}

fn block_entry(block_id: i64, entry: &Entry) -> BlockEntry {
    BlockEntry {
        block_id,
        cidr: Some(entry.net.into()),
        expires_at_ms: entry.expires_at_ms.unwrap_or(0),
        reason: entry.reason.clone(),
    }
}

/// The bytes of a persisted blocklist (the current format).
pub fn encode<'a>(
    version: u64,
    fleet: impl Iterator<Item = (i64, &'a Entry)>,
    local: impl Iterator<Item = (&'a Entry, i64)>,
    exclude: &[IpNet],
) -> Vec<u8> {
    let fleet = BlocklistSnapshot { version, entries: fleet.map(|(id, entry)| block_entry(id, entry)).collect() };
    let local =
        BlocklistSnapshot { version: 0, entries: local.map(|(entry, made)| block_entry(made, entry)).collect() };
    let exclude = Allowlist { ranges: exclude.iter().map(|net| Cidr::from(*net)).collect() };
    let mut bytes = Vec::with_capacity(fleet.encoded_len() + local.encoded_len() + exclude.encoded_len() + 32);
    bytes.extend_from_slice(STATE_MAGIC);
    bytes.push(STATE_FORMAT);
    // Invariant: encoding into a Vec cannot run out of room (it grows).
    for part in [fleet.encode_length_delimited_to_vec(), local.encode_length_delimited_to_vec()] {
        bytes.extend_from_slice(&part);
    }
    bytes.extend_from_slice(&exclude.encode_length_delimited_to_vec());
    bytes
}

/// Why persisted bytes were not read.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Written by a newer agent, in this format.
    Newer(u8),
    /// Not a persisted blocklist, or cut short.
    Damaged,
}

/// Reads persisted bytes; entries that are not valid ranges are skipped.
pub fn decode(bytes: &[u8]) -> Result<Persisted, DecodeError> {
    let mut buf = match bytes.strip_prefix(STATE_MAGIC.as_slice()) {
        Some([format, rest @ ..]) if *format <= STATE_FORMAT => rest,
        Some([format, ..]) => return Err(DecodeError::Newer(*format)),
        Some([]) => return Err(DecodeError::Damaged),
        // Format 1: no magic.
        None => bytes,
    };
    let fleet = BlocklistSnapshot::decode_length_delimited(&mut buf).map_err(|_| DecodeError::Damaged)?;
    let local = BlocklistSnapshot::decode_length_delimited(&mut buf).map_err(|_| DecodeError::Damaged)?;
    let exclude = match buf.is_empty() {
        true => Vec::new(),
        false => Allowlist::decode_length_delimited(&mut buf)
            .map(|a| a.ranges.iter().filter_map(|c| IpNet::try_from(c).ok()).map(|n| n.trunc()).collect())
            .unwrap_or_default(),
    };
    Ok(Persisted {
        version: fleet.version,
        fleet: fleet.entries.iter().filter_map(|b| entry_of(b).ok().map(|e| (b.block_id, e))).collect(),
        local: local.entries.iter().filter_map(|b| entry_of(b).ok().map(|e| (e, b.block_id.max(0)))).collect(),
        exclude,
    })
}

/// Loads the persisted blocklist at `path`: `None` when there is none, or
/// (logged) when it cannot be read, is damaged or is of a newer format.
pub fn load(path: &Path) -> Option<Persisted> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            warn!(%error, path = %path.display(), "Cannot read the persisted blocklist; starting empty.");
            return None;
        }
    };
    match decode(&bytes) {
        Ok(state) => Some(state),
        Err(DecodeError::Newer(format)) => {
            warn!(
                path = %path.display(),
                format = %char::from(format),
                supported = %char::from(STATE_FORMAT),
                "The persisted blocklist was written by a newer agent; starting empty (the server's snapshot \
                 restores the fleet blocks)."
            );
            None
        }
        Err(DecodeError::Damaged) => {
            warn!(path = %path.display(), "The persisted blocklist is damaged; starting empty.");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(net: &str, expires_at_ms: Option<i64>) -> Entry {
        Entry { net: net.parse().unwrap(), expires_at_ms, reason: "test".into() }
    }

    #[test]
    fn encode_then_decode_is_the_same_state() {
        let fleet = [(7, entry("192.0.2.0/24", Some(5_000))), (9, entry("2001:db8::/64", None))];
        let local = [(entry("198.51.100.7/32", Some(9_000)), 1_234)];
        let exclude: Vec<IpNet> = vec!["203.0.113.0/24".parse().unwrap()];
        let bytes = encode(42, fleet.iter().map(|(id, e)| (*id, e)), local.iter().map(|(e, m)| (e, *m)), &exclude);
        let state = decode(&bytes).unwrap();
        assert_eq!(state.version, 42);
        assert_eq!(state.fleet, fleet.to_vec());
        assert_eq!(state.local, local.to_vec());
        assert_eq!(state.exclude, exclude);
    }

    #[test]
    fn newer_damaged_and_cut_files_are_not_misread() {
        let bytes = encode(1, std::iter::empty(), std::iter::empty(), &[]);
        let mut newer = bytes.clone();
        newer[STATE_MAGIC.len()] = b'3';
        assert_eq!(decode(&newer), Err(DecodeError::Newer(b'3')));
        assert_eq!(decode(STATE_MAGIC), Err(DecodeError::Damaged));
        assert_eq!(decode(&[STATE_MAGIC.as_slice(), b"2", &[0xff, 0xff, 0xff]].concat()), Err(DecodeError::Damaged));
        // Every prefix of a real file either decodes or is refused; none panics.
        let full = encode(
            3,
            [(1, &entry("192.0.2.1/32", None))].into_iter(),
            std::iter::empty(),
            &["10.0.0.0/8".parse().unwrap()],
        );
        for cut in 0..full.len() {
            let _ = decode(&full[..cut]);
        }
    }
}
