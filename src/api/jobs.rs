//! The job endpoints: submit, batch, get (with `?wait=`), list, cancel, delete, events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde::Serialize;
use serde_json::Value;

use super::{ApiError, AppState, JsonObject, Path, Query};
use crate::clock::Micros;
use crate::job::{ExecutorKind, Job, JobId, JobStatus, Kind};
use crate::spec;
use crate::store::{CancelOutcome, DeleteOutcome, Inserted, ListFilter, RetryOutcome};

/// The most specs one batch may hold.
pub const MAX_BATCH: usize = 1000;
/// The longest a `?wait=` may hold a request, in seconds.
pub const MAX_WAIT_S: f64 = 60.0;

/// A page of jobs, newest first.
#[derive(Serialize)]
pub struct JobList {
    jobs: Vec<Job>,
    next_cursor: Option<String>,
}

/// The jobs of a batch, in the order given.
#[derive(Serialize)]
pub struct Batch {
    jobs: Vec<Job>,
}

/// What a bulk cancel or retry did.
#[derive(Serialize)]
pub struct Bulk {
    /// How many jobs matched and were moved by this call.
    matched: usize,
    /// Their ids, oldest first.
    ids: Vec<JobId>,
    /// Whether the call stopped at its `limit`: more jobs may match; call again.
    limit_reached: bool,
}

fn parse_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no job has the id `{raw}`")))
}

fn job_location(id: JobId) -> HeaderValue {
    HeaderValue::from_str(&format!("/v1/jobs/{id}")).expect("a job path is a valid header")
}

/// A job as callers see it, with live progress when it is running here, and why it waits
/// when flow control holds it back.
async fn present(state: &AppState, job: Job) -> Job {
    present_all(state, vec![job])
        .await
        .pop()
        .expect("one job in, one out")
}

/// Jobs as callers see them (see [`present`]): one look at the store for all their keys.
async fn present_all(state: &AppState, mut jobs: Vec<Job>) -> Vec<Job> {
    for job in jobs.iter_mut().filter(|j| j.status == JobStatus::Running) {
        if let Some(p) = state.dispatcher.live_progress(job.id) {
            job.progress = p;
        }
    }
    let now = Micros::now();
    let held = |j: &Job| {
        j.status == JobStatus::Queued
            && j.scheduled_at <= now
            && (j.concurrency.is_some() || j.rate.is_some())
    };
    let mut conc: Vec<String> = Vec::new();
    let mut rate: Vec<String> = Vec::new();
    for j in jobs.iter().filter(|j| held(j)) {
        conc.extend(j.concurrency.as_ref().map(|c| c.key.clone()));
        rate.extend(j.rate.as_ref().map(|r| r.key.clone()));
    }
    if conc.is_empty() && rate.is_empty() {
        return jobs;
    }
    match state.dispatcher.store().flow_state(&conc, &rate).await {
        Ok(flow) => {
            for job in jobs.iter_mut().filter(|j| held(j)) {
                if let Some((why, until)) = crate::flow::waiting_for(job, &flow, now) {
                    job.waiting_for = Some(why);
                    job.waiting_until = until;
                }
            }
        }
        // The job is shown without the reason: the store's trouble shows elsewhere.
        Err(e) => tracing::warn!(error = %e, "could not read flow control state"),
    }
    jobs
}

/// Looks up the blobs the specs name, for parsing (see [`spec::blob_sizes`]).
async fn blob_sizes(state: &AppState, specs: &[&Value]) -> Result<spec::BlobSizes, ApiError> {
    let store = state.dispatcher.store();
    Ok(spec::blob_sizes(store.as_ref(), state.dispatcher.registry(), specs).await?)
}

fn idempotency_header(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid("the Idempotency-Key header must be visible ASCII"))
        })
        .transpose()
}

