//! Change notifications: who is waiting on which job.
//!
//! Long-polls (`?wait=`) and event streams subscribe to one job; every state change the store
//! commits is published here. Only jobs someone watches cost anything: a publish is a map
//! lookup, and a watcher is woken only by its own job, so ten thousand waiters are not all
//! woken by every change.
//!
//! On a shared store the changes other servers make arrive as the store's notices (as do, on
//! every store, the children a cascade moved, which no server published itself); the
//! dispatcher reads those jobs (one query per notice) and publishes them here only when
//! someone follows them, so the stream of every change carries the whole cluster's changes
//! (all but claims, which no store announces: a job another server runs shows as queued,
//! then as finished).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::job::{Job, JobId};

pub struct Events {
    // A std Mutex, not tokio's: it is held for a map operation only, never across an await.
    watchers: Mutex<HashMap<JobId, watch::Sender<Option<Arc<Job>>>>>,
    all: broadcast::Sender<Arc<Job>>,
    closing: watch::Sender<bool>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        let (all, _) = broadcast::channel(1024);
        let (closing, _) = watch::channel(false);
        Events {
            watchers: Mutex::new(HashMap::new()),
            all,
            closing,
        }
    }

    /// Tells watchers of `job` (and of every job) about its new state.
    pub fn publish(&self, job: &Job) {
        let has_global = self.all.receiver_count() > 0;
        let watchers = self.watchers.lock().expect("events lock");
        let local = watchers.get(&job.id);
        if local.is_none() && !has_global {
            return;
        }
        let shared = Arc::new(job.clone());
        if let Some(tx) = local {
            tx.send_replace(Some(shared.clone()));
        }
        drop(watchers);
        if has_global {
            let _ = self.all.send(shared);
        }
    }

    /// Whether anyone follows this job (its own watchers, or the stream of every change).
    pub fn is_watched(&self, id: JobId) -> bool {
        self.all.receiver_count() > 0
            || self.watchers.lock().expect("events lock").contains_key(&id)
    }

    /// Which of `ids` anyone follows: all of them while the stream of every change has
    /// readers, else those with watchers of their own (one lock for the whole list).
    pub fn watched_of(&self, ids: Vec<JobId>) -> Vec<JobId> {
        if self.all.receiver_count() > 0 {
            return ids;
        }
        let watchers = self.watchers.lock().expect("events lock");
        if watchers.is_empty() {
            return Vec::new();
        }
        ids.into_iter()
            .filter(|id| watchers.contains_key(id))
            .collect()
    }

    /// Watches one job. Subscribe *before* reading the job's current state, so no change can
    /// fall between the read and the wait.
    pub fn watch(self: &Arc<Self>, id: JobId) -> JobWatch {
        let mut watchers = self.watchers.lock().expect("events lock");
        let rx = watchers
            .entry(id)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        JobWatch {
            id,
            rx: Some(rx),
            events: self.clone(),
        }
    }

    /// Every change to every job (dashboards). A slow reader misses events rather than making
    /// the service buffer without bound.
    pub fn subscribe_all(&self) -> broadcast::Receiver<Arc<Job>> {
        self.all.subscribe()
    }

    /// Ends every long-poll and stream (shutdown).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}

/// A subscription to one job's changes; unsubscribes when dropped.
pub struct JobWatch {
    id: JobId,
    rx: Option<watch::Receiver<Option<Arc<Job>>>>,
    events: Arc<Events>,
}

impl JobWatch {
    /// The next published state of the job. `None` if the sender is gone.
    pub async fn changed(&mut self) -> Option<Arc<Job>> {
        let rx = self.rx.as_mut()?;
        rx.changed().await.ok()?;
        rx.borrow_and_update().clone()
    }
}

impl Drop for JobWatch {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut watchers = self.events.watchers.lock().expect("events lock");
        if watchers
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            watchers.remove(&self.id);
        }
    }
}
