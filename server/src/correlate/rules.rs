//! The decisions: assessing a range, the scenario rules, agents' local
//! blocks, and shadow mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use fleetban_proto::canonical_net;
use fleetban_proto::policy::{self, Scenario, Tally};
use fleetban_proto::text::{LOCAL_BLOCK_MAX_EVIDENCE_BYTES, LOCAL_BLOCK_MAX_REASON_BYTES, truncate};
use fleetban_proto::v1::EventKind;
use ipnet::IpNet;
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    AgentCount, Assessment, CorrelateError, Correlator, Evidence, Finding, LOCAL_BLOCKS_REFUSED,
    LOCAL_BLOCKS_TTL_CAPPED, LocalEvidence, REASON_FLEET, REASON_LOCAL, REASON_SINGLE_HOST, SHADOW_DECISIONS, SPARED,
    judge_local,
};
use crate::blocks::{self, Block, BlockSource, NewBlock, Refusal};

use super::evidence::{MAX_ADDRESSES, MAX_SAMPLES, tally};
use super::store::{lock_range, refusable, secs, standing};

/// Which rule an automatic decision is recorded under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rule {
    Fleet,
    SingleHost,
    Local,
}

impl Rule {
    fn reason(self) -> &'static str {
        match self {
            Rule::Fleet => REASON_FLEET,
            Rule::SingleHost => REASON_SINGLE_HOST,
            Rule::Local => REASON_LOCAL,
        }
    }
}

/// A shadow decision about a range is recorded at most once per this long
/// per rule.
pub(super) const SHADOW_REPEAT: Duration = Duration::from_secs(3_600);

impl Correlator {
    /// What the store knows about `range` at `now`: per-scenario counts
    /// within each rule's window, failing users, good standing and the
    /// verified names (protection).
    pub async fn assess(
        &self,
        conn: &mut PgConnection,
        range: IpNet,
        now: OffsetDateTime,
    ) -> Result<Assessment, sqlx::Error> {
        let (kinds, windows) = self.kind_windows();
        let per_agent: Vec<AgentCount> = sqlx::query_as(concat!(
            "select em.agent_id, em.kind, sum(em.events)::int8 as events, min(em.minute) as first_seen, \
                    max(em.minute) as last_seen \
             from evidence_minutes em join unnest($2::text[], $3::float8[]) as w(kind, secs) on em.kind = w.kind \
             where em.address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
             and em.minute > $4 - make_interval(secs => w.secs) and em.minute <= $4 \
             and em.minute > ",
            revoked_since!(),
            " group by em.agent_id, em.kind"
        ))
        .bind(range)
        .bind(&kinds)
        .bind(&windows)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
        let auth_window = f64::from(self.rules.get(Scenario::Auth).window_secs);
        let users: Vec<(Option<Uuid>, i64)> = if per_agent.iter().any(|c| c.kind == EventKind::AuthFailed.as_str()) {
            sqlx::query_as(
                "select agent_id, count(distinct auth_user) from auth_users \
                 where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
                 and last_seen > $2 - make_interval(secs => $3) and last_seen <= $2 \
                 and last_seen > coalesce((select max(revoked_at) from blocks where revoked_cause = 'revoked' \
                     and cidr && $1::cidr and revoked_at <= $2), '-infinity') \
                 group by grouping sets ((agent_id), ())",
            )
            .bind(range)
            .bind(now)
            .bind(auth_window)
            .fetch_all(&mut *conn)
            .await?
        } else {
            Vec::new()
        };
        let (good, host_names): (Option<bool>, Option<Vec<String>>) = sqlx::query_as(
            "select bool_or(last_accepted > $2 - make_interval(secs => $3) and last_accepted <= $2), \
                    array_agg(distinct host_name) filter (where host_name is not null) \
             from (select last_accepted, host_name from sender_standing \
                   where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) limit 256) s",
        )
        .bind(range)
        .bind(now)
        .bind(secs(self.config.good_standing_secs))
        .fetch_one(&mut *conn)
        .await?;
        let host_names = host_names.unwrap_or_default();
        let mut t = tally(&per_agent, &users);
        t.good_standing = good.unwrap_or(false);
        t.protected = host_names.iter().any(|n| policy::is_protected(n, &self.protected));
        Ok(Assessment { tally: t, per_agent, host_names })
    }

