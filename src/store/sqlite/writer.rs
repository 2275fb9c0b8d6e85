//! The writer task: every write to the SQLite file goes through it, many per transaction.
//!
//! It takes whatever ops are waiting (up to [`MAX_BATCH`]), runs them in one
//! `BEGIN IMMEDIATE … COMMIT`, and answers each caller only after the commit. Submits and
//! settles, the bulk of the traffic, go out as one statement each for the whole batch. A
//! batch is all or nothing: if any statement or the commit fails (a full disk, an I/O
//! error), the whole batch is rolled back and every caller gets
//! [`StoreError::Unavailable`], so a submitter told to retry can never have had its job
//! stored. Notices go out only after a commit, from this task, so no caller's future (which
//! an HTTP server may drop when its client hangs up) stands between a commit and the lanes
//! hearing of it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use sqlx::sqlite::SqliteConnection;
use sqlx::Connection;
use tokio::sync::{mpsc, oneshot};

use super::graph;
use super::schedules;
use super::sql::{self, exec, mergeable, MERGED_INSERT_MAX, SETTLE_CHUNK};
use super::NoticeTx;
use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::flow::Sharing;
use crate::job::{ExecutorKind, Job, JobId, JobStatus, NewJob};
use crate::schedule::Schedule;
use crate::store::graph::{Cascade, NewRow};
use crate::store::{
    frees_key, BlobDeleteOutcome, CallbackOutcome, CancelOutcome, Claimed, ClaimedCallbacks,
    DeleteOutcome, Fire, Inserted, Lease, ListFilter, Notice, RetryOutcome, ServerBeat, Settle,
    StoreError,
};

/// Most ops committed in one transaction.
pub(super) const MAX_BATCH: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write, with the channel its typed answer goes back on.
pub(super) enum Op {
    Insert {
        jobs: Vec<NewJob>,
        reply: Reply<Vec<Inserted>>,
    },
    Claim {
        lane: ExecutorKind,
        limit: u32,
        now: Micros,
        lease: Lease,
        sharing: Arc<Sharing>,
        reply: Reply<Claimed>,
    },
    Settle {
        moves: Vec<Settle>,
        reply: Reply<Vec<Option<Job>>>,
    },
    Cancel {
        id: JobId,
        now: Micros,
        reply: Reply<CancelOutcome>,
    },
    Delete {
        id: JobId,
        reply: Reply<DeleteOutcome>,
    },
    Renew {
        owner: String,
        running: Vec<(JobId, u32)>,
        ttl: std::time::Duration,
        reply: Reply<Vec<(JobId, u32)>>,
    },
    Prune {
        before: Micros,
        limit: u32,
        reply: Reply<u64>,
    },
    InsertBlob {
        meta: BlobMeta,
        reply: Reply<()>,
    },
    DeleteBlob {
        id: String,
        reply: Reply<BlobDeleteOutcome>,
    },
    PruneBlobs {
        limit: u32,
        reply: Reply<Vec<String>>,
    },
    CreateSchedule {
        schedule: Schedule,
        reply: Reply<bool>,
    },
    /// Pause (`resume: None`) or resume, due next at `resume`.
    SetPaused {
        name: String,
        resume: Option<Micros>,
        now: Micros,
        reply: Reply<Option<Schedule>>,
    },
    DeleteSchedule {
        name: String,
        reply: Reply<bool>,
    },
    FireSchedule {
        fire: Fire,
        reply: Reply<Option<Vec<Job>>>,
    },
    Beat {
        beat: ServerBeat,
        reply: Reply<()>,
    },
    ForgetServers {
        silent: std::time::Duration,
        reply: Reply<u64>,
    },
    ClaimCallbacks {
        limit: u32,
        now: Micros,
        until: Micros,
        reply: Reply<ClaimedCallbacks>,
    },
    RecordCallback {
        job: JobId,
        attempt: u32,
        outcome: CallbackOutcome,
        now: Micros,
        reply: Reply<bool>,
    },
    Retry {
        id: JobId,
        now: Micros,
        reply: Reply<RetryOutcome>,
    },
    RetryMatching {
        filter: ListFilter,
        statuses: Vec<JobStatus>,
        now: Micros,
        reply: Reply<Vec<Job>>,
    },
    CancelMatching {
        filter: ListFilter,
        statuses: Vec<JobStatus>,
        now: Micros,
        reply: Reply<Vec<(Job, JobStatus)>>,
    },
    ResolveWaiting {
        after: Option<JobId>,
        limit: u32,
        now: Micros,
        reply: Reply<(u64, Option<JobId>)>,
    },
}

