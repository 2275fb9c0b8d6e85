//! Flow control through the real server: concurrency keys, rate limits, tenants taking turns,
//! what a held-back job says, and the same limits across three servers on one PostgreSQL.

use std::time::Duration;

use offload::clock::Micros;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{drop_pg_schema, id_of, pg_schema, spawn_with, Binary, TestApp};

/// A job's start and finish, in microseconds.
fn span(job: &Value) -> (i64, i64) {
    let at = |f: &str| {
        Micros::parse_rfc3339(job[f].as_str().unwrap_or_else(|| panic!("{f} of {job}")))
            .unwrap()
            .0
    };
    (at("started_at"), at("finished_at"))
}

/// The most jobs that ran at once, from their start and finish times.
fn most_at_once(jobs: &[Value]) -> usize {
    let mut edges: Vec<(i64, i32)> = Vec::new();
    for j in jobs {
        let (s, f) = span(j);
        edges.push((s, 1));
        edges.push((f, -1));
    }
    // A finish and a start at the same microsecond do not overlap: finishes first.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// The most starts within any one second.
fn most_starts_in_a_second(jobs: &[Value]) -> usize {
    let mut starts: Vec<i64> = jobs.iter().map(|j| span(j).0).collect();
    starts.sort();
    let mut most = 0;
    let mut first = 0;
    for i in 0..starts.len() {
        while starts[i] - starts[first] >= 1_000_000 {
            first += 1;
        }
        most = most.max(i - first + 1);
    }
    most
}

async fn post_batch(client: &reqwest::Client, base: &str, specs: Vec<Value>) -> Vec<Value> {
    let mut out = Vec::new();
    for chunk in specs.chunks(1000) {
        let r = client
            .post(format!("{base}/v1/jobs/batch"))
            .json(&json!({ "jobs": chunk }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let body: Value = r.json().await.unwrap();
        out.extend(body["jobs"].as_array().unwrap().iter().cloned());
    }
    out
}

/// The jobs named, as they are now (GET each; the lists in these tests are small) .
async fn fetch(client: &reqwest::Client, base: &str, ids: &[String]) -> Vec<Value> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let j: Value = client
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(j);
    }
    out
}

/// Every job of the store, paging through one server's list.
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

/// Waits until every job named is final; answers them.
async fn finish_all(client: &reqwest::Client, base: &str, ids: &[String], secs: u64) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut done: Vec<Value> = Vec::new();
    let mut left: Vec<String> = ids.to_vec();
    while !left.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} jobs not final after {secs} s",
            left.len(),
            ids.len()
        );
        let j: Value = client
            .get(format!("{base}/v1/jobs/{}?wait=10", left[0]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if crate::helpers::is_final(&j) {
            done.push(j);
            left.remove(0);
        }
    }
    done
}

fn keyed_sleep(ms: u64, key: &str, limit: u32) -> Value {
    json!({"task": "sleep", "args": {"ms": ms}, "concurrency": {"key": key, "limit": limit}})
}

#[tokio::test]
async fn flow_fields_that_make_no_sense_are_refused_and_store_nothing() {
    let app = spawn_with(|_| {}).await;
    let bad = [
        json!({"task": "noop", "concurrency": {"key": "k", "limit": 0}}),
        json!({"task": "noop", "concurrency": {"key": "k"}}),
        json!({"task": "noop", "concurrency": {"key": "", "limit": 1}}),
        json!({"task": "noop", "concurrency": {"key": "k", "limit": 1, "extra": true}}),
        json!({"task": "noop", "concurrency": "k"}),
        json!({"task": "noop", "rate": {"key": "r", "per_second": 0}}),
        json!({"task": "noop", "rate": {"key": "r", "per_second": -5}}),
        json!({"task": "noop", "rate": {"key": "r", "per_second": 1, "burst": 0}}),
        json!({"task": "noop", "rate": {"key": "r", "per_second": 1e9}}),
        json!({"task": "noop", "rate": {"per_second": 1}}),
        json!({"task": "noop", "tenant": ""}),
        json!({"task": "noop", "tenant": 7}),
        json!({"task": "noop", "tenant": "a\nb"}),
        json!({"task": "noop", "concurrency": {"key": "k\u{0}", "limit": 1}}),
        json!({"task": "noop", "tenant": "x".repeat(256)}),
    ];
    for spec in bad {
        let a = app.post("/v1/jobs", spec.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{spec}: {}",
            a.body
        );
        assert_eq!(
            a.headers["content-type"], "application/problem+json",
            "{spec}"
        );
    }
    let a = app
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"task": "noop"}, {"task": "noop", "rate": {"key": "r", "per_second": 0}}]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["detail"].as_str().unwrap().contains("jobs[1]"),
        "{}",
        a.body
    );
    let list = app.get("/v1/jobs").await;
    assert_eq!(list.body["jobs"], json!([]), "nothing was stored");
}

