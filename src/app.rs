//! Wiring: the store, the lanes, the dispatcher and the HTTP server, and the order they stop in.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::blob::BlobDir;
use crate::config::Settings;
use crate::datadir::{DataDirLock, LockError};
use crate::dispatch::{DispatchOptions, Dispatcher, RetryPolicy};
use crate::events::Events;
use crate::executor::process::{LaneSpec, ProgramError, Recycle};
use crate::executor::{AsyncLane, BlockingLane, Executor, ProcessLane, RayonLane};
use crate::store::{JobStore, PostgresStore, SqliteStore, StoreError};
use crate::task::{Registry, Task};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Another server holds the data dir (or it cannot be locked).
    #[error(transparent)]
    DataDirLock(#[from] LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rayon pool: {0}")]
    Rayon(#[from] rayon::ThreadPoolBuildError),
    #[error("cannot start worker processes: {0}")]
    Workers(std::io::Error),
    /// The process lane could not start (a task program that cannot serve, named).
    #[error(transparent)]
    Lane(#[from] ProgramError),
    /// A task program declares a task the catalogue already has.
    #[error("task program `{program}` declares task `{task}`, which {owner} already has")]
    TaskTaken {
        program: String,
        task: String,
        owner: String,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
    /// The config gives flow control defaults for a task the server does not have.
    #[error("task_flow.{0}: no task has this name")]
    UnknownTask(String),
}

/// The file of a `sqlite:` database URL (not an in-memory one).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// Whether `dir` is the data dir (comparing real paths where both exist).
fn same_dir(dir: Option<&std::path::Path>, data_dir: &std::path::Path) -> bool {
    let Some(dir) = dir else { return false };
    let dir = if dir.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        dir
    };
    match (dir.canonicalize(), data_dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => dir == data_dir,
    }
}

/// A built application: the database is open, recovery has run, the lanes are started and the
/// port is bound. [`App::run`] serves until the shutdown future resolves.
pub struct App {
    listener: TcpListener,
    state: AppState,
    /// Held until [`App::run`] returns (or the process ends): one server per data dir, and per
    /// SQLite file where that lives elsewhere.
    _lock: (DataDirLock, Option<DataDirLock>),
}

impl App {
    pub async fn build(settings: Settings, mut registry: Registry) -> Result<App, AppError> {
        for dir in [settings.data_dir.clone(), settings.data_dir.join("files")] {
            std::fs::create_dir_all(&dir).map_err(|source| AppError::DataDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        // Before anything reads or writes the database or the blobs: a second server on this
        // data dir stops here, having touched nothing.
        let lock = DataDirLock::acquire(&settings.data_dir)?;
        let db_lock = match sqlite_file(&settings.database_url) {
            Some(file) if !same_dir(file.parent(), &settings.data_dir) => {
                Some(DataDirLock::acquire_sqlite(&file)?)
            }
            _ => None,
        };
        crate::observe::install();
        let blobs =
            BlobDir::open(settings.data_dir.join("blobs")).map_err(|source| AppError::DataDir {
                path: settings.data_dir.join("blobs").display().to_string(),
                source,
            })?;
        let weights = settings.tenant_weights.clone();
        let store: Arc<dyn JobStore> = if settings.database_url.starts_with("sqlite:") {
            Arc::new(
                SqliteStore::open(&settings.database_url, settings.durability)
                    .await?
                    .with_tenant_weights(weights),
            )
        } else {
            Arc::new(
                PostgresStore::open(&settings.database_url, None)
                    .await?
                    .with_tenant_weights(weights),
            )
        };
        let worker_exe = match &settings.worker_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().map_err(AppError::Workers)?,
        };
        // One core budget for all cpu work, rayon and worker processes together.
        let cpu_budget = Arc::new(tokio::sync::Semaphore::new(settings.cpu_threads));
        let process = ProcessLane::start(
            LaneSpec {
                exe: worker_exe,
                data_dir: settings.data_dir.clone(),
                workers: settings.process_workers,
                recycle: Recycle {
                    max_jobs: settings.worker_max_jobs,
                    max_rss_bytes: settings.worker_max_rss_bytes,
                },
                programs: settings.task_programs.clone(),
                program_workers: settings.task_program_workers,
            },
            cpu_budget.clone(),
        )
        .await?;
        // The programs' tasks join the catalogue; a name can be had only once.
        for task in process.program_tasks() {
            let (program, name) = (
                task.program().unwrap_or_default().to_string(),
                task.name().to_string(),
            );
            if let Err(there) = registry.try_register(task) {
                return Err(AppError::TaskTaken {
                    program,
                    task: name,
                    owner: there
                        .program()
                        .map_or("the built-in catalogue".into(), |p| {
                            format!("task program `{p}`")
                        }),
                });
            }
        }
        // Flow defaults name tasks: each must be one the server has.
        if let Some(task) = settings
            .task_flow
            .keys()
            .find(|t| registry.get(t).is_none())
        {
            return Err(AppError::UnknownTask(task.clone()));
        }
        let executors: Vec<Arc<dyn Executor>> = vec![
            Arc::new(AsyncLane::new(settings.async_capacity)),
            Arc::new(BlockingLane::new(settings.blocking_threads)),
            Arc::new(RayonLane::new(settings.cpu_threads, cpu_budget)?),
            Arc::new(process),
        ];
        // Bound before the lanes start, so the servers list has this server's address from
        // its first heartbeat; nothing is served until `run`.
        let listener = TcpListener::bind(settings.bind)
            .await
            .map_err(|source| AppError::Bind {
                addr: settings.bind,
                source,
            })?;
        // How other servers reach this one for blobs uploaded here.
        let origin = settings.advertise_url.clone().or_else(|| {
            let addr = listener.local_addr().ok()?;
            (!addr.ip().is_unspecified()).then(|| format!("http://{addr}"))
        });
        let dispatcher = Dispatcher::new(
            store,
            Arc::new(registry),
            Arc::new(Events::new()),
            executors,
            DispatchOptions {
                retry: RetryPolicy {
                    base: Duration::from_millis(settings.retry_base_ms),
                    max: Duration::from_millis(settings.retry_max_ms),
                },
                max_queued: settings.max_queued_per_lane,
                blobs: Some(blobs.clone()),
                lease: Duration::from_millis(settings.lease_ms),
                api_token: settings.api_token.clone(),
                address: origin.clone(),
                callbacks: crate::callback::CallbackOptions::from_settings(&settings),
            },
        );
        dispatcher.start().await?;
        Ok(App {
            _lock: (lock, db_lock),
            listener,
            state: AppState {
                origin,
                dispatcher,
                health: Arc::default(),
                blobs,
                task_flow: Arc::new(settings.task_flow.clone()),
                settings: Arc::new(settings),
                started: Instant::now(),
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then: refuses new jobs (503), lets running ones finish
    /// up to the drain timeout, requeues the rest, ends long-polls and event streams, and
    /// closes the server.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let App {
            listener,
            state,
            _lock: lock,
        } = self;
        let addr = listener.local_addr().map_err(AppError::Serve)?;
        tracing::info!(%addr, data_dir = %state.settings.data_dir.display(), "offload is listening");
        if state.settings.api_token.is_none() {
            if addr.ip().is_loopback() {
                tracing::info!(
                    "no API token set: serving loopback only; set --api-token to expose it"
                );
            } else {
                tracing::warn!(%addr, "no API token set and not bound to loopback: anyone who can reach this port can run jobs");
            }
        }

        let dispatcher = state.dispatcher.clone();
        let retention = Duration::from_secs(state.settings.retention_secs);
        let prune_every = Duration::from_millis(state.settings.prune_interval_ms);
        let pruner = tokio::spawn(async move {
            let mut tick = tokio::time::interval(prune_every);
            loop {
                tick.tick().await;
                match dispatcher.prune(retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(pruned = n, "removed finished jobs past retention"),
                    Err(e) => tracing::warn!(error = %e, "pruning failed"),
                }
            }
        });

        // The schedules' ticker: it stops by itself when the drain starts.
        let ticker = tokio::spawn(
            crate::schedule::ticker::Ticker::new(
                state.dispatcher.clone(),
                state.spec_defaults(),
                Duration::from_millis(state.settings.schedule_grace_ms),
            )
            .run(),
        );

        let watchdog = {
            let dispatcher = state.dispatcher.clone();
            let threshold = Duration::from_millis(state.settings.stall_warn_ms);
            tokio::spawn(crate::observe::watchdog(
                state.health.clone(),
                threshold,
                move || dispatcher.running_async(),
            ))
        };

        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let dispatcher = state.dispatcher.clone();
        let drain_timeout = Duration::from_millis(state.settings.drain_timeout_ms);
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!(
                timeout_ms = drain_timeout.as_millis() as u64,
                "shutting down: draining running jobs"
            );
            dispatcher.drain(drain_timeout).await;
            dispatcher.shutdown_lanes();
            dispatcher.events().close();
            let _ = stopped_tx.send(());
        });

        let result = axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async {
                let _ = stopped_rx.await;
            })
            .await
            .map_err(AppError::Serve);
        pruner.abort();
        ticker.abort();
        watchdog.abort();
        tracing::info!("offload stopped");
        drop(lock);
        result
    }
}
