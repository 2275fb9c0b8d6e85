//! The flow-aware claim's questions on PostgreSQL ([`ClaimFacts`]), answered inside the
//! claim's transaction.
//!
//! What makes the answers hold across servers: before a claim counts a concurrency key's
//! running jobs or reads a rate key's bucket, it takes that key's advisory lock
//! (`pg_try_advisory_xact_lock`, held until the claim commits). A server that wants a key
//! another is deciding on does not wait: it leaves the key's jobs for its next look, as
//! `SKIP LOCKED` leaves rows, so claims never queue behind one another and cannot deadlock.
//! The count is a statement of its own after the lock, so it sees every claim of that key
//! that committed before (READ COMMITTED takes a snapshot per statement); finishes only lower
//! the count, so one missed is a conservative mistake that the finish's notice corrects.

use async_trait::async_trait;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::sql::{job_from_row, micros, qualified, DB_NOW};
use crate::clock::Micros;
use crate::flow::{Bucket, Candidate, ClaimPlan, FlowState, KeyKind, Round};
use crate::job::{ExecutorKind, Job, JobId};
use crate::store::flow::{from_columns, ClaimFacts, Skip};
use crate::store::{Lease, StoreError};

/// A claim candidate's columns.
const CANDIDATE: &str = "id, tenant, priority, scheduled_at, concurrency_key, concurrency_limit, \
    rate_key, rate_per_second, rate_burst, flow";

pub(super) struct Facts<'c> {
    pub conn: &'c mut PgConnection,
}

/// A key's name in the advisory lock space: the schema (tests share a database), the kind
/// and the key.
fn lock_name(kind: KeyKind, key: &str) -> String {
    match kind {
        KeyKind::Concurrency => format!("c:{key}"),
        KeyKind::Rate => format!("r:{key}"),
    }
}

