//! Prefix escalation: a /24 (or IPv6 /48) blocked when enough of its
//! addresses are, and campaigns spread thin over one prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use fleetban_proto::policy::{self, Scenario};
use fleetban_proto::v1::EventKind;
use ipnet::IpNet;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AgentCount, CorrelateError, Correlator, Evidence, Finding, REASON_PREFIX};
use crate::blocks::{self, Block, BlockSource, NewBlock};

use super::evidence::{MAX_SAMPLES, tally};
use super::store::{lock_range, refusable, secs, standing};

/// The prefix an escalation of `range` would block, with the prefix length of
/// the units counted inside it: /24 counting addresses, /48 counting /64s.
pub fn escalation_prefix(range: IpNet) -> Option<(IpNet, u8)> {
    let (len, unit) = match range {
        IpNet::V4(_) => (24, 32),
        IpNet::V6(_) => (48, 64),
    };
    if range.prefix_len() <= len {
        return None;
    }
    IpNet::new(range.addr(), len).ok().map(|p| (p.trunc(), unit))
}

/// Abuse events of one address of a prefix, per (agent, kind).
#[derive(sqlx::FromRow)]
struct UnitCount {
    address: IpAddr,
    #[sqlx(flatten)]
    count: AgentCount,
}

impl Correlator {
    /// Judges the prefix `prefix` (a /24, or a /48 counting /64s: `unit`)
    /// as one attacker at `now`: a campaign of many addresses that each stay
    /// below every threshold. After an operator revoked a block of the
    /// prefix (or around it), only evidence after that counts. The evidence
    /// of its units (addresses or /64s) is summed, leaving out units in good standing, protected ones and
    /// ones with too little evidence of their own (under a quarter of a
    /// rule's `per_host`); at least `prefix_min_addresses` units must
    /// remain, and the sum must meet a scenario's thresholds as one
    /// address's would. Reads only.
    pub async fn evaluate_campaign(
        &self,
        conn: &mut PgConnection,
        prefix: IpNet,
        unit: u8,
        now: OffsetDateTime,
    ) -> Result<Option<Finding>, sqlx::Error> {
        let (kinds, windows) = self.kind_windows();
        let rows: Vec<UnitCount> = sqlx::query_as(
            "select em.address, em.agent_id, em.kind, sum(em.events)::int8 as events, min(em.minute) as first_seen, \
                    max(em.minute) as last_seen \
             from evidence_minutes em join unnest($2::text[], $3::float8[]) as w(kind, secs) on em.kind = w.kind \
             where em.address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
             and em.minute > $4 - make_interval(secs => w.secs) and em.minute <= $4 \
             and em.minute > coalesce((select date_trunc('minute', max(revoked_at)) from blocks \
                 where revoked_cause = 'revoked' and cidr >>= $1::cidr and revoked_at <= $4), '-infinity') \
             group by em.address, em.agent_id, em.kind limit 20000",
        )
        .bind(prefix)
        .bind(&kinds)
        .bind(&windows)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
        let unit_of = |a: IpAddr| IpNet::new(a, unit).map_or(IpNet::from(a), |n| n.trunc());
        // A unit takes part only with evidence of its own: in one scenario,
        // at least a quarter of that rule's per-host threshold (at least 2),
        // so one mistyped password never lends its address to a campaign.
        let mut weight: BTreeMap<(IpNet, Scenario), u64> = BTreeMap::new();
        for UnitCount { address, count: AgentCount { kind, events: n, .. } } in &rows {
            if let Some(kind) = EventKind::from_name(kind)
                && let Some(scenario) = kind.scenario()
            {
                *weight.entry((unit_of(*address), scenario)).or_default() +=
                    u64::from(kind.weight()) * u64::try_from(*n).unwrap_or(0);
            }
        }
        let abusive: BTreeSet<IpNet> = weight
            .iter()
            .filter(|((_, scenario), w)| {
                let per_host = self.rules.get(*scenario).per_host;
                per_host > 0 && **w >= u64::from(per_host.div_ceil(4).max(2))
            })
            .map(|((unit, _), _)| *unit)
            .collect();
        let min_units = usize::try_from(self.config.prefix_min_addresses).unwrap_or(usize::MAX);
        if abusive.len() < min_units {
            return Ok(None);
        }
        let standing: Vec<(IpAddr, bool, Option<String>)> = sqlx::query_as(
            "select address, coalesce(last_accepted > $2 - make_interval(secs => $3) and last_accepted <= $2, false), host_name \
             from sender_standing where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) limit 20000",
        )
        .bind(prefix)
        .bind(now)
        .bind(secs(self.config.good_standing_secs))
        .fetch_all(&mut *conn)
        .await?;
        let excluded: BTreeSet<IpNet> = standing
            .iter()
            .filter(|(_, good, name)| {
                *good || name.as_deref().is_some_and(|n| policy::is_protected(n, &self.protected))
            })
            .map(|(a, _, _)| unit_of(*a))
            .collect();
        let units: BTreeSet<IpNet> = abusive.difference(&excluded).copied().collect();
        if units.len() < min_units {
            return Ok(None);
        }
        let mut per_agent: BTreeMap<(Uuid, String), AgentCount> = BTreeMap::new();
        for UnitCount { address, count } in &rows {
            if !units.contains(&unit_of(*address)) {
                continue;
            }
            per_agent
                .entry((count.agent_id, count.kind.clone()))
                .and_modify(|sum| {
                    sum.events += count.events;
                    sum.first_seen = sum.first_seen.min(count.first_seen);
                    sum.last_seen = sum.last_seen.max(count.last_seen);
                })
                .or_insert_with(|| count.clone());
        }
        let per_agent: Vec<AgentCount> = per_agent.into_values().collect();
        let mut users: Vec<(Option<Uuid>, i64)> = Vec::new();
        if per_agent.iter().any(|c| c.kind == EventKind::AuthFailed.as_str()) {
            let rows: Vec<(IpAddr, Uuid, String)> = sqlx::query_as(
                "select address, agent_id, auth_user from auth_users \
                 where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
                 and last_seen > $2 - make_interval(secs => $3) and last_seen <= $2 limit 20000",
            )
            .bind(prefix)
            .bind(now)
            .bind(f64::from(self.rules.get(Scenario::Auth).window_secs))
            .fetch_all(&mut *conn)
            .await?;
            let mut by_agent: BTreeMap<Uuid, BTreeSet<&str>> = BTreeMap::new();
            let mut all: BTreeSet<&str> = BTreeSet::new();
            for (address, agent, user) in rows.iter().filter(|r| units.contains(&unit_of(r.0))) {
                let _ = address;
                by_agent.entry(*agent).or_default().insert(user);
                all.insert(user);
            }
            users = by_agent.into_iter().map(|(a, u)| (Some(a), u.len() as i64)).collect();
            users.push((None, all.len() as i64));
        }
        let t = tally(&per_agent, &users);
        let Some(verdict) = policy::judge(&self.rules, &t) else { return Ok(None) };
        let mut evidence = Evidence {
            rule: REASON_PREFIX.to_owned(),
            scenario: Some(verdict.scenario),
            verdict: format!(
                "campaign of {} addresses: {}",
                units.len(),
                verdict.describe(self.rules.get(verdict.scenario))
            ),
            escalates: false,
            addresses: units.iter().map(ToString::to_string).collect(),
            ..Evidence::default()
        };
        evidence.count(&per_agent);
        self.samples(conn, prefix, now, &mut evidence).await?;
        evidence.addresses = units.iter().map(ToString::to_string).collect();
        Ok(Some(Finding { target: prefix, verdict, evidence }))
    }