    /// Judges `range` at `now`: the finding it makes, if any (in shadow mode
    /// too; the caller decides what to do with it). Reads only.
    pub async fn evaluate(
        &self,
        conn: &mut PgConnection,
        range: IpNet,
        now: OffsetDateTime,
    ) -> Result<Option<Finding>, sqlx::Error> {
        let a = self.assess(conn, range, now).await?;
        let rules = self.geo.adjust_rules(conn, range, &self.rules).await?;
        let Some(verdict) = policy::judge(&rules, &a.tally) else {
            if a.tally.protected && policy::judge(&rules, &Tally { protected: false, ..a.tally }).is_some() {
                metrics::counter!(SPARED, "why" => "protected").increment(1);
            }
            return Ok(None);
        };
        let rule = match verdict.scope {
            policy::Scope::Fleet => Rule::Fleet,
            policy::Scope::Host => Rule::SingleHost,
        };
        let mut evidence = Evidence {
            rule: rule.reason().to_owned(),
            scenario: Some(verdict.scenario),
            verdict: verdict.describe(self.rules.get(verdict.scenario)),
            good_standing: verdict.good_standing,
            escalates: !verdict.good_standing,
            ..Evidence::default()
        };
        evidence.count(&a.per_agent);
        self.samples(conn, range, now, &mut evidence).await?;
        Ok(Some(Finding { target: range, verdict, evidence }))
    }

