//! Metrics: the Prometheus recorder, the runtime-lag watchdog, and the HTTP metrics layer.
//!
//! Names, all prefixed `offload_`:
//! - `job_run_seconds{executor}`, `job_queue_seconds{executor}` (histograms)
//! - `worker_restarts_total{reason}` (counter: killed, crashed, recycled, died_idle)
//! - `worker_start_failures_total` (counter: workers that failed to start; each is retried),
//!   `workers_live` (gauge: the process lane's live workers)
//! - `store_commit_seconds`, `store_batch_size` (histograms of the group commit)
//! - `http_requests_total{route,method,status}` (counter), `http_request_seconds{route}`
//! - `runtime_lag_seconds` (histogram), `runtime_stalls_total` (counter)
//!
//! Per-lane capacity, running, queued and finished counts are rendered from the dispatcher's
//! own figures next to these (`api::ops::metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once. `None` if a program embedding the library has
/// installed its own recorder (then our metrics go to it).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ];
            let sizes = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .ok()?
                .set_buckets_for_metric(Matcher::Full("offload_store_batch_size".into()), &sizes)
                .ok()?
                .install_recorder()
                .ok()
        })
        .as_ref()
}

/// The recorded metrics in Prometheus text format.
pub fn render() -> String {
    match install() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

/// Counts and times every request by its route template (not its raw path, which would make
/// one series per job id).
pub async fn http_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("offload_http_request_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("offload_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

/// Gives every request an id (the caller's `X-Request-Id` if it sent a sane one), logs the
/// request inside a span that carries it, and returns it in the answer's `X-Request-Id`.
pub async fn request_id(req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let span =
        tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut response = next.run(req).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::debug!(status = response.status().as_u16(), "answered");
    });
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// One time the runtime woke the watchdog late.
#[derive(Clone, Debug, Serialize)]
pub struct Stall {
    pub lag_ms: f64,
    pub at: crate::clock::Micros,
    /// The async jobs that were running: the likely culprits.
    pub running_async: Vec<String>,
}

/// What the watchdog has seen.
#[derive(Default)]
pub struct RuntimeHealth {
    pub stalls: AtomicU64,
    pub last: Mutex<Option<Stall>>,
}

/// Runs forever: every `tick`, sleeps and measures how late the runtime wakes it. A lag over
/// `threshold` means something held a runtime thread (a blocking call in async code): it is
/// logged with the async jobs running at that moment, counted, and kept for `/v1/stats`.
pub async fn watchdog(
    health: Arc<RuntimeHealth>,
    threshold: Duration,
    running_async: impl Fn() -> Vec<String>,
) {
    let tick = Duration::from_millis(50);
    loop {
        let before = Instant::now();
        tokio::time::sleep(tick).await;
        let lag = before.elapsed().saturating_sub(tick);
        metrics::histogram!("offload_runtime_lag_seconds").record(lag.as_secs_f64());
        if lag >= threshold {
            let running = running_async();
            tracing::warn!(
                lag_ms = lag.as_millis() as u64,
                running_async = %running.join(", "),
                "the tokio runtime was blocked: a task held a runtime thread (a blocking call in async code?)"
            );
            metrics::counter!("offload_runtime_stalls_total").increment(1);
            health.stalls.fetch_add(1, Ordering::Relaxed);
            *health.last.lock().expect("stall lock") = Some(Stall {
                lag_ms: lag.as_secs_f64() * 1000.0,
                at: crate::clock::Micros::now(),
                running_async: running,
            });
        }
    }
}
