//! The SQLite statements: each function is one move (or one read inside the writer's
//! transaction), run on the writer's connection. Helpers return boxed futures: a plain
//! `async fn` taking `&mut SqliteConnection` trips a known higher-ranked lifetime limitation
//! (sqlx's `Executor` for `&'c mut` connections) once the future is spawned.

use std::collections::{HashMap, HashSet};

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::Row;

use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::flow::Sharing;
use crate::job::{
    Callback, ErrorInfo, ErrorKind, ExecutorKind, Job, JobId, JobStatus, NewJob, Timings,
};
use crate::store::flow::from_columns;
use crate::store::graph::{Cascade, NewRow};
use crate::store::{
    BlobDeleteOutcome, CallbackOutcome, CancelOutcome, Claimed, ClaimedCallbacks, DeleteOutcome,
    Delivery, Inserted, KeyedSubmit, Lease, ListFilter, ServerBeat, Settle, StoreError,
};

pub(super) const COLUMNS: &str = "id, task, kind, executor, status, args, result, error, \
    priority, attempt, max_attempts, timeout_ms, progress, idempotency_key, spec_hash, \
    created_at, scheduled_at, started_at, finished_at, tenant, concurrency_key, concurrency_limit, \
    rate_key, rate_per_second, rate_burst, callback_url, depends_on, run_on_parent_failure, retried";

/// Most rows in one merged INSERT, and most jobs in one submit that may be merged.
pub(super) const MERGED_INSERT_MAX: usize = 500;
/// Most moves in one UPDATE … FROM (VALUES …) (10 parameters each).
pub(super) const SETTLE_CHUNK: usize = 500;
/// Most ids in one `IN (…)` list.
const ID_CHUNK: usize = 500;

type Conn<'a> = &'a mut SqliteConnection;

pub(super) use crate::store::{corrupt, error_json};

pub(super) fn job_from_row(row: &SqliteRow) -> Result<Job, StoreError> {
    let text = |col: &str| -> Result<String, StoreError> { Ok(row.try_get::<String, _>(col)?) };
    let opt_json = |col: &str| -> Result<Option<Value>, StoreError> {
        row.try_get::<Option<String>, _>(col)?
            .map(|s| serde_json::from_str(&s).map_err(|e| corrupt(col, e)))
            .transpose()
    };
    let opt_micros = |col: &str| -> Result<Option<Micros>, StoreError> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(Micros))
    };
    let error = row
        .try_get::<Option<String>, _>("error")?
        .map(|s| serde_json::from_str::<ErrorInfo>(&s).map_err(|e| corrupt("error", e)))
        .transpose()?;
    let mut job = Job {
        id: text("id")?.parse().map_err(|e| corrupt("id", e))?,
        task: text("task")?,
        kind: text("kind")?.parse().map_err(|e| corrupt("kind", e))?,
        executor: text("executor")?
            .parse()
            .map_err(|e| corrupt("executor", e))?,
        status: text("status")?.parse().map_err(|e| corrupt("status", e))?,
        args: serde_json::from_str(&text("args")?).map_err(|e| corrupt("args", e))?,
        result: opt_json("result")?,
        error,
        priority: row.try_get::<i64, _>("priority")? as i32,
        attempt: row.try_get::<i64, _>("attempt")? as u32,
        max_attempts: row.try_get::<i64, _>("max_attempts")? as u32,
        timeout_ms: row
            .try_get::<Option<i64>, _>("timeout_ms")?
            .map(|t| t as u64),
        progress: row.try_get("progress")?,
        idempotency_key: row.try_get("idempotency_key")?,
        spec_hash: row.try_get("spec_hash")?,
        created_at: Micros(row.try_get("created_at")?),
        scheduled_at: Micros(row.try_get("scheduled_at")?),
        started_at: opt_micros("started_at")?,
        finished_at: opt_micros("finished_at")?,
        timings: Timings {
            queued_ms: None,
            run_ms: None,
        },
        tenant: None,
        concurrency: None,
        rate: None,
        waiting_for: None,
        waiting_until: None,
        callback: row
            .try_get::<Option<String>, _>("callback_url")?
            .map(Callback::pending),
        depends_on: crate::store::graph::parse_ids(row.try_get("depends_on")?)?,
        run_on_parent_failure: row.try_get::<i64, _>("run_on_parent_failure")? != 0,
        retried: row.try_get::<i64, _>("retried")? as u32,
        children: None,
    };
    (job.tenant, job.concurrency, job.rate) = from_columns(
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
    job.compute_timings();
    Ok(job)
}

