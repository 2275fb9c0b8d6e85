//! The batcher task: group commit for PostgreSQL's hot writes, as the SQLite writer does.
//!
//! Submits without idempotency keys and settles, the bulk of the traffic, are sent here. The
//! task takes whatever is waiting (up to [`MAX_BATCH`] calls) and writes the round in one
//! transaction: every insert as one `INSERT … SELECT FROM UNNEST`, every settle as one
//! `UPDATE … FROM UNNEST`, and one notification per lane and kind (not one per row), queued
//! inside the transaction so PostgreSQL delivers them at the commit. Each caller is answered
//! only after the COMMIT; a round is all or nothing, so if any statement or the commit fails,
//! every caller of the round gets [`StoreError::Unavailable`] and nothing of it was stored.
//!
//! Why batch when PostgreSQL takes concurrent writers: every transaction costs round trips
//! and a WAL flush of its own, and the per-row trigger this replaced sent a NOTIFY for every
//! row (each one taking the notification queue's lock until commit). One transaction per
//! round turns a thousand small commits into one.
//!
//! The task runs on its own one-connection pool, so a round never waits behind reads and
//! claims for a connection of the shared pool, and a lost connection is replaced on the next
//! round. Nothing that must follow a commit lives in a caller's future: a caller that stops
//! waiting (an HTTP client hung up) still has its write committed and announced.

use std::collections::HashMap;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::notify::Notices;
use super::sql;
use crate::clock::Micros;
use crate::job::{Job, JobId, JobStatus, NewJob};
use crate::store::graph::{Cascade, NewRow};
use crate::store::{frees_key, Inserted, Settle, StoreError};

/// Most calls written in one round.
pub(super) const MAX_BATCH: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One call, with the channel its typed answer goes back on.
pub(super) enum Op {
    /// New jobs, none with an idempotency key (keyed ones look up their key first, on the
    /// store's own path).
    Insert {
        jobs: Vec<NewJob>,
        reply: Reply<Vec<Inserted>>,
    },
    /// Moves already checked against the state machine.
    Settle {
        moves: Vec<Settle>,
        reply: Reply<Vec<Option<Job>>>,
    },
}

impl Op {
    fn fail(self, msg: &str) {
        fn send<T>(reply: Reply<T>, msg: &str) {
            let _ = reply.send(Err(StoreError::Unavailable(msg.to_string())));
        }
        match self {
            Op::Insert { reply, .. } => send(reply, msg),
            Op::Settle { reply, .. } => send(reply, msg),
        }
    }
}

