//! openapi.yaml and the served routes agree: every path and method in the spec answers with a
//! status the spec lists (the helpers check each answer's body against its schema).

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_in_the_spec_is_served() {
    let app = spawn_app().await;
    let job = app.submit(json!({"task": "noop"})).await;
    let id = id_of(&job);
    app.wait(&id, 10).await;
    let paths = openapi()["paths"].as_object().unwrap();
    assert!(paths.len() >= 10);
    for (template, ops) in paths {
        for method in ["get", "post", "delete"] {
            if ops.get(method).is_none() {
                continue;
            }
            // Delete last, so the job stays for the other calls.
            let target = if method == "delete" {
                template.replace("{id}", &offload::job::JobId::new().to_string())
            } else {
                template.replace("{id}", &id)
            };
            if template == "/v1/events" {
                // A stream that stays open: check that it starts.
                let r = app.client.get(app.url(template)).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                assert!(r.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("text/event-stream"));
                continue;
            }
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = (method == "post").then(|| json!({"task": "noop"}));
            let a = app.call(m, &target, body).await;
            if a.status == StatusCode::NOT_FOUND {
                let detail = a.body["detail"].as_str().unwrap_or("");
                assert!(
                    !detail.starts_with("no route"),
                    "{method} {template} is not served"
                );
            }
        }
    }
}

#[test]
fn the_spec_names_every_job_field_the_server_sends() {
    let job = &openapi()["components"]["schemas"]["Job"];
    let required: Vec<&str> = job["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for field in [
        "id",
        "task",
        "kind",
        "executor",
        "status",
        "args",
        "result",
        "error",
        "priority",
        "attempt",
        "max_attempts",
        "progress",
        "created_at",
        "scheduled_at",
        "started_at",
        "finished_at",
        "timings",
    ] {
        assert!(required.contains(&field), "{field}");
    }
    // The spec's JobSpec fields are exactly the ones the server accepts.
    let spec_fields: Vec<&str> = openapi()["components"]["schemas"]["JobSpec"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut served: Vec<&str> = offload::spec::SPEC_FIELDS.to_vec();
    served.sort();
    let mut spec_sorted = spec_fields.clone();
    spec_sorted.sort();
    assert_eq!(spec_sorted, served);
}