pub(super) fn select_one(
    conn: Conn<'_>,
    id: JobId,
) -> BoxFuture<'_, Result<Option<Job>, StoreError>> {
    Box::pin(async move {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    })
}

/// Whether a submit may be merged with others into one INSERT: no idempotency key to look up,
/// no parents to look up.
pub(super) fn mergeable(jobs: &[NewJob]) -> bool {
    jobs.len() <= MERGED_INSERT_MAX
        && jobs
            .iter()
            .all(|j| j.idempotency_key.is_none() && j.depends_on.is_empty())
}

/// Inserts new jobs, many rows per statement, and records which blobs they name and which
/// parents they wait for.
pub(super) fn insert_rows<'a>(
    conn: Conn<'a>,
    rows: &'a [NewRow<'a>],
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        for chunk in rows.chunks(MERGED_INSERT_MAX) {
            let mut sql = String::from(
                "INSERT INTO jobs (id, task, kind, executor, status, args, priority, attempt, \
                 max_attempts, timeout_ms, progress, idempotency_key, spec_hash, created_at, \
                 scheduled_at, callback_url, error, finished_at, depends_on, \
                 run_on_parent_failure, tenant, concurrency_key, concurrency_limit, rate_key, \
                 rate_per_second, rate_burst, flow) VALUES ",
            );
            for n in 0..chunk.len() {
                if n > 0 {
                    sql.push(',');
                }
                sql.push_str(
                    "(?, ?, ?, ?, ?, ?, ?, 0, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                );
            }
            let mut q = sqlx::query(&sql);
            for row in chunk {
                let job = row.job;
                q = q
                    .bind(job.id.to_string())
                    .bind(job.task.clone())
                    .bind(job.kind.as_str())
                    .bind(job.executor.as_str())
                    .bind(row.status.as_str())
                    .bind(job.args.to_string())
                    .bind(job.priority)
                    .bind(job.max_attempts as i64)
                    .bind(job.timeout_ms.map(|t| t as i64))
                    .bind(job.idempotency_key.clone())
                    .bind(job.spec_hash.clone())
                    .bind(job.created_at.0)
                    .bind(job.scheduled_at.0)
                    .bind(job.callback_url.clone())
                    .bind(row.error.as_ref().map(error_json))
                    .bind(row.finished_at().map(|t| t.0))
                    .bind(row.depends_on_json())
                    .bind(job.run_on_parent_failure as i64)
                    .bind(job.tenant.clone().unwrap_or_default())
                    .bind(job.concurrency.as_ref().map(|c| c.key.clone()))
                    .bind(job.concurrency.as_ref().map(|c| c.limit as i64))
                    .bind(job.rate.as_ref().map(|r| r.key.clone()))
                    .bind(job.rate.as_ref().map(|r| r.per_second))
                    .bind(job.rate.as_ref().map(|r| r.burst as i64))
                    .bind(job.has_flow() as i64);
            }
            q.execute(&mut *conn).await?;
        }
        super::graph::insert_edges(&mut *conn, rows).await?;
        // A job cancelled at submit (a parent had already failed) owes its callback too.
        let owed: Vec<JobId> = rows
            .iter()
            .filter(|r| r.status.is_final() && r.job.callback_url.is_some())
            .map(|r| r.job.id)
            .collect();
        if !owed.is_empty() {
            enqueue_callbacks(&mut *conn, &owed, Micros::now()).await?;
        }
        // The blobs these jobs name (their tasks' blob arguments) are now in use: they go with
        // the last job that names them (see prune_blobs).
        let named: Vec<(&str, JobId)> = rows
            .iter()
            .flat_map(|r| r.job.blobs.iter().map(move |b| (b.as_str(), r.job.id)))
            .collect();
        for chunk in named.chunks(ID_CHUNK) {
            let values = vec!["(?, ?)"; chunk.len()].join(", ");
            let sql = format!("INSERT OR IGNORE INTO job_blobs (blob_id, job_id) VALUES {values}");
            let mut q = sqlx::query(&sql);
            for (blob, job) in chunk {
                q = q.bind(*blob).bind(job.to_string());
            }
            q.execute(&mut *conn).await?;
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("UPDATE blobs SET used = 1 WHERE id IN ({marks}) AND used = 0");
            let mut q = sqlx::query(&sql);
            for (blob, _) in chunk {
                q = q.bind(*blob);
            }
            q.execute(&mut *conn).await?;
        }
        Ok(())
    })
}

