//! The PostgreSQL store's statements: row decoding, the merged insert and settle, and the
//! notifications a write sends inside its transaction (delivered at its commit).

use std::collections::HashSet;

use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::clock::Micros;
use crate::job::{Callback, ErrorInfo, Job, JobId, JobStatus, NewJob, Timings};
use crate::store::flow::from_columns;
use crate::store::graph::NewRow;
use crate::store::{ListFilter, Settle, StoreError};

pub(super) const COLUMNS: &str =
    "id, task, kind, executor, status, args::text AS args, result::text AS result, \
    error::text AS error, priority, attempt, max_attempts, timeout_ms, progress, idempotency_key, \
    spec_hash, created_at, scheduled_at, started_at, finished_at, tenant, concurrency_key, \
    concurrency_limit, rate_key, rate_per_second, rate_burst, callback_url, \
    depends_on::text AS depends_on, run_on_parent_failure, retried";

/// The database's clock, in the microseconds every timestamp column holds: what leases are
/// stamped and compared with, so the servers' own clocks never decide whether a lease ran out.
/// (`now()` is the transaction's start, the same for every row a statement writes.)
pub(super) const DB_NOW: &str = "(extract(epoch from now()) * 1000000)::bigint";

/// A duration as the microseconds a lease adds to [`DB_NOW`].
pub(super) fn micros(d: std::time::Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

/// The columns, each qualified with the `jobs` table, for statements that join another.
pub(super) fn qualified() -> String {
    COLUMNS
        .split(", ")
        .map(|c| format!("jobs.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether this transaction holds the schema's maintenance lock: maintenance (requeueing
/// expired leases, pruning) is one server's at a time, and the others skip their turn. The
/// lock is released when the transaction ends.
pub(super) async fn maintenance_leader(
    tx: &mut Transaction<'_, Postgres>,
) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtext('offload-maintenance:' || current_schema()))",
    )
    .fetch_one(&mut **tx)
    .await?)
}

pub(super) use crate::store::{corrupt, error_json};

pub(super) fn job_from_row(row: &PgRow) -> Result<Job, StoreError> {
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
        tenant: None,
        concurrency: None,
        rate: None,
        waiting_for: None,
        waiting_until: None,
        callback: row
            .try_get::<Option<String>, _>("callback_url")?
            .map(Callback::pending),
        depends_on: crate::store::graph::parse_ids(row.try_get("depends_on")?)?,
        run_on_parent_failure: row.try_get("run_on_parent_failure")?,
        retried: row.try_get::<i32, _>("retried")? as u32,
        children: None,
    };
    (job.tenant, job.concurrency, job.rate) = from_columns(
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
    job.compute_timings();
    Ok(job)
}

