//! Progress while a job runs, in-process and from worker processes, and the event streams.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

/// Reads `/v1/jobs/{id}/events` until it ends; the statuses and progress values seen.
async fn follow(app: &TestApp, id: &str) -> Vec<(String, f64)> {
    let mut resp = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), resp.chunk())
        .await
        .expect("the stream goes on or ends")
        .unwrap()
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| {
            let j: Value = serde_json::from_str(d.trim()).unwrap();
            (
                j["status"].as_str().unwrap().to_string(),
                j["progress"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_jobs_report_progress_in_process_and_from_workers() {
    let app = spawn_app().await;
    for spec in [
        json!({"task": "blocking_sleep", "args": {"ms": 1200}}),
        json!({"task": "count_primes", "args": {"limit": 400_000_000}, "isolate": true, "timeout_ms": 60_000}),
    ] {
        let job = app.submit(spec.clone()).await;
        let seen = follow(&app, &id_of(&job)).await;
        let partial: Vec<f64> = seen
            .iter()
            .filter(|(s, p)| s == "running" && *p > 0.0 && *p < 1.0)
            .map(|(_, p)| *p)
            .collect();
        assert!(
            !partial.is_empty(),
            "{spec}: no progress between 0 and 1 in {seen:?}"
        );
        assert!(partial.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(
            seen.last().unwrap(),
            &("succeeded".to_string(), 1.0),
            "{spec}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_jobs_stream_sees_every_change() {
    let app = spawn_app().await;
    let mut resp = app.client.get(app.url("/v1/events")).send().await.unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let a = app.submit(json!({"task": "noop"})).await;
    let b = app
        .submit(json!({"task": "sum_squares", "args": {"n": 1000}}))
        .await;
    let mut text = String::new();
    let want = [id_of(&a), id_of(&b)];
    while !want.iter().all(|id| {
        text.lines()
            .filter(|l| l.contains(id.as_str()))
            .any(|l| l.contains("\"succeeded\""))
    }) {
        let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    for id in &want {
        let statuses: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("data:") && l.contains(id.as_str()))
            .map(|l| {
                if l.contains("\"queued\"") {
                    "queued"
                } else if l.contains("\"running\"") {
                    "running"
                } else {
                    "succeeded"
                }
            })
            .collect();
        assert_eq!(statuses.first(), Some(&"queued"), "{text}");
        assert_eq!(statuses.last(), Some(&"succeeded"), "{text}");
    }
}
