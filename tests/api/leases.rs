//! Leases and attempts: an attempt is known by its job and its number.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Connection;

use crate::helpers::{id_of, spawn_app};

/// Regression: the dispatcher's running attempts are keyed by job. A job taken from a server
/// behind its back (its lease lost, rescued elsewhere) and claimed again by the same server
/// used to leave the old attempt running beside the new one, out of reach of cancels and
/// renewals, holding a slot until it ended on its own. The old attempt is now stopped when the
/// new one registers, and only the new one's outcome counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_again_by_the_same_server_stops_its_old_attempt() {
    let app = spawn_app().await;
    let job = app
        .submit(json!({"task": "sleep", "args": {"ms": 6_000}}))
        .await;
    let id = id_of(&job);
    app.wait_until(&id, 10, |j| j["status"] == "running").await;
    // What another server's rescue writes: the job queued again, its lease gone (its attempt
    // count stays, so the next claim makes attempt 2).
    let url = offload::config::sqlite_url(app.dir.path());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let moved = sqlx::query(
        "UPDATE jobs SET status = 'queued', owner = NULL, lease_until = NULL \
         WHERE id = ? AND status = 'running'",
    )
    .bind(&id)
    .execute(&mut db)
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    db.close().await.unwrap();
    // The lane looks at the store again within a second and claims it (the heartbeat, which
    // would also stop the old attempt, is five seconds away with the default lease).
    let again = app
        .wait_until(&id, 5, |j| j["status"] == "running" && j["attempt"] == 2)
        .await;
    assert_eq!(again["attempt"], 2);
    let seen = Instant::now();
    loop {
        let stats = app.get("/v1/stats").await.body;
        let running = stats["executors"]["async"]["running"].as_u64().unwrap();
        if running == 1 {
            break;
        }
        assert!(
            seen.elapsed() < Duration::from_secs(2),
            "the old attempt still runs beside the new one: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = app.wait(&id, 20).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
}