impl Op {
    /// Whether the op writes with at most one statement, so that SQLite's autocommit makes it
    /// atomic without a transaction of its own. (Reads that explain a miss do not count: this
    /// task is the only writer.) `edges`: whether any job has parents, so that a job reaching
    /// a final state may move children too (more writes, which must share its transaction).
    fn single_write(&self, edges: bool) -> bool {
        match self {
            Op::Insert { jobs, .. } => {
                jobs.len() <= MERGED_INSERT_MAX
                    && jobs
                        .iter()
                        .all(|j| j.blobs.is_empty() && j.depends_on.is_empty())
            }
            // A move that owes a callback writes its outbox row too; with edges, a job
            // reaching a final state may move its children.
            Op::Settle { moves, .. } => {
                moves.len() <= SETTLE_CHUNK
                    && !moves.iter().any(Settle::calls_back)
                    && !(edges && moves.iter().any(|m| m.next.status().is_final()))
            }
            // Its job may have a callback to enqueue: not known before the read.
            Op::Cancel { .. } => false,
            Op::Retry { .. }
            | Op::RetryMatching { .. }
            | Op::CancelMatching { .. }
            | Op::ResolveWaiting { .. } => false,
            // A guarded update, then the tick's jobs: one transaction.
            Op::FireSchedule { .. } => false,
            _ => true,
        }
    }

    /// Answers the op with the error that stopped its batch.
    fn fail(self, msg: &str) {
        fn send<T>(reply: Reply<T>, msg: &str) {
            let _ = reply.send(Err(StoreError::Unavailable(msg.to_string())));
        }
        match self {
            Op::Insert { reply, .. } => send(reply, msg),
            Op::Claim { reply, .. } => send(reply, msg),
            Op::Settle { reply, .. } => send(reply, msg),
            Op::Cancel { reply, .. } => send(reply, msg),
            Op::Delete { reply, .. } => send(reply, msg),
            Op::Renew { reply, .. } => send(reply, msg),
            Op::Prune { reply, .. } => send(reply, msg),
            Op::InsertBlob { reply, .. } => send(reply, msg),
            Op::DeleteBlob { reply, .. } => send(reply, msg),
            Op::PruneBlobs { reply, .. } => send(reply, msg),
            Op::CreateSchedule { reply, .. } => send(reply, msg),
            Op::SetPaused { reply, .. } => send(reply, msg),
            Op::DeleteSchedule { reply, .. } => send(reply, msg),
            Op::FireSchedule { reply, .. } => send(reply, msg),
            Op::Beat { reply, .. } => send(reply, msg),
            Op::ForgetServers { reply, .. } => send(reply, msg),
            Op::ClaimCallbacks { reply, .. } => send(reply, msg),
            Op::RecordCallback { reply, .. } => send(reply, msg),
            Op::Retry { reply, .. } => send(reply, msg),
            Op::RetryMatching { reply, .. } => send(reply, msg),
            Op::CancelMatching { reply, .. } => send(reply, msg),
            Op::ResolveWaiting { reply, .. } => send(reply, msg),
        }
    }
}

