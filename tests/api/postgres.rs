//! The whole service on PostgreSQL: the same API, the same lanes, a different store.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_on_postgresql_across_a_restart() {
    let Some((schema, url)) = pg_schema("e").await else {
        return;
    };
    let u = url.clone();
    let mut app = spawn_with(move |s| s.database_url = u).await;
    let job = app
        .submit(json!({"task": "sum_squares", "args": {"n": 10_000_000}}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["result"]["sum"], "333333283333335000000");
    let waiting = app
        .submit(json!({"task": "noop", "delay_ms": 60_000, "idempotency_key": "pg-1"}))
        .await;
    let again = app
        .post(
            "/v1/jobs",
            json!({"task": "noop", "delay_ms": 60_000, "idempotency_key": "pg-1"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK);
    let listed = app.get("/v1/jobs?status=succeeded").await.body;
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1);

    app.stop().await;
    let u = url.clone();
    let app = spawn_in(app.dir, move |s| s.database_url = u).await;
    assert_eq!(
        app.get(&format!("/v1/jobs/{}", id_of(&waiting))).await.body["status"],
        "queued"
    );
    let cancelled = app
        .post(&format!("/v1/jobs/{}/cancel", id_of(&waiting)), json!({}))
        .await;
    assert_eq!(cancelled.body["status"], "cancelled");
    drop(app);
    drop_pg_schema(&schema).await;
}
