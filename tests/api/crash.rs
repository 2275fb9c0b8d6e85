//! The real binary, killed with SIGKILL and started again on the same data dir.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{id_of, is_final, Binary};

/// `offload serve` on `data_dir`.
fn start(data_dir: &std::path::Path) -> Binary {
    Binary::start(&[std::ffi::OsStr::new("--data-dir"), data_dir.as_os_str()])
}

async fn wait_final(client: &reqwest::Client, base: &str, id: &str) -> Value {
    for _ in 0..30 {
        let r = client
            .get(format!("{base}/v1/jobs/{id}?wait=5"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "job {id} must exist after the restart"
        );
        let job: Value = r.json().await.unwrap();
        if is_final(&job) {
            return job;
        }
    }
    panic!("job {id} never finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_clients_submit_loses_no_acknowledged_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..8 {
        let (client, base, acked) = (client.clone(), server.base.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let spec = match (c + i) % 3 {
                    0 => json!({"task": "noop"}),
                    1 => json!({"task": "sleep", "args": {"ms": 50}}),
                    _ => json!({"task": "sum_squares", "args": {"n": 100_000}}),
                };
                let Ok(resp) = client
                    .post(format!("{base}/v1/jobs"))
                    .json(&spec)
                    .send()
                    .await
                else {
                    break;
                };
                if resp.status() != StatusCode::ACCEPTED {
                    break;
                }
                // The 202 is the promise; record the id only if the whole answer arrived.
                match resp.json::<Value>().await {
                    Ok(job) => acked.lock().unwrap().push(id_of(&job)),
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill9();
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "only {} jobs were acknowledged",
        acked.len()
    );

    let server = start(dir.path());
    for id in &acked {
        let job = wait_final(&client, &server.base, id).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_running_at_a_crash_are_requeued_or_failed_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let client = reqwest::Client::new();
    let submit = |spec: Value| {
        let (client, base) = (client.clone(), server.base.clone());
        async move {
            let r = client
                .post(format!("{base}/v1/jobs"))
                .json(&spec)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            id_of(&r.json::<Value>().await.unwrap())
        }
    };
    let again =
        submit(json!({"task": "blocking_sleep", "args": {"ms": 1500}, "max_attempts": 2})).await;
    let once =
        submit(json!({"task": "blocking_sleep", "args": {"ms": 1500}, "max_attempts": 1})).await;
    for id in [&again, &once] {
        loop {
            let job: Value = client
                .get(format!("{}/v1/jobs/{id}", server.base))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if job["status"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    server.kill9();

    let server = start(dir.path());
    let requeued = wait_final(&client, &server.base, &again).await;
    assert_eq!(requeued["status"], "succeeded", "{requeued}");
    assert_eq!(requeued["attempt"], 2);
    let lost = wait_final(&client, &server.base, &once).await;
    assert_eq!(lost["status"], "failed");
    assert_eq!(lost["error"]["type"], "lost", "{lost}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_work_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/jobs", server.base))
        .json(&json!({"task": "blocking_sleep", "args": {"ms": 800}}))
        .send()
        .await
        .unwrap();
    let id = id_of(&r.json::<Value>().await.unwrap());
    // Streams and long-polls that would never end by themselves must not hold the shutdown.
    let mut all_events = client
        .get(format!("{}/v1/events", server.base))
        .send()
        .await
        .unwrap();
    let forever = client
        .post(format!("{}/v1/jobs", server.base))
        .json(&json!({"task": "noop", "delay_ms": 3_600_000}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let long_poll = tokio::spawn(
        client
            .get(format!(
                "{}/v1/jobs/{}?wait=60",
                server.base,
                id_of(&forever)
            ))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    // The long-poll was answered when the drain ended it.
    let polled = long_poll.await.unwrap().unwrap();
    assert_eq!(polled.status(), reqwest::StatusCode::OK);
    // The stream is over: reading it ends (the server closed it or went away), never hangs.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), all_events.chunk())
        .await
        .expect("the event stream ended")
    {}

    let server = start(dir.path());
    let job = wait_final(&client, &server.base, &id).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(
        job["attempt"], 1,
        "the drain let it finish; it was not run again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_die_with_a_killed_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let stats: Value = reqwest::get(format!("{}/v1/stats", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pids: Vec<u64> = stats["executors"]["process"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    assert!(!pids.is_empty());
    server.kill9();
    let gone = |pid: &u64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    };
    for _ in 0..250 {
        if pids.iter().all(gone) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("workers outlived the server: {pids:?}");
}