pub async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let key = idempotency_header(&headers)?;
    let body = Value::Object(body);
    let sizes = blob_sizes(&state, &[&body]).await?;
    let job = spec::parse(
        &body,
        "",
        key,
        state.dispatcher.registry(),
        &state.spec_defaults(),
        &sizes,
        Micros::now(),
    )
    .map_err(ApiError::invalid)?;
    let mut inserted = state.dispatcher.submit(vec![job]).await?;
    let (status, job) = match inserted.pop().expect("one job in, one out") {
        Inserted::Created(j) => (StatusCode::ACCEPTED, j),
        Inserted::Existing(j) => (StatusCode::OK, j),
    };
    let location = job_location(job.id);
    let job = present(&state, job).await;
    Ok((status, [(header::LOCATION, location)], Json(job)).into_response())
}

pub async fn submit_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonObject(mut body): JsonObject,
) -> Result<Response, ApiError> {
    if headers.contains_key("idempotency-key") {
        return Err(ApiError::invalid(
            "a batch takes no Idempotency-Key header; give each spec its own `idempotency_key`",
        ));
    }
    if let Some(other) = body.keys().find(|k| k.as_str() != "jobs") {
        return Err(ApiError::invalid(format!(
            "unknown field `{other}`; a batch is {{\"jobs\": [spec, ...]}}"
        )));
    }
    let Some(Value::Array(specs)) = body.remove("jobs") else {
        return Err(ApiError::invalid(
            "a batch is {\"jobs\": [spec, ...]}, with `jobs` an array",
        ));
    };
    if specs.is_empty() || specs.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!(
            "jobs: a batch holds 1 to {MAX_BATCH} specs, not {}",
            specs.len()
        )));
    }
    let now = Micros::now();
    let registry = state.dispatcher.registry();
    let defaults = state.spec_defaults();
    let sizes = blob_sizes(&state, &specs.iter().collect::<Vec<_>>()).await?;
    let jobs = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            spec::parse(
                s,
                &format!("jobs[{i}]"),
                None,
                registry,
                &defaults,
                &sizes,
                now,
            )
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| ApiError::invalid(format!("{e}; nothing was stored")))?;
    spec::check_batch_parents(&jobs)
        .map_err(|e| ApiError::invalid(format!("{e}; nothing was stored")))?;
    let inserted = state.dispatcher.submit(jobs).await?;
    let jobs: Vec<Job> = inserted
        .into_iter()
        .map(|i| match i {
            Inserted::Created(j) | Inserted::Existing(j) => j,
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(Batch { jobs })).into_response())
}

fn query_wait(query: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = query.get("wait") else {
        return Ok(None);
    };
    let secs: f64 = raw
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= MAX_WAIT_S)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "wait: `{raw}` must be a number of seconds from 0 to {MAX_WAIT_S}"
            ))
        })?;
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// A `true`/`false` query parameter (absent: false).
fn query_flag(query: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match query.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "{name}: `{other}` must be true or false"
        ))),
    }
}

pub async fn get_job(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(&raw)?;
    let wait = query_wait(&query)?;
    let children = query_flag(&query, "children")?;
    let events = state.dispatcher.events().clone();
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut watch = wait.map(|_| events.watch(id));
    let mut job = state
        .dispatcher
        .store()
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job has the id `{id}`")))?;
    if let (Some(wait), Some(w)) = (wait, watch.as_mut()) {
        let deadline = tokio::time::Instant::now() + wait;
        let mut closing = events.closing();
        while !job.status.is_final() && !*closing.borrow() {
            tokio::select! {
                changed = w.changed() => match changed {
                    Some(j) => job = (*j).clone(),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = closing.changed() => break,
            }
        }
    }
    if children {
        job.children = Some(state.dispatcher.store().children(id).await?);
    }
    Ok(Json(present(&state, job).await))
}

/// A page's `cursor`: the `next_cursor` of the page before, which is a job id in its
/// hyphenated form. Empty means none, as absent does: the first page (a client that passes
/// on `next_cursor` as it got it, null and all, should not fail).
fn parse_cursor(raw: Option<&str>) -> Result<Option<JobId>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        // The uuid crate also reads braced, urn: and unhyphenated forms; the spec's pattern
        // names one form, so the server takes that one only.
        Some(c) => c
            .parse::<JobId>()
            .ok()
            .filter(|_| c.len() == 36)
            .map(Some)
            .ok_or_else(|| ApiError::invalid("cursor: use the `next_cursor` of the previous page")),
    }
}

