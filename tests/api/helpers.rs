//! One way to start the service for a test: the real HTTP server on a random port, with a
//! fresh temp data dir and its own SQLite file. Every answer that goes through [`TestApp::call`]
//! is checked against `openapi.yaml`.

use std::sync::OnceLock;
use std::time::Duration;

use offload::config::Settings;
use offload::{App, Registry};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: TempDir,
    pub token: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// An answer: status, headers, and the body as JSON (Null when empty or not JSON).
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            offload::telemetry::init(offload::config::LogFormat::Text);
        }
    });
}

/// Settings for tests: fast retries, a small CPU pool, loopback on a random port.
pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::with_data_dir(dir);
    s.bind = "127.0.0.1:0".parse().unwrap();
    s.retry_base_ms = 20;
    s.retry_max_ms = 100;
    s.cpu_threads = 2;
    s.drain_timeout_ms = 2_000;
    s.process_workers = 2;
    // The app runs inside the test binary; its workers are the real `offload` binary.
    s.worker_exe = Some(env!("CARGO_BIN_EXE_offload").into());
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    spawn_in(dir, tweak).await
}

/// Starts the app on an existing data dir (a restart).
pub async fn spawn_in(dir: TempDir, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_full(dir, tweak, |_| {}).await
}

/// Starts the app with extra tasks registered beside the built-in ones.
pub async fn spawn_full(
    dir: TempDir,
    tweak: impl FnOnce(&mut Settings),
    extra: impl FnOnce(&mut Registry),
) -> TestApp {
    init_logs();
    let mut settings = test_settings(dir.path());
    tweak(&mut settings);
    let token = settings.api_token.clone();
    let mut registry = Registry::builtin(&settings);
    extra(&mut registry);
    let app = App::build(settings, registry)
        .await
        .expect("the app builds");
    let addr = app.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        app.run(async {
            let _ = rx.await;
        })
        .await
        .expect("the server runs");
    });
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap(),
        dir,
        token,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request and checks the answer against openapi.yaml.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let mut req = self.client.request(method.clone(), self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("the server answers");
        let answer = read(resp).await;
        check_against_spec(&method, path, &answer);
        answer
    }

    /// Sends raw bytes with a given content type (for 400, 413 and 415 cases).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Answer {
        let mut req = self
            .client
            .request(method.clone(), self.url(path))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let answer = read(req.send().await.expect("the server answers")).await;
        check_against_spec(&method, path, &answer);
        answer
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Submits a job and expects a 202; returns the job.
    pub async fn submit(&self, spec: Value) -> Value {
        let a = self.post("/v1/jobs", spec.clone()).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "submit {spec}: {}", a.body);
        a.body
    }

    /// Waits (long-poll) until the job is final, up to `secs`.
    pub async fn wait(&self, id: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let a = self.get(&format!("/v1/jobs/{id}?wait=10")).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.body);
            if is_final(&a.body) || tokio::time::Instant::now() >= deadline {
                return a.body;
            }
        }
    }

    /// Polls until `pred` holds for the job, up to `secs`.
    pub async fn wait_until(&self, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let a = self.get(&format!("/v1/jobs/{id}")).await;
            if pred(&a.body) {
                return a.body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached: {}",
                a.body
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the server to stop (as a signal would) and waits for it to finish.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.server.take() {
            let _ = h.await;
        }
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn is_final(job: &Value) -> bool {
    matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

pub fn id_of(job: &Value) -> String {
    job["id"].as_str().expect("a job has an id").to_string()
}

pub async fn read(resp: reqwest::Response) -> Answer {
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

pub fn openapi() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
            .expect("openapi.yaml exists");
        serde_yaml::from_str(&text).expect("openapi.yaml parses")
    })
}

/// The spec's path template for a concrete path (`/v1/jobs/abc` → `/v1/jobs/{id}`).
pub fn template_for(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.split('/').collect();
    let paths = openapi()["paths"].as_object()?;
    // Prefer a literal match (`/v1/jobs/batch`) over a template (`/v1/jobs/{id}`).
    let mut best: Option<(usize, String)> = None;
    for template in paths.keys() {
        let tparts: Vec<&str> = template.split('/').collect();
        if tparts.len() != parts.len() {
            continue;
        }
        let mut literal = 0;
        let ok = tparts.iter().zip(&parts).all(|(t, p)| {
            if t.starts_with('{') {
                true
            } else {
                literal += 1;
                t == p
            }
        });
        if ok && best.as_ref().is_none_or(|(l, _)| literal > *l) {
            best = Some((literal, template.clone()));
        }
    }
    best.map(|(_, t)| t)
}

/// Asserts that the spec lists this answer's status for the route, and that a JSON body
/// matches the schema it gives.
pub fn check_against_spec(method: &Method, path: &str, answer: &Answer) {
    let spec = openapi();
    let Some(template) = template_for(path) else {
        assert_eq!(
            answer.status,
            StatusCode::NOT_FOUND,
            "{path} is not in openapi.yaml"
        );
        return;
    };
    let op = &spec["paths"][&template][method.as_str().to_ascii_lowercase()];
    if op.is_null() {
        assert_eq!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {template} is not in openapi.yaml"
        );
        return;
    }
    let mut response = &op["responses"][answer.status.as_str()];
    assert!(
        !response.is_null(),
        "openapi.yaml lists no {} for {method} {template}: {}",
        answer.status,
        answer.body
    );
    if let Some(r) = response.get("$ref").and_then(Value::as_str) {
        response = offload::schema::resolve(spec, r).expect("the $ref resolves");
    }
    let content_type = answer
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    if answer.status.is_client_error() || answer.status.is_server_error() {
        assert_eq!(content_type, "application/problem+json", "{}", answer.body);
    }
    if let Some(media) = response["content"].get(&content_type) {
        if content_type.contains("json") {
            offload::schema::validate(&answer.body, &media["schema"], spec, "response")
                .unwrap_or_else(|e| {
                    panic!(
                        "{method} {path} answered {} against openapi.yaml: {e}\n{}",
                        answer.status, answer.body
                    )
                });
        }
    } else if !response["content"].is_null() {
        panic!(
            "{method} {template} {}: content type `{content_type}` is not in openapi.yaml",
            answer.status
        );
    }
}

