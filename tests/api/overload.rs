//! Admission control under a load far beyond what the lanes can run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_429_and_every_acknowledged_job_still_runs() {
    // 4 blocking threads x 20 ms jobs: about 200 jobs/s. 16 clients submitting without pause
    // offer many times that.
    let app = spawn_with(|s| {
        s.max_queued_per_lane = 50;
        s.blocking_threads = 4;
    })
    .await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (client, url, acked, refused) = (
            app.client.clone(),
            app.url("/v1/jobs"),
            acked.clone(),
            refused.clone(),
        );
        clients.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < deadline {
                let r = client
                    .post(&url)
                    .json(&json!({"task": "blocking_sleep", "args": {"ms": 20}}))
                    .send()
                    .await
                    .unwrap();
                match r.status() {
                    StatusCode::ACCEPTED => {
                        let job: Value = r.json().await.unwrap();
                        acked.lock().unwrap().push(id_of(&job));
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        assert!(r.headers().contains_key("retry-after"));
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        }));
    }
    // The queue never grows past its bound (plus the jobs being claimed).
    let mut most_queued = 0;
    while tokio::time::Instant::now() < deadline {
        let s = app.get("/v1/stats").await.body;
        most_queued = most_queued.max(s["executors"]["blocking"]["queued"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the load was refused in part"
    );
    assert!(!acked.is_empty());
    assert!(most_queued <= 50 + 4, "queued reached {most_queued}");
    // Every 202 is honoured...
    for id in &acked {
        assert_eq!(app.wait(id, 60).await["status"], "succeeded", "{id}");
    }
    // ...nothing else was stored, and the service takes work again.
    let mut stored = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=1000&cursor={c}"),
            None => "/v1/jobs?limit=1000".to_string(),
        };
        let page = app.get(&path).await.body;
        stored += page["jobs"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(stored, acked.len());
    let after = app
        .submit(json!({"task": "blocking_sleep", "args": {"ms": 1}}))
        .await;
    assert_eq!(app.wait(&id_of(&after), 10).await["status"], "succeeded");
}
