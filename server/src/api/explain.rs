//! Why a range was blocked, in one sentence for people: built from a block's
//! source, reason and the evidence its deciding rule recorded (the JSON of
//! `crate::correlate::Evidence`, read field by field so that blocks stored
//! by older versions, with fields missing, still read).
//!
//! Example: `auth_failed ×9 on 3 hosts, decided by the fleet rule: auth: 9
//! weighted events across the fleet within 600 s (threshold 6).`

use serde_json::Value;

/// Kinds and counts as `auth_failed ×9, relay_denied ×2`, biggest first.
fn kinds(detail: &Value) -> Option<String> {
    let map = detail.get("kinds")?.as_object()?;
    let mut pairs: Vec<(&str, i64)> = map.iter().filter_map(|(k, v)| Some((k.as_str(), v.as_i64()?))).collect();
    if pairs.is_empty() {
        return None;
    }
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    Some(pairs.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", "))
}

fn hosts(detail: &Value) -> usize {
    detail.get("agents").and_then(Value::as_array).map_or(0, Vec::len)
}

fn text<'a>(detail: &'a Value, key: &str) -> Option<&'a str> {
    detail.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The sentence for a block.
pub fn why(source: &str, reason: &str, created_by: Option<&str>, detail: &Value) -> String {
    if source == "manual" {
        let who = created_by.filter(|s| !s.is_empty()).unwrap_or("an operator");
        return format!("Blocked by hand by {who}: {reason}.");
    }
    let rule = text(detail, "rule").unwrap_or(reason);
    let mut seen = String::new();
    if let Some(kinds) = kinds(detail) {
        seen = format!("{kinds} on {}", plural(hosts(detail), "host", "hosts"));
    }
    let verdict = text(detail, "verdict");
    let standing = if detail.get("good_standing").and_then(Value::as_bool) == Some(true) {
        " The sender was in good standing, so the threshold was raised."
    } else {
        ""
    };
    let decided = match rule {
        "fleet_correlation" => "decided by the fleet rule".to_owned(),
        "single_host" => "decided by the per-host rule".to_owned(),
        "prefix" => {
            let n = detail.get("addresses").and_then(Value::as_array).map_or(0, Vec::len);
            format!("escalated to the prefix ({} inside it)", plural(n, "offending range", "offending ranges"))
        }
        "local_block" => {
            let local = detail.get("local");
            let r = local.and_then(|l| text(l, "reason")).unwrap_or("local rule");
            let e = local.and_then(|l| text(l, "evidence"));
            match e {
                Some(e) => format!("blocked first by a host's own detection ({r}: {e})"),
                None => format!("blocked first by a host's own detection ({r})"),
            }
        }
        other => format!("decided by rule {other}"),
    };
    let mut out = if seen.is_empty() { capitalise(&decided) } else { format!("{seen}, {decided}") };
    if let Some(v) = verdict {
        out.push_str(": ");
        out.push_str(v);
    }
    out.push('.');
    out.push_str(standing);
    out
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_fleet_block_names_kinds_hosts_and_threshold() {
        let detail = json!({
            "rule": "fleet_correlation", "scenario": "auth",
            "verdict": "auth: 9 weighted events across the fleet within 600 s (threshold 6)",
            "agents": ["00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002",
                       "00000000-0000-0000-0000-000000000003"],
            "kinds": {"auth_failed": 9, "relay_denied": 1}, "good_standing": false
        });
        assert_eq!(
            why("auto", "fleet_correlation", None, &detail),
            "auth_failed ×9, relay_denied ×1 on 3 hosts, decided by the fleet rule: \
             auth: 9 weighted events across the fleet within 600 s (threshold 6)."
        );
    }

    #[test]
    fn manual_local_and_old_blocks_read() {
        assert_eq!(why("manual", "spam run", Some("ops"), &json!({})), "Blocked by hand by ops: spam run.");
        let local = json!({"rule": "local_block", "local": {"reason": "slot_exhaustion",
            "evidence": "12 of 100 slots open"}, "agents": ["x"], "kinds": {"refused_per_host": 4}});
        assert_eq!(
            why("agent", "local_block", None, &local),
            "refused_per_host ×4 on 1 host, blocked first by a host's own detection \
             (slot_exhaustion: 12 of 100 slots open)."
        );
        assert_eq!(why("auto", "fleet_correlation", None, &json!({})), "Decided by the fleet rule.");
        let standing = json!({"rule": "single_host", "good_standing": true, "verdict": "v"});
        assert!(why("auto", "single_host", None, &standing).ends_with("so the threshold was raised."));
    }
}