/// An answer held until the commit: sent as it is if the commit succeeds, replaced by the
/// commit's error if it fails.
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
    Box::new(move |failed| {
        let _ = reply.send(match failed {
            None => result,
            Some(msg) => Err(StoreError::Unavailable(msg.to_string())),
        });
    })
}

/// A database error stops the whole batch; other errors (an idempotency conflict, a
/// malformed row) are that op's answer and leave the rest alone. An op that writes before it
/// can fail for a reason of its own (a move, then the graph walk after it, which can meet a
/// malformed row) runs inside a savepoint ([`atomic!`]), so it applies whole or not at all.
fn stops_batch(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(_))
}

/// Opens the savepoint an op runs in ([`atomic!`]).
async fn savepoint(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("SAVEPOINT op").execute(&mut *conn).await?;
    Ok(())
}

/// Closes an op's savepoint: on any error everything the op wrote is rolled back first, and
/// the error stays its answer (a database error still stops the batch).
async fn release<T>(
    conn: &mut SqliteConnection,
    result: Result<T, StoreError>,
) -> Result<T, StoreError> {
    if result.is_err() {
        sqlx::query("ROLLBACK TO op").execute(&mut *conn).await?;
    }
    sqlx::query("RELEASE op").execute(&mut *conn).await?;
    result
}

/// Runs an op's body (an expression that writes through `conn`) inside a savepoint, so the
/// op applies whole or not at all; `if <cond>`: only when the condition holds.
macro_rules! atomic {
    ($conn:ident, if $cond:expr, $body:expr) => {{
        if $cond {
            atomic!($conn, $body)
        } else {
            $body
        }
    }};
    ($conn:ident, $body:expr) => {{
        match savepoint(&mut *$conn).await {
            Ok(()) => {
                let result = $body;
                release(&mut *$conn, result).await
            }
            Err(e) => Err(e),
        }
    }};
}

/// What running a batch's ops gave: answers to send and notices to announce after the commit.
#[derive(Default)]
struct Outcome {
    answers: Vec<Answer>,
    notices: Vec<Notice>,
    /// Whether any job has parents (`job_deps` has rows): until one has, no final state can
    /// move another job, and the writer does not look for children.
    edges: bool,
}

impl Outcome {
    /// Announces what a parent's final state (or a retry) moved besides its own job. The
    /// server neither counted nor published these jobs itself: its queued counts take the
    /// ones queued (`added`), and its watchers and streams hear of all of them.
    fn cascaded(&mut self, cascade: Cascade) {
        let mut lanes: HashMap<ExecutorKind, u64> = HashMap::new();
        for (_, lane) in &cascade.queued {
            *lanes.entry(*lane).or_default() += 1;
        }
        self.notices.extend(
            lanes
                .into_iter()
                .map(|(lane, added)| Notice::New { lane, added }),
        );
        if !cascade.moved.is_empty() {
            self.notices.push(Notice::Changed(cascade.moved));
        }
    }
}

pub(super) fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Op>,
    notices: NoticeTx,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Read once; from then on this task (the only writer) sets it when it stores an edge.
        let mut edges = graph::any_edges(&mut conn).await.unwrap_or(true);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            edges = commit_batch(&mut conn, std::mem::take(&mut batch), &notices, edges).await;
        }
        let _ = conn.close().await;
    })
}

