//! Blobs: large byte arrays, streamed to disk once and read by many jobs.
//!
//! An upload is written to a temp file in `<data-dir>/blobs/` while its sha256 is computed,
//! never held whole in memory. Over the size limit, or cut off halfway, the temp file is removed
//! and nothing is recorded. A complete upload is synced, renamed to `<data-dir>/blobs/<id>`, and
//! only then recorded in the store, so a recorded blob always has all its bytes. Temp files
//! left by a crash are removed at the next start.

use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::clock::Micros;

const TEMP_PREFIX: &str = ".upload-";
const OUTPUT_PREFIX: &str = ".out-";

/// Where attempt `attempt` of job `job` writes an output blob before it is adopted. Named by
/// job and attempt, so the dispatcher can find (and adopt, or remove) it whatever the task
/// returned, and a crash leaves only files that the next start removes.
pub fn output_temp_path(dir: &Path, job: crate::job::JobId, attempt: u32) -> PathBuf {
    dir.join(format!("{OUTPUT_PREFIX}{job}-{attempt}"))
}

/// What is known of a stored blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlobMeta {
    pub id: String,
    pub size: u64,
    pub sha256: String,
    /// Kept after the last job that used it is pruned (uploaded with `?keep=true`).
    pub keep: bool,
    /// The server that holds the bytes (its advertised URL), for servers that do not.
    #[serde(skip)]
    pub origin: Option<String>,
    #[serde(skip)]
    pub created_at: Micros,
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the blob is over the {limit}-byte limit (--max-blob-bytes)")]
    TooLarge { limit: u64 },
    #[error("the upload was cut off: {0}")]
    Interrupted(String),
    #[error("storing the blob failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A blob id in its one canonical form (a lowercase, hyphenated UUID), or `None` if `raw` is
/// not a blob id. Ids are normalised at the edge, so every later comparison is plain equality.
pub fn canonical_id(raw: &str) -> Option<String> {
    Uuid::parse_str(raw)
        .ok()
        .map(|u| u.hyphenated().to_string())
}

/// The folder of blob files.
#[derive(Clone, Debug)]
pub struct BlobDir {
    dir: PathBuf,
}

impl BlobDir {
    /// Opens (creating) `dir` and removes temp files an earlier process left behind.
    pub fn open(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) || name.starts_with(OUTPUT_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(BlobDir { dir })
    }

    /// Where the bytes of blob `id` live. `id` must be a UUID (checked), so it cannot name
    /// anything outside the folder.
    pub fn path(&self, id: &str) -> Option<PathBuf> {
        Uuid::parse_str(id)
            .ok()
            .map(|u| self.dir.join(u.hyphenated().to_string()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Streams `body` to a new blob file; at most `limit` bytes.
    pub async fn write<S, E>(&self, mut body: S, limit: u64) -> Result<BlobMeta, UploadError>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let id = Uuid::now_v7().hyphenated().to_string();
        let temp = self.dir.join(format!("{TEMP_PREFIX}{id}"));
        // Removes the temp file on every early return.
        struct Cleanup(Option<PathBuf>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                if let Some(p) = self.0.take() {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        let mut cleanup = Cleanup(Some(temp.clone()));
        let mut file = tokio::fs::File::create(&temp).await?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UploadError::Interrupted(e.to_string()))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(UploadError::TooLarge { limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        drop(file);
        let path = self.dir.join(&id);
        tokio::fs::rename(&temp, &path).await?;
        cleanup.0 = None;
        Ok(BlobMeta {
            id,
            size,
            sha256: crate::task::hex(&hasher.finalize()),
            keep: false,
            origin: None,
            created_at: Micros::now(),
        })
    }

    /// Turns an attempt's finished output file into a blob: a fresh id, renamed into place.
    pub fn adopt_output(
        &self,
        job: crate::job::JobId,
        attempt: u32,
        size: u64,
        sha256: String,
    ) -> std::io::Result<BlobMeta> {
        let id = Uuid::now_v7().hyphenated().to_string();
        std::fs::rename(
            output_temp_path(&self.dir, job, attempt),
            self.dir.join(&id),
        )?;
        // An output blob is a result: it is kept until deleted, like an uploaded one with
        // `keep`, rather than going with the job that made it.
        Ok(BlobMeta {
            id,
            size,
            sha256,
            keep: true,
            origin: None,
            created_at: Micros::now(),
        })
    }

    /// Fetches blob `meta` from the server that holds it (`meta.origin`) into this folder,
    /// checking its sha256, unless it is here already. The copy stays: later jobs on this
    /// server read it locally (a cache of the origin's bytes).
    pub async fn fetch(
        &self,
        meta: &BlobMeta,
        client: &reqwest::Client,
        token: Option<&str>,
    ) -> Result<(), String> {
        let path = self.path(&meta.id).ok_or("not a blob id")?;
        if tokio::fs::metadata(&path).await.is_ok() {
            return Ok(());
        }
        let origin = meta
            .origin
            .as_deref()
            .ok_or_else(|| format!("blob {} is not on this server and has no origin", meta.id))?;
        let mut req = client.get(format!(
            "{}/v1/blobs/{}",
            origin.trim_end_matches('/'),
            meta.id
        ));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("fetching blob {} from {origin}: {e}", meta.id))?;
        let fetched = self
            .write(resp.bytes_stream(), meta.size)
            .await
            .map_err(|e| format!("fetching blob {} from {origin}: {e}", meta.id))?;
        let temp = self.dir.join(&fetched.id);
        if fetched.sha256 != meta.sha256 || fetched.size != meta.size {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(format!(
                "blob {} from {origin} does not match its sha256",
                meta.id
            ));
        }
        tokio::fs::rename(&temp, &path)
            .await
            .map_err(|e| format!("storing blob {}: {e}", meta.id))
    }

    /// Removes an attempt's output file, if it left one.
    pub fn discard_output(&self, job: crate::job::JobId, attempt: u32) {
        let _ = std::fs::remove_file(output_temp_path(&self.dir, job, attempt));
    }

    pub async fn remove(&self, id: &str) -> std::io::Result<()> {
        match self.path(id) {
            Some(p) => match tokio::fs::remove_file(p).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }
}
