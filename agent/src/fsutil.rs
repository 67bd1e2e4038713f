//! Durable replacement of the agent's state files.
//!
//! Every state file the agent rewrites (credentials, the spool's counters,
//! the persisted blocklist, the dry-run firewall's set, the runtime status)
//! goes through [`write_atomic`]: a reader sees the old contents or the new,
//! never a mix, and after it returns the new contents survive a power cut.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The temporary file [`write_atomic`] writes before the rename: the file
/// name with `.tmp` appended (`state.json` → `state.json.tmp`).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes`: writes [`tmp_path`] with permissions
/// `mode` (before umask), fsyncs it, renames it over `path` and fsyncs the
/// directory so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn replaces_the_file_with_the_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.json");
        std::fs::write(&path, b"old").unwrap();
        // A temporary left by a crash is replaced, not appended to.
        std::fs::write(tmp_path(&path), b"partial garbage").unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!tmp_path(&path).exists());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(tmp_path(Path::new("/x/state.json")), Path::new("/x/state.json.tmp"));
    }

    #[test]
    fn a_missing_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent").join("state.json");
        assert!(write_atomic(&path, b"x", 0o644).is_err());
    }
}