/// Stores a submit whose jobs may carry idempotency keys. A key already taken becomes
/// `Existing` (same spec) or fails the whole submit (another spec).
pub(super) fn insert(
    conn: Conn<'_>,
    jobs: Vec<NewJob>,
) -> BoxFuture<'_, Result<Vec<Inserted>, StoreError>> {
    Box::pin(async move {
        let mut stored = HashMap::new();
        for key in KeyedSubmit::keys(&jobs) {
            let sql = format!("SELECT {COLUMNS} FROM jobs WHERE idempotency_key = ?");
            let row = sqlx::query(&sql)
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some(row) = row {
                stored.insert(key.to_string(), job_from_row(&row)?);
            }
        }
        let plan = KeyedSubmit::plan(&jobs, &stored)?;
        let found = super::graph::statuses(&mut *conn, &plan.parents()).await?;
        let rows = plan.rows(&found)?;
        insert_rows(&mut *conn, &rows).await?;
        Ok(plan.answer(&rows))
    })
}

/// queued → running for up to `limit` due jobs of a lane, in priority then schedule order.
/// Jobs without flow control go by the plain statement; while any flow-controlled job is
/// queued in the lane, the flow-aware claim ([`flow`](super::flow)) takes over.
pub(super) fn claim<'a>(
    conn: Conn<'a>,
    lane: ExecutorKind,
    limit: u32,
    now: Micros,
    lease: &'a Lease,
    sharing: &'a Sharing,
) -> BoxFuture<'a, Result<Claimed, StoreError>> {
    Box::pin(async move {
        // `INDEXED BY jobs_ready`: walked in claim order, the first `limit` due rows end the
        // scan. Left to itself SQLite picked `jobs_due` for the `scheduled_at` range and sorted
        // every due row of the lane on each claim (a temp B-tree; end to end fell to half).
        // The NOT EXISTS probes the (usually empty) flow index once: with flow-controlled jobs
        // queued, the plain statement takes nothing and the flow-aware claim decides.
        let sql = format!(
            "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = ?1, \
             progress = 0, owner = ?2, lease_until = ?3 WHERE id IN (SELECT id FROM jobs \
             INDEXED BY jobs_ready \
             WHERE status = 'queued' AND flow = 0 AND executor = ?4 AND scheduled_at <= ?1 \
             AND attempt < max_attempts ORDER BY priority DESC, scheduled_at, id LIMIT ?5) \
             AND NOT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_flow_ready \
             WHERE status = 'queued' AND flow = 1 AND executor = ?4) \
             RETURNING {COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(now.0)
            .bind(&lease.owner)
            // One machine: the process's clock is the store's clock.
            .bind(Micros::now().plus(lease.ttl).0)
            .bind(lane.as_str())
            .bind(limit as i64)
            .fetch_all(&mut *conn)
            .await?;
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        if jobs.len() >= limit as usize {
            return Ok(Claimed {
                jobs,
                next_due: None,
            });
        }
        let (at, flow): (Option<i64>, bool) = sqlx::query_as(
            "SELECT MIN(scheduled_at), EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_flow_ready \
             WHERE status = 'queued' AND flow = 1 AND executor = ?1) \
             FROM jobs WHERE status = 'queued' AND executor = ?1",
        )
        .bind(lane.as_str())
        .fetch_one(&mut *conn)
        .await?;
        if !flow {
            return Ok(Claimed {
                jobs,
                next_due: at.map(Micros),
            });
        }
        let left = limit - jobs.len() as u32;
        let more = super::flow::claim(conn, lane, left, now, lease, sharing).await?;
        jobs.extend(more.jobs);
        Ok(Claimed {
            jobs,
            next_due: more.next_due,
        })
    })
}

