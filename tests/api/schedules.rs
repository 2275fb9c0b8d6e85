//! Schedules through HTTP: ticks make jobs, pause stops them, resume restarts them, delete
//! ends them; bad input is refused and changes nothing; missed ticks after a `kill -9`
//! follow `catch_up`; three servers on one PostgreSQL database make one job per tick.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{drop_pg_schema, pg_schema, spawn_app, Binary, TestApp};

/// The tick of a schedule's job, from its key `schedule:<name>:<tick µs>`.
fn tick_of(job: &Value, name: &str) -> Option<i64> {
    job["idempotency_key"]
        .as_str()?
        .strip_prefix(&format!("schedule:{name}:"))?
        .parse()
        .ok()
}

fn micros(ts: &Value) -> i64 {
    offload::clock::Micros::parse_rfc3339(ts.as_str().unwrap())
        .unwrap()
        .0
}

/// Every job on the server (paging through the list), by the base URL of any server.
async fn all_jobs(client: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: Value = client
            .get(format!("{base}/v1/jobs?limit=1000&cursor={cursor}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.extend(page["jobs"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => return out,
        }
    }
}

/// The jobs of schedule `name`, by tick. Panics if a tick has two.
async fn ticks(client: &reqwest::Client, base: &str, name: &str) -> BTreeMap<i64, Value> {
    let mut out = BTreeMap::new();
    for job in all_jobs(client, base).await {
        if let Some(t) = tick_of(&job, name) {
            assert!(
                out.insert(t, job.clone()).is_none(),
                "tick {t} of {name} made two jobs"
            );
        }
    }
    out
}

