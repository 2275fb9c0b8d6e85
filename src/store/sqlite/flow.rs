//! The flow-aware claim on SQLite: the questions of [`ClaimFacts`], answered on the writer's
//! connection. The writer is the only writer, so nothing changes between a question and the
//! claim's writes: no locks are needed, and the claim runs in a savepoint so that its writes
//! are one whether it rides in a batch's transaction or alone.

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use sqlx::sqlite::SqliteConnection;
use sqlx::Row;

use super::sql::{corrupt, job_from_row, COLUMNS};
use crate::clock::Micros;
use crate::flow::{Bucket, Candidate, ClaimPlan, FlowState, KeyKind, Round, Sharing};
use crate::job::{ExecutorKind, Job, JobId};
use crate::store::flow::{flow_claim, from_columns, ClaimFacts, Skip};
use crate::store::{Claimed, Lease, StoreError};

type Conn<'a> = &'a mut SqliteConnection;

/// The flow-aware claim in a savepoint: its writes (the jobs, the buckets) are one, whether
/// the writer runs it inside a batch's transaction or alone.
pub(super) fn claim<'a>(
    conn: Conn<'a>,
    lane: ExecutorKind,
    limit: u32,
    now: Micros,
    lease: &'a Lease,
    sharing: &'a Sharing,
) -> BoxFuture<'a, Result<Claimed, StoreError>> {
    Box::pin(async move {
        sqlx::query("SAVEPOINT flow_claim")
            .execute(&mut *conn)
            .await?;
        let mut facts = Facts { conn: &mut *conn };
        let result = flow_claim(&mut facts, sharing, lane, limit, now, lease).await;
        if result.is_err() {
            let _ = sqlx::query("ROLLBACK TO flow_claim")
                .execute(&mut *conn)
                .await;
        }
        sqlx::query("RELEASE flow_claim")
            .execute(&mut *conn)
            .await?;
        result
    })
}

/// A claim candidate's columns.
const CANDIDATE: &str = "id, tenant, priority, scheduled_at, concurrency_key, concurrency_limit, \
    rate_key, rate_per_second, rate_burst, flow";