/// Writes decided moves out of `running`, many per statement, each guarded by its job's
/// status and attempt (and, for a rescue, by its lease having run out). Returns the ids that
/// moved.
///
/// `+jobs.status` keeps SQLite from driving the update through the status index: with
/// thousands of jobs running, it chose to scan every running row for each batch (a profile
/// showed a 1,024-job batch taking 350 ms). The unary `+` leaves the primary key as the only
/// usable index, so each row is one lookup.
pub(super) fn settle_rows<'a>(
    conn: Conn<'a>,
    moves: &'a [&'a Settle],
) -> BoxFuture<'a, Result<HashSet<JobId>, StoreError>> {
    Box::pin(async move {
        let mut done = HashSet::with_capacity(moves.len());
        for chunk in moves.chunks(SETTLE_CHUNK) {
            let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "UPDATE jobs SET status = v.column2, attempt = v.column3, result = v.column4, \
                 error = v.column5, progress = v.column6, scheduled_at = v.column7, \
                 finished_at = v.column8, owner = NULL, lease_until = NULL \
                 FROM (VALUES {values}) AS v \
                 WHERE jobs.id = v.column1 AND +jobs.status = 'running' \
                 AND jobs.attempt = v.column9 AND (v.column10 IS NULL \
                 OR jobs.lease_until IS NULL OR jobs.lease_until < v.column10) RETURNING jobs.id"
            );
            let mut q = sqlx::query(&sql);
            for m in chunk {
                let to = m.moved();
                q = q
                    .bind(to.id.to_string())
                    .bind(to.status.as_str())
                    .bind(to.attempt as i64)
                    .bind(to.result.as_ref().map(Value::to_string))
                    .bind(to.error.as_ref().map(error_json))
                    .bind(to.progress)
                    .bind(to.scheduled_at.0)
                    .bind(to.finished_at.map(|t| t.0))
                    .bind(m.job.attempt as i64)
                    .bind(m.expired_before.map(|t| t.0));
            }
            for row in q.fetch_all(&mut *conn).await? {
                let id: String = row.try_get(0)?;
                done.insert(id.parse().map_err(|e| corrupt("id", e))?);
            }
        }
        Ok(done)
    })
}

/// waiting | queued | running → cancelled; answers the status it was cancelled from. Its
/// waiting children move on in the same transaction (`cascade`).
pub(super) fn cancel<'a>(
    conn: Conn<'a>,
    id: JobId,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<CancelOutcome, StoreError>> {
    Box::pin(async move {
        // The writer is the only writer, so the status read here is the one the update moves
        // from.
        let was: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        let Some(was) = was else {
            return Ok(CancelOutcome::NotFound);
        };
        let was: JobStatus = was.parse().map_err(|e| corrupt("status", e))?;
        if was.is_final() {
            return Ok(match select_one(&mut *conn, id).await? {
                Some(job) => CancelOutcome::AlreadyFinal(job),
                None => CancelOutcome::NotFound,
            });
        }
        let error = error_json(&ErrorInfo::new(
            ErrorKind::Cancelled,
            "cancelled by request",
        ));
        let sql = format!(
            "UPDATE jobs SET status = 'cancelled', error = ?, finished_at = ?, owner = NULL, \
             lease_until = NULL WHERE id = ? AND status IN ('waiting', 'queued', 'running') \
             RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(error)
            .bind(now.0)
            .bind(id.to_string())
            .fetch_one(&mut *conn)
            .await?;
        let job = job_from_row(&row)?;
        if job.callback.is_some() {
            enqueue_callbacks(&mut *conn, &[id], now).await?;
        }
        super::graph::resolve(&mut *conn, vec![id], now, cascade).await?;
        enqueue_owed(&mut *conn, &cascade.moved, now).await?;
        Ok(CancelOutcome::Cancelled { job, was })
    })
}

pub(super) fn delete(
    conn: Conn<'_>,
    id: JobId,
) -> BoxFuture<'_, Result<DeleteOutcome, StoreError>> {
    Box::pin(async move {
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id = ? AND status IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(DeleteOutcome::Deleted);
        }
        Ok(match select_one(&mut *conn, id).await? {
            Some(job) => DeleteOutcome::Unfinished(Box::new(job)),
            None => DeleteOutcome::NotFound,
        })
    })
}

