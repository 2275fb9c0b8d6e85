//! The PostgreSQL store: the same `JobStore` contract as SQLite, passing the same conformance
//! suite (`tests/api/store.rs`), and shared by several servers: jobs are claimed with
//! `FOR UPDATE SKIP LOCKED`, running jobs hold leases, and each write announces what it did on
//! the schema's channel, inside its own transaction (so at its commit).
//!
//! Layout: this file opens the store and implements the trait; `sql.rs` holds the statements,
//! `notify.rs` the notifications; `batcher.rs` is the task that writes the hot path (submits without
//! idempotency keys, and settles) many calls per transaction, as the SQLite writer does. The
//! rarer writes (keyed submits, claims, cancels, renewals, deletes, maintenance) stay one
//! statement or one transaction on the shared pool. Every move is guarded in SQL by the status
//! it moves from and, for a running job, its attempt, exactly as in SQLite.
//!
//! Notifications (`offload_<schema>`): `new:<origin>:<executor>=<n>,...` once per write with
//! how many jobs each lane got queued (servers add the others' counts to their own, for
//! admission and `/v1/stats`), `cancel:<id>` for a cancelled running job,
//! `change:<origin>:<id>,<id>,...` for jobs whose state changed (submits, settles, cancels,
//! retries, bulk cancels and retries), `blobdel:<id>,...` for deleted blobs. `<origin>` names
//! the sending store, so a server skips its own changes. What a cascade moved (children of a
//! job made final or retried: queued, back to waiting, cancelled for a parent) goes out as
//! `new:*:...` and `change:*:...`, which every server acts on, the sender too: no server
//! counted or published those jobs itself. Claims and lease renewals announce nothing.
//!
//! Leases are stamped and compared with the database's clock (`sql::DB_NOW`), never a
//! server's.

mod batcher;
mod notify;

use self::notify::Notices;
mod flow;
mod graph;
mod queue;
mod schedules;
mod sql;

use std::collections::HashMap;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use self::sql::{
    corrupt, insert_rows, is_unique_violation, job_from_row, maintenance_leader, COLUMNS, DB_NOW,
};
use super::graph::Cascade;
use super::{
    BlobDeleteOutcome, CallbackOutcome, CancelOutcome, Claimed, ClaimedCallbacks, DeleteOutcome,
    Delivery, Expired, Expiry, Fire, Inserted, JobStore, KeyedSubmit, Lease, ListFilter, Notice,
    RetryOutcome, ServerBeat, ServerInfo, Settle, StoreError,
};
use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::flow::{FlowState, FlowStats, Sharing};
use crate::job::{ExecutorKind, Job, JobId, JobStatus, NewJob};
use crate::schedule::Schedule;

/// The migrations, compiled into the binary.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "jobs",
        include_str!("../../../migrations/postgres/0001_jobs.sql"),
    ),
    (
        2,
        "blob_retention",
        include_str!("../../../migrations/postgres/0002_blob_retention.sql"),
    ),
    (
        3,
        "cluster",
        include_str!("../../../migrations/postgres/0003_cluster.sql"),
    ),
    (
        4,
        "blob_origin",
        include_str!("../../../migrations/postgres/0004_blob_origin.sql"),
    ),
    (
        5,
        "store_is_queue",
        include_str!("../../../migrations/postgres/0005_store_is_queue.sql"),
    ),
    (
        6,
        "notify_per_round",
        include_str!("../../../migrations/postgres/0006_notify_per_round.sql"),
    ),
    (
        7,
        "servers",
        include_str!("../../../migrations/postgres/0007_servers.sql"),
    ),
    (
        8,
        "dependencies",
        include_str!("../../../migrations/postgres/0008_dependencies.sql"),
    ),
    (
        9,
        "schedules",
        include_str!("../../../migrations/postgres/0009_schedules.sql"),
    ),
    (
        10,
        "callbacks",
        include_str!("../../../migrations/postgres/0010_callbacks.sql"),
    ),
    (
        11,
        "flow_control",
        include_str!("../../../migrations/postgres/0011_flow_control.sql"),
    ),
    (
        12,
        "retry_budget",
        include_str!("../../../migrations/postgres/0012_retry_budget.sql"),
    ),
    (
        13,
        "claim_probes",
        include_str!("../../../migrations/postgres/0013_claim_probes.sql"),
    ),
];

