//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver),
//! submitting a job through the form and watching it finish on the page, retrying failures,
//! filtering and paging the job list, following a job's parents and children, and pausing a
//! schedule; each change the page makes is checked through the API.
//!
//! Needs Debian's `chromium` and `chromium-driver`, which `.ci/run` installs, so it is
//! ignored by a plain `cargo test`; run it with
//! `cargo test --test api browser -- --ignored`. It saves a screenshot to
//! `target/dashboard.png`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::*;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (apt-get install chromium chromium-driver)");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if http.get(format!("{base}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().unwrap().keep();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--window-size=1360,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"))
            .to_string();
        Driver {
            child,
            base,
            session,
            http,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method.clone(), url);
        if method == reqwest::Method::POST {
            req = req.json(&body);
        }
        let r: Value = req.send().await.unwrap().json().await.unwrap();
        r["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    /// Finds an element by CSS selector, waiting up to 20 s for it to appear.
    async fn find(&self, css: &str) -> String {
        for _ in 0..200 {
            let v = self
                .cmd(
                    reqwest::Method::POST,
                    "/element",
                    json!({"using": "css selector", "value": css}),
                )
                .await;
            if let Some(id) = v[ELEMENT].as_str() {
                return id.to_string();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let url = self.cmd(reqwest::Method::GET, "/url", Value::Null).await;
        let probe = self
            .cmd(
                reqwest::Method::POST,
                "/execute/sync",
                json!({"script": "return document.getElementById('submit-result').textContent + ' | ' + document.getElementById('uptime').textContent + ' | ' + document.getElementById('task').options.length", "args": []}),
            )
            .await;
        let last = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        eprintln!("page state: {probe}; last find answered {last}");
        let source = self.cmd(reqwest::Method::GET, "/source", Value::Null).await;
        let source = source.as_str().unwrap_or("");
        panic!(
            "no element matches {css} on {url}; the page begins: {}",
            &source[..source.len().min(600)]
        );
    }

    /// Clicks the element, finding it again if the page replaced it between the find and the
    /// click (a refresh re-renders what changed).
    async fn click(&self, css: &str) {
        for _ in 0..20 {
            let id = self.find(css).await;
            let r = self
                .cmd(
                    reqwest::Method::POST,
                    &format!("/element/{id}/click"),
                    json!({}),
                )
                .await;
            if r.get("error").is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("could not click {css}");
    }

    /// Runs a script in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Waits up to 20 s for `script`'s value to equal `want`; returns the last value seen.
    async fn eval_until(&self, script: &str, want: &Value) -> Value {
        let mut got = Value::Null;
        for _ in 0..200 {
            got = self.eval(script).await;
            if &got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        got
    }

    /// The ids of the rows of a table body, top to bottom.
    async fn row_ids(&self, tbody: &str) -> Value {
        self.eval(&Self::row_ids_script(tbody)).await
    }

    fn row_ids_script(tbody: &str) -> String {
        format!(
            "return [...document.querySelectorAll('{tbody} tr[data-id]')].map((tr) => tr.dataset.id)"
        )
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            json!({}),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::GET,
            &format!("/element/{id}/text"),
            Value::Null,
        )
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    async fn attr(&self, css: &str, name: &str) -> String {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::GET,
            &format!("/element/{id}/attribute/{name}"),
            Value::Null,
        )
        .await
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await;
    }

    async fn screenshot(&self) -> Vec<u8> {
        let b64 = self
            .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        base64_decode(b64.as_str().unwrap())
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => 0,
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().take_while(|&&c| c != b'=').count();
        let v: Vec<u32> = chunk.iter().map(|&c| val(c) as u32).collect();
        let word = (v[0] << 18)
            | (v.get(1).copied().unwrap_or(0) << 12)
            | (v.get(2).copied().unwrap_or(0) << 6)
            | v.get(3).copied().unwrap_or(0);
        out.push((word >> 16) as u8);
        if n > 2 {
            out.push((word >> 8) as u8);
        }
        if n > 3 {
            out.push(word as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver; .ci/run installs them and runs it"]
async fn the_dashboard_submits_a_job_and_shows_it_finish() {
    let app = spawn_with(|s| s.api_token = Some("dash-token".into())).await;
    // Some history for the page to show.
    for i in 0..6 {
        let spec = json!({"task": "sum_squares", "args": {"n": 10_000 * (i + 1)}});
        let mut req = app.client.post(app.url("/v1/jobs")).json(&spec);
        req = req.bearer_auth("dash-token");
        req.send().await.unwrap();
    }
    let driver = Driver::start().await;
    // The token is given once in the URL; the page then works from its cookie.
    driver
        .goto(&format!("{}/?token=dash-token", app.base))
        .await;
    driver.find("#task option[value=count_primes]").await;
    driver.click("#task option[value=count_primes]").await;
    driver.type_into("#args", r#"{"limit": 2000000}"#).await;
    driver.click("#submit").await;
    let id = driver.attr("#submitted", "data-id").await;
    assert_eq!(id.len(), 36, "the page shows the new job's id");
    let row = format!("#jobs tr[data-id=\"{id}\"] .status");
    let mut status = String::new();
    for _ in 0..100 {
        status = driver.text(&row).await;
        if status == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "succeeded");
    let detail = driver.text("#detail").await;
    assert!(
        detail.contains("148933"),
        "the detail shows the result: {detail}"
    );
    let lanes = driver.text("#lanes").await;
    assert!(
        lanes.contains("rayon") && lanes.contains("process"),
        "{lanes}"
    );

    failures_show_their_error_and_are_retried(&app, &driver).await;
    filters_narrow_the_list_and_pages_move(&app, &driver).await;
    parents_and_children_are_linked(&app, &driver).await;
    schedules_show_their_next_run_and_pause(&app, &driver).await;

    // Tall enough for every section, from the top, for the screenshot.
    driver.resize(1360, 1800).await;
    driver.eval("window.scrollTo(0, 0)").await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // let the chart draw a few points
    let png = driver.screenshot().await;
    assert_eq!(&png[1..4], b"PNG");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    std::fs::write(&out, &png).unwrap();

    // Without the token the page is refused.
    let r = reqwest::get(app.url("/")).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
}

/// The ids `GET /v1/jobs?{query}` answers, newest first, and its `next_cursor`.
async fn api_page(app: &TestApp, query: &str) -> (Vec<String>, Option<String>) {
    let a = app.get(&format!("/v1/jobs?{query}")).await;
    assert_eq!(a.status, reqwest::StatusCode::OK, "{}", a.body);
    let ids = a.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    (ids, a.body["next_cursor"].as_str().map(String::from))
}

/// A failed job appears in the failures view with its error; its Retry button, and then
/// "retry all shown", put it back (the API counts each in `retried`).
async fn failures_show_their_error_and_are_retried(app: &TestApp, driver: &Driver) {
    let failing =
        |message: &str| json!({"task": "fail", "max_attempts": 1, "args": {"message": message}});
    let a = id_of(&app.submit(failing("boom on purpose")).await);
    assert_eq!(app.wait(&a, 20).await["status"], "failed");
    let row = format!("#failures tr[data-id=\"{a}\"]");
    assert_eq!(driver.text(&format!("{row} .etype")).await, "task_error");
    let message = driver.text(&format!("{row} .emsg")).await;
    assert!(message.contains("boom on purpose"), "{message}");

    driver.click(&format!("{row} button.retry")).await;
    app.wait_until(&a, 20, |j| j["retried"] == 1).await;
    let note = driver.text("#failures-note").await;
    assert!(note.contains(&a), "the page says what it retried: {note}");
    // One attempt again, so it fails again and is back in the view with its count.
    assert_eq!(app.wait(&a, 20).await["status"], "failed");
    let retried = format!("{row} .retried");
    assert_eq!(
        driver
            .eval_until(
                &format!(
                    "return document.querySelector('{}').textContent",
                    retried.replace('\'', "\\'")
                ),
                &json!("1")
            )
            .await,
        json!("1")
    );

    let b = id_of(&app.submit(failing("boom again")).await);
    assert_eq!(app.wait(&b, 20).await["status"], "failed");
    let (failed, _) = api_page(app, "status=failed").await;
    assert_eq!(failed, vec![b.clone(), a.clone()]);
    let shown = driver
        .eval_until(&Driver::row_ids_script("#failures"), &json!(failed))
        .await;
    assert_eq!(shown, json!(failed), "the failures view shows both");
    assert_eq!(driver.text("#retry-all").await, "Retry all 2 shown");
    driver.click("#retry-all").await;
    app.wait_until(&a, 20, |j| j["retried"] == 2).await;
    app.wait_until(&b, 20, |j| j["retried"] == 1).await;
    let note = driver.text("#failures-note").await;
    assert!(note.contains("Retried 2 jobs"), "{note}");
    for id in [&a, &b] {
        assert_eq!(app.wait(id, 20).await["status"], "failed");
    }
}

/// The status filter narrows the job list to what the API lists for it; paging follows
/// `next_cursor` to the next page and back; the lane filter asks for one executor.
async fn filters_narrow_the_list_and_pages_move(app: &TestApp, driver: &Driver) {
    // 30 more succeeded jobs: the succeeded ones fill more than a page (25).
    let specs: Vec<Value> = (0..30).map(|_| json!({"task": "noop"})).collect();
    let batch = app.post("/v1/jobs/batch", json!({"jobs": specs})).await;
    assert_eq!(
        batch.status,
        reqwest::StatusCode::ACCEPTED,
        "{}",
        batch.body
    );
    for j in batch.body["jobs"].as_array().unwrap() {
        assert_eq!(app.wait(&id_of(j), 20).await["status"], "succeeded");
    }
    let rows = Driver::row_ids_script("#jobs");

    driver.click("#f-status option[value=failed]").await;
    let (failed, _) = api_page(app, "status=failed&limit=25").await;
    assert_eq!(failed.len(), 2);
    assert_eq!(
        driver.eval_until(&rows, &json!(failed)).await,
        json!(failed)
    );
    assert_eq!(driver.attr("#page-older", "disabled").await, "true");

    driver.click("#f-status option[value=succeeded]").await;
    let (first, next) = api_page(app, "status=succeeded&limit=25").await;
    let next = next.expect("more than a page of succeeded jobs");
    let (second, _) = api_page(app, &format!("status=succeeded&limit=25&cursor={next}")).await;
    assert_eq!((first.len(), second.len()), (25, 12));
    assert_eq!(driver.eval_until(&rows, &json!(first)).await, json!(first));
    driver.click("#page-older").await;
    assert_eq!(
        driver.eval_until(&rows, &json!(second)).await,
        json!(second),
        "the next page is the API's page after next_cursor"
    );
    assert_eq!(driver.text("#page-info").await, "page 2");
    driver.click("#page-newer").await;
    assert_eq!(driver.eval_until(&rows, &json!(first)).await, json!(first));

    // The lane: the rayon lane ran the sum_squares and count_primes jobs only.
    driver.click("#f-lane option[value=rayon]").await;
    let (rayon, _) = api_page(app, "status=succeeded&executor=rayon&limit=25").await;
    assert_eq!(rayon.len(), 7, "six sum_squares and one count_primes");
    assert_eq!(driver.eval_until(&rows, &json!(rayon)).await, json!(rayon));
    let lanes = driver
        .eval("return [...document.querySelectorAll('#jobs tr[data-id] td:nth-child(3)')].map((td) => td.textContent)")
        .await;
    assert_eq!(lanes, json!(vec!["rayon"; 7]));

    driver.click("#f-lane option[value=\"\"]").await;
    driver.click("#f-status option[value=\"\"]").await;
    let (all, _) = api_page(app, "limit=25").await;
    assert_eq!(driver.eval_until(&rows, &json!(all)).await, json!(all));
    assert_eq!(driver.row_ids("#jobs").await, json!(all));
}

/// A job with a parent shows it in its detail, and the parent, clicked there, shows its child.
async fn parents_and_children_are_linked(app: &TestApp, driver: &Driver) {
    let graph = json!({"jobs": [{"task": "noop"}, {"task": "noop", "depends_on": ["#0"]}]});
    let batch = app.post("/v1/jobs/batch", graph).await;
    assert_eq!(
        batch.status,
        reqwest::StatusCode::ACCEPTED,
        "{}",
        batch.body
    );
    let parent = id_of(&batch.body["jobs"][0]);
    let child = id_of(&batch.body["jobs"][1]);
    assert_eq!(app.wait(&child, 20).await["status"], "succeeded");

    driver
        .click(&format!("#jobs tr[data-id=\"{child}\"]"))
        .await;
    let to_parent = format!("#relations a.parent[data-id=\"{parent}\"]");
    driver.find(&to_parent).await;
    driver.click(&to_parent).await;
    driver
        .find(&format!("#relations a.child[data-id=\"{child}\"]"))
        .await;
    let detail: Value = serde_json::from_str(&driver.text("#detail").await).unwrap();
    assert_eq!(detail["id"], json!(parent));
    assert_eq!(detail["children"], json!([child]));
}

/// A schedule appears with its next run; its Pause button pauses it and Resume resumes it.
async fn schedules_show_their_next_run_and_pause(app: &TestApp, driver: &Driver) {
    let spec = json!({"name": "nightly-report", "cron": "0 3 * * *", "timezone": "UTC",
                      "job": {"task": "noop"}, "catch_up": "none"});
    let created = app.post("/v1/schedules", spec).await;
    assert_eq!(
        created.status,
        reqwest::StatusCode::CREATED,
        "{}",
        created.body
    );
    let row = "#schedules tr[data-name=\"nightly-report\"]";
    let cell = format!("{row} .next-run");
    assert_eq!(
        driver.attr(&cell, "data-next-run").await,
        created.body["next_run"].as_str().unwrap()
    );
    let shown = driver.text(&cell).await;
    assert!(!shown.is_empty() && shown != "paused", "{shown}");

    let paused = |want: bool| async move {
        for _ in 0..200 {
            if app.get("/v1/schedules/nightly-report").await.body["paused"] == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the schedule's paused never became {want}");
    };
    driver.click(&format!("{row} button.pause")).await;
    paused(true).await;
    driver.find(&format!("{row} button.resume")).await;
    assert_eq!(driver.text(&cell).await, "paused");
    driver.click(&format!("{row} button.resume")).await;
    paused(false).await;
    driver.find(&format!("{row} button.pause")).await;
}