/// Extends `owner`'s leases of the attempts `running` ((job, attempt) pairs) to `ttl` from now;
/// answers which of `running` no longer run under them.
pub(super) fn renew<'a>(
    conn: Conn<'a>,
    owner: &'a str,
    running: &'a [(JobId, u32)],
    ttl: std::time::Duration,
) -> BoxFuture<'a, Result<Vec<(JobId, u32)>, StoreError>> {
    Box::pin(async move {
        let until = Micros::now().plus(ttl);
        let mut held = HashSet::with_capacity(running.len());
        for chunk in running.chunks(ID_CHUNK / 2) {
            let values = vec!["(?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "UPDATE jobs SET lease_until = ? FROM (VALUES {values}) AS v \
                 WHERE jobs.id = v.column1 AND jobs.attempt = v.column2 AND jobs.owner = ? \
                 AND +jobs.status = 'running' RETURNING jobs.id, jobs.attempt"
            );
            let mut q = sqlx::query(&sql).bind(until.0);
            for (id, attempt) in chunk {
                q = q.bind(id.to_string()).bind(*attempt as i64);
            }
            for row in q.bind(owner).fetch_all(&mut *conn).await? {
                let id: String = row.try_get(0)?;
                let attempt: i64 = row.try_get(1)?;
                held.insert((
                    id.parse::<JobId>().map_err(|e| corrupt("id", e))?,
                    attempt as u32,
                ));
            }
        }
        Ok(running
            .iter()
            .filter(|r| !held.contains(r))
            .copied()
            .collect())
    })
}

pub(super) fn prune(
    conn: Conn<'_>,
    before: Micros,
    limit: u32,
) -> BoxFuture<'_, Result<u64, StoreError>> {
    Box::pin(async move {
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL \
             AND finished_at < ? ORDER BY finished_at LIMIT ?)",
        )
        .bind(before.0)
        .bind(limit as i64)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected())
    })
}

pub(super) fn insert_blob(conn: Conn<'_>, meta: BlobMeta) -> BoxFuture<'_, Result<(), StoreError>> {
    Box::pin(async move {
        sqlx::query(
            "INSERT INTO blobs (id, size, sha256, created_at, keep, origin) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(meta.id)
        .bind(meta.size as i64)
        .bind(meta.sha256)
        .bind(meta.created_at.0)
        .bind(meta.keep as i64)
        .bind(meta.origin)
        .execute(&mut *conn)
        .await?;
        Ok(())
    })
}

pub(super) fn prune_blobs(
    conn: Conn<'_>,
    limit: u32,
) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
    Box::pin(async move {
        Ok(sqlx::query_scalar(
            "DELETE FROM blobs WHERE id IN (SELECT b.id FROM blobs b WHERE b.used = 1 \
             AND b.keep = 0 AND NOT EXISTS (SELECT 1 FROM job_blobs jb WHERE jb.blob_id = b.id) \
             LIMIT ?) RETURNING id",
        )
        .bind(limit as i64)
        .fetch_all(&mut *conn)
        .await?)
    })
}

pub(super) fn delete_blob(
    conn: Conn<'_>,
    id: String,
) -> BoxFuture<'_, Result<BlobDeleteOutcome, StoreError>> {
    Box::pin(async move {
        let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM blobs WHERE id = ?")
            .bind(&id)
            .fetch_optional(&mut *conn)
            .await?;
        if exists.is_none() {
            return Ok(BlobDeleteOutcome::NotFound);
        }
        let users: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM job_blobs jb JOIN jobs j ON j.id = jb.job_id \
             WHERE jb.blob_id = ? AND j.status IN ('waiting', 'queued', 'running')",
        )
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        if users > 0 {
            return Ok(BlobDeleteOutcome::InUse(users as u64));
        }
        sqlx::query("DELETE FROM blobs WHERE id = ?")
            .bind(&id)
            .execute(&mut *conn)
            .await?;
        Ok(BlobDeleteOutcome::Deleted)
    })
}