/// Runs until every sender is gone (the store was dropped).
pub(super) async fn run(pool: PgPool, channel: String, origin: String, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let round = std::mem::take(&mut batch);
        let started = std::time::Instant::now();
        let calls = round.len();
        let mut result = write_round(&pool, &channel, &origin, &round).await;
        if result.as_ref().is_err_and(sql::is_deadlock) {
            // PostgreSQL chose this round as a deadlock's victim (a lock order the sorted
            // settles missed): nothing of it was stored, and once is enough to try again.
            tracing::warn!("a write round was a deadlock's victim; writing it again");
            result = write_round(&pool, &channel, &origin, &round).await;
        }
        match result {
            Ok(answers) => {
                metrics::histogram!("offload_store_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("offload_store_batch_size").record(calls as f64);
                for (op, answer) in round.into_iter().zip(answers) {
                    match (op, answer) {
                        (Op::Insert { jobs, reply }, Answer::Inserted) => {
                            let created =
                                jobs.iter().map(|j| Inserted::Created(j.to_job())).collect();
                            let _ = reply.send(Ok(created));
                        }
                        (Op::Settle { reply, .. }, Answer::Settled(moved)) => {
                            let _ = reply.send(Ok(moved));
                        }
                        (op, _) => op.fail("the batcher mixed up its answers"),
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, calls, "a write round failed; none of it was stored");
                for op in round {
                    op.fail(&msg);
                }
            }
        }
    }
}

/// A call's answer, held until the commit.
enum Answer {
    Inserted,
    Settled(Vec<Option<Job>>),
}

/// Writes one round in one transaction and commits it; answers in the order of `round`. On
/// an error the transaction is dropped, which rolls it back (and its notifications with it).
async fn write_round(
    pool: &PgPool,
    channel: &str,
    origin: &str,
    round: &[Op],
) -> Result<Vec<Answer>, StoreError> {
    let mut tx = pool.begin().await?;
    let mut notices = Notices::default();

    // Jobs without parents or keys only (the store sends the others down its own path).
    let rows: Vec<NewRow> = round
        .iter()
        .filter_map(|op| match op {
            Op::Insert { jobs, .. } => Some(jobs.iter().map(NewRow::queued)),
            Op::Settle { .. } => None,
        })
        .flatten()
        .collect();
    sql::insert_rows(&mut tx, &rows).await?;
    for row in &rows {
        *notices.new.entry(row.job.executor).or_default() += 1;
        notices.changed.push(row.job.id);
    }

    // Moves in layers: a job's first move in the round goes in the first statement, its
    // second (two callers settling one job, or one caller twice) in the next, which runs
    // after it and meets its guard; so each statement names a job at most once and its
    // RETURNING says unambiguously which moves applied.
    let mut layers: Vec<Vec<&Settle>> = Vec::new();
    let mut seen: HashMap<JobId, usize> = HashMap::new();
    let mut placed: Vec<usize> = Vec::new();
    for op in round {
        if let Op::Settle { moves, .. } = op {
            for m in moves {
                let n = seen.entry(m.job.id).or_insert(0);
                if layers.len() <= *n {
                    layers.push(Vec::new());
                }
                layers[*n].push(m);
                placed.push(*n);
                *n += 1;
            }
        }
    }
    let mut done = Vec::with_capacity(layers.len());
    for layer in &mut layers {
        // In id order, the order a renewal locks rows in (see `sql::settle_rows`).
        layer.sort_unstable_by_key(|m| m.job.id);
        done.push(sql::settle_rows(&mut tx, layer).await?);
    }

    let mut placed = placed.into_iter();
    let mut answers = Vec::with_capacity(round.len());
    // Moves into a final state that owe a callback: their outbox rows, in this transaction.
    let (mut calls_back, mut since) = (Vec::new(), Vec::new());
    let mut finals = Vec::new();
    for op in round {
        answers.push(match op {
            Op::Insert { .. } => Answer::Inserted,
            Op::Settle { moves, .. } => Answer::Settled(
                moves
                    .iter()
                    .map(|m| {
                        let layer = placed.next().expect("every move placed");
                        let job = m.moved();
                        done[layer].contains(&(job.id, job.attempt)).then(|| {
                            if job.status == JobStatus::Queued {
                                *notices.new.entry(job.executor).or_default() += 1;
                            } else if frees_key(&job) {
                                // Its key's queued jobs may start: the lane looks (adds 0).
                                notices.new.entry(job.executor).or_default();
                            }
                            if m.calls_back() {
                                calls_back.push(job.id);
                                since.push(m.now.0);
                            }
                            if job.status.is_final() {
                                finals.push(job.id);
                            }
                            notices.changed.push(job.id);
                            job
                        })
                    })
                    .collect(),
            ),
        });
    }
    sql::enqueue_callbacks(&mut tx, &calls_back, &since).await?;
    // The children of jobs that finished move on in the same transaction (one lookup of the
    // edges per round when there are none); those a cascade cancels owe callbacks too.
    if !finals.is_empty() {
        let mut cascade = Cascade::default();
        let now = Micros::now();
        super::graph::resolve(&mut tx, finals, now, &mut cascade).await?;
        sql::enqueue_owed(&mut tx, &cascade.moved, now.0).await?;
        notices.cascaded(cascade);
    }
    notices.send(&mut tx, channel, origin).await?;
    tx.commit().await?;
    Ok(answers)
}
