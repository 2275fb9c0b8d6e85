//! Operations: the catalogue, stats, health, readiness and metrics.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Map, Value};

use super::{ApiError, AppState};
use crate::dispatch::{route, LaneStats, RouteHints};
use crate::flow::{FlowCount, FlowStats, Top, STATS_TOP};

pub async fn tasks(State(state): State<AppState>) -> Json<Value> {
    let tasks: Vec<Value> = state
        .dispatcher
        .registry()
        .iter()
        .map(|t| {
            let executors: Map<String, Value> = t
                .kinds()
                .iter()
                .filter_map(|&k| {
                    route(t.as_ref(), k, RouteHints::default())
                        .ok()
                        .map(|e| (k.as_str().to_string(), json!(e.as_str())))
                })
                .collect();
            let mut task = json!({
                "name": t.name(),
                "description": t.description(),
                "kinds": t.kinds().iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                "default_kind": t.kinds()[0].as_str(),
                "executors": executors,
                "args_schema": t.args_schema(),
                "parent_results": t.parent_results(),
            });
            if let Some(program) = t.program() {
                task["program"] = json!(program);
                task["version"] = json!(t.version().unwrap_or(""));
            }
            task
        })
        .collect();
    Json(json!({ "tasks": tasks }))
}

pub async fn stats(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    // The servers sharing the store, as their heartbeats left them (on SQLite, this one).
    let servers = state.dispatcher.store().servers().await?;
    let executors: Map<String, Value> = state
        .dispatcher
        .stats()
        .into_iter()
        .map(|(k, s)| (k.as_str().to_string(), json!(s)))
        .collect();
    let last_stall = state.health.last.lock().expect("stall lock").clone();
    let flow = state.dispatcher.store().flow_stats(STATS_TOP).await?;
    Ok(Json(json!({
        "executors": executors,
        "draining": state.dispatcher.is_draining(),
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "runtime": {
            "stalls": state.health.stalls.load(std::sync::atomic::Ordering::Relaxed),
            "last_stall": last_stall,
        },
        "server": state.dispatcher.node(),
        "servers": servers,
        "flow": flow_json(&flow),
    })))
}

/// The busiest concurrency keys, rate keys and tenants, each with what runs and what waits,
/// and the rest summed: a bounded answer however many keys there are.
fn flow_json(flow: &FlowStats) -> Value {
    let top = |t: &Top| {
        json!({
            "top": t.top.iter().map(|c| json!({
                "name": c.name, "running": c.running, "queued": c.queued,
            })).collect::<Vec<_>>(),
            "others": {"running": t.others.running, "queued": t.others.queued},
        })
    };
    json!({
        "concurrency": top(&flow.concurrency),
        "rate": top(&flow.rate),
        "tenants": top(&flow.tenants),
    })
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.dispatcher.is_draining() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    if let Err(e) = state.dispatcher.store().ping().await {
        tracing::warn!(error = %e, "readiness check: the database does not answer");
        return Err(ApiError::unavailable("the database does not answer"));
    }
    Ok(Json(json!({ "status": "ready" })))
}

/// Prometheus text format: per lane capacity, running, queued and finished counts.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let stats = state.dispatcher.stats();
    let mut out = String::new();
    type Getter = fn(&LaneStats) -> f64;
    let gauges: [(&str, &str, Getter); 3] = [
        (
            "offload_lane_capacity",
            "Jobs a lane may run at once.",
            |s| s.capacity as f64,
        ),
        ("offload_lane_running", "Jobs running in a lane.", |s| {
            s.running as f64
        }),
        ("offload_lane_queued", "Jobs queued for a lane.", |s| {
            s.queued as f64
        }),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (k, s) in &stats {
            let _ = writeln!(out, "{name}{{executor=\"{}\"}} {}", k.as_str(), get(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP offload_jobs_finished_total Jobs finished since the server started.\n\
         # TYPE offload_jobs_finished_total counter"
    );
    for (k, s) in &stats {
        let _ = writeln!(
            out,
            "offload_jobs_finished_total{{executor=\"{0}\",status=\"succeeded\"}} {1}\n\
             offload_jobs_finished_total{{executor=\"{0}\",status=\"failed\"}} {2}",
            k.as_str(),
            s.succeeded,
            s.failed
        );
    }
    // Per key and tenant: the busiest by name, the rest summed as `other` (bounded series).
    match state.dispatcher.store().flow_stats(STATS_TOP).await {
        Ok(flow) => {
            let families: [(&str, &str, &str, &Top); 3] = [
                (
                    "offload_concurrency_key",
                    "key",
                    "concurrency key",
                    &flow.concurrency,
                ),
                ("offload_rate_key", "key", "rate key", &flow.rate),
                ("offload_tenant", "tenant", "tenant", &flow.tenants),
            ];
            for (prefix, name, what, top) in families {
                for (suffix, get) in [
                    (
                        "running",
                        (|c: &FlowCount| c.running) as fn(&FlowCount) -> u64,
                    ),
                    ("queued", |c: &FlowCount| c.queued),
                ] {
                    let metric = format!("{prefix}_{suffix}");
                    let _ = writeln!(
                        out,
                        "# HELP {metric} Jobs {suffix} per {what} (the busiest; the rest as \
                         {name}=\"\", other=\"true\").\n# TYPE {metric} gauge"
                    );
                    for c in &top.top {
                        let _ = writeln!(
                            out,
                            "{metric}{{{name}=\"{}\",other=\"false\"}} {}",
                            label(&c.name),
                            get(c)
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{metric}{{{name}=\"\",other=\"true\"}} {}",
                        get(&top.others)
                    );
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not count flow control for /metrics"),
    }
    out.push_str(&crate::observe::render());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