    /// Adds the range's offending addresses and a few sample lines.
    pub(super) async fn samples(
        &self,
        conn: &mut PgConnection,
        range: IpNet,
        now: OffsetDateTime,
        ev: &mut Evidence,
    ) -> Result<(), sqlx::Error> {
        let window = f64::from(self.rules.longest_window_secs());
        let hosts: Vec<(IpNet, Option<String>)> = sqlx::query_as(
            "select address, sample_raw from offender_hosts \
             where address between fleetban_first($1::cidr) and fleetban_last($1::cidr) \
             and last_seen >= $2 - make_interval(secs => $3) \
             order by last_seen desc limit $4",
        )
        .bind(range)
        .bind(now)
        .bind(window)
        .bind(i64::try_from(MAX_ADDRESSES).unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
        for (address, sample) in hosts {
            ev.addresses.insert(address.addr().to_string());
            if let Some(sample) = sample.filter(|s| !s.is_empty())
                && ev.samples.len() < MAX_SAMPLES
                && !ev.samples.contains(&sample)
            {
                ev.samples.push(sample);
            }
        }
        Ok(())
    }

    /// After a batch from `agent_id` committed: evaluates the abuse addresses
    /// it touched and returns the blocks created (prefix blocks included).
    pub async fn on_batch(&self, _agent_id: Uuid, addresses: &[IpAddr]) -> Result<Vec<Block>, CorrelateError> {
        // Target range → one address of the batch inside it.
        let mut targets: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
        for addr in addresses {
            let target = self.target(*addr);
            if !self.never_blocked(target) {
                targets.entry(target).or_insert(addr.to_canonical());
            }
        }
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<IpNet> = targets.keys().copied().collect();
        let open: Vec<IpNet> = sqlx::query_scalar(
            "select t.target from unnest($1::cidr[]) as t(target) \
             where not exists (select 1 from live_blocks b where b.cidr >>= t.target)",
        )
        .bind(&list)
        .fetch_all(&self.pool)
        .await?;
        let now = OffsetDateTime::now_utc();
        let mut created = Vec::new();
        let touched: BTreeSet<IpNet> = open.iter().copied().collect();
        for target in open {
            let finding = {
                let mut conn = self.pool.acquire().await?;
                self.evaluate(&mut conn, target, now).await?
            };
            let Some(finding) = finding else { continue };
            if finding.verdict.shadow {
                self.record_shadow(
                    finding.target,
                    finding.verdict.scenario.as_str(),
                    BlockSource::Auto,
                    None,
                    &finding.evidence,
                )
                .await?;
                continue;
            }
            let rule = if finding.verdict.scope == policy::Scope::Fleet { Rule::Fleet } else { Rule::SingleHost };
            let addr = targets.get(&target).copied().unwrap_or(target.addr());
            if let Some(block) = self.decide(target, Some(addr), rule, finding.evidence, None).await? {
                let prefix = self.escalate(block.cidr).await?;
                created.push(block);
                created.extend(prefix);
            }
        }
        created.extend(self.campaigns(&touched).await?);
        Ok(created)
    }

    /// Records what a rule in shadow mode would have blocked (once per
    /// range and rule within [`SHADOW_REPEAT`]); true when recorded.
    pub async fn record_shadow(
        &self,
        cidr: IpNet,
        rule: &str,
        source: BlockSource,
        agent_id: Option<Uuid>,
        evidence: &Evidence,
    ) -> Result<bool, sqlx::Error> {
        let inserted = sqlx::query(
            "insert into shadow_decisions (cidr, rule, source, agent_id, evidence) \
             select $1, $2, $3, $4, $5 where not exists (select 1 from shadow_decisions \
               where cidr = $1::cidr and rule = $2 and decided_at > now() - make_interval(secs => $6))",
        )
        .bind(cidr)
        .bind(rule)
        .bind(source.as_str())
        .bind(agent_id)
        .bind(evidence.to_json())
        .bind(secs(SHADOW_REPEAT.as_secs()))
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0;
        if inserted {
            metrics::counter!(SHADOW_DECISIONS, "rule" => rule.to_owned()).increment(1);
            tracing::info!(%cidr, rule, source = source.as_str(), "Shadow decision: would block, blocking nothing.");
        }
        Ok(inserted)
    }

    /// An agent's shadow-mode `LocalBlock`: recorded, nothing blocked.
    pub async fn on_shadow_local_block(
        &self,
        agent_id: Uuid,
        cidr: IpNet,
        reason: &str,
        evidence: &str,
    ) -> Result<bool, CorrelateError> {
        let target = canonical_net(cidr);
        let ev = Evidence {
            rule: REASON_LOCAL.to_owned(),
            agents: BTreeSet::from([agent_id]),
            local: Some(LocalEvidence {
                agent_id,
                reason: truncate(reason, LOCAL_BLOCK_MAX_REASON_BYTES).to_owned(),
                evidence: truncate(evidence, LOCAL_BLOCK_MAX_EVIDENCE_BYTES).to_owned(),
            }),
            ..Evidence::default()
        };
        let rule = truncate(reason, LOCAL_BLOCK_MAX_REASON_BYTES).to_owned();
        Ok(self.record_shadow(target, &rule, BlockSource::Agent, Some(agent_id), &ev).await?)
    }

    /// An agent's `LocalBlock`: makes it a fleet block (unless
    /// `trust_local_blocks` is off, it names a range rather than a host, the
    /// range is already covered, protected, in good standing for a scenario
    /// rule, or policy refuses it). The TTL is the policy's offence TTL; a
    /// longer one the agent asks for is capped. A prefix escalation it
    /// causes is created too (visible in the change log), but only the block
    /// of `cidr` is returned.
    pub async fn on_local_block(
        &self,
        agent_id: Uuid,
        cidr: IpNet,
        reason: &str,
        evidence: &str,
        ttl_secs: u32,
    ) -> Result<Option<Block>, CorrelateError> {
        if !self.config.trust_local_blocks {
            tracing::debug!(%agent_id, %cidr, "Local block not made a fleet block: trust_local_blocks is off.");
            return Ok(None);
        }
        let reported = canonical_net(cidr);
        // An agent vouches for one attacker: an IPv4 host, or an IPv6 host or
        // exactly the prefix the fleet blocks IPv6 attackers as. Ranges are
        // the server's to decide (prefix escalation), never an agent's.
        let host = match reported {
            IpNet::V4(v4) => v4.prefix_len() == 32,
            IpNet::V6(v6) => v6.prefix_len() == 128 || v6.prefix_len() == self.config.ipv6_block_prefix,
        };
        if !host {
            metrics::counter!(LOCAL_BLOCKS_REFUSED, "why" => "range").increment(1);
            tracing::warn!(
                %agent_id, cidr = %reported, ipv6_block_prefix = self.config.ipv6_block_prefix,
                "Local block refused: an agent may report a host, not a range."
            );
            return Ok(None);
        }
        // A reported IPv6 host is judged as its prefix, and may fall back to
        // itself when policy refuses the prefix; a reported prefix has no
        // address of its own to fall back to.
        let (target, fallback) = match reported {
            IpNet::V6(v6) if v6.prefix_len() == 128 => (self.target(v6.addr().into()), Some(v6.addr().into())),
            IpNet::V6(_) => (reported, None),
            IpNet::V4(v4) => (reported, Some(v4.addr().into())),
        };
        if self.config.is_shadow(REASON_LOCAL) || self.config.is_shadow(reason) {
            self.on_shadow_local_block(agent_id, target, reason, evidence).await?;
            return Ok(None);
        }
        let assessment = {
            let mut conn = self.pool.acquire().await?;
            self.assess(&mut conn, target, OffsetDateTime::now_utc()).await?
        };
        if let Err(spared) = judge_local(&assessment.tally, reason) {
            metrics::counter!(SPARED, "why" => spared.as_str()).increment(1);
            tracing::info!(%agent_id, %cidr, reason, why = spared.as_str(), "Local block not made a fleet block.");
            return Ok(None);
        }
        let local = LocalEvidence {
            agent_id,
            reason: truncate(reason, LOCAL_BLOCK_MAX_REASON_BYTES).to_owned(),
            evidence: truncate(evidence, LOCAL_BLOCK_MAX_EVIDENCE_BYTES).to_owned(),
        };
        let mut ev = Evidence {
            rule: REASON_LOCAL.to_owned(),
            good_standing: assessment.tally.good_standing,
            escalates: !assessment.tally.good_standing,
            ..Evidence::default()
        };
        ev.count(&assessment.per_agent);
        {
            let mut conn = self.pool.acquire().await?;
            self.samples(&mut conn, target, OffsetDateTime::now_utc(), &mut ev).await?;
        }
        let requested_ttl = Duration::from_secs(u64::from(ttl_secs));
        let block = self.decide(target, fallback, Rule::Local, ev, Some((local, requested_ttl))).await?;
        if let Some(block) = &block {
            self.escalate(block.cidr).await?;
        }
        Ok(block)
    }

    /// Blocks `target` for `rule` with `evidence` unless it is covered
    /// already or policy refuses it; `fallback` is the reported attacker's
    /// address inside it (the /128 fallback of a refused IPv6 /64), `None`
    /// when nobody reported a single address. `local` carries an agent's
    /// evidence and the TTL it asked for, which never lengthens the policy's
    /// TTL.
    pub(super) async fn decide(
        &self,
        target: IpNet,
        fallback: Option<IpAddr>,
        rule: Rule,
        mut evidence: Evidence,
        local: Option<(LocalEvidence, Duration)>,
    ) -> Result<Option<Block>, CorrelateError> {
        let mut tx = self.pool.begin().await?;
        lock_range(&mut tx, target).await?;
        let mut range = target;
        let (covered, earlier) = standing(&mut tx, range, true, self.config.offence_window_secs).await?;
        if covered {
            return Ok(None);
        }
        let force = false;
        match refusable(blocks::check_policy(&mut tx, self.config.as_ref(), range, force).await)? {
            Ok(()) => {}
            Err(refusal) => {
                let fallback = fallback.map(IpNet::from).filter(|f| *f != range && matches!(f, IpNet::V6(_)));
                let retry = match fallback {
                    Some(fallback)
                        if matches!(
                            refusal,
                            Refusal::FleetOwn { .. } | Refusal::Allowlisted { .. } | Refusal::NeverBlock { .. }
                        ) =>
                    {
                        refusable(blocks::check_policy(&mut tx, self.config.as_ref(), fallback, force).await)?.is_ok()
                    }
                    _ => false,
                };
                let Some(fallback) = fallback.filter(|_| retry) else {
                    tracing::info!(cidr = %range, rule = rule.reason(), %refusal, "Not blocking: policy refuses it.");
                    return Ok(None);
                };
                tracing::info!(cidr = %range, fallback = %fallback, %refusal, "Blocking the address alone: policy refuses its range.");
                range = fallback;
            }
        }
        evidence.offence = u32::try_from(earlier + 1).unwrap_or(u32::MAX);
        let ttl = self.ttl(earlier);
        let source = match local {
            Some((local, requested_ttl)) => {
                evidence.agents.insert(local.agent_id);
                if requested_ttl > ttl {
                    metrics::counter!(LOCAL_BLOCKS_TTL_CAPPED).increment(1);
                    tracing::info!(
                        agent_id = %local.agent_id, cidr = %range, requested_ttl_secs = requested_ttl.as_secs(),
                        ttl_secs = ttl.as_secs(), "Local block's TTL capped at the policy's."
                    );
                }
                evidence.local = Some(local);
                BlockSource::Agent
            }
            None => BlockSource::Auto,
        };
        let new = NewBlock {
            cidr: range,
            reason: rule.reason().to_owned(),
            source,
            evidence: evidence.to_json(),
            ttl: Some(ttl),
            created_by: None,
            force,
        };
        let block = match refusable(blocks::create_in(&mut tx, self.config.as_ref(), new).await)? {
            Ok(block) => block,
            Err(refusal) => {
                tracing::info!(cidr = %range, %refusal, "Not blocking: policy refuses it.");
                return Ok(None);
            }
        };
        sqlx::query("update offenders set last_blocked_at = now() where address between fleetban_first($1::cidr) and fleetban_last($1::cidr)")
            .bind(range)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(
            cidr = %block.cidr,
            block_id = block.id,
            rule = rule.reason(),
            scenario = evidence.scenario.map(Scenario::as_str),
            offence = evidence.offence,
            ttl_secs = ttl.as_secs(),
            "Fleet block created."
        );
        Ok(Some(block))
    }
}
