//! The PostgreSQL statements for schedules. Each write that changes a schedule announces
//! `schedules` on the schema's channel in its own statement, so at its commit; a fire
//! announces its jobs' lanes (`new:<executor>`) as a submit does.
//!
//! Several servers fire the same schedule: each runs the guarded `UPDATE … WHERE next_run =
//! <what it read>`; the first takes the row's lock, and the others' updates wait for its
//! commit, then find `next_run` moved and change nothing (READ COMMITTED re-checks the row).

use crate::store::graph::NewRow;
use std::collections::HashSet;

use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;

use super::notify::Notices;
use super::sql::{corrupt, insert_rows, job_from_row, COLUMNS};
use crate::clock::Micros;
use crate::job::{Job, NewJob};
use crate::schedule::{key_range, Schedule};
use crate::store::{untaken, Fire, StoreError};

const SCHEDULE_COLUMNS: &str = "name, cron, timezone, job::text AS job, catch_up, paused, \
    next_run, last_tick, last_error, created_at, updated_at";

fn schedule_from_row(row: &PgRow) -> Result<Schedule, StoreError> {
    Ok(Schedule {
        name: row.try_get("name")?,
        cron: row.try_get("cron")?,
        timezone: row.try_get("timezone")?,
        job: serde_json::from_str(&row.try_get::<String, _>("job")?)
            .map_err(|e| corrupt("schedule job", e))?,
        catch_up: row
            .try_get::<String, _>("catch_up")?
            .parse()
            .map_err(|e| corrupt("catch_up", e))?,
        paused: row.try_get("paused")?,
        next_run: Micros(row.try_get("next_run")?),
        last_tick: row.try_get::<Option<i64>, _>("last_tick")?.map(Micros),
        last_error: row.try_get("last_error")?,
        created_at: Micros(row.try_get("created_at")?),
        updated_at: Micros(row.try_get("updated_at")?),
    })
}

pub(super) async fn get(pool: &PgPool, name: &str) -> Result<Option<Schedule>, StoreError> {
    let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = $1");
    let row = sqlx::query(&sql).bind(name).fetch_optional(pool).await?;
    row.as_ref().map(schedule_from_row).transpose()
}

pub(super) async fn list(
    pool: &PgPool,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Schedule>, StoreError> {
    // Byte order, as on SQLite, whatever the database's collation.
    let sql = format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name COLLATE \"C\" > $1 \
         ORDER BY name COLLATE \"C\" LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(after.unwrap_or(""))
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    rows.iter().map(schedule_from_row).collect()
}

pub(super) async fn next(pool: &PgPool, limit: u32) -> Result<Vec<Schedule>, StoreError> {
    let sql = format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE NOT paused ORDER BY next_run LIMIT $1"
    );
    let rows = sqlx::query(&sql).bind(limit as i64).fetch_all(pool).await?;
    rows.iter().map(schedule_from_row).collect()
}

pub(super) async fn jobs(pool: &PgPool, name: &str, limit: u32) -> Result<Vec<Job>, StoreError> {
    let (from, to) = key_range(name);
    // The LIKE is the partial index's predicate, word for word, so the planner uses it.
    let sql = format!(
        "SELECT {COLUMNS} FROM jobs WHERE idempotency_key LIKE 'schedule:%' \
         AND (idempotency_key COLLATE \"C\") >= $1 AND (idempotency_key COLLATE \"C\") < $2 \
         ORDER BY (idempotency_key COLLATE \"C\") DESC LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(from)
        .bind(to)
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    rows.iter().map(job_from_row).collect()
}

pub(super) async fn create(pool: &PgPool, channel: &str, s: Schedule) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "WITH added AS (INSERT INTO schedules (name, cron, timezone, job, catch_up, paused, \
         next_run, last_tick, last_error, created_at, updated_at) \
         VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (name) DO NOTHING RETURNING name) \
         SELECT pg_notify($12, 'schedules')::text FROM added",
    )
    .bind(&s.name)
    .bind(&s.cron)
    .bind(&s.timezone)
    .bind(s.job.to_string())
    .bind(s.catch_up.as_str())
    .bind(s.paused)
    .bind(s.next_run.0)
    .bind(s.last_tick.map(|t| t.0))
    .bind(&s.last_error)
    .bind(s.created_at.0)
    .bind(s.updated_at.0)
    .bind(channel)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

/// Pauses (`resume` `None`) or resumes (due next at `resume`) a schedule, if it is not so
/// already; the schedule as it is after.
pub(super) async fn set_paused(
    pool: &PgPool,
    channel: &str,
    name: &str,
    resume: Option<Micros>,
    now: Micros,
) -> Result<Option<Schedule>, StoreError> {
    sqlx::query(
        "WITH moved AS (UPDATE schedules SET paused = $1, \
         next_run = COALESCE($2, next_run), updated_at = $3 \
         WHERE name = $4 AND paused <> $1 RETURNING name) \
         SELECT pg_notify($5, 'schedules')::text FROM moved",
    )
    .bind(resume.is_none())
    .bind(resume.map(|t| t.0))
    .bind(now.0)
    .bind(name)
    .bind(channel)
    .fetch_optional(pool)
    .await?;
    get(pool, name).await
}

pub(super) async fn delete(pool: &PgPool, channel: &str, name: &str) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "WITH gone AS (DELETE FROM schedules WHERE name = $1 RETURNING name) \
         SELECT pg_notify($2, 'schedules')::text FROM gone",
    )
    .bind(name)
    .bind(channel)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

/// A wake-up, in one transaction: the guarded move of `next_run`, then the jobs whose keys
/// are not stored yet; `None` when the guard refused.
pub(super) async fn fire(
    pool: &PgPool,
    channel: &str,
    origin: &str,
    fire: Fire,
) -> Result<Option<Vec<Job>>, StoreError> {
    let mut tx = pool.begin().await?;
    let moved = sqlx::query(
        "UPDATE schedules SET next_run = $1, last_tick = $2, last_error = $3, updated_at = $4 \
         WHERE name = $5 AND next_run = $6 AND NOT paused",
    )
    .bind(fire.next_run.0)
    .bind(fire.last_tick.map(|t| t.0))
    .bind(&fire.error)
    .bind(fire.now.0)
    .bind(&fire.name)
    .bind(fire.expected.0)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() == 0 {
        return Ok(None);
    }
    let keys: Vec<String> = fire
        .jobs
        .iter()
        .filter_map(|j| j.idempotency_key.clone())
        .collect();
    let taken: HashSet<String> = if keys.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar("SELECT idempotency_key FROM jobs WHERE idempotency_key = ANY($1)")
            .bind(keys)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
    };
    let fresh: Vec<&NewJob> = untaken(&fire.jobs, &taken);
    // A tick's job has no parents (a schedule's spec cannot name any): queued.
    let rows: Vec<NewRow> = fresh.iter().map(|j| NewRow::queued(j)).collect();
    insert_rows(&mut tx, &rows).await?;
    // Counted here by the ticker (`Dispatcher::stored`); other servers add the counts.
    let mut notices = Notices::default();
    for j in &fresh {
        *notices.new.entry(j.executor).or_default() += 1;
    }
    notices.changed = fresh.iter().map(|j| j.id).collect();
    notices.send(&mut tx, channel, origin).await?;
    tx.commit().await?;
    Ok(Some(fresh.iter().map(|j| j.to_job()).collect()))
}
