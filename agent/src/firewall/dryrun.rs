//! The dry-run backend: applies nothing, and after every commit writes the
//! set it would hold to `state_dir/firewall-dryrun.json` as
//! `[{"cidr": "...", "expires_at": "RFC 3339" | null, "reason": "..."}]`,
//! atomically (temporary file, fsync, rename). Reading back returns the
//! file's unexpired entries, so the reconciler behaves exactly as with a real
//! firewall.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{Backend, Entry, FirewallError, Staged, parse_net};

/// File name inside the state directory.
pub const FILE_NAME: &str = "firewall-dryrun.json";

/// One line of the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The range.
    pub cidr: String,
    /// Expiry (RFC 3339, UTC); `null` = never.
    pub expires_at: Option<String>,
    /// Why.
    pub reason: String,
}

/// The dry-run backend.
#[derive(Debug)]
pub struct DryRun {
    path: PathBuf,
    staged: Staged,
}

impl DryRun {
    /// A backend writing to `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path, staged: Staged::default() }
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> FirewallError + '_ {
        |source| FirewallError::Io { path: self.path.clone(), source }
    }

    fn load(&self) -> Result<BTreeMap<IpNet, Entry>, FirewallError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(error) => return Err(self.io()(error)),
        };
        let records: Vec<Record> = serde_json::from_slice(&text).map_err(|error| FirewallError::Parse {
            program: self.path.display().to_string(),
            message: error.to_string(),
        })?;
        let mut out = BTreeMap::new();
        for record in records {
            let Some(net) = parse_net(&record.cidr) else { continue };
            let expires_at_ms = match &record.expires_at {
                None => None,
                Some(text) => match text.parse::<jiff::Timestamp>() {
                    Ok(at) => Some(at.as_millisecond()),
                    Err(_) => continue,
                },
            };
            out.insert(net, Entry { net, expires_at_ms, reason: record.reason });
        }
        Ok(out)
    }

    fn store(&self, entries: &BTreeMap<IpNet, Entry>) -> Result<(), FirewallError> {
        let records: Vec<Record> = entries
            .values()
            .map(|entry| Record {
                cidr: entry.net.to_string(),
                expires_at: entry
                    .expires_at_ms
                    .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                    .map(|at| at.to_string()),
                reason: entry.reason.clone(),
            })
            .collect();
        let json = serde_json::to_vec_pretty(&records).map_err(|error| FirewallError::Parse {
            program: self.path.display().to_string(),
            message: error.to_string(),
        })?;
        crate::fsutil::write_atomic(&self.path, &json, 0o644).map_err(self.io())
    }
}

impl Backend for DryRun {
    fn name(&self) -> &'static str {
        "dry-run"
    }

    fn setup(&mut self) -> Result<(), FirewallError> {
        if !self.path.exists() {
            self.store(&BTreeMap::new())?;
        }
        Ok(())
    }

    fn read(&mut self, now_ms: i64) -> Result<Vec<Entry>, FirewallError> {
        Ok(self.load()?.into_values().filter(|e| e.expires_at_ms.is_none_or(|at| at > now_ms)).collect())
    }

    fn staged(&mut self) -> &mut Staged {
        &mut self.staged
    }

    fn commit(&mut self, now_ms: i64) -> Result<(), FirewallError> {
        let (removes, adds) = self.staged.take();
        let mut entries = self.load()?;
        entries.retain(|_, e| e.expires_at_ms.is_none_or(|at| at > now_ms));
        for entry in removes {
            entries.remove(&entry.net);
        }
        for entry in adds {
            entries.insert(entry.net, entry);
        }
        self.store(&entries)
    }

    fn flush(&mut self) -> Result<(), FirewallError> {
        self.store(&BTreeMap::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_written_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut backend = DryRun::new(path.clone());
        backend.setup().unwrap();
        let now = 1_800_000_000_000;
        let e = |s: &str, at: Option<i64>| Entry { net: s.parse().unwrap(), expires_at_ms: at, reason: "r".into() };
        backend.stage_add(e("192.0.2.0/24", Some(now + 60_000)));
        backend.stage_add(e("2001:db8::/64", None));
        backend.stage_add(e("198.51.100.1/32", Some(now + 1_000)));
        backend.commit(now).unwrap();
        let records: Vec<Record> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[0],
            Record { cidr: "192.0.2.0/24".into(), expires_at: Some("2027-01-15T08:01:00Z".into()), reason: "r".into() }
        );
        assert_eq!(records[2].expires_at, None);
        // Later: one expired, one removed.
        backend.stage_remove(e("2001:db8::/64", None));
        backend.commit(now + 2_000).unwrap();
        let held = backend.read(now + 2_000).unwrap();
        assert_eq!(held.iter().map(|e| e.net.to_string()).collect::<Vec<_>>(), ["192.0.2.0/24"]);
        assert!(!dir.path().join("firewall-dryrun.json.tmp").exists());
    }
}
