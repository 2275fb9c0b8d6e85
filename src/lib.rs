//! offload: an HTTP job service that runs each job in the lane that fits it.
//!
//! # Layout
//!
//! - [`config`]: settings from flags, environment and a TOML file, validated once.
//! - [`app`]: wiring: store, lanes, dispatcher, HTTP server; the shutdown order.
//! - [`datadir`]: the data dir's lock file: one server per data dir.
//! - [`api`]: axum handlers, the JSON body extractor, `ApiError` → problem+json.
//! - [`flow`]: flow control: concurrency keys, rate limits (token buckets), fair sharing
//!   between tenants; the policy both stores' claims follow.
//! - [`job`]: `Job`, `JobId`, the states, their allowed transitions, `next_state()`: the
//!   one place that decides what a job moves to after an attempt, and `after_parents()`: what
//!   a job with parents moves to.
//! - [`spec`]: a submitted spec parsed into a validated `NewJob` (the 422s live here).
//! - [`schedule`]: cron schedules: their timetable (cron expression, time zone, catch-up), and
//!   the ticker that makes one job per tick across every server on one database.
//! - [`task`]: the `Task` trait, the registry, and the built-in tasks.
//! - [`dispatch`]: the router (kind + task → lane, once), admission (over the whole store's
//!   queue), each lane's claim loop, attempts (timeouts, cancel), retries, leases and rescue,
//!   the servers list, blobs across servers, drain.
//! - [`executor`]: the lanes: `async` (tokio), `blocking` (spawn_blocking), `rayon`, and
//!   `process` (worker processes: re-executed from this binary, or task programs in any
//!   language, both speaking docs/worker-protocol.md).
//! - [`store`]: the `JobStore` trait (the store is the queue: one claim protocol with leases);
//!   SQLite (one writer, group commit) and PostgreSQL (several servers: SKIP LOCKED claims,
//!   a batcher for group commit of submits and finishes, LISTEN/NOTIFY, leases timed by the
//!   database's clock); `store::graph` and each backend's `graph.rs`: jobs that depend on
//!   jobs, moved in their parent's transaction.
//! - [`callback`]: completion callbacks: the signature (`Offload-Signature`), one delivery,
//!   and the retry policy for failed tries (the outbox lives in the store, the delivery task
//!   in the dispatcher).
//! - [`blob`]: blob files: streamed uploads, sha256, temp-file cleanup.
//! - [`shm`]: read-only shared mappings of blob files; the one module with `unsafe`.
//! - [`events`]: who waits on which job; wakes long-polls and event streams.
//! - [`schema`]: the small JSON Schema validator for task args and the OpenAPI tests.
//! - [`clock`]: timestamps as microseconds, shown as RFC 3339 (and the test-only clock offset).
//! - [`observe`]: Prometheus metrics, the runtime-lag watchdog, HTTP metrics.
//! - [`telemetry`]: logging setup.

pub mod api;
pub mod app;
pub mod blob;
pub mod callback;
pub mod clock;
pub mod config;
pub mod datadir;
pub mod dispatch;
pub mod events;
pub mod executor;
pub mod flow;
pub mod job;
pub mod observe;
pub mod schedule;
pub mod schema;
pub mod shm;
pub mod spec;
pub mod store;
pub mod task;
pub mod telemetry;

pub use app::App;
pub use config::Settings;
pub use task::{Registry, Task};
