//! Nothing stranded: whatever clients and disks do, every stored job reaches a final state.
//! Each test drives the real binary over real HTTP (and, for the full disk, a real tmpfs).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::helpers::{is_final, read, Binary};

/// Sends a request on a raw socket and closes it at once, without reading the answer: a
/// client that times out, a killed script, a load generator stopped mid-run.
async fn send_and_hang_up(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    linger: Duration,
) {
    let addr = base.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    sock.write_all(req.as_bytes()).await.unwrap();
    // Then close both directions: hyper sees the hang-up while the handler is still working
    // and drops its future.
    tokio::time::sleep(linger).await;
    drop(sock);
}

async fn get_json(client: &reqwest::Client, url: &str) -> (StatusCode, Value) {
    let a = read(client.get(url).send().await.unwrap()).await;
    (a.status, a.body)
}

/// Every job the server stores, newest first.
async fn all_jobs(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{base}/v1/jobs?limit=200&cursor={c}"),
            None => format!("{base}/v1/jobs?limit=200"),
        };
        let (status, body) = get_json(client, &url).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        out.extend(body["jobs"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Waits until every stored job is final; panics naming the ones that are not.
async fn all_final(client: &reqwest::Client, base: &str, secs: u64) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let jobs = all_jobs(client, base).await;
        let open: Vec<&Value> = jobs.iter().filter(|j| !is_final(j)).collect();
        if open.is_empty() {
            return jobs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} stored jobs never reached a final state, e.g. {}",
            open.len(),
            open[0]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Regression: a submit whose client hung up right after sending left its committed job
// `queued` for good (19 of 36 in one run), and a same-key resubmit handed back that job.
#[tokio::test]
async fn submits_whose_clients_hang_up_all_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(&["--data-dir", dir.path().to_str().unwrap()]);
    let client = reqwest::Client::new();
    let body = json!({"task": "sleep", "args": {"ms": 20}}).to_string();
    let sends = (0..60).map(|i| {
        let key = format!("hang-{i}");
        let base = server.base.clone();
        let body = body.clone();
        async move {
            send_and_hang_up(
                &base,
                "POST",
                "/v1/jobs",
                &[("Idempotency-Key", &key)],
                &body,
                Duration::from_micros(100 * (i % 10)),
            )
            .await
        }
    });
    futures_util::future::join_all(sends).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let jobs = all_final(&client, &server.base, 20).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"), "{jobs:?}");
    // The same key again: the stored job (200) or, where the hang-up came before the commit,
    // a new one (202); either way a job that runs.
    for i in 0..60 {
        let a = read(
            client
                .post(format!("{}/v1/jobs", server.base))
                .header("Idempotency-Key", format!("hang-{i}"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert!(
            a.status == StatusCode::OK || a.status == StatusCode::ACCEPTED,
            "{}",
            a.body
        );
        let id = a.body["id"].as_str().unwrap();
        let (_, job) = get_json(&client, &format!("{}/v1/jobs/{id}?wait=20", server.base)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let (_, stats) = get_json(&client, &format!("{}/v1/stats", server.base)).await;
    assert_eq!(stats["executors"]["async"]["queued"], 0, "{stats}");
}

// Regression: 128 submit-then-cancel pairs from 16 clients left 11–14 cancelled jobs holding
// async slots: the cancel committed before the claimed attempt registered, and never reached it.
#[tokio::test]
async fn cancels_that_race_claims_always_reach_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(&["--data-dir", dir.path().to_str().unwrap()]);
    let clients = (0..16).map(|_| {
        let base = server.base.clone();
        async move {
            let client = reqwest::Client::new();
            for _ in 0..8 {
                let a = read(
                    client
                        .post(format!("{base}/v1/jobs"))
                        .json(&json!({"task": "sleep", "args": {"ms": 60000}}))
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
                assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
                let id = a.body["id"].as_str().unwrap().to_string();
                let c = read(
                    client
                        .post(format!("{base}/v1/jobs/{id}/cancel"))
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
                assert_eq!(c.status, StatusCode::OK, "{}", c.body);
                assert_eq!(c.body["status"], "cancelled");
            }
        }
    });
    futures_util::future::join_all(clients).await;
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let (_, stats) = get_json(&client, &format!("{}/v1/stats", server.base)).await;
        if stats["executors"]["async"]["running"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cancelled jobs still hold async slots a second later: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let jobs = all_final(&client, &server.base, 5).await;
    assert_eq!(jobs.len(), 128);
    assert!(jobs.iter().all(|j| j["status"] == "cancelled"));
}

// Regression: a cancel whose client hung up committed, and the running work was never told.
// Whichever of these cancels commit (a hang-up before the handler runs cancels nothing), the
// work they cancel stops.
#[tokio::test]
async fn cancels_whose_clients_hang_up_still_stop_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(&["--data-dir", dir.path().to_str().unwrap()]);
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let a = read(
            client
                .post(format!("{}/v1/jobs", server.base))
                .json(&json!({"task": "sleep", "args": {"ms": 60000}}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        ids.push(a.body["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, job) = get_json(&client, &format!("{}/v1/jobs/{id}", server.base)).await;
            if job["status"] == "running" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{job}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let linger = Duration::from_micros(200 * i as u64);
        send_and_hang_up(
            &server.base,
            "POST",
            &format!("/v1/jobs/{id}/cancel"),
            &[],
            "",
            linger,
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut cancelled = 0;
    for id in &ids {
        let (_, job) = get_json(&client, &format!("{}/v1/jobs/{id}", server.base)).await;
        if job["status"] == "cancelled" {
            cancelled += 1;
        }
    }
    assert!(
        cancelled > 0,
        "no hung-up cancel committed: the test provoked nothing"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let (_, stats) = get_json(&client, &format!("{}/v1/stats", server.base)).await;
        if stats["executors"]["async"]["running"] == 20 - cancelled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cancelled} jobs are cancelled, yet the lane runs: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small tmpfs mounted on a temp dir, unmounted when dropped; `None` where this machine does
/// not let the test mount one (not root, no CAP_SYS_ADMIN).
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Fills the file system that holds `path` until a write fails; returns the filler's path.
fn fill_disk(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    // The last bytes, a page at a time, so not even a small write fits.
    let page = [0u8; 512];
    while f.write_all(&page).is_ok() {}
    path
}

// A full disk under a running server: every acknowledged job is kept and reaches a final
// state, every refused submit is a 503 with Retry-After that stored nothing, and outcomes
// that could not be written are written once there is room again.
#[tokio::test]
async fn a_full_disk_loses_no_acknowledged_job_and_strands_none() {
    let Some(fs) = Tmpfs::mount("16m") else {
        eprintln!("skipped a_full_disk_loses_no_acknowledged_job_and_strands_none: cannot mount a tmpfs here (needs root)");
        return;
    };
    let data = fs.0.path().join("data");
    let server = Binary::start(&["--data-dir", data.to_str().unwrap()]);
    let client = reqwest::Client::new();
    let submit = |key: String, ms: u64| {
        let client = client.clone();
        let base = server.base.clone();
        async move {
            read(
                client
                    .post(format!("{base}/v1/jobs"))
                    .header("Idempotency-Key", key)
                    .json(&json!({"task": "sleep", "args": {"ms": ms}}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    // Running while the disk fills: its outcome cannot be written at first.
    let early = submit("early".into(), 400).await;
    assert_eq!(early.status, StatusCode::ACCEPTED);
    let filler = fill_disk(fs.0.path());
    let mut accepted = vec![early.body["id"].as_str().unwrap().to_string()];
    let mut refused = Vec::new();
    for i in 0..40 {
        let key = format!("full-{i}");
        let a = submit(key.clone(), 10).await;
        match a.status {
            StatusCode::ACCEPTED | StatusCode::OK => {
                accepted.push(a.body["id"].as_str().unwrap().to_string())
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(a.headers.contains_key("retry-after"), "{:?}", a.headers);
                assert_eq!(
                    a.headers["content-type"], "application/problem+json",
                    "{}",
                    a.body
                );
                refused.push(key);
            }
            other => panic!("a full disk answered {other}: {}", a.body),
        }
    }
    assert!(
        !refused.is_empty(),
        "the full disk refused nothing: the test provoked nothing"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::remove_file(&filler).unwrap();
    // Room again: every acknowledged job runs and its outcome is written.
    for id in &accepted {
        let (status, job) =
            get_json(&client, &format!("{}/v1/jobs/{id}?wait=30", server.base)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "acknowledged job {id} was lost: {job}"
        );
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // A refused submit stored nothing: its key is free, and a retry makes one new job.
    for key in &refused {
        let a = submit(key.clone(), 10).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{key}: {}", a.body);
    }
    let jobs = all_final(&client, &server.base, 30).await;
    assert_eq!(
        jobs.len(),
        accepted.len() + refused.len(),
        "nothing stored twice"
    );
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"), "{jobs:?}");
}
