//! `fleetban-agent check-config`: validates a configuration file before it is
//! used, for installers, configuration management and operators.
//!
//! Loading ([`AgentConfig::load`]) already refuses unknown keys and values
//! out of range, naming the key. On top of that this module finds what would
//! make `run` fail or misbehave although every value is well-formed
//! (*errors*: no `[[source]]`, a relative `ca_file`, an allowlist entry that
//! covers every address, a metrics port of 0), and what depends on the host
//! the file is checked on (*warnings*: a missing CA file or log directory, a
//! firewall tool that is not installed, the `dry-run` backend). Every finding
//! names its key. Warnings do not fail the check unless `--strict` is given,
//! so a file can be checked on a machine other than the mail host (an
//! installer's staging root, a CI runner).

use std::fmt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::config::{AgentConfig, FirewallBackend};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The agent would refuse to run, or run without effect.
    Error,
    /// Depends on the host, or is legal but probably not meant.
    Warning,
}

/// One problem, with the dotted key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// Dotted key, e.g. `allowlist.cidrs[2]`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: key `{}`: {}", self.key, self.message)
    }
}

/// Where programs are looked up besides `$PATH` (systemd services run with
/// the sbin directories on their path; a login shell may not have them).
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Whether an executable `name` exists on `$PATH` or in the sbin directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Checks a loaded config; `host` adds the checks against this machine
/// (files and programs). Errors come first, then warnings, each in key order
/// of the file.
pub fn check(config: &AgentConfig, host: bool) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut error = |key: String, message: String| findings.push(Finding { severity: Severity::Error, key, message });
    if config.sources.is_empty() {
        error("source".into(), "no [[source]] is configured; `run` needs at least one log file".into());
    }
    if let Some(ca) = &config.ca_file
        && !ca.is_absolute()
    {
        error("ca_file".into(), format!("{} must be an absolute path", ca.display()));
    }
    for (index, entry) in config.allowlist.cidrs.iter().enumerate() {
        if entry.0.prefix_len() == 0 {
            error(
                format!("allowlist.cidrs[{index}]"),
                format!("{} covers every address, so nothing would ever be blocked", entry.0),
            );
        }
    }
    if let Some(listen) = config.metrics.listen
        && listen.port() == 0
    {
        error("metrics.listen".into(), format!("{listen} has no port; Prometheus needs a fixed one"));
    }

    let mut warn = |key: String, message: String| findings.push(Finding { severity: Severity::Warning, key, message });
    let nets: Vec<IpNet> = config.allowlist.cidrs.iter().map(|entry| entry.0).collect();
    for (index, net) in nets.iter().enumerate() {
        if let Some(outer) = nets[..index].iter().find(|outer| outer.contains(net)) {
            warn(format!("allowlist.cidrs[{index}]"), format!("{net} is already covered by {outer}"));
        }
    }
    if config.firewall.backend == FirewallBackend::DryRun {
        warn("firewall.backend".into(), "\"dry-run\" blocks nothing; it only records what it would do".into());
    }
    if host {
        if let Some(ca) = &config.ca_file
            && ca.is_absolute()
            && !ca.is_file()
        {
            warn("ca_file".into(), format!("{} does not exist (yet)", ca.display()));
        }
        if config.state_dir.exists() && !config.state_dir.is_dir() {
            warn("state_dir".into(), format!("{} exists and is not a directory", config.state_dir.display()));
        }
        for (index, source) in config.sources.iter().enumerate() {
            let parent = source.path.parent().filter(|parent| !parent.as_os_str().is_empty());
            if parent.is_some_and(|parent| !parent.is_dir()) {
                warn(
                    format!("source[{index}].path"),
                    format!("the directory of {} does not exist", source.path.display()),
                );
            } else if !source.path.exists() {
                warn(
                    format!("source[{index}].path"),
                    format!("{} does not exist yet; it is followed once it appears", source.path.display()),
                );
            }
        }
        let programs: &[&str] = match config.firewall.backend {
            FirewallBackend::Nftables => &["nft"],
            FirewallBackend::Ipset => &["ipset", "iptables"],
            FirewallBackend::Csf => &["csf"],
            FirewallBackend::DryRun => &[],
        };
        for program in programs {
            if find_program(program).is_none() {
                warn("firewall.backend".into(), format!("`{program}` is not installed on this host"));
            }
        }
    }
    findings
}