/// Inserts new jobs in one statement (arrays unnested into rows), with the blobs they name
/// and the parents they wait for.
pub(super) async fn insert_rows(
    tx: &mut Transaction<'_, Postgres>,
    new: &[NewRow<'_>],
) -> Result<(), StoreError> {
    if new.is_empty() {
        return Ok(());
    }
    let rows: Vec<&NewJob> = new.iter().map(|r| r.job).collect();
    let col = |f: &dyn Fn(&NewJob) -> String| rows.iter().map(|j| f(j)).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO jobs (id, task, kind, executor, status, args, priority, attempt, \
         max_attempts, timeout_ms, progress, idempotency_key, spec_hash, created_at, scheduled_at, \
         callback_url, error, finished_at, depends_on, run_on_parent_failure, tenant, \
         concurrency_key, concurrency_limit, rate_key, rate_per_second, rate_burst, flow) \
         SELECT id, task, kind, executor, status, args::jsonb, priority, 0, max_attempts, \
         timeout_ms, 0, key, hash, created_at, scheduled_at, callback_url, error::jsonb, \
         finished_at, depends_on::jsonb, ropf, tenant, ckey, climit, rkey, rps, rburst, flow \
         FROM UNNEST($1::uuid[], $2::text[], \
         $3::text[], $4::text[], $5::text[], $6::int[], $7::int[], $8::bigint[], $9::text[], \
         $10::text[], $11::bigint[], $12::bigint[], $13::text[], $14::text[], $15::bigint[], \
         $16::text[], $17::bool[], $18::text[], $19::text[], $20::text[], $21::int[], \
         $22::text[], $23::float8[], $24::int[], $25::bool[]) AS t(id, task, kind, executor, \
         args, priority, max_attempts, timeout_ms, key, hash, created_at, scheduled_at, status, \
         error, finished_at, depends_on, ropf, callback_url, tenant, ckey, climit, rkey, rps, \
         rburst, flow)",
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
    .bind(new.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
    .bind(
        new.iter()
            .map(|r| r.error.as_ref().map(error_json))
            .collect::<Vec<_>>(),
    )
    .bind(
        new.iter()
            .map(|r| r.finished_at().map(|t| t.0))
            .collect::<Vec<_>>(),
    )
    .bind(new.iter().map(|r| r.depends_on_json()).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|j| j.run_on_parent_failure)
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|j| j.callback_url.clone())
            .collect::<Vec<_>>(),
    )
    .bind(col(&|j| j.tenant.clone().unwrap_or_default()))
    .bind(
        rows.iter()
            .map(|j| j.concurrency.as_ref().map(|c| c.key.clone()))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|j| j.concurrency.as_ref().map(|c| c.limit as i32))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|j| j.rate.as_ref().map(|r| r.key.clone()))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|j| j.rate.as_ref().map(|r| r.per_second))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|j| j.rate.as_ref().map(|r| r.burst as i32))
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|j| j.has_flow()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    let (parents, children): (Vec<Uuid>, Vec<Uuid>) = new
        .iter()
        .flat_map(|r| r.depends_on.iter().map(move |p| (p.0, r.job.id.0)))
        .unzip();
    if !parents.is_empty() {
        sqlx::query(
            "INSERT INTO job_deps (parent_id, child_id) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING",
        )
        .bind(parents)
        .bind(children)
        .execute(&mut **tx)
        .await?;
    }
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
    // A job cancelled at submit (a parent had already failed) owes its callback too.
    let owed: Vec<JobId> = new
        .iter()
        .filter(|r| r.status.is_final() && r.job.callback_url.is_some())
        .map(|r| r.job.id)
        .collect();
    enqueue_owed(tx, &owed, crate::clock::Micros::now().0).await?;
    Ok(())
}

/// The outbox row of each job in `ids` (just made final, with a callback URL): pending, due
/// at its `since`. A row left from an earlier final state (the job was retried) starts over,
/// but keeps its count of tries: a delivery is known by (job, attempt), so a stale one still
/// in flight for the earlier state cannot record against this one.
pub(super) async fn enqueue_callbacks(
    conn: &mut PgConnection,
    ids: &[JobId],
    since: &[i64],
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO callbacks (job_id, status, attempts, since, due_at) \
         SELECT id, 'pending', 0, t, t FROM UNNEST($1::uuid[], $2::bigint[]) AS v(id, t) \
         ON CONFLICT (job_id) DO UPDATE SET status = 'pending', \
         last_error = NULL, since = excluded.since, due_at = excluded.due_at, done_at = NULL",
    )
    .bind(ids.iter().map(|id| id.0).collect::<Vec<_>>())
    .bind(since)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Jobs whose move out of a final state (a retry by hand) makes their outbox row stale: it
/// is not claimed while the job is unfinished, and its count of tries goes up, so a delivery
/// of the old state still in flight cannot record its outcome (nor against the next final
/// state's row).
pub(super) async fn supersede_callbacks(
    conn: &mut PgConnection,
    ids: &[JobId],
) -> Result<(), StoreError> {
    sqlx::query("UPDATE callbacks SET attempts = attempts + 1 WHERE job_id = ANY($1)")
        .bind(ids.iter().map(|id| id.0).collect::<Vec<_>>())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Only the outbox rows of final jobs are delivered (a retried job's row waits for its next
/// final state).
pub(super) const FINAL_JOB: &str = "EXISTS (SELECT 1 FROM jobs j WHERE j.id = callbacks.job_id \
     AND j.status IN ('succeeded', 'failed', 'cancelled'))";

/// `(job id, status, attempts, last_error)` of the outbox rows of `ids`.
pub(super) async fn callback_rows(
    pool: &sqlx::PgPool,
    ids: &[JobId],
) -> Result<Vec<(JobId, String, i64, Option<String>)>, StoreError> {
    let rows: Vec<(Uuid, String, i32, Option<String>)> = sqlx::query_as(
        "SELECT job_id, status, attempts, last_error FROM callbacks WHERE job_id = ANY($1)",
    )
    .bind(ids.iter().map(|id| id.0).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, s, n, e)| (JobId(id), s, n as i64, e))
        .collect())
}