async fn wait_for_ticks(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    n: usize,
    secs: u64,
) -> BTreeMap<i64, Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let t = ticks(client, base, name).await;
        if t.len() >= n {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} made {} jobs in {secs} s, not {n}",
            t.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn every_second(name: &str, catch_up: &str) -> Value {
    json!({"name": name, "cron": "* * * * * *", "timezone": "UTC",
           "job": {"task": "noop"}, "catch_up": catch_up})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_every_second_runs_pauses_resumes_and_is_deleted() {
    let app = spawn_app().await;
    let created = app
        .post("/v1/schedules", every_second("tick", "none"))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.headers["location"], "/v1/schedules/tick");
    let next_runs: Vec<i64> = created.body["next_runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(micros)
        .collect();
    assert_eq!(next_runs.len(), 5);
    assert!(
        next_runs.windows(2).all(|w| w[1] - w[0] == 1_000_000),
        "one a second: {next_runs:?}"
    );

    let made = wait_for_ticks(&app.client, &app.base, "tick", 3, 20).await;
    for (tick, job) in &made {
        assert_eq!(tick % 1_000_000, 0, "ticks are whole seconds");
        assert_eq!(micros(&job["scheduled_at"]), *tick, "due at its tick");
        assert_eq!(job["task"], "noop");
    }
    let first = *made.keys().next().unwrap();
    let last = *made.keys().last().unwrap();
    assert_eq!(
        (last - first) / 1_000_000 + 1,
        made.len() as i64,
        "one job per second, none missing: {:?}",
        made.keys()
    );
    let detail = app.get("/v1/schedules/tick").await;
    assert_eq!(detail.status, StatusCode::OK);
    let recent = detail.body["recent_jobs"].as_array().unwrap();
    assert!(!recent.is_empty());
    assert!(
        recent
            .windows(2)
            .all(|w| tick_of(&w[0], "tick") > tick_of(&w[1], "tick")),
        "newest tick first"
    );
    let job = app.wait(recent[0]["id"].as_str().unwrap(), 10).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // Paused: no tick fires.
    let paused = app.post("/v1/schedules/tick/pause", json!({})).await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.body);
    assert_eq!(paused.body["paused"], true);
    assert!(paused.body["next_run"].is_null());
    assert_eq!(paused.body["next_runs"], json!([]));
    let at_pause = ticks(&app.client, &app.base, "tick").await.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        ticks(&app.client, &app.base, "tick").await.len(),
        at_pause,
        "no tick while paused"
    );
    let listed = app.get("/v1/schedules").await;
    assert_eq!(listed.body["schedules"][0]["paused"], true);

    // Resumed: ticks fire again, from after the resume (the pause is not caught up).
    let resumed_at = offload::clock::Micros::now().0;
    let resumed = app.post("/v1/schedules/tick/resume", json!({})).await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.body);
    assert_eq!(resumed.body["paused"], false);
    assert!(micros(&resumed.body["next_run"]) > resumed_at - 1_000_000);
    let after = wait_for_ticks(&app.client, &app.base, "tick", at_pause + 2, 20).await;
    let new: Vec<i64> = after
        .keys()
        .copied()
        .filter(|t| !made.contains_key(t))
        .collect();
    assert!(
        new.iter()
            .rev()
            .take(2)
            .all(|t| *t >= resumed_at - 1_000_000),
        "the new ticks are after the resume: {new:?}"
    );

    // Deleted: gone, and no tick fires; its jobs stay.
    let gone = app.call(Method::DELETE, "/v1/schedules/tick", None).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    let at_delete = ticks(&app.client, &app.base, "tick").await.len();
    assert_eq!(
        app.get("/v1/schedules/tick").await.status,
        StatusCode::NOT_FOUND
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(ticks(&app.client, &app.base, "tick").await.len(), at_delete);
    let listed = app.get("/v1/schedules").await;
    assert_eq!(listed.body["schedules"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let good = json!({"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin",
                      "job": {"task": "sleep", "args": {"ms": 5}}, "catch_up": "one"});
    let created = app.post("/v1/schedules", good.clone()).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["timezone"], "Europe/Berlin");
    assert_eq!(created.body["catch_up"], "one");
    assert_eq!(created.body["recent_jobs"], json!([]));
    let before = app.get("/v1/schedules/nightly").await.body;

    let with = |field: &str, value: Value| {
        let mut b = good.clone();
        b["name"] = json!("other");
        b[field] = value;
        b
    };
    let without = |field: &str| {
        let mut b = good.clone();
        b["name"] = json!("other");
        b.as_object_mut().unwrap().remove(field);
        b
    };
    let cases = [
        (with("cron", json!("* * * *")), "cron"),
        (with("cron", json!("* * * * * * *")), "cron"),
        (with("cron", json!("61 * * * *")), "cron"),
        (with("cron", json!("0 0 30 2 *")), "never"),
        (with("cron", json!(5)), "cron"),
        (with("cron", json!(format!("{}*", " ".repeat(300)))), "cron"),
        (without("cron"), "cron"),
        (with("timezone", json!("Mars/Olympus_Mons")), "timezone"),
        (with("timezone", json!("")), "timezone"),
        (with("name", json!("two words")), "name"),
        (with("name", json!("x".repeat(101))), "name"),
        (with("name", json!("a:b")), "name"),
        (without("name"), "name"),
        (with("catch_up", json!("some")), "catch_up"),
        (with("extra", json!(1)), "unknown field"),
        (without("job"), "job"),
        (with("job", json!("noop")), "job"),
        (with("job", json!({"task": "nope"})), "job.task"),
        (
            with("job", json!({"task": "sleep", "args": {"ms": "x"}})),
            "job.args",
        ),
        (
            with("job", json!({"task": "noop", "colour": "red"})),
            "colour",
        ),
        (
            with("job", json!({"task": "noop", "idempotency_key": "k"})),
            "idempotency_key",
        ),
        (
            with(
                "job",
                json!({"task": "noop", "run_at": "2030-01-01T00:00:00Z"}),
            ),
            "run_at",
        ),
    ];
    for (body, names) in cases {
        let a = app.post("/v1/schedules", body.clone()).await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}: {}",
            a.body
        );
        let detail = a.body["detail"].as_str().unwrap();
        assert!(detail.contains(names), "{body}: `{detail}` names {names}");
    }
    // Taken name: 409, and the stored one is untouched.
    let mut dup = good.clone();
    dup["cron"] = json!("* * * * *");
    let a = app.post("/v1/schedules", dup).await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
    let a = app
        .call_raw(
            Method::POST,
            "/v1/schedules",
            "application/json",
            b"{nope".to_vec(),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = app
        .call_raw(Method::POST, "/v1/schedules", "text/plain", b"{}".to_vec())
        .await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for path in [
        "/v1/schedules?limit=0",
        "/v1/schedules?limit=x",
        "/v1/schedules?page=2",
    ] {
        assert_eq!(
            app.get(path).await.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}"
        );
    }
    for (method, path) in [
        (Method::GET, "/v1/schedules/unknown"),
        (Method::POST, "/v1/schedules/unknown/pause"),
        (Method::POST, "/v1/schedules/unknown/resume"),
        (Method::DELETE, "/v1/schedules/unknown"),
        (Method::GET, "/v1/schedules/%FF"),
    ] {
        let a = app.call(method.clone(), path, None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {path}");
    }

    let listed = app.get("/v1/schedules").await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body["schedules"].as_array().unwrap().len(), 1);
    assert_eq!(app.get("/v1/schedules/nightly").await.body, before);
    let jobs = app.get("/v1/jobs").await;
    assert_eq!(jobs.body["jobs"], json!([]), "no job was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticks_job_is_the_spec_as_given_due_delay_ms_after_its_tick() {
    let app = spawn_app().await;
    let body = json!({"name": "later", "cron": "* * * * * *",
                      "job": {"task": "sleep", "kind": "io", "args": {"ms": 1}, "priority": 7,
                              "max_attempts": 4, "delay_ms": 1500}});
    assert_eq!(
        app.post("/v1/schedules", body).await.status,
        StatusCode::CREATED
    );
    let made = wait_for_ticks(&app.client, &app.base, "later", 1, 20).await;
    let (tick, job) = made.iter().next().unwrap();
    assert_eq!(micros(&job["scheduled_at"]) - tick, 1_500_000);
    assert_eq!(job["priority"], 7);
    assert_eq!(job["max_attempts"], 4);
    assert_eq!(job["args"], json!({"ms": 1}));
    let done = app.wait(job["id"].as_str().unwrap(), 10).await;
    assert_eq!(done["status"], "succeeded");
    assert!(
        micros(&done["started_at"]) >= tick + 1_500_000,
        "not started before its delay: {done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_page_by_name() {
    let app: TestApp = spawn_app().await;
    for name in ["c", "a", "b"] {
        let mut body = every_second(name, "none");
        body["cron"] = json!("0 0 1 1 *");
        assert_eq!(
            app.post("/v1/schedules", body).await.status,
            StatusCode::CREATED
        );
    }
    let page = app.get("/v1/schedules?limit=2").await.body;
    let names: Vec<&str> = page["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(page["next_cursor"], "b");
    let page = app.get("/v1/schedules?limit=2&cursor=b").await.body;
    assert_eq!(page["schedules"][0]["name"], "c");
    assert!(page["next_cursor"].is_null());
}

/// The ticks whose jobs the first wake-up after `since` (µs) made late: more than the grace
/// (1 s here) after their tick, so the catch-up of missed ticks. (Only the first wake-up:
/// a later one may also run late on a busy machine.)
fn caught_up_after(made: &BTreeMap<i64, Value>, since: i64) -> Vec<i64> {
    let created = |j: &Value| micros(&j["created_at"]);
    let Some(first_wake) = made.values().map(created).filter(|c| *c >= since).min() else {
        return Vec::new();
    };
    made.iter()
        .filter(|(_, j)| created(j) == first_wake)
        .filter(|(t, j)| created(j) - **t > 1_000_000)
        .map(|(t, _)| *t)
        .collect()
}

/// The longest gap between consecutive ticks, in seconds.
fn longest_gap(made: &BTreeMap<i64, Value>) -> i64 {
    let ticks: Vec<i64> = made.keys().copied().collect();
    ticks
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_after_a_kill_follow_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--schedule-grace-ms",
        "1000",
    ];
    let mut server = Binary::start(&args);
    let client = reqwest::Client::new();
    for mode in ["none", "one", "all"] {
        let r = client
            .post(format!("{}/v1/schedules", server.base))
            .json(&every_second(mode, mode))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    for mode in ["none", "one", "all"] {
        wait_for_ticks(&client, &server.base, mode, 2, 20).await;
    }
    server.kill9();
    // Down for four seconds: with a grace of one, at least two ticks are missed.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let restarted = offload::clock::Micros::now().0;
    let server = Binary::start(&args);
    let mut made = BTreeMap::new();
    for mode in ["none", "one", "all"] {
        let before = ticks(&client, &server.base, mode).await.len();
        made.insert(
            mode,
            wait_for_ticks(&client, &server.base, mode, before + 2, 20).await,
        );
    }

    let none = &made["none"];
    assert!(
        caught_up_after(none, restarted).is_empty(),
        "none: no missed tick ran"
    );
    assert!(
        longest_gap(none) >= 3,
        "none: the downtime's ticks were skipped: {:?}",
        none.keys()
    );

    let one = &made["one"];
    assert_eq!(
        caught_up_after(one, restarted).len(),
        1,
        "one: one job for the missed ticks: {:?}",
        one.keys()
    );
    assert!(longest_gap(one) >= 2, "one: the others were skipped");

    let all = &made["all"];
    assert!(
        caught_up_after(all, restarted).len() >= 2,
        "all: a job per missed tick: {:?}",
        all.keys()
    );
    assert_eq!(
        longest_gap(all),
        1,
        "all: every tick has its job, through the downtime: {:?}",
        all.keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_make_one_job_per_tick_even_across_a_restart() {
    let Some((schema, url)) = pg_schema("s").await else {
        return;
    };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let args = |i: usize| {
        vec![
            "--database-url".to_string(),
            url.clone(),
            "--data-dir".to_string(),
            dirs[i].path().to_str().unwrap().to_string(),
        ]
    };
    let mut servers: Vec<Binary> = (0..3).map(|i| Binary::start(&args(i))).collect();
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/schedules", servers[0].base))
        .json(&every_second("shared", "none"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // A restart in the middle: a server killed and started again on the same database.
    wait_for_ticks(&client, &servers[1].base, "shared", 4, 30).await;
    servers[0].kill9();
    servers[0] = Binary::start(&args(0));
    let made = wait_for_ticks(&client, &servers[2].base, "shared", 11, 60).await;
    let r = client
        .delete(format!("{}/v1/schedules/shared", servers[1].base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // Whichever server is asked: each tick once (`ticks` panics on a second job for a tick),
    // and every second between the first and the last has its job.
    let made_now = ticks(&client, &servers[0].base, "shared").await;
    assert!(made_now.len() >= made.len());
    let first = *made_now.keys().next().unwrap();
    let last = *made_now.keys().last().unwrap();
    assert_eq!(
        (last - first) / 1_000_000 + 1,
        made_now.len() as i64,
        "one job per tick, none missing: {:?}",
        made_now.keys()
    );
    let ids: std::collections::HashSet<&str> = made_now
        .values()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), made_now.len());
    drop(servers);
    drop_pg_schema(&schema).await;
}
