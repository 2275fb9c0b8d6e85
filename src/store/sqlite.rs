//! The SQLite store: one writer task that commits many changes per transaction, and a small
//! pool of connections for reads.
//!
//! SQLite allows one writer at a time, and the cost of a write is mostly the commit (an fsync
//! with `synchronous=FULL`). So every write goes through one task: it takes whatever requests
//! are waiting (up to [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE … COMMIT`, and answers
//! each caller only after the commit. Under load, hundreds of submits and state changes share
//! one fsync (group commit); when idle, a single request commits at once, so nothing waits for a
//! timer. Reads go to a separate pool and see every committed write (WAL mode).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    BlobDeleteOutcome, CancelOutcome, DeleteOutcome, Finish, Inserted, JobStore, ListFilter,
    QueuedRef, Recovered, StoreError,
};
use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::config::Durability;
use crate::job::{ErrorInfo, Job, JobId, JobStatus, NewJob, Timings};

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Ids per claiming UPDATE.
const CLAIM_CHUNK: usize = 256;

const COLUMNS: &str = "id, task, kind, executor, status, args, result, error, priority, attempt, \
    max_attempts, timeout_ms, progress, idempotency_key, spec_hash, created_at, scheduled_at, \
    started_at, finished_at";

/// The migrations, compiled into the binary so it runs from anywhere.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "jobs",
        include_str!("../../migrations/sqlite/0001_jobs.sql"),
    ),
    (
        2,
        "blobs",
        include_str!("../../migrations/sqlite/0002_blobs.sql"),
    ),
    (
        3,
        "blob_retention",
        include_str!("../../migrations/sqlite/0003_blob_retention.sql"),
    ),
    (
        4,
        "blob_origin",
        include_str!("../../migrations/sqlite/0004_blob_origin.sql"),
    ),
];

enum Op {
    Insert(Vec<NewJob>),
    Claim(Vec<JobId>, Micros),
    Finish {
        job: Box<Job>,
        outcome: Finish,
        progress: f64,
        now: Micros,
    },
    Retry {
        id: JobId,
        attempt: u32,
        error: ErrorInfo,
        at: Micros,
    },
    Release(JobId, u32),
    Cancel(JobId, Micros),
    Delete(JobId),
    Recover(Micros),
    Prune(Micros, u32),
    InsertBlob(BlobMeta),
    DeleteBlob(String),
    PruneBlobs(u32),
}