/// The flow-aware claim's questions, answered on the writer's connection (the only writer:
/// nothing changes between a question and the claim's writes).
struct Facts<'c> {
    conn: &'c mut SqliteConnection,
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
             SELECT (SELECT tenant FROM jobs INDEXED BY jobs_flow_ready WHERE status = 'queued' \
             AND flow = 1 AND executor = ?1 AND tenant {first} ?2 ORDER BY tenant LIMIT 1) \
             UNION ALL \
             SELECT (SELECT j.tenant FROM jobs j INDEXED BY jobs_flow_ready \
             WHERE j.status = 'queued' AND j.flow = 1 AND j.executor = ?1 AND j.tenant > t.tenant \
             ORDER BY j.tenant LIMIT 1) FROM t WHERE t.tenant IS NOT NULL) \
             SELECT tenant FROM t WHERE tenant IS NOT NULL LIMIT ?3"
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
        let mut parts = Vec::new();
        if round.plain {
            parts.push(format!(
                "SELECT * FROM (SELECT {CANDIDATE} FROM jobs INDEXED BY jobs_ready \
                 WHERE status = 'queued' AND flow = 0 AND executor = ?1 AND scheduled_at <= ?2 \
                 AND attempt < max_attempts AND id NOT IN (SELECT value FROM json_each(?3)) \
                 ORDER BY priority DESC, scheduled_at, id LIMIT ?6)"
            ));
        }
        for n in 0..round.tenants.len() {
            parts.push(format!(
                "SELECT * FROM (SELECT {CANDIDATE} FROM jobs INDEXED BY jobs_flow_ready \
                 WHERE status = 'queued' AND flow = 1 AND executor = ?1 AND tenant = ?{} \
                 AND scheduled_at <= ?2 AND attempt < max_attempts \
                 AND id NOT IN (SELECT value FROM json_each(?3)) \
                 AND (concurrency_key IS NULL \
                 OR concurrency_key NOT IN (SELECT value FROM json_each(?4))) \
                 AND (rate_key IS NULL OR rate_key NOT IN (SELECT value FROM json_each(?5))) \
                 ORDER BY priority DESC, scheduled_at, id LIMIT ?6)",
                n + 7
            ));
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = skip.ids.iter().map(|id| id.to_string()).collect();
        let json = |v: &[String]| serde_json::to_string(v).expect("strings serialize");
        let sql = parts.join(" UNION ALL ");
        let mut q = sqlx::query(&sql)
            .bind(lane.as_str())
            .bind(now.0)
            .bind(json(&ids))
            .bind(json(&skip.concurrency))
            .bind(json(&skip.rate))
            .bind(size as i64);
        for t in &round.tenants {
            q = q.bind(t.as_str());
        }
        let rows = q.fetch_all(&mut *self.conn).await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let (tenant, concurrency, rate) = from_columns(
                    row.try_get("tenant")?,
                    (
                        row.try_get("concurrency_key")?,
                        row.try_get("concurrency_limit")?,
                    ),
                    (
                        row.try_get("rate_key")?,
                        row.try_get("rate_per_second")?,
                        row.try_get("rate_burst")?,
                    ),
                );
                Ok((
                    row.try_get::<i64, _>("flow")? == 0,
                    Candidate {
                        id: id.parse().map_err(|e| corrupt("id", e))?,
                        tenant: tenant.unwrap_or_default(),
                        priority: row.try_get::<i64, _>("priority")? as i32,
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
        let state = read_flow_state(&mut *self.conn, keys).await?;
        plan.learn(keys, &state);
        Ok(())
    }

    async fn start(
        &mut self,
        ids: &[JobId],
        now: Micros,
        lease: &Lease,
    ) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let sql = format!(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = ?1, \
             progress = 0, owner = ?2, lease_until = ?3 \
             WHERE id IN (SELECT value FROM json_each(?4)) AND status = 'queued' \
             RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now.0)
            .bind(&lease.owner)
            .bind(now.plus(lease.ttl).0)
            .bind(serde_json::to_string(&ids).expect("strings serialize"))
            .fetch_all(&mut *self.conn)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn write_buckets(&mut self, buckets: &[(String, Bucket)]) -> Result<(), StoreError> {
        for (key, b) in buckets {
            sqlx::query(
                "INSERT INTO rate_buckets (key, tokens, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET tokens = ?2, updated_at = ?3",
            )
            .bind(key)
            .bind(b.tokens)
            .bind(b.at.0)
            .execute(&mut *self.conn)
            .await?;
        }
        Ok(())
    }

    async fn next_scheduled(
        &mut self,
        lane: ExecutorKind,
        now: Micros,
    ) -> Result<Option<Micros>, StoreError> {
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(scheduled_at) FROM jobs WHERE status = 'queued' AND executor = ?1 \
             AND scheduled_at > ?2",
        )
        .bind(lane.as_str())
        .bind(now.0)
        .fetch_one(&mut *self.conn)
        .await?;
        Ok(at.map(Micros))
    }
}

/// Running jobs per concurrency key and stored buckets per rate key, for `keys`.
pub(super) fn read_flow_state<'a>(
    conn: Conn<'a>,
    keys: &'a [(KeyKind, String)],
) -> BoxFuture<'a, Result<FlowState, StoreError>> {
    Box::pin(async move {
        let of = |kind: KeyKind| -> String {
            let list: Vec<&str> = keys
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, key)| key.as_str())
                .collect();
            serde_json::to_string(&list).expect("strings serialize")
        };
        let mut state = FlowState::default();
        let running: Vec<(String, i64)> = sqlx::query_as(
            "SELECT concurrency_key, COUNT(*) FROM jobs INDEXED BY jobs_running_key \
             WHERE status = 'running' AND concurrency_key IS NOT NULL \
             AND concurrency_key IN (SELECT value FROM json_each(?)) GROUP BY concurrency_key",
        )
        .bind(of(KeyKind::Concurrency))
        .fetch_all(&mut *conn)
        .await?;
        state.running = running
            .into_iter()
            .map(|(k, n)| (k, n.clamp(0, u32::MAX as i64) as u32))
            .collect();
        let buckets: Vec<(String, f64, i64)> = sqlx::query_as(
            "SELECT key, tokens, updated_at FROM rate_buckets \
             WHERE key IN (SELECT value FROM json_each(?))",
        )
        .bind(of(KeyKind::Rate))
        .fetch_all(&mut *conn)
        .await?;
        state.buckets = buckets
            .into_iter()
            .map(|(k, tokens, at)| {
                (
                    k,
                    Bucket {
                        tokens,
                        at: Micros(at),
                    },
                )
            })
            .collect();
        Ok(state)
    })
}
