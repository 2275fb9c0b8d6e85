//! Jobs that build on each other, through the real server: graphs submitted in one batch,
//! failures that cancel descendants, retries by hand and in bulk, bulk cancels, a `kill -9`
//! mid-graph, and a graph run by two servers on one PostgreSQL database.

use std::time::Duration;

use async_trait::async_trait;
use offload::job::Kind;
use offload::task::{JobCtx, Task, TaskResult};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{drop_pg_schema, id_of, is_final, pg_schema, spawn_app, spawn_full, Binary};

/// A Rust task that asks for its parents' results and returns them as they came.
struct EchoParents;

#[async_trait]
impl Task for EchoParents {
    fn name(&self) -> &str {
        "echo_parents"
    }
    fn description(&self) -> &str {
        "Returns its parents' results."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io]
    }
    fn args_schema(&self) -> Value {
        json!({"type": "object"})
    }
    fn parent_results(&self) -> bool {
        true
    }
    async fn run_async(&self, ctx: JobCtx, _args: Value) -> TaskResult {
        Ok(ctx.parents().cloned().unwrap_or(Value::Null))
    }
}

/// A → B, C → D, all in one batch: `sum_parents` adds what its parents returned.
fn diamond() -> Value {
    json!({"jobs": [
        {"task": "sum_parents", "args": {"add": 1}},
        {"task": "sum_parents", "args": {"add": 10}, "depends_on": ["#0"]},
        {"task": "sum_parents", "args": {"add": 100}, "depends_on": ["#0"]},
        {"task": "sum_parents", "depends_on": ["#1", "#2"]},
    ]})
}

