//! The PostgreSQL store's statements: row decoding, the merged insert and settle, and the
//! notifications a write sends inside its transaction (delivered at its commit).

use std::collections::HashSet;

use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::clock::Micros;
use crate::job::{Callback, ErrorInfo, Job, JobId, JobStatus, NewJob, Timings};
use crate::store::graph::NewRow;
use crate::store::{ListFilter, Settle, StoreError};

pub(super) const COLUMNS: &str =
    "id, task, kind, executor, status, args::text AS args, result::text AS result, \
    error::text AS error, priority, attempt, max_attempts, timeout_ms, progress, idempotency_key, \
    spec_hash, created_at, scheduled_at, started_at, finished_at, callback_url, \
    depends_on::text AS depends_on, run_on_parent_failure, retried";

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
        callback: row
            .try_get::<Option<String>, _>("callback_url")?
            .map(Callback::pending),
        depends_on: crate::store::graph::parse_ids(row.try_get("depends_on")?)?,
        run_on_parent_failure: row.try_get("run_on_parent_failure")?,
        retried: row.try_get::<i32, _>("retried")? as u32,
        children: None,
    };
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
         callback_url, error, finished_at, depends_on, run_on_parent_failure) \
         SELECT id, task, kind, executor, status, args::jsonb, priority, 0, max_attempts, \
         timeout_ms, 0, key, hash, created_at, scheduled_at, callback_url, error::jsonb, \
         finished_at, depends_on::jsonb, ropf FROM UNNEST($1::uuid[], $2::text[], \
         $3::text[], $4::text[], $5::text[], $6::int[], $7::int[], $8::bigint[], $9::text[], \
         $10::text[], $11::bigint[], $12::bigint[], $13::text[], $14::text[], $15::bigint[], \
         $16::text[], $17::bool[], $18::text[]) AS t(id, task, kind, executor, args, priority, \
         max_attempts, timeout_ms, key, hash, created_at, scheduled_at, status, error, \
         finished_at, depends_on, ropf, callback_url)",
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
/// at its `since`. A row left from an earlier final state (the job was retried) starts over.
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
         ON CONFLICT (job_id) DO UPDATE SET status = 'pending', attempts = 0, \
         last_error = NULL, since = excluded.since, due_at = excluded.due_at, done_at = NULL",
    )
    .bind(ids.iter().map(|id| id.0).collect::<Vec<_>>())
    .bind(since)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

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
         ON CONFLICT (job_id) DO UPDATE SET status = 'pending', attempts = 0, \
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
         $6::float8[], $7::bigint[], $8::bigint[], $9::int[], $10::bigint[]) \
         AS v(id, status, attempt, result, error, progress, scheduled_at, finished_at, was, \
         expired) \
         WHERE jobs.id = v.id AND jobs.status = 'running' AND jobs.attempt = v.was \
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

/// Extends the leases of `owner`'s running attempts (`ids`) to `until`; answers the (id,
/// attempt) of those it extended. Rows are locked in id order, as [`settle_rows`] locks them.
pub(super) async fn renew(
    conn: &mut PgConnection,
    owner: &str,
    ids: Vec<Uuid>,
    until: i64,
) -> Result<HashSet<(JobId, u32)>, StoreError> {
    let rows = sqlx::query(
        "WITH locked AS (SELECT id FROM jobs WHERE owner = $2 AND status = 'running' \
         AND id = ANY($3) ORDER BY id FOR UPDATE) \
         UPDATE jobs SET lease_until = $1 FROM locked WHERE jobs.id = locked.id \
         AND jobs.owner = $2 AND jobs.status = 'running' RETURNING jobs.id, jobs.attempt",
    )
    .bind(until)
    .bind(owner)
    .bind(ids)
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

/// PostgreSQL refuses a notification payload of 8000 bytes or more; a `change:` list is cut
/// well below that.
const PAYLOAD_MAX: usize = 7900;

/// What one transaction announces, gathered while it runs and sent just before its commit
/// ([`Notices::send`]): one notification per lane and kind, not one per row.
#[derive(Default)]
pub(super) struct Notices {
    /// Lanes that got queued jobs: `new:<executor>`.
    pub new: HashSet<crate::job::ExecutorKind>,
    /// Jobs whose state changed: `change:<id>,<id>,...`, for watchers on other servers.
    pub changed: Vec<JobId>,
    /// Running jobs cancelled: `cancel:<id>`, one each, to whoever runs them.
    pub cancelled: Vec<JobId>,
}

impl Notices {
    /// Adds what a parent's final state (or a retry) moved besides its own job.
    pub(super) fn cascaded(&mut self, cascade: crate::store::graph::Cascade) {
        self.new
            .extend(cascade.queued.iter().map(|(_, lane)| *lane));
        self.changed.extend(cascade.moved);
    }
}

impl Notices {
    /// The payloads, `change:` lists cut to fit PostgreSQL's limit.
    pub(super) fn payloads(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .new
            .iter()
            .map(|e| format!("new:{}", e.as_str()))
            .chain(self.cancelled.iter().map(|id| format!("cancel:{id}")))
            .collect();
        let mut list = String::new();
        for id in &self.changed {
            let id = id.0.hyphenated().to_string();
            if !list.is_empty() && list.len() + 1 + id.len() > PAYLOAD_MAX {
                out.push(std::mem::take(&mut list));
            }
            list.push_str(if list.is_empty() { "change:" } else { "," });
            list.push_str(&id);
        }
        if !list.is_empty() {
            out.push(list);
        }
        out
    }

    /// Queues the notifications in the open transaction: PostgreSQL delivers them at its
    /// commit, and drops them if it rolls back. One statement for all of them.
    pub(super) async fn send(
        &self,
        conn: &mut PgConnection,
        channel: &str,
    ) -> Result<(), StoreError> {
        let payloads = self.payloads();
        if payloads.is_empty() {
            return Ok(());
        }
        sqlx::query("SELECT count(pg_notify($1, p)) FROM UNNEST($2::text[]) AS p")
            .bind(channel)
            .bind(payloads)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// Parses one notification's payload: `new:<executor>`, `cancel:<id>`,
/// `change:<id>,<id>,...` or `schedules`.
pub(super) fn parse_payload(payload: &str) -> Vec<crate::store::Notice> {
    use crate::store::Notice;
    if payload == "schedules" {
        return vec![Notice::Schedules];
    }
    match payload.split_once(':') {
        Some(("new", e)) => e.parse().ok().map(Notice::New).into_iter().collect(),
        Some(("cancel", id)) => id.parse().ok().map(Notice::Cancel).into_iter().collect(),
        Some(("change", ids)) => ids
            .split(',')
            .filter_map(|id| id.parse().ok().map(Notice::Changed))
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ExecutorKind;
    use crate::store::Notice;

    #[test]
    fn a_long_change_list_is_cut_below_the_payload_limit_and_parses_back() {
        let ids: Vec<JobId> = (0..1000).map(|_| JobId::new()).collect();
        let notices = Notices {
            new: [ExecutorKind::Async].into_iter().collect(),
            changed: ids.clone(),
            cancelled: Vec::new(),
        };
        let payloads = notices.payloads();
        assert!(payloads.len() > 2, "cut into several");
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let heard: Vec<Notice> = payloads.iter().flat_map(|p| parse_payload(p)).collect();
        let mut want = vec![Notice::New(ExecutorKind::Async)];
        want.extend(ids.into_iter().map(Notice::Changed));
        assert_eq!(heard, want);
    }
}
