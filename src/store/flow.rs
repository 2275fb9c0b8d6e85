//! The flow-aware claim, one protocol for both stores: what it asks a store for
//! ([`ClaimFacts`]) and the rounds it runs ([`flow_claim`]). The decisions are
//! [`crate::flow::ClaimPlan`]'s; a store only answers questions inside its claim's
//! transaction, and makes its answers hold against other servers (PostgreSQL: an advisory
//! lock per key, tried without waiting, held until the claim commits).
//!
//! A store runs this only when its plain claim finds flow-controlled jobs queued in the lane
//! (one cheap probe of a small partial index), so lanes without them claim as before.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;

use super::{Claimed, Lease, StoreError};
use crate::clock::Micros;
use crate::flow::{
    Bucket, Candidate, ClaimPlan, Concurrency, Group, KeyKind, Page, Rate, Round, Sharing,
    MAX_ROUNDS, MAX_TENANTS,
};
use crate::job::{ExecutorKind, Job, JobId};

/// What the flow-aware claim asks a store, inside one transaction.
#[async_trait]
pub(crate) trait ClaimFacts: Send {
    /// Tenants with flow-controlled jobs queued in the lane, in order, after `after` (from the
    /// first when `None`), at most `limit`.
    async fn tenants(
        &mut self,
        lane: ExecutorKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// The first `size` due candidates of each group of `round`, in claim order, leaving out
    /// the jobs and keys of `skip`. Each row says whether it came from the plain page.
    async fn candidates(
        &mut self,
        lane: ExecutorKind,
        now: Micros,
        round: &Round,
        size: usize,
        skip: &Skip,
    ) -> Result<Vec<(bool, Candidate)>, StoreError>;
    /// Looks up `keys` (sorted, each once) for the plan: running jobs per concurrency key,
    /// stored buckets per rate key, and which keys another server is deciding on.
    async fn look_up(
        &mut self,
        keys: &[(KeyKind, String)],
        plan: &mut ClaimPlan,
    ) -> Result<(), StoreError>;
    /// Moves the picked jobs that are still queued to `running`; answers them.
    async fn start(
        &mut self,
        ids: &[JobId],
        now: Micros,
        lease: &Lease,
    ) -> Result<Vec<Job>, StoreError>;
    async fn write_buckets(&mut self, buckets: &[(String, Bucket)]) -> Result<(), StoreError>;
    /// When the lane's first queued job scheduled after `now` is due.
    async fn next_scheduled(
        &mut self,
        lane: ExecutorKind,
        now: Micros,
    ) -> Result<Option<Micros>, StoreError>;
}

/// What a later round leaves out: the jobs already picked, and the keys that held jobs back.
#[derive(Debug, Default)]
pub(crate) struct Skip {
    pub ids: Vec<JobId>,
    pub concurrency: Vec<String>,
    pub rate: Vec<String>,
}

/// Claims up to `limit` jobs of a lane where flow-controlled jobs are queued: rounds of
/// candidate pages (tenants in turn, keys looked up as they appear) until the claim is full or
/// nothing more can start; then the picks move to `running` and the buckets are written.
pub(crate) async fn flow_claim(
    facts: &mut dyn ClaimFacts,
    sharing: &Sharing,
    lane: ExecutorKind,
    limit: u32,
    now: Micros,
    lease: &Lease,
) -> Result<Claimed, StoreError> {
    let mut rotation = sharing.take(lane);
    let result = async {
        let cursor = rotation.cursor.clone();
        let mut tenants = facts.tenants(lane, cursor.as_deref(), MAX_TENANTS).await?;
        if let Some(c) = &cursor {
            if tenants.len() < MAX_TENANTS {
                // Wrap around: the tenants up to the cursor, from the first.
                let rest = facts
                    .tenants(lane, None, MAX_TENANTS - tenants.len())
                    .await?;
                tenants.extend(rest.into_iter().filter(|t| t <= c));
            }
        }
        rotation.cursor = (tenants.len() >= MAX_TENANTS)
            .then(|| tenants.last().cloned())
            .flatten();

        let mut plan = ClaimPlan::new(limit as usize, now);
        let mut round = Some(Round {
            plain: true,
            tenants,
        });
        let mut rounds = 0;
        while let Some(r) = round.take() {
            if rounds == MAX_ROUNDS {
                plan.out_of_rounds();
                break;
            }
            rounds += 1;
            let size = plan.page_size(r.groups());
            let skip = Skip {
                ids: plan.picked().to_vec(),
                concurrency: plan.excluded(KeyKind::Concurrency),
                rate: plan.excluded(KeyKind::Rate),
            };
            let rows = facts.candidates(lane, now, &r, size, &skip).await?;
            if rows.is_empty() {
                break;
            }
            let pages = pages(rows, size);
            let keys = plan.unknown_keys(&pages);
            if !keys.is_empty() {
                facts.look_up(&keys, &mut plan).await?;
            }
            // Stamped after the keys were looked up: a job started now starts after every
            // finish the lookup saw (so its `started_at` is never before the finish of the job
            // whose slot it took, across servers on one clock).
            plan.restamp(Micros::now());
            plan.choose(pages, &mut rotation, sharing);
            round = plan.next_round();
        }
        plan.finish(&mut rotation);

        let started = if plan.picked().is_empty() {
            Vec::new()
        } else {
            facts.start(plan.picked(), plan.now(), lease).await?
        };
        let claimed: HashSet<JobId> = started.iter().map(|j| j.id).collect();
        let buckets = plan.buckets_after(&claimed);
        if !buckets.is_empty() {
            facts.write_buckets(&buckets).await?;
        }
        // In the order the plan picked them (priority, then the tenants' turns).
        let mut by_id: std::collections::HashMap<JobId, Job> =
            started.into_iter().map(|j| (j.id, j)).collect();
        let jobs: Vec<Job> = plan
            .picked()
            .iter()
            .filter_map(|id| by_id.remove(id))
            .collect();
        let next_due = if jobs.len() < limit as usize {
            let scheduled = facts.next_scheduled(lane, plan.now()).await?;
            match (scheduled, plan.next_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        } else {
            None
        };
        Ok(Claimed { jobs, next_due })
    }
    .await;
    sharing.put(lane, rotation);
    result
}

/// Rows grouped into pages (the plain page, and one per tenant), each marked full when it
/// holds `size` rows.
fn pages(rows: Vec<(bool, Candidate)>, size: usize) -> Vec<Page> {
    let mut groups: BTreeMap<Option<String>, Vec<Candidate>> = BTreeMap::new();
    for (plain, c) in rows {
        let key = (!plain).then(|| c.tenant.clone());
        groups.entry(key).or_default().push(c);
    }
    groups
        .into_iter()
        .map(|(key, rows)| Page {
            group: key.map_or(Group::Plain, Group::Tenant),
            full: rows.len() >= size,
            rows,
        })
        .collect()
}

/// A job's flow control from its stored columns (both stores keep the same ones).
pub(crate) fn from_columns(
    tenant: String,
    concurrency: (Option<String>, Option<i64>),
    rate: (Option<String>, Option<f64>, Option<i64>),
) -> (Option<String>, Option<Concurrency>, Option<Rate>) {
    let tenant = (!tenant.is_empty()).then_some(tenant);
    let concurrency = match concurrency {
        (Some(key), Some(limit)) => Some(Concurrency {
            key,
            limit: limit.clamp(0, u32::MAX as i64) as u32,
        }),
        _ => None,
    };
    let rate = match rate {
        (Some(key), Some(per_second), Some(burst)) => Some(Rate {
            key,
            per_second,
            burst: burst.clamp(0, u32::MAX as i64) as u32,
        }),
        _ => None,
    };
    (tenant, concurrency, rate)
}

/// Running and queued jobs per concurrency key, rate key and tenant, in one pass over the
/// queued flow-controlled jobs (their own index) and the running ones: rows of
/// (kind code, name, running, queued), read by [`crate::flow::FlowStats::from_counts`].
/// `flow_true` is how the store spells the flag's truth; `queued_from` names the table with
/// the store's index hint, if it needs one.
pub(crate) fn counts_sql(flow_true: &str, queued_from: &str) -> String {
    let group = |code: &str, column: &str, named: &str| {
        format!(
            "SELECT '{code}', {column}, SUM(r), COUNT(*) - SUM(r) FROM f \
             WHERE {named} GROUP BY {column}"
        )
    };
    format!(
        "WITH f AS MATERIALIZED (SELECT tenant, concurrency_key, rate_key, 0 AS r \
         FROM {queued_from} WHERE status = 'queued' AND flow = {flow_true} \
         UNION ALL SELECT tenant, concurrency_key, rate_key, 1 FROM jobs \
         WHERE status = 'running' AND flow = {flow_true}) \
         {} UNION ALL {} UNION ALL {}",
        group("c", "concurrency_key", "concurrency_key IS NOT NULL"),
        group("r", "rate_key", "rate_key IS NOT NULL"),
        group("t", "tenant", "tenant <> ''"),
    )
}

/// A store's count rows as [`FlowStats`].
pub(crate) fn stats_from_rows(
    rows: Vec<(String, String, i64, i64)>,
    top: usize,
) -> Result<crate::flow::FlowStats, StoreError> {
    use crate::flow::{Counted, FlowCount, FlowStats};
    let counts = rows
        .into_iter()
        .map(|(code, name, running, queued)| {
            let kind = Counted::from_code(&code)
                .ok_or_else(|| StoreError::Corrupt(format!("flow count of kind `{code}`")))?;
            Ok((
                kind,
                FlowCount {
                    name,
                    running: running.max(0) as u64,
                    queued: queued.max(0) as u64,
                },
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(FlowStats::from_counts(counts, top))
}