enum Reply {
    Inserted(Vec<Inserted>),
    Jobs(Vec<Job>),
    MaybeJob(Option<Job>),
    Cancel(CancelOutcome),
    Delete(DeleteOutcome),
    Recovered(Recovered),
    Count(u64),
    Done,
    BlobDelete(BlobDeleteOutcome),
    Ids(Vec<String>),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

pub struct SqliteStore {
    writer: mpsc::Sender<Request>,
    reads: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url`, applies the migrations and starts the
    /// writer task.
    pub async fn open(url: &str, durability: Durability) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory");
        let mut conn = options.connect().await?;
        let migrator = Migrator::new(super::Embedded(MIGRATIONS)).await?;
        migrator.run_direct(&mut conn).await?;
        let reads = SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(4)
            .connect_with(options)
            .await?;
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(writer_loop(conn, rx));
        Ok(SqliteStore { writer: tx, reads })
    }

    async fn write(&self, op: Op) -> Result<Reply, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(Request { op, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn writer_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Request>,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            commit_batch(&mut conn, &mut batch).await;
        }
        let _ = conn.close().await;
    })
}

/// Runs every request of the batch in one transaction and answers them after the commit.
// The helpers below return boxed futures: a plain `async fn` taking `&mut SqliteConnection`
// trips a known higher-ranked lifetime limitation (sqlx's `Executor` for `&'c mut` connections)
// once the future is spawned.
fn commit_batch<'a>(
    conn: &'a mut SqliteConnection,
    batch: &'a mut Vec<Request>,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let started = std::time::Instant::now();
        let ops = batch.len();
        // A batch of one single-statement op needs no transaction of its own: SQLite runs the
        // statement as one (autocommit). Skipping BEGIN and COMMIT saves two round trips to
        // SQLite's thread, most of an idle server's submit latency.
        let solo = ops == 1 && single_statement(&batch[0].op);
        if solo {
            let req = batch.pop().expect("one request");
            let result = apply_solo(conn, req.op).await;
            let _ = req.reply.send(result);
            tracing::debug!(
                ops,
                total_us = started.elapsed().as_micros() as u64,
                "autocommit"
            );
            metrics::histogram!("offload_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("offload_store_batch_size").record(1.0);
            return;
        }
        if let Err(e) = exec(&mut *conn, &["BEGIN IMMEDIATE"]).await {
            let msg = e.to_string();
            for req in batch.drain(..) {
                let _ = req
                    .reply
                    .send(Err(StoreError::Corrupt(format!("begin failed: {msg}"))));
            }
            return;
        }
        let mut answers = Vec::with_capacity(batch.len());
        // Submits and finishes are the bulk of the traffic: each kind goes out as one statement
        // for the whole batch (a round trip to SQLite's thread costs more than a row). The
        // rest runs one op at a time, in arrival order.
        let mut plain: Vec<(ReplyTo, Vec<NewJob>)> = Vec::new();
        let mut finishes: Vec<(ReplyTo, FinishItem)> = Vec::new();
        let mut rest: Vec<Request> = Vec::new();
        for req in batch.drain(..) {
            match req.op {
                Op::Insert(jobs)
                    if jobs.len() <= MERGED_INSERT_MAX
                        && jobs.iter().all(|j| j.idempotency_key.is_none()) =>
                {
                    plain.push((req.reply, jobs))
                }
                Op::Finish {
                    job,
                    outcome,
                    progress,
                    now,
                } => finishes.push((
                    req.reply,
                    FinishItem {
                        job,
                        outcome,
                        progress,
                        now,
                    },
                )),
                op => rest.push(Request {
                    op,
                    reply: req.reply,
                }),
            }
        }
        if !plain.is_empty() {
            let rows: Vec<&NewJob> = plain.iter().flat_map(|(_, jobs)| jobs.iter()).collect();
            match insert_rows(conn, &rows).await {
                Ok(()) => {
                    for (reply, jobs) in plain {
                        let created = jobs.iter().map(|j| Inserted::Created(j.to_job())).collect();
                        answers.push((reply, Ok(Reply::Inserted(created))));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for (reply, _) in plain {
                        answers.push((
                            reply,
                            Err(StoreError::Corrupt(format!("insert failed: {msg}"))),
                        ));
                    }
                }
            }
        }
        if !finishes.is_empty() {
            let items: Vec<&FinishItem> = finishes.iter().map(|(_, f)| f).collect();
            match finish_rows(conn, &items).await {
                Ok(done) => {
                    for (reply, item) in finishes {
                        let job = done.contains(&item.job.id).then(|| item.finished_job());
                        answers.push((reply, Ok(Reply::MaybeJob(job))));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for (reply, _) in finishes {
                        answers.push((
                            reply,
                            Err(StoreError::Corrupt(format!("finish failed: {msg}"))),
                        ));
                    }
                }
            }
        }
        for req in rest {
            // A multi-statement op runs in a savepoint, so its failure undoes only itself and the
            // rest of the batch still commits. Single-statement ops are atomic on their own.
            let multi = !single_statement(&req.op);
            if multi {
                if let Err(e) = exec(&mut *conn, &["SAVEPOINT op"]).await {
                    answers.push((req.reply, Err(StoreError::Db(e))));
                    continue;
                }
            }
            let result = apply(conn, req.op).await;
            if multi {
                let end: &'static [&'static str] = if result.is_ok() {
                    &["RELEASE op"]
                } else {
                    &["ROLLBACK TO op", "RELEASE op"]
                };
                if let Err(e) = exec(&mut *conn, end).await {
                    tracing::error!(error = %e, "ending a savepoint failed");
                }
            }
            answers.push((req.reply, result));
        }
        let before_commit = started.elapsed();
        match exec(&mut *conn, &["COMMIT"]).await {
            Ok(_) => {
                tracing::debug!(
                    ops,
                    work_us = before_commit.as_micros() as u64,
                    total_us = started.elapsed().as_micros() as u64,
                    "group commit"
                );
                metrics::histogram!("offload_store_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("offload_store_batch_size").record(ops as f64);
                for (reply, result) in answers {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "commit failed; the batch is rolled back");
                let _ = exec(&mut *conn, &["ROLLBACK"]).await;
                let msg = e.to_string();
                for (reply, _) in answers {
                    let _ = reply.send(Err(StoreError::Corrupt(format!("commit failed: {msg}"))));
                }
            }
        }
    })
}

type ReplyTo = oneshot::Sender<Result<Reply, StoreError>>;

/// Whether an op writes with one statement (so it is atomic without a transaction or a
/// savepoint of its own). A follow-up read that only explains a miss (cancel, delete) does
/// not count.
fn single_statement(op: &Op) -> bool {
    match op {
        Op::Insert(jobs) => {
            jobs.len() <= MERGED_INSERT_MAX && jobs.iter().all(|j| j.idempotency_key.is_none())
        }
        Op::Claim(ids, _) => ids.len() <= CLAIM_CHUNK,
        Op::Finish { .. }
        | Op::Retry { .. }
        | Op::Release(..)
        | Op::Cancel(..)
        | Op::Delete(_)
        | Op::Prune(..)
        | Op::InsertBlob(_) => true,
        Op::Recover(_) | Op::DeleteBlob(_) => false,
        Op::PruneBlobs(_) => true,
    }
}

/// Runs one single-statement op in autocommit.
fn apply_solo(conn: &mut SqliteConnection, op: Op) -> BoxFuture<'_, Result<Reply, StoreError>> {
    Box::pin(async move {
        match op {
            Op::Insert(jobs) => {
                let rows: Vec<&NewJob> = jobs.iter().collect();
                insert_rows(&mut *conn, &rows).await?;
                Ok(Reply::Inserted(
                    jobs.iter().map(|j| Inserted::Created(j.to_job())).collect(),
                ))
            }
            Op::Finish {
                job,
                outcome,
                progress,
                now,
            } => {
                let item = FinishItem {
                    job,
                    outcome,
                    progress,
                    now,
                };
                let done = finish_rows(&mut *conn, &[&item]).await?;
                Ok(Reply::MaybeJob(
                    done.contains(&item.job.id).then(|| item.finished_job()),
                ))
            }
            op => apply(conn, op).await,
        }
    })
}

/// Most rows in one merged INSERT, and most jobs in one submit that may be merged.
const MERGED_INSERT_MAX: usize = 500;
/// Most finishes in one UPDATE … FROM (VALUES …) (7 parameters each).
const FINISH_CHUNK: usize = 500;

struct FinishItem {
    job: Box<Job>,
    outcome: Finish,
    progress: f64,
    now: Micros,
}

impl FinishItem {
    fn columns(&self) -> (JobStatus, Option<String>, Option<String>, f64) {
        match &self.outcome {
            Finish::Succeeded(v) => (JobStatus::Succeeded, Some(v.to_string()), None, 1.0),
            Finish::Failed(e) => (
                JobStatus::Failed,
                None,
                Some(error_json(e)),
                self.progress.clamp(0.0, 1.0),
            ),
        }
    }

