//! Blobs across servers: a blob's bytes live on the server that took its upload (its
//! `origin`); any other server fetches a copy when a job or a download there needs it, and
//! every server removes its copy when the blob is deleted or pruned anywhere (the store's
//! `BlobsDeleted` notice), with a periodic sweep for a notice that was missed.

use std::time::{Duration, SystemTime};

use super::Dispatcher;
use crate::blob::BlobMeta;
use crate::store::StoreError;

/// The longest a blob fetch from another server may take, whatever the job's own timeout.
pub(super) const BLOB_FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// A blob file younger than this is never swept: an upload or an output blob is renamed into
/// place a moment before the store records it, and a fetched copy may belong to a blob that
/// is being recorded right now.
const SWEEP_GRACE: Duration = Duration::from_secs(60);
/// Blob ids looked up per store call by the sweep.
const SWEEP_BATCH: usize = 500;

/// Why a blob's bytes could not be made local.
#[derive(Debug, thiserror::Error)]
pub enum BlobFetchError {
    /// Nowhere to fetch it from: this server is its origin (or it has none) and the file is
    /// not here.
    #[error("blob {0}'s file is missing and no other server holds it")]
    Missing(String),
    /// The server that holds it did not give it (down, too slow, or the bytes did not match).
    #[error("{0}")]
    Fetch(String),
}

impl Dispatcher {
    /// Makes sure blob `meta`'s bytes are on this server's disk, fetching them from the
    /// server that holds them if not: for a job that names the blob, and for a download
    /// asked of this server. The copy stays, a cache for later jobs and downloads here, until
    /// the blob is deleted anywhere.
    pub async fn local_blob(&self, meta: &BlobMeta) -> Result<(), BlobFetchError> {
        let Some(blobs) = &self.blobs else {
            return Err(BlobFetchError::Missing(meta.id.clone()));
        };
        if blobs.path(&meta.id).is_some_and(|p| p.exists()) {
            return Ok(());
        }
        // Never from itself: the request would come back here and find the file missing.
        if meta.origin.is_none() || meta.origin == self.address {
            return Err(BlobFetchError::Missing(meta.id.clone()));
        }
        tokio::time::timeout(
            BLOB_FETCH_TIMEOUT,
            blobs.fetch(meta, &self.http, self.api_token.as_deref()),
        )
        .await
        .map_err(|_| {
            BlobFetchError::Fetch(format!(
                "fetching blob {} took longer than {} s",
                meta.id,
                BLOB_FETCH_TIMEOUT.as_secs()
            ))
        })?
        .map_err(BlobFetchError::Fetch)?;
        tracing::info!(blob = %meta.id, origin = ?meta.origin, "fetched a blob from the server that holds it");
        Ok(())
    }

    /// Removes this server's files of blobs deleted or pruned (here or on another server).
    pub(super) async fn remove_blob_files(&self, ids: &[String]) {
        let Some(blobs) = &self.blobs else { return };
        for id in ids {
            if let Err(e) = blobs.remove(id).await {
                tracing::warn!(blob = %id, error = %e, "a deleted blob's file could not be removed");
            }
        }
    }

    /// Removes blob files whose blob the store no longer has (a deletion notice this server
    /// missed while its connection was down, or a fetch that finished after the deletion).
    /// Returns how many went.
    pub(super) async fn sweep_blob_files(&self) -> Result<u64, StoreError> {
        let Some(blobs) = &self.blobs else {
            return Ok(0);
        };
        let dir = blobs.dir().to_path_buf();
        // Reading a folder is blocking file-system work.
        let old: Vec<String> = tokio::task::spawn_blocking(move || {
            let cutoff = SystemTime::now() - SWEEP_GRACE;
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return Vec::new();
            };
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_str()?.to_string();
                    // Blob files only: named by their id (temp files start with a dot).
                    (crate::blob::canonical_id(&name).as_deref() == Some(name.as_str()))
                        .then_some(())?;
                    let modified = e.metadata().ok()?.modified().ok()?;
                    (modified < cutoff).then_some(name)
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        let mut removed = 0;
        for chunk in old.chunks(SWEEP_BATCH) {
            let known: std::collections::HashSet<String> =
                self.store.known_blobs(chunk).await?.into_iter().collect();
            let gone: Vec<String> = chunk
                .iter()
                .filter(|id| !known.contains(*id))
                .cloned()
                .collect();
            removed += gone.len() as u64;
            self.remove_blob_files(&gone).await;
        }
        Ok(removed)
    }
}