#[async_trait]
impl ClaimFacts for Facts<'_> {
    async fn tenants(
        &mut self,
        lane: ExecutorKind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        // A skip scan of the flow index: one probe per tenant, however many jobs each has.
        let first = if after.is_some() { ">" } else { ">=" };
        let sql = format!(
            "WITH RECURSIVE t(tenant) AS ( \
             SELECT (SELECT tenant FROM jobs WHERE status = 'queued' AND flow \
             AND executor = $1 AND tenant {first} $2 ORDER BY tenant LIMIT 1) \
             UNION ALL \
             SELECT (SELECT j.tenant FROM jobs j WHERE j.status = 'queued' AND j.flow \
             AND j.executor = $1 AND j.tenant > t.tenant ORDER BY j.tenant LIMIT 1) \
             FROM t WHERE t.tenant IS NOT NULL) \
             SELECT tenant FROM t WHERE tenant IS NOT NULL LIMIT $3"
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(lane.as_str())
            .bind(after.unwrap_or(""))
            .bind(limit as i64)
            .fetch_all(&mut *self.conn)
            .await?)
    }

    async fn candidates(
        &mut self,
        lane: ExecutorKind,
        now: Micros,
        round: &Round,
        size: usize,
        skip: &Skip,
    ) -> Result<Vec<(bool, Candidate)>, StoreError> {
        // The plain page off `jobs_ready`, each tenant's page off `jobs_flow_ready` (a
        // LATERAL per tenant), in one statement.
        let sql = format!(
            "(SELECT {CANDIDATE} FROM jobs WHERE $7 AND status = 'queued' AND NOT flow \
             AND executor = $1 AND scheduled_at <= $2 AND attempt < max_attempts \
             AND id <> ALL($3) ORDER BY priority DESC, scheduled_at, id LIMIT $6) \
             UNION ALL \
             (SELECT c.* FROM UNNEST($8::text[]) AS t(tenant) CROSS JOIN LATERAL \
             (SELECT {CANDIDATE} FROM jobs WHERE status = 'queued' AND flow \
             AND executor = $1 AND jobs.tenant = t.tenant AND scheduled_at <= $2 \
             AND attempt < max_attempts AND id <> ALL($3) \
             AND (concurrency_key IS NULL OR concurrency_key <> ALL($4)) \
             AND (rate_key IS NULL OR rate_key <> ALL($5)) \
             ORDER BY priority DESC, scheduled_at, id LIMIT $6) AS c)"
        );
        let rows = sqlx::query(&sql)
            .bind(lane.as_str())
            .bind(now.0)
            .bind(skip.ids.iter().map(|id| id.0).collect::<Vec<Uuid>>())
            .bind(&skip.concurrency)
            .bind(&skip.rate)
            .bind(size as i64)
            .bind(round.plain)
            .bind(&round.tenants)
            .fetch_all(&mut *self.conn)
            .await?;
        rows.iter()
            .map(|row| {
                let (tenant, concurrency, rate) = from_columns(
                    row.try_get("tenant")?,
                    (
                        row.try_get("concurrency_key")?,
                        row.try_get::<Option<i32>, _>("concurrency_limit")?
                            .map(i64::from),
                    ),
                    (
                        row.try_get("rate_key")?,
                        row.try_get("rate_per_second")?,
                        row.try_get::<Option<i32>, _>("rate_burst")?.map(i64::from),
                    ),
                );
                Ok((
                    !row.try_get::<bool, _>("flow")?,
                    Candidate {
                        id: JobId(row.try_get("id")?),
                        tenant: tenant.unwrap_or_default(),
                        priority: row.try_get("priority")?,
                        scheduled_at: Micros(row.try_get("scheduled_at")?),
                        concurrency,
                        rate,
                    },
                ))
            })
            .collect()
    }

    async fn look_up(
        &mut self,
        keys: &[(KeyKind, String)],
        plan: &mut ClaimPlan,
    ) -> Result<(), StoreError> {
        let names: Vec<String> = keys.iter().map(|(k, key)| lock_name(*k, key)).collect();
        // Tried, never waited for: see the module's comment.
        let locked: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock(hashtextextended( \
             'offload-flow:' || current_schema() || ':' || k, 0)) \
             FROM UNNEST($1::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
        )
        .bind(&names)
        .fetch_all(&mut *self.conn)
        .await?;
        let mut held = Vec::with_capacity(keys.len());
        for ((kind, key), got) in keys.iter().zip(locked) {
            if got {
                held.push((*kind, key.clone()));
            } else {
                plan.set_busy(*kind, key.clone());
            }
        }
        // Statements of their own, after the locks: see the module's comment.
        let state = read_flow_state(&mut *self.conn, &held).await?;
        plan.learn(&held, &state);
        Ok(())
    }

    async fn start(
        &mut self,
        ids: &[JobId],
        now: Micros,
        lease: &Lease,
    ) -> Result<Vec<Job>, StoreError> {
        // The candidates were read without row locks: one another server took meanwhile is
        // no longer queued (or is locked by its claim, and skipped). By id only: see
        // `queue.rs`.
        let sql = format!(
            "WITH picked AS (SELECT id FROM jobs WHERE id = ANY($4) AND status || '' = 'queued' \
             ORDER BY id FOR UPDATE SKIP LOCKED) \
             UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = $1, \
             progress = 0, owner = $2, lease_until = {DB_NOW} + $3 FROM picked \
             WHERE jobs.id = picked.id RETURNING {}",
            qualified()
        );
        let rows = sqlx::query(&sql)
            .bind(now.0)
            .bind(&lease.owner)
            .bind(micros(lease.ttl))
            .bind(ids.iter().map(|id| id.0).collect::<Vec<Uuid>>())
            .fetch_all(&mut *self.conn)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn write_buckets(&mut self, buckets: &[(String, Bucket)]) -> Result<(), StoreError> {
        // Under the keys' advisory locks: no other server writes these rows meanwhile.
        sqlx::query(
            "INSERT INTO rate_buckets (key, tokens, updated_at) \
             SELECT * FROM UNNEST($1::text[], $2::float8[], $3::bigint[]) \
             ON CONFLICT (key) DO UPDATE SET tokens = EXCLUDED.tokens, \
             updated_at = EXCLUDED.updated_at",
        )
        .bind(buckets.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        .bind(buckets.iter().map(|(_, b)| b.tokens).collect::<Vec<_>>())
        .bind(buckets.iter().map(|(_, b)| b.at.0).collect::<Vec<_>>())
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    async fn next_scheduled(
        &mut self,
        lane: ExecutorKind,
        now: Micros,
    ) -> Result<Option<Micros>, StoreError> {
        // Each the first entry past `now` of a range of `jobs_due` (executor, flow,
        // scheduled_at). Written as ORDER BY … LIMIT 1, not MIN(): with stale statistics the
        // planner would aggregate over every future job instead.
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT LEAST((SELECT scheduled_at FROM jobs WHERE status = 'queued' \
             AND executor = $1 AND NOT flow AND scheduled_at > $2 ORDER BY scheduled_at LIMIT 1), \
             (SELECT scheduled_at FROM jobs WHERE status = 'queued' AND executor = $1 \
             AND flow AND scheduled_at > $2 ORDER BY scheduled_at LIMIT 1))",
        )
        .bind(lane.as_str())
        .bind(now.0)
        .fetch_one(&mut *self.conn)
        .await?;
        Ok(at.map(Micros))
    }
}

/// Running jobs per concurrency key and stored buckets per rate key, for `keys`.
pub(super) async fn read_flow_state(
    conn: &mut PgConnection,
    keys: &[(KeyKind, String)],
) -> Result<FlowState, StoreError> {
    let of = |kind: KeyKind| -> Vec<String> {
        keys.iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone())
            .collect()
    };
    let mut state = FlowState::default();
    let conc = of(KeyKind::Concurrency);
    if !conc.is_empty() {
        let running: Vec<(String, i64)> = sqlx::query_as(
            "SELECT concurrency_key, COUNT(*) FROM jobs WHERE status = 'running' \
             AND concurrency_key = ANY($1) GROUP BY concurrency_key",
        )
        .bind(conc)
        .fetch_all(&mut *conn)
        .await?;
        state.running = running
            .into_iter()
            .map(|(k, n)| (k, n.clamp(0, u32::MAX as i64) as u32))
            .collect();
    }
    let rate = of(KeyKind::Rate);
    if !rate.is_empty() {
        // The buckets with the database's clock, read after the keys' locks were taken (so
        // later than every write of these buckets that committed before): every server
        // refills them by this one clock. `clock_timestamp()`, not `now()`, which is the
        // transaction's start.
        let rows = sqlx::query(
            "SELECT (extract(epoch from clock_timestamp()) * 1000000)::bigint AS clock, \
             b.key, b.tokens, b.updated_at FROM (SELECT 1) AS one \
             LEFT JOIN rate_buckets b ON b.key = ANY($1)",
        )
        .bind(rate)
        .fetch_all(&mut *conn)
        .await?;
        let local = Micros::now();
        for row in rows {
            let clock: i64 = row.try_get("clock")?;
            state.skew_us = Some(clock.saturating_sub(local.0));
            if let Some(key) = row.try_get::<Option<String>, _>("key")? {
                state.buckets.insert(
                    key,
                    Bucket {
                        tokens: row.try_get("tokens")?,
                        at: Micros(row.try_get("updated_at")?),
                    },
                );
            }
        }
    }
    Ok(state)
}
