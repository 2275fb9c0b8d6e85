//! Completion callbacks: a real receiver on a local port, the real server (in-process, or the
//! binary where it is killed), the signature checked here with an HMAC of our own.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::post;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::{drop_pg_schema, id_of, pg_schema, read, spawn_with, Binary, TestApp};

const SECRET: &str = "test-callback-secret";

/// One request the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Hit {
    signature: String,
    job_header: String,
    content_type: String,
    body: Bytes,
    answered: u16,
}

impl Hit {
    fn job(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }
}

#[derive(Default)]
struct Script {
    /// Answers to give, in order; once used up, `then`.
    next: VecDeque<u16>,
    then: u16,
    hits: Vec<Hit>,
}

/// A webhook receiver on 127.0.0.1: records every POST and answers as scripted.
#[derive(Clone)]
struct Receiver {
    url: String,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    async fn start(then: u16) -> Receiver {
        let script = Arc::new(Mutex::new(Script {
            then,
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url: format!("http://{addr}/hook"),
            script,
        }
    }

    /// Answer these first, then `then` from now on.
    fn answer(&self, first: &[u16], then: u16) {
        let mut s = self.script.lock().unwrap();
        s.next = first.iter().copied().collect();
        s.then = then;
    }

    fn hits(&self) -> Vec<Hit> {
        self.script.lock().unwrap().hits.clone()
    }

    fn hits_for(&self, id: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.job_header == id)
            .collect()
    }
}

async fn receive(
    State(script): State<Arc<Mutex<Script>>>,
    headers: HeaderMap,
    body: Bytes,
) -> AxumStatus {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut s = script.lock().unwrap();
    let answered = s.next.pop_front().unwrap_or(s.then);
    s.hits.push(Hit {
        signature: header("offload-signature"),
        job_header: header("offload-job-id"),
        content_type: header("content-type"),
        body,
        answered,
    });
    AxumStatus::from_u16(answered).unwrap()
}

/// Checks `t=<secs>,v1=<hex>` the way a receiver would, with an HMAC computed here rather
/// than by the server's own code.
fn assert_signed(hit: &Hit) {
    let (t, v1) = hit
        .signature
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature header `{}`", hit.signature));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(&hit.body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, want, "the signature is HMAC-SHA256 of `<t>.<body>`");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t: i64 = t.parse().unwrap();
    assert!(
        (now - t).abs() < 120,
        "t is the time of sending: {t} vs {now}"
    );
    // And the server's own verifier agrees, and refuses a tampered body.
    offload::callback::verify(SECRET.as_bytes(), &hit.signature, &hit.body, now, 300).unwrap();
    let mut tampered = hit.body.to_vec();
    tampered.push(b' ');
    assert!(
        offload::callback::verify(SECRET.as_bytes(), &hit.signature, &tampered, now, 300).is_err()
    );
}

async fn app_with_callbacks(backoff_ms: u64) -> TestApp {
    spawn_with(move |s| {
        s.callback_secret = Some(SECRET.into());
        s.http_allow_private = true;
        s.callback_backoff_ms = backoff_ms;
        s.callback_timeout_ms = 2_000;
    })
    .await
}

/// Polls until the job's callback has `status`, up to `secs`.
async fn callback_becomes(app: &TestApp, id: &str, status: &str, secs: u64) -> Value {
    app.wait_until(id, secs, |j| j["callback"]["status"] == status)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_arrives_once_signed_with_the_final_job_object() {
    let receiver = Receiver::start(200).await;
    let app = app_with_callbacks(50).await;
    let done = app
        .submit(json!({"task": "noop", "callback_url": receiver.url}))
        .await;
    assert_eq!(
        done["callback"],
        json!({"url": receiver.url, "status": "pending", "attempts": 0, "last_error": null})
    );
    let failed = app
        .submit(json!({"task": "fail", "max_attempts": 1, "callback_url": receiver.url}))
        .await;
    let cancelled = app
        .submit(json!({"task": "sleep", "args": {"ms": 30_000}, "callback_url": receiver.url}))
        .await;
    let plain = app.submit(json!({"task": "noop"})).await;
    assert!(
        plain.get("callback").is_none(),
        "no callback_url, no callback"
    );
    let (done, failed, cancelled) = (id_of(&done), id_of(&failed), id_of(&cancelled));
    app.wait_until(&cancelled, 10, |j| j["status"] == "running")
        .await;
    let a = app
        .post(&format!("/v1/jobs/{cancelled}/cancel"), json!({}))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    for (id, status) in [
        (&done, "succeeded"),
        (&failed, "failed"),
        (&cancelled, "cancelled"),
    ] {
        let job = callback_becomes(&app, id, "delivered", 15).await;
        assert_eq!(job["status"], status);
        assert_eq!(job["callback"]["attempts"], 1);
        assert_eq!(job["callback"]["last_error"], Value::Null);
    }
    // Nothing more arrives later: one delivery each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, status) in [
        (&done, "succeeded"),
        (&failed, "failed"),
        (&cancelled, "cancelled"),
    ] {
        let hits = receiver.hits_for(id);
        assert_eq!(hits.len(), 1, "{id}: {} deliveries", hits.len());
        let hit = &hits[0];
        assert_signed(hit);
        assert_eq!(hit.content_type, "application/json");
        let job = hit.job();
        assert_eq!(job["id"], id.as_str());
        assert_eq!(job["status"], status, "the final state is what is sent");
        assert_eq!(job["callback"]["url"], receiver.url.as_str());
        // The body is the job object as the API shows it.
        crate::helpers::check_against_spec(
            &reqwest::Method::GET,
            &format!("/v1/jobs/{id}"),
            &crate::helpers::Answer {
                status: StatusCode::OK,
                headers: {
                    let mut h = reqwest::header::HeaderMap::new();
                    h.insert("content-type", "application/json".parse().unwrap());
                    h
                },
                body: job,
            },
        );
    }
    assert_eq!(receiver.hits_for(&done)[0].job()["result"], json!({}));
    assert_eq!(receiver.hits().len(), 3, "nothing for the job without one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_is_retried_while_the_receiver_fails_then_delivered_once() {
    let receiver = Receiver::start(200).await;
    receiver.answer(&[500, 500, 503], 200);
    let app = app_with_callbacks(50).await;
    let job = app
        .submit(json!({"task": "noop", "callback_url": receiver.url}))
        .await;
    let id = id_of(&job);
    let job = callback_becomes(&app, &id, "delivered", 20).await;
    assert_eq!(job["callback"]["attempts"], 4);
    assert!(
        job["callback"]["last_error"]
            .as_str()
            .unwrap()
            .contains("503"),
        "the last failure is kept: {job}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered: Vec<u16> = receiver.hits().iter().map(|h| h.answered).collect();
    assert_eq!(
        answered,
        [500, 500, 503, 200],
        "retried until 2xx, then never again"
    );
    for hit in receiver.hits() {
        assert_signed(&hit);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_that_keeps_failing_is_given_up_after_its_retry_window() {
    let receiver = Receiver::start(500).await;
    let app = spawn_with(|s| {
        s.callback_secret = Some(SECRET.into());
        s.http_allow_private = true;
        s.callback_backoff_ms = 50;
        s.callback_retry_secs = 1;
    })
    .await;
    let id = id_of(
        &app.submit(json!({"task": "noop", "callback_url": receiver.url}))
            .await,
    );
    let job = callback_becomes(&app, &id, "failed", 20).await;
    let tries = job["callback"]["attempts"].as_u64().unwrap();
    assert!(tries >= 2, "retried before giving up: {job}");
    assert!(job["callback"]["last_error"]
        .as_str()
        .unwrap()
        .contains("500"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.hits().len() as u64,
        tries,
        "no try after giving up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_callback_urls_are_a_422_that_stores_nothing() {
    let app = spawn_with(|s| {
        s.callback_secret = Some(SECRET.into());
        s.http_allow_hosts = vec!["127.0.0.1".into(), "hooks.example.com".into()];
    })
    .await;
    for (url, says) in [
        (json!("http://127.0.0.1:9/hook"), "--http-allow-private"),
        (json!("http://10.0.0.1/hook"), "not on the allowlist"),
        (
            json!("http://evil.example.org/hook"),
            "not on the allowlist",
        ),
        (json!("ftp://hooks.example.com/hook"), "scheme"),
        (json!("not a url"), "is not a URL"),
        (json!("http://user:pw@hooks.example.com/"), "credentials"),
        (json!(""), "callback_url"),
        (json!(42), "callback_url"),
    ] {
        let a = app
            .post("/v1/jobs", json!({"task": "noop", "callback_url": url}))
            .await;
        assert_eq!(
            a.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{url}: {}",
            a.body
        );
        let detail = a.body["detail"].as_str().unwrap();
        assert!(detail.contains("callback_url"), "{url}: {detail}");
        assert!(detail.contains(says), "{url}: {detail}");
    }
    // In a batch, one bad URL refuses the whole batch.
    let a = app
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [
                {"task": "noop", "callback_url": "http://hooks.example.com/ok"},
                {"task": "noop", "callback_url": "http://127.0.0.1/hook"},
            ]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
    assert!(a.body["detail"]
        .as_str()
        .unwrap()
        .contains("jobs[1].callback_url"));
    let list = app.get("/v1/jobs").await;
    assert_eq!(list.body["jobs"], json!([]), "nothing was stored");
    // An allowed host passes.
    app.submit(json!({"task": "noop", "callback_url": "https://hooks.example.com/done"}))
        .await;

    // A server without a secret sends no callbacks, so it takes none.
    let unsigned = spawn_with(|s| s.http_allow_private = true).await;
    let a = unsigned
        .post(
            "/v1/jobs",
            json!({"task": "noop", "callback_url": "http://127.0.0.1:9/hook"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
    assert!(a.body["detail"]
        .as_str()
        .unwrap()
        .contains("--callback-secret"));
}

/// The crash window the outbox exists for: the job is final and its callback owed, but not
/// delivered (the receiver is failing), when the server is killed with SIGKILL. The restarted
/// server on the same data dir delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_owed_when_the_server_is_killed_is_delivered_after_a_restart() {
    let receiver = Receiver::start(503).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let args = [
        "--data-dir",
        &data,
        "--callback-secret",
        SECRET,
        "--http-allow-private",
        "--callback-backoff-ms",
        "100",
        "--callback-timeout-ms",
        "1000",
    ];
    let client = reqwest::Client::new();
    let mut server = Binary::start(&args);
    let a = read(
        client
            .post(format!("{}/v1/jobs", server.base))
            .json(&json!({"task": "noop", "callback_url": receiver.url}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let id = id_of(&a.body);
    // Final, and its callback tried (and refused) at least once.
    let get = |base: String| {
        let client = client.clone();
        let id = id.clone();
        async move {
            client
                .get(format!("{base}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let job = get(server.base.clone()).await;
        if job["status"] == "succeeded" && job["callback"]["attempts"].as_u64() >= Some(1) {
            assert_eq!(job["callback"]["status"], "pending");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    let refused = receiver.hits().len();
    assert!(refused >= 1);

    receiver.answer(&[], 200);
    let server = Binary::start(&args);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let job = loop {
        let job = get(server.base.clone()).await;
        if job["callback"]["status"] == "delivered" {
            break job;
        }
        assert!(tokio::time::Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = receiver.hits();
    let delivered: Vec<&Hit> = hits.iter().filter(|h| h.answered == 200).collect();
    assert_eq!(delivered.len(), 1, "delivered once after the restart");
    assert_signed(delivered[0]);
    assert_eq!(delivered[0].job()["id"], id.as_str());
    assert_eq!(delivered[0].job()["status"], "succeeded");
    assert_eq!(
        job["callback"]["attempts"].as_u64().unwrap() as usize,
        hits.len(),
        "every try counted, across the crash"
    );
}

/// Two servers on one PostgreSQL database: each callback is delivered by one of them, once,
/// even while the receiver fails every first try (so the retry may be claimed by either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_postgresql_deliver_each_callback_once() {
    let Some((schema, url)) = pg_schema("cb").await else {
        return;
    };
    let receiver = Receiver::start(200).await;
    let start = |url: String| {
        spawn_with(move |s| {
            s.database_url = url;
            s.callback_secret = Some(SECRET.into());
            s.http_allow_private = true;
            s.callback_backoff_ms = 50;
        })
    };
    let mut a = start(url.clone()).await;
    let mut b = start(url.clone()).await;
    // The first 20 requests are answered 500, whichever jobs they carry; so 20 tries fail and
    // must be retried, by either server.
    receiver.answer(&[500; 20], 200);
    let mut ids = Vec::new();
    for i in 0..20 {
        let app = if i % 2 == 0 { &a } else { &b };
        let job = app
            .submit(json!({"task": "noop", "callback_url": receiver.url}))
            .await;
        ids.push(id_of(&job));
    }
    for id in &ids {
        callback_becomes(&a, id, "delivered", 30).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        let delivered = receiver
            .hits_for(id)
            .iter()
            .filter(|h| h.answered == 200)
            .count();
        let answered: Vec<u16> = receiver.hits_for(id).iter().map(|h| h.answered).collect();
        assert_eq!(delivered, 1, "{id} was answered {answered:?}");
    }
    assert_eq!(
        receiver.hits().len(),
        40,
        "20 refused tries and 20 deliveries, none twice"
    );
    a.stop().await;
    b.stop().await;
    drop_pg_schema(&schema).await;
}
