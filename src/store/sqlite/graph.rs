//! The SQLite statements for jobs that depend on jobs (`crate::store::graph`): edges, moving
//! children when parents finish, retries, bulk cancels and the sweep. All run on the writer's
//! connection, inside the transaction of the write that caused them; what a child moves to is
//! decided in Rust ([`crate::job::after_parents`]), and each write is guarded by the status
//! it moves from. Sets of ids go to SQLite as one JSON array (`json_each`), whatever their
//! number.

use std::collections::HashMap;

use futures_util::future::BoxFuture;
use serde_json::Value;
use sqlx::sqlite::SqliteConnection;
use sqlx::Row;

use super::sql::{corrupt, error_json, job_from_row, select_one, COLUMNS};
use crate::clock::Micros;
use crate::job::{after_parents, AfterParents, Job, JobId, JobStatus};
use crate::store::graph::{decide, ids_json, Cascade, EdgeRow, NewRow};
use crate::store::{CancelOutcome, RetryOutcome, StoreError};

type Conn<'a> = &'a mut SqliteConnection;
/// A job and its result, if it has one.
type Results = (JobId, Option<Value>);

fn parse_id(s: &str) -> Result<JobId, StoreError> {
    s.parse().map_err(|e| corrupt("id", e))
}

fn parse_status(s: &str) -> Result<JobStatus, StoreError> {
    s.parse().map_err(|e| corrupt("status", e))
}

/// The status of each of `ids` that exists.
pub(super) fn statuses<'a>(
    conn: Conn<'a>,
    ids: &'a [JobId],
) -> BoxFuture<'a, Result<HashMap<JobId, JobStatus>, StoreError>> {
    Box::pin(async move {
        let mut out = HashMap::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(out);
        }
        let rows =
            sqlx::query("SELECT id, status FROM jobs WHERE id IN (SELECT value FROM json_each(?))")
                .bind(ids_json(ids))
                .fetch_all(&mut *conn)
                .await?;
        for row in rows {
            let id: String = row.try_get(0)?;
            let status: String = row.try_get(1)?;
            out.insert(parse_id(&id)?, parse_status(&status)?);
        }
        Ok(out)
    })
}

/// Records the parents of new jobs.
pub(super) fn insert_edges<'a>(
    conn: Conn<'a>,
    rows: &'a [NewRow<'a>],
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        let edges: Vec<(JobId, JobId)> = rows
            .iter()
            .flat_map(|r| r.depends_on.iter().map(move |p| (*p, r.job.id)))
            .collect();
        for chunk in edges.chunks(400) {
            let values = vec!["(?, ?)"; chunk.len()].join(", ");
            let sql =
                format!("INSERT OR IGNORE INTO job_deps (parent_id, child_id) VALUES {values}");
            let mut q = sqlx::query(&sql);
            for (parent, child) in chunk {
                q = q.bind(parent.to_string()).bind(child.to_string());
            }
            q.execute(&mut *conn).await?;
        }
        Ok(())
    })
}

/// Whether any job has ever been stored with parents (the writer skips looking for
/// children while none has).
pub(super) fn any_edges(conn: Conn<'_>) -> BoxFuture<'_, Result<bool, StoreError>> {
    Box::pin(async move {
        let n: i64 = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM job_deps)")
            .fetch_one(&mut *conn)
            .await?;
        Ok(n != 0)
    })
}

/// The edges of `children` that are in `status`, for [`decide`].
fn edges<'a>(
    conn: Conn<'a>,
    children: &'a [JobId],
    status: &'static str,
) -> BoxFuture<'a, Result<Vec<EdgeRow>, StoreError>> {
    Box::pin(async move {
        let rows = sqlx::query(
            "SELECT d.child_id, c.run_on_parent_failure, d.parent_id, p.status \
             FROM job_deps d JOIN jobs c ON c.id = d.child_id \
             LEFT JOIN jobs p ON p.id = d.parent_id \
             WHERE d.child_id IN (SELECT value FROM json_each(?)) AND c.status = ?",
        )
        .bind(ids_json(children))
        .bind(status)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|r| {
                let child: String = r.try_get(0)?;
                let ropf: i64 = r.try_get(1)?;
                let parent: String = r.try_get(2)?;
                let status: Option<String> = r.try_get(3)?;
                Ok((
                    parse_id(&child)?,
                    ropf != 0,
                    parse_id(&parent)?,
                    status.as_deref().map(parse_status).transpose()?,
                ))
            })
            .collect()
    })
}