    /// The row as the UPDATE left it, built here instead of read back.
    fn finished_job(&self) -> Job {
        let mut job = (*self.job).clone();
        let (status, _, _, progress) = self.columns();
        job.status = status;
        job.progress = progress;
        job.finished_at = Some(self.now);
        match &self.outcome {
            Finish::Succeeded(v) => {
                job.result = Some(v.clone());
                job.error = None;
            }
            Finish::Failed(e) => job.error = Some(e.clone()),
        }
        job.compute_timings();
        job
    }
}

/// running → succeeded | failed for many jobs in one statement per chunk, each guarded by its
/// attempt. Returns the ids that moved.
///
/// `+jobs.status` keeps SQLite from driving the update through the status index: with
/// thousands of jobs running, it chose to scan every running row for each batch (a profile
/// showed a 1,024-job batch taking 350 ms, falling as the running set drained). The unary `+`
/// leaves the primary key as the only usable index, so each row is one lookup.
fn finish_rows<'a>(
    conn: &'a mut SqliteConnection,
    items: &'a [&'a FinishItem],
) -> BoxFuture<'a, Result<std::collections::HashSet<JobId>, StoreError>> {
    Box::pin(async move {
        let mut done = std::collections::HashSet::with_capacity(items.len());
        for chunk in items.chunks(FINISH_CHUNK) {
            let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let sql = format!(
                "UPDATE jobs SET status = v.column2, result = v.column3, error = v.column4, \
                 progress = v.column5, finished_at = v.column6 FROM (VALUES {values}) AS v \
                 WHERE jobs.id = v.column1 AND +jobs.status = 'running' \
                 AND jobs.attempt = v.column7 RETURNING jobs.id"
            );
            let mut q = sqlx::query(&sql);
            for item in chunk {
                let (status, result, error, progress) = item.columns();
                q = q
                    .bind(item.job.id.to_string())
                    .bind(status.as_str())
                    .bind(result)
                    .bind(error)
                    .bind(progress)
                    .bind(item.now.0)
                    .bind(item.job.attempt as i64);
            }
            for row in q.fetch_all(&mut *conn).await? {
                let id: String = row.try_get(0)?;
                done.insert(id.parse().map_err(|e| corrupt("id", e))?);
            }
        }
        Ok(done)
    })
}

