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

/// With autovacuum off (here the table's setting; CI's cluster has it off altogether), every
/// job would leave dead entries in the queue's indexes for good, and claims would walk more of
/// them by the minute. The server vacuums the table itself once enough rows changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_vacuums_the_queue_where_autovacuum_is_off() {
    use sqlx::Connection;
    let Some((schema, url)) = pg_schema("vac").await else {
        return;
    };
    let u = url.clone();
    let app = spawn_with(move |s| s.database_url = u).await;
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("ALTER TABLE jobs SET (autovacuum_enabled = false)")
        .execute(&mut db)
        .await
        .unwrap();
    // 8,000 jobs: each a queued, a running and a finished version, two of them dead.
    let mut last = String::new();
    for _ in 0..8 {
        let specs = vec![json!({"task": "noop"}); 1000];
        let a = app.post("/v1/jobs/batch", json!({ "jobs": specs })).await;
        assert!(a.status.is_success(), "{}", a.status);
        last = id_of(&a.body["jobs"][999]);
    }
    app.wait(&last, 60).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let (vacuums, dead): (i64, i64) = sqlx::query_as(
            "SELECT vacuum_count, n_dead_tup FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass",
        )
        .fetch_one(&mut db)
        .await
        .unwrap();
        // (How many dead rows it could remove depends on other tests' open snapshots.)
        if vacuums > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never vacuumed; {dead} dead rows"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    drop(app);
    db.close().await.unwrap();
    drop_pg_schema(&schema).await;
}
