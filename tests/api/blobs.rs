//! Blobs: streamed uploads, limits, cut-off uploads, deletes guarded by jobs, and array_stats
//! reading them in place.

use std::io::Write;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

fn f64_bytes(xs: impl IntoIterator<Item = f64>) -> Vec<u8> {
    xs.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

async fn upload(app: &TestApp, bytes: Vec<u8>) -> String {
    let a = app
        .call_raw(Method::POST, "/v1/blobs", "application/octet-stream", bytes)
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

/// Files in the blobs folder (temp files included).
fn blob_files(app: &TestApp) -> Vec<String> {
    std::fs::read_dir(app.dir.path().join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_round_trips_and_is_deleted() {
    let app = spawn_app().await;
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let a = app
        .call_raw(
            Method::POST,
            "/v1/blobs",
            "application/octet-stream",
            bytes.clone(),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(a.body["size"], 300_000);
    let id = a.body["id"].as_str().unwrap().to_string();
    assert_eq!(a.headers["location"], format!("/v1/blobs/{id}").as_str());
    use sha2::Digest;
    let expected: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(a.body["sha256"], expected.as_str());

    let got = app
        .client
        .get(app.url(&format!("/v1/blobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap().to_vec(), bytes);

    assert_eq!(
        app.call(Method::DELETE, &format!("/v1/blobs/{id}"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.get(&format!("/v1/blobs/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.call(Method::DELETE, &format!("/v1/blobs/{id}"), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert!(blob_files(&app).is_empty(), "{:?}", blob_files(&app));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_wrongly_typed_and_cut_off_uploads_leave_nothing() {
    let app = spawn_with(|s| s.max_blob_bytes = 1000).await;
    let a = app
        .call_raw(
            Method::POST,
            "/v1/blobs",
            "application/octet-stream",
            vec![7u8; 1001],
        )
        .await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    let a = app
        .call_raw(
            Method::POST,
            "/v1/blobs",
            "application/json",
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Chunked, so the size is only known while streaming: the limit still holds.
    let chunks =
        futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![1u8; 400])));
    let resp = app
        .client
        .post(app.url("/v1/blobs"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Promise 900 bytes, send 300, hang up.
    let addr = app.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    write!(sock, "POST /v1/blobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 900\r\n\r\n").unwrap();
    sock.write_all(&[9u8; 300]).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(sock);
    let mut left = blob_files(&app);
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = blob_files(&app);
    }
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_stats_reads_a_blob_in_place() {
    let app = spawn_app().await;
    let id = upload(&app, f64_bytes((1..=1000).map(|i| i as f64))).await;
    let job = app
        .submit(json!({"task": "array_stats", "args": {"blob": id, "dtype": "f64"}}))
        .await;
    assert_eq!(job["executor"], "rayon");
    let done = app.wait(&id_of(&job), 20).await;
    let r = &done["result"];
    assert_eq!(r["count"], 1000, "{done}");
    assert_eq!(r["sum"], 500500.0);
    assert_eq!(r["mean"], 500.5);
    assert_eq!(
        (r["min"].as_f64(), r["max"].as_f64()),
        (Some(1.0), Some(1000.0))
    );
    let std = r["std"].as_f64().unwrap();
    assert!(
        (std - ((1000.0f64 * 1000.0 - 1.0) / 12.0).sqrt()).abs() < 1e-9,
        "{std}"
    );

    // Other element types read the same numbers.
    let i64s: Vec<u8> = (1..=1000i64).flat_map(|x| x.to_le_bytes()).collect();
    let f32s: Vec<u8> = (1..=1000).flat_map(|x| (x as f32).to_le_bytes()).collect();
    for (dtype, bytes) in [("i64", i64s), ("f32", f32s)] {
        let id = upload(&app, bytes).await;
        let job = app
            .submit(json!({"task": "array_stats", "args": {"blob": id, "dtype": dtype}}))
            .await;
        let done = app.wait(&id_of(&job), 20).await;
        assert_eq!(done["result"]["sum"], 500500.0, "{dtype}: {done}");
    }
    let id = upload(&app, vec![0, 255, 10]).await;
    let job = app
        .submit(json!({"task": "array_stats", "args": {"blob": id, "dtype": "u8"}}))
        .await;
    assert_eq!(app.wait(&id_of(&job), 20).await["result"]["max"], 255.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_naming_a_missing_or_misfit_blob_are_422() {
    let app = spawn_app().await;
    let missing = offload::job::JobId::new().to_string();
    let a = app
        .post(
            "/v1/jobs",
            json!({"task": "array_stats", "args": {"blob": missing}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["detail"].as_str().unwrap().contains("no blob"),
        "{}",
        a.body
    );
    let odd = upload(&app, vec![1u8; 12]).await;
    let a = app
        .post(
            "/v1/jobs",
            json!({"task": "array_stats", "args": {"blob": odd}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["detail"].as_str().unwrap().contains("whole number"),
        "{}",
        a.body
    );
    let batch =
        json!({"jobs": [{"task": "noop"}, {"task": "array_stats", "args": {"blob": missing}}]});
    let a = app.post("/v1/jobs/batch", batch).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["detail"].as_str().unwrap().contains("jobs[1]"),
        "{}",
        a.body
    );
    assert_eq!(
        app.get("/v1/jobs").await.body["jobs"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_in_use_by_an_unfinished_job_cannot_be_deleted_and_survives_restarts() {
    let mut app = spawn_app().await;
    let id = upload(&app, f64_bytes([1.0, 2.0])).await;
    let job = app
        .submit(json!({"task": "array_stats", "args": {"blob": id}, "delay_ms": 60_000}))
        .await;
    let a = app
        .call(Method::DELETE, &format!("/v1/blobs/{id}"), None)
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);

    app.stop().await;
    let app = spawn_in(app.dir, |_| {}).await;
    assert_eq!(
        app.get(&format!("/v1/blobs/{id}")).await.status,
        StatusCode::OK
    );
    app.post(&format!("/v1/jobs/{}/cancel", id_of(&job)), json!({}))
        .await;
    let a = app
        .call(Method::DELETE, &format!("/v1/blobs/{id}"), None)
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_finished_jobs_and_the_blobs_only_they_used() {
    let app = spawn_with(|s| {
        s.retention_secs = 0;
        s.prune_interval_ms = 100;
    })
    .await;
    let used = upload(&app, f64_bytes([1.0, 2.0])).await;
    let a = app
        .call_raw(
            Method::POST,
            "/v1/blobs?keep=true",
            "application/octet-stream",
            f64_bytes([3.0]),
        )
        .await;
    assert_eq!(a.body["keep"], true);
    let kept = a.body["id"].as_str().unwrap().to_string();
    let unused = upload(&app, f64_bytes([4.0])).await;
    let mut ids = Vec::new();
    for blob in [&used, &kept] {
        let job = app
            .submit(json!({"task": "array_stats", "args": {"blob": blob}}))
            .await;
        ids.push(id_of(&job));
    }
    let mut gone = false;
    for _ in 0..100 {
        if app.get(&format!("/v1/blobs/{used}")).await.status == StatusCode::NOT_FOUND {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the blob went with its last job");
    for id in &ids {
        // The other job may finish (and so be pruned) a round later than the first.
        let mut status = StatusCode::OK;
        for _ in 0..100 {
            status = app.get(&format!("/v1/jobs/{id}")).await.status;
            if status == StatusCode::NOT_FOUND {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, StatusCode::NOT_FOUND, "pruned");
    }
    assert_eq!(
        app.get(&format!("/v1/blobs/{kept}")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        app.get(&format!("/v1/blobs/{unused}")).await.status,
        StatusCode::OK
    );
    assert!(
        !app.dir.path().join("blobs").join(&used).exists(),
        "its file is gone too"
    );
}