/// Commits one batch; answers whether any job has parents now.
fn commit_batch<'a>(
    conn: &'a mut SqliteConnection,
    mut batch: Vec<Op>,
    notices: &'a NoticeTx,
    edges: bool,
) -> BoxFuture<'a, bool> {
    Box::pin(async move {
        let started = std::time::Instant::now();
        let ops = batch.len();
        // One op that writes once needs no transaction of its own: SQLite runs the statement as
        // one (autocommit). Skipping BEGIN and COMMIT saves two round trips to SQLite's
        // thread, most of an idle server's submit latency.
        let solo = ops == 1 && batch[0].single_write(edges);
        let mut out = Outcome {
            edges,
            ..Outcome::default()
        };
        let result = if solo {
            let op = batch.pop().expect("one op");
            run_op(conn, op, &mut out).await
        } else {
            match exec(&mut *conn, &["BEGIN IMMEDIATE"]).await {
                Err(e) => Err((e.to_string(), batch)),
                Ok(()) => match run_batch(conn, batch, &mut out).await {
                    Ok(()) => exec(&mut *conn, &["COMMIT"])
                        .await
                        .map_err(|e| (format!("commit failed: {e}"), Vec::new())),
                    Err(failed) => Err(failed),
                },
            }
        };
        let edges = out.edges;
        match result {
            Ok(()) => {
                metrics::histogram!("offload_store_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("offload_store_batch_size").record(ops as f64);
                for a in out.answers {
                    a(None);
                }
                announce(notices, out.notices);
            }
            Err((msg, unrun)) => {
                tracing::error!(error = %msg, ops, "a write batch failed; none of it was stored");
                if !solo {
                    let _ = exec(&mut *conn, &["ROLLBACK"]).await;
                }
                for a in out.answers {
                    a(Some(&msg));
                }
                for op in unrun {
                    op.fail(&msg);
                }
            }
        }
        edges
    })
}

fn announce(notices: &NoticeTx, list: Vec<Notice>) {
    if list.is_empty() {
        return;
    }
    let guard = notices.lock().expect("notice lock");
    if let Some(tx) = guard.as_ref() {
        for n in list {
            let _ = tx.send(n);
        }
    }
}

/// Runs a batch inside an open transaction. On a database error, answers what ran so far
/// through `out` and hands back the message and the ops that never ran.
#[allow(clippy::type_complexity)]
fn run_batch<'a>(
    conn: &'a mut SqliteConnection,
    batch: Vec<Op>,
    out: &'a mut Outcome,
) -> BoxFuture<'a, Result<(), (String, Vec<Op>)>> {
    Box::pin(async move {
        // Submits without keys go out as one INSERT for the whole batch, settles as one
        // UPDATE: a round trip to SQLite's thread costs more than a row.
        let mut inserts: Vec<(Reply<Vec<Inserted>>, Vec<NewJob>)> = Vec::new();
        let mut settles: Vec<(Reply<Vec<Option<Job>>>, Vec<Settle>)> = Vec::new();
        let mut settling: HashSet<JobId> = HashSet::new();
        let mut rest: Vec<Op> = Vec::new();
        for op in batch {
            match op {
                Op::Insert { jobs, reply } if mergeable(&jobs) => inserts.push((reply, jobs)),
                // Two moves of one job cannot share the merged UPDATE (which one applied would
                // be ambiguous): a second one runs on its own, after it, and meets its guard.
                Op::Settle { moves, reply }
                    if moves.iter().all(|m| !settling.contains(&m.job.id)) =>
                {
                    settling.extend(moves.iter().map(|m| m.job.id));
                    settles.push((reply, moves))
                }
                op => rest.push(op),
            }
        }
        let unrun = |inserts: Vec<(Reply<Vec<Inserted>>, Vec<NewJob>)>,
                     settles: Vec<(Reply<Vec<Option<Job>>>, Vec<Settle>)>,
                     rest: Vec<Op>| {
            inserts
                .into_iter()
                .map(|(reply, jobs)| Op::Insert { jobs, reply })
                .chain(
                    settles
                        .into_iter()
                        .map(|(reply, moves)| Op::Settle { moves, reply }),
                )
                .chain(rest)
                .collect::<Vec<Op>>()
        };
        if !inserts.is_empty() {
            let rows: Vec<NewRow> = inserts
                .iter()
                .flat_map(|(_, jobs)| jobs.iter().map(NewRow::queued))
                .collect();
            if let Err(e) = sql::insert_rows(&mut *conn, &rows).await {
                return Err((e.to_string(), unrun(inserts, settles, rest)));
            }
            let lanes: HashSet<ExecutorKind> = rows.iter().map(|r| r.job.executor).collect();
            out.notices
                .extend(lanes.into_iter().map(|lane| Notice::New { lane, added: 0 }));
            for (reply, jobs) in inserts {
                let created = jobs.iter().map(|j| Inserted::Created(j.to_job())).collect();
                out.answers.push(answer(reply, Ok(created)));
            }
        }
        if !settles.is_empty() {
            let all: Vec<&Settle> = settles.iter().flat_map(|(_, m)| m.iter()).collect();
            let done = match sql::settle_rows(&mut *conn, &all).await {
                Ok(done) => done,
                Err(e) => return Err((e.to_string(), unrun(Vec::new(), settles, rest))),
            };
            if let Err(e) = sql::enqueue_settled(&mut *conn, &all, &done).await {
                return Err((e.to_string(), unrun(Vec::new(), settles, rest)));
            }
            if out.edges {
                let finals = finished(&all, &done);
                let mut cascade = Cascade::default();
                let now = Micros::now();
                let moved = match graph::resolve(&mut *conn, finals, now, &mut cascade).await {
                    Ok(()) => sql::enqueue_owed(&mut *conn, &cascade.moved, now).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = moved {
                    return Err((e.to_string(), unrun(Vec::new(), settles, rest)));
                }
                out.cascaded(cascade);
            }
            for (reply, moves) in settles {
                let moved = settled(&moves, &done, &mut out.notices);
                out.answers.push(answer(reply, Ok(moved)));
            }
        }
        let mut rest = rest.into_iter();
        while let Some(op) = rest.next() {
            if let Err(e) = run_op(conn, op, out).await {
                let mut left: Vec<Op> = e.1;
                left.extend(rest);
                return Err((e.0, left));
            }
        }
        Ok(())
    })
}

