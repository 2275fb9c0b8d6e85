//! A cluster that acts as one: servers on one PostgreSQL database agree on lease time (the
//! database's clock), on the queue's size, on who is in the cluster, on the stream of changes,
//! and on blobs. (The SQLite checks at the end: the same answers from one server.)

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cluster::{get_json, post_json, start_env, start_with, Node};
use crate::helpers::{drop_pg_schema, id_of, pg_schema, spawn_with};
use offload::clock::Micros;

const OFFSET: &str = "OFFLOAD_TEST_CLOCK_OFFSET_MS";
const HOUR_MS: i64 = 3_600_000;

/// Polls `url` until `pred` holds for its JSON, up to `secs`.
async fn until(
    client: &reqwest::Client,
    url: &str,
    secs: u64,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let v = get_json(client, url.to_string()).await;
        if pred(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not reached in {secs} s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// When a server says a job it created was created: its own clock.
fn created_at(job: &Value) -> i64 {
    Micros::parse_rfc3339(job["created_at"].as_str().unwrap())
        .unwrap()
        .0
}

/// Long jobs run on one server (`runner`); another whose clock is an hour ahead of it joins
/// and does maintenance (a rescue every third of a lease) all through them. Before leases
/// were timed by the database, the joiner saw every lease of the runner as an hour past its
/// end and requeued the jobs: attempt 2, run twice.
async fn jobs_outlive_a_server_an_hour_ahead(runner_offset_ms: i64, joiner_offset_ms: i64) {
    let Some((schema, url)) = pg_schema("k").await else {
        return;
    };
    let client = reqwest::Client::new();
    let (r_env, j_env) = (runner_offset_ms.to_string(), joiner_offset_ms.to_string());
    let runner = start_env(&url, 1_000, &[], &[(OFFSET, &r_env)]);
    let specs = vec![json!({"task": "blocking_sleep", "args": {"ms": 4_000}}); 4];
    let batch = post_json(
        &client,
        format!("{}/v1/jobs/batch", runner.bin.base),
        json!({ "jobs": specs }),
    )
    .await;
    let ids: Vec<String> = batch["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    for id in &ids {
        let url = format!("{}/v1/jobs/{id}", runner.bin.base);
        until(&client, &url, 10, |j| j["status"] == "running").await;
    }
    let joiner = start_env(&url, 1_000, &[], &[(OFFSET, &j_env)]);
    // The offsets took hold: the two servers stamp the jobs they create an hour apart.
    let on_runner = post_json(
        &client,
        format!("{}/v1/jobs", runner.bin.base),
        json!({"task": "noop"}),
    )
    .await;
    let on_joiner = post_json(
        &client,
        format!("{}/v1/jobs", joiner.bin.base),
        json!({"task": "noop"}),
    )
    .await;
    let apart_ms = (created_at(&on_joiner) - created_at(&on_runner)) / 1000;
    assert!(
        (apart_ms - (joiner_offset_ms - runner_offset_ms)).abs() < 60_000,
        "the clocks are {apart_ms} ms apart"
    );
    for id in &ids {
        let done = get_json(&client, format!("{}/v1/jobs/{id}?wait=20", joiner.bin.base)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempt"], 1, "never requeued: {done}");
    }
    let ran: Value = get_json(&client, format!("{}/v1/stats", runner.bin.base)).await;
    assert_eq!(ran["executors"]["blocking"]["succeeded"], 4, "{ran}");
    drop((runner, joiner));
    drop_pg_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_clock_runs_an_hour_ahead_never_requeues_anothers_live_jobs() {
    jobs_outlive_a_server_an_hour_ahead(0, HOUR_MS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_clock_runs_an_hour_behind_keeps_its_live_jobs() {
    jobs_outlive_a_server_an_hour_ahead(-HOUR_MS, 0).await;
}

/// The async lane's queued count, as `base` sees it.
async fn queued(client: &reqwest::Client, base: &str) -> u64 {
    let s = get_json(client, format!("{base}/v1/stats")).await;
    s["executors"]["async"]["queued"].as_u64().unwrap()
}

async fn submit_status(client: &reqwest::Client, base: &str) -> StatusCode {
    client
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"task": "sleep", "args": {"ms": 1}, "delay_ms": 60_000}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_bound_counts_the_database_whichever_server_is_asked() {
    let Some((schema, url)) = pg_schema("k").await else {
        return;
    };
    let client = reqwest::Client::new();
    let a = start_with(&url, 5_000, &["--max-queued-per-lane", "20"]);
    let b = start_with(&url, 5_000, &["--max-queued-per-lane", "20"]);
    // Delayed a minute: they stay queued.
    let specs = vec![json!({"task": "sleep", "args": {"ms": 1}, "delay_ms": 60_000}); 20];
    let r = client
        .post(format!("{}/v1/jobs/batch", a.bin.base))
        .json(&json!({ "jobs": specs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let batch: Value = r.json().await.unwrap();
    assert_eq!(
        submit_status(&client, &a.bin.base).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // B took none of them, and learns of them within two seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while queued(&client, &b.bin.base).await < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B does not count A's queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        submit_status(&client, &b.bin.base).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Its recounts (every second) count the database too: still full.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(queued(&client, &b.bin.base).await, 20);
    assert_eq!(
        submit_status(&client, &b.bin.base).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Room made on B (cancels, which are not announced as counts) reaches A by its recount.
    for job in &batch["jobs"].as_array().unwrap()[..5] {
        let r = client
            .post(format!("{}/v1/jobs/{}/cancel", b.bin.base, id_of(job)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while queued(&client, &a.bin.base).await > 15 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never saw the room B made"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        submit_status(&client, &a.bin.base).await,
        StatusCode::ACCEPTED
    );
    drop((a, b));
    drop_pg_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_list_every_server_sharing_the_database() {
    let Some((schema, url)) = pg_schema("k").await else {
        return;
    };
    let client = reqwest::Client::new();
    let a = start_with(&url, 3_000, &["--blocking-threads", "3"]);
    let b = start_with(&url, 3_000, &[]);
    // Each server writes its row when it starts.
    let stats = until(&client, &format!("{}/v1/stats", b.bin.base), 5, |s| {
        s["servers"].as_array().is_some_and(|l| l.len() == 2)
    })
    .await;
    let servers = stats["servers"].as_array().unwrap();
    let addresses: Vec<&str> = servers
        .iter()
        .map(|s| s["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        addresses,
        vec![a.bin.base.as_str(), b.bin.base.as_str()],
        "oldest first"
    );
    assert_eq!(servers[1]["id"], stats["server"], "B knows itself");
    assert_ne!(servers[0]["id"], servers[1]["id"]);
    assert_eq!(servers[0]["lanes"]["blocking"]["capacity"], 3);
    for s in servers {
        let started = Micros::parse_rfc3339(s["started_at"].as_str().unwrap()).unwrap();
        let beat = Micros::parse_rfc3339(s["heartbeat_at"].as_str().unwrap()).unwrap();
        assert!(started <= beat, "{s}");
    }
    // The heartbeat keeps the row fresh (every third of a lease).
    let first = servers[0]["heartbeat_at"].clone();
    until(&client, &format!("{}/v1/stats", b.bin.base), 5, |s| {
        s["servers"][0]["heartbeat_at"] != first
    })
    .await;
    drop((a, b));
    drop_pg_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_of_one_server_carries_changes_made_on_another() {
    let Some((schema, url)) = pg_schema("k").await else {
        return;
    };
    let client = reqwest::Client::new();
    let a = start_with(&url, 5_000, &[]);
    let b = start_with(&url, 5_000, &[]);
    let mut stream = client
        .get(format!("{}/v1/events", b.bin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    // Delayed, so no server claims it: every change to it is made on A.
    let job = post_json(
        &client,
        format!("{}/v1/jobs", a.bin.base),
        json!({"task": "noop", "delay_ms": 60_000}),
    )
    .await;
    let id = id_of(&job);
    let mut text = String::new();
    let statuses = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("data:") && l.contains(id.as_str()))
            .map(|l| {
                let v: Value = serde_json::from_str(l.trim_start_matches("data:").trim()).unwrap();
                v["status"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let mut cancelled = false;
    while !statuses(&text).contains(&"cancelled".to_string()) {
        // Cancelled on A once B has shown the submit, so each change is its own event.
        if !cancelled && !statuses(&text).is_empty() {
            let c = post_json(
                &client,
                format!("{}/v1/jobs/{id}/cancel", a.bin.base),
                json!({}),
            )
            .await;
            assert_eq!(c["status"], "cancelled");
            cancelled = true;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("B's stream shows the changes A made")
            .unwrap()
            .expect("the stream stays open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(statuses(&text), vec!["queued", "cancelled"], "{text}");
    drop((a, b));
    drop_pg_schema(&schema).await;
}

async fn upload(client: &reqwest::Client, node: &Node, bytes: Vec<u8>) -> Value {
    let r = client
        .post(format!("{}/v1/blobs", node.bin.base))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json().await.unwrap()
}

/// Waits until `path` is gone, up to `secs`.
async fn gone(path: &std::path::Path, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} is still there",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_downloads_from_any_server_and_its_deletion_removes_every_copy() {
    let Some((schema, url)) = pg_schema("k").await else {
        return;
    };
    let client = reqwest::Client::new();
    // Jobs and the blobs they were the last to use are pruned at once.
    let quick = ["--retention-secs", "0", "--prune-interval-ms", "200"];
    let a = start_with(&url, 5_000, &quick);
    let b = start_with(&url, 5_000, &quick);
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let blob = upload(&client, &a, bytes.clone()).await;
    let id = blob["id"].as_str().unwrap().to_string();
    let copy = b.dir.path().join("blobs").join(&id);
    assert!(!copy.exists());
    // B did not take the upload: it fetches the bytes from A, and keeps a copy.
    let r = client
        .get(format!("{}/v1/blobs/{id}", b.bin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got = r.bytes().await.unwrap();
    assert_eq!(got.as_ref(), bytes.as_slice());
    assert_eq!(
        Sha256::digest(&got)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        blob["sha256"].as_str().unwrap()
    );
    assert!(copy.exists(), "B keeps a copy");
    // Deleted on A: gone from B's disk too, and from every server's answers.
    let r = client
        .delete(format!("{}/v1/blobs/{id}", a.bin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    gone(&copy, 3).await;
    assert!(!a.dir.path().join("blobs").join(&id).exists());
    for node in [&a, &b] {
        let r = client
            .get(format!("{}/v1/blobs/{id}", node.bin.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    // Retention: a blob that goes with the last job that used it takes B's copy with it.
    let floats: Vec<u8> = (1..=100).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let used = upload(&client, &a, floats).await;
    let used_id = used["id"].as_str().unwrap().to_string();
    let r = client
        .get(format!("{}/v1/blobs/{used_id}", b.bin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let copy = b.dir.path().join("blobs").join(&used_id);
    assert!(copy.exists());
    let job = post_json(
        &client,
        format!("{}/v1/jobs", a.bin.base),
        json!({"task": "array_stats", "args": {"blob": used_id}}),
    )
    .await;
    assert_eq!(job["status"], "queued", "{job}");
    gone(&copy, 10).await;
    gone(&a.dir.path().join("blobs").join(&used_id), 3).await;
    drop((a, b));
    drop_pg_schema(&schema).await;
}

/// SQLite: the servers list is this one server, and a restart replaces the row of the
/// process before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_servers_list_is_this_server() {
    let mut app = spawn_with(|_| {}).await;
    let stats = app.get("/v1/stats").await.body;
    let servers = stats["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{stats}");
    assert_eq!(servers[0]["id"], stats["server"]);
    assert_eq!(servers[0]["address"], app.base.as_str());
    assert!(servers[0]["lanes"]["async"]["capacity"].as_u64().unwrap() > 0);
    let before = stats["server"].clone();
    app.stop().await;
    let app = crate::helpers::spawn_in(app.dir, |_| {}).await;
    let stats = app.get("/v1/stats").await.body;
    let servers = stats["servers"].as_array().unwrap();
    assert_eq!(
        servers.len(),
        1,
        "the stopped process is forgotten: {stats}"
    );
    assert_ne!(servers[0]["id"], before);
}

/// A deletion notice a server missed (it was down, or its fetch finished after the delete)
/// is healed by the sweep that runs with pruning: a blob file whose blob the store no longer
/// has goes, once it is older than a minute (younger ones may be uploads not yet recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_removes_files_of_blobs_the_store_no_longer_has() {
    let app = spawn_with(|s| s.prune_interval_ms = 100).await;
    let dir = app.dir.path().join("blobs");
    let answer = app
        .call_raw(
            reqwest::Method::POST,
            "/v1/blobs",
            "application/octet-stream",
            vec![1, 2, 3],
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED);
    let kept = dir.join(answer.body["id"].as_str().unwrap());
    let stray_old = dir.join(uuid::Uuid::now_v7().hyphenated().to_string());
    let stray_new = dir.join(uuid::Uuid::now_v7().hyphenated().to_string());
    let not_a_blob = dir.join("notes.txt");
    for p in [&stray_old, &stray_new, &not_a_blob] {
        std::fs::write(p, b"x").unwrap();
    }
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for p in [&stray_old, &kept, &not_a_blob] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    gone(&stray_old, 5).await;
    // A few more sweeps: nothing else goes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(kept.exists(), "a stored blob's file stays");
    assert!(stray_new.exists(), "a young file stays");
    assert!(not_a_blob.exists(), "only blob files are swept");
}

/// The server holding a blob is gone: another server answers 503 (try again later) as
/// problem+json, keeps no partial copy, and stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_whose_origin_is_down_is_a_503_and_leaves_nothing_behind() {
    let Some((schema, url)) = pg_schema("k").await else {
        return;
    };
    let client = reqwest::Client::new();
    let mut a = start_with(&url, 5_000, &[]);
    let b = start_with(&url, 5_000, &[]);
    let blob = upload(&client, &a, vec![7u8; 10_000]).await;
    let id = blob["id"].as_str().unwrap();
    a.bin.kill9();
    let r = client
        .get(format!("{}/v1/blobs/{id}", b.bin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/problem+json"));
    let files: Vec<_> = std::fs::read_dir(b.dir.path().join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(files.is_empty(), "no copy, whole or partial: {files:?}");
    let health = client
        .get(format!("{}/healthz", b.bin.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    drop((a, b));
    drop_pg_schema(&schema).await;
}
