//! Blob endpoints: upload (streamed to disk), download (from any server: one that did not
//! take the upload fetches a copy from the one that did), delete (every server's copy goes).

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use tokio::io::AsyncReadExt;

use super::{ApiError, AppState, Path, Query};
use crate::blob::{BlobMeta, UploadError};
use crate::dispatch::BlobFetchError;
use crate::store::BlobDeleteOutcome;

pub async fn upload(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    req: Request,
) -> Result<Response, ApiError> {
    if let Some(k) = query.keys().find(|k| k.as_str() != "keep") {
        return Err(ApiError::invalid(format!(
            "unknown query parameter `{k}`; an upload takes only `keep`"
        )));
    }
    let keep = match query.get("keep").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "keep: `{other}` must be true or false"
            )))
        }
    };
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.split(';').next().unwrap_or("").trim() != "application/octet-stream" {
        return Err(ApiError::unsupported_media(format!(
            "send the bytes with `Content-Type: application/octet-stream` (got `{content_type}`)"
        )));
    }
    let limit = state.settings.max_blob_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(format!(
            "the blob is over the {limit}-byte limit (--max-blob-bytes)"
        )));
    }
    let body = req.into_body().into_data_stream();
    let meta = match state.blobs.write(body, limit).await {
        Ok(m) => BlobMeta {
            keep,
            origin: state.origin.clone(),
            ..m
        },
        Err(e @ UploadError::TooLarge { .. }) => return Err(ApiError::too_large(e.to_string())),
        Err(e @ UploadError::Interrupted(_)) => return Err(ApiError::bad_request(e.to_string())),
        Err(e) => return Err(ApiError::internal(e)),
    };
    if let Err(e) = state.dispatcher.store().insert_blob(meta.clone()).await {
        let _ = state.blobs.remove(&meta.id).await;
        return Err(e.into());
    }
    let location = HeaderValue::from_str(&format!("/v1/blobs/{}", meta.id))
        .expect("a blob path is a valid header");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(meta),
    )
        .into_response())
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!("no blob has the id `{id}`"))
}

pub async fn download(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = crate::blob::canonical_id(&raw).ok_or_else(|| unknown(&raw))?;
    let meta = state
        .dispatcher
        .store()
        .get_blob(&id)
        .await?
        .ok_or_else(|| unknown(&id))?;
    let path = state.blobs.path(&meta.id).ok_or_else(|| unknown(&id))?;
    // Uploaded to another server: fetch a copy from it first (kept here for later reads).
    if tokio::fs::metadata(&path).await.is_err() {
        match state.dispatcher.local_blob(&meta).await {
            Ok(()) => {}
            Err(e @ BlobFetchError::Fetch(_)) => {
                tracing::warn!(blob = %id, error = %e, "a blob could not be fetched from its origin");
                return Err(ApiError::unavailable(format!(
                    "blob {id} is held by another server, which did not give it now; try again later"
                )));
            }
            // Falls through to the open, which says what is wrong.
            Err(BlobFetchError::Missing(_)) => {}
        }
    }
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("blob {id}: {e}")))?;
    // Stream the file in 256 KiB reads: never the whole blob in memory.
    let chunks = stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 256 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(meta.size)),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

pub async fn remove(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = crate::blob::canonical_id(&raw).ok_or_else(|| unknown(&raw))?;
    match state.dispatcher.store().delete_blob(&id).await? {
        BlobDeleteOutcome::Deleted => {
            // The row is gone; the file goes in a task of its own, so a client that hangs up
            // now cannot leave it behind.
            let blobs = state.blobs.clone();
            let removed = tokio::spawn(async move {
                if let Err(e) = blobs.remove(&id).await {
                    tracing::warn!(blob = %id, error = %e, "the blob's file could not be removed");
                }
            });
            let _ = removed.await;
            Ok(StatusCode::NO_CONTENT)
        }
        BlobDeleteOutcome::InUse(n) => Err(ApiError::conflict(format!(
            "{n} unfinished job(s) use blob {id}; cancel them or let them finish first"
        ))),
        BlobDeleteOutcome::NotFound => Err(unknown(&id)),
    }
}