/// The jobs that the applied moves of a settle left final: their children move next.
fn finished(moves: &[&Settle], done: &HashSet<JobId>) -> Vec<JobId> {
    moves
        .iter()
        .filter(|m| m.next.status().is_final() && done.contains(&m.job.id))
        .map(|m| m.job.id)
        .collect()
}

/// The answer to a settle: each move's job as moved, or `None` where its guard refused.
fn settled(moves: &[Settle], done: &HashSet<JobId>, notices: &mut Vec<Notice>) -> Vec<Option<Job>> {
    moves
        .iter()
        .map(|m| {
            done.contains(&m.job.id).then(|| {
                let job = m.moved();
                if job.status == JobStatus::Queued || frees_key(&job) {
                    notices.push(Notice::New {
                        lane: job.executor,
                        added: 0,
                    });
                }
                job
            })
        })
        .collect()
}

/// Announces retried jobs: their lanes, if queued.
fn retried(out: &mut Outcome, jobs: &[Job]) {
    let lanes: HashSet<ExecutorKind> = jobs
        .iter()
        .filter(|j| j.status == JobStatus::Queued)
        .map(|j| j.executor)
        .collect();
    // The dispatcher counts the retried jobs themselves.
    out.notices
        .extend(lanes.into_iter().map(|lane| Notice::New { lane, added: 0 }));
}

