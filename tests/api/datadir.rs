//! One server per data dir: a second `offload serve` on a data dir in use stops at once and
//! touches nothing.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::helpers::{id_of, is_final, Binary};

fn start(data_dir: &Path) -> Binary {
    Binary::start(&[std::ffi::OsStr::new("--data-dir"), data_dir.as_os_str()])
}

/// Runs `offload serve` on `data_dir` (plus `extra`), expecting it to exit within 10 s.
fn run_to_exit(data_dir: &Path, extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a second server on a data dir in use did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

async fn get(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_data_dir_in_use_exits_naming_the_holder_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path());
    let client = reqwest::Client::new();
    let job: Value = client
        .post(format!("{}/v1/jobs", first.base))
        .json(&json!({"task": "blocking_sleep", "args": {"ms": 1500}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = id_of(&job);
    let url = format!("{}/v1/jobs/{id}", first.base);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&client, url.clone()).await["status"] != "running" {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = run_to_exit(dir.path(), &[]);
    assert!(!second.status.success(), "{:?}", second.status);
    let stderr = String::from_utf8_lossy(&second.stderr);
    let holder = format!("pid {}", first.child.id());
    assert!(
        stderr.contains(&dir.path().display().to_string()) && stderr.contains(&holder),
        "the message names the data dir and {holder}: {stderr}"
    );

    // A second server that had run recovery would have requeued the running job (attempt 2).
    let done = loop {
        let job = get(&client, format!("{url}?wait=5")).await;
        if is_final(&job) {
            break job;
        }
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_is_locked_before_the_database_is_opened_whatever_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let _first = start(dir.path());
    // Nothing listens on port 1: had the server tried the database first, it would fail on
    // the connection, not on the lock.
    let second = run_to_exit(
        dir.path(),
        &["--database-url", "postgres://nobody@127.0.0.1:1/none"],
    );
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("is in use by another offload server"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_with_sigkill_leaves_no_stale_lock() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = start(dir.path());
    first.kill9();
    let second = start(dir.path());
    let stats = get(&reqwest::Client::new(), format!("{}/v1/stats", second.base)).await;
    assert!(stats["executors"].is_object(), "{stats}");
}

// Regression (review): two servers with data dirs of their own but one SQLite file (given with
// --database-url) would each take the other's running jobs for a dead process's at start.
#[tokio::test]
async fn two_servers_cannot_share_one_sqlite_file_from_different_data_dirs() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", shared.path().join("jobs.db").display());
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let data_a = a.path().to_str().unwrap().to_string();
    let _first = Binary::start(&["--data-dir", &data_a, "--database-url", &url]);
    let second = run_to_exit(b.path(), &["--database-url", &url]);
    assert!(!second.status.success(), "{:?}", second.status);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("jobs.db") && stderr.contains("is in use by another offload server"),
        "{stderr}"
    );
}
