//! The CSF backend: ConfigServer Security & Firewall on cPanel hosts.
//!
//! Temporary blocks go through `csf -td IP TTL "fleetban: reason"` and are
//! removed with `csf -tr IP`; permanent ones through `csf -d IP "fleetban:
//! reason"` and `csf -dr IP`. The backend only ever reads back and removes
//! entries whose comment starts with [`COMMENT_PREFIX`]: entries an
//! administrator or another tool (lfd) created are never touched. Actual
//! state comes from `csf -t` (temporary bans) and the deny file
//! (`/etc/csf/csf.deny`, permanent bans). CSF has no batch interface, so a
//! commit is one command per change, removals first.

use std::path::PathBuf;

use super::{Backend, Entry, Exec, FirewallError, Staged, display_net, parse_net};

/// Comment prefix of every entry fleetban creates.
pub const COMMENT_PREFIX: &str = "fleetban:";

/// Where CSF lives.
#[derive(Debug, Clone)]
pub struct CsfOptions {
    /// The `csf` program (looked up on `PATH` when not absolute).
    pub program: String,
    /// CSF's permanent deny file.
    pub deny_file: PathBuf,
}

impl Default for CsfOptions {
    fn default() -> Self {
        Self { program: "csf".into(), deny_file: PathBuf::from("/etc/csf/csf.deny") }
    }
}

/// The CSF backend.
#[derive(Debug)]
pub struct Csf {
    options: CsfOptions,
    exec: Exec,
    staged: Staged,
}

impl Csf {
    /// A backend using `options`.
    pub fn new(options: CsfOptions) -> Self {
        Self { options, exec: Exec::default(), staged: Staged::default() }
    }

    fn csf(&self, args: &[&str]) -> Result<Vec<u8>, FirewallError> {
        self.exec.run(&self.options.program, args, None)
    }

    /// Parses `csf -t`: our temporary bans, with their remaining time.
    pub fn parse_temp_list(text: &str, now_ms: i64) -> Vec<Entry> {
        let mut out = Vec::new();
        for line in text.lines() {
            let Some(comment_at) = line.find(COMMENT_PREFIX) else { continue };
            let mut words = line[..comment_at].split_whitespace();
            if words.next() != Some("DENY") {
                continue;
            }
            let Some(net) = words.next().and_then(parse_net) else { continue };
            let mut secs: i64 = 0;
            let mut any = false;
            for word in words {
                let (number, unit) = word.split_at(word.len().saturating_sub(1));
                let Ok(n) = number.parse::<i64>() else { continue };
                let scale = match unit {
                    "d" => 86_400,
                    "h" => 3_600,
                    "m" => 60,
                    "s" => 1,
                    _ => continue,
                };
                secs += n * scale;
                any = true;
            }
            let reason = line[comment_at + COMMENT_PREFIX.len()..].trim().to_owned();
            let expires_at_ms = Some(now_ms + if any { secs * 1000 } else { 0 });
            out.push(Entry { net, expires_at_ms, reason });
        }
        out
    }

    /// Parses the deny file: our permanent bans.
    pub fn parse_deny_file(text: &str) -> Vec<Entry> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let Some((target, comment)) = line.split_once('#') else { continue };
            let comment = comment.trim();
            let Some(reason) = comment.strip_prefix(COMMENT_PREFIX) else { continue };
            let Some(net) = parse_net(target) else { continue };
            let reason = reason.split(" - ").next().unwrap_or_default().trim().to_owned();
            out.push(Entry { net, expires_at_ms: None, reason });
        }
        out
    }

    fn comment(entry: &Entry) -> String {
        let reason: String =
            entry.reason.chars().filter(|c| c.is_ascii_alphanumeric() || " _-.,/:=".contains(*c)).take(100).collect();
        format!("{COMMENT_PREFIX} {}", if reason.is_empty() { "block" } else { reason.as_str() })
    }
}

impl Backend for Csf {
    fn name(&self) -> &'static str {
        "csf"
    }

    fn setup(&mut self) -> Result<(), FirewallError> {
        Ok(())
    }

    fn read(&mut self, now_ms: i64) -> Result<Vec<Entry>, FirewallError> {
        let temp = self.csf(&["-t"])?;
        let mut out = Self::parse_temp_list(&String::from_utf8_lossy(&temp), now_ms);
        match std::fs::read_to_string(&self.options.deny_file) {
            Ok(text) => out.extend(Self::parse_deny_file(&text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(FirewallError::Io { path: self.options.deny_file.clone(), source }),
        }
        Ok(out)
    }

    fn staged(&mut self) -> &mut Staged {
        &mut self.staged
    }

    fn commit(&mut self, now_ms: i64) -> Result<(), FirewallError> {
        let (removes, adds) = self.staged.take();
        let mut first_error = None;
        for entry in &removes {
            let target = display_net(&entry.net);
            let op = if entry.expires_at_ms.is_some() { "-tr" } else { "-dr" };
            if let Err(error) = self.csf(&[op, &target]) {
                first_error.get_or_insert(error);
            }
        }
        for entry in &adds {
            let target = display_net(&entry.net);
            let comment = Self::comment(entry);
            let result = match entry.remaining_secs(now_ms) {
                Some(secs) => self.csf(&["-td", &target, &secs.to_string(), &comment]),
                None => self.csf(&["-d", &target, &comment]),
            };
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn flush(&mut self) -> Result<(), FirewallError> {
        for entry in self.read(super::now_ms())? {
            self.stage_remove(entry);
        }
        self.commit(super::now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_list_keeps_only_our_entries() {
        let text = "\nA/D   IP address                               Port   Dir   Time To Live     Comment\n\
            DENY  192.0.2.7                                *      in    59m 58s          fleetban: conn_rate\n\
            DENY  192.0.2.8                                *      in    1h 2m 3s         lfd: too many logins\n\
            DENY  2001:db8::/64                            *      in    1d 0h 0m 5s      fleetban: auth_failures\n";
        let entries = Csf::parse_temp_list(text, 0);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].net.to_string(), "192.0.2.7/32");
        assert_eq!(entries[0].expires_at_ms, Some(3_598_000));
        assert_eq!(entries[0].reason, "conn_rate");
        assert_eq!(entries[1].expires_at_ms, Some(86_405_000));
    }

    #[test]
    fn deny_file_keeps_only_our_entries() {
        let text = "# comment line\n192.0.2.1 # fleetban: manual - Fri Nov 27 03:00:00 2026\n\
                    192.0.2.2 # Manually denied\n198.51.100.0/24 # fleetban: prefix\ntcp|in|d=25|s=192.0.2.3\n";
        let entries = Csf::parse_deny_file(text);
        assert_eq!(entries.iter().map(|e| e.net.to_string()).collect::<Vec<_>>(), ["192.0.2.1/32", "198.51.100.0/24"]);
        assert_eq!(entries[0].reason, "manual");
    }
}
