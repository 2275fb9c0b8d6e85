//! The PostgreSQL statements for jobs that depend on jobs (`crate::store::graph`), run inside
//! the transaction of the write that caused them, as on SQLite.
//!
//! Several servers write at once, so two parents of one child may finish in two transactions
//! at the same moment, each seeing the other still running under its snapshot: both would
//! leave the child waiting for ever. So a child's row is locked (`FOR UPDATE`, in id order)
//! before its parents are read, in a statement of its own: the second transaction waits for
//! the first to commit, and its read (a new snapshot under READ COMMITTED) sees both parents
//! final. A submit that names stored parents locks them `FOR SHARE` for the same reason: a
//! parent cannot finish between the submit reading its status and the child's edge being
//! committed.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::notify::Notices;
use super::sql::{corrupt, error_json, job_from_row, COLUMNS};
use crate::clock::Micros;
use crate::job::{after_parents, AfterParents, ErrorInfo, ErrorKind, Job, JobId, JobStatus};
use crate::store::graph::{decide, Cascade, EdgeRow};
use crate::store::{frees_key, CancelOutcome, RetryOutcome, StoreError};

fn uuids(ids: &[JobId]) -> Vec<Uuid> {
    ids.iter().map(|i| i.0).collect()
}

fn parse_status(s: &str) -> Result<JobStatus, StoreError> {
    s.parse().map_err(|e| corrupt("status", e))
}

/// The status of each of `ids` that exists, the rows locked against a change of status until
/// the transaction ends (`FOR SHARE`, in id order).
pub(super) async fn lock_statuses(
    conn: &mut PgConnection,
    ids: &[JobId],
) -> Result<HashMap<JobId, JobStatus>, StoreError> {
    let mut out = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(out);
    }
    let rows = sqlx::query("SELECT id, status FROM jobs WHERE id = ANY($1) ORDER BY id FOR SHARE")
        .bind(uuids(ids))
        .fetch_all(&mut *conn)
        .await?;
    for row in rows {
        let status: String = row.try_get(1)?;
        out.insert(JobId(row.try_get(0)?), parse_status(&status)?);
    }
    Ok(out)
}

/// Locks those of `children` that are in `status` (in id order); answers them.
async fn lock(
    conn: &mut PgConnection,
    children: &[JobId],
    status: &str,
) -> Result<Vec<JobId>, StoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        // `status || ''`: a filter, never an index to start from (see `queue.rs`).
        "SELECT id FROM jobs WHERE id = ANY($1) AND status || '' = $2 ORDER BY id FOR UPDATE",
    )
    .bind(uuids(children))
    .bind(status)
    .fetch_all(&mut *conn)
    .await?;
    Ok(ids.into_iter().map(JobId).collect())
}

/// The edges of `children` (locked, in `status`), for [`decide`].
async fn edges(
    conn: &mut PgConnection,
    children: &[JobId],
    status: &str,
) -> Result<Vec<EdgeRow>, StoreError> {
    // The edges first, by their child index, then each job by id: joined the other way, the
    // planner may start from "the waiting jobs" (stale statistics say there is one).
    let rows = sqlx::query(
        "WITH d AS MATERIALIZED (SELECT child_id, parent_id FROM job_deps \
         WHERE child_id = ANY($1)) \
         SELECT d.child_id, c.run_on_parent_failure, d.parent_id, p.status \
         FROM d JOIN jobs c ON c.id = d.child_id \
         LEFT JOIN jobs p ON p.id = d.parent_id \
         WHERE c.status || '' = $2",
    )
    .bind(uuids(children))
    .bind(status)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let status: Option<String> = r.try_get(3)?;
            Ok((
                JobId(r.try_get(0)?),
                r.try_get(1)?,
                JobId(r.try_get(2)?),
                status.as_deref().map(parse_status).transpose()?,
            ))
        })
        .collect()
}