/// The children of `parents` in `status` (and, for `cancelled`, cancelled for a parent).
fn children_in<'a>(
    conn: Conn<'a>,
    parents: &'a [JobId],
    status: &'static str,
) -> BoxFuture<'a, Result<Vec<JobId>, StoreError>> {
    Box::pin(async move {
        // CROSS JOIN fixes the order (edges by parent first, then each child by id): with a
        // plain JOIN the planner walked every job in `status` (thousands of waiting jobs while
        // graphs are in flight) for each finished parent.
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT d.child_id FROM job_deps d CROSS JOIN jobs c ON c.id = d.child_id \
             WHERE d.parent_id IN (SELECT value FROM json_each(?)) AND c.status = ? \
             AND (c.status <> 'cancelled' \
                  OR json_extract(c.error, '$.type') = 'dependency_failed')",
        )
        .bind(ids_json(parents))
        .bind(status)
        .fetch_all(&mut *conn)
        .await?;
        ids.iter().map(|s| parse_id(s)).collect()
    })
}

/// Decides `children` (waiting) again and moves those the decision moves; answers the ones
/// it cancelled (whose own children must be decided next).
fn decide_waiting<'a>(
    conn: Conn<'a>,
    children: &'a [JobId],
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<Vec<JobId>, StoreError>> {
    Box::pin(async move {
        let mut cancelled = Vec::new();
        if children.is_empty() {
            return Ok(cancelled);
        }
        let mut queue = Vec::new();
        for (child, decision) in decide(edges(&mut *conn, children, "waiting").await?) {
            match decision {
                AfterParents::Wait => {}
                AfterParents::Queue => queue.push(child),
                AfterParents::Cancel(error) => {
                    let done = sqlx::query(
                        "UPDATE jobs SET status = 'cancelled', error = ?, finished_at = ? \
                         WHERE id = ? AND status = 'waiting'",
                    )
                    .bind(error_json(&error))
                    .bind(now.0)
                    .bind(child.to_string())
                    .execute(&mut *conn)
                    .await?;
                    if done.rows_affected() == 1 {
                        cascade.moved.push(child);
                        cancelled.push(child);
                    }
                }
            }
        }
        if !queue.is_empty() {
            // Queued from now: its wait for a lane starts when its parents let it run.
            let rows = sqlx::query(
                "UPDATE jobs SET status = 'queued', scheduled_at = MAX(scheduled_at, ?) \
                 WHERE id IN (SELECT value FROM json_each(?)) AND status = 'waiting' \
                 RETURNING id, executor",
            )
            .bind(now.0)
            .bind(ids_json(&queue))
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                let id = parse_id(&row.try_get::<String, _>(0)?)?;
                let lane = row
                    .try_get::<String, _>(1)?
                    .parse()
                    .map_err(|e| corrupt("executor", e))?;
                cascade.queued.push((id, lane));
                cascade.moved.push(id);
            }
        }
        Ok(cancelled)
    })
}

/// `parents` just reached a final state: moves their waiting children on, and the children
/// of those it cancels, and so on down the graph.
pub(super) fn resolve<'a>(
    conn: Conn<'a>,
    parents: Vec<JobId>,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        let mut frontier = parents;
        while !frontier.is_empty() {
            let children = children_in(&mut *conn, &frontier, "waiting").await?;
            frontier = decide_waiting(&mut *conn, &children, now, cascade).await?;
        }
        Ok(())
    })
}

/// The sweep: waiting jobs after `after` with a final (or gone) parent, decided again.
pub(super) fn resolve_waiting<'a>(
    conn: Conn<'a>,
    after: Option<JobId>,
    limit: u32,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<(u64, Option<JobId>), StoreError>> {
    Box::pin(async move {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT c.id FROM jobs c JOIN job_deps d ON d.child_id = c.id \
             LEFT JOIN jobs p ON p.id = d.parent_id \
             WHERE c.status = 'waiting' AND c.id > ? \
             AND (p.id IS NULL OR p.status IN ('succeeded', 'failed', 'cancelled')) \
             ORDER BY c.id LIMIT ?",
        )
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(limit as i64)
        .fetch_all(&mut *conn)
        .await?;
        let children = ids
            .iter()
            .map(|s| parse_id(s))
            .collect::<Result<Vec<_>, _>>()?;
        let before = cascade.moved.len();
        let cancelled = decide_waiting(&mut *conn, &children, now, cascade).await?;
        resolve(&mut *conn, cancelled, now, cascade).await?;
        let next = (children.len() == limit as usize)
            .then(|| children.last().copied())
            .flatten();
        Ok(((cascade.moved.len() - before) as u64, next))
    })
}