    /// Evaluates the campaign prefixes of `targets` and blocks (or, in
    /// shadow mode, records) each one found.
    pub(super) async fn campaigns(&self, targets: &BTreeSet<IpNet>) -> Result<Vec<Block>, CorrelateError> {
        let prefixes: BTreeMap<IpNet, u8> = targets.iter().filter_map(|t| escalation_prefix(*t)).collect();
        let now = OffsetDateTime::now_utc();
        let mut created = Vec::new();
        for (prefix, unit) in prefixes {
            if self.never_blocked(prefix) {
                continue;
            }
            let finding = {
                let mut conn = self.pool.acquire().await?;
                let (covered, _) = standing(&mut conn, prefix, false, self.config.offence_window_secs).await?;
                if covered {
                    continue;
                }
                self.evaluate_campaign(&mut conn, prefix, unit, now).await?
            };
            let Some(finding) = finding else { continue };
            if finding.verdict.shadow || self.config.is_shadow(REASON_PREFIX) {
                self.record_shadow(prefix, REASON_PREFIX, BlockSource::Auto, None, &finding.evidence).await?;
                continue;
            }
            let mut tx = self.pool.begin().await?;
            lock_range(&mut tx, prefix).await?;
            let (covered, earlier) = standing(&mut tx, prefix, false, self.config.offence_window_secs).await?;
            if covered {
                continue;
            }
            if let Some(block) = self.block_prefix(tx, prefix, finding.evidence, earlier).await? {
                created.push(block);
            }
        }
        Ok(created)
    }

