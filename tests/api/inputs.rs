//! Inputs that schemathesis found the server and openapi.yaml disagreeing on, one regression
//! test each: every answer is one the spec lists, as problem+json, and nothing is stored.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

async fn job_count(app: &TestApp) -> usize {
    app.get("/v1/jobs?limit=1000").await.body["jobs"]
        .as_array()
        .unwrap()
        .len()
}

/// Broke: axum's `Path` extractor answered `400 text/plain` to an id that is not valid UTF-8
/// once percent-decoded; now it is a 404 problem like any id that names nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_that_is_not_utf8_is_a_404_problem() {
    let app = spawn_app().await;
    for (method, path) in [
        (Method::GET, "/v1/jobs/%FF"),
        (Method::DELETE, "/v1/jobs/%FF"),
        (Method::POST, "/v1/jobs/%C3%28/cancel"),
        (Method::GET, "/v1/jobs/%FF/events"),
        (Method::GET, "/v1/blobs/%FF"),
        (Method::DELETE, "/v1/blobs/%80abc"),
    ] {
        // `call` checks the answer against openapi.yaml, problem+json included.
        let a = app.call(method.clone(), path, None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(a.body["status"], 404);
        assert!(
            a.body["detail"].as_str().unwrap().contains("UTF-8"),
            "{}",
            a.body
        );
    }
}

/// Broke: `?cursor=` (empty, as a client passing on a null `next_cursor` sends it) was a 422;
/// the spec allowed it. Empty now means the first page, as absent does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_cursor_is_the_first_page() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.submit(json!({"task": "noop", "delay_ms": 3_600_000}))
            .await;
    }
    let a = app.get("/v1/jobs?cursor=&limit=2").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["jobs"].as_array().unwrap().len(), 2);
    let next = a.body["next_cursor"].as_str().unwrap().to_string();
    let b = app.get(&format!("/v1/jobs?cursor={next}&limit=2")).await;
    assert_eq!(b.body["jobs"].as_array().unwrap().len(), 1);
}

/// The spec gives the cursor's one form (a hyphenated job id); the others the uuid crate
/// would read are refused, so spec and server agree in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_in_another_form_is_a_422() {
    let app = spawn_app().await;
    let id = offload::job::JobId::new().to_string();
    for bad in [
        id.replace('-', ""),
        format!("%7B{id}%7D"),
        format!("urn:uuid:{id}"),
        "x".into(),
    ] {
        let a = app.get(&format!("/v1/jobs?cursor={bad}")).await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    assert_eq!(
        app.get(&format!("/v1/jobs?cursor={id}")).await.status,
        StatusCode::OK
    );
}

/// Broke: an empty `run_at` was refused (rightly) while the spec allowed any string; the spec
/// now says `format: date-time`, and the server answers what it does not take with a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_at_must_be_a_date_time() {
    let app = spawn_app().await;
    let schema = &openapi()["components"]["schemas"]["JobSpec"]["properties"]["run_at"];
    assert_eq!(schema["format"], "date-time");
    for bad in ["", "tomorrow", "2030-01-01", "2030-01-01 00:00:00"] {
        let a = app
            .post("/v1/jobs", json!({"task": "noop", "run_at": bad}))
            .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
        assert!(a.body["detail"].as_str().unwrap().contains("run_at"));
    }
    assert_eq!(job_count(&app).await, 0);
    for good in ["2030-01-01T00:00:00Z", "2030-01-01T00:00:00.5+02:00"] {
        app.submit(json!({"task": "noop", "run_at": good})).await;
    }
}

/// Every operation has an operationId and a tag, and the submit answers link to the
/// operations on the job they made (schemathesis follows links in its stateful phase).
#[test]
fn every_operation_is_named_and_tagged_and_submits_link_to_the_job() {
    let spec = openapi();
    let mut ids = Vec::new();
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let id = op["operationId"].as_str();
            assert!(id.is_some(), "{method} {path} has no operationId");
            ids.push(id.unwrap().to_string());
            assert!(
                op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                "{method} {path} has no tags"
            );
        }
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "operationIds are unique");
    let links = &spec["paths"]["/v1/jobs"]["post"]["responses"]["202"]["links"];
    for target in ["getJob", "cancelJob", "deleteJob", "jobEvents"] {
        assert!(
            links
                .as_object()
                .unwrap()
                .values()
                .any(|l| l["operationId"] == target),
            "no link to {target}"
        );
        assert!(ids.contains(&target.to_string()));
    }
}

/// Broke: `"timeout_ms": 384.0` was a 422 ("must be an integer, not a fractional number"),
/// though JSON Schema counts 384.0 as an integer and the spec says `integer`. Such numbers are
/// now read as the integers they are, in the spec's fields and in args alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_number_written_with_a_fraction_is_an_integer() {
    let app = spawn_app().await;
    let job = app
        .submit(
            json!({"task": "sleep", "args": {"ms": 5.0}, "priority": -58.0,
                       "timeout_ms": 10000.0, "max_attempts": 2.0, "delay_ms": 0.0}),
        )
        .await;
    assert_eq!(job["priority"], -58);
    assert_eq!(job["timeout_ms"], 10000);
    assert_eq!(job["max_attempts"], 2);
    assert_eq!(job["args"]["ms"], 5);
    let done = app.wait(&id_of(&job), 10).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["slept_ms"], 5);
    // A real fraction is still refused.
    let a = app
        .post("/v1/jobs", json!({"task": "noop", "timeout_ms": 384.5}))
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// Broke: the idempotency key's limit of 255 counted bytes while the spec's maxLength counts
/// characters, so 255 non-ASCII characters, valid by the spec, were a 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_measured_in_characters() {
    let app = spawn_app().await;
    let key: String = "é".repeat(255);
    app.submit(json!({"task": "noop", "idempotency_key": key}))
        .await;
    let a = app
        .post(
            "/v1/jobs",
            json!({"task": "noop", "idempotency_key": "é".repeat(256)}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
}