/// Inserts new queued jobs, many rows per statement.
fn insert_rows<'a>(
    conn: &'a mut SqliteConnection,
    rows: &'a [&'a NewJob],
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        for chunk in rows.chunks(MERGED_INSERT_MAX) {
            let mut sql = String::from(
                "INSERT INTO jobs (id, task, kind, executor, status, args, priority, attempt, \
                 max_attempts, timeout_ms, progress, idempotency_key, spec_hash, created_at, \
                 scheduled_at) VALUES ",
            );
            for n in 0..chunk.len() {
                if n > 0 {
                    sql.push(',');
                }
                sql.push_str("(?, ?, ?, ?, 'queued', ?, ?, 0, ?, ?, 0, ?, ?, ?, ?)");
            }
            let mut q = sqlx::query(&sql);
            for job in chunk {
                q = q
                    .bind(job.id.to_string())
                    .bind(job.task.clone())
                    .bind(job.kind.as_str())
                    .bind(job.executor.as_str())
                    .bind(job.args.to_string())
                    .bind(job.priority)
                    .bind(job.max_attempts as i64)
                    .bind(job.timeout_ms.map(|t| t as i64))
                    .bind(job.idempotency_key.clone())
                    .bind(job.spec_hash.clone())
                    .bind(job.created_at.0)
                    .bind(job.scheduled_at.0);
            }
            q.execute(&mut *conn).await?;
        }
        // Blobs named by these jobs are now in use: they go with the last job that names them
        // (see prune_blobs).
        let blobs: Vec<&str> = rows
            .iter()
            .filter_map(|j| j.args.get("blob").and_then(Value::as_str))
            .collect();
        for chunk in blobs.chunks(CLAIM_CHUNK) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("UPDATE blobs SET used = 1 WHERE id IN ({marks}) AND used = 0");
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut *conn).await?;
        }
        Ok(())
    })
}

/// Runs fixed statements, one after the other.
fn exec<'c>(
    conn: &'c mut SqliteConnection,
    statements: &'static [&'static str],
) -> BoxFuture<'c, Result<(), sqlx::Error>> {
    Box::pin(async move {
        for sql in statements {
            sqlx::query(sql).execute(&mut *conn).await?;
        }
        Ok(())
    })
}

