//! Several real servers on one PostgreSQL database sharing the work.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{drop_pg_schema, id_of, pg_schema, Binary};

/// A server on the shared database, with a data dir of its own.
pub(crate) struct Node {
    pub bin: Binary,
    pub dir: tempfile::TempDir,
}

pub(crate) fn start(url: &str, lease_ms: u64) -> Node {
    start_with(url, lease_ms, &[])
}

pub(crate) fn start_with(url: &str, lease_ms: u64, extra: &[&str]) -> Node {
    start_env(url, lease_ms, extra, &[])
}

/// A server with extra flags and environment variables.
pub(crate) fn start_env(url: &str, lease_ms: u64, extra: &[&str], envs: &[(&str, &str)]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let lease = lease_ms.to_string();
    let mut args = vec!["--lease-ms", &lease, "--database-url", url];
    args.extend_from_slice(extra);
    let data = dir.path().to_str().unwrap().to_string();
    args.extend_from_slice(&["--data-dir", &data]);
    let bin = Binary::start_env(&args, envs);
    Node { bin, dir }
}

/// GETs a JSON answer.
pub(crate) async fn get_json(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// POSTs a JSON body and reads the JSON answer.
pub(crate) async fn post_json(client: &reqwest::Client, url: String, body: Value) -> Value {
    client
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Every job of the schema, paging through the list of one server.
async fn all_jobs(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{base}/v1/jobs?limit=1000&cursor={c}"),
            None => format!("{base}/v1/jobs?limit=1000"),
        };
        let page: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        out.extend(page["jobs"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

async fn settle(client: &reqwest::Client, base: &str, total: usize, secs: u64) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let jobs = all_jobs(client, base).await;
        let finals = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
            })
            .count();
        if finals == total || tokio::time::Instant::now() > deadline {
            return jobs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_ten_thousand_jobs_each_run_once() {
    let Some((schema, url)) = pg_schema("c").await else {
        return;
    };
    let nodes: Vec<Node> = (0..3).map(|_| start(&url, 5_000)).collect();
    let client = reqwest::Client::new();
    // Submitted to all three; run by whoever claims them.
    for (i, _) in (0..10).enumerate() {
        let node = &nodes[i % 3];
        let specs = vec![json!({"task": "noop", "kind": "cpu"}); 1000];
        let r = client
            .post(format!("{}/v1/jobs/batch", node.bin.base))
            .json(&json!({ "jobs": specs }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let jobs = settle(&client, &nodes[0].bin.base, 10_000, 120).await;
    assert_eq!(jobs.len(), 10_000);
    for j in &jobs {
        assert_eq!(j["status"], "succeeded", "{j}");
        assert_eq!(j["attempt"], 1, "claimed exactly once: {j}");
    }
    let mut ran = Vec::new();
    for n in &nodes {
        let s: Value = get_json(&client, format!("{}/v1/stats", n.bin.base)).await;
        ran.push(s["executors"]["rayon"]["succeeded"].as_u64().unwrap());
    }
    assert_eq!(ran.iter().sum::<u64>(), 10_000, "{ran:?}");
    assert!(
        ran.iter().filter(|&&n| n > 0).count() >= 2,
        "the work was shared: {ran:?}"
    );
    drop(nodes);
    drop_pg_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_servers_jobs_are_finished_by_the_others_and_any_server_answers() {
    let Some((schema, url)) = pg_schema("c").await else {
        return;
    };
    let mut nodes: Vec<Node> = (0..3).map(|_| start(&url, 1_000)).collect();
    let client = reqwest::Client::new();
    let specs = vec![json!({"task": "blocking_sleep", "args": {"ms": 300}}); 300];
    let r = client
        .post(format!("{}/v1/jobs/batch", nodes[0].bin.base))
        .json(&json!({ "jobs": specs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Kill one server mid-load, once it runs some of the jobs (not after a fixed pause, which a
    // busy machine can make too short): its running jobs' leases run out, the others requeue
    // them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s: Value = get_json(&client, format!("{}/v1/stats", nodes[1].bin.base)).await;
        if s["executors"]["blocking"]["running"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second server never ran any of the jobs: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut victim = nodes.remove(1);
    victim.bin.kill9();
    let jobs = settle(&client, &nodes[0].bin.base, 300, 120).await;
    for j in &jobs {
        assert_eq!(j["status"], "succeeded", "{j}");
    }
    assert!(
        jobs.iter().any(|j| j["attempt"] == 2),
        "some jobs were taken over after the kill"
    );

    // Any server answers for any job: wait on one server for a job another runs...
    let job: Value = post_json(
        &client,
        format!("{}/v1/jobs", nodes[0].bin.base),
        json!({"task": "sleep", "args": {"ms": 300}}),
    )
    .await;
    let waited: Value = get_json(
        &client,
        format!("{}/v1/jobs/{}?wait=20", nodes[1].bin.base, id_of(&job)),
    )
    .await;
    assert_eq!(
        waited["status"], "succeeded",
        "woken through NOTIFY: {waited}"
    );
    // ...and a cancel sent to one server stops the job wherever it runs.
    let long: Value = post_json(
        &client,
        format!("{}/v1/jobs", nodes[1].bin.base),
        json!({"task": "blocking_sleep", "args": {"ms": 60_000}}),
    )
    .await;
    let id = id_of(&long);
    for _ in 0..100 {
        let j: Value = get_json(&client, format!("{}/v1/jobs/{id}", nodes[0].bin.base)).await;
        if j["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c: Value = client
        .post(format!("{}/v1/jobs/{id}/cancel", nodes[0].bin.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(c["status"], "cancelled");
    let mut busy = u64::MAX;
    for _ in 0..100 {
        busy = 0;
        for n in &nodes {
            let s: Value = get_json(&client, format!("{}/v1/stats", n.bin.base)).await;
            busy += s["executors"]["blocking"]["running"].as_u64().unwrap();
        }
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        busy, 0,
        "the cancelled job stopped on the server running it"
    );
    drop(nodes);
    drop_pg_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_a_server_that_fetches_its_blob_from_the_uploader() {
    let Some((schema, url)) = pg_schema("c").await else {
        return;
    };
    // A: one rayon thread, which a long job will keep busy.
    let a = start_with(&url, 5_000, &["--cpu-threads", "1"]);
    let client = reqwest::Client::new();
    let bytes: Vec<u8> = (1..=1000).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let blob: Value = client
        .post(format!("{}/v1/blobs", a.bin.base))
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let blob = blob["id"].as_str().unwrap().to_string();
    let hog: Value = post_json(
        &client,
        format!("{}/v1/jobs", a.bin.base),
        json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}}),
    )
    .await;
    for _ in 0..100 {
        let j: Value = get_json(&client, format!("{}/v1/jobs/{}", a.bin.base, id_of(&hog))).await;
        if j["status"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // B joins; A has no room for cpu work, so B runs the array job and needs A's blob.
    let b = start(&url, 5_000);
    let job: Value = post_json(
        &client,
        format!("{}/v1/jobs", b.bin.base),
        json!({"task": "array_stats", "args": {"blob": blob}}),
    )
    .await;
    let done: Value = get_json(
        &client,
        format!("{}/v1/jobs/{}?wait=30", b.bin.base, id_of(&job)),
    )
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["sum"], 500500.0);
    assert!(
        b.dir.path().join("blobs").join(&blob).exists(),
        "B keeps a copy of the blob"
    );
    client
        .post(format!("{}/v1/jobs/{}/cancel", b.bin.base, id_of(&hog)))
        .send()
        .await
        .unwrap();
    drop((a, b));
    drop_pg_schema(&schema).await;
}