/// The outbox rows owed by jobs among `ids` that are now final and have a callback URL
/// (children a cascade cancelled, cancels, bulk cancels): every move into a final state owes
/// one (`Job::calls_back_on`).
pub(super) async fn enqueue_owed(
    conn: &mut PgConnection,
    ids: &[JobId],
    now: i64,
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO callbacks (job_id, status, attempts, since, due_at) \
         SELECT id, 'pending', 0, $2, $2 FROM jobs WHERE id = ANY($1) \
         AND callback_url IS NOT NULL AND status IN ('succeeded', 'failed', 'cancelled') \
         ON CONFLICT (job_id) DO UPDATE SET status = 'pending', \
         last_error = NULL, since = excluded.since, due_at = excluded.due_at, done_at = NULL",
    )
    .bind(ids.iter().map(|id| id.0).collect::<Vec<_>>())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A value bound to a filter's placeholder.
pub(super) enum Bind {
    Text(String),
    Int(i64),
    Id(Uuid),
}

/// The `WHERE` conditions of a list filter (with `statuses` for its status), numbered from
/// `$1`, and their binds.
pub(super) fn filter_where(filter: &ListFilter, statuses: &[JobStatus]) -> (String, Vec<Bind>) {
    let mut sql = String::from("TRUE");
    let mut binds = Vec::new();
    if !statuses.is_empty() {
        let list = statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        // Statuses are the enum's own names, never the caller's text.
        sql.push_str(&format!(" AND status IN ({list})"));
    }
    let mut add = |cond: &str, b: Bind, binds: &mut Vec<Bind>| {
        binds.push(b);
        sql.push_str(&format!(" AND {cond} ${}", binds.len()));
    };
    if let Some(t) = &filter.task {
        add("task =", Bind::Text(t.clone()), &mut binds);
    }
    if let Some(k) = filter.kind {
        add("kind =", Bind::Text(k.as_str().into()), &mut binds);
    }
    if let Some(e) = filter.executor {
        add("executor =", Bind::Text(e.as_str().into()), &mut binds);
    }
    if let Some(t) = filter.created_before {
        add("created_at <", Bind::Int(t.0), &mut binds);
    }
    if let Some(t) = filter.created_after {
        add("created_at >=", Bind::Int(t.0), &mut binds);
    }
    if let Some(b) = filter.before {
        add("id <", Bind::Id(b.0), &mut binds);
    }
    (sql, binds)
}

pub(super) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    binds: Vec<Bind>,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    for b in binds {
        q = match b {
            Bind::Text(t) => q.bind(t),
            Bind::Int(i) => q.bind(i),
            Bind::Id(u) => q.bind(u),
        };
    }
    q
}

/// PostgreSQL's `deadlock_detected`: the transaction was rolled back to break a deadlock.
pub(super) fn is_deadlock(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(sqlx::Error::Database(d)) if d.code().as_deref() == Some("40P01"))
}

pub(super) fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23505"))
}