/// The filters `GET /v1/jobs` takes, which bulk cancel and retry take too.
const FILTERS: [&str; 6] = [
    "status",
    "task",
    "kind",
    "executor",
    "created_before",
    "created_after",
];

/// Reads the list filters from the query string; any parameter outside `FILTERS` and
/// `extra` is a 422.
fn parse_filter(
    query: &HashMap<String, String>,
    extra: &[&str],
    default_limit: u32,
) -> Result<ListFilter, ApiError> {
    if let Some(k) = query
        .keys()
        .find(|k| !FILTERS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        let known: Vec<&str> = FILTERS.iter().chain(extra).copied().collect();
        return Err(ApiError::invalid(format!(
            "unknown query parameter `{k}`; use {}",
            known.join(", ")
        )));
    }
    let limit = match query.get("limit") {
        None => default_limit,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::invalid(format!("limit: `{l}` must be from 1 to 1000")))?,
    };
    let time = |name: &str| {
        query
            .get(name)
            .map(|t| Micros::parse_rfc3339(t))
            .transpose()
            .map_err(|e| ApiError::invalid(format!("{name}: {e}")))
    };
    Ok(ListFilter {
        status: query
            .get("status")
            .map(|s| s.parse::<JobStatus>())
            .transpose()
            .map_err(|e| ApiError::invalid(format!("status: {e}")))?,
        task: query.get("task").cloned(),
        kind: query
            .get("kind")
            .map(|k| k.parse::<Kind>())
            .transpose()
            .map_err(|e| ApiError::invalid(format!("kind: {e}")))?,
        executor: query
            .get("executor")
            .map(|e| e.parse::<ExecutorKind>())
            .transpose()
            .map_err(|e| ApiError::invalid(format!("executor: {e}")))?,
        created_before: time("created_before")?,
        created_after: time("created_after")?,
        before: None,
        limit,
    })
}

pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<JobList>, ApiError> {
    let mut filter = parse_filter(&query, &["limit", "cursor"], 50)?;
    let limit = filter.limit;
    filter.before = parse_cursor(query.get("cursor").map(String::as_str))?;
    filter.limit = limit + 1;
    let mut jobs = state.dispatcher.store().list(&filter).await?;
    let next_cursor = if jobs.len() > limit as usize {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id.to_string())
    } else {
        None
    };
    let jobs = present_all(&state, jobs).await;
    Ok(Json(JobList { jobs, next_cursor }))
}

/// The statuses a bulk call acts on: the filter's, which must be one of `allowed`, or all of
/// them.
fn bulk_statuses(
    filter: &ListFilter,
    allowed: &[JobStatus],
    what: &str,
) -> Result<Vec<JobStatus>, ApiError> {
    match filter.status {
        None => Ok(allowed.to_vec()),
        Some(s) if allowed.contains(&s) => Ok(vec![s]),
        Some(s) => Err(ApiError::invalid(format!(
            "status: {} jobs cannot be {what}; use {}",
            s.as_str(),
            allowed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        ))),
    }
}

fn bulk(jobs: Vec<Job>, limit: u32) -> Json<Bulk> {
    Json(Bulk {
        matched: jobs.len(),
        limit_reached: jobs.len() >= limit as usize,
        ids: jobs.into_iter().map(|j| j.id).collect(),
    })
}

