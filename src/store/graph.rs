//! Jobs that depend on jobs: what both stores share about them.
//!
//! The edges live in a `job_deps` table (parent, child), and a child lists its parents in its
//! own `depends_on` column. A child is `waiting` until [`after_parents`] says otherwise. The
//! stores apply that decision in the same transaction as the parent's final state (a settle, a
//! cancel), so no crash can fall between a parent finishing and its children moving on; a
//! maintenance sweep ([`crate::store::JobStore::resolve_waiting`]) re-decides waiting jobs
//! whose parents include a final one, as a safety net.
//!
//! Here: how a submit's new jobs get their first status ([`NewRow`], decided from the parents
//! already stored and the other specs of the batch), and how a child's parents, as rows read
//! from the store, become the decision ([`decide`]).

use std::collections::{BTreeMap, HashMap};

use crate::clock::Micros;
use crate::job::{after_parents, AfterParents, ErrorInfo, Job, JobId, JobStatus, NewJob, Parent};
use crate::store::StoreError;

/// A new job as it is stored: its parents resolved to ids, its first status decided.
#[derive(Debug)]
pub(crate) struct NewRow<'a> {
    pub job: &'a NewJob,
    pub depends_on: Vec<JobId>,
    /// `waiting`, `queued`, or `cancelled` (a parent had already failed).
    pub status: JobStatus,
    pub error: Option<ErrorInfo>,
}

impl<'a> NewRow<'a> {
    /// A job without parents: queued.
    pub fn queued(job: &'a NewJob) -> Self {
        NewRow {
            job,
            depends_on: Vec::new(),
            status: JobStatus::Queued,
            error: None,
        }
    }

    /// Set exactly when the row is stored final (cancelled: a parent had failed).
    pub fn finished_at(&self) -> Option<Micros> {
        self.status.is_final().then_some(self.job.created_at)
    }

    /// `depends_on` as the JSON text both stores keep (NULL when there are none).
    pub fn depends_on_json(&self) -> Option<String> {
        (!self.depends_on.is_empty()).then(|| ids_json(&self.depends_on))
    }

    /// The job object this row becomes.
    pub fn to_job(&self) -> Job {
        let mut job = self.job.to_job();
        job.status = self.status;
        job.error = self.error.clone();
        job.finished_at = self.finished_at();
        job.depends_on = self.depends_on.clone();
        job
    }
}

/// Ids as a JSON array of strings.
pub(crate) fn ids_json(ids: &[JobId]) -> String {
    serde_json::to_string(&ids.iter().map(|i| i.to_string()).collect::<Vec<_>>())
        .expect("strings serialize")
}

/// Reads a `depends_on` column back.
pub(crate) fn parse_ids(text: Option<String>) -> Result<Vec<JobId>, StoreError> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let raw: Vec<String> =
        serde_json::from_str(&text).map_err(|e| crate::store::corrupt("depends_on", e))?;
    raw.iter()
        .map(|s| {
            s.parse()
                .map_err(|e| crate::store::corrupt("depends_on", e))
        })
        .collect()
}