/// Applies moves out of `running`, in one statement, each only if its job is still running the
/// attempt the move was decided for (and, for a rescue, its lease still ended before the
/// rescuer looked). Answers the (id, attempt) of each move that applied. No two moves may name
/// the same job: which of them applied would be ambiguous (the batcher runs a second move of a
/// job in a statement of its own, after this one).
///
/// `moves` come sorted by job id, and the plan PostgreSQL picks for a primary-key join with
/// an array (a nested loop over `v`) locks the rows in that order, as [`renew`] locks them: a
/// round's settles and a renewal of the same server's jobs, each touching many rows, would
/// otherwise lock them in different orders and could deadlock (PostgreSQL then fails one of
/// them, after `deadlock_timeout`, and the whole round with it). An explicit ordered
/// `SELECT … FOR UPDATE` first would guarantee the order whatever the plan, but it writes a
/// lock on every row before updating it and halved the submit rate in the benchmark; the
/// plan's order is a best effort, and a deadlock it misses costs one retried round (see `batcher::run`).
pub(super) async fn settle_rows(
    conn: &mut PgConnection,
    moves: &[&Settle],
) -> Result<HashSet<(JobId, u32)>, StoreError> {
    if moves.is_empty() {
        return Ok(HashSet::new());
    }
    let to: Vec<Job> = moves.iter().map(|m| m.moved()).collect();
    let rows = sqlx::query(
        "UPDATE jobs SET status = v.status, attempt = v.attempt, result = v.result::jsonb, \
         error = v.error::jsonb, progress = v.progress, scheduled_at = v.scheduled_at, \
         finished_at = v.finished_at, owner = NULL, lease_until = NULL \
         FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], \
         $6::float8[], $7::bigint[], $8::bigint[], $9::int[], $10::bigint[], $11::text[]) \
         AS v(id, status, attempt, result, error, progress, scheduled_at, finished_at, was, \
         expired, was_status) \
         WHERE jobs.id = v.id AND jobs.status = v.was_status AND jobs.attempt = v.was \
         AND (v.expired IS NULL OR jobs.lease_until IS NULL OR jobs.lease_until < v.expired) \
         RETURNING jobs.id, jobs.attempt",
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
    .bind(vec![JobStatus::Running.as_str(); to.len()])
    .fetch_all(&mut *conn)
    .await?;
    let mut done = HashSet::with_capacity(rows.len());
    for row in rows {
        done.insert((
            JobId(row.try_get::<Uuid, _>(0)?),
            row.try_get::<i32, _>(1)? as u32,
        ));
    }
    Ok(done)
}

/// Extends the leases of `owner`'s running attempts (`running`: (job, attempt) pairs, matched
/// as pairs) to `ttl` from now by the database's clock; answers the (id, attempt) of those it
/// extended. Rows are locked in id order, as [`settle_rows`] locks them.
pub(super) async fn renew(
    conn: &mut PgConnection,
    owner: &str,
    running: &[(JobId, u32)],
    ttl: std::time::Duration,
) -> Result<HashSet<(JobId, u32)>, StoreError> {
    // The expected status is a column of the list (see `queue.rs`): with "one running job"
    // estimated, the planner joined 10,000 renewals to 10,000 running rows in a nested loop
    // (17 s, every row locked throughout). Large lists may be planned as a hash join over a
    // scan of the table: linear, never quadratic.
    let sql = format!(
        "WITH locked AS (SELECT jobs.id FROM UNNEST($3::uuid[], $4::int[], $5::text[]) \
         AS r(id, attempt, status) JOIN jobs ON jobs.id = r.id AND jobs.attempt = r.attempt \
         AND jobs.status = r.status WHERE jobs.owner = $2 ORDER BY jobs.id FOR UPDATE OF jobs) \
         UPDATE jobs SET lease_until = {DB_NOW} + $1 WHERE id = ANY(ARRAY(SELECT id FROM locked)) \
         RETURNING id, attempt"
    );
    let rows = sqlx::query(&sql)
        .bind(micros(ttl))
        .bind(owner)
        .bind(running.iter().map(|(id, _)| id.0).collect::<Vec<_>>())
        .bind(running.iter().map(|(_, a)| *a as i32).collect::<Vec<_>>())
        .bind(vec![JobStatus::Running.as_str(); running.len()])
        .fetch_all(&mut *conn)
        .await?;
    let mut held = HashSet::with_capacity(rows.len());
    for row in rows {
        held.insert((
            JobId(row.try_get::<Uuid, _>(0)?),
            row.try_get::<i32, _>(1)? as u32,
        ));
    }
    Ok(held)
}