/// Moves one failed or cancelled job back, as [`crate::job::after_parents`] decides from its
/// parents now, and brings back its children cancelled for it.
fn retry_one<'a>(
    conn: Conn<'a>,
    id: JobId,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<RetryOutcome, StoreError>> {
    Box::pin(async move {
        let Some(job) = select_one(&mut *conn, id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        if !matches!(job.status, JobStatus::Failed | JobStatus::Cancelled) {
            return Ok(RetryOutcome::NotRetryable(job));
        }
        let found = statuses(&mut *conn, &job.depends_on).await?;
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
            "UPDATE jobs SET status = ?, result = NULL, error = NULL, \
             progress = 0, started_at = NULL, finished_at = NULL, scheduled_at = ?, \
             retried = retried + 1, owner = NULL, lease_until = NULL, \
             attempt_budget = COALESCE(attempt_budget, max_attempts), \
             max_attempts = attempt + COALESCE(attempt_budget, max_attempts) \
             WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING {COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(now.0)
            .bind(id.to_string())
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
    })
}

/// `parents` were retried: their children cancelled with `dependency_failed` are decided
/// again (back to waiting, mostly), and so on down the graph.
fn restore<'a>(
    conn: Conn<'a>,
    parents: Vec<JobId>,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(async move {
        let mut frontier = parents;
        while !frontier.is_empty() {
            let children = children_in(&mut *conn, &frontier, "cancelled").await?;
            frontier = Vec::new();
            if children.is_empty() {
                break;
            }
            for (child, decision) in decide(edges(&mut *conn, &children, "cancelled").await?) {
                let to = match decision {
                    AfterParents::Cancel(_) => continue,
                    d => d.status(),
                };
                let lane: Option<String> = sqlx::query_scalar(
                    "UPDATE jobs SET status = ?, error = NULL, progress = 0, \
                     started_at = NULL, finished_at = NULL, scheduled_at = MAX(scheduled_at, ?) \
                     WHERE id = ? AND status = 'cancelled' RETURNING executor",
                )
                .bind(to.as_str())
                .bind(now.0)
                .bind(child.to_string())
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
    })
}

/// Retries one job.
pub(super) fn retry<'a>(
    conn: Conn<'a>,
    id: JobId,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<RetryOutcome, StoreError>> {
    retry_one(conn, id, now, cascade)
}

/// Retries each of `ids` that can be (oldest first); answers the jobs retried.
pub(super) fn retry_many<'a>(
    conn: Conn<'a>,
    ids: Vec<JobId>,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<Vec<Job>, StoreError>> {
    Box::pin(async move {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let RetryOutcome::Retried(job) = retry_one(&mut *conn, id, now, cascade).await? {
                out.push(job);
            }
        }
        Ok(out)
    })
}

/// Cancels each of `ids` that is unfinished; answers each job cancelled and what it was.
pub(super) fn cancel_many<'a>(
    conn: Conn<'a>,
    ids: Vec<JobId>,
    now: Micros,
    cascade: &'a mut Cascade,
) -> BoxFuture<'a, Result<Vec<(Job, JobStatus)>, StoreError>> {
    Box::pin(async move {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let CancelOutcome::Cancelled { job, was } =
                super::sql::cancel(&mut *conn, id, now, cascade).await?
            {
                out.push((job, was));
            }
        }
        Ok(out)
    })
}

/// The results of `ids` that have one.
pub(super) fn results<'a>(
    conn: &'a sqlx::SqlitePool,
    ids: &'a [JobId],
) -> BoxFuture<'a, Result<Vec<Results>, StoreError>> {
    Box::pin(async move {
        let rows = sqlx::query(
            "SELECT id, result FROM jobs WHERE id IN (SELECT value FROM json_each(?)) \
             AND status = 'succeeded'",
        )
        .bind(ids_json(ids))
        .fetch_all(conn)
        .await?;
        let mut found: HashMap<JobId, Value> = HashMap::new();
        for row in rows {
            let id = parse_id(&row.try_get::<String, _>(0)?)?;
            let text: Option<String> = row.try_get(1)?;
            if let Some(t) = text {
                found.insert(
                    id,
                    serde_json::from_str(&t).map_err(|e| corrupt("result", e))?,
                );
            }
        }
        Ok(ids.iter().map(|id| (*id, found.remove(id))).collect())
    })
}
