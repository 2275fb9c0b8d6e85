//! The process lane: real worker processes, killed for real.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

async fn worker_pids(app: &TestApp) -> Vec<u64> {
    let stats = app.get("/v1/stats").await.body;
    let mut pids: Vec<u64> = stats["executors"]["process"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    pids.sort();
    pids
}

/// The worker pids once `n` workers are live. A replacement is listed once it has said it is
/// ready, a moment after the worker it replaces is gone.
async fn live_pids(app: &TestApp, n: usize) -> Vec<u64> {
    for _ in 0..500 {
        let pids = worker_pids(app).await;
        if pids.len() == n {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the lane never had {n} live workers");
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_jobs_run_in_worker_processes_with_the_same_results() {
    let app = spawn_app().await;
    let pids = worker_pids(&app).await;
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| alive(p)));
    let job = app
        .submit(json!({"task": "sum_squares", "args": {"n": 10_000_000}, "isolate": true}))
        .await;
    assert_eq!(job["executor"], "process");
    let done = app.wait(&id_of(&job), 60).await;
    assert_eq!(done["result"]["sum"], "333333283333335000000", "{done}");

    let primes = app
        .submit(json!({"task": "count_primes", "args": {"limit": 1_000_000}, "isolate": true}))
        .await;
    assert_eq!(primes["executor"], "process");
    assert_eq!(
        app.wait(&id_of(&primes), 60).await["result"]["count"],
        78498
    );

    // The same array job in both lanes gives the same answer.
    let bytes: Vec<u8> = (0..100_000)
        .flat_map(|i| ((i % 977) as f64 * 0.5).to_le_bytes())
        .collect();
    let a = app
        .call_raw(Method::POST, "/v1/blobs", "application/octet-stream", bytes)
        .await;
    let blob = a.body["id"].as_str().unwrap().to_string();
    let mut results = Vec::new();
    for isolate in [false, true] {
        let job = app
            .submit(json!({"task": "array_stats", "args": {"blob": blob}, "isolate": isolate}))
            .await;
        assert_eq!(job["executor"], if isolate { "process" } else { "rayon" });
        let done = app.wait(&id_of(&job), 60).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        results.push(done["result"].clone());
    }
    assert_eq!(results[0]["count"], results[1]["count"]);
    assert_eq!(results[0]["sum"], results[1]["sum"]);
    assert_eq!(results[0]["max"], results[1]["max"]);
    let (s0, s1) = (
        results[0]["std"].as_f64().unwrap(),
        results[1]["std"].as_f64().unwrap(),
    );
    assert!((s0 - s1).abs() < 1e-9 * s0, "{s0} vs {s1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_over_the_threshold_sends_the_job_to_the_process_lane() {
    let app = spawn_with(|s| s.process_threshold_bytes = 4096).await;
    let big: Vec<u8> = (0..1000).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let small: Vec<u8> = (0..10).flat_map(|i| (i as f64).to_le_bytes()).collect();
    for (bytes, lane) in [(big, "process"), (small, "rayon")] {
        let a = app
            .call_raw(Method::POST, "/v1/blobs", "application/octet-stream", bytes)
            .await;
        let job = app
            .submit(json!({"task": "array_stats", "args": {"blob": a.body["id"]}}))
            .await;
        assert_eq!(job["executor"], lane);
        assert_eq!(app.wait(&id_of(&job), 60).await["status"], "succeeded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_timeout_kill_the_worker_and_the_pool_recovers() {
    let app = spawn_app().await;
    let long = json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}, "isolate": true, "max_attempts": 1});
    let job = app.submit(long.clone()).await;
    let id = id_of(&job);
    app.wait_until(&id, 30, |j| j["status"] == "running").await;
    let before = worker_pids(&app).await;
    let a = app.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(a.body["status"], "cancelled");
    let mut after = worker_pids(&app).await;
    for _ in 0..100 {
        if after != before && after.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = worker_pids(&app).await;
    }
    assert_eq!(after.len(), 2);
    let killed: Vec<u64> = before
        .iter()
        .copied()
        .filter(|p| !after.contains(p))
        .collect();
    assert_eq!(
        killed.len(),
        1,
        "one worker was replaced: {before:?} -> {after:?}"
    );
    for _ in 0..100 {
        if !alive(killed[0]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!alive(killed[0]), "the cancelled job's worker is gone");

    let mut timed = long.clone();
    timed["timeout_ms"] = json!(300);
    let job = app.submit(timed).await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["error"]["type"], "timeout", "{done}");

    let ok = app
        .submit(json!({"task": "sum_squares", "args": {"n": 1000}, "isolate": true}))
        .await;
    assert_eq!(
        app.wait(&id_of(&ok), 30).await["result"]["sum"],
        "332833500"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_fails_it_as_crashed_and_is_replaced() {
    let app = spawn_with(|s| s.process_workers = 1).await;
    let job = app
        .submit(json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}, "isolate": true, "max_attempts": 1}))
        .await;
    app.wait_until(&id_of(&job), 30, |j| j["status"] == "running")
        .await;
    let pid = worker_pids(&app).await[0];
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["type"], "crashed", "{done}");
    let pids = live_pids(&app, 1).await;
    assert_ne!(pids[0], pid);
    let ok = app
        .submit(json!({"task": "noop", "kind": "cpu", "isolate": true}))
        .await;
    assert_eq!(app.wait(&id_of(&ok), 30).await["status"], "succeeded");
    let stats: Value = app.get("/v1/stats").await.body;
    assert_eq!(stats["executors"]["process"]["workers"][0]["jobs_done"], 1);
    assert_eq!(app.get("/v1/jobs").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_recycled_after_their_job_allowance() {
    let app = spawn_with(|s| {
        s.process_workers = 1;
        s.worker_max_jobs = 2;
    })
    .await;
    let first = worker_pids(&app).await;
    let stats: Value = app.get("/v1/stats").await.body;
    assert!(
        stats["executors"]["process"]["workers"][0]["rss_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    for _ in 0..2 {
        let j = app
            .submit(json!({"task": "noop", "kind": "cpu", "isolate": true}))
            .await;
        assert_eq!(app.wait(&id_of(&j), 30).await["status"], "succeeded");
    }
    let second = live_pids(&app, 1).await;
    assert_ne!(first, second, "the worker was replaced after 2 jobs");
    let j = app
        .submit(json!({"task": "noop", "kind": "cpu", "isolate": true}))
        .await;
    assert_eq!(app.wait(&id_of(&j), 30).await["status"], "succeeded");
    assert_eq!(
        worker_pids(&app).await,
        second,
        "a fresh worker keeps going"
    );
}

async fn upload_f64(app: &TestApp, xs: &[f64]) -> String {
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let a = app
        .call_raw(Method::POST, "/v1/blobs", "application/octet-stream", bytes)
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    a.body["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_array_job_is_split_across_every_idle_worker() {
    let app = spawn_app().await;
    let xs: Vec<f64> = (0..200_001)
        .map(|i| ((i * 7919) % 1000) as f64 / 3.0)
        .collect();
    let blob = upload_f64(&app, &xs).await;
    let rayon = app
        .submit(json!({"task": "array_stats", "args": {"blob": blob}}))
        .await;
    let rayon = app.wait(&id_of(&rayon), 60).await["result"].clone();
    let job = app
        .submit(json!({"task": "array_stats", "args": {"blob": blob}, "isolate": true}))
        .await;
    let done = app.wait(&id_of(&job), 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let split = &done["result"];
    assert_eq!(split["count"], 200_001);
    assert_eq!(split["min"], rayon["min"]);
    assert_eq!(split["max"], rayon["max"]);
    for k in ["sum", "mean", "std"] {
        let (a, b) = (split[k].as_f64().unwrap(), rayon[k].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-9 * b.abs(), "{k}: {a} vs {b}");
    }
    // Both workers computed a part of the one job.
    let stats = app.get("/v1/stats").await.body;
    let done_per_worker: Vec<u64> = stats["executors"]["process"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["jobs_done"].as_u64().unwrap())
        .collect();
    assert_eq!(done_per_worker, vec![1, 1], "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_sort_writes_a_new_blob_in_either_lane() {
    let app = spawn_app().await;
    let blob = upload_f64(&app, &[3.5, -1.0, f64::NAN, 2.0, 0.0]).await;
    for isolate in [false, true] {
        let job = app
            .submit(json!({"task": "array_sort", "args": {"blob": blob}, "isolate": isolate}))
            .await;
        let done = app.wait(&id_of(&job), 60).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["result"]["size"], 40);
        let out = done["result"]["blob"].as_str().unwrap();
        let bytes = app
            .client
            .get(app.url(&format!("/v1/blobs/{out}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let sorted: Vec<f64> = bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&sorted[..4], &[-1.0, 0.0, 2.0, 3.5]);
        assert!(sorted[4].is_nan());
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(done["result"]["sha256"], sha.as_str());
        let meta = app.get(&format!("/v1/blobs/{out}")).await;
        assert_eq!(meta.status, StatusCode::OK);
    }
    let leftovers: Vec<String> = std::fs::read_dir(app.dir.path().join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rayon_and_process_lanes_share_one_core_budget() {
    let app = spawn_with(|s| s.cpu_threads = 1).await;
    let hog = app
        .submit(json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}}))
        .await;
    app.wait_until(&id_of(&hog), 30, |j| j["status"] == "running")
        .await;
    let small = app
        .submit(json!({"task": "sum_squares", "args": {"n": 1000}, "isolate": true}))
        .await;
    // The only core is taken: the isolated job cannot finish while the hog runs.
    let waited = app
        .get(&format!("/v1/jobs/{}?wait=1", id_of(&small)))
        .await
        .body;
    assert!(!is_final(&waited), "{waited}");
    app.post(&format!("/v1/jobs/{}/cancel", id_of(&hog)), json!({}))
        .await;
    assert_eq!(app.wait(&id_of(&small), 30).await["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_that_dies_is_replaced_at_once() {
    let app = spawn_app().await;
    let before = worker_pids(&app).await;
    assert!(std::process::Command::new("kill")
        .args(["-9", &before[0].to_string()])
        .status()
        .unwrap()
        .success());
    for _ in 0..250 {
        let now = worker_pids(&app).await;
        if now.len() == 2 && !now.contains(&before[0]) {
            assert!(now.iter().all(|&p| alive(p)));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the dead idle worker was not replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_and_output_files_left_by_a_crash_are_removed_at_start() {
    let mut app = spawn_app().await;
    app.stop().await;
    let blobs = app.dir.path().join("blobs");
    std::fs::write(
        blobs.join(".upload-0190aaaa-0000-7000-8000-000000000000"),
        b"half",
    )
    .unwrap();
    std::fs::write(
        blobs.join(".out-0190aaaa-0000-7000-8000-000000000000-1"),
        b"half",
    )
    .unwrap();
    let app = spawn_in(app.dir, |_| {}).await;
    let left: Vec<_> = std::fs::read_dir(app.dir.path().join("blobs"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Regression: a worker whose replacement failed to start was never started again, so the pool
/// shrank for good and jobs waited for it forever. Now the supervisor starts it again with
/// backoff, `/v1/stats` lists only live workers, and a job waits for a live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_fail_to_restart_are_retried_until_they_start_and_jobs_wait_for_them() {
    use std::os::unix::fs::PermissionsExt;
    // The worker executable: the real one, while the flag file exists; otherwise it exits at
    // once, as a deleted or broken binary would.
    let bin = tempfile::tempdir().unwrap();
    let flag = bin.path().join("workers-may-start");
    let script = bin.path().join("worker.sh");
    std::fs::write(&flag, b"").unwrap();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ -e '{}' ] || exit 1\nexec '{}' \"$@\"\n",
            flag.display(),
            env!("CARGO_BIN_EXE_offload")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A process another test forks while the script was open for writing keeps that fd until
    // it execs; running the script meanwhile fails with ETXTBSY. Let those moments pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let exe = script.clone();
    let app = spawn_with(move |s| s.worker_exe = Some(exe)).await;
    let before = live_pids(&app, 2).await;

    std::fs::remove_file(&flag).unwrap();
    for pid in &before {
        assert!(std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
    // Both died idle and their replacements fail to start: no live worker is listed.
    live_pids(&app, 0).await;
    let job = app
        .submit(
            json!({"task": "sum_squares", "args": {"n": 1000}, "isolate": true, "max_attempts": 1}),
        )
        .await;
    let id = id_of(&job);
    // Over several failed restarts the job neither fails nor runs: it waits for a worker.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = app.get(&format!("/v1/jobs/{id}")).await.body;
    assert!(!is_final(&waiting), "{waiting}");
    assert!(worker_pids(&app).await.is_empty());
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("offload_worker_start_failures_total"),
        "start failures are counted"
    );

    // The executable is back: the supervisor's next retry (within 5 s) starts both workers.
    std::fs::write(&flag, b"").unwrap();
    let done = app.wait(&id, 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["sum"], "332833500");
    let after = live_pids(&app, 2).await;
    assert!(after.iter().all(|p| !before.contains(p) && alive(*p)));
}
