//! The schedule part of the store conformance suite: what every `JobStore` must do with
//! schedules, on SQLite and (with `OFFLOAD_TEST_DATABASE_URL`) PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use offload::clock::Micros;
use offload::job::JobStatus;
use offload::schedule::{tick_key, CatchUp, Schedule};
use offload::store::{Fire, JobStore, Notice};
use serde_json::json;

use super::{new_job, postgres, sqlite};

fn schedule(name: &str, next_run: Micros) -> Schedule {
    let now = Micros::now();
    Schedule {
        name: name.into(),
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        job: json!({"task": "noop", "args": {}}),
        catch_up: CatchUp::One,
        paused: false,
        next_run,
        last_tick: None,
        last_error: None,
        created_at: now,
        updated_at: now,
    }
}

fn secs(s: i64) -> Micros {
    Micros(1_800_000_000_000_000 + s * 1_000_000)
}

conformance!(schedules_are_created_once_listed_by_name_and_deleted);
async fn schedules_are_created_once_listed_by_name_and_deleted(store: Arc<dyn JobStore>) {
    let b = schedule("b", secs(10));
    assert!(store.create_schedule(b.clone()).await.unwrap());
    let mut other = schedule("b", secs(99));
    other.cron = "0 0 * * *".into();
    assert!(
        !store.create_schedule(other).await.unwrap(),
        "a taken name stores nothing"
    );
    assert_eq!(store.get_schedule("b").await.unwrap().unwrap(), b);
    for name in ["c", "a", "b.2"] {
        assert!(store
            .create_schedule(schedule(name, secs(5)))
            .await
            .unwrap());
    }
    let names = |list: Vec<Schedule>| list.into_iter().map(|s| s.name).collect::<Vec<_>>();
    assert_eq!(
        names(store.list_schedules(None, 10).await.unwrap()),
        ["a", "b", "b.2", "c"]
    );
    assert_eq!(
        names(store.list_schedules(Some("b"), 2).await.unwrap()),
        ["b.2", "c"]
    );
    assert!(store.delete_schedule("b").await.unwrap());
    assert!(!store.delete_schedule("b").await.unwrap());
    assert!(store.get_schedule("b").await.unwrap().is_none());
    assert_eq!(store.list_schedules(None, 10).await.unwrap().len(), 3);
}