fn apply(conn: &mut SqliteConnection, op: Op) -> BoxFuture<'_, Result<Reply, StoreError>> {
    Box::pin(async move {
        match op {
            Op::Insert(jobs) => insert(conn, jobs).await.map(Reply::Inserted),
            Op::Claim(ids, now) => {
                // One statement per chunk of ids: a claim batch costs one round trip, not one per
                // job.
                let mut claimed = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(CLAIM_CHUNK) {
                    let marks = vec!["?"; chunk.len()].join(", ");
                    let sql = format!(
                    "UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = ?, \
                     progress = 0 WHERE id IN ({marks}) AND +status = 'queued' \
                     AND attempt < max_attempts RETURNING {COLUMNS}"
                );
                    let mut q = sqlx::query(&sql).bind(now.0);
                    for id in chunk {
                        q = q.bind(id.to_string());
                    }
                    for row in q.fetch_all(&mut *conn).await? {
                        claimed.push(job_from_row(&row)?);
                    }
                }
                Ok(Reply::Jobs(claimed))
            }
            Op::Finish { .. } => unreachable!("finishes are merged per batch in commit_batch"),
            Op::Retry {
                id,
                attempt,
                error,
                at,
            } => {
                let sql = format!(
                    "UPDATE jobs SET status = 'queued', error = ?, scheduled_at = ?, progress = 0 \
                 WHERE id = ? AND status = 'running' AND attempt = ? AND attempt < max_attempts \
                 RETURNING {COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(error_json(&error))
                    .bind(at.0)
                    .bind(id.to_string())
                    .bind(attempt as i64)
                    .fetch_optional(&mut *conn)
                    .await?;
                Ok(Reply::MaybeJob(row.as_ref().map(job_from_row).transpose()?))
            }
            Op::Release(id, attempt) => {
                let sql = format!(
                    "UPDATE jobs SET status = 'queued', attempt = attempt - 1, progress = 0 \
                 WHERE id = ? AND status = 'running' AND attempt = ? RETURNING {COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(id.to_string())
                    .bind(attempt as i64)
                    .fetch_optional(&mut *conn)
                    .await?;
                Ok(Reply::MaybeJob(row.as_ref().map(job_from_row).transpose()?))
            }
            Op::Cancel(id, now) => {
                let error = error_json(&ErrorInfo::new("cancelled", "cancelled by request"));
                let sql = format!(
                    "UPDATE jobs SET status = 'cancelled', error = ?, finished_at = ? \
                 WHERE id = ? AND status IN ('queued', 'running') RETURNING {COLUMNS}"
                );
                let row = sqlx::query(&sql)
                    .bind(error)
                    .bind(now.0)
                    .bind(id.to_string())
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = row {
                    return Ok(Reply::Cancel(CancelOutcome::Cancelled(job_from_row(&row)?)));
                }
                Ok(Reply::Cancel(match select_one(&mut *conn, id).await? {
                    Some(job) => CancelOutcome::AlreadyFinal(job),
                    None => CancelOutcome::NotFound,
                }))
            }
            Op::Delete(id) => {
                let done = sqlx::query(
                "DELETE FROM jobs WHERE id = ? AND status IN ('succeeded', 'failed', 'cancelled')",
            )
            .bind(id.to_string())
            .execute(&mut *conn)
            .await?;
                if done.rows_affected() == 1 {
                    return Ok(Reply::Delete(DeleteOutcome::Deleted));
                }
                Ok(Reply::Delete(match select_one(&mut *conn, id).await? {
                    Some(job) => DeleteOutcome::Unfinished(Box::new(job)),
                    None => DeleteOutcome::NotFound,
                }))
            }
            Op::Recover(now) => {
                let lost = error_json(&ErrorInfo::new(
                    "lost",
                    "the server stopped while the job ran, and no attempts remain",
                ));
                let lost = sqlx::query(
                    "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? \
                 WHERE status = 'running' AND attempt >= max_attempts",
                )
                .bind(lost)
                .bind(now.0)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                let interrupted = error_json(&ErrorInfo::new(
                    "crashed",
                    "the server stopped while the job ran; it was requeued",
                ));
                let requeued = sqlx::query(
                    "UPDATE jobs SET status = 'queued', error = ?, scheduled_at = ?, progress = 0 \
                 WHERE status = 'running'",
                )
                .bind(interrupted)
                .bind(now.0)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                Ok(Reply::Recovered(Recovered { requeued, lost }))
            }
            Op::Prune(before, limit) => {
                let done = sqlx::query(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL \
                 AND finished_at < ? ORDER BY finished_at LIMIT ?)",
            )
            .bind(before.0)
            .bind(limit as i64)
            .execute(&mut *conn)
            .await?;
                Ok(Reply::Count(done.rows_affected()))
            }
            Op::InsertBlob(meta) => {
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
                Ok(Reply::Done)
            }
            Op::PruneBlobs(limit) => {
                let ids: Vec<String> = sqlx::query_scalar(
                    "DELETE FROM blobs WHERE id IN (SELECT b.id FROM blobs b WHERE b.used = 1 \
                     AND b.keep = 0 AND NOT EXISTS (SELECT 1 FROM jobs j \
                     WHERE json_extract(j.args, '$.blob') = b.id) LIMIT ?) RETURNING id",
                )
                .bind(limit as i64)
                .fetch_all(&mut *conn)
                .await?;
                Ok(Reply::Ids(ids))
            }
            Op::DeleteBlob(id) => {
                let users: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') \
                     AND json_extract(args, '$.blob') = ?",
                )
                .bind(&id)
                .fetch_one(&mut *conn)
                .await?;
                let exists: Option<i64> = sqlx::query_scalar("SELECT 1 FROM blobs WHERE id = ?")
                    .bind(&id)
                    .fetch_optional(&mut *conn)
                    .await?;
                Ok(Reply::BlobDelete(match (exists, users) {
                    (None, _) => BlobDeleteOutcome::NotFound,
                    (Some(_), n) if n > 0 => BlobDeleteOutcome::InUse(n as u64),
                    (Some(_), _) => {
                        sqlx::query("DELETE FROM blobs WHERE id = ?")
                            .bind(&id)
                            .execute(&mut *conn)
                            .await?;
                        BlobDeleteOutcome::Deleted
                    }
                }))
            }
        }
    })
}

