//! Cross-site request forgery: a change authenticated only by the dashboard's cookie, or sent
//! from a page on another origin, needs the `X-Offload-Csrf` header the dashboard sends.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

async fn job_count(app: &TestApp) -> usize {
    app.get("/v1/jobs?limit=1000").await.body["jobs"]
        .as_array()
        .unwrap()
        .len()
}

fn assert_forbidden_problem(a: &Answer) {
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    assert_eq!(
        a.headers["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    assert_eq!(a.body["status"], 403);
    assert!(a.body["detail"]
        .as_str()
        .unwrap()
        .contains("X-Offload-Csrf"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_with_only_the_cookie_needs_the_csrf_header() {
    let app = spawn_with(|s| s.api_token = Some("s3cret".into())).await;
    let cookie = "offload_token=s3cret";
    let submit = |csrf: bool| {
        let mut req = app
            .client
            .post(app.url("/v1/jobs"))
            .header("cookie", cookie)
            .json(&json!({"task": "noop", "delay_ms": 3_600_000}));
        if csrf {
            req = req.header("x-offload-csrf", "1");
        }
        req
    };

    // Without the header: 403, and nothing stored.
    let a = read(submit(false).send().await.unwrap()).await;
    assert_forbidden_problem(&a);
    assert_eq!(job_count(&app).await, 0);

    // With it: the dashboard's request goes through.
    let a = read(submit(true).send().await.unwrap()).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let id = id_of(&a.body);

    // Reading needs no header.
    let r = app
        .client
        .get(app.url(&format!("/v1/jobs/{id}")))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // A cancel and a delete without it change nothing.
    let cancel = app.url(&format!("/v1/jobs/{id}/cancel"));
    let a = read(
        app.client
            .post(&cancel)
            .header("cookie", cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_forbidden_problem(&a);
    let a = read(
        app.client
            .delete(app.url(&format!("/v1/jobs/{id}")))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_forbidden_problem(&a);
    assert_eq!(
        app.get(&format!("/v1/jobs/{id}")).await.body["status"],
        "queued"
    );
    let a = read(
        app.client
            .post(&cancel)
            .header("cookie", cookie)
            .header("x-offload-csrf", "1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["status"], "cancelled");

    // A bearer token needs no header (the helpers send no such header).
    assert_eq!(
        app.post("/v1/jobs", json!({"task": "noop"})).await.status,
        StatusCode::ACCEPTED
    );
    // A wrong cookie is still a 401, header or not.
    let r = app
        .client
        .post(app.url("/v1/jobs"))
        .header("cookie", "offload_token=nope")
        .header("x-offload-csrf", "1")
        .json(&json!({"task": "noop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_change_from_another_origin_needs_the_header() {
    let app = spawn_app().await;
    let job = app
        .submit(json!({"task": "noop", "delay_ms": 3_600_000}))
        .await;
    let cancel = app.url(&format!("/v1/jobs/{}/cancel", id_of(&job)));
    // A form on another port of this host: its Origin is not this Host.
    for origin in ["http://127.0.0.1:3000", "https://evil.example", "null"] {
        let a = read(
            app.client
                .post(&cancel)
                .header("origin", origin)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_forbidden_problem(&a);
    }
    assert_eq!(
        app.get(&format!("/v1/jobs/{}", id_of(&job))).await.body["status"],
        "queued"
    );
    // The same origin (the dashboard) goes through, as does a client that sends no Origin.
    let a = read(
        app.client
            .post(&cancel)
            .header("origin", app.base.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let other = app
        .submit(json!({"task": "noop", "delay_ms": 3_600_000}))
        .await;
    let a = app
        .post(&format!("/v1/jobs/{}/cancel", id_of(&other)), json!({}))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}