/// A spec that sleeps in the async lane.
pub fn sleep_spec(ms: u64) -> Value {
    json!({"task": "sleep", "args": {"ms": ms}})
}

/// The real `offload` binary, started with `serve` and extra args on a free loopback port;
/// killed with SIGKILL when dropped.
pub struct Binary {
    pub child: std::process::Child,
    pub base: String,
}

impl Binary {
    /// Starts `offload serve --bind 127.0.0.1:0 --retry-base-ms 50 <args>` and waits for the
    /// address it logs.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Binary {
        Binary::start_env(args, &[])
    }

    /// As [`Binary::start`], with extra environment variables.
    pub fn start_env<S: AsRef<std::ffi::OsStr>>(args: &[S], envs: &[(&str, &str)]) -> Binary {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_offload"))
            .args(["serve", "--bind", "127.0.0.1:0", "--retry-base-ms", "50"])
            .args(args)
            .envs(envs.iter().copied())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server logs its address before exiting")
                .unwrap();
            if let Some(pos) = line.find("127.0.0.1:") {
                let rest = &line[pos..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                    .unwrap_or(rest.len());
                break rest[..end].to_string();
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Binary {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// SIGKILL (Child::kill), and reap it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PostgreSQL the tests may use: `OFFLOAD_TEST_DATABASE_URL` (`.ci/run` sets it). `None`
/// when it is not set, after a line on stderr saying the calling test is skipped: a laptop
/// without PostgreSQL passes the rest of the suite (as sqlx's tests do with `DATABASE_URL`).
pub fn pg_url() -> Option<String> {
    match std::env::var("OFFLOAD_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            // libtest names each test's thread after the test.
            let test = std::thread::current()
                .name()
                .unwrap_or("a test")
                .to_string();
            eprintln!(
                "skipped {test}: it needs PostgreSQL; set \
                 OFFLOAD_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test to run it"
            );
            None
        }
    }
}

/// A fresh schema in that database, and a URL whose connections use it (search_path); `None`
/// (the test is skipped) without a PostgreSQL to use.
pub async fn pg_schema(prefix: &str) -> Option<(String, String)> {
    use sqlx::Connection;
    let base = pg_url()?;
    let schema = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("PostgreSQL at OFFLOAD_TEST_DATABASE_URL");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    Some((schema, url))
}

pub async fn drop_pg_schema(schema: &str) {
    use sqlx::Connection;
    let url = pg_url().expect("a schema was made, so PostgreSQL is there");
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut conn)
        .await
        .unwrap();
}