    /// Prefix escalation after `blocked` was blocked: when enough ranges
    /// inside its /24 (IPv4) or /48 (IPv6, counting /64s) were blocked within
    /// `prefix_window_secs`, blocks the prefix and retires the blocks inside.
    pub(super) async fn escalate(&self, blocked: IpNet) -> Result<Option<Block>, CorrelateError> {
        let Some((prefix, unit)) = escalation_prefix(blocked) else {
            return Ok(None);
        };
        let mut tx = self.pool.begin().await?;
        lock_range(&mut tx, prefix).await?;
        let (covered, earlier) = standing(&mut tx, prefix, false, self.config.offence_window_secs).await?;
        if covered {
            return Ok(None);
        }
        let inside: Vec<(IpNet, serde_json::Value)> = sqlx::query_as(
            "select cidr, evidence from blocks where cidr << $1::cidr \
             and created_at >= now() - make_interval(secs => $2) and revoked_cause is distinct from 'revoked' \
             and coalesce((evidence->>'escalates')::boolean, true) \
             order by created_at",
        )
        .bind(prefix)
        .bind(secs(self.config.prefix_window_secs))
        .fetch_all(&mut *tx)
        .await?;
        let units: BTreeSet<IpNet> =
            inside.iter().filter_map(|(cidr, _)| IpNet::new(cidr.addr(), unit).ok().map(|n| n.trunc())).collect();
        if units.len() < usize::try_from(self.config.prefix_min_addresses).unwrap_or(usize::MAX) {
            return Ok(None);
        }
        let mut ev = Evidence { rule: REASON_PREFIX.to_owned(), escalates: false, ..Evidence::default() };
        for (cidr, json) in inside {
            ev.addresses.insert(cidr.to_string());
            let Ok(one) = serde_json::from_value::<Evidence>(json) else {
                continue;
            };
            ev.agents.extend(one.agents);
            for (kind, n) in one.kinds {
                *ev.kinds.entry(kind).or_default() += n;
            }
            ev.events += one.events;
            if let (Some(first), Some(last)) = (one.first_seen, one.last_seen) {
                ev.see(first, last);
            }
            for sample in one.samples {
                if ev.samples.len() < MAX_SAMPLES && !ev.samples.contains(&sample) {
                    ev.samples.push(sample);
                }
            }
        }
        ev.offence = u32::try_from(earlier + 1).unwrap_or(u32::MAX);
        if self.config.is_shadow(REASON_PREFIX) {
            tx.rollback().await?;
            self.record_shadow(prefix, REASON_PREFIX, BlockSource::Auto, None, &ev).await?;
            return Ok(None);
        }
        self.block_prefix(tx, prefix, ev, earlier).await
    }

    /// Blocks `prefix` in `tx` (which holds its lock): retires the blocks
    /// inside, creates the prefix block, commits. A prefix policy refuses (a
    /// fleet address or allowlisted host inside) leaves the blocks inside
    /// alone.
    pub(super) async fn block_prefix(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        prefix: IpNet,
        mut ev: Evidence,
        earlier: i64,
    ) -> Result<Option<Block>, CorrelateError> {
        if let Err(refusal) = refusable(blocks::check_policy(&mut tx, self.config.as_ref(), prefix, false).await)? {
            tracing::info!(%prefix, %refusal, "Not blocking the prefix: policy refuses it.");
            return Ok(None);
        }
        ev.offence = u32::try_from(earlier + 1).unwrap_or(u32::MAX);
        let ttl = self.ttl(earlier);
        // Retire the blocks inside first: the prefix's add and their removes
        // commit together, and row locks are taken in the same order as every
        // other blocklist writer (block rows, then the version counter).
        let retired = blocks::revoke_covered_by_in(&mut tx, prefix, &format!("superseded by prefix {prefix}")).await;
        let retired = refusable(retired)?.unwrap_or_default();
        let new = NewBlock {
            cidr: prefix,
            reason: REASON_PREFIX.to_owned(),
            source: BlockSource::Auto,
            evidence: ev.to_json(),
            ttl: Some(ttl),
            created_by: None,
            force: false,
        };
        let block = match refusable(blocks::create_in(&mut tx, self.config.as_ref(), new).await)? {
            Ok(block) => block,
            Err(refusal) => {
                tracing::info!(%prefix, %refusal, "Not escalating to the prefix: policy refuses it.");
                return Ok(None);
            }
        };
        tx.commit().await?;
        tracing::info!(
            %prefix,
            block_id = block.id,
            ranges = ev.addresses.len(),
            retired = retired.len(),
            ttl_secs = ttl.as_secs(),
            "Prefix block created."
        );
        Ok(Some(block))
    }
}
