//! The queue's hot path on PostgreSQL, and its upkeep: claims (the plain statement, the
//! probe after a partial claim, and the flow-aware claim's transaction), the connections they
//! run on, and the vacuum a server runs where autovacuum does not.
//!
//! **Plans that do not depend on statistics.** A queue table's statistics are a snapshot of
//! one moment (often an empty queue, or a full one), so the planner may believe one job runs
//! when 10,000 do, or that a lane's backlog is a row. Left to itself it then reads a whole
//! backlog through another index and sorts it once per claim, scans the table for a probe it
//! expects to end at once, or joins a list of ids to "the running jobs" in a nested loop that
//! grows with both (17 s for one lease renewal, its rows locked throughout). So:
//!
//! - claims run on connections of their own ([`claim_pool`]) with `enable_sort` and
//!   `enable_seqscan` off: their order can only come from the lane's index (a scan or sort a
//!   statement cannot do without still runs);
//! - a status test beside a list of ids (settles, renewals, the cascades of dependencies, a
//!   flow claim's start) is written as a column of the list (`jobs.status = v.was_status`, a
//!   join clause) or as `status || '' = …` (a filter no index serves): the rows are reached by
//!   id and the status checked on each;
//! - the server's own vacuum ([`tidy`]) does not analyze.
//!
//! **Dead entries.** Every job passes through the queue's partial indexes and leaves a dead
//! entry in each until a vacuum removes it; claims walk those entries. Migration 0013 asks
//! autovacuum to vacuum `jobs` every 10,000 changed rows; where autovacuum is off, [`tidy`]
//! does it.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::flow::Facts;
use super::sql::{job_from_row, micros, qualified, DB_NOW};
use crate::clock::Micros;
use crate::flow::Sharing;
use crate::job::ExecutorKind;
use crate::store::{Claimed, Lease, StoreError};

/// One per lane: each lane claims one batch at a time.
pub(super) const CLAIM_CONNECTIONS: u32 = ExecutorKind::ALL.len() as u32;

/// Dead row versions in `jobs` past which [`tidy`] vacuums it, where autovacuum does not (the
/// same threshold migration 0013 gives autovacuum).
const VACUUM_AFTER_DEAD: i64 = 10_000;

/// The claims' connections, planned only through indexes and without sorts. Set after
/// connecting, not as startup options, which some poolers refuse.
pub(super) async fn claim_pool(options: PgConnectOptions) -> Result<PgPool, StoreError> {
    Ok(PgPoolOptions::new()
        .max_connections(CLAIM_CONNECTIONS)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET enable_sort = off")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("SET enable_seqscan = off")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await?)
}

/// Claims up to `limit` due jobs of `lane`: the plain statement, then, where flow-controlled
/// jobs are queued, the flow-aware claim in a transaction of its own.
pub(super) async fn claim(
    claims: &PgPool,
    sharing: &Sharing,
    lane: ExecutorKind,
    limit: u32,
    now: Micros,
    lease: &Lease,
) -> Result<Claimed, StoreError> {
    // SKIP LOCKED: servers claiming at the same moment take different rows instead of
    // queueing behind each other's locks.
    // The rows are picked in a CTE, which PostgreSQL runs once: an `IN (subquery …
    // LIMIT … SKIP LOCKED)` may be re-run by the planner and update more rows than LIMIT.
    // The NOT EXISTS probes the (usually empty) flow index once: with flow-controlled jobs
    // queued, the plain statement takes nothing and the flow-aware claim decides.
    let sql = format!(
        "WITH picked AS (SELECT id FROM jobs WHERE status = 'queued' AND NOT flow \
         AND executor = $4 AND scheduled_at <= $1 AND attempt < max_attempts \
         AND NOT EXISTS (SELECT 1 FROM jobs f WHERE f.status = 'queued' AND f.flow \
         AND f.executor = $4) \
         ORDER BY priority DESC, scheduled_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) \
         UPDATE jobs SET status = 'running', attempt = attempt + 1, started_at = $1, \
         progress = 0, owner = $2, lease_until = {DB_NOW} + $3 FROM picked \
         WHERE jobs.id = picked.id RETURNING {}",
        qualified()
    );
    let rows = sqlx::query(&sql)
        .bind(now.0)
        .bind(&lease.owner)
        .bind(micros(lease.ttl))
        .bind(lane.as_str())
        .bind(limit as i64)
        .fetch_all(claims)
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
    // Each at the head of a range of `jobs_due` (executor, flow, scheduled_at); the next
    // due time only without flow-controlled jobs (the flow-aware claim finds its own),
    // and only of jobs not yet due: a due job this claim did not take is another claim's
    // (locked), and the range past `now` skips the entries of jobs claimed long ago that
    // only a vacuum removes.
    let (flow, at): (bool, Option<i64>) = sqlx::query_as(
        "SELECT f, CASE WHEN NOT f THEN (SELECT scheduled_at FROM jobs \
         WHERE status = 'queued' AND executor = $1 AND NOT flow AND scheduled_at > $2 \
         ORDER BY scheduled_at LIMIT 1) END \
         FROM (SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND executor = $1 \
         AND flow) AS f) AS probe",
    )
    .bind(lane.as_str())
    .bind(now.0)
    .fetch_one(claims)
    .await?;
    if !flow {
        return Ok(Claimed {
            jobs,
            next_due: at.map(Micros),
        });
    }
    let left = limit - jobs.len() as u32;
    let mut tx = claims.begin().await?;
    let mut facts = Facts { conn: &mut tx };
    let more = crate::store::flow::flow_claim(&mut facts, sharing, lane, left, now, lease).await?;
    tx.commit().await?;
    jobs.extend(more.jobs);
    Ok(Claimed {
        jobs,
        next_due: more.next_due,
    })
}

/// Vacuums `jobs` where autovacuum is off (the cluster's setting, or the table's) and enough
/// rows are dead; answers whether it did.
pub(super) async fn tidy(pool: &PgPool) -> Result<bool, StoreError> {
    // Every job leaves dead entries in the queue's partial indexes, which each claim walks
    // until a vacuum removes them: on a database whose autovacuum is off (a cluster's
    // setting, or the table's), a busy queue's claims slow down by the minute.
    let (off, dead): (bool, i64) = sqlx::query_as(
        "SELECT NOT current_setting('autovacuum')::bool \
         OR COALESCE(c.reloptions && ARRAY['autovacuum_enabled=false', \
         'autovacuum_enabled=off', 'autovacuum_enabled=0', 'autovacuum_enabled=no'], false), \
         COALESCE(s.n_dead_tup, 0) FROM pg_class c \
         LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
         WHERE c.oid = 'jobs'::regclass",
    )
    .fetch_one(pool)
    .await?;
    if !off || dead < VACUUM_AFTER_DEAD {
        return Ok(false);
    }
    // Outside any transaction (the simple protocol); a server that finds another's
    // vacuum running skips its own. No ANALYZE: statistics taken at one moment of a
    // queue mislead the planner at the next (a join planned for "no job waiting" ran at
    // a third of the speed once jobs waited).
    sqlx::raw_sql("VACUUM (SKIP_LOCKED) jobs")
        .execute(pool)
        .await?;
    Ok(true)
}
