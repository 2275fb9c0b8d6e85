//! The PostgreSQL store: the same `JobStore` contract as SQLite, passing the same conformance
//! suite (`tests/api/store.rs`), and shared by several servers: jobs are claimed with
//! `FOR UPDATE SKIP LOCKED`, running jobs hold leases, and a trigger announces changes on the
//! schema's channel (`migrations/postgres/0003_cluster.sql`).
//!
//! PostgreSQL takes concurrent writers, so there is no single writer task here: each write is
//! one statement (or one transaction) on a pooled connection, and PostgreSQL's own group
//! commit batches the fsyncs. Every move is guarded in SQL by the status it moves from and,
//! for a running job, its attempt, exactly as in SQLite.

use std::collections::HashMap;
use std::str::FromStr;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    BlobDeleteOutcome, CancelOutcome, Claimed, DeleteOutcome, Inserted, JobStore, Lease,
    ListFilter, Notice, Settle, StoreError,
};
use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::job::{ErrorInfo, ErrorKind, ExecutorKind, Job, JobId, NewJob, Timings};

const COLUMNS: &str =
    "id, task, kind, executor, status, args::text AS args, result::text AS result, \
    error::text AS error, priority, attempt, max_attempts, timeout_ms, progress, idempotency_key, \
    spec_hash, created_at, scheduled_at, started_at, finished_at";

