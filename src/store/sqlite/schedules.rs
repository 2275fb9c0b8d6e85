//! The SQLite statements for schedules: reads on the read pool, writes on the writer's
//! connection (inside its transaction, see `writer.rs`).

use crate::store::graph::NewRow;
use std::collections::HashSet;

use futures_util::future::BoxFuture;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::Row;

use super::sql::{corrupt, insert_rows, job_from_row, COLUMNS};
use crate::clock::Micros;
use crate::job::{ExecutorKind, Job, NewJob};
use crate::schedule::{key_range, Schedule};
use crate::store::{untaken, Fire, StoreError};

type Conn<'a> = &'a mut SqliteConnection;

const SCHEDULE_COLUMNS: &str = "name, cron, timezone, job, catch_up, paused, next_run, \
    last_tick, last_error, created_at, updated_at";

fn schedule_from_row(row: &SqliteRow) -> Result<Schedule, StoreError> {
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
        paused: row.try_get::<i64, _>("paused")? != 0,
        next_run: Micros(row.try_get("next_run")?),
        last_tick: row.try_get::<Option<i64>, _>("last_tick")?.map(Micros),
        last_error: row.try_get("last_error")?,
        created_at: Micros(row.try_get("created_at")?),
        updated_at: Micros(row.try_get("updated_at")?),
    })
}

pub(super) async fn get(pool: &SqlitePool, name: &str) -> Result<Option<Schedule>, StoreError> {
    let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?");
    let row = sqlx::query(&sql).bind(name).fetch_optional(pool).await?;
    row.as_ref().map(schedule_from_row).transpose()
}

pub(super) async fn list(
    pool: &SqlitePool,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<Schedule>, StoreError> {
    let sql =
        format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name > ? ORDER BY name LIMIT ?");
    let rows = sqlx::query(&sql)
        .bind(after.unwrap_or(""))
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    rows.iter().map(schedule_from_row).collect()
}

pub(super) async fn next(pool: &SqlitePool, limit: u32) -> Result<Vec<Schedule>, StoreError> {
    let sql = format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE paused = 0 ORDER BY next_run LIMIT ?"
    );
    let rows = sqlx::query(&sql).bind(limit as i64).fetch_all(pool).await?;
    rows.iter().map(schedule_from_row).collect()
}

pub(super) async fn jobs(
    pool: &SqlitePool,
    name: &str,
    limit: u32,
) -> Result<Vec<Job>, StoreError> {
    let (from, to) = key_range(name);
    let sql = format!(
        "SELECT {COLUMNS} FROM jobs WHERE idempotency_key >= ? AND idempotency_key < ? \
         ORDER BY idempotency_key DESC LIMIT ?"
    );
    let rows = sqlx::query(&sql)
        .bind(from)
        .bind(to)
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    rows.iter().map(job_from_row).collect()
}

fn select_one<'a>(
    conn: Conn<'a>,
    name: &'a str,
) -> BoxFuture<'a, Result<Option<Schedule>, StoreError>> {
    Box::pin(async move {
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?;
        row.as_ref().map(schedule_from_row).transpose()
    })
}

pub(super) fn create(conn: Conn<'_>, s: Schedule) -> BoxFuture<'_, Result<bool, StoreError>> {
    Box::pin(async move {
        let done = sqlx::query(
            "INSERT INTO schedules (name, cron, timezone, job, catch_up, paused, next_run, \
             last_tick, last_error, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&s.name)
        .bind(&s.cron)
        .bind(&s.timezone)
        .bind(s.job.to_string())
        .bind(s.catch_up.as_str())
        .bind(s.paused as i64)
        .bind(s.next_run.0)
        .bind(s.last_tick.map(|t| t.0))
        .bind(&s.last_error)
        .bind(s.created_at.0)
        .bind(s.updated_at.0)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// Pauses (`resume` `None`) or resumes (due next at `resume`) a schedule, if it is not so
/// already; the schedule as it is after.
pub(super) fn set_paused<'a>(
    conn: Conn<'a>,
    name: &'a str,
    resume: Option<Micros>,
    now: Micros,
) -> BoxFuture<'a, Result<Option<Schedule>, StoreError>> {
    Box::pin(async move {
        match resume {
            None => {
                sqlx::query(
                    "UPDATE schedules SET paused = 1, updated_at = ? WHERE name = ? AND paused = 0",
                )
                .bind(now.0)
                .bind(name)
                .execute(&mut *conn)
                .await?;
            }
            Some(next_run) => {
                sqlx::query(
                    "UPDATE schedules SET paused = 0, next_run = ?, updated_at = ? \
                     WHERE name = ? AND paused = 1",
                )
                .bind(next_run.0)
                .bind(now.0)
                .bind(name)
                .execute(&mut *conn)
                .await?;
            }
        }
        select_one(conn, name).await
    })
}

pub(super) fn delete<'a>(conn: Conn<'a>, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
    Box::pin(async move {
        let done = sqlx::query("DELETE FROM schedules WHERE name = ?")
            .bind(name)
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    })
}

/// A wake-up: the guarded move of `next_run`, then the jobs whose keys are not stored yet.
/// Answers the jobs stored and the lanes they went to, or `None` when the guard refused.
#[allow(clippy::type_complexity)]
pub(super) fn fire(
    conn: Conn<'_>,
    fire: Fire,
) -> BoxFuture<'_, Result<Option<(Vec<Job>, HashSet<ExecutorKind>)>, StoreError>> {
    Box::pin(async move {
        let moved = sqlx::query(
            "UPDATE schedules SET next_run = ?, last_tick = ?, last_error = ?, updated_at = ? \
             WHERE name = ? AND next_run = ? AND paused = 0",
        )
        .bind(fire.next_run.0)
        .bind(fire.last_tick.map(|t| t.0))
        .bind(&fire.error)
        .bind(fire.now.0)
        .bind(&fire.name)
        .bind(fire.expected.0)
        .execute(&mut *conn)
        .await?;
        if moved.rows_affected() == 0 {
            return Ok(None);
        }
        let keys: Vec<&str> = fire
            .jobs
            .iter()
            .filter_map(|j| j.idempotency_key.as_deref())
            .collect();
        let mut taken = HashSet::new();
        for chunk in keys.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql =
                format!("SELECT idempotency_key FROM jobs WHERE idempotency_key IN ({marks})");
            let mut q = sqlx::query_scalar::<_, String>(&sql);
            for k in chunk {
                q = q.bind(*k);
            }
            taken.extend(q.fetch_all(&mut *conn).await?);
        }
        let fresh: Vec<&NewJob> = untaken(&fire.jobs, &taken);
        // A tick's job has no parents (a schedule's spec cannot name any): queued.
        let rows: Vec<NewRow> = fresh.iter().map(|j| NewRow::queued(j)).collect();
        insert_rows(&mut *conn, &rows).await?;
        let lanes = fresh.iter().map(|j| j.executor).collect();
        Ok(Some((fresh.iter().map(|j| j.to_job()).collect(), lanes)))
    })
}