pub struct PostgresStore {
    pool: PgPool,
    /// Connections for claims (see `queue.rs`).
    claims: PgPool,
    /// Tenants' weights and each lane's round-robin state, for flow-aware claims.
    sharing: std::sync::Arc<Sharing>,
    /// The schema's notification channel (`offload_<schema>`).
    channel: String,
    /// This store's name in the notifications it sends, so it can tell its own from those of
    /// the other servers on the schema.
    origin: String,
    /// The batcher task's queue (`batcher.rs`): submits without keys, and settles.
    batcher: mpsc::Sender<batcher::Op>,
}

impl PostgresStore {
    /// Connects to `url` and applies the migrations. With `schema`, everything lives in that
    /// schema (created if needed): how tests share one database.
    pub async fn open(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(url)?;
        if let Some(s) = schema {
            if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(StoreError::Corrupt(format!("bad schema name `{s}`")));
            }
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
                .execute(&admin)
                .await?;
            admin.close().await;
            options = options.options([("search_path", s)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(16 - queue::CLAIM_CONNECTIONS)
            .connect_with(options.clone())
            .await?;
        let migrator = Migrator::new(super::Embedded(MIGRATIONS)).await?;
        migrator.run(&pool).await?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let channel = format!("offload_{schema}");
        // The batcher's own connection: one transaction at a time is all it ever runs.
        let batch_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let claims = queue::claim_pool(options.clone()).await?;
        let origin = Uuid::now_v7().simple().to_string();
        let (batcher, rx) = mpsc::channel(batcher::MAX_BATCH * 4);
        tokio::spawn(batcher::run(
            batch_pool,
            channel.clone(),
            origin.clone(),
            rx,
        ));
        Ok(PostgresStore {
            pool,
            claims,
            sharing: Default::default(),
            channel,
            origin,
            batcher,
        })
    }
}

impl PostgresStore {
    /// Shares lanes between tenants by these weights (a tenant not named weighs 1).
    pub fn with_tenant_weights(mut self, weights: impl IntoIterator<Item = (String, u32)>) -> Self {
        self.sharing = std::sync::Arc::new(Sharing::new(weights));
        self
    }

    async fn try_insert(&self, jobs: &[NewJob]) -> Result<Vec<Inserted>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut stored = HashMap::new();
        for key in KeyedSubmit::keys(jobs) {
            let sql = format!("SELECT {COLUMNS} FROM jobs WHERE idempotency_key = $1");
            let row = sqlx::query(&sql).bind(key).fetch_optional(&mut *tx).await?;
            if let Some(row) = row {
                stored.insert(key.to_string(), job_from_row(&row)?);
            }
        }
        let plan = KeyedSubmit::plan(jobs, &stored)?;
        // Locked until the commit, so no parent finishes unseen by its new children.
        let found = graph::lock_statuses(&mut tx, &plan.parents()).await?;
        let rows = plan.rows(&found)?;
        insert_rows(&mut tx, &rows).await?;
        let mut notices = Notices::default();
        for row in &rows {
            // A job cancelled at submit (a parent had already failed) is changed, not queued.
            if row.status == JobStatus::Queued {
                *notices.new.entry(row.job.executor).or_default() += 1;
            }
            notices.changed.push(row.job.id);
        }
        notices.send(&mut tx, &self.channel, &self.origin).await?;
        tx.commit().await?;
        Ok(plan.answer(&rows))
    }

    /// Runs a graph write in a transaction of its own, and announces what it moved.
    async fn graph_tx<T: Send>(
        &self,
        leader_only: bool,
        f: impl for<'c> FnOnce(
                &'c mut sqlx::PgConnection,
                &'c mut Notices,
                &'c mut Cascade,
            )
                -> futures_util::future::BoxFuture<'c, Result<T, StoreError>>
            + Send,
        skipped: T,
    ) -> Result<T, StoreError> {
        let mut tx = self.pool.begin().await?;
        if leader_only && !maintenance_leader(&mut tx).await? {
            return Ok(skipped);
        }
        let mut notices = Notices::default();
        let mut cascade = Cascade::default();
        let out = f(&mut tx, &mut notices, &mut cascade).await?;
        // Jobs this transaction made final (cancels, and children a cascade cancelled) owe
        // their callbacks, written in the same transaction.
        let mut moved = cascade.moved.clone();
        moved.extend(notices.changed.iter().copied());
        sql::enqueue_owed(&mut tx, &moved, Micros::now().0).await?;
        notices.cascaded(cascade);
        notices.send(&mut tx, &self.channel, &self.origin).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Hands a call to the batcher and waits for its answer (sent after the round's commit).
    async fn batched<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> batcher::Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.batcher
            .send(op(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn one(
        &self,
        sql: &str,
        binds: impl FnOnce(
            sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
        ) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Option<Job>, StoreError> {
        let row = binds(sqlx::query(sql)).fetch_optional(&self.pool).await?;
        row.as_ref().map(job_from_row).transpose()
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
        let rows = sql::callback_rows(&self.pool, &ids).await?;
        super::lay_callbacks(jobs, rows)
    }
}

#[async_trait]
impl JobStore for PostgresStore {
    async fn claim(
        &self,
        lane: ExecutorKind,
        limit: u32,
        now: Micros,
        lease: &Lease,
    ) -> Result<Claimed, StoreError> {
        queue::claim(&self.claims, &self.sharing, lane, limit, now, lease).await
    }

    async fn flow_state(
        &self,
        concurrency_keys: &[String],
        rate_keys: &[String],
    ) -> Result<FlowState, StoreError> {
        let keys = super::flow_keys(concurrency_keys, rate_keys);
        if keys.is_empty() {
            return Ok(FlowState::default());
        }
        let mut conn = self.pool.acquire().await?;
        flow::read_flow_state(&mut conn, &keys).await
    }

    async fn flow_stats(&self, top: usize) -> Result<FlowStats, StoreError> {
        // One pass over the flow index (queued) and the running rows, never over plain
        // queued or finished jobs: a lane without flow control pays nothing here.
        let rows: Vec<(String, String, i64, i64)> =
            sqlx::query_as(&super::flow::counts_sql("TRUE", "jobs"))
                .fetch_all(&self.pool)
                .await?;
        super::flow::stats_from_rows(rows, top)
    }

    async fn settle(&self, moves: Vec<Settle>) -> Result<Vec<Option<Job>>, StoreError> {
        for m in &moves {
            m.check()?;
        }
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        self.batched(|reply| batcher::Op::Settle { moves, reply })
            .await
    }

    async fn renew(
        &self,
        owner: &str,
        running: &[(JobId, u32)],
        ttl: std::time::Duration,
    ) -> Result<Vec<(JobId, u32)>, StoreError> {
        // Not on `claims`: renewals lock their rows in id order, which needs a sort.
        let mut conn = self.pool.acquire().await?;
        let held = sql::renew(&mut conn, owner, running, ttl).await?;
        Ok(running
            .iter()
            .filter(|r| !held.contains(r))
            .copied()
            .collect())
    }

    async fn expired(&self, which: Expiry, limit: u32) -> Result<Expired, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !maintenance_leader(&mut tx).await? {
            return Ok(Expired::default());
        }
        // The database's clock, not this server's: a server whose clock runs ahead must not
        // see the leases of the others as run out.
        let before = match which {
            Expiry::Lapsed => Micros(
                sqlx::query_scalar(&format!("SELECT {DB_NOW}"))
                    .fetch_one(&mut *tx)
                    .await?,
            ),
            Expiry::All => Micros(i64::MAX),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = 'running' \
             AND (lease_until IS NULL OR lease_until < $1) LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(before.0)
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Expired {
            jobs: rows.iter().map(job_from_row).collect::<Result<_, _>>()?,
            before,
        })
    }

    async fn queued_counts(&self) -> Result<Vec<(ExecutorKind, u64)>, StoreError> {
        let rows = sqlx::query_as(
            "SELECT executor, COUNT(*) AS n FROM jobs WHERE status = 'queued' GROUP BY executor",
        )
        .fetch_all(&self.pool)
        .await?;
        super::lane_counts(rows)
    }

    async fn listen(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Notice>, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(&self.channel).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let own = self.origin.clone();
        tokio::spawn(async move {
            loop {
                // recv reconnects after a lost connection; notices sent meanwhile are lost,
                // which the lanes' periodic look at the table covers.
                let n = match listener.recv().await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        continue;
                    }
                };
                for notice in notify::parse_payload(n.payload(), &own) {
                    if tx.send(notice).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, StoreError> {
        if jobs
            .iter()
            .all(|j| j.idempotency_key.is_none() && j.depends_on.is_empty())
        {
            return self
                .batched(|reply| batcher::Op::Insert { jobs, reply })
                .await;
        }
        // Two servers inserting the same new key at once: one wins the unique index, the other
        // retries and finds the winner's job (a replay or a conflict, as in one server).
        match self.try_insert(&jobs).await {
            Err(e) if is_unique_violation(&e) => self.try_insert(&jobs).await,
            other => other,
        }
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1");
        let Some(job) = self.one(&sql, |q| q.bind(id.0)).await? else {
            return Ok(None);
        };
        let mut jobs = [job];
        self.with_callbacks(&mut jobs).await?;
        let [job] = jobs;
        Ok(Some(job))
    }

    async fn get_many(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ANY($1)");
        let rows = sqlx::query(&sql)
            .bind(ids.iter().map(|id| id.0).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await?;
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.with_callbacks(&mut jobs).await?;
        Ok(jobs)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError> {
        let statuses: Vec<JobStatus> = filter.status.into_iter().collect();
        let (cond, binds) = sql::filter_where(filter, &statuses);
        let n = binds.len() + 1;
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE {cond} ORDER BY id DESC LIMIT ${n}");
        let rows = sql::bind_all(sqlx::query(&sql), binds)
            .bind(filter.limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        self.with_callbacks(&mut jobs).await?;
        Ok(jobs)
    }

    async fn cancel(&self, id: JobId, now: Micros) -> Result<CancelOutcome, StoreError> {
        // The cancelled job's outbox row (and those of children its cascade cancels) is
        // written by `graph_tx`, in the same transaction.
        self.graph_tx(
            false,
            move |conn, notices, cascade| Box::pin(graph::cancel(conn, id, now, notices, cascade)),
            CancelOutcome::NotFound,
        )
        .await
    }

    async fn delete(&self, id: JobId) -> Result<DeleteOutcome, StoreError> {
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id = $1 AND status IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(id.0)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(DeleteOutcome::Deleted);
        }
        Ok(match self.get(id).await? {
            Some(job) => DeleteOutcome::Unfinished(Box::new(job)),
            None => DeleteOutcome::NotFound,
        })
    }

    async fn prune(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        if !maintenance_leader(&mut tx).await? {
            return Ok(0);
        }
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL \
             AND finished_at < $1 ORDER BY finished_at LIMIT $2)",
        )
        .bind(before.0)
        .bind(limit as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn insert_blob(&self, meta: BlobMeta) -> Result<(), StoreError> {
        let id = Uuid::parse_str(&meta.id).map_err(|e| corrupt("blob id", e))?;
        sqlx::query(
            "INSERT INTO blobs (id, size, sha256, created_at, keep, origin) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(meta.size as i64)
        .bind(meta.sha256)
        .bind(meta.created_at.0)
        .bind(meta.keep)
        .bind(meta.origin)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_blob(&self, id: &str) -> Result<Option<BlobMeta>, StoreError> {
        let Ok(uuid) = Uuid::parse_str(id) else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT id, size, sha256, created_at, keep, origin FROM blobs WHERE id = $1",
        )
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(BlobMeta {
                id: r.try_get::<Uuid, _>("id")?.hyphenated().to_string(),
                size: r.try_get::<i64, _>("size")? as u64,
                sha256: r.try_get("sha256")?,
                keep: r.try_get("keep")?,
                origin: r.try_get("origin")?,
                created_at: Micros(r.try_get("created_at")?),
            })
        })
        .transpose()
    }

    async fn prune_blobs(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM blobs WHERE id IN (SELECT b.id FROM blobs b WHERE b.used AND NOT b.keep \
             AND NOT EXISTS (SELECT 1 FROM job_blobs jb WHERE jb.blob_id = b.id) LIMIT $1) \
             RETURNING id",
        )
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await?;
        let gone: Vec<String> = ids
            .into_iter()
            .map(|u| u.hyphenated().to_string())
            .collect();
        // Every server removes its copies of them (at the commit).
        let notices = Notices {
            blobs_deleted: gone.clone(),
            ..Notices::default()
        };
        notices.send(&mut tx, &self.channel, &self.origin).await?;
        tx.commit().await?;
        Ok(gone)
    }

    async fn known_blobs(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let uuids: Vec<Uuid> = ids.iter().filter_map(|i| Uuid::parse_str(i).ok()).collect();
        let found: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM blobs WHERE id = ANY($1)")
            .bind(uuids)
            .fetch_all(&self.pool)
            .await?;
        Ok(found
            .into_iter()
            .map(|u| u.hyphenated().to_string())
            .collect())
    }

    async fn delete_blob(&self, id: &str) -> Result<BlobDeleteOutcome, StoreError> {
        let Ok(uuid) = Uuid::parse_str(id) else {
            return Ok(BlobDeleteOutcome::NotFound);
        };
        let mut tx = self.pool.begin().await?;
        // Lock the blob's row so a concurrent delete waits for this one.
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM blobs WHERE id = $1 FOR UPDATE")
                .bind(uuid)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_none() {
            return Ok(BlobDeleteOutcome::NotFound);
        }
        let users: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM job_blobs jb JOIN jobs j ON j.id = jb.job_id \
             WHERE jb.blob_id = $1 AND j.status IN ('waiting', 'queued', 'running')",
        )
        .bind(uuid)
        .fetch_one(&mut *tx)
        .await?;
        if users > 0 {
            return Ok(BlobDeleteOutcome::InUse(users as u64));
        }
        sqlx::query("DELETE FROM blobs WHERE id = $1")
            .bind(uuid)
            .execute(&mut *tx)
            .await?;
        // Every server removes its copy (at the commit).
        let notices = Notices {
            blobs_deleted: vec![uuid.hyphenated().to_string()],
            ..Notices::default()
        };
        notices.send(&mut tx, &self.channel, &self.origin).await?;
        tx.commit().await?;
        Ok(BlobDeleteOutcome::Deleted)
    }

    async fn beat(&self, beat: &ServerBeat) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO servers (id, address, started_at, heartbeat_at, lanes) \
             VALUES ($1, $2, {DB_NOW}, {DB_NOW}, $3::jsonb) ON CONFLICT (id) DO UPDATE SET \
             address = excluded.address, heartbeat_at = excluded.heartbeat_at, \
             lanes = excluded.lanes"
        ))
        .bind(&beat.id)
        .bind(&beat.address)
        .bind(beat.lanes.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn servers(&self) -> Result<Vec<ServerInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, address, started_at, heartbeat_at, lanes::text AS lanes FROM servers \
             ORDER BY started_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ServerInfo {
                    id: r.try_get("id")?,
                    address: r.try_get("address")?,
                    started_at: Micros(r.try_get("started_at")?),
                    heartbeat_at: Micros(r.try_get("heartbeat_at")?),
                    lanes: serde_json::from_str(&r.try_get::<String, _>("lanes")?)
                        .map_err(|e| corrupt("lanes", e))?,
                })
            })
            .collect()
    }

    async fn tidy(&self) -> Result<bool, StoreError> {
        queue::tidy(&self.pool).await
    }

    async fn forget_servers(&self, silent: std::time::Duration) -> Result<u64, StoreError> {
        let done = sqlx::query(&format!(
            "DELETE FROM servers WHERE heartbeat_at < {DB_NOW} - $1"
        ))
        .bind(sql::micros(silent))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_schedule(&self, schedule: Schedule) -> Result<bool, StoreError> {
        schedules::create(&self.pool, &self.channel, schedule).await
    }

    async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>, StoreError> {
        schedules::get(&self.pool, name).await
    }

    async fn list_schedules(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        schedules::list(&self.pool, after, limit).await
    }

    async fn next_schedules(&self, limit: u32) -> Result<Vec<Schedule>, StoreError> {
        schedules::next(&self.pool, limit).await
    }

    async fn pause_schedule(
        &self,
        name: &str,
        now: Micros,
    ) -> Result<Option<Schedule>, StoreError> {
        schedules::set_paused(&self.pool, &self.channel, name, None, now).await
    }

    async fn resume_schedule(
        &self,
        name: &str,
        next_run: Micros,
        now: Micros,
    ) -> Result<Option<Schedule>, StoreError> {
        schedules::set_paused(&self.pool, &self.channel, name, Some(next_run), now).await
    }

    async fn delete_schedule(&self, name: &str) -> Result<bool, StoreError> {
        schedules::delete(&self.pool, &self.channel, name).await
    }

    async fn fire_schedule(&self, fire: Fire) -> Result<Option<Vec<Job>>, StoreError> {
        schedules::fire(&self.pool, &self.channel, &self.origin, fire).await
    }

    async fn schedule_jobs(&self, name: &str, limit: u32) -> Result<Vec<Job>, StoreError> {
        let mut jobs = schedules::jobs(&self.pool, name, limit).await?;
        self.with_callbacks(&mut jobs).await?;
        Ok(jobs)
    }

    async fn claim_callbacks(
        &self,
        limit: u32,
        now: Micros,
        until: Micros,
    ) -> Result<ClaimedCallbacks, StoreError> {
        // SKIP LOCKED, as for jobs: servers claiming at once take different rows; and the
        // claim moves `due_at` to the lease's end, so a row being delivered is not due again
        // until its claimer has had time to finish (or has died).
        // Only rows of final jobs: a retried job's row waits for its next final state.
        let sql = format!(
            "WITH picked AS (SELECT job_id FROM callbacks WHERE status = 'pending' \
             AND due_at <= $2 AND {} ORDER BY due_at LIMIT $3 \
             FOR UPDATE OF callbacks SKIP LOCKED) \
             UPDATE callbacks SET attempts = callbacks.attempts + 1, due_at = $1 FROM picked \
             WHERE callbacks.job_id = picked.job_id \
             RETURNING callbacks.job_id, callbacks.attempts, callbacks.since, callbacks.last_error",
            sql::FINAL_JOB
        );
        let rows: Vec<(Uuid, i32, i64, Option<String>)> = sqlx::query_as(&sql)
            .bind(until.0)
            .bind(now.0)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut deliveries = Vec::with_capacity(rows.len());
        if !rows.is_empty() {
            let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ANY($1)");
            let jobs: HashMap<JobId, Job> = sqlx::query(&sql)
                .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| job_from_row(r).map(|j| (j.id, j)))
                .collect::<Result<_, _>>()?;
            for (id, attempts, since, error) in rows {
                // A job deleted since takes its outbox row with it (ON DELETE CASCADE).
                if let Some(job) = jobs.get(&JobId(id)).cloned() {
                    deliveries.push(Delivery::claimed(job, attempts.into(), since, error)?);
                }
            }
        }
        let next_due = if deliveries.len() < limit as usize {
            let sql = format!(
                "SELECT MIN(due_at) FROM callbacks WHERE status = 'pending' AND {}",
                sql::FINAL_JOB
            );
            let at: Option<i64> = sqlx::query_scalar(&sql).fetch_one(&self.pool).await?;
            at.map(Micros)
        } else {
            None
        };
        Ok(ClaimedCallbacks {
            deliveries,
            next_due,
        })
    }

    async fn record_callback(
        &self,
        job: JobId,
        attempt: u32,
        outcome: CallbackOutcome,
        now: Micros,
    ) -> Result<bool, StoreError> {
        let done_at = (outcome.status() != crate::job::CallbackStatus::Pending).then_some(now.0);
        let done = sqlx::query(
            "UPDATE callbacks SET status = $1, last_error = COALESCE($2, last_error), \
             due_at = COALESCE($3, due_at), done_at = $4 \
             WHERE job_id = $5 AND status = 'pending' AND attempts = $6",
        )
        .bind(outcome.status().as_str())
        .bind(outcome.error())
        .bind(outcome.due().map(|t| t.0))
        .bind(done_at)
        .bind(job.0)
        .bind(attempt as i32)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn children(&self, id: JobId) -> Result<Vec<JobId>, StoreError> {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT child_id FROM job_deps WHERE parent_id = $1 ORDER BY child_id",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(JobId).collect())
    }

    async fn results(
        &self,
        ids: &[JobId],
    ) -> Result<Vec<(JobId, Option<serde_json::Value>)>, StoreError> {
        graph::results(&self.pool, ids).await
    }

    async fn retry(&self, id: JobId, now: Micros) -> Result<RetryOutcome, StoreError> {
        self.graph_tx(
            false,
            move |conn, notices, cascade| {
                Box::pin(async move {
                    let out = graph::retry(conn, id, now, cascade).await?;
                    if let RetryOutcome::Retried(job) = &out {
                        notices.changed.push(job.id);
                        if job.status == JobStatus::Queued {
                            *notices.new.entry(job.executor).or_default() += 1;
                        }
                    }
                    Ok(out)
                })
            },
            RetryOutcome::NotFound,
        )
        .await
    }

    async fn retry_matching(
        &self,
        filter: &ListFilter,
        statuses: &[JobStatus],
        now: Micros,
    ) -> Result<Vec<Job>, StoreError> {
        let (filter, statuses) = (filter.clone(), statuses.to_vec());
        self.graph_tx(
            false,
            move |conn, notices, cascade| {
                Box::pin(async move {
                    let ids = graph::matching_ids(&mut *conn, &filter, &statuses).await?;
                    let mut out = Vec::with_capacity(ids.len());
                    for id in ids {
                        let outcome = graph::retry(&mut *conn, id, now, cascade).await?;
                        if let Some(job) = graph::retried(outcome) {
                            notices.changed.push(job.id);
                            if job.status == JobStatus::Queued {
                                *notices.new.entry(job.executor).or_default() += 1;
                            }
                            out.push(job);
                        }
                    }
                    Ok(out)
                })
            },
            Vec::new(),
        )
        .await
    }

    async fn cancel_matching(
        &self,
        filter: &ListFilter,
        statuses: &[JobStatus],
        now: Micros,
    ) -> Result<Vec<(Job, JobStatus)>, StoreError> {
        let (filter, statuses) = (filter.clone(), statuses.to_vec());
        self.graph_tx(
            false,
            move |conn, notices, cascade| {
                Box::pin(async move {
                    let ids = graph::matching_ids(&mut *conn, &filter, &statuses).await?;
                    let mut out = Vec::with_capacity(ids.len());
                    for id in ids {
                        if let CancelOutcome::Cancelled { job, was } =
                            graph::cancel(&mut *conn, id, now, notices, cascade).await?
                        {
                            out.push((job, was));
                        }
                    }
                    Ok(out)
                })
            },
            Vec::new(),
        )
        .await
    }

    async fn resolve_waiting(
        &self,
        after: Option<JobId>,
        limit: u32,
        now: Micros,
    ) -> Result<(u64, Option<JobId>), StoreError> {
        self.graph_tx(
            true,
            move |conn, _notices, cascade| {
                Box::pin(graph::resolve_waiting(conn, after, limit, now, cascade))
            },
            (0, None),
        )
        .await
    }
}
