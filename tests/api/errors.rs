//! Every error status in the contract's table, as problem+json, changing nothing.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

fn detail(a: &Answer) -> &str {
    a.body["detail"].as_str().unwrap_or("")
}

async fn job_count(app: &TestApp) -> usize {
    app.get("/v1/jobs?limit=1000").await.body["jobs"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_400() {
    let app = spawn_app().await;
    for body in [&b"{not json"[..], b"[1, 2]", b"\"text\"", b""] {
        let a = app
            .call_raw(Method::POST, "/v1/jobs", "application/json", body.to_vec())
            .await;
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(a.body["status"], 400);
    }
    let a = app
        .call_raw(
            Method::POST,
            "/v1/jobs/batch",
            "application/json",
            b"[]".to_vec(),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(job_count(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_token_is_required_except_for_health_checks() {
    let mut app = spawn_with(|s| s.api_token = Some("s3cret".into())).await;
    app.token = None;
    let a = app.post("/v1/jobs", json!({"task": "noop"})).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    app.token = Some("wrong".into());
    assert_eq!(app.get("/v1/jobs").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(app.get("/metrics").await.status, StatusCode::UNAUTHORIZED);
    app.token = None;
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
    app.token = Some("s3cret".into());
    assert_eq!(
        app.post("/v1/jobs", json!({"task": "noop"})).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(job_count(&app).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_and_routes_are_404_and_wrong_methods_405() {
    let app = spawn_app().await;
    let id = offload::job::JobId::new();
    for path in [
        format!("/v1/jobs/{id}"),
        "/v1/jobs/not-a-uuid".into(),
        format!("/v1/jobs/{id}/events"),
        "/v2/nothing".into(),
    ] {
        let a = app.get(&path).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
    }
    let a = app
        .call(Method::DELETE, &format!("/v1/jobs/{id}"), None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = app.call(Method::PUT, "/v1/jobs", Some(json!({}))).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    let a = app.call(Method::GET, "/v1/jobs/batch", None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413_and_other_types_415() {
    let app = spawn_with(|s| s.max_body_bytes = 1024).await;
    let big = json!({"task": "noop", "idempotency_key": "k".repeat(2000)});
    let a = app.post("/v1/jobs", big).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(detail(&a).contains("1024"));
    let a = app
        .call_raw(
            Method::POST,
            "/v1/jobs",
            "text/plain",
            br#"{"task":"noop"}"#.to_vec(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(job_count(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_422_with_a_detail_that_says_what_to_change() {
    let app = spawn_app().await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "`task` is required"),
        (json!({"task": "nope"}), "unknown task `nope`"),
        (
            json!({"task": "sleep", "kind": "cpu", "args": {"ms": 1}}),
            "cannot run as cpu",
        ),
        (
            json!({"task": "sum_squares", "kind": "io", "args": {"n": 1}}),
            "cannot run as io",
        ),
        (json!({"task": "sleep"}), "`ms` is required"),
        (
            json!({"task": "sleep", "args": {"ms": "soon"}}),
            "args.ms: must be an integer",
        ),
        (
            json!({"task": "sleep", "args": {"ms": 1, "extra": true}}),
            "unknown field `extra`",
        ),
        (
            json!({"task": "sum_squares", "args": {"n": 1e30}}),
            "args.n",
        ),
        (
            json!({"task": "noop", "colour": "red", "size": 3}),
            "unknown fields `colour`, `size`",
        ),
        (
            json!({"task": "noop", "priority": 10_000_000}),
            "priority: must be at most",
        ),
        (
            json!({"task": "noop", "max_attempts": 0}),
            "max_attempts: must be at least 1",
        ),
        (json!({"task": "noop", "timeout_ms": -5}), "timeout_ms"),
        (
            json!({"task": "noop", "kind": "gpu"}),
            "kind: must be one of",
        ),
        (
            json!({"task": "noop", "delay_ms": 5, "run_at": "2030-01-01T00:00:00Z"}),
            "not both",
        ),
        (json!({"task": "noop", "run_at": "next tuesday"}), "run_at"),
        (
            json!({"task": "sleep", "args": {"ms": 5}, "isolate": true}),
            "only cpu jobs",
        ),
        (json!({"task": 7}), "task: must be a string"),
    ];
    for (spec, expect) in cases {
        let a = app.post("/v1/jobs", spec.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{spec}: {}",
            a.body
        );
        assert!(
            detail(&a).contains(expect),
            "{spec}: `{}` lacks `{expect}`",
            detail(&a)
        );
    }
    for path in [
        "/v1/jobs?limit=0",
        "/v1/jobs?limit=5000",
        "/v1/jobs?status=done",
        "/v1/jobs?kind=gpu",
        "/v1/jobs?cursor=zzz",
        "/v1/jobs?colour=red",
    ] {
        assert_eq!(
            app.get(path).await.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}"
        );
    }
    let job = app.submit(json!({"task": "noop"})).await;
    for wait in ["61", "-1", "soon", "NaN"] {
        let a = app
            .get(&format!("/v1/jobs/{}?wait={wait}", id_of(&job)))
            .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "wait={wait}");
    }
    assert_eq!(job_count(&app).await, 1, "no invalid spec was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lane_answers_429_with_retry_after_and_stores_nothing() {
    let app = spawn_with(|s| s.max_queued_per_lane = 3).await;
    for _ in 0..3 {
        app.submit(json!({"task": "noop", "delay_ms": 60_000}))
            .await;
    }
    let a = app
        .post("/v1/jobs", json!({"task": "noop", "delay_ms": 60_000}))
        .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.headers.contains_key("retry-after"));
    let batch = json!({"jobs": [{"task": "noop"}, {"task": "noop"}]});
    assert_eq!(
        app.post("/v1/jobs/batch", batch).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Other lanes are not affected.
    assert_eq!(
        app.post("/v1/jobs", json!({"task": "noop", "kind": "cpu"}))
            .await
            .status,
        StatusCode::ACCEPTED
    );
    assert_eq!(job_count(&app).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_submits_and_readiness_are_503() {
    let mut app = spawn_with(|s| s.drain_timeout_ms = 5_000).await;
    let job = app
        .submit(json!({"task": "blocking_sleep", "args": {"ms": 1500}}))
        .await;
    app.wait_until(&id_of(&job), 10, |j| j["status"] == "running")
        .await;
    app.trigger_shutdown();
    let mut refused = None;
    for _ in 0..100 {
        let a = app.post("/v1/jobs", json!({"task": "noop"})).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            refused = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let refused = refused.expect("submits are refused while draining");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        app.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The running job is allowed to finish before the server stops.
    app.stop().await;
    let app = spawn_in(app.dir, |_| {}).await;
    let done = app.get(&format!("/v1/jobs/{}", id_of(&job))).await.body;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_malformed_input_gets_a_5xx_or_changes_anything() {
    let app = spawn_app().await;
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"{\"task\": null}".to_vec(),
        b"{\"task\": \"noop\", \"args\": []}".to_vec(),
        b"{\"task\": \"noop\", \"priority\": 1e400}".to_vec(),
        b"{\"task\": \"noop\", \"max_attempts\": -1}".to_vec(),
        b"{\"task\": \"sum_squares\", \"args\": {\"n\": 18446744073709551616}}".to_vec(),
        b"{\"task\": \"sleep\", \"args\": {\"ms\": 1.5}}".to_vec(),
        b"{\"task\": \"\\u0000\"}".to_vec(),
        b"{\"jobs\": {}}".to_vec(),
        b"{\"jobs\": [1, 2]}".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        deep.into_bytes(),
        vec![b'{'; 100_000],
    ];
    for path in ["/v1/jobs", "/v1/jobs/batch"] {
        for body in &bodies {
            let a = app
                .call_raw(Method::POST, path, "application/json", body.clone())
                .await;
            assert!(
                a.status.is_client_error(),
                "{path} {:?}: {}",
                String::from_utf8_lossy(&body[..body.len().min(60)]),
                a.status
            );
        }
    }
    for path in [
        "/v1/jobs/%00",
        "/v1/jobs/..%2F..%2Fetc",
        "/v1/jobs?limit=99999999999999999999",
        "/v1/jobs?cursor=%ff",
        "/v1/blobs/..%2Foffload.db",
        "/v1/jobs/00000000-0000-0000-0000-000000000000/events",
    ] {
        let a = app.get(path).await;
        assert!(a.status.is_client_error(), "{path}: {}", a.status);
    }
    assert_eq!(job_count(&app).await, 0);
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
}