conformance!(paused_schedules_are_not_due_and_resume_where_told);
async fn paused_schedules_are_not_due_and_resume_where_told(store: Arc<dyn JobStore>) {
    for (name, at) in [("late", secs(30)), ("soon", secs(10)), ("mid", secs(20))] {
        store.create_schedule(schedule(name, at)).await.unwrap();
    }
    let due = |list: Vec<Schedule>| list.into_iter().map(|s| s.name).collect::<Vec<_>>();
    assert_eq!(
        due(store.next_schedules(10).await.unwrap()),
        ["soon", "mid", "late"]
    );
    assert_eq!(due(store.next_schedules(1).await.unwrap()), ["soon"]);

    let paused = store
        .pause_schedule("soon", secs(1))
        .await
        .unwrap()
        .unwrap();
    assert!(paused.paused);
    assert_eq!(paused.updated_at, secs(1));
    let again = store
        .pause_schedule("soon", secs(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.updated_at,
        secs(1),
        "pausing a paused one changes nothing"
    );
    assert_eq!(
        due(store.next_schedules(10).await.unwrap()),
        ["mid", "late"]
    );

    let resumed = store
        .resume_schedule("soon", secs(40), secs(3))
        .await
        .unwrap()
        .unwrap();
    assert!(!resumed.paused);
    assert_eq!(resumed.next_run, secs(40));
    let again = store
        .resume_schedule("soon", secs(50), secs(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.next_run,
        secs(40),
        "resuming an active one changes nothing"
    );
    assert_eq!(
        due(store.next_schedules(10).await.unwrap()),
        ["mid", "late", "soon"]
    );
    assert!(store
        .pause_schedule("nope", secs(5))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .resume_schedule("nope", secs(5), secs(5))
        .await
        .unwrap()
        .is_none());
}

/// A wake-up's jobs, keyed per tick.
fn tick_jobs(name: &str, ticks: &[Micros]) -> Vec<offload::job::NewJob> {
    ticks
        .iter()
        .map(|t| {
            let key = tick_key(name, *t);
            let mut job = new_job("noop", Some(&key), Some("hash"));
            job.scheduled_at = *t;
            job
        })
        .collect()
}

fn fire(name: &str, expected: Micros, ticks: &[Micros], next_run: Micros) -> Fire {
    Fire {
        name: name.into(),
        expected,
        jobs: tick_jobs(name, ticks),
        next_run,
        last_tick: ticks.last().copied(),
        error: None,
        now: Micros::now(),
    }
}

conformance!(a_wake_up_fires_once_and_never_stores_a_tick_twice);
async fn a_wake_up_fires_once_and_never_stores_a_tick_twice(store: Arc<dyn JobStore>) {
    store.create_schedule(schedule("s", secs(1))).await.unwrap();
    store
        .create_schedule(schedule("s2", secs(1)))
        .await
        .unwrap();
    let first = store
        .fire_schedule(fire("s", secs(1), &[secs(1)], secs(2)))
        .await
        .unwrap()
        .expect("due at secs(1): fired");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].status, JobStatus::Queued);
    assert_eq!(
        first[0].idempotency_key.as_deref(),
        Some(tick_key("s", secs(1)).as_str())
    );

    // A second server that read the same next_run: refused, and nothing stored.
    let mut late = fire("s", secs(1), &[secs(1)], secs(2));
    late.jobs[0].idempotency_key = Some(tick_key("s", secs(7)));
    assert!(store.fire_schedule(late.clone()).await.unwrap().is_none());
    assert!(store.get(late.jobs[0].id).await.unwrap().is_none());

    // A tick whose job is stored already (a restart between commit and answer) is left out.
    let second = store
        .fire_schedule(fire("s", secs(2), &[secs(1), secs(2)], secs(3)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].scheduled_at, secs(2));

    store
        .fire_schedule(fire("s2", secs(1), &[secs(1)], secs(2)))
        .await
        .unwrap()
        .unwrap();

    let s = store.get_schedule("s").await.unwrap().unwrap();
    assert_eq!(s.next_run, secs(3));
    assert_eq!(s.last_tick, Some(secs(2)));
    let jobs = store.schedule_jobs("s", 10).await.unwrap();
    let keys: Vec<String> = jobs
        .iter()
        .map(|j| j.idempotency_key.clone().unwrap())
        .collect();
    assert_eq!(
        keys,
        [tick_key("s", secs(2)), tick_key("s", secs(1))],
        "its own jobs only, newest tick first"
    );
    assert_eq!(store.schedule_jobs("s", 1).await.unwrap().len(), 1);

    // A wake-up that made no job records why; a paused or deleted schedule is not fired.
    let mut broken = fire("s", secs(3), &[], secs(4));
    broken.error = Some("job.task: unknown task".into());
    broken.last_tick = s.last_tick;
    assert_eq!(store.fire_schedule(broken).await.unwrap().unwrap().len(), 0);
    let s = store.get_schedule("s").await.unwrap().unwrap();
    assert_eq!(s.last_error.as_deref(), Some("job.task: unknown task"));
    assert_eq!(s.next_run, secs(4));
    store.pause_schedule("s", secs(5)).await.unwrap();
    assert!(store
        .fire_schedule(fire("s", secs(4), &[secs(4)], secs(5)))
        .await
        .unwrap()
        .is_none());
    store.delete_schedule("s2").await.unwrap();
    assert!(store
        .fire_schedule(fire("s2", secs(2), &[secs(2)], secs(3)))
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.schedule_jobs("s2", 10).await.unwrap().len(),
        1,
        "its jobs stay"
    );
}

conformance!(schedule_changes_are_announced);
async fn schedule_changes_are_announced(store: Arc<dyn JobStore>) {
    let mut notices = store.listen().await.unwrap();
    async fn heard(
        notices: &mut tokio::sync::mpsc::UnboundedReceiver<Notice>,
        want: Notice,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(n)) = tokio::time::timeout_at(deadline, notices.recv()).await {
            if n == want {
                return true;
            }
        }
        false
    }
    store.create_schedule(schedule("s", secs(1))).await.unwrap();
    assert!(heard(&mut notices, Notice::Schedules).await, "create");
    store.pause_schedule("s", secs(2)).await.unwrap();
    assert!(heard(&mut notices, Notice::Schedules).await, "pause");
    store.resume_schedule("s", secs(3), secs(3)).await.unwrap();
    assert!(heard(&mut notices, Notice::Schedules).await, "resume");
    store
        .fire_schedule(fire("s", secs(3), &[secs(3)], secs(4)))
        .await
        .unwrap()
        .unwrap();
    assert!(
        heard(
            &mut notices,
            Notice::New {
                lane: offload::job::ExecutorKind::Async,
                added: 0
            }
        )
        .await,
        "a fire's jobs, as a submit's"
    );
    store.delete_schedule("s").await.unwrap();
    assert!(heard(&mut notices, Notice::Schedules).await, "delete");
}