/// Whether `findings` fail the check (`strict`: warnings too).
pub fn failed(findings: &[Finding], strict: bool) -> bool {
    findings.iter().any(|finding| strict || finding.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> AgentConfig {
        let text = format!(
            "server = \"https://fleet.example.net:50051\"\nstate_dir = \"/var/lib/fleetban\"\n{extra}\n\
             [[source]]\npath = \"/var/log/exim_mainlog\"\n"
        );
        AgentConfig::from_toml(&text, Path::new("agent.toml")).expect("valid")
    }

    fn keys(findings: &[Finding], severity: Severity) -> Vec<&str> {
        findings.iter().filter(|f| f.severity == severity).map(|f| f.key.as_str()).collect()
    }

    #[test]
    fn a_complete_config_has_no_errors() {
        let findings = check(&config("[allowlist]\ncidrs = [\"192.0.2.0/24\", \"2001:db8::1\"]"), false);
        assert!(findings.is_empty(), "{findings:?}");
        assert!(!failed(&findings, true));
    }

    #[test]
    fn the_example_file_has_no_errors() {
        let text = include_str!("../../deploy/agent.example.toml");
        let config = AgentConfig::from_toml(text, Path::new("agent.example.toml")).expect("valid");
        let findings = check(&config, false);
        assert!(!failed(&findings, false), "{findings:?}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let no_source = AgentConfig::from_toml("server = \"https://a.example:1\"\n", Path::new("a.toml")).unwrap();
        assert_eq!(keys(&check(&no_source, false), Severity::Error), ["source"]);
        let findings = check(&config("ca_file = \"ca.pem\""), false);
        assert_eq!(keys(&findings, Severity::Error), ["ca_file"]);
        let findings = check(&config("[allowlist]\ncidrs = [\"192.0.2.0/24\", \"::/0\"]"), false);
        assert_eq!(keys(&findings, Severity::Error), ["allowlist.cidrs[1]"]);
        let findings = check(&config("[metrics]\nlisten = \"127.0.0.1:0\""), false);
        assert_eq!(keys(&findings, Severity::Error), ["metrics.listen"]);
        assert!(failed(&findings, false));
    }

    #[test]
    fn warnings_do_not_fail_unless_strict() {
        let findings = check(&config("[allowlist]\ncidrs = [\"192.0.2.0/24\", \"192.0.2.7\"]"), false);
        assert_eq!(keys(&findings, Severity::Warning), ["allowlist.cidrs[1]"]);
        assert!(!failed(&findings, false));
        assert!(failed(&findings, true));
        let findings = check(&config("[firewall]\nbackend = \"dry-run\""), false);
        assert_eq!(keys(&findings, Severity::Warning), ["firewall.backend"]);
    }

    #[test]
    fn host_checks_find_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "server = \"https://a.example:1\"\nstate_dir = \"{0}/state\"\nca_file = \"{0}/ca.pem\"\n\
             [firewall]\nbackend = \"dry-run\"\n[[source]]\npath = \"{0}/missing-dir/mainlog\"\n\
             [[source]]\npath = \"{0}/later.log\"\n",
            dir.path().display()
        );
        let config = AgentConfig::from_toml(&text, Path::new("a.toml")).unwrap();
        let findings = check(&config, true);
        assert_eq!(
            keys(&findings, Severity::Warning),
            ["firewall.backend", "ca_file", "source[0].path", "source[1].path"],
            "{findings:?}"
        );
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        std::fs::create_dir(dir.path().join("missing-dir")).unwrap();
        std::fs::write(dir.path().join("missing-dir/mainlog"), "").unwrap();
        std::fs::write(dir.path().join("later.log"), "").unwrap();
        assert_eq!(keys(&check(&config, true), Severity::Warning), ["firewall.backend"]);
    }
}