/// Writes the outbox rows of jobs that just became final with a callback URL: pending, due
/// now. A row left from an earlier final state (the job was retried) starts over, but keeps
/// its count of tries: a delivery is known by (job, attempt), so a stale one still in flight
/// for the earlier state cannot record against this one.
pub(super) fn enqueue_callbacks<'a>(
    conn: Conn<'a>,
    ids: &'a [JobId],
    now: Micros,
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        for chunk in ids.chunks(ID_CHUNK) {
            let values = vec!["(?, 'pending', 0, NULL, ?, ?, NULL)"; chunk.len()].join(", ");
            let sql = format!(
                "INSERT INTO callbacks (job_id, status, attempts, last_error, since, due_at, \
                 done_at) VALUES {values} ON CONFLICT (job_id) DO UPDATE SET \
                 status = 'pending', last_error = NULL, since = excluded.since, \
                 due_at = excluded.due_at, done_at = NULL"
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.to_string()).bind(now.0).bind(now.0);
            }
            q.execute(&mut *conn).await?;
        }
        Ok(())
    })
}

/// The outbox rows owed by the moves that applied (`done`), written in the same transaction.
pub(super) fn enqueue_settled<'a>(
    conn: Conn<'a>,
    moves: &'a [&'a Settle],
    done: &'a HashSet<JobId>,
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        let mut by_time: HashMap<i64, Vec<JobId>> = HashMap::new();
        for m in moves
            .iter()
            .filter(|m| m.calls_back() && done.contains(&m.job.id))
        {
            by_time.entry(m.now.0).or_default().push(m.job.id);
        }
        for (now, ids) in by_time {
            enqueue_callbacks(&mut *conn, &ids, Micros(now)).await?;
        }
        Ok(())
    })
}

/// `(job id, status, attempts, last_error)` of the outbox rows of `ids`.
pub(super) type CallbackRow = (JobId, String, i64, Option<String>);

pub(super) fn callback_rows<'a>(
    pool: &'a sqlx::SqlitePool,
    ids: &'a [JobId],
) -> BoxFuture<'a, Result<Vec<CallbackRow>, StoreError>> {
    Box::pin(async move {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ID_CHUNK) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT job_id, status, attempts, last_error FROM callbacks \
                 WHERE job_id IN ({marks})"
            );
            let mut q = sqlx::query_as::<_, (String, String, i64, Option<String>)>(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for (id, status, attempts, error) in q.fetch_all(pool).await? {
                out.push((
                    id.parse().map_err(|e| corrupt("id", e))?,
                    status,
                    attempts,
                    error,
                ));
            }
        }
        Ok(out)
    })
}

/// Jobs whose move out of a final state (a retry by hand) makes their outbox row stale: it
/// is not claimed while the job is unfinished, and its count of tries goes up, so a delivery
/// of the old state still in flight cannot record its outcome (nor against the next final
/// state's row).
pub(super) fn supersede_callbacks<'a>(
    conn: Conn<'a>,
    ids: &'a [JobId],
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        sqlx::query(
            "UPDATE callbacks SET attempts = attempts + 1 \
             WHERE job_id IN (SELECT value FROM json_each(?))",
        )
        .bind(crate::store::graph::ids_json(ids))
        .execute(&mut *conn)
        .await?;
        Ok(())
    })
}

