//! The lanes under stress and failure: isolation, retries, backoff, timeouts, cancel, panics.

use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;
use offload::job::Kind;
use offload::task::{JobCtx, Task, TaskResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_jobs_do_not_stall_async_jobs() {
    let app = spawn_app().await;
    let specs: Vec<Value> = (0..100)
        .map(|_| json!({"task": "blocking_sleep", "args": {"ms": 3000}}))
        .collect();
    let a = app.post("/v1/jobs/batch", json!({"jobs": specs})).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let first = id_of(&a.body["jobs"][0]);
    app.wait_until(&first, 10, |j| j["status"] == "running")
        .await;

    let noop = app.submit(json!({"task": "noop"})).await;
    let done = app.wait(&id_of(&noop), 10).await;
    assert_eq!(done["status"], "succeeded");
    // The noop finished while every blocking job was still sleeping: blocking work is not on
    // the runtime's worker threads.
    let finished = app
        .get("/v1/jobs?task=blocking_sleep&status=succeeded")
        .await;
    assert_eq!(finished.body["jobs"].as_array().unwrap().len(), 0);
    let stats = app.get("/v1/stats").await.body;
    assert_eq!(stats["executors"]["blocking"]["running"], 64, "{stats}");
    assert_eq!(stats["executors"]["blocking"]["queued"], 36, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_retry_until_they_succeed_or_attempts_run_out() {
    let app = spawn_app().await;
    for kind in ["io", "cpu"] {
        let ok = app
            .submit(json!({"task": "fail", "kind": kind, "args": {"until_attempt": 3}, "max_attempts": 3}))
            .await;
        let done = app.wait(&id_of(&ok), 20).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempt"], 3);
        assert_eq!(done["result"], json!({"attempt": 3}));

        let bad = app
            .submit(json!({"task": "fail", "kind": kind, "args": {"until_attempt": 3, "message": "boom"}, "max_attempts": 2}))
            .await;
        let done = app.wait(&id_of(&bad), 20).await;
        assert_eq!(done["status"], "failed");
        assert_eq!(done["attempt"], 2);
        assert_eq!(done["error"]["type"], "task_error");
        assert!(done["error"]["message"].as_str().unwrap().contains("boom"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_an_exponential_backoff() {
    let app = spawn_with(|s| {
        s.retry_base_ms = 400;
        s.retry_max_ms = 10_000;
    })
    .await;
    let job = app
        .submit(json!({"task": "fail", "args": {"until_attempt": 3}, "max_attempts": 3}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "succeeded");
    let at = |f: &str| {
        offload::clock::Micros::parse_rfc3339(done[f].as_str().unwrap())
            .unwrap()
            .0
    };
    // Two backoffs: at least 50% of 400 ms, then of 800 ms.
    let waited_ms = (at("scheduled_at") - at("created_at")) / 1000;
    assert!(
        waited_ms >= 200 + 400,
        "third attempt scheduled only {waited_ms} ms after submit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_stops_the_attempt_in_every_lane() {
    let app = spawn_with(|s| {
        s.cpu_threads = 1;
        s.blocking_threads = 1;
    })
    .await;
    let specs = [
        json!({"task": "sleep", "args": {"ms": 60_000}}),
        json!({"task": "blocking_sleep", "args": {"ms": 60_000}}),
        json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}}),
    ];
    for spec in specs {
        let mut spec = spec;
        spec["timeout_ms"] = json!(200);
        spec["max_attempts"] = json!(2);
        let job = app.submit(spec.clone()).await;
        let done = app.wait(&id_of(&job), 30).await;
        assert_eq!(done["status"], "failed", "{spec}: {done}");
        assert_eq!(done["error"]["type"], "timeout");
        assert_eq!(
            done["attempt"], 2,
            "a timeout is retried while attempts remain"
        );
    }
    // The one-thread lanes are free again: the timed-out work really stopped.
    let b = app
        .submit(json!({"task": "blocking_sleep", "args": {"ms": 1}}))
        .await;
    let c = app
        .submit(json!({"task": "sum_squares", "args": {"n": 10}}))
        .await;
    assert_eq!(app.wait(&id_of(&b), 10).await["status"], "succeeded");
    assert_eq!(app.wait(&id_of(&c), 10).await["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs_in_every_lane() {
    let app = spawn_with(|s| {
        s.cpu_threads = 1;
        s.blocking_threads = 1;
    })
    .await;
    let queued = app
        .submit(json!({"task": "noop", "delay_ms": 60_000}))
        .await;
    let a = app
        .post(&format!("/v1/jobs/{}/cancel", id_of(&queued)), json!({}))
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["status"], "cancelled");
    assert_eq!(a.body["attempt"], 0, "it never ran");
    assert_eq!(a.body["error"]["type"], "cancelled");

    for spec in [
        json!({"task": "sleep", "args": {"ms": 60_000}}),
        json!({"task": "blocking_sleep", "args": {"ms": 60_000}}),
        json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}}),
    ] {
        let job = app.submit(spec.clone()).await;
        let id = id_of(&job);
        app.wait_until(&id, 10, |j| j["status"] == "running").await;
        let a = app.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body["status"], "cancelled", "{spec}");
        let again = app.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
        assert_eq!(again.status, StatusCode::CONFLICT);
    }
    // The single-thread lanes took new work: the cancelled work stopped.
    let b = app
        .submit(json!({"task": "blocking_sleep", "args": {"ms": 1}}))
        .await;
    let c = app.submit(json!({"task": "noop", "kind": "cpu"})).await;
    assert_eq!(app.wait(&id_of(&b), 10).await["status"], "succeeded");
    assert_eq!(app.wait(&id_of(&c), 10).await["status"], "succeeded");
    let stats = app.get("/v1/stats").await.body;
    assert_eq!(stats["executors"]["rayon"]["running"], 0);

    let unknown = app
        .post(
            &format!("/v1/jobs/{}/cancel", offload::job::JobId::new()),
            json!({}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

struct Panics;

#[async_trait]
impl Task for Panics {
    fn name(&self) -> &str {
        "panics"
    }
    fn description(&self) -> &str {
        "panics, for tests"
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Cpu, Kind::Io]
    }
    fn args_schema(&self) -> Value {
        json!({"type": "object"})
    }
    async fn run_async(&self, _ctx: JobCtx, _args: Value) -> TaskResult {
        panic!("async boom")
    }
    fn run_sync(&self, _ctx: &JobCtx, _args: Value) -> TaskResult {
        panic!("sync boom")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_fails_its_job_as_crashed_and_the_lane_survives() {
    let app = spawn_full(
        tempfile::tempdir().unwrap(),
        |_| {},
        |r| {
            r.register(Panics);
        },
    )
    .await;
    for kind in ["cpu", "io"] {
        let job = app
            .submit(json!({"task": "panics", "kind": kind, "max_attempts": 2}))
            .await;
        let done = app.wait(&id_of(&job), 10).await;
        assert_eq!(done["status"], "failed");
        assert_eq!(done["error"]["type"], "crashed");
        assert_eq!(done["attempt"], 2);
    }
    let after = app.submit(json!({"task": "noop", "kind": "cpu"})).await;
    assert_eq!(app.wait(&id_of(&after), 10).await["status"], "succeeded");
}
