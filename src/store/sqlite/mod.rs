//! The SQLite store: one writer task that commits many changes per transaction
//! ([`writer`]), the statements themselves ([`sql`]), and a small pool of connections for
//! reads.
//!
//! SQLite allows one writer at a time, and the cost of a write is mostly the commit (an fsync
//! with `synchronous=FULL`). So every write goes through one task that takes whatever requests
//! are waiting, runs them in one transaction and answers each caller only after the commit
//! (group commit). Claims are writes too, so a lane's claim rides the same commit as the
//! submits and finishes around it. Reads go to a separate pool and see every committed write
//! (WAL mode). Only this process uses the file (the data-dir lock), so the store is
//! `exclusive`.

mod flow;
mod graph;
mod schedules;
mod sql;
mod writer;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    flow_keys, BlobDeleteOutcome, CallbackOutcome, CancelOutcome, Claimed, ClaimedCallbacks,
    DeleteOutcome, Expired, Expiry, Fire, Inserted, JobStore, Lease, ListFilter, Notice,
    RetryOutcome, ServerBeat, ServerInfo, Settle, StoreError,
};
use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::config::Durability;
use crate::flow::{FlowState, FlowStats, Sharing};
use crate::job::{ExecutorKind, Job, JobId, JobStatus, NewJob};
use crate::schedule::Schedule;
use sql::{job_from_row, COLUMNS};
use writer::{Op, MAX_BATCH};

/// The migrations, compiled into the binary so it runs from anywhere.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "jobs",
        include_str!("../../../migrations/sqlite/0001_jobs.sql"),
    ),
    (
        2,
        "blobs",
        include_str!("../../../migrations/sqlite/0002_blobs.sql"),
    ),
    (
        3,
        "blob_retention",
        include_str!("../../../migrations/sqlite/0003_blob_retention.sql"),
    ),
    (
        4,
        "blob_origin",
        include_str!("../../../migrations/sqlite/0004_blob_origin.sql"),
    ),
    (
        5,
        "store_is_queue",
        include_str!("../../../migrations/sqlite/0005_store_is_queue.sql"),
    ),
    (
        7,
        "servers",
        include_str!("../../../migrations/sqlite/0007_servers.sql"),
    ),
    (
        8,
        "dependencies",
        include_str!("../../../migrations/sqlite/0008_dependencies.sql"),
    ),
    (
        9,
        "schedules",
        include_str!("../../../migrations/sqlite/0009_schedules.sql"),
    ),
    (
        10,
        "callbacks",
        include_str!("../../../migrations/sqlite/0010_callbacks.sql"),
    ),
    (
        11,
        "flow_control",
        include_str!("../../../migrations/sqlite/0011_flow_control.sql"),
    ),
    (
        12,
        "retry_budget",
        include_str!("../../../migrations/sqlite/0012_retry_budget.sql"),
    ),
];

/// Where the writer sends its notices once a commit is done: set by [`JobStore::listen`].
pub(crate) type NoticeTx = Arc<Mutex<Option<mpsc::UnboundedSender<Notice>>>>;