#[tokio::test]
async fn a_held_back_job_says_why_and_stats_and_metrics_name_its_key() {
    let app = spawn_with(|_| {}).await;
    let long = app.submit(keyed_sleep(60_000, "one-at-a-time", 1)).await;
    assert_eq!(
        long["concurrency"],
        json!({"key": "one-at-a-time", "limit": 1})
    );
    assert_eq!(long["tenant"], Value::Null);
    assert_eq!(long["rate"], Value::Null);
    app.wait_until(&id_of(&long), 10, |j| j["status"] == "running")
        .await;
    let next = app
        .submit(json!({"task": "sleep", "args": {"ms": 1}, "tenant": "acme",
                       "concurrency": {"key": "one-at-a-time", "limit": 1}}))
        .await;
    assert_eq!(next["tenant"], "acme");
    let shown = app
        .wait_until(&id_of(&next), 10, |j| j["waiting_for"] == "concurrency")
        .await;
    assert_eq!(shown["status"], "queued");
    assert!(shown.get("waiting_until").is_none(), "{shown}");
    // Still held back a while later: the lane does not take it while the key is full.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = app.get(&format!("/v1/jobs/{}", id_of(&next))).await.body;
    assert_eq!(again["status"], "queued");

    // A rate of one token every 100 s: the first job takes the only token.
    let rate = json!({"key": "slow-api", "per_second": 0.01, "burst": 1});
    let first = app.submit(json!({"task": "noop", "rate": rate})).await;
    app.wait(&id_of(&first), 10).await;
    let second = app.submit(json!({"task": "noop", "rate": rate})).await;
    let shown = app
        .wait_until(&id_of(&second), 10, |j| j["waiting_for"] == "rate")
        .await;
    let until = Micros::parse_rfc3339(shown["waiting_until"].as_str().unwrap()).unwrap();
    let ahead = until.0 - Micros::now().0;
    assert!(
        (50_000_000..=101_000_000).contains(&ahead),
        "the next token is about 100 s away: {ahead} µs"
    );
    let listed = app.get("/v1/jobs?status=queued").await.body;
    assert!(
        listed["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["waiting_for"].is_string()),
        "{listed}"
    );

    let stats = app.get("/v1/stats").await.body;
    let keys = &stats["flow"]["concurrency"]["top"];
    assert_eq!(
        keys[0],
        json!({"name": "one-at-a-time", "running": 1, "queued": 1}),
        "{stats}"
    );
    assert_eq!(
        stats["flow"]["tenants"]["top"][0],
        json!({"name": "acme", "running": 0, "queued": 1})
    );
    assert_eq!(
        stats["flow"]["rate"]["top"][0]["name"], "slow-api",
        "{stats}"
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "offload_concurrency_key_running{key=\"one-at-a-time\",other=\"false\"} 1",
        "offload_concurrency_key_queued{key=\"one-at-a-time\",other=\"false\"} 1",
        "offload_tenant_queued{tenant=\"acme\",other=\"false\"} 1",
        "offload_rate_key_queued{key=\"slow-api\",other=\"false\"} 1",
        "offload_tenant_running{tenant=\"\",other=\"true\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    app.post(&format!("/v1/jobs/{}/cancel", id_of(&long)), json!({}))
        .await;
    let done = app.wait(&id_of(&next), 10).await;
    assert_eq!(done["status"], "succeeded", "the freed key let it run");
}

#[tokio::test]
async fn a_task_default_from_the_config_applies_where_the_spec_gives_none() {
    let app = spawn_with(|s| {
        s.task_flow.insert(
            "sleep".into(),
            toml::from_str("concurrency = { limit = 2 }\nrate = { per_second = 5.0, burst = 3 }")
                .unwrap(),
        );
    })
    .await;
    let job = app.submit(crate::helpers::sleep_spec(1)).await;
    assert_eq!(job["concurrency"], json!({"key": "sleep", "limit": 2}));
    assert_eq!(
        job["rate"],
        json!({"key": "sleep", "per_second": 5.0, "burst": 3})
    );
    let own = app.submit(keyed_sleep(1, "mine", 7)).await;
    assert_eq!(own["concurrency"], json!({"key": "mine", "limit": 7}));
    let other = app.submit(json!({"task": "noop"})).await;
    assert_eq!(other["concurrency"], Value::Null);
}

#[tokio::test]
async fn one_key_with_limit_one_runs_its_jobs_one_after_another_in_priority_order() {
    let app = spawn_with(|_| {}).await;
    let specs: Vec<Value> = (0..100)
        .map(|i| {
            let mut s = keyed_sleep(5, "serial", 1);
            if i >= 90 {
                s["priority"] = json!(1);
            }
            s
        })
        .collect();
    let submitted = post_batch(&app.client, &app.base, specs).await;
    let ids: Vec<String> = submitted.iter().map(id_of).collect();
    let mut jobs = finish_all(&app.client, &app.base, &ids, 60).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"));
    assert_eq!(most_at_once(&jobs), 1, "never two at once");
    jobs.sort_by_key(|j| span(j).0);
    let urgent: Vec<&Value> = jobs[..10].iter().collect();
    assert!(
        urgent.iter().all(|j| j["priority"] == 1),
        "the higher priority ran first"
    );
    let order: Vec<String> = jobs[10..].iter().map(id_of).collect();
    let mut by_id = order.clone();
    by_id.sort();
    assert_eq!(order, by_id, "then in schedule order");
}

#[tokio::test]
async fn a_key_with_limit_three_never_runs_more_than_three() {
    let app = spawn_with(|_| {}).await;
    let specs: Vec<Value> = (0..30).map(|_| keyed_sleep(40, "three", 3)).collect();
    let ids: Vec<String> = post_batch(&app.client, &app.base, specs)
        .await
        .iter()
        .map(id_of)
        .collect();
    let jobs = finish_all(&app.client, &app.base, &ids, 60).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"));
    assert_eq!(most_at_once(&jobs), 3, "up to the limit, never past it");
}

#[tokio::test]
async fn unkeyed_jobs_beside_a_blocked_key_are_not_held_back() {
    let app = spawn_with(|_| {}).await;
    // The key's first job runs for a minute; its other jobs wait, ahead of the free ones.
    let held: Vec<String> = post_batch(
        &app.client,
        &app.base,
        (0..50).map(|_| keyed_sleep(60_000, "busy", 1)).collect(),
    )
    .await
    .iter()
    .map(id_of)
    .collect();
    let free: Vec<String> = post_batch(
        &app.client,
        &app.base,
        (0..200).map(|_| json!({"task": "noop"})).collect(),
    )
    .await
    .iter()
    .map(id_of)
    .collect();
    let started = tokio::time::Instant::now();
    let done = finish_all(&app.client, &app.base, &free, 20).await;
    assert!(done.iter().all(|j| j["status"] == "succeeded"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the free jobs ran at once: {:?}",
        started.elapsed()
    );
    let keyed = fetch(&app.client, &app.base, &held).await;
    assert_eq!(keyed.iter().filter(|j| j["status"] == "running").count(), 1);
    assert_eq!(keyed.iter().filter(|j| j["status"] == "queued").count(), 49);
    for id in &held {
        app.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    }
}

#[tokio::test]
async fn a_rate_spreads_starts_over_time_and_never_passes_burst_plus_rate_in_a_second() {
    let app = spawn_with(|_| {}).await;
    let rate = json!({"key": "api.example.com", "per_second": 20, "burst": 5});
    let specs: Vec<Value> = (0..200)
        .map(|_| json!({"task": "noop", "rate": rate}))
        .collect();
    let ids: Vec<String> = post_batch(&app.client, &app.base, specs)
        .await
        .iter()
        .map(id_of)
        .collect();
    let jobs = finish_all(&app.client, &app.base, &ids, 60).await;
    check_rate(&jobs);
}

/// 200 jobs at 20 a second with a burst of 5: the bucket allows 5 + 20·t starts in any t
/// seconds, so the last start is at least 9.75 s after the first.
fn check_rate(jobs: &[Value]) {
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"));
    let most = most_starts_in_a_second(jobs);
    assert!(most <= 25, "{most} starts in one second");
    let starts: Vec<i64> = jobs.iter().map(|j| span(j).0).collect();
    let took = (starts.iter().max().unwrap() - starts.iter().min().unwrap()) as f64 / 1e6;
    assert!((9.7..15.0).contains(&took), "took {took} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_tenant_is_served_at_once_whatever_the_backlog_ahead() {
    // Four slots: tenant a's 10,000 jobs are a real backlog when b's 100 arrive.
    let app = spawn_with(|s| {
        s.async_capacity = 4;
        s.durability = offload::config::Durability::Normal;
    })
    .await;
    let spec = |tenant: &str| json!({"task": "sleep", "args": {"ms": 1}, "tenant": tenant});
    post_batch(&app.client, &app.base, vec![spec("a"); 10_000]).await;
    let b: Vec<String> = post_batch(&app.client, &app.base, vec![spec("b"); 100])
        .await
        .iter()
        .map(id_of)
        .collect();
    finish_all(&app.client, &app.base, &b, 120).await;
    let all = all_jobs(&app.client, &app.base).await;
    stop_app(app).await;
    check_turns(&all, 100);
}

/// b's jobs all started before half of a's finished, and while both waited they took turns.
fn check_turns(all: &[Value], b_jobs: usize) {
    let (a, b): (Vec<&Value>, Vec<&Value>) = all.iter().partition(|j| j["tenant"] == "a");
    assert_eq!(b.len(), b_jobs);
    let b_starts: Vec<i64> = b.iter().map(|j| span_start(j)).collect();
    let (b_first, b_last) = (
        *b_starts.iter().min().unwrap(),
        *b_starts.iter().max().unwrap(),
    );
    let a_done_before = a
        .iter()
        .filter(|j| j["finished_at"].is_string())
        .filter(|j| span(j).1 < b_last)
        .count();
    assert!(
        a_done_before < a.len() / 2,
        "{a_done_before} of a's {} finished before b's last start",
        a.len()
    );
    let a_between = a
        .iter()
        .filter(|j| j["started_at"].is_string())
        .map(|j| span_start(j))
        .filter(|s| (b_first..=b_last).contains(s))
        .count();
    assert!(
        a_between <= b_jobs + b_jobs / 5,
        "one for one: a started {a_between} while b started {b_jobs}"
    );
}

fn span_start(j: &Value) -> i64 {
    Micros::parse_rfc3339(j["started_at"].as_str().unwrap())
        .unwrap()
        .0
}

async fn stop_app(mut app: TestApp) {
    app.stop().await;
}

/// A server on the shared database, with a data dir of its own.
struct Node {
    bin: Binary,
    _dir: tempfile::TempDir,
}

fn node(url: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let bin = Binary::start(&["--database-url", url, "--data-dir", &data]);
    Node { bin, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_run_one_keys_jobs_one_at_a_time() {
    let Some((schema, url)) = pg_schema("flow").await else {
        return;
    };
    let nodes: Vec<Node> = (0..3).map(|_| node(&url)).collect();
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    // Submitted through all three; each server's lane claims from the shared queue.
    for (i, n) in nodes.iter().enumerate() {
        let count = if i == 0 { 34 } else { 33 };
        let specs = vec![keyed_sleep(5, "shared", 1); count];
        ids.extend(
            post_batch(&client, &n.bin.base, specs)
                .await
                .iter()
                .map(id_of),
        );
    }
    let jobs = finish_all(&client, &nodes[1].bin.base, &ids, 90).await;
    assert_eq!(jobs.len(), 100);
    assert!(jobs
        .iter()
        .all(|j| j["status"] == "succeeded" && j["attempt"] == 1));
    assert_eq!(most_at_once(&jobs), 1, "never two at once, on any server");
    drop(nodes);
    drop_pg_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_share_one_rate() {
    let Some((schema, url)) = pg_schema("flow").await else {
        return;
    };
    let nodes: Vec<Node> = (0..3).map(|_| node(&url)).collect();
    let client = reqwest::Client::new();
    let rate = json!({"key": "api.example.com", "per_second": 20, "burst": 5});
    let mut ids = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let count = if i == 0 { 68 } else { 66 };
        let specs = vec![json!({"task": "noop", "rate": rate}); count];
        ids.extend(
            post_batch(&client, &n.bin.base, specs)
                .await
                .iter()
                .map(id_of),
        );
    }
    let jobs = finish_all(&client, &nodes[2].bin.base, &ids, 90).await;
    check_rate(&jobs);
    drop(nodes);
    drop_pg_schema(&schema).await;
}

#[tokio::test]
async fn flow_defaults_for_a_task_the_server_lacks_stop_it_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = crate::helpers::test_settings(dir.path());
    settings.task_flow.insert(
        "no_such_task".into(),
        toml::from_str("concurrency = { limit = 1 }").unwrap(),
    );
    let registry = offload::Registry::builtin(&settings);
    let err = offload::App::build(settings, registry)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("task_flow.no_such_task"), "{err}");
}

/// A server whose clock is an hour ahead takes a rate key's token and stores the bucket; the
/// server left on the database must still start the key's next jobs at the rate. When each
/// server refilled buckets by its own clock, the bucket read as stored an hour in the future:
/// no token for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_holds_by_the_database_clock_when_a_servers_clock_is_an_hour_off() {
    let Some((schema, url)) = pg_schema("flow").await else {
        return;
    };
    let client = reqwest::Client::new();
    let rate = json!({"key": "skewed", "per_second": 4, "burst": 1});
    let ahead_dir = tempfile::tempdir().unwrap();
    let ahead = Binary::start_env(
        &[
            "--database-url",
            &url,
            "--data-dir",
            ahead_dir.path().to_str().unwrap(),
        ],
        &[("OFFLOAD_TEST_CLOCK_OFFSET_MS", "3600000")],
    );
    let first = post_batch(
        &client,
        &ahead.base,
        vec![json!({"task": "noop", "rate": rate})],
    )
    .await;
    let first_ids: Vec<String> = first.iter().map(id_of).collect();
    let done = finish_all(&client, &ahead.base, &first_ids, 20).await;
    assert_eq!(done[0]["status"], "succeeded", "{}", done[0]);
    drop(ahead);

    let left = node(&url);
    let specs = vec![json!({"task": "noop", "rate": rate}); 6];
    let ids: Vec<String> = post_batch(&client, &left.bin.base, specs)
        .await
        .iter()
        .map(id_of)
        .collect();
    let t = std::time::Instant::now();
    let jobs = finish_all(&client, &left.bin.base, &ids, 20).await;
    assert!(jobs.iter().all(|j| j["status"] == "succeeded"));
    // Six tokens at four a second, the first at once or within a quarter second.
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1_000) && took < Duration::from_secs(10),
        "six jobs at 4/s took {took:?}"
    );
    let starts: Vec<i64> = jobs.iter().map(|j| span(j).0).collect();
    let spread = starts.iter().max().unwrap() - starts.iter().min().unwrap();
    assert!(
        spread >= 1_200_000,
        "six starts at 4/s spread over {spread} µs"
    );
    drop(left);
    drop_pg_schema(&schema).await;
}
