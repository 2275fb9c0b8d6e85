//! Task programs (`--task-program`): a real python3 program (tests/programs/echo_tasks.py,
//! standard library only) speaking docs/worker-protocol.md, its tasks in the catalogue, run,
//! retried, cancelled and killed for real.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

const ECHO: &str = concat!(
    "python3 ",
    env!("CARGO_MANIFEST_DIR"),
    "/tests/programs/echo_tasks.py"
);

fn bad(mode: &str) -> String {
    format!(
        "python3 {}/tests/programs/bad_handshake.py {mode}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The server with echo_tasks.py as its one task program, `workers` workers of it.
async fn spawn_echo(workers: usize) -> TestApp {
    spawn_with(move |s| {
        s.task_programs = vec![ECHO.to_string()];
        s.task_program_workers = workers;
    })
    .await
}

/// The pids of the program's live workers, sorted.
async fn program_pids(app: &TestApp) -> Vec<u64> {
    let stats = app.get("/v1/stats").await.body;
    let mut pids: Vec<u64> = stats["executors"]["process"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["program"] == ECHO)
        .map(|w| w["pid"].as_u64().unwrap())
        .collect();
    pids.sort();
    pids
}

/// The program's pids once they differ from `before` and number `n`: a replacement is listed
/// once it has said ready.
async fn replaced(app: &TestApp, before: &[u64], n: usize) -> Vec<u64> {
    for _ in 0..500 {
        let pids = program_pids(app).await;
        if pids.len() == n && pids != before {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the program's workers {before:?} were never replaced");
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

async fn gone(pid: u64) -> bool {
    for _ in 0..200 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_lists_a_programs_tasks_with_the_program() {
    let server = Binary::start(&["--task-program", ECHO, "--task-program-workers", "1"]);
    let tasks: Value = reqwest::get(format!("{}/v1/tasks", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let find = |name: &str| {
        tasks["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not listed: {tasks}"))
    };
    let cpu = find("py_sum_squares");
    assert_eq!(cpu["program"], ECHO);
    assert_eq!(cpu["version"], "1");
    assert_eq!(cpu["kinds"], json!(["cpu"]));
    assert_eq!(cpu["executors"], json!({"cpu": "process"}));
    assert_eq!(cpu["args_schema"]["required"], json!(["n"]));
    let io = find("py_io_sleep");
    assert_eq!(io["executors"], json!({"io": "process"}));
    assert!(find("noop").get("program").is_none(), "built-ins have none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_task_returns_its_exact_result_and_bad_args_are_refused() {
    let app = spawn_echo(2).await;
    let job = app
        .submit(json!({"task": "py_sum_squares", "args": {"n": 1000}}))
        .await;
    assert_eq!(job["executor"], "process", "{job}");
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], json!({"sum": 332833500}));

    // Validated against the schema the program declared.
    let a = app
        .post(
            "/v1/jobs",
            json!({"task": "py_sum_squares", "args": {"n": "many"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_task_runs_on_the_programs_event_loop() {
    let app = spawn_echo(1).await;
    let jobs: Vec<String> = futures_util::future::join_all(
        (0..5).map(|_| app.submit(json!({"task": "py_io_sleep", "args": {"ms": 300}}))),
    )
    .await
    .iter()
    .map(id_of)
    .collect();
    let pid = program_pids(&app).await[0];
    for id in jobs {
        let done = app.wait(&id, 30).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["executor"], "process");
        assert_eq!(done["result"]["pid"], pid, "one worker ran them all");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_task_maps_its_blob_file() {
    let app = spawn_echo(1).await;
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let sum: u64 = bytes.iter().map(|&b| b as u64).sum();
    let a = app
        .call_raw(Method::POST, "/v1/blobs", "application/octet-stream", bytes)
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let blob = a.body["id"].as_str().unwrap().to_string();
    let job = app
        .submit(json!({"task": "py_blob_sum", "args": {"data": blob}}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], json!({"sum": sum, "size": 100_000}));

    // A blob argument names a stored blob, as for built-in tasks.
    let a = app
        .post(
            "/v1/jobs",
            json!({"task": "py_blob_sum", "args": {"data": "nope"}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_is_a_transient_error_retried_to_success() {
    let app = spawn_echo(1).await;
    let job = app
        .submit(json!({"task": "py_flaky", "args": {}, "max_attempts": 2}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2);
    assert_eq!(done["result"], json!({"attempt": 2}));

    let job = app
        .submit(json!({"task": "py_flaky", "args": {}, "max_attempts": 1}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("ValueError"), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_timeout_and_cancel_kill_the_worker_and_it_is_replaced() {
    let app = spawn_echo(1).await;
    let before = program_pids(&app).await;
    let job = app
        .submit(
            json!({"task": "py_spin", "args": {"secs": 60}, "timeout_ms": 500, "max_attempts": 1}),
        )
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["error"]["type"], "timeout", "{done}");
    let after = replaced(&app, &before, 1).await;
    assert!(
        gone(before[0]).await,
        "the timed-out job's worker was killed"
    );

    let job = app
        .submit(json!({"task": "py_spin", "args": {"secs": 60}, "max_attempts": 1}))
        .await;
    let id = id_of(&job);
    app.wait_until(&id, 30, |j| j["status"] == "running").await;
    let a = app.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(a.body["status"], "cancelled", "{}", a.body);
    replaced(&app, &after, 1).await;
    assert!(
        gone(after[0]).await,
        "the cancelled job's worker was killed"
    );

    // The fresh worker serves.
    let ok = app
        .submit(json!({"task": "py_sum_squares", "args": {"n": 10}}))
        .await;
    assert_eq!(app.wait(&id_of(&ok), 30).await["result"]["sum"], 285);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_cancel_leaves_the_worker_and_its_other_jobs_alone() {
    let app = spawn_echo(1).await;
    let pid = program_pids(&app).await;
    let other = id_of(
        &app.submit(json!({"task": "py_io_sleep", "args": {"ms": 1500}}))
            .await,
    );
    let doomed = id_of(
        &app.submit(json!({"task": "py_io_sleep", "args": {"ms": 60000}}))
            .await,
    );
    app.wait_until(&doomed, 30, |j| j["status"] == "running")
        .await;
    app.wait_until(&other, 30, |j| j["status"] == "running")
        .await;
    let a = app
        .post(&format!("/v1/jobs/{doomed}/cancel"), json!({}))
        .await;
    assert_eq!(a.body["status"], "cancelled", "{}", a.body);
    let done = app.wait(&other, 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["pid"], pid[0]);
    assert_eq!(program_pids(&app).await, pid, "the worker was not replaced");
    assert!(alive(pid[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_worker_that_ignores_a_cancel_is_killed_after_its_grace() {
    let app = spawn_echo(1).await;
    let before = program_pids(&app).await;
    let deaf = id_of(
        &app.submit(json!({"task": "py_io_deaf", "args": {"ms": 60000}}))
            .await,
    );
    app.wait_until(&deaf, 30, |j| j["status"] == "running")
        .await;
    let a = app
        .post(&format!("/v1/jobs/{deaf}/cancel"), json!({}))
        .await;
    assert_eq!(a.body["status"], "cancelled", "{}", a.body);
    // The job is over at once; the worker goes after the 5 s it had to answer.
    assert_eq!(program_pids(&app).await, before);
    replaced(&app, &before, 1).await;
    assert!(gone(before[0]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_mid_job_fails_it_as_crashed_and_it_is_retried() {
    let app = spawn_echo(1).await;
    // Killed from outside (SIGKILL).
    let before = program_pids(&app).await;
    let job = app
        .submit(
            json!({"task": "py_spin", "args": {"secs": 60, "retry_secs": 0.1}, "max_attempts": 2}),
        )
        .await;
    let id = id_of(&job);
    app.wait_until(&id, 30, |j| j["status"] == "running").await;
    assert!(std::process::Command::new("kill")
        .args(["-9", &before[0].to_string()])
        .status()
        .unwrap()
        .success());
    let done = app.wait(&id, 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2);
    let after = replaced(&app, &before, 1).await;
    assert_eq!(
        done["result"]["pid"], after[0],
        "the replacement ran attempt 2"
    );

    // Exits by itself mid-job (os._exit).
    let job = app
        .submit(json!({"task": "py_crash", "args": {}, "max_attempts": 1}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["type"], "crashed", "{done}");
    let job = app
        .submit(json!({"task": "py_crash", "args": {}, "max_attempts": 2}))
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    replaced(&app, &after, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_visible_while_the_job_runs() {
    let app = spawn_echo(1).await;
    let job = app
        .submit(json!({"task": "py_progress", "args": {"steps": 40, "ms": 100}}))
        .await;
    let id = id_of(&job);
    let running = app
        .wait_until(&id, 30, |j| {
            j["status"] == "running" && j["progress"].as_f64().unwrap_or(0.0) >= 0.2
        })
        .await;
    assert!(running["progress"].as_f64().unwrap() < 1.0, "{running}");
    let done = app.wait(&id, 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

/// Runs `offload serve` with one task program that must stop it at start; its exit status
/// and stderr.
async fn serve_must_fail(program: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["serve", "--bind", "127.0.0.1:0", "--process-workers", "1"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--task-program", program, "--task-program-workers", "1"])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the server stops by itself")
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_fails_its_handshake_stops_the_server_naming_it() {
    for (mode, says) in [
        ("garbage", "instead of a ready message"),
        ("protocol2", "speaks protocol 2"),
        (
            "taken",
            "declares task `noop`, which the built-in catalogue already has",
        ),
        (
            "greedy",
            "said concurrency 1000000000000000000; it must be 1 to 10000",
        ),
        (
            "cyclic",
            "task `loop`: args_schema: schema too deep or cyclic",
        ),
    ] {
        let program = bad(mode);
        let (status, stderr) = serve_must_fail(&program).await;
        assert!(!status.success(), "{mode}: {stderr}");
        assert!(
            stderr.contains(&program),
            "{mode} names the program: {stderr}"
        );
        assert!(stderr.contains(says), "{mode}: {stderr}");
    }
    // The same task name from two programs: the second is refused.
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(["serve", "--bind", "127.0.0.1:0", "--process-workers", "1"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--task-program-workers", "1"])
        .env("OFFLOAD_TASK_PROGRAMS", format!("{ECHO};cd / && {ECHO}"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the server stops by itself")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("which task program `{ECHO}` already has")),
        "{stderr}"
    );
}

/// A program that closes its stdout but goes on running can never say ready: the server
/// kills it and stops at start, naming it, at once (not after the start timeout, and without
/// hanging on a process that does not exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_closes_its_stdout_and_lives_on_stops_the_server() {
    let program = "exec 1>/dev/null && sleep 1000";
    let started = std::time::Instant::now();
    let (status, stderr) = serve_must_fail(program).await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(program), "names the program: {stderr}");
    assert!(
        stderr.contains("closed its stdout before it was ready"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// A worker that dies while a child it started keeps its stdout open is dead all the same:
/// its job fails as `crashed` and it is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_with_children_holding_its_stdout_counts_as_dead() {
    let app = spawn_echo(1).await;
    let before = program_pids(&app).await;
    let job = app
        .submit(json!({"task": "py_fork_crash", "args": {}, "max_attempts": 1}))
        .await;
    let done = app.wait(&id_of(&job), 20).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["type"], "crashed", "{done}");
    replaced(&app, &before, 1).await;
}

/// Attempt 2 of an io job never shares a worker with attempt 1 while attempt 1 is still
/// being cancelled (answers name only the job): here attempt 1 times out and answers late,
/// within its cancel grace; attempt 2 waits for that, and gets its own answer (it used to
/// take attempt 1's place in the worker's pending runs, and attempt 1's answer with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_shares_a_worker_with_its_attempt_being_cancelled() {
    let app = spawn_echo(1).await;
    let before = program_pids(&app).await;
    let job = app
        .submit(
            json!({"task": "py_io_deaf", "args": {"ms": 1500, "retry_ms": 100},
            "timeout_ms": 1000, "max_attempts": 2}),
        )
        .await;
    let done = app.wait(&id_of(&job), 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    assert_eq!(
        done["result"],
        json!({"slept_ms": 100, "pid": before[0], "attempt": 2}),
        "attempt 2's own answer"
    );
    assert_eq!(
        program_pids(&app).await,
        before,
        "the worker answered: kept"
    );
}

/// A first line past 1 MiB is not read into memory to its end: the handshake fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_whose_first_line_is_endless_stops_the_server() {
    let program = "head -c 3000000 /dev/zero | tr '\\0' x && sleep 1000";
    let (status, stderr) = serve_must_fail(program).await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(program), "names the program: {stderr}");
    assert!(
        stderr.contains("wrote a first line longer than 1 MiB"),
        "{stderr}"
    );
}

/// The stats' workers of task program `program`.
async fn workers_of(app: &TestApp, program: &str) -> Vec<Value> {
    let stats = app.get("/v1/stats").await.body;
    stats["executors"]["process"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["program"] == program)
        .cloned()
        .collect()
}

/// The server with task program `program`, `workers` workers of it.
async fn spawn_program(program: &str, workers: usize) -> TestApp {
    let program = program.to_string();
    spawn_with(move |s| {
        s.task_programs = vec![program];
        s.task_program_workers = workers;
    })
    .await
}

/// Workers are told apart by the server, not by the pid they say: a program in a pid
/// namespace says pid 1 for each of its workers, and still has all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_all_say_pid_1_are_all_kept() {
    let program = format!("{ECHO} --pid-1");
    let app = spawn_program(&program, 2).await;
    let workers = workers_of(&app, &program).await;
    assert_eq!(workers.len(), 2, "{workers:?}");
    // Both run at once: two cpu jobs of 1 s take about 1 s, not 2.
    let started = std::time::Instant::now();
    let jobs = futures_util::future::join_all(
        (0..2).map(|_| app.submit(json!({"task": "py_spin", "args": {"secs": 1}}))),
    )
    .await;
    for job in &jobs {
        let done = app.wait(&id_of(job), 30).await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}

/// A worker that declares the program's tasks in another order is one of its workers all the
/// same (it used to be refused, and started again forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_may_declare_their_tasks_in_any_order() {
    let program = format!("{ECHO} --reorder");
    let app = spawn_program(&program, 3).await;
    assert_eq!(workers_of(&app, &program).await.len(), 3);
}

/// When the server stops, its program workers' process groups go with it: a child a task
/// started does not outlive the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_children_do_not_outlive_the_server() {
    let mut server = Binary::start(&["--task-program", ECHO, "--task-program-workers", "1"]);
    let client = reqwest::Client::new();
    let job: Value = client
        .post(format!("{}/v1/jobs", server.base))
        .json(&json!({"task": "py_spawn", "args": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = id_of(&job);
    let mut child = None;
    for _ in 0..300 {
        let j: Value = client
            .get(format!("{}/v1/jobs/{id}", server.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if j["status"] == "succeeded" {
            child = j["result"]["child"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let child = child.expect("the job succeeds");
    assert!(alive(child));
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    for _ in 0..300 {
        if server.child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        server.child.try_wait().unwrap().is_some(),
        "the server stopped"
    );
    assert!(
        gone(child).await,
        "the task's child {child} outlived the server"
    );
}

/// A task program's task declared with `parent_results` gets `{parent id: result}` in its
/// `run` line; the others' lines carry no `parents`.
#[tokio::test]
async fn a_program_task_that_asks_gets_its_parents_results() {
    let app = spawn_echo(1).await;
    let tasks = app.get("/v1/tasks").await.body;
    let declared = |name: &str| {
        tasks["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap()["parent_results"]
            .clone()
    };
    assert_eq!(declared("py_parents"), true);
    assert_eq!(declared("py_sum_squares"), false);
    let a = app
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [
                {"task": "py_sum_squares", "args": {"n": 4}},
                {"task": "noop"},
                {"task": "py_parents", "depends_on": ["#0", "#1"]},
            ]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    let ids: Vec<String> = a.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    let job = app.wait(&ids[2], 30).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["parents"],
        json!({ ids[0].clone(): {"sum": 14}, ids[1].clone(): {} })
    );
}