/// The columns, each qualified with the `jobs` table, for statements that join another.
fn qualified() -> String {
    COLUMNS
        .split(", ")
        .map(|c| format!("jobs.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The migrations, compiled into the binary.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "jobs",
        include_str!("../../migrations/postgres/0001_jobs.sql"),
    ),
    (
        2,
        "blob_retention",
        include_str!("../../migrations/postgres/0002_blob_retention.sql"),
    ),
    (
        3,
        "cluster",
        include_str!("../../migrations/postgres/0003_cluster.sql"),
    ),
    (
        4,
        "blob_origin",
        include_str!("../../migrations/postgres/0004_blob_origin.sql"),
    ),
    (
        5,
        "store_is_queue",
        include_str!("../../migrations/postgres/0005_store_is_queue.sql"),
    ),
];

pub struct PostgresStore {
    pool: PgPool,
    /// The schema's notification channel (`offload_<schema>`).
    channel: String,
}

impl PostgresStore {
    /// Connects to `url` and applies the migrations. With `schema`, everything lives in that
    /// schema (created if needed): how tests share one database.
    pub async fn open(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(url)?;
        if let Some(s) = schema {
            if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(StoreError::Corrupt(format!("bad schema name `{s}`")));
            }
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
                .execute(&admin)
                .await?;
            admin.close().await;
            options = options.options([("search_path", s)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(options)
            .await?;
        let migrator = Migrator::new(super::Embedded(MIGRATIONS)).await?;
        migrator.run(&pool).await?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        Ok(PostgresStore {
            pool,
            channel: format!("offload_{schema}"),
        })
    }
}

/// Whether this transaction holds the schema's maintenance lock: maintenance (requeueing
/// expired leases, pruning) is one server's at a time, and the others skip their turn. The
/// lock is released when the transaction ends.
async fn maintenance_leader(tx: &mut Transaction<'_, Postgres>) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtext('offload-maintenance:' || current_schema()))",
    )
    .fetch_one(&mut **tx)
    .await?)
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn job_from_row(row: &PgRow) -> Result<Job, StoreError> {
    let text = |col: &str| -> Result<String, StoreError> { Ok(row.try_get::<String, _>(col)?) };
    let opt_json = |col: &str| -> Result<Option<Value>, StoreError> {
        row.try_get::<Option<String>, _>(col)?
            .map(|s| serde_json::from_str(&s).map_err(|e| corrupt(col, e)))
            .transpose()
    };
    let error = row
        .try_get::<Option<String>, _>("error")?
        .map(|s| serde_json::from_str::<ErrorInfo>(&s).map_err(|e| corrupt("error", e)))
        .transpose()?;
    let mut job = Job {
        id: JobId(row.try_get::<Uuid, _>("id")?),
        task: text("task")?,
        kind: text("kind")?.parse().map_err(|e| corrupt("kind", e))?,
        executor: text("executor")?
            .parse()
            .map_err(|e| corrupt("executor", e))?,
        status: text("status")?.parse().map_err(|e| corrupt("status", e))?,
        args: serde_json::from_str(&text("args")?).map_err(|e| corrupt("args", e))?,
        result: opt_json("result")?,
        error,
        priority: row.try_get::<i32, _>("priority")?,
        attempt: row.try_get::<i32, _>("attempt")? as u32,
        max_attempts: row.try_get::<i32, _>("max_attempts")? as u32,
        timeout_ms: row
            .try_get::<Option<i64>, _>("timeout_ms")?
            .map(|t| t as u64),
        progress: row.try_get("progress")?,
        idempotency_key: row.try_get("idempotency_key")?,
        spec_hash: row.try_get("spec_hash")?,
        created_at: Micros(row.try_get("created_at")?),
        scheduled_at: Micros(row.try_get("scheduled_at")?),
        started_at: row.try_get::<Option<i64>, _>("started_at")?.map(Micros),
        finished_at: row.try_get::<Option<i64>, _>("finished_at")?.map(Micros),
        timings: Timings {
            queued_ms: None,
            run_ms: None,
        },
    };
    job.compute_timings();
    Ok(job)
}

fn error_json(e: &ErrorInfo) -> String {
    serde_json::to_string(e).expect("an ErrorInfo always serializes")
}

/// Inserts new queued jobs in one statement (arrays unnested into rows).
async fn insert_rows(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[&NewJob],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: &dyn Fn(&NewJob) -> String| rows.iter().map(|j| f(j)).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO jobs (id, task, kind, executor, status, args, priority, attempt, \
         max_attempts, timeout_ms, progress, idempotency_key, spec_hash, created_at, scheduled_at) \
         SELECT id, task, kind, executor, 'queued', args::jsonb, priority, 0, max_attempts, \
         timeout_ms, 0, key, hash, created_at, scheduled_at FROM UNNEST($1::uuid[], $2::text[], \
         $3::text[], $4::text[], $5::text[], $6::int[], $7::int[], $8::bigint[], $9::text[], \
         $10::text[], $11::bigint[], $12::bigint[]) AS t(id, task, kind, executor, args, priority, \
         max_attempts, timeout_ms, key, hash, created_at, scheduled_at)",
    )
    .bind(rows.iter().map(|j| j.id.0).collect::<Vec<_>>())
    .bind(col(&|j| j.task.clone()))
    .bind(col(&|j| j.kind.as_str().to_string()))
    .bind(col(&|j| j.executor.as_str().to_string()))
    .bind(col(&|j| j.args.to_string()))
    .bind(rows.iter().map(|j| j.priority).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|j| j.max_attempts as i32)
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|j| j.timeout_ms.map(|t| t as i64))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|j| j.idempotency_key.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|j| j.spec_hash.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|j| j.created_at.0).collect::<Vec<_>>())
    .bind(rows.iter().map(|j| j.scheduled_at.0).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    // The blobs these jobs name (their tasks' blob arguments) are now in use: they go with
    // the last job that names them.
    let (blobs, jobs): (Vec<Uuid>, Vec<Uuid>) = rows
        .iter()
        .flat_map(|j| j.blobs.iter().map(move |b| (b, j.id.0)))
        .filter_map(|(b, j)| Uuid::parse_str(b).ok().map(|b| (b, j)))
        .unzip();
    if !blobs.is_empty() {
        sqlx::query(
            "INSERT INTO job_blobs (blob_id, job_id) SELECT * FROM UNNEST($1::uuid[], $2::uuid[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&blobs)
        .bind(&jobs)
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE blobs SET used = TRUE WHERE id = ANY($1) AND NOT used")
            .bind(blobs)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl PostgresStore {
    async fn try_insert(&self, jobs: &[NewJob]) -> Result<Vec<Inserted>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut out: Vec<Option<Inserted>> = vec![None; jobs.len()];
        let mut fresh: Vec<(usize, &NewJob)> = Vec::with_capacity(jobs.len());
        let mut in_batch: HashMap<&str, usize> = HashMap::new();
        for (i, job) in jobs.iter().enumerate() {
            let Some(key) = job.idempotency_key.as_deref() else {
                fresh.push((i, job));
                continue;
            };
            let existing = if let Some(&first) = in_batch.get(key) {
                Some(jobs[first].to_job())
            } else {
                let sql = format!("SELECT {COLUMNS} FROM jobs WHERE idempotency_key = $1");
                let row = sqlx::query(&sql).bind(key).fetch_optional(&mut *tx).await?;
                row.as_ref().map(job_from_row).transpose()?
            };
            match existing {
                Some(found) if found.spec_hash == job.spec_hash => {
                    out[i] = Some(Inserted::Existing(found))
                }
                Some(_) => {
                    return Err(StoreError::IdempotencyConflict {
                        index: i,
                        key: key.to_string(),
                    })
                }
                None => {
                    in_batch.insert(key, i);
                    fresh.push((i, job));
                }
            }
        }
        let rows: Vec<&NewJob> = fresh.iter().map(|(_, j)| *j).collect();
        insert_rows(&mut tx, &rows).await?;
        tx.commit().await?;
        for (i, job) in fresh {
            out[i] = Some(Inserted::Created(job.to_job()));
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every job answered"))
            .collect())
    }

    async fn one(
        &self,
        sql: &str,
        binds: impl FnOnce(
            sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        ) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<Job>, StoreError> {
        let row = binds(sqlx::query(sql)).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
    }
}

fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23505"))
}

#[async_trait]
impl JobStore for PostgresStore {
    async fn claim(
        &self,
        lane: ExecutorKind,
        limit: u32,
        now: Micros,
        lease: &Lease,
    ) -> Result<Claimed, StoreError> {
        // SKIP LOCKED: servers claiming at the same moment take different rows instead of
        // queueing behind each other's locks.
        // The rows are picked in a CTE, which PostgreSQL runs once: an `IN (subquery …
        // LIMIT … SKIP LOCKED)` may be re-run by the planner and update more rows than LIMIT.
        let sql = format!(
            "WITH picked AS (SELECT id FROM jobs WHERE status = 'queued' AND executor = $4 \
             AND scheduled_at <= $1 AND attempt < max_attempts \
             ORDER BY priority DESC, scheduled_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) \
             UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = $1, \
             progress = 0, owner = $2, lease_until = $3 FROM picked \
             WHERE jobs.id = picked.id RETURNING {}",
            qualified()
        );
        let rows = sqlx::query(&sql)
            .bind(now.0)
            .bind(&lease.owner)
            .bind(lease.until.0)
            .bind(lane.as_str())
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next_due = if jobs.len() < limit as usize {
            let at: Option<i64> = sqlx::query_scalar(
                "SELECT MIN(scheduled_at) FROM jobs WHERE status = 'queued' AND executor = $1",
            )
            .bind(lane.as_str())
            .fetch_one(&self.pool)
            .await?;
            at.map(Micros)
        } else {
            None
        };
        Ok(Claimed { jobs, next_due })
    }

    async fn settle(&self, moves: Vec<Settle>) -> Result<Vec<Option<Job>>, StoreError> {
        for m in &moves {
            m.check()?;
        }
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        let to: Vec<Job> = moves.iter().map(Settle::moved).collect();
        let done: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE jobs SET status = v.status, attempt = v.attempt, result = v.result::jsonb, \
             error = v.error::jsonb, progress = v.progress, scheduled_at = v.scheduled_at, \
             finished_at = v.finished_at, owner = NULL, lease_until = NULL \
             FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], \
             $6::float8[], $7::bigint[], $8::bigint[], $9::int[], $10::bigint[]) \
             AS v(id, status, attempt, result, error, progress, scheduled_at, finished_at, was, \
             expired) \
             WHERE jobs.id = v.id AND jobs.status = 'running' AND jobs.attempt = v.was \
             AND (v.expired IS NULL OR jobs.lease_until IS NULL OR jobs.lease_until < v.expired) \
             RETURNING jobs.id",
        )
        .bind(to.iter().map(|j| j.id.0).collect::<Vec<_>>())
        .bind(to.iter().map(|j| j.status.as_str()).collect::<Vec<_>>())
        .bind(to.iter().map(|j| j.attempt as i32).collect::<Vec<_>>())
        .bind(
            to.iter()
                .map(|j| j.result.as_ref().map(Value::to_string))
                .collect::<Vec<_>>(),
        )
        .bind(
            to.iter()
                .map(|j| j.error.as_ref().map(error_json))
                .collect::<Vec<_>>(),
        )
        .bind(to.iter().map(|j| j.progress).collect::<Vec<_>>())
        .bind(to.iter().map(|j| j.scheduled_at.0).collect::<Vec<_>>())
        .bind(
            to.iter()
                .map(|j| j.finished_at.map(|t| t.0))
                .collect::<Vec<_>>(),
        )
        .bind(
            moves
                .iter()
                .map(|m| m.job.attempt as i32)
                .collect::<Vec<_>>(),
        )
        .bind(
            moves
                .iter()
                .map(|m| m.expired_before.map(|t| t.0))
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.pool)
        .await?;
        let done: std::collections::HashSet<Uuid> = done.into_iter().collect();
        Ok(to
            .into_iter()
            .map(|j| done.contains(&j.id.0).then_some(j))
            .collect())
    }

    async fn renew(
        &self,
        owner: &str,
        running: &[(JobId, u32)],
        until: Micros,
    ) -> Result<Vec<(JobId, u32)>, StoreError> {
        let ids: Vec<Uuid> = running.iter().map(|(id, _)| id.0).collect();
        let rows = sqlx::query(
            "UPDATE jobs SET lease_until = $1 WHERE owner = $2 AND status = 'running' \
             AND id = ANY($3) RETURNING id, attempt",
        )
        .bind(until.0)
        .bind(owner)
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        let mut held = std::collections::HashSet::with_capacity(rows.len());
        for row in rows {
            held.insert((
                JobId(row.try_get::<Uuid, _>(0)?),
                row.try_get::<i32, _>(1)? as u32,
            ));
        }
        Ok(running
            .iter()
            .filter(|r| !held.contains(r))
            .copied()
            .collect())
    }

    async fn expired(&self, before: Micros, limit: u32) -> Result<Vec<Job>, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !maintenance_leader(&mut tx).await? {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = 'running' \
             AND (lease_until IS NULL OR lease_until < $1) LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(before.0)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn queued_counts(&self) -> Result<Vec<(ExecutorKind, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT executor, COUNT(*) AS n FROM jobs WHERE status = 'queued' GROUP BY executor",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let lane: String = r.try_get("executor")?;
                let n: i64 = r.try_get("n")?;
                Ok((lane.parse().map_err(|e| corrupt("executor", e))?, n as u64))
            })
            .collect()
    }

    async fn listen(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Notice>, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(&self.channel).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                // recv reconnects after a lost connection; notices sent meanwhile are lost,
                // which the lanes' periodic look at the table covers.
                let n = match listener.recv().await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let notice = match n.payload().split_once(':') {
                    Some(("new", e)) => e.parse().ok().map(Notice::New),
                    Some(("cancel", id)) => id.parse().ok().map(Notice::Cancel),
                    Some(("change", id)) => id.parse().ok().map(Notice::Changed),
                    _ => None,
                };
                if let Some(notice) = notice {
                    if tx.send(notice).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, StoreError> {
        // Two servers inserting the same new key at once: one wins the unique index, the other
        // retries and finds the winner's job (a replay or a conflict, as in one server).
        match self.try_insert(&jobs).await {
            Err(e) if is_unique_violation(&e) => self.try_insert(&jobs).await,
            other => other,
        }
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
        self.one(&sql, |q| q.bind(id.0)).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM jobs WHERE TRUE");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if filter.status.is_some() {
            sql.push_str(&format!(" AND status = {}", next()));
        }
        if filter.task.is_some() {
            sql.push_str(&format!(" AND task = {}", next()));
        }
        if filter.kind.is_some() {
            sql.push_str(&format!(" AND kind = {}", next()));
        }
        if filter.before.is_some() {
            sql.push_str(&format!(" AND id < {}", next()));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", next()));
        let mut q = sqlx::query(&sql);
        if let Some(s) = filter.status {
            q = q.bind(s.as_str());
        }
        if let Some(t) = &filter.task {
            q = q.bind(t.clone());
        }
        if let Some(k) = filter.kind {
            q = q.bind(k.as_str());
        }
        if let Some(b) = filter.before {
            q = q.bind(b.0);
        }
        let rows = q.bind(filter.limit as i64).fetch_all(&self.pool).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn cancel(&self, id: JobId, now: Micros) -> Result<CancelOutcome, StoreError> {
        let error = error_json(&ErrorInfo::new(
            ErrorKind::Cancelled,
            "cancelled by request",
        ));
        // The row is locked by the subquery, so `was` is the status this update moves from.
        let sql = format!(
            "UPDATE jobs SET status = 'cancelled', error = $1::jsonb, finished_at = $2, \
             owner = NULL, lease_until = NULL FROM (SELECT id, status AS was FROM jobs \
             WHERE id = $3 FOR UPDATE) AS old WHERE jobs.id = old.id \
             AND jobs.status IN ('queued', 'running') RETURNING old.was, {}",
            qualified()
        );
        let row = sqlx::query(&sql)
            .bind(error)
            .bind(now.0)
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            let was: String = row.try_get("was")?;
            return Ok(CancelOutcome::Cancelled {
                job: job_from_row(&row)?,
                was: was.parse().map_err(|e| corrupt("status", e))?,
            });
        }
        Ok(match self.get(id).await? {
            Some(job) => CancelOutcome::AlreadyFinal(job),
            None => CancelOutcome::NotFound,
        })
    }

    async fn delete(&self, id: JobId) -> Result<DeleteOutcome, StoreError> {
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id = $1 AND status IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(id.0)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(DeleteOutcome::Deleted);
        }
        Ok(match self.get(id).await? {
            Some(job) => DeleteOutcome::Unfinished(Box::new(job)),
            None => DeleteOutcome::NotFound,
        })
    }

    async fn prune(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !maintenance_leader(&mut tx).await? {
            return Ok(0);
        }
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL \
             AND finished_at < $1 ORDER BY finished_at LIMIT $2)",
        )
        .bind(before.0)
        .bind(limit as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn insert_blob(&self, meta: BlobMeta) -> Result<(), StoreError> {
        let id = Uuid::parse_str(&meta.id).map_err(|e| corrupt("blob id", e))?;
        sqlx::query(
            "INSERT INTO blobs (id, size, sha256, created_at, keep, origin) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(meta.size as i64)
        .bind(meta.sha256)
        .bind(meta.created_at.0)
        .bind(meta.keep)
        .bind(meta.origin)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_blob(&self, id: &str) -> Result<Option<BlobMeta>, StoreError> {
        let Ok(uuid) = Uuid::parse_str(id) else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT id, size, sha256, created_at, keep, origin FROM blobs WHERE id = $1",
        )
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(BlobMeta {
                id: r.try_get::<Uuid, _>("id")?.hyphenated().to_string(),
                size: r.try_get::<i64, _>("size")? as u64,
                sha256: r.try_get("sha256")?,
                keep: r.try_get("keep")?,
                origin: r.try_get("origin")?,
                created_at: Micros(r.try_get("created_at")?),
            })
        })
        .transpose()
    }

    async fn prune_blobs(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM blobs WHERE id IN (SELECT b.id FROM blobs b WHERE b.used AND NOT b.keep \
             AND NOT EXISTS (SELECT 1 FROM job_blobs jb WHERE jb.blob_id = b.id) LIMIT $1) \
             RETURNING id",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids
            .into_iter()
            .map(|u| u.hyphenated().to_string())
            .collect())
    }

    async fn delete_blob(&self, id: &str) -> Result<BlobDeleteOutcome, StoreError> {
        let Ok(uuid) = Uuid::parse_str(id) else {
            return Ok(BlobDeleteOutcome::NotFound);
        };
        let mut tx = self.pool.begin().await?;
        // Lock the blob's row so a concurrent delete waits for this one.
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM blobs WHERE id = $1 FOR UPDATE")
                .bind(uuid)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Ok(BlobDeleteOutcome::NotFound);
        }
        let users: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM job_blobs jb JOIN jobs j ON j.id = jb.job_id \
             WHERE jb.blob_id = $1 AND j.status IN ('queued', 'running')",
        )
        .bind(uuid)
        .fetch_one(&mut *tx)
        .await?;
        if users > 0 {
            return Ok(BlobDeleteOutcome::InUse(users as u64));
        }
        sqlx::query("DELETE FROM blobs WHERE id = $1")
            .bind(uuid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(BlobDeleteOutcome::Deleted)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