fn ids(batch: &Value) -> Vec<String> {
    batch["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect()
}

fn time(job: &Value, field: &str) -> String {
    job[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field}: {job}"))
        .to_string()
}

#[tokio::test]
async fn a_diamond_in_one_batch_runs_in_order_and_the_last_sees_both_parents() {
    let app = spawn_full(
        tempfile::tempdir().unwrap(),
        |_| {},
        |r| {
            r.register(EchoParents);
        },
    )
    .await;
    let mut spec = diamond();
    spec["jobs"]
        .as_array_mut()
        .unwrap()
        .push(json!({"task": "echo_parents", "depends_on": ["#1", "#2"]}));
    let a = app.post("/v1/jobs/batch", spec).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let [ida, idb, idc, idd, ide] = <[String; 5]>::try_from(ids(&a.body)).unwrap();
    let jobs = a.body["jobs"].as_array().unwrap();
    assert_eq!(jobs[0]["status"], "queued");
    for j in &jobs[1..] {
        assert_eq!(j["status"], "waiting", "{j}");
    }
    assert_eq!(jobs[3]["depends_on"], json!([idb, idc]));

    let d = app.wait(&idd, 30).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(
        d["result"],
        json!({"sum": 112}),
        "B (1 + 10) and C (1 + 100)"
    );
    let e = app.wait(&ide, 30).await;
    assert_eq!(
        e["result"],
        json!({ idb.clone(): {"sum": 11}, idc.clone(): {"sum": 101} }),
        "{{parent id: result}}"
    );
    // In order: each started after its parents finished (RFC 3339 in UTC sorts as text).
    let get = |id: String| {
        let app = &app;
        async move { app.get(&format!("/v1/jobs/{id}")).await.body }
    };
    let (ja, jb, jc) = (
        get(ida.clone()).await,
        get(idb.clone()).await,
        get(idc.clone()).await,
    );
    for child in [&jb, &jc] {
        assert!(time(child, "started_at") >= time(&ja, "finished_at"));
    }
    assert!(time(&d, "started_at") >= time(&jb, "finished_at"));
    assert!(time(&d, "started_at") >= time(&jc, "finished_at"));

    let a = app.get(&format!("/v1/jobs/{ida}?children=true")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["children"], json!([idb, idc]));
    assert!(app
        .get(&format!("/v1/jobs/{ida}"))
        .await
        .body
        .get("children")
        .is_none());
    let waiting = app.get("/v1/jobs?status=waiting").await;
    assert_eq!(waiting.status, StatusCode::OK);
    assert_eq!(waiting.body["jobs"], json!([]));
}

#[tokio::test]
async fn a_failing_parent_cancels_its_descendants_unless_they_run_on_its_failure() {
    let app = spawn_app().await;
    let a = app
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [
                {"task": "fail", "max_attempts": 1},
                {"task": "noop", "depends_on": ["#0"]},
                {"task": "noop", "depends_on": ["#1"]},
                {"task": "noop", "depends_on": ["#0"], "run_on_parent_failure": true},
            ]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let [ida, idb, idc, idd] = <[String; 4]>::try_from(ids(&a.body)).unwrap();
    assert_eq!(app.wait(&ida, 30).await["status"], "failed");
    for (id, parent) in [(&idb, &ida), (&idc, &idb)] {
        let job = app.wait(id, 30).await;
        assert_eq!(job["status"], "cancelled", "{job}");
        assert_eq!(job["error"]["type"], "dependency_failed", "{job}");
        let message = job["error"]["message"].as_str().unwrap();
        assert!(message.contains(parent.as_str()), "{message}");
        assert_eq!(job["attempt"], 0, "never ran");
    }
    let d = app.wait(&idd, 30).await;
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(d["run_on_parent_failure"], true);
}

#[tokio::test]
async fn cycles_and_unknown_parents_are_422s_that_store_nothing() {
    let app = spawn_app().await;
    let ghost = "01900000-0000-7000-8000-000000000000";
    let cases = [
        (
            "/v1/jobs/batch",
            json!({"jobs": [
                {"task": "noop", "depends_on": ["#2"]},
                {"task": "noop", "depends_on": ["#0"]},
                {"task": "noop", "depends_on": ["#1"]},
            ]}),
            "cycle",
        ),
        (
            "/v1/jobs/batch",
            json!({"jobs": [{"task": "noop"}, {"task": "noop", "depends_on": ["#1"]}]}),
            "itself",
        ),
        (
            "/v1/jobs/batch",
            json!({"jobs": [{"task": "noop"}, {"task": "noop", "depends_on": ["#7"]}]}),
            "#7",
        ),
        (
            "/v1/jobs/batch",
            json!({"jobs": [{"task": "noop"}, {"task": "noop", "depends_on": [ghost]}]}),
            ghost,
        ),
        (
            "/v1/jobs",
            json!({"task": "noop", "depends_on": [ghost]}),
            ghost,
        ),
        (
            "/v1/jobs",
            json!({"task": "noop", "depends_on": ["#0"]}),
            "batch",
        ),
        (
            "/v1/jobs",
            json!({"task": "noop", "depends_on": ["nope"]}),
            "nope",
        ),
        (
            "/v1/jobs",
            json!({"task": "noop", "depends_on": "#0"}),
            "depends_on",
        ),
        (
            "/v1/jobs",
            json!({"task": "noop", "run_on_parent_failure": "yes"}),
            "run_on_parent_failure",
        ),
    ];
    for (path, body, says) in cases {
        let a = app.post(path, body.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            a.body
        );
        let detail = a.body["detail"].as_str().unwrap();
        assert!(detail.contains(says), "{body}: {detail}");
    }
    let all = app.get("/v1/jobs").await;
    assert_eq!(all.body["jobs"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn a_retry_by_hand_runs_a_failed_job_again_and_brings_back_its_children() {
    let app = spawn_app().await;
    // A file that is not there yet: the parent fails until it is.
    let a = app
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [
                {"task": "file_sha256", "args": {"path": "later.txt"}, "max_attempts": 1},
                {"task": "sum_parents", "depends_on": ["#0"]},
            ]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let [ida, idb] = <[String; 2]>::try_from(ids(&a.body)).unwrap();
    assert_eq!(app.wait(&ida, 30).await["status"], "failed");
    assert_eq!(
        app.wait(&idb, 30).await["error"]["type"],
        "dependency_failed"
    );

    // The child cannot come back on its own while its parent is failed.
    let r = app.post(&format!("/v1/jobs/{idb}/retry"), json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains(&ida));

    std::fs::create_dir_all(app.dir.path().join("files")).unwrap();
    std::fs::write(app.dir.path().join("files/later.txt"), b"here now").unwrap();
    let r = app.post(&format!("/v1/jobs/{ida}/retry"), json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["retried"], 1);
    // Fresh attempts under new numbers: the one used stays counted, the budget is raised.
    assert_eq!(r.body["attempt"], 1);
    assert_eq!(r.body["max_attempts"], 2, "one more, as submitted");
    assert!(matches!(
        r.body["status"].as_str(),
        Some("queued" | "running" | "succeeded")
    ));
    let a = app.wait(&ida, 30).await;
    assert_eq!(a["status"], "succeeded", "{a}");
    assert_eq!(
        (a["attempt"].as_u64(), a["retried"].as_u64()),
        (Some(2), Some(1)),
        "ran as attempt 2"
    );
    let b = app.wait(&idb, 30).await;
    assert_eq!(b["status"], "succeeded", "came back with its parent: {b}");
    assert_eq!(b["result"], json!({"sum": 8}), "the parent's bytes: 8");

    // Only failed or cancelled jobs are retried; an unknown one is a 404.
    let r = app.post(&format!("/v1/jobs/{ida}/retry"), json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let queued = app
        .submit(json!({"task": "sleep", "args": {"ms": 5000}}))
        .await;
    let r = app
        .post(&format!("/v1/jobs/{}/retry", id_of(&queued)), json!({}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    let r = app
        .post(
            "/v1/jobs/01900000-0000-7000-8000-000000000000/retry",
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.post("/v1/jobs/not-an-id/retry", json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// How many jobs match a list query (paging through).
async fn count(app: &crate::helpers::TestApp, query: &str) -> usize {
    let mut n = 0;
    let mut cursor = String::new();
    loop {
        let page = app
            .get(&format!("/v1/jobs?limit=1000&{query}&cursor={cursor}"))
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        n += page.body["jobs"].as_array().unwrap().len();
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => return n,
        }
    }
}

async fn until_count(app: &crate::helpers::TestApp, query: &str, want: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = count(app, query).await;
        if n == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{query}: {n}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn bulk_retry_puts_a_hundred_failed_jobs_back_with_a_limit_per_call() {
    let app = spawn_app().await;
    let specs = vec![json!({"task": "fail", "max_attempts": 1}); 100];
    let a = app.post("/v1/jobs/batch", json!({ "jobs": specs })).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    app.submit(json!({"task": "noop"})).await;
    until_count(&app, "status=failed&task=fail", 100).await;
    let started = offload::clock::Micros::now().to_rfc3339();

    let r = app
        .call(Method::POST, "/v1/jobs/retry?status=failed&limit=60", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["matched"], 60);
    assert_eq!(r.body["limit_reached"], true);
    assert_eq!(r.body["ids"].as_array().unwrap().len(), 60);
    let r = app
        .call(Method::POST, "/v1/jobs/retry?task=fail", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["matched"], 40,
        "the rest; the succeeded noop is not retried"
    );
    assert_eq!(r.body["limit_reached"], false);

    // Each ran once more (as attempt 2) and failed again, its manual retry counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = app.get("/v1/jobs?task=fail&limit=1000").await;
        let jobs = page.body["jobs"].as_array().unwrap().clone();
        assert_eq!(jobs.len(), 100);
        if jobs
            .iter()
            .all(|j| j["status"] == "failed" && j["retried"] == 1 && j["attempt"] == 2)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all ran again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing created after `started` matches; a bad filter changes nothing.
    let r = app
        .call(
            Method::POST,
            &format!(
                "/v1/jobs/retry?created_after={}",
                started.replace('+', "%2B")
            ),
            None,
        )
        .await;
    assert_eq!(r.body["matched"], 0, "{}", r.body);
    // Nor does another lane's: `fail` runs on the async lane.
    let r = app
        .call(Method::POST, "/v1/jobs/retry?executor=rayon", None)
        .await;
    assert_eq!(r.body["matched"], 0, "{}", r.body);
    for bad in [
        "/v1/jobs/retry?executor=gpu",
        "/v1/jobs/retry?status=queued",
        "/v1/jobs/retry?limit=0",
        "/v1/jobs/retry?limit=1001",
        "/v1/jobs/retry?created_before=yesterday",
        "/v1/jobs/retry?colour=red",
        "/v1/jobs/cancel?status=failed",
    ] {
        let r = app.call(Method::POST, bad, None).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}: {}",
            r.body
        );
    }
    assert_eq!(count(&app, "status=failed").await, 100);
}

#[tokio::test]
async fn bulk_cancel_stops_unfinished_matches_and_their_children() {
    let app = spawn_app().await;
    let mut specs = vec![json!({"task": "sleep", "args": {"ms": 60_000}}); 5];
    specs.push(json!({"task": "noop", "depends_on": ["#0"]}));
    let a = app.post("/v1/jobs/batch", json!({ "jobs": specs })).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let child = id_of(&a.body["jobs"][5]);
    let first = id_of(&a.body["jobs"][0]);
    app.wait_until(&first, 10, |j| j["status"] == "running")
        .await;
    let r = app
        .call(Method::POST, "/v1/jobs/cancel?task=sleep", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["matched"], 5);
    for job in a.body["jobs"].as_array().unwrap().iter().take(5) {
        let j = app.wait(&id_of(job), 10).await;
        assert_eq!(j["status"], "cancelled", "{j}");
        assert_eq!(j["error"]["type"], "cancelled");
    }
    let c = app.wait(&child, 10).await;
    assert_eq!(c["error"]["type"], "dependency_failed", "{c}");
    let r = app
        .call(Method::POST, "/v1/jobs/cancel?task=sleep", None)
        .await;
    assert_eq!(r.body["matched"], 0, "nothing unfinished is left");
}

/// Waits (through `base`) until job `id` is final.
async fn final_on(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .get(format!("{base}/v1/jobs/{id}?wait=5"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "job {id} exists");
        let job: Value = r.json().await.unwrap();
        if is_final(&job) {
            return job;
        }
        assert!(tokio::time::Instant::now() < deadline, "never final: {job}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_survives_a_kill_9_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = [std::ffi::OsStr::new("--data-dir"), dir.path().as_os_str()];
    let mut server = Binary::start(&data);
    let client = reqwest::Client::new();
    let spec = json!({"jobs": [
        {"task": "sleep", "args": {"ms": 100}},
        {"task": "sleep", "args": {"ms": 3000}, "depends_on": ["#0"]},
        {"task": "sum_parents", "args": {"add": 5}, "depends_on": ["#0", "#1"]},
        {"task": "noop", "depends_on": ["#2"]},
    ]});
    let r = client
        .post(format!("{}/v1/jobs/batch", server.base))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let batch: Value = r.json().await.unwrap();
    let ids = ids(&batch);
    // Killed while the second step runs: the first is done, the rest wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let job: Value = client
            .get(format!("{}/v1/jobs/{}", server.base, ids[1]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["status"] == "running" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    let server = Binary::start(&data);
    let last = final_on(&client, &server.base, &ids[3]).await;
    assert_eq!(last["status"], "succeeded", "{last}");
    let sum = final_on(&client, &server.base, &ids[2]).await;
    assert_eq!(
        sum["result"],
        json!({"sum": 3105}),
        "5 + slept_ms 100 + 3000: {sum}"
    );
    let second = final_on(&client, &server.base, &ids[1]).await;
    assert_eq!(second["attempt"], 2, "requeued after the kill: {second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamonds_run_across_two_servers_on_one_postgresql_database() {
    let Some((schema, url)) = pg_schema("g").await else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<Binary> = dirs
        .iter()
        .map(|d| {
            Binary::start(&[
                "--lease-ms",
                "5000",
                "--database-url",
                &url,
                "--data-dir",
                d.path().to_str().unwrap(),
            ])
        })
        .collect();
    let client = reqwest::Client::new();
    let mut lasts = Vec::new();
    for i in 0..10 {
        let r = client
            .post(format!("{}/v1/jobs/batch", servers[i % 2].base))
            .json(&diamond())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let batch: Value = r.json().await.unwrap();
        lasts.push(ids(&batch)[3].clone());
    }
    for (i, id) in lasts.iter().enumerate() {
        // Asked of the other server than the one that took it.
        let d = final_on(&client, &servers[(i + 1) % 2].base, id).await;
        assert_eq!(d["status"], "succeeded", "{d}");
        assert_eq!(d["result"], json!({"sum": 112}), "{d}");
    }
    drop(servers);
    drop_pg_schema(&schema).await;
}