/// The children of `parents` in `status` (and, for `cancelled`, cancelled for a parent).
async fn children_in(
    conn: &mut PgConnection,
    parents: &[JobId],
    status: &str,
) -> Result<Vec<JobId>, StoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        // The edges of these parents first (a materialized CTE fixes the order), then each
        // child by id: joined the other way the planner can walk every job in `status`
        // (thousands waiting while graphs are in flight) for each round of finished parents.
        "WITH e AS MATERIALIZED (SELECT child_id FROM job_deps WHERE parent_id = ANY($1)) \
         SELECT DISTINCT c.id FROM e JOIN jobs c ON c.id = e.child_id \
         WHERE c.status = $2 \
         AND (c.status <> 'cancelled' OR c.error->>'type' = 'dependency_failed')",
    )
    .bind(uuids(parents))
    .bind(status)
    .fetch_all(&mut *conn)
    .await?;
    Ok(ids.into_iter().map(JobId).collect())
}

/// Decides waiting `children` again and moves those the decision moves; answers the ones it
/// cancelled.
async fn decide_waiting(
    conn: &mut PgConnection,
    children: &[JobId],
    now: Micros,
    cascade: &mut Cascade,
) -> Result<Vec<JobId>, StoreError> {
    let mut cancelled = Vec::new();
    if children.is_empty() {
        return Ok(cancelled);
    }
    let locked = lock(&mut *conn, children, "waiting").await?;
    if locked.is_empty() {
        return Ok(cancelled);
    }
    let mut queue = Vec::new();
    let (mut ids, mut errors) = (Vec::new(), Vec::new());
    for (child, decision) in decide(edges(&mut *conn, &locked, "waiting").await?) {
        match decision {
            AfterParents::Wait => {}
            AfterParents::Queue => queue.push(child.0),
            AfterParents::Cancel(error) => {
                ids.push(child.0);
                errors.push(error_json(&error));
            }
        }
    }
    if !ids.is_empty() {
        let done: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE jobs SET status = 'cancelled', error = v.error::jsonb, finished_at = $3 \
             FROM UNNEST($1::uuid[], $2::text[], $4::text[]) AS v(id, error, was_status) \
             WHERE jobs.id = v.id AND jobs.status = v.was_status RETURNING jobs.id",
        )
        .bind(&ids)
        .bind(errors)
        .bind(now.0)
        // The expected status as a column of the list, not a constant: see `sql::renew`.
        .bind(vec![JobStatus::Waiting.as_str(); ids.len()])
        .fetch_all(&mut *conn)
        .await?;
        for id in done {
            cascade.moved.push(JobId(id));
            cancelled.push(JobId(id));
        }
    }
    if !queue.is_empty() {
        // Queued from now: its wait for a lane starts when its parents let it run.
        let rows = sqlx::query(
            "UPDATE jobs SET status = 'queued', scheduled_at = GREATEST(scheduled_at, $2) \
             WHERE id = ANY($1) AND status || '' = 'waiting' RETURNING id, executor",
        )
        .bind(queue)
        .bind(now.0)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let id = JobId(row.try_get(0)?);
            let lane = row
                .try_get::<String, _>(1)?
                .parse()
                .map_err(|e| corrupt("executor", e))?;
            cascade.queued.push((id, lane));
            cascade.moved.push(id);
        }
    }
    Ok(cancelled)
}

/// `parents` just reached a final state (in this transaction): moves their waiting children
/// on, and the children of those it cancels, and so on down the graph.
pub(super) async fn resolve(
    conn: &mut PgConnection,
    parents: Vec<JobId>,
    now: Micros,
    cascade: &mut Cascade,
) -> Result<(), StoreError> {
    let mut frontier = parents;
    while !frontier.is_empty() {
        let children = children_in(&mut *conn, &frontier, "waiting").await?;
        frontier = decide_waiting(&mut *conn, &children, now, cascade).await?;
    }
    Ok(())
}