pub struct SqliteStore {
    writer: mpsc::Sender<Op>,
    reads: SqlitePool,
    notices: NoticeTx,
    /// Tenants' weights and each lane's round-robin state, for flow-aware claims.
    sharing: Arc<Sharing>,
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
        let notices = NoticeTx::default();
        tokio::spawn(writer::run(conn, rx, notices.clone()));
        Ok(SqliteStore {
            writer: tx,
            reads,
            notices,
            sharing: Arc::default(),
        })
    }

    /// Shares lanes between tenants by these weights (a tenant not named weighs 1).
    pub fn with_tenant_weights(mut self, weights: impl IntoIterator<Item = (String, u32)>) -> Self {
        self.sharing = Arc::new(Sharing::new(weights));
        self
    }

    /// Hands an op to the writer and waits for its answer, which comes after the commit.
    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Lays the outbox rows over the jobs that have a callback (one read, none without).
    async fn with_callbacks(&self, jobs: &mut [Job]) -> Result<(), StoreError> {
        let ids: Vec<JobId> = jobs
            .iter()
            .filter(|j| j.callback.is_some())
            .map(|j| j.id)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let rows = sql::callback_rows(&self.reads, &ids).await?;
        super::lay_callbacks(jobs, rows)
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    fn exclusive(&self) -> bool {
        true
    }

    async fn listen(&self) -> Result<mpsc::UnboundedReceiver<Notice>, StoreError> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.notices.lock().expect("notice lock") = Some(tx);
        Ok(rx)
    }

    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, StoreError> {
        self.write(|reply| Op::Insert { jobs, reply }).await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await?;
        let Some(job) = row.as_ref().map(job_from_row).transpose()? else {
            return Ok(None);
        };
        let mut jobs = [job];
        self.with_callbacks(&mut jobs).await?;
        let [job] = jobs;
        Ok(Some(job))
    }

    async fn get_many(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        // Within SQLite's limit on bound parameters.
        for chunk in ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id IN ({marks})");
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for row in q.fetch_all(&self.reads).await? {
                out.push(job_from_row(&row)?);
            }
        }
        self.with_callbacks(&mut out).await?;
        Ok(out)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let statuses: Vec<JobStatus> = filter.status.into_iter().collect();
        let (cond, binds) = sql::filter_where(filter, &statuses);
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE {cond} ORDER BY id DESC LIMIT ?");
        let rows = sql::bind_all(sqlx::query(&sql), binds)
            .bind(filter.limit as i64)
            .fetch_all(&self.reads)
            .await?;
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.with_callbacks(&mut jobs).await?;
        Ok(jobs)
    }

    async fn claim(
        &self,
        lane: ExecutorKind,
        limit: u32,
        now: Micros,
        lease: &Lease,
    ) -> Result<Claimed, StoreError> {
        let lease = lease.clone();
        let sharing = self.sharing.clone();
        self.write(|reply| Op::Claim {
            lane,
            limit,
            now,
            lease,
            sharing,
            reply,
        })
        .await
    }

    async fn settle(&self, moves: Vec<Settle>) -> Result<Vec<Option<Job>>, StoreError> {
        for m in &moves {
            m.check()?;
        }
        self.write(|reply| Op::Settle { moves, reply }).await
    }

    async fn cancel(&self, id: JobId, now: Micros) -> Result<CancelOutcome, StoreError> {
        self.write(|reply| Op::Cancel { id, now, reply }).await
    }

    async fn delete(&self, id: JobId) -> Result<DeleteOutcome, StoreError> {
        self.write(|reply| Op::Delete { id, reply }).await
    }

    async fn renew(
        &self,
        owner: &str,
        running: &[(JobId, u32)],
        ttl: Duration,
    ) -> Result<Vec<(JobId, u32)>, StoreError> {
        let owner = owner.to_string();
        let running = running.to_vec();
        self.write(|reply| Op::Renew {
            owner,
            running,
            ttl,
            reply,
        })
        .await
    }

    async fn expired(&self, which: Expiry, limit: u32) -> Result<Expired, StoreError> {
        // One machine: the process's clock is the store's clock.
        let before = match which {
            Expiry::Lapsed => Micros::now(),
            Expiry::All => Micros(i64::MAX),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = 'running' \
             AND (lease_until IS NULL OR lease_until < ?) LIMIT ?"
        );
        let rows = sqlx::query(&sql)
            .bind(before.0)
            .bind(limit as i64)
            .fetch_all(&self.reads)
            .await?;
        Ok(Expired {
            jobs: rows.iter().map(job_from_row).collect::<Result<_, _>>()?,
            before,
        })
    }

    async fn flow_state(
        &self,
        concurrency_keys: &[String],
        rate_keys: &[String],
    ) -> Result<FlowState, StoreError> {
        let keys = flow_keys(concurrency_keys, rate_keys);
        if keys.is_empty() {
            return Ok(FlowState::default());
        }
        let mut conn = self.reads.acquire().await?;
        flow::read_flow_state(&mut conn, &keys).await
    }

    async fn flow_stats(&self, top: usize) -> Result<FlowStats, StoreError> {
        let mut conn = self.reads.acquire().await?;
        // One pass over the flow index (queued) and the running rows, never over plain
        // queued or finished jobs: a lane without flow control pays nothing here.
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(&super::flow::counts_sql(
            "1",
            "jobs INDEXED BY jobs_flow_ready",
        ))
        .fetch_all(&mut *conn)
        .await?;
        super::flow::stats_from_rows(rows, top)
    }

    async fn queued_counts(&self) -> Result<Vec<(ExecutorKind, u64)>, StoreError> {
        let rows = sqlx::query_as(
            // Counted off the small partial index, already in executor order.
            "SELECT executor, COUNT(*) AS n FROM jobs INDEXED BY jobs_due \
             WHERE status = 'queued' GROUP BY executor",
        )
        .fetch_all(&self.reads)
        .await?;
        super::lane_counts(rows)
    }

    async fn prune(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
        self.write(|reply| Op::Prune {
            before,
            limit,
            reply,
        })
        .await
    }

    async fn insert_blob(&self, meta: BlobMeta) -> Result<(), StoreError> {
        self.write(|reply| Op::InsertBlob { meta, reply }).await
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

    async fn known_blobs(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = format!("SELECT id FROM blobs WHERE id IN ({marks})");
            let mut q = sqlx::query_scalar(&sql);
            for id in chunk {
                q = q.bind(id);
            }
            out.extend(q.fetch_all(&self.reads).await?);
        }
        Ok(out)
    }

    async fn delete_blob(&self, id: &str) -> Result<BlobDeleteOutcome, StoreError> {
        let id = id.to_string();
        self.write(|reply| Op::DeleteBlob { id, reply }).await
    }

    async fn prune_blobs(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        self.write(|reply| Op::PruneBlobs { limit, reply }).await
    }

    async fn beat(&self, beat: &ServerBeat) -> Result<(), StoreError> {
        let beat = beat.clone();
        self.write(|reply| Op::Beat { beat, reply }).await
    }

    async fn servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, address, started_at, heartbeat_at, lanes FROM servers \
             ORDER BY started_at, id",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ServerInfo {
                    id: r.try_get("id")?,
                    address: r.try_get("address")?,
                    started_at: Micros(r.try_get("started_at")?),
                    heartbeat_at: Micros(r.try_get("heartbeat_at")?),
                    lanes: serde_json::from_str(&r.try_get::<String, _>("lanes")?)
                        .map_err(|e| super::corrupt("lanes", e))?,
                })
            })
            .collect()
    }

    async fn forget_servers(&self, silent: Duration) -> Result<u64, StoreError> {
        self.write(|reply| Op::ForgetServers { silent, reply })
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }

    async fn create_schedule(&self, schedule: Schedule) -> Result<bool, StoreError> {
        self.write(|reply| Op::CreateSchedule { schedule, reply })
            .await
    }

    async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>, StoreError> {
        schedules::get(&self.reads, name).await
    }

    async fn list_schedules(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        schedules::list(&self.reads, after, limit).await
    }

    async fn next_schedules(&self, limit: u32) -> Result<Vec<Schedule>, StoreError> {
        schedules::next(&self.reads, limit).await
    }

    async fn pause_schedule(
        &self,
        name: &str,
        now: Micros,
    ) -> Result<Option<Schedule>, StoreError> {
        let name = name.to_string();
        self.write(|reply| Op::SetPaused {
            name,
            resume: None,
            now,
            reply,
        })
        .await
    }

    async fn resume_schedule(
        &self,
        name: &str,
        next_run: Micros,
        now: Micros,
    ) -> Result<Option<Schedule>, StoreError> {
        let name = name.to_string();
        self.write(|reply| Op::SetPaused {
            name,
            resume: Some(next_run),
            now,
            reply,
        })
        .await
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(|reply| Op::DeleteSchedule { name, reply }).await
    }

    async fn fire_schedule(&self, fire: Fire) -> Result<Option<Vec<Job>>, StoreError> {
        self.write(|reply| Op::FireSchedule { fire, reply }).await
    }

    async fn schedule_jobs(&self, name: &str, limit: u32) -> Result<Vec<Job>, StoreError> {
        let mut jobs = schedules::jobs(&self.reads, name, limit).await?;
        self.with_callbacks(&mut jobs).await?;
        Ok(jobs)
    }

    async fn claim_callbacks(
        &self,
        limit: u32,
        now: Micros,
        until: Micros,
    ) -> Result<ClaimedCallbacks, StoreError> {
        self.write(|reply| Op::ClaimCallbacks {
            limit,
            now,
            until,
            reply,
        })
        .await
    }

    async fn record_callback(
        &self,
        job: JobId,
        attempt: u32,
        outcome: CallbackOutcome,
        now: Micros,
    ) -> Result<bool, StoreError> {
        self.write(|reply| Op::RecordCallback {
            job,
            attempt,
            outcome,
            now,
            reply,
        })
        .await
    }

    async fn children(&self, id: JobId) -> Result<Vec<JobId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT child_id FROM job_deps WHERE parent_id = ? ORDER BY child_id",
        )
        .bind(id.to_string())
        .fetch_all(&self.reads)
        .await?;
        ids.iter()
            .map(|s| s.parse().map_err(|e| super::corrupt("id", e)))
            .collect()
    }

    async fn results(
        &self,
        ids: &[JobId],
    ) -> Result<Vec<(JobId, Option<serde_json::Value>)>, StoreError> {
        graph::results(&self.reads, ids).await
    }

    async fn retry(&self, id: JobId, now: Micros) -> Result<RetryOutcome, StoreError> {
        self.write(|reply| Op::Retry { id, now, reply }).await
    }

    async fn retry_matching(
        &self,
        filter: &ListFilter,
        statuses: &[JobStatus],
        now: Micros,
    ) -> Result<Vec<Job>, StoreError> {
        let (filter, statuses) = (filter.clone(), statuses.to_vec());
        self.write(|reply| Op::RetryMatching {
            filter,
            statuses,
            now,
            reply,
        })
        .await
    }

    async fn cancel_matching(
        &self,
        filter: &ListFilter,
        statuses: &[JobStatus],
        now: Micros,
    ) -> Result<Vec<(Job, JobStatus)>, StoreError> {
        let (filter, statuses) = (filter.clone(), statuses.to_vec());
        self.write(|reply| Op::CancelMatching {
            filter,
            statuses,
            now,
            reply,
        })
        .await
    }

    async fn resolve_waiting(
        &self,
        after: Option<JobId>,
        limit: u32,
        now: Micros,
    ) -> Result<(u64, Option<JobId>), StoreError> {
        self.write(|reply| Op::ResolveWaiting {
            after,
            limit,
            now,
            reply,
        })
        .await
    }
}
