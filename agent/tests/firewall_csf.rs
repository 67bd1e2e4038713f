//! The CSF backend against a fake `csf` that records its calls and keeps
//! CSF's temporary and permanent deny lists in files: exact commands,
//! idempotence, and foreign entries never touched.

mod common_inspect;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetban_agent::firewall::csf::{Csf, CsfOptions};
use fleetban_agent::firewall::now_ms;
use fleetban_agent::firewall::reconcile::Reconciler;
use fleetban_proto::v1::{BlockEntry, BlocklistDelta, BlocklistSnapshot};
use ipnet::IpNet;

const FAKE_CSF: &str = r#"#!/bin/bash
dir="$(dirname "$0")"
echo "$*" >> "$dir/calls"
case "$1" in
  -td) echo "$2 $(( $(date +%s) + $3 )) $4" >> "$dir/temp" ;;
  -tr) grep -v "^$2 " "$dir/temp" > "$dir/temp.new"; mv "$dir/temp.new" "$dir/temp" ;;
  -d) echo "$2 # $3 - Fri Nov 27 00:00:00 2026" >> "$dir/csf.deny" ;;
  -dr) grep -v "^$2 " "$dir/csf.deny" > "$dir/deny.new"; mv "$dir/deny.new" "$dir/csf.deny" ;;
  -t)
    now=$(date +%s)
    printf "\nA/D   IP address                               Port   Dir   Time To Live     Comment\n"
    while read -r ip exp comment; do
      left=$((exp - now))
      if [ "$left" -gt 0 ]; then
        printf "DENY  %-40s *      in    %dm %ds          %s\n" "$ip" $((left / 60)) $((left % 60)) "$comment"
      fi
    done < "$dir/temp"
    ;;
  *) echo "unknown option $1" >&2; exit 1 ;;
esac
"#;

struct Fake {
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let csf = path.join("csf");
        std::fs::write(&csf, FAKE_CSF).unwrap();
        std::fs::set_permissions(&csf, std::fs::Permissions::from_mode(0o755)).unwrap();
        let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 7200;
        // Entries that lfd and an administrator made.
        std::fs::write(path.join("temp"), format!("192.0.2.8 {later} lfd: too many failed logins\n")).unwrap();
        std::fs::write(path.join("csf.deny"), "# csf.deny\n192.0.2.9 # Manually denied by admin\n").unwrap();
        std::fs::write(path.join("calls"), "").unwrap();
        Fake { _dir: dir, dir: path }
    }

    fn options(&self) -> CsfOptions {
        CsfOptions { program: self.dir.join("csf").display().to_string(), deny_file: self.dir.join("csf.deny") }
    }

    /// Calls that change something (not the `-t` listings).
    fn changes(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.join("calls")).unwrap();
        let out: Vec<String> = text.lines().filter(|l| *l != "-t").map(str::to_owned).collect();
        std::fs::write(self.dir.join("calls"), "").unwrap();
        out
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap()
    }
}

fn block(id: i64, cidr: &str, expires_at_ms: i64, reason: &str) -> BlockEntry {
    BlockEntry { block_id: id, cidr: Some(cidr.parse::<IpNet>().unwrap().into()), expires_at_ms, reason: reason.into() }
}

fn reconciler(fake: &Fake) -> Reconciler {
    Reconciler::new(Box::new(Csf::new(fake.options())), vec![], None, Arc::default())
}

fn assert_foreign_untouched(fake: &Fake) {
    assert!(fake.file("temp").contains("192.0.2.8 "), "lfd's entry was removed");
    assert!(fake.file("csf.deny").contains("192.0.2.9 # Manually denied by admin"), "admin's entry was removed");
}

#[test]
fn exact_commands_idempotence_and_foreign_entries() {
    let fake = Fake::new();
    let mut fw = reconciler(&fake);
    let hour = now_ms() + 3_600_000;
    let snapshot = BlocklistSnapshot {
        version: 1,
        entries: vec![block(1, "192.0.2.7/32", hour, "conn_rate"), block(2, "198.51.100.0/24", 0, "manual")],
    };
    fw.apply_snapshot(&snapshot, now_ms()).unwrap();
    let calls = fake.changes();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.contains(&"-d 198.51.100.0/24 fleetban: manual".to_owned()), "{calls:?}");
    let td = calls.iter().find(|c| c.starts_with("-td ")).expect("a -td call");
    assert!(td == "-td 192.0.2.7 3600 fleetban: conn_rate" || td == "-td 192.0.2.7 3599 fleetban: conn_rate", "{td}");
    assert_foreign_untouched(&fake);

    // Idempotent: reconciling again reads back and changes nothing, and a
    // fresh agent (restart) finds its entries and changes nothing either.
    assert_eq!(fw.reconcile(now_ms()).unwrap(), 0);
    let mut restarted = reconciler(&fake);
    restarted.apply_snapshot(&snapshot, now_ms()).unwrap();
    assert_eq!(fake.changes(), Vec::<String>::new());

    // Removing both blocks removes exactly ours.
    let delta = BlocklistDelta { from_version: 1, to_version: 2, added: vec![], removed: vec![1, 2] };
    fw.apply_delta(&delta, now_ms()).unwrap();
    let mut calls = fake.changes();
    calls.sort();
    assert_eq!(calls, ["-dr 198.51.100.0/24", "-tr 192.0.2.7"]);
    assert_foreign_untouched(&fake);

    // A foreign entry the fleet list does not hold is never removed by
    // reconcile, and flush removes only ours.
    fw.add_local(
        fleetban_agent::firewall::Entry {
            net: "203.0.113.5/32".parse().unwrap(),
            expires_at_ms: Some(now_ms() + 600_000),
            reason: "auth_failures".into(),
        },
        now_ms(),
    )
    .unwrap();
    assert_eq!(fw.reconcile(now_ms()).unwrap(), 0);
    fake.changes();
    fw.flush().unwrap();
    assert_eq!(fake.changes(), ["-tr 203.0.113.5"]);
    assert_foreign_untouched(&fake);
}

#[test]
fn missing_csf_is_a_clear_error() {
    let options =
        CsfOptions { program: "/nonexistent/csf".into(), deny_file: Path::new("/nonexistent/csf.deny").into() };
    let mut fw = Reconciler::new(Box::new(Csf::new(options)), vec![], None, Arc::default());
    let error = fw.reconcile(now_ms()).unwrap_err().to_string();
    assert!(error.contains("/nonexistent/csf"), "{error}");
}

/// `firewall list` / `why` read CSF's lists (only fleetban's entries).
#[test]
fn inspection_reads_csf() {
    let fake = Fake::new();
    let options = fake.options();
    common_inspect::inspection_joins_the_kernel_with_the_state(&|| Box::new(Csf::new(options.clone())));
    assert_foreign_untouched(&fake);
}