/// Stores a batch of jobs. A job with an idempotency key that is already taken becomes
/// `Existing` (same spec) or fails the whole batch (another spec).
fn insert(
    conn: &mut SqliteConnection,
    jobs: Vec<NewJob>,
) -> BoxFuture<'_, Result<Vec<Inserted>, StoreError>> {
    Box::pin(async move {
        let mut out: Vec<Option<Inserted>> = vec![None; jobs.len()];
        let mut fresh: Vec<(usize, &NewJob)> = Vec::with_capacity(jobs.len());
        // Keys seen earlier in this same batch.
        let mut in_batch: HashMap<&str, usize> = HashMap::new();
        for (i, job) in jobs.iter().enumerate() {
            let Some(key) = job.idempotency_key.as_deref() else {
                fresh.push((i, job));
                continue;
            };
            let existing = if let Some(&first) = in_batch.get(key) {
                Some(jobs[first].to_job())
            } else {
                let sql = format!("SELECT {COLUMNS} FROM jobs WHERE idempotency_key = ?");
                let row = sqlx::query(&sql)
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
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
        insert_rows(&mut *conn, &rows).await?;
        for (i, job) in &fresh {
            out[*i] = Some(Inserted::Created(job.to_job()));
        }
        Ok(out
            .into_iter()
            .map(|o| o.expect("every job answered"))
            .collect())
    })
}

fn select_one(
    conn: &mut SqliteConnection,
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

fn error_json(e: &ErrorInfo) -> String {
    serde_json::to_string(e).expect("an ErrorInfo always serializes")
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn job_from_row(row: &SqliteRow) -> Result<Job, StoreError> {
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
    };
    job.compute_timings();
    Ok(job)
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, StoreError> {
        match self.write(Op::Insert(jobs)).await? {
            Reply::Inserted(v) => Ok(v),
            _ => unreachable!("insert answers Inserted"),
        }
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM jobs WHERE 1 = 1");
        if filter.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if filter.task.is_some() {
            sql.push_str(" AND task = ?");
        }
        if filter.kind.is_some() {
            sql.push_str(" AND kind = ?");
        }
        if filter.before.is_some() {
            sql.push_str(" AND id < ?");
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
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
            q = q.bind(b.to_string());
        }
        let rows = q.bind(filter.limit as i64).fetch_all(&self.reads).await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn claim(&self, ids: Vec<JobId>, now: Micros) -> Result<Vec<Job>, StoreError> {
        match self.write(Op::Claim(ids, now)).await? {
            Reply::Jobs(v) => Ok(v),
            _ => unreachable!("claim answers Jobs"),
        }
    }

    async fn finish(
        &self,
        job: &Job,
        outcome: Finish,
        progress: f64,
        now: Micros,
    ) -> Result<Option<Job>, StoreError> {
        let op = Op::Finish {
            job: Box::new(job.clone()),
            outcome,
            progress,
            now,
        };
        match self.write(op).await? {
            Reply::MaybeJob(j) => Ok(j),
            _ => unreachable!("finish answers MaybeJob"),
        }
    }

    async fn retry(
        &self,
        id: JobId,
        attempt: u32,
        error: ErrorInfo,
        at: Micros,
    ) -> Result<Option<Job>, StoreError> {
        let op = Op::Retry {
            id,
            attempt,
            error,
            at,
        };
        match self.write(op).await? {
            Reply::MaybeJob(j) => Ok(j),
            _ => unreachable!("retry answers MaybeJob"),
        }
    }

    async fn release(&self, id: JobId, attempt: u32) -> Result<Option<Job>, StoreError> {
        match self.write(Op::Release(id, attempt)).await? {
            Reply::MaybeJob(j) => Ok(j),
            _ => unreachable!("release answers MaybeJob"),
        }
    }

    async fn cancel(&self, id: JobId, now: Micros) -> Result<CancelOutcome, StoreError> {
        match self.write(Op::Cancel(id, now)).await? {
            Reply::Cancel(c) => Ok(c),
            _ => unreachable!("cancel answers Cancel"),
        }
    }

    async fn delete(&self, id: JobId) -> Result<DeleteOutcome, StoreError> {
        match self.write(Op::Delete(id)).await? {
            Reply::Delete(d) => Ok(d),
            _ => unreachable!("delete answers Delete"),
        }
    }

    async fn recover(&self, now: Micros) -> Result<Recovered, StoreError> {
        match self.write(Op::Recover(now)).await? {
            Reply::Recovered(r) => Ok(r),
            _ => unreachable!("recover answers Recovered"),
        }
    }

    async fn queued(&self) -> Result<Vec<QueuedRef>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, executor, priority, scheduled_at FROM jobs WHERE status = 'queued'",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(QueuedRef {
                    id: row
                        .try_get::<String, _>("id")?
                        .parse()
                        .map_err(|e| corrupt("id", e))?,
                    executor: row
                        .try_get::<String, _>("executor")?
                        .parse()
                        .map_err(|e| corrupt("executor", e))?,
                    priority: row.try_get::<i64, _>("priority")? as i32,
                    scheduled_at: Micros(row.try_get("scheduled_at")?),
                })
            })
            .collect()
    }

    async fn prune(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
        match self.write(Op::Prune(before, limit)).await? {
            Reply::Count(n) => Ok(n),
            _ => unreachable!("prune answers Count"),
        }
    }

    async fn insert_blob(&self, meta: BlobMeta) -> Result<(), StoreError> {
        self.write(Op::InsertBlob(meta)).await.map(|_| ())
    }

    async fn get_blob(&self, id: &str) -> Result<Option<BlobMeta>, StoreError> {
        let row = sqlx::query(
            "SELECT id, size, sha256, created_at, keep, origin FROM blobs WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reads)
        .await?;
        row.map(|r| {
            Ok(BlobMeta {
                id: r.try_get("id")?,
                size: r.try_get::<i64, _>("size")? as u64,
                sha256: r.try_get("sha256")?,
                keep: r.try_get::<i64, _>("keep")? != 0,
                origin: r.try_get("origin")?,
                created_at: Micros(r.try_get("created_at")?),
            })
        })
        .transpose()
    }

    async fn prune_blobs(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        match self.write(Op::PruneBlobs(limit)).await? {
            Reply::Ids(ids) => Ok(ids),
            _ => unreachable!("prune_blobs answers Ids"),
        }
    }

    async fn delete_blob(&self, id: &str) -> Result<BlobDeleteOutcome, StoreError> {
        match self.write(Op::DeleteBlob(id.to_string())).await? {
            Reply::BlobDelete(o) => Ok(o),
            _ => unreachable!("delete_blob answers BlobDelete"),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }
}