/// Only the outbox rows of final jobs are delivered (a retried job's row waits for its next
/// final state).
const FINAL_JOB: &str = "EXISTS (SELECT 1 FROM jobs j WHERE j.id = callbacks.job_id \
     AND j.status IN ('succeeded', 'failed', 'cancelled'))";

/// Claims due pending callbacks of final jobs: one more attempt each, not due again before
/// `until`.
pub(super) fn claim_callbacks(
    conn: Conn<'_>,
    limit: u32,
    now: Micros,
    until: Micros,
) -> BoxFuture<'_, Result<ClaimedCallbacks, StoreError>> {
    Box::pin(async move {
        let sql = format!(
            "UPDATE callbacks SET attempts = attempts + 1, due_at = ?1 WHERE job_id IN \
             (SELECT job_id FROM callbacks WHERE status = 'pending' AND due_at <= ?2 \
             AND {FINAL_JOB} ORDER BY due_at LIMIT ?3) \
             RETURNING job_id, attempts, since, last_error"
        );
        let rows: Vec<(String, i64, i64, Option<String>)> = sqlx::query_as(&sql)
            .bind(until.0)
            .bind(now.0)
            .bind(limit as i64)
            .fetch_all(&mut *conn)
            .await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        for (id, attempts, since, error) in rows {
            // A job deleted since takes its outbox row with it.
            let id = id.parse().map_err(|e| corrupt("id", e))?;
            if let Some(job) = select_one(&mut *conn, id).await? {
                deliveries.push(Delivery::claimed(job, attempts, since, error)?);
            }
        }
        let next_due = if deliveries.len() < limit as usize {
            let sql = format!(
                "SELECT MIN(due_at) FROM callbacks WHERE status = 'pending' AND {FINAL_JOB}"
            );
            let at: Option<i64> = sqlx::query_scalar(&sql).fetch_one(&mut *conn).await?;
            at.map(Micros)
        } else {
            None
        };
        Ok(ClaimedCallbacks {
            deliveries,
            next_due,
        })
    })
}

/// Writes a delivery's outcome if the callback is still pending at `attempt`.
pub(super) fn record_callback(
    conn: Conn<'_>,
    job: JobId,
    attempt: u32,
    outcome: CallbackOutcome,
    now: Micros,
) -> BoxFuture<'_, Result<bool, StoreError>> {
    Box::pin(async move {
        let done_at = (outcome.status() != crate::job::CallbackStatus::Pending).then_some(now.0);
        let done = sqlx::query(
            "UPDATE callbacks SET status = ?, last_error = COALESCE(?, last_error), \
             due_at = COALESCE(?, due_at), done_at = ? \
             WHERE job_id = ? AND status = 'pending' AND attempts = ?",
        )
        .bind(outcome.status().as_str())
        .bind(outcome.error())
        .bind(outcome.due().map(|t| t.0))
        .bind(done_at)
        .bind(job.to_string())
        .bind(attempt as i64)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Writes the outbox rows owed by jobs among `ids` that are now final and have a callback URL
/// (children a cascade cancelled, bulk cancels): every move into a final state owes one
/// (`Job::calls_back_on`).
pub(super) fn enqueue_owed<'a>(
    conn: Conn<'a>,
    ids: &'a [JobId],
    now: Micros,
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        let mut owed = Vec::new();
        for chunk in ids.chunks(ID_CHUNK) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT id FROM jobs WHERE id IN ({marks}) AND callback_url IS NOT NULL \
                 AND status IN ('succeeded', 'failed', 'cancelled')"
            );
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for id in q.fetch_all(&mut *conn).await? {
                owed.push(id.parse().map_err(|e| corrupt("id", e))?);
            }
        }
        enqueue_callbacks(&mut *conn, &owed, now).await
    })
}

