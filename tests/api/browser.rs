//! The dashboard in a real browser: headless Chromium driven over WebDriver (chromedriver),
//! submitting a job through the form and watching it finish on the page.
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

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
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
    tokio::time::sleep(Duration::from_millis(1500)).await; // let the chart draw a few points
    let png = driver.screenshot().await;
    assert_eq!(&png[1..4], b"PNG");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    std::fs::write(&out, &png).unwrap();

    // Without the token the page is refused.
    let r = reqwest::get(app.url("/")).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
}
