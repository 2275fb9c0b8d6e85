//! The schedule endpoints: create, list, get (with its next runs and recent jobs), pause,
//! resume, delete. The ticker (`crate::schedule::ticker`) hears of each change from the
//! store's announcement, not from here.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;

use super::{ApiError, AppState, JsonObject, Path, Query};
use crate::clock::Micros;
use crate::job::Job;
use crate::schedule::{self, CatchUp, Schedule, NEXT_RUNS, RECENT_JOBS};
use crate::spec;

/// A schedule as callers see it.
#[derive(Serialize)]
pub struct ScheduleView {
    name: String,
    cron: String,
    timezone: String,
    job: Value,
    catch_up: CatchUp,
    paused: bool,
    /// The next tick due; `None` while paused.
    next_run: Option<Micros>,
    last_tick: Option<Micros>,
    last_error: Option<String>,
    created_at: Micros,
    updated_at: Micros,
    /// The upcoming ticks (one schedule's answer only; empty while paused).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_runs: Option<Vec<Micros>>,
    /// Its latest jobs, newest tick first (one schedule's answer only).
    #[serde(skip_serializing_if = "Option::is_none")]
    recent_jobs: Option<Vec<Job>>,
}

impl ScheduleView {
    fn brief(s: Schedule) -> Self {
        ScheduleView {
            next_run: (!s.paused).then_some(s.next_run),
            name: s.name,
            cron: s.cron,
            timezone: s.timezone,
            job: s.job,
            catch_up: s.catch_up,
            paused: s.paused,
            last_tick: s.last_tick,
            last_error: s.last_error,
            created_at: s.created_at,
            updated_at: s.updated_at,
            next_runs: None,
            recent_jobs: None,
        }
    }
}

/// A page of schedules, in name order.
#[derive(Serialize)]
pub struct ScheduleList {
    schedules: Vec<ScheduleView>,
    next_cursor: Option<String>,
}

/// The schedule with its next runs and its recent jobs.
async fn full(state: &AppState, s: Schedule) -> Result<ScheduleView, ApiError> {
    let next_runs = if s.paused {
        Vec::new()
    } else {
        let mut runs = vec![s.next_run];
        if let Ok(t) = s.timetable() {
            runs.extend(t.upcoming(s.next_run, NEXT_RUNS - 1));
        }
        runs
    };
    let jobs = state
        .dispatcher
        .store()
        .schedule_jobs(&s.name, RECENT_JOBS)
        .await?;
    let mut view = ScheduleView::brief(s);
    view.next_runs = Some(next_runs);
    view.recent_jobs = Some(jobs);
    Ok(view)
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found(format!("no schedule is named `{name}`"))
}

pub async fn create(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let registry = state.dispatcher.registry();
    let store = state.dispatcher.store();
    let job: Vec<&Value> = body.get("job").into_iter().collect();
    let sizes = spec::blob_sizes(store.as_ref(), registry, &job).await?;
    // Off the runtime's threads: finding the first tick of an expression that rarely or never
    // matches (`0 0 30 2 *`) searches years of dates.
    let (registry, defaults) = (registry.clone(), state.spec_defaults());
    let s = tokio::task::spawn_blocking(move || {
        schedule::parse_request(&body, &registry, defaults, &sizes, Micros::now())
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::invalid(format!("{e}; nothing was stored")))?;
    let name = s.name.clone();
    if !store.create_schedule(s.clone()).await? {
        return Err(ApiError::conflict(format!(
            "a schedule named `{name}` exists; delete it first, or choose another name"
        )));
    }
    let location = HeaderValue::from_str(&format!("/v1/schedules/{name}"))
        .expect("a schedule name is a valid header");
    let view = full(&state, s).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<ScheduleList>, ApiError> {
    const KNOWN: [&str; 2] = ["limit", "cursor"];
    if let Some(k) = query.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError::invalid(format!(
            "unknown query parameter `{k}`; use {}",
            KNOWN.join(", ")
        )));
    }
    let limit = match query.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::invalid(format!("limit: `{l}` must be from 1 to 1000")))?,
    };
    let after = query
        .get("cursor")
        .map(String::as_str)
        .filter(|c| !c.is_empty());
    let mut found = state
        .dispatcher
        .store()
        .list_schedules(after, limit + 1)
        .await?;
    let next_cursor = if found.len() > limit as usize {
        found.truncate(limit as usize);
        found.last().map(|s| s.name.clone())
    } else {
        None
    };
    Ok(Json(ScheduleList {
        schedules: found.into_iter().map(ScheduleView::brief).collect(),
        next_cursor,
    }))
}

pub async fn get_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    let s = state
        .dispatcher
        .store()
        .get_schedule(&name)
        .await?
        .ok_or_else(|| unknown(&name))?;
    Ok(Json(full(&state, s).await?))
}

pub async fn pause(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    let s = state
        .dispatcher
        .store()
        .pause_schedule(&name, Micros::now())
        .await?
        .ok_or_else(|| unknown(&name))?;
    Ok(Json(full(&state, s).await?))
}

/// Resumes at the first tick after now: the ticks of the pause are not caught up.
pub async fn resume(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    let store = state.dispatcher.store();
    let s = store
        .get_schedule(&name)
        .await?
        .ok_or_else(|| unknown(&name))?;
    let now = Micros::now();
    let next_run = s
        .timetable()
        .ok()
        .and_then(|t| t.next_after(now))
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "schedule `{name}` has no tick from now on (its cron expression or time zone \
                 no longer parses here); delete it and create it anew"
            ))
        })?;
    let s = store
        .resume_schedule(&name, next_run, now)
        .await?
        .ok_or_else(|| unknown(&name))?;
    Ok(Json(full(&state, s).await?))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.dispatcher.store().delete_schedule(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown(&name))
    }
}