/// The sweep: waiting jobs after `after` with a final (or gone) parent, decided again.
pub(super) async fn resolve_waiting(
    conn: &mut PgConnection,
    after: Option<JobId>,
    limit: u32,
    now: Micros,
    cascade: &mut Cascade,
) -> Result<(u64, Option<JobId>), StoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT c.id FROM jobs c JOIN job_deps d ON d.child_id = c.id \
         LEFT JOIN jobs p ON p.id = d.parent_id \
         WHERE c.status = 'waiting' AND c.id > $1 \
         AND (p.id IS NULL OR p.status IN ('succeeded', 'failed', 'cancelled')) \
         ORDER BY c.id LIMIT $2",
    )
    .bind(after.map_or(Uuid::nil(), |a| a.0))
    .bind(limit as i64)
    .fetch_all(&mut *conn)
    .await?;
    let children: Vec<JobId> = ids.into_iter().map(JobId).collect();
    let before = cascade.moved.len();
    let cancelled = decide_waiting(&mut *conn, &children, now, cascade).await?;
    resolve(&mut *conn, cancelled, now, cascade).await?;
    let next = (children.len() == limit as usize)
        .then(|| children.last().copied())
        .flatten();
    Ok(((cascade.moved.len() - before) as u64, next))
}

/// waiting | queued | running → cancelled, and its children after it.
pub(super) async fn cancel(
    conn: &mut PgConnection,
    id: JobId,
    now: Micros,
    notices: &mut Notices,
    cascade: &mut Cascade,
) -> Result<CancelOutcome, StoreError> {
    // Locked, so `was` is the status the update moves from.
    let was: Option<String> =
        sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(was) = was else {
        return Ok(CancelOutcome::NotFound);
    };
    let was = parse_status(&was)?;
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
    if was.is_final() {
        let row = sqlx::query(&sql).bind(id.0).fetch_one(&mut *conn).await?;
        return Ok(CancelOutcome::AlreadyFinal(job_from_row(&row)?));
    }
    let error = error_json(&ErrorInfo::new(
        ErrorKind::Cancelled,
        "cancelled by request",
    ));
    let sql = format!(
        "UPDATE jobs SET status = 'cancelled', error = $1::jsonb, finished_at = $2, \
         owner = NULL, lease_until = NULL WHERE id = $3 \
         AND status IN ('waiting', 'queued', 'running') RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(error)
        .bind(now.0)
        .bind(id.0)
        .fetch_one(&mut *conn)
        .await?;
    let job = job_from_row(&row)?;
    if was == JobStatus::Running {
        notices.cancelled.push(id);
        // A running job that held a slot of a concurrency key frees it: its lane looks again.
        if frees_key(&job) {
            notices.new.entry(job.executor).or_default();
        }
    }
    notices.changed.push(id);
    resolve(&mut *conn, vec![id], now, cascade).await?;
    Ok(CancelOutcome::Cancelled { job, was })
}

/// Moves one failed or cancelled job back, as [`after_parents`] decides from its parents
/// now, and brings back its children cancelled for it.
pub(super) async fn retry(
    conn: &mut PgConnection,
    id: JobId,
    now: Micros,
    cascade: &mut Cascade,
) -> Result<RetryOutcome, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE");
    let Some(row) = sqlx::query(&sql)
        .bind(id.0)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(RetryOutcome::NotFound);
    };
    let job = job_from_row(&row)?;
    if !matches!(job.status, JobStatus::Failed | JobStatus::Cancelled) {
        return Ok(RetryOutcome::NotRetryable(job));
    }
    let found = lock_statuses(&mut *conn, &job.depends_on).await?;
    let parents: Vec<(JobId, Option<JobStatus>)> = job
        .depends_on
        .iter()
        .map(|p| (*p, found.get(p).copied()))
        .collect();
    let to = match after_parents(job.run_on_parent_failure, &parents) {
        AfterParents::Cancel(e) => return Ok(RetryOutcome::ParentFailed(job, e.message)),
        d => d.status(),
    };
    let sql = format!(
        "UPDATE jobs SET status = $1, result = NULL, error = NULL, \
         progress = 0, started_at = NULL, finished_at = NULL, scheduled_at = $2, \
         retried = retried + 1, owner = NULL, lease_until = NULL, \
         attempt_budget = COALESCE(attempt_budget, max_attempts), \
         max_attempts = attempt + COALESCE(attempt_budget, max_attempts) \
         WHERE id = $3 AND status IN ('failed', 'cancelled') RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(to.as_str())
        .bind(now.0)
        .bind(id.0)
        .fetch_one(&mut *conn)
        .await?;
    let job = job_from_row(&row)?;
    let before = cascade.moved.len();
    restore(&mut *conn, vec![id], now, cascade).await?;
    // It and the children it brought back are unfinished again: their callbacks wait.
    let mut back = vec![id];
    back.extend_from_slice(&cascade.moved[before..]);
    super::sql::supersede_callbacks(&mut *conn, &back).await?;
    Ok(RetryOutcome::Retried(job))
}