/// The stored jobs that a submit's new jobs name as parents (not specs of the same submit):
/// the store looks up their statuses, which must all exist.
pub(crate) fn stored_parents(jobs: &[NewJob], fresh: &[usize]) -> Vec<JobId> {
    let mut out: Vec<JobId> = fresh
        .iter()
        .flat_map(|&i| jobs[i].depends_on.iter())
        .filter_map(|p| match p {
            Parent::Job(id) => Some(*id),
            Parent::Batch(_) => None,
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The rows to store for a submit's fresh jobs (`fresh`, indexes into `jobs`), in the order
/// of `fresh`. `ids[i]`: the stored id of spec `i` (its own, or the job an idempotency key
/// found); `replayed`: the status of specs that an idempotency key found stored; `alias`: specs
/// that repeat an earlier spec's key, and that spec; `found`: the
/// status of each stored parent ([`stored_parents`]) that exists.
pub(crate) fn rows<'a>(
    jobs: &'a [NewJob],
    ids: &[JobId],
    fresh: &[usize],
    replayed: &HashMap<usize, JobStatus>,
    alias: &HashMap<usize, usize>,
    found: &HashMap<JobId, JobStatus>,
) -> Result<Vec<NewRow<'a>>, StoreError> {
    // Decided in dependency order: a spec's parents in the batch before it.
    let mut decided: HashMap<usize, NewRow<'a>> = HashMap::with_capacity(fresh.len());
    let mut pending: Vec<usize> = fresh.to_vec();
    while !pending.is_empty() {
        let before = pending.len();
        let mut later = Vec::new();
        for i in pending {
            let job = &jobs[i];
            let mut parents: Vec<(JobId, Option<JobStatus>)> = Vec::new();
            let mut ready = true;
            for p in &job.depends_on {
                let (id, status) = match *p {
                    Parent::Job(id) => match found.get(&id) {
                        Some(s) => (id, *s),
                        None => {
                            return Err(StoreError::InvalidDependency {
                                index: i,
                                message: format!("no job has the id `{id}`"),
                            })
                        }
                    },
                    Parent::Batch(j) => {
                        // A spec that repeats an earlier spec's idempotency key is that spec.
                        let j = alias.get(&j).copied().unwrap_or(j);
                        let status = match (replayed.get(&j), decided.get(&j)) {
                            (Some(s), _) => *s,
                            (None, Some(row)) => row.status,
                            (None, None) if j < jobs.len() => {
                                ready = false;
                                break;
                            }
                            (None, None) => {
                                return Err(StoreError::InvalidDependency {
                                    index: i,
                                    message: format!("`#{j}` names no spec of this batch"),
                                })
                            }
                        };
                        (ids[j], status)
                    }
                };
                if !parents.iter().any(|(p, _)| *p == id) {
                    parents.push((id, Some(status)));
                }
            }
            if !ready {
                later.push(i);
                continue;
            }
            let decision = if parents.is_empty() {
                AfterParents::Queue
            } else {
                after_parents(job.run_on_parent_failure, &parents)
            };
            let status = decision.status();
            let error = match decision {
                AfterParents::Cancel(e) => Some(e),
                _ => None,
            };
            decided.insert(
                i,
                NewRow {
                    job,
                    depends_on: parents.into_iter().map(|(id, _)| id).collect(),
                    status,
                    error,
                },
            );
        }
        if later.len() == before {
            return Err(StoreError::InvalidDependency {
                index: later[0],
                message: "its `depends_on` makes a cycle".into(),
            });
        }
        pending = later;
    }
    Ok(fresh
        .iter()
        .map(|i| decided.remove(i).expect("every fresh job decided"))
        .collect())
}

/// One edge as a store reads it to decide a child: the child, whether it runs on a parent's
/// failure, the parent, and the parent's status (`None`: the parent is gone).
pub(crate) type EdgeRow = (JobId, bool, JobId, Option<JobStatus>);

/// What each child moves to, from its edges: children in id order, each with
/// [`after_parents`]'s decision.
pub(crate) fn decide(edges: Vec<EdgeRow>) -> Vec<(JobId, AfterParents)> {
    type Parents = Vec<(JobId, Option<JobStatus>)>;
    let mut by_child: BTreeMap<JobId, (bool, Parents)> = BTreeMap::new();
    for (child, ropf, parent, status) in edges {
        by_child
            .entry(child)
            .or_insert_with(|| (ropf, Vec::new()))
            .1
            .push((parent, status));
    }
    by_child
        .into_iter()
        .map(|(child, (ropf, parents))| (child, after_parents(ropf, &parents)))
        .collect()
}

/// What a store moved besides the jobs it was asked to: children queued (with their lane),
/// put back to waiting, or cancelled, because of their parents.
#[derive(Debug, Default)]
pub(crate) struct Cascade {
    pub queued: Vec<(JobId, crate::job::ExecutorKind)>,
    pub moved: Vec<JobId>,
}