/// Runs one op. A database error comes back as the message (the op itself has been answered
/// with it in `out`, to be sent after the rollback).
fn run_op<'a>(
    conn: &'a mut SqliteConnection,
    op: Op,
    out: &'a mut Outcome,
) -> BoxFuture<'a, Result<(), (String, Vec<Op>)>> {
    Box::pin(async move {
        let single = op.single_write(out.edges);
        // Each arm: the result, whether it stops the batch, and the answer.
        macro_rules! finish {
            ($reply:expr, $result:expr) => {{
                let result = $result;
                let stop = result
                    .as_ref()
                    .err()
                    .filter(|e| stops_batch(e))
                    .map(|e| e.to_string());
                out.answers.push(answer($reply, result));
                match stop {
                    Some(msg) => return Err((msg, Vec::new())),
                    None => return Ok(()),
                }
            }};
        }
        match op {
            Op::Insert { jobs, reply } => {
                let lanes: HashSet<ExecutorKind> = jobs.iter().map(|j| j.executor).collect();
                let has_parents = jobs.iter().any(|j| !j.depends_on.is_empty());
                let result = sql::insert(&mut *conn, jobs).await;
                if result.is_ok() {
                    out.notices
                        .extend(lanes.into_iter().map(|lane| Notice::New { lane, added: 0 }));
                    out.edges |= has_parents;
                }
                finish!(reply, result)
            }
            Op::Claim {
                lane,
                limit,
                now,
                lease,
                sharing,
                reply,
            } => finish!(
                reply,
                sql::claim(&mut *conn, lane, limit, now, &lease, &sharing).await
            ),
            Op::Settle { moves, reply } => {
                let all: Vec<&Settle> = moves.iter().collect();
                let mut cascade = Cascade::default();
                let edges = out.edges;
                // One statement (no outbox row, no children to move) is atomic by itself.
                let result = atomic!(
                    conn,
                    if !single,
                    async {
                        let done = sql::settle_rows(&mut *conn, &all).await?;
                        sql::enqueue_settled(&mut *conn, &all, &done).await?;
                        if edges {
                            let finals = finished(&all, &done);
                            let now = Micros::now();
                            graph::resolve(&mut *conn, finals, now, &mut cascade).await?;
                            sql::enqueue_owed(&mut *conn, &cascade.moved, now).await?;
                        }
                        Ok(done)
                    }
                    .await
                );
                let result = result.map(|done| settled(&moves, &done, &mut out.notices));
                if result.is_ok() {
                    out.cascaded(cascade);
                }
                finish!(reply, result)
            }
            Op::Cancel { id, now, reply } => {
                let mut cascade = Cascade::default();
                let result = atomic!(conn, sql::cancel(&mut *conn, id, now, &mut cascade).await);
                if let Ok(CancelOutcome::Cancelled {
                    was: JobStatus::Running,
                    job,
                }) = &result
                {
                    out.notices.push(Notice::Cancel(id));
                    if frees_key(job) {
                        out.notices.push(Notice::New {
                            lane: job.executor,
                            added: 0,
                        });
                    }
                }
                if result.is_ok() {
                    out.cascaded(cascade);
                }
                finish!(reply, result)
            }
            Op::Retry { id, now, reply } => {
                let mut cascade = Cascade::default();
                let result = atomic!(conn, graph::retry(&mut *conn, id, now, &mut cascade).await);
                if let Ok(RetryOutcome::Retried(job)) = &result {
                    retried(out, std::slice::from_ref(job));
                }
                if result.is_ok() {
                    out.cascaded(cascade);
                }
                finish!(reply, result)
            }
            Op::RetryMatching {
                filter,
                statuses,
                now,
                reply,
            } => {
                let mut cascade = Cascade::default();
                let result = atomic!(
                    conn,
                    async {
                        let ids = sql::matching_ids(&mut *conn, &filter, &statuses).await?;
                        graph::retry_many(&mut *conn, ids, now, &mut cascade).await
                    }
                    .await
                );
                if let Ok(jobs) = &result {
                    retried(out, jobs);
                }
                if result.is_ok() {
                    out.cascaded(cascade);
                }
                finish!(reply, result)
            }
            Op::CancelMatching {
                filter,
                statuses,
                now,
                reply,
            } => {
                let mut cascade = Cascade::default();
                let result = atomic!(
                    conn,
                    async {
                        let ids = sql::matching_ids(&mut *conn, &filter, &statuses).await?;
                        graph::cancel_many(&mut *conn, ids, now, &mut cascade).await
                    }
                    .await
                );
                if let Ok(jobs) = &result {
                    for (job, was) in jobs {
                        if *was == JobStatus::Running {
                            out.notices.push(Notice::Cancel(job.id));
                            if frees_key(job) {
                                out.notices.push(Notice::New {
                                    lane: job.executor,
                                    added: 0,
                                });
                            }
                        }
                    }
                }
                if result.is_ok() {
                    out.cascaded(cascade);
                }
                finish!(reply, result)
            }
            Op::ResolveWaiting {
                after,
                limit,
                now,
                reply,
            } => {
                let mut cascade = Cascade::default();
                let result = atomic!(
                    conn,
                    async {
                        let r = graph::resolve_waiting(&mut *conn, after, limit, now, &mut cascade)
                            .await?;
                        sql::enqueue_owed(&mut *conn, &cascade.moved, now).await?;
                        Ok(r)
                    }
                    .await
                );
                if result.is_ok() {
                    out.cascaded(cascade);
                }
                finish!(reply, result)
            }
            Op::Delete { id, reply } => finish!(reply, sql::delete(&mut *conn, id).await),
            Op::Renew {
                owner,
                running,
                ttl,
                reply,
            } => finish!(reply, sql::renew(&mut *conn, &owner, &running, ttl).await),
            Op::Prune {
                before,
                limit,
                reply,
            } => finish!(reply, sql::prune(&mut *conn, before, limit).await),
            Op::InsertBlob { meta, reply } => {
                finish!(reply, sql::insert_blob(&mut *conn, meta).await)
            }
            Op::DeleteBlob { id, reply } => {
                let result = sql::delete_blob(&mut *conn, id.clone()).await;
                if let Ok(BlobDeleteOutcome::Deleted) = &result {
                    out.notices.push(Notice::BlobsDeleted(vec![id]));
                }
                finish!(reply, result)
            }
            Op::PruneBlobs { limit, reply } => {
                let result = sql::prune_blobs(&mut *conn, limit).await;
                if let Ok(gone) = &result {
                    if !gone.is_empty() {
                        out.notices.push(Notice::BlobsDeleted(gone.clone()));
                    }
                }
                finish!(reply, result)
            }
            Op::Beat { beat, reply } => finish!(reply, sql::beat(&mut *conn, beat).await),
            Op::ForgetServers { silent, reply } => {
                finish!(reply, sql::forget_servers(&mut *conn, silent).await)
            }
            Op::CreateSchedule { schedule, reply } => {
                let result = schedules::create(&mut *conn, schedule).await;
                if matches!(result, Ok(true)) {
                    out.notices.push(Notice::Schedules);
                }
                finish!(reply, result)
            }
            Op::SetPaused {
                name,
                resume,
                now,
                reply,
            } => {
                let result = schedules::set_paused(&mut *conn, &name, resume, now).await;
                if matches!(result, Ok(Some(_))) {
                    out.notices.push(Notice::Schedules);
                }
                finish!(reply, result)
            }
            Op::DeleteSchedule { name, reply } => {
                let result = schedules::delete(&mut *conn, &name).await;
                if matches!(result, Ok(true)) {
                    out.notices.push(Notice::Schedules);
                }
                finish!(reply, result)
            }
            Op::FireSchedule { fire, reply } => {
                let result = schedules::fire(&mut *conn, fire).await.map(|fired| {
                    fired.map(|(jobs, lanes)| {
                        // The ticker counts its jobs (`Dispatcher::stored`).
                        out.notices
                            .extend(lanes.into_iter().map(|lane| Notice::New { lane, added: 0 }));
                        jobs
                    })
                });
                finish!(reply, result)
            }
            Op::ClaimCallbacks {
                limit,
                now,
                until,
                reply,
            } => finish!(
                reply,
                sql::claim_callbacks(&mut *conn, limit, now, until).await
            ),
            Op::RecordCallback {
                job,
                attempt,
                outcome,
                now,
                reply,
            } => finish!(
                reply,
                sql::record_callback(&mut *conn, job, attempt, outcome, now).await
            ),
        }
    })
}