/// `parents` were retried: their children cancelled with `dependency_failed` are decided
/// again (back to waiting, mostly), and so on down the graph.
async fn restore(
    conn: &mut PgConnection,
    parents: Vec<JobId>,
    now: Micros,
    cascade: &mut Cascade,
) -> Result<(), StoreError> {
    let mut frontier = parents;
    while !frontier.is_empty() {
        let children = children_in(&mut *conn, &frontier, "cancelled").await?;
        frontier = Vec::new();
        let locked = lock(&mut *conn, &children, "cancelled").await?;
        if locked.is_empty() {
            break;
        }
        for (child, decision) in decide(edges(&mut *conn, &locked, "cancelled").await?) {
            let to = match decision {
                AfterParents::Cancel(_) => continue,
                d => d.status(),
            };
            let lane: Option<String> = sqlx::query_scalar(
                "UPDATE jobs SET status = $1, error = NULL, progress = 0, \
                 started_at = NULL, finished_at = NULL, \
                 scheduled_at = GREATEST(scheduled_at, $2) \
                 WHERE id = $3 AND status = 'cancelled' RETURNING executor",
            )
            .bind(to.as_str())
            .bind(now.0)
            .bind(child.0)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(lane) = lane {
                if to == JobStatus::Queued {
                    let lane = lane.parse().map_err(|e| corrupt("executor", e))?;
                    cascade.queued.push((child, lane));
                }
                cascade.moved.push(child);
                frontier.push(child);
            }
        }
    }
    Ok(())
}

/// Each of `ids` with its result, `None` if it has none.
pub(super) async fn results(
    pool: &PgPool,
    ids: &[JobId],
) -> Result<Vec<(JobId, Option<Value>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, result::text FROM jobs WHERE id = ANY($1) AND status = 'succeeded'",
    )
    .bind(uuids(ids))
    .fetch_all(pool)
    .await?;
    let mut found: HashMap<JobId, Value> = HashMap::new();
    for row in rows {
        let text: Option<String> = row.try_get(1)?;
        if let Some(t) = text {
            found.insert(
                JobId(row.try_get(0)?),
                serde_json::from_str(&t).map_err(|e| corrupt("result", e))?,
            );
        }
    }
    Ok(ids.iter().map(|id| (*id, found.remove(id))).collect())
}

/// The job ids of up to `limit` jobs matching the filter, oldest first, locked (skipping
/// rows another transaction holds).
pub(super) async fn matching_ids(
    conn: &mut PgConnection,
    filter: &crate::store::ListFilter,
    statuses: &[JobStatus],
) -> Result<Vec<JobId>, StoreError> {
    let (cond, binds) = super::sql::filter_where(filter, statuses);
    let n = binds.len() + 1;
    let sql =
        format!("SELECT id FROM jobs WHERE {cond} ORDER BY id LIMIT ${n} FOR UPDATE SKIP LOCKED");
    let q = super::sql::bind_all(sqlx::query(&sql), binds).bind(filter.limit as i64);
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| Ok(JobId(r.try_get::<Uuid, _>(0)?)))
        .collect()
}

/// A job retried, for the answer.
pub(super) fn retried(outcome: RetryOutcome) -> Option<Job> {
    match outcome {
        RetryOutcome::Retried(job) => Some(job),
        _ => None,
    }
}