/// `POST /v1/jobs/cancel?status=&task=&kind=&executor=&created_before=&created_after=&limit=`: cancels
/// up to `limit` (default and most 1000) unfinished jobs that match, oldest first.
pub async fn cancel_matching(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Bulk>, ApiError> {
    let filter = parse_filter(&query, &["limit"], 1000)?;
    let statuses = bulk_statuses(
        &filter,
        &[JobStatus::Waiting, JobStatus::Queued, JobStatus::Running],
        "cancelled",
    )?;
    let limit = filter.limit;
    let jobs = state.dispatcher.cancel_matching(filter, statuses).await?;
    Ok(bulk(jobs, limit))
}

/// `POST /v1/jobs/retry?…`: retries up to `limit` failed or cancelled jobs that match.
pub async fn retry_matching(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Bulk>, ApiError> {
    let filter = parse_filter(&query, &["limit"], 1000)?;
    let statuses = bulk_statuses(
        &filter,
        &[JobStatus::Failed, JobStatus::Cancelled],
        "retried",
    )?;
    let limit = filter.limit;
    let jobs = state.dispatcher.retry_matching(filter, statuses).await?;
    Ok(bulk(jobs, limit))
}

/// `POST /v1/jobs/{id}/retry`: a failed or cancelled job back to queued (or waiting, while
/// a parent is unfinished), with fresh attempts.
pub async fn retry(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(&raw)?;
    match state.dispatcher.retry(id).await? {
        RetryOutcome::Retried(job) => Ok(Json(job)),
        RetryOutcome::NotRetryable(job) => Err(ApiError::conflict(format!(
            "job {id} is {}; only failed or cancelled jobs can be retried",
            job.status.as_str()
        ))),
        RetryOutcome::ParentFailed(_, why) => Err(ApiError::conflict(format!(
            "job {id} would be cancelled again: {why}; retry that parent (its children \
             cancelled for it come back with it)"
        ))),
        RetryOutcome::NotFound => Err(ApiError::not_found(format!("no job has the id `{id}`"))),
    }
}

pub async fn cancel(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = parse_id(&raw)?;
    match state.dispatcher.cancel(id).await? {
        CancelOutcome::Cancelled { job, .. } => Ok(Json(job)),
        CancelOutcome::AlreadyFinal(job) => Err(ApiError::conflict(format!(
            "job {id} is already {}; only queued or running jobs can be cancelled",
            job.status.as_str()
        ))),
        CancelOutcome::NotFound => Err(ApiError::not_found(format!("no job has the id `{id}`"))),
    }
}

pub async fn delete_job(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&raw)?;
    match state.dispatcher.store().delete(id).await? {
        DeleteOutcome::Deleted => Ok(StatusCode::NO_CONTENT),
        DeleteOutcome::Unfinished(job) => Err(ApiError::conflict(format!(
            "job {id} is {}; cancel it or let it finish before deleting it",
            job.status.as_str()
        ))),
        DeleteOutcome::NotFound => Err(ApiError::not_found(format!("no job has the id `{id}`"))),
    }
}

/// Server-Sent Events: the job now, then each change, ending after its final state.
pub async fn events(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = parse_id(&raw)?;
    let events = state.dispatcher.events().clone();
    let watch = events.watch(id);
    let job = state
        .dispatcher
        .store()
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no job has the id `{id}`")))?;
    let first = present(&state, job).await;
    let closing = events.closing();
    // State: the next job to send (if any), the subscription, whether the stream is over.
    let stream = stream::unfold(
        (Some(first), watch, closing, false),
        |(pending, mut watch, mut closing, done)| async move {
            if done {
                return None;
            }
            let job = match pending {
                Some(j) => j,
                None => {
                    if *closing.borrow() {
                        return None;
                    }
                    tokio::select! {
                        j = watch.changed() => (*j?).clone(),
                        _ = closing.changed() => return None,
                    }
                }
            };
            let is_final = job.status.is_final();
            let event = Event::default()
                .event("job")
                .data(serde_json::to_string(&job).unwrap_or_default());
            Some((Ok(event), (None, watch, closing, is_final)))
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Server-Sent Events of every job change, for dashboards. A reader that falls more than the
/// buffer (1,024 events) behind is disconnected rather than buffered for: it can reconnect and
/// read the current state from the list.
pub async fn all_events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = state.dispatcher.events().clone();
    let rx = events.subscribe_all();
    let closing = events.closing();
    let stream = stream::unfold((rx, closing), |(mut rx, mut closing)| async move {
        if *closing.borrow() {
            return None;
        }
        let job = tokio::select! {
            r = rx.recv() => match r {
                Ok(job) => job,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::info!(missed = n, "dropping a slow /v1/events reader");
                    return None;
                }
                Err(_) => return None,
            },
            _ = closing.changed() => return None,
        };
        let event = Event::default()
            .event("job")
            .data(serde_json::to_string(&*job).unwrap_or_default());
        Some((Ok(event), (rx, closing)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
