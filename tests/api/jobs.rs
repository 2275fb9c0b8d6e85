//! The job endpoints' happy paths and the task catalogue.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_answers_202_with_location_and_io_noop_runs_async() {
    let app = spawn_app().await;
    let a = app.post("/v1/jobs", json!({"task": "noop"})).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let id = id_of(&a.body);
    assert_eq!(a.headers["location"], format!("/v1/jobs/{id}").as_str());
    assert_eq!(a.body["status"], "queued");
    assert_eq!(a.body["kind"], "io");
    assert_eq!(a.body["executor"], "async");
    assert_eq!(a.body["max_attempts"], 3);
    let done = app.wait(&id, 10).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], json!({}));
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["progress"], 1.0);
    assert!(done["timings"]["run_ms"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sum_squares_of_ten_million_is_exact() {
    let app = spawn_app().await;
    let job = app
        .submit(json!({"task": "sum_squares", "args": {"n": 10_000_000}}))
        .await;
    assert_eq!(job["executor"], "rayon");
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["result"]["sum"], "333333283333335000000", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_primes_below_ten_million() {
    let app = spawn_app().await;
    let job = app
        .submit(json!({"task": "count_primes", "args": {"limit": 10_000_000}}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["result"]["count"], 664579, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_lands_in_its_lane_and_runs_there() {
    let app = spawn_app().await;
    std::fs::write(app.dir.path().join("files/hello.txt"), "hello").unwrap();
    let cases = [
        (
            json!({"task": "sleep", "args": {"ms": 5}}),
            "async",
            json!({"slept_ms": 5}),
        ),
        (
            json!({"task": "blocking_sleep", "args": {"ms": 5}}),
            "blocking",
            json!({"slept_ms": 5}),
        ),
        (json!({"task": "noop", "kind": "io"}), "async", json!({})),
        (json!({"task": "noop", "kind": "cpu"}), "rayon", json!({})),
        (
            json!({"task": "fail", "kind": "cpu", "args": {"until_attempt": 1}}),
            "rayon",
            json!({"attempt": 1}),
        ),
        (
            json!({"task": "fail", "args": {"until_attempt": 1}}),
            "async",
            json!({"attempt": 1}),
        ),
        (
            json!({"task": "sum_squares", "args": {"n": 4}}),
            "rayon",
            json!({"sum": "14"}),
        ),
        (
            json!({"task": "file_sha256", "args": {"path": "hello.txt"}}),
            "blocking",
            json!({"bytes": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}),
        ),
    ];
    for (spec, executor, result) in cases {
        let job = app.submit(spec.clone()).await;
        assert_eq!(job["executor"], executor, "{spec}");
        let done = app.wait(&id_of(&job), 20).await;
        assert_eq!(done["status"], "succeeded", "{spec}: {done}");
        assert_eq!(done["result"], result, "{spec}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_answers_with_the_job_as_it_is_when_time_runs_out() {
    let app = spawn_app().await;
    let job = app.submit(sleep_spec(60_000)).await;
    let a = app.get(&format!("/v1/jobs/{}?wait=0.2", id_of(&job))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(!is_final(&a.body), "{}", a.body);
    let a = app.get(&format!("/v1/jobs/{}?wait=0", id_of(&job))).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_newest_first_and_pages_with_a_cursor() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(id_of(&app.submit(json!({"task": "noop"})).await));
    }
    let delayed = app
        .submit(json!({"task": "sleep", "args": {"ms": 1}, "delay_ms": 60_000}))
        .await;
    for id in &ids {
        app.wait(id, 10).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?task=noop&limit=2&cursor={c}"),
            None => "/v1/jobs?task=noop&limit=2".to_string(),
        };
        let a = app.get(&path).await;
        assert_eq!(a.status, StatusCode::OK);
        for j in a.body["jobs"].as_array().unwrap() {
            seen.push(id_of(j));
        }
        match a.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let queued = app.get("/v1/jobs?status=queued").await;
    let queued: Vec<String> = queued.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(queued, vec![id_of(&delayed)]);
    let cpu = app.get("/v1/jobs?kind=cpu").await;
    assert_eq!(cpu.body["jobs"].as_array().unwrap().len(), 0);
    let ok = app.get("/v1/jobs?status=succeeded&limit=1000").await;
    assert_eq!(ok.body["jobs"].as_array().unwrap().len(), 5);
    // By lane: noop and sleep run on the async lane, nothing here on rayon.
    let lane = app.get("/v1/jobs?executor=async&limit=1000").await;
    assert_eq!(lane.body["jobs"].as_array().unwrap().len(), 6);
    let lane = app.get("/v1/jobs?executor=async&status=queued").await;
    assert_eq!(lane.body["jobs"][0]["id"], delayed["id"]);
    let rayon = app.get("/v1/jobs?executor=rayon").await;
    assert_eq!(rayon.body["jobs"].as_array().unwrap().len(), 0);
    let bad = app.get("/v1/jobs?executor=gpu").await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        bad.body["detail"].as_str().unwrap().contains("executor"),
        "{}",
        bad.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_stores_all_in_order_or_nothing() {
    let app = spawn_app().await;
    let specs = json!({"jobs": [
        {"task": "noop"},
        {"task": "sum_squares", "args": {"n": 10}},
        {"task": "sleep", "args": {"ms": 1}, "priority": 3}
    ]});
    let a = app.post("/v1/jobs/batch", specs).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let jobs = a.body["jobs"].as_array().unwrap();
    let tasks: Vec<&str> = jobs.iter().map(|j| j["task"].as_str().unwrap()).collect();
    assert_eq!(tasks, ["noop", "sum_squares", "sleep"]);
    for j in jobs {
        assert_eq!(app.wait(&id_of(j), 10).await["status"], "succeeded");
    }

    let bad = json!({"jobs": [{"task": "noop"}, {"task": "sleep", "args": {"ms": -1}}, {"task": "noop"}]});
    let a = app.post("/v1/jobs/batch", bad).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["detail"].as_str().unwrap().contains("jobs[1]"),
        "{}",
        a.body
    );
    let all = app.get("/v1/jobs?limit=1000").await;
    assert_eq!(
        all.body["jobs"].as_array().unwrap().len(),
        3,
        "nothing of the bad batch is stored"
    );

    let too_many: Vec<Value> = (0..1001).map(|_| json!({"task": "noop"})).collect();
    let a = app.post("/v1/jobs/batch", json!({"jobs": too_many})).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_replays_the_same_job_and_refuses_another_body() {
    let app = spawn_app().await;
    let spec = json!({"task": "sleep", "args": {"ms": 1}, "idempotency_key": "order-17"});
    let first = app.post("/v1/jobs", spec.clone()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = app.post("/v1/jobs", spec).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(id_of(&again.body), id_of(&first.body));
    let other = app
        .post(
            "/v1/jobs",
            json!({"task": "sleep", "args": {"ms": 2}, "idempotency_key": "order-17"}),
        )
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{}", other.body);

    // The header stands for the body field: same request.
    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "order-17")
        .json(&json!({"task": "sleep", "args": {"ms": 1}}))
        .send()
        .await
        .unwrap();
    let via_header = read(resp).await;
    assert_eq!(via_header.status, StatusCode::OK);
    assert_eq!(id_of(&via_header.body), id_of(&first.body));

    let resp = app
        .client
        .post(app.url("/v1/jobs"))
        .header("Idempotency-Key", "other")
        .json(&json!({"task": "noop", "idempotency_key": "order-18"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let all = app.get("/v1/jobs").await;
    assert_eq!(all.body["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first() {
    let app = spawn_with(|s| s.cpu_threads = 1).await;
    let blocker = app
        .submit(json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}}))
        .await;
    app.wait_until(&id_of(&blocker), 10, |j| j["status"] == "running")
        .await;
    let low = app
        .submit(json!({"task": "noop", "kind": "cpu", "priority": -5}))
        .await;
    let high = app
        .submit(json!({"task": "noop", "kind": "cpu", "priority": 5}))
        .await;
    app.post(&format!("/v1/jobs/{}/cancel", id_of(&blocker)), json!({}))
        .await;
    let low = app.wait(&id_of(&low), 10).await;
    let high = app.wait(&id_of(&high), 10).await;
    let started = |j: &Value| {
        offload::clock::Micros::parse_rfc3339(j["started_at"].as_str().unwrap()).unwrap()
    };
    assert!(started(&high) <= started(&low), "high {high}\nlow {low}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_run_at_schedule_the_job() {
    let app = spawn_app().await;
    let job = app.submit(json!({"task": "noop", "delay_ms": 300})).await;
    let at =
        |j: &Value, f: &str| offload::clock::Micros::parse_rfc3339(j[f].as_str().unwrap()).unwrap();
    let gap = at(&job, "scheduled_at").0 - at(&job, "created_at").0;
    assert_eq!(gap, 300_000);
    let done = app.wait(&id_of(&job), 10).await;
    assert_eq!(done["status"], "succeeded");
    assert!(at(&done, "started_at") >= at(&done, "scheduled_at"));

    let past = app
        .submit(json!({"task": "noop", "run_at": "2020-01-01T00:00:00Z"}))
        .await;
    assert_eq!(past["scheduled_at"], "2020-01-01T00:00:00Z");
    assert_eq!(app.wait(&id_of(&past), 10).await["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_a_finished_job_only() {
    let app = spawn_app().await;
    let done = app.submit(json!({"task": "noop"})).await;
    app.wait(&id_of(&done), 10).await;
    let a = app
        .call(Method::DELETE, &format!("/v1/jobs/{}", id_of(&done)), None)
        .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = app.get(&format!("/v1/jobs/{}", id_of(&done))).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let waiting = app.submit(sleep_spec(60_000)).await;
    let a = app
        .call(
            Method::DELETE,
            &format!("/v1/jobs/{}", id_of(&waiting)),
            None,
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(
        app.get(&format!("/v1/jobs/{}", id_of(&waiting)))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_lists_every_task_with_its_schema_and_lanes() {
    let app = spawn_app().await;
    let a = app.get("/v1/tasks").await;
    let tasks = a.body["tasks"].as_array().unwrap();
    let names: Vec<&str> = tasks.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for name in [
        "noop",
        "sleep",
        "blocking_sleep",
        "http_get",
        "file_sha256",
        "sum_squares",
        "count_primes",
        "fail",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let noop = tasks.iter().find(|t| t["name"] == "noop").unwrap();
    assert_eq!(noop["executors"], json!({"io": "async", "cpu": "rayon"}));
    let sleep = tasks
        .iter()
        .find(|t| t["name"] == "blocking_sleep")
        .unwrap();
    assert_eq!(sleep["executors"], json!({"io": "blocking"}));
    assert_eq!(sleep["args_schema"]["required"], json!(["ms"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_per_lane_and_health_endpoints_answer() {
    let app = spawn_with(|s| s.blocking_threads = 7).await;
    let j = app.submit(json!({"task": "noop"})).await;
    app.wait(&id_of(&j), 10).await;
    let f = app
        .submit(json!({"task": "fail", "kind": "cpu", "max_attempts": 1}))
        .await;
    app.wait(&id_of(&f), 10).await;
    let s = app.get("/v1/stats").await.body;
    assert_eq!(s["executors"]["async"]["succeeded"], 1);
    assert_eq!(s["executors"]["rayon"]["failed"], 1);
    assert_eq!(s["executors"]["blocking"]["capacity"], 7);
    assert_eq!(s["executors"]["rayon"]["capacity"], 2);
    assert_eq!(app.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
    let m = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("offload_jobs_finished_total{executor=\"async\",status=\"succeeded\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_each_change_until_the_final_state() {
    let app = spawn_app().await;
    let job = app
        .submit(json!({"task": "sleep", "args": {"ms": 300}, "delay_ms": 100}))
        .await;
    let resp = app
        .client
        .get(app.url(&format!("/v1/jobs/{}/events", id_of(&job))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // The stream ends by itself after the final state; a hang here fails on the timeout.
    let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .unwrap()
        .unwrap();
    let statuses: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| {
            serde_json::from_str::<Value>(d.trim()).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(statuses, ["queued", "running", "succeeded"], "{text}");
}

/// A tiny HTTP server on loopback for http_get: `/small` answers 5 bytes, `/big` 5000.
async fn origin() -> String {
    use axum::routing::get;
    let router = axum::Router::new()
        .route("/small", get(|| async { "hello" }))
        .route("/big", get(|| async { "x".repeat(5000) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_fetches_allowed_hosts_within_limits() {
    let origin = origin().await;
    let app = spawn_with(|s| {
        s.http_allow_private = true;
        s.http_max_bytes = 1000;
    })
    .await;
    let job = app
        .submit(json!({"task": "http_get", "args": {"url": format!("{origin}/small")}}))
        .await;
    assert_eq!(job["executor"], "async");
    let done = app.wait(&id_of(&job), 20).await;
    assert_eq!(
        done["result"],
        json!({"status": 200, "bytes": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}),
        "{done}"
    );
    let big = app
        .submit(json!({"task": "http_get", "args": {"url": format!("{origin}/big")}, "max_attempts": 1}))
        .await;
    let done = app.wait(&id_of(&big), 20).await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger"),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_speaks_tls_for_https_urls() {
    // The origin speaks plain HTTP: an https:// URL to it must fail in the TLS handshake,
    // which shows the request really went out over TLS.
    let origin = origin().await;
    let app = spawn_with(|s| s.http_allow_private = true).await;
    let url = origin.replace("http://", "https://") + "/small";
    let job = app
        .submit(json!({"task": "http_get", "args": {"url": url}, "max_attempts": 1}))
        .await;
    let done = app.wait(&id_of(&job), 20).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GET failed"),
        "{done}"
    );
    let a = app
        .post(
            "/v1/jobs",
            json!({"task": "http_get", "args": {"url": "ftp://example.com/"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_refuses_private_addresses_and_hosts_off_the_allowlist() {
    let origin = origin().await;
    let app = spawn_app().await;
    let a = app
        .post(
            "/v1/jobs",
            json!({"task": "http_get", "args": {"url": format!("{origin}/small")}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["detail"].as_str().unwrap().contains("private"),
        "{}",
        a.body
    );
    // A name that resolves to loopback passes the submit check but is refused when it runs.
    let port = origin.rsplit(':').next().unwrap();
    let job = app
        .submit(
            json!({"task": "http_get", "args": {"url": format!("http://localhost:{port}/small")}}),
        )
        .await;
    let done = app.wait(&id_of(&job), 20).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["attempt"], 1, "a refusal is not retried");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("private"),
        "{done}"
    );

    let strict = spawn_with(|s| s.http_allow_hosts = vec!["example.com".into()]).await;
    let a = strict
        .post(
            "/v1/jobs",
            json!({"task": "http_get", "args": {"url": "http://example.org/"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.body["detail"].as_str().unwrap().contains("allowlist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sha256_stays_inside_the_files_folder() {
    let app = spawn_app().await;
    for bad in ["../offload.db", "/etc/passwd", "a/../../x"] {
        let a = app
            .post(
                "/v1/jobs",
                json!({"task": "file_sha256", "args": {"path": bad}}),
            )
            .await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    }
    let secret = app.dir.path().join("secret.txt");
    std::fs::write(&secret, "not for jobs").unwrap();
    std::os::unix::fs::symlink(&secret, app.dir.path().join("files/escape")).unwrap();
    let job = app
        .submit(json!({"task": "file_sha256", "args": {"path": "escape"}}))
        .await;
    let done = app.wait(&id_of(&job), 10).await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside"),
        "{done}"
    );

    // A FIFO would block the reading thread forever: refused, not read.
    let fifo = app.dir.path().join("files/pipe");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let job = app
        .submit(json!({"task": "file_sha256", "args": {"path": "pipe"}}))
        .await;
    let done = app.wait(&id_of(&job), 10).await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("regular file"),
        "{done}"
    );
}
