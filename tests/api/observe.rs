//! Metrics and the runtime-lag watchdog.

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::helpers::*;
use offload::job::Kind;
use offload::task::{JobCtx, Task, TaskResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_lanes_jobs_the_store_and_http() {
    let app = spawn_app().await;
    let job = app.submit(json!({"task": "noop"})).await;
    app.wait(&id_of(&job), 10).await;
    // The watchdog records its first lag after one tick (50 ms).
    let mut m = String::new();
    for _ in 0..100 {
        m = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if m.contains("offload_runtime_lag_seconds_bucket") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for needle in [
        "offload_lane_queued{executor=\"async\"}",
        "offload_lane_capacity{executor=\"process\"}",
        "offload_job_run_seconds_bucket{executor=\"async\"",
        "offload_job_queue_seconds_bucket{executor=\"async\"",
        "offload_store_commit_seconds_bucket",
        "offload_store_batch_size_bucket",
        "offload_http_requests_total{route=\"/v1/jobs\",method=\"POST\",status=\"202\"}",
        "offload_http_request_seconds_bucket{route=\"/v1/jobs/{id}\"",
        "offload_runtime_lag_seconds_bucket",
    ] {
        assert!(m.contains(needle), "/metrics lacks {needle}:\n{m}");
    }
}

/// The mistake the watchdog exists for: a blocking call inside an async task.
struct BlocksTheRuntime;

#[async_trait]
impl Task for BlocksTheRuntime {
    fn name(&self) -> &str {
        "blocks_the_runtime"
    }
    fn description(&self) -> &str {
        "calls std::thread::sleep from async code, for tests"
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io]
    }
    fn args_schema(&self) -> Value {
        json!({"type": "object"})
    }
    async fn run_async(&self, _ctx: JobCtx, _args: Value) -> TaskResult {
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            tokio::task::yield_now().await;
        }
        Ok(json!({}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_runtime_is_logged_counted_and_names_the_job() {
    let app = spawn_full(
        tempfile::tempdir().unwrap(),
        |s| s.stall_warn_ms = 100,
        |r| {
            r.register(BlocksTheRuntime);
        },
    )
    .await;
    let before = app.get("/v1/stats").await.body["runtime"]["stalls"]
        .as_u64()
        .unwrap();
    // Two of them hold both runtime threads of this test's runtime.
    let a = app.submit(json!({"task": "blocks_the_runtime"})).await;
    let b = app.submit(json!({"task": "blocks_the_runtime"})).await;
    app.wait(&id_of(&a), 30).await;
    app.wait(&id_of(&b), 30).await;
    let stats = app.get("/v1/stats").await.body;
    assert!(
        stats["runtime"]["stalls"].as_u64().unwrap() > before,
        "{stats}"
    );
    let last = &stats["runtime"]["last_stall"];
    assert!(last["lag_ms"].as_f64().unwrap() >= 100.0, "{stats}");
    let suspects = last["running_async"].to_string();
    assert!(suspects.contains("blocks_the_runtime("), "{stats}");
    let m = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("offload_runtime_stalls_total"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    let app = spawn_app().await;
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 32, "{made}");
    let r = app
        .client
        .get(app.url("/v1/jobs/nope"))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-request-id"],
        "trace-42",
        "a caller's id is kept"
    );
}