/// A value bound to a filter's placeholder.
pub(super) enum Bind {
    Text(String),
    Int(i64),
}

/// The `WHERE` conditions of a list filter (with `statuses` for its status), and their binds.
pub(super) fn filter_where(filter: &ListFilter, statuses: &[JobStatus]) -> (String, Vec<Bind>) {
    let mut sql = String::from("1 = 1");
    let mut binds = Vec::new();
    if !statuses.is_empty() {
        sql.push_str(&format!(
            " AND status IN ({})",
            vec!["?"; statuses.len()].join(", ")
        ));
        binds.extend(statuses.iter().map(|s| Bind::Text(s.as_str().into())));
    }
    if let Some(t) = &filter.task {
        sql.push_str(" AND task = ?");
        binds.push(Bind::Text(t.clone()));
    }
    if let Some(k) = filter.kind {
        sql.push_str(" AND kind = ?");
        binds.push(Bind::Text(k.as_str().into()));
    }
    if let Some(e) = filter.executor {
        sql.push_str(" AND executor = ?");
        binds.push(Bind::Text(e.as_str().into()));
    }
    if let Some(t) = filter.created_before {
        sql.push_str(" AND created_at < ?");
        binds.push(Bind::Int(t.0));
    }
    if let Some(t) = filter.created_after {
        sql.push_str(" AND created_at >= ?");
        binds.push(Bind::Int(t.0));
    }
    if let Some(b) = filter.before {
        sql.push_str(" AND id < ?");
        binds.push(Bind::Text(b.to_string()));
    }
    (sql, binds)
}

pub(super) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for b in binds {
        q = match b {
            Bind::Text(t) => q.bind(t),
            Bind::Int(i) => q.bind(i),
        };
    }
    q
}

/// The ids of up to `filter.limit` jobs matching the filter, oldest first.
pub(super) fn matching_ids<'a>(
    conn: Conn<'a>,
    filter: &'a ListFilter,
    statuses: &'a [JobStatus],
) -> BoxFuture<'a, Result<Vec<JobId>, StoreError>> {
    Box::pin(async move {
        let (cond, binds) = filter_where(filter, statuses);
        let sql = format!("SELECT id FROM jobs WHERE {cond} ORDER BY id LIMIT ?");
        let rows = bind_all(sqlx::query(&sql), binds)
            .bind(filter.limit as i64)
            .fetch_all(&mut *conn)
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0)?;
                id.parse().map_err(|e| corrupt("id", e))
            })
            .collect()
    })
}

/// Runs fixed statements, one after the other.
pub(super) fn exec<'c>(
    conn: Conn<'c>,
    statements: &'static [&'static str],
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        for sql in statements {
            sqlx::query(sql).execute(&mut *conn).await?;
        }
        Ok(())
    })
}

/// Upserts a server's row; its start is its first beat.
pub(super) fn beat(conn: Conn<'_>, beat: ServerBeat) -> BoxFuture<'_, Result<(), StoreError>> {
    Box::pin(async move {
        let now = Micros::now();
        sqlx::query(
            "INSERT INTO servers (id, address, started_at, heartbeat_at, lanes) \
             VALUES (?1, ?2, ?3, ?3, ?4) ON CONFLICT (id) DO UPDATE SET \
             address = excluded.address, heartbeat_at = excluded.heartbeat_at, \
             lanes = excluded.lanes",
        )
        .bind(beat.id)
        .bind(beat.address)
        .bind(now.0)
        .bind(beat.lanes.to_string())
        .execute(&mut *conn)
        .await?;
        Ok(())
    })
}

pub(super) fn forget_servers(
    conn: Conn<'_>,
    silent: std::time::Duration,
) -> BoxFuture<'_, Result<u64, StoreError>> {
    Box::pin(async move {
        let done = sqlx::query("DELETE FROM servers WHERE heartbeat_at < ?")
            .bind(Micros::now().minus(silent).0)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected())
    })
}
