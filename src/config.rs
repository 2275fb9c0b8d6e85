//! Settings: flags, environment variables and a TOML file, merged once into typed values.
//!
//! Precedence, highest first: a command-line flag, its `OFFLOAD_*` environment variable, the
//! TOML file named by `--config` / `OFFLOAD_CONFIG`, the built-in default. Every setting is
//! validated at start, and an error names the setting to fix.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::flow::TaskFlow;

/// How hard a commit tries to reach the disk before a submit is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every commit: acknowledged jobs survive a power cut (SQLite `synchronous=FULL`).
    Full,
    /// No fsync per commit: acknowledged jobs survive a crash of the server, not of the machine
    /// (SQLite `synchronous=NORMAL` in WAL mode).
    Normal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated settings the application runs with.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub bind: SocketAddr,
    /// The URL other servers reach this one at (for blobs uploaded here); default
    /// `http://<bound address>` unless bound to all interfaces.
    pub advertise_url: Option<String>,
    pub data_dir: PathBuf,
    /// `sqlite://...`; defaults to `<data_dir>/offload.db`.
    pub database_url: String,
    #[serde(serialize_with = "mask")]
    pub api_token: Option<String>,
    pub durability: Durability,
    pub log_format: LogFormat,
    /// Async jobs that may run at once.
    pub async_capacity: usize,
    /// Threads for blocking jobs (tokio's blocking pool, sized to this plus a margin).
    pub blocking_threads: usize,
    /// Threads in the rayon pool for cpu jobs, and the cores that cpu work may use at once,
    /// rayon and worker processes together.
    pub cpu_threads: usize,
    /// Worker processes in the process lane.
    pub process_workers: usize,
    /// A cpu job whose blob is at least this large runs in the process lane.
    pub process_threshold_bytes: u64,
    /// Replace a worker after this many jobs (0: never).
    pub worker_max_jobs: u64,
    /// Replace a worker whose resident size is over this after a job (0: never).
    pub worker_max_rss_bytes: u64,
    /// The binary workers are started from (`offload worker`); default: this executable.
    pub worker_exe: Option<PathBuf>,
    /// Task programs: shell commands (run as `sh -c <command>`) whose workers serve the tasks
    /// they declare (docs/worker-protocol.md).
    pub task_programs: Vec<String>,
    /// Worker processes per task program.
    pub task_program_workers: usize,
    /// Queued jobs per lane before a submit is answered 429.
    pub max_queued_per_lane: usize,
    pub max_body_bytes: usize,
    /// Largest blob upload, in bytes.
    pub max_blob_bytes: u64,
    pub default_max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub retention_secs: u64,
    /// How often finished jobs (and the blobs they were the last to use) are pruned.
    pub prune_interval_ms: u64,
    pub drain_timeout_ms: u64,
    /// With a shared (PostgreSQL) store: how long a running job's lease lasts without renewal
    /// before another server requeues it.
    pub lease_ms: u64,
    /// A runtime wake-up later than this is logged as a stall (a blocking call in async code).
    pub stall_warn_ms: u64,
    /// A schedule's tick not fired within this long of its time counts as missed, and follows
    /// the schedule's `catch_up` (src/schedule/).
    pub schedule_grace_ms: u64,
    pub http_allow_hosts: Vec<String>,
    pub http_allow_private: bool,
    pub http_max_bytes: u64,
    pub http_timeout_ms: u64,
    /// Tenants' weights in the round-robin of a lane's slots (a tenant not named weighs 1).
    pub tenant_weights: BTreeMap<String, u32>,
    /// Flow control defaults per task (`[task_flow.<task>]` in the config file).
    pub task_flow: BTreeMap<String, TaskFlow>,
    /// The secret completion callbacks are signed with (HMAC-SHA256); without one, specs with
    /// a `callback_url` are refused and no callbacks are sent.
    #[serde(serialize_with = "mask")]
    pub callback_secret: Option<String>,
    /// How long a callback is retried after its job became final before it is given up.
    pub callback_retry_secs: u64,
    /// The wait before a callback's second try; doubles each try (with jitter), up to an hour.
    pub callback_backoff_ms: u64,
    /// Time limit of one callback request.
    pub callback_timeout_ms: u64,
}

fn mask<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("********"),
        None => s.serialize_none(),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

impl Settings {
    /// The defaults, with the data dir (and the database in it) at `data_dir`.
    pub fn with_data_dir(data_dir: impl AsRef<Path>) -> Self {
        let data_dir = data_dir.as_ref().to_path_buf();
        Settings {
            bind: "127.0.0.1:8080".parse().expect("valid default address"),
            advertise_url: None,
            database_url: sqlite_url(&data_dir),
            data_dir,
            api_token: None,
            durability: Durability::Full,
            log_format: LogFormat::Text,
            async_capacity: 20_000,
            blocking_threads: 64,
            cpu_threads: cores(),
            process_workers: cores(),
            process_threshold_bytes: 64 << 20,
            worker_exe: None,
            task_programs: Vec::new(),
            task_program_workers: cores(),
            worker_max_jobs: 10_000,
            worker_max_rss_bytes: 1 << 30,
            max_queued_per_lane: 100_000,
            max_body_bytes: 8 << 20,
            max_blob_bytes: 4 << 30,
            default_max_attempts: 3,
            retry_base_ms: 1_000,
            retry_max_ms: 600_000,
            retention_secs: 7 * 24 * 3600,
            prune_interval_ms: 60_000,
            drain_timeout_ms: 10_000,
            lease_ms: 15_000,
            stall_warn_ms: 100,
            schedule_grace_ms: 10_000,
            http_allow_hosts: vec!["*".into()],
            http_allow_private: false,
            http_max_bytes: 10 << 20,
            http_timeout_ms: 30_000,
            tenant_weights: BTreeMap::new(),
            task_flow: BTreeMap::new(),
            callback_secret: None,
            callback_retry_secs: 24 * 3600,
            callback_backoff_ms: 1_000,
            callback_timeout_ms: 10_000,
        }
    }

    /// Merges flags and environment (already in `args`, by clap) over the TOML file over the
    /// defaults, then validates.
    pub fn load(args: &ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("config: cannot read {path:?}: {e}")))?;
                toml::from_str::<FileSettings>(&text)
                    .map_err(|e| ConfigError(format!("config file {path:?}: {e}")))?
            }
            None => FileSettings::default(),
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./offload-data"));
        let mut s = Settings::with_data_dir(&data_dir);
        macro_rules! pick {
            ($field:ident) => {
                if let Some(v) = args.$field.clone().or(file.$field) {
                    s.$field = v;
                }
            };
        }
        pick!(durability);
        pick!(log_format);
        pick!(async_capacity);
        pick!(blocking_threads);
        pick!(cpu_threads);
        pick!(process_workers);
        pick!(process_threshold_bytes);
        pick!(worker_max_jobs);
        pick!(worker_max_rss_bytes);
        if let Some(exe) = args.worker_exe.clone().or(file.worker_exe) {
            s.worker_exe = Some(exe);
        }
        if let Some(v) = args.task_programs.clone().or(file.task_programs) {
            // `a;b;` in the environment leaves an empty last entry: not a program.
            s.task_programs = v.into_iter().filter(|p| !p.trim().is_empty()).collect();
        }
        pick!(task_program_workers);
        pick!(max_queued_per_lane);
        pick!(max_body_bytes);
        pick!(max_blob_bytes);
        pick!(default_max_attempts);
        pick!(retry_base_ms);
        pick!(retry_max_ms);
        pick!(retention_secs);
        pick!(prune_interval_ms);
        pick!(drain_timeout_ms);
        pick!(lease_ms);
        pick!(stall_warn_ms);
        pick!(schedule_grace_ms);
        pick!(http_allow_private);
        pick!(http_max_bytes);
        pick!(http_timeout_ms);
        pick!(callback_retry_secs);
        pick!(callback_backoff_ms);
        pick!(callback_timeout_ms);
        if let Some(v) = args.http_allow_hosts.clone().or(file.http_allow_hosts) {
            s.http_allow_hosts = v;
        }
        match &args.tenant_weights {
            Some(flags) => {
                s.tenant_weights = BTreeMap::new();
                for flag in flags.iter().filter(|f| !f.trim().is_empty()) {
                    let (tenant, weight) = parse_weight(flag)?;
                    s.tenant_weights.insert(tenant, weight);
                }
            }
            None => s.tenant_weights = file.tenant_weights.unwrap_or_default(),
        }
        s.task_flow = file.task_flow.unwrap_or_default();
        if let Some(bind) = args.bind.clone().or(file.bind) {
            s.bind = bind.parse().map_err(|e| {
                ConfigError(format!(
                    "bind: `{bind}` is not an address like 127.0.0.1:8080: {e}"
                ))
            })?;
        }
        if let Some(url) = args.advertise_url.clone().or(file.advertise_url) {
            s.advertise_url = Some(url);
        }
        if let Some(url) = args.database_url.clone().or(file.database_url) {
            s.database_url = url;
        }
        s.api_token = args
            .api_token
            .clone()
            .or(file.api_token)
            .filter(|t| !t.is_empty());
        s.callback_secret = args
            .callback_secret
            .clone()
            .or(file.callback_secret)
            .filter(|t| !t.is_empty());
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("async-capacity", self.async_capacity as u64),
            ("blocking-threads", self.blocking_threads as u64),
            ("cpu-threads", self.cpu_threads as u64),
            ("process-workers", self.process_workers as u64),
            ("task-program-workers", self.task_program_workers as u64),
            ("max-queued-per-lane", self.max_queued_per_lane as u64),
            ("max-body-bytes", self.max_body_bytes as u64),
            ("max-blob-bytes", self.max_blob_bytes),
            ("default-max-attempts", self.default_max_attempts as u64),
            ("http-max-bytes", self.http_max_bytes),
            ("http-timeout-ms", self.http_timeout_ms),
            ("prune-interval-ms", self.prune_interval_ms),
            ("lease-ms", self.lease_ms),
            ("schedule-grace-ms", self.schedule_grace_ms),
            ("callback-retry-secs", self.callback_retry_secs),
            ("callback-backoff-ms", self.callback_backoff_ms),
            ("callback-timeout-ms", self.callback_timeout_ms),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError(format!("{name}: must be at least 1")));
            }
        }
        if self.default_max_attempts > 100 {
            return Err(ConfigError(
                "default-max-attempts: must be at most 100".into(),
            ));
        }
        if self.blocking_threads > 4096 {
            return Err(ConfigError("blocking-threads: must be at most 4096".into()));
        }
        for (i, p) in self.task_programs.iter().enumerate() {
            if p.trim().is_empty() {
                return Err(ConfigError("task-program: a command is empty".into()));
            }
            if self.task_programs[..i].contains(p) {
                return Err(ConfigError(format!("task-program: `{p}` is given twice")));
            }
        }
        if self.retry_max_ms < self.retry_base_ms {
            return Err(ConfigError(
                "retry-max-ms: must be at least retry-base-ms".into(),
            ));
        }
        for (tenant, weight) in &self.tenant_weights {
            if tenant.is_empty() || !(1..=crate::flow::MAX_WEIGHT).contains(weight) {
                return Err(ConfigError(format!(
                    "tenant-weight: `{tenant}={weight}`: give a tenant and a weight from 1 to {}",
                    crate::flow::MAX_WEIGHT
                )));
            }
        }
        for (task, flow) in &self.task_flow {
            flow.check()
                .map_err(|e| ConfigError(format!("task_flow.{task}: {e}")))?;
        }
        if !self.database_url.starts_with("sqlite:")
            && !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return Err(ConfigError(format!(
                "database-url: `{}` is not supported; use sqlite://path or postgres://user@host/db",
                self.database_url
            )));
        }
        Ok(())
    }
}

/// `tenant=weight`, as `--tenant-weight` takes it.
fn parse_weight(flag: &str) -> Result<(String, u32), ConfigError> {
    let bad = || {
        ConfigError(format!(
            "tenant-weight: `{flag}` is not `tenant=weight` with a weight from 1 to {}",
            crate::flow::MAX_WEIGHT
        ))
    };
    let (tenant, weight) = flag.rsplit_once('=').ok_or_else(bad)?;
    let weight: u32 = weight.trim().parse().map_err(|_| bad())?;
    if tenant.is_empty() || !(1..=crate::flow::MAX_WEIGHT).contains(&weight) {
        return Err(bad());
    }
    Ok((tenant.to_string(), weight))
}

pub fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("offload.db").display())
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The same settings as a TOML file may give them (keys in snake_case).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    bind: Option<String>,
    advertise_url: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    api_token: Option<String>,
    durability: Option<Durability>,
    log_format: Option<LogFormat>,
    async_capacity: Option<usize>,
    blocking_threads: Option<usize>,
    cpu_threads: Option<usize>,
    process_workers: Option<usize>,
    process_threshold_bytes: Option<u64>,
    worker_max_jobs: Option<u64>,
    worker_max_rss_bytes: Option<u64>,
    worker_exe: Option<PathBuf>,
    task_programs: Option<Vec<String>>,
    task_program_workers: Option<usize>,
    max_queued_per_lane: Option<usize>,
    max_body_bytes: Option<usize>,
    max_blob_bytes: Option<u64>,
    default_max_attempts: Option<u32>,
    retry_base_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    retention_secs: Option<u64>,
    prune_interval_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    lease_ms: Option<u64>,
    stall_warn_ms: Option<u64>,
    schedule_grace_ms: Option<u64>,
    http_allow_hosts: Option<Vec<String>>,
    http_allow_private: Option<bool>,
    http_max_bytes: Option<u64>,
    http_timeout_ms: Option<u64>,
    tenant_weights: Option<BTreeMap<String, u32>>,
    task_flow: Option<BTreeMap<String, TaskFlow>>,
    callback_secret: Option<String>,
    callback_retry_secs: Option<u64>,
    callback_backoff_ms: Option<u64>,
    callback_timeout_ms: Option<u64>,
}

/// offload: an HTTP job service that runs each job in the lane that fits it.
#[derive(Debug, Parser)]
#[command(name = "offload", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// Print the effective configuration (secrets masked) and exit.
    Config(ServeArgs),
    /// A worker process of the process lane (started by the server, not by hand).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        parent: u32,
    },
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "OFFLOAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "OFFLOAD_BIND")]
    pub bind: Option<String>,
    /// The URL other servers reach this one at, for blobs uploaded here [default: http://<bind>].
    #[arg(long, env = "OFFLOAD_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Folder for the SQLite database and files [default: ./offload-data].
    #[arg(long, env = "OFFLOAD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL [default: sqlite://<data-dir>/offload.db].
    #[arg(long, env = "OFFLOAD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Require `Authorization: Bearer <token>` on every request but /healthz and /readyz.
    #[arg(long, env = "OFFLOAD_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// full: fsync each commit (survives power loss); normal: survives a crash of the server only [default: full].
    #[arg(long, env = "OFFLOAD_DURABILITY")]
    pub durability: Option<Durability>,
    /// Log format [default: text].
    #[arg(long, env = "OFFLOAD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Async jobs running at once [default: 20000].
    #[arg(long, env = "OFFLOAD_ASYNC_CAPACITY")]
    pub async_capacity: Option<usize>,
    /// Threads for blocking io jobs [default: 64].
    #[arg(long, env = "OFFLOAD_BLOCKING_THREADS")]
    pub blocking_threads: Option<usize>,
    /// Rayon threads for cpu jobs, and the cores cpu work (rayon and worker processes together) may use at once [default: the number of cores].
    #[arg(long, env = "OFFLOAD_CPU_THREADS")]
    pub cpu_threads: Option<usize>,
    /// Worker processes for isolated and large-array cpu jobs [default: the number of cores].
    #[arg(long, env = "OFFLOAD_PROCESS_WORKERS")]
    pub process_workers: Option<usize>,
    /// A cpu job whose blob is at least this many bytes runs in a worker process [default: 67108864].
    #[arg(long, env = "OFFLOAD_PROCESS_THRESHOLD_BYTES")]
    pub process_threshold_bytes: Option<u64>,
    /// Replace a worker process after this many jobs; 0 never [default: 10000].
    #[arg(long, env = "OFFLOAD_WORKER_MAX_JOBS")]
    pub worker_max_jobs: Option<u64>,
    /// Replace a worker process whose resident size is over this many bytes after a job; 0 never [default: 1073741824].
    #[arg(long, env = "OFFLOAD_WORKER_MAX_RSS_BYTES")]
    pub worker_max_rss_bytes: Option<u64>,
    /// The binary worker processes run as `<exe> worker` [default: this executable].
    #[arg(long, env = "OFFLOAD_WORKER_EXE")]
    pub worker_exe: Option<PathBuf>,
    /// A task program: a shell command (run as `sh -c '<command>'`) whose workers speak the worker protocol and serve the tasks they declare. Repeat the flag for several programs; in OFFLOAD_TASK_PROGRAMS separate them with `;`.
    #[arg(
        long = "task-program",
        env = "OFFLOAD_TASK_PROGRAMS",
        value_delimiter = ';'
    )]
    pub task_programs: Option<Vec<String>>,
    /// Worker processes per task program [default: the number of cores].
    #[arg(long, env = "OFFLOAD_TASK_PROGRAM_WORKERS")]
    pub task_program_workers: Option<usize>,
    /// Queued jobs per lane before submits get 429 [default: 100000].
    #[arg(long, env = "OFFLOAD_MAX_QUEUED_PER_LANE")]
    pub max_queued_per_lane: Option<usize>,
    /// Largest JSON request body, in bytes [default: 8388608].
    #[arg(long, env = "OFFLOAD_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest blob upload, in bytes [default: 4294967296].
    #[arg(long, env = "OFFLOAD_MAX_BLOB_BYTES")]
    pub max_blob_bytes: Option<u64>,
    /// max_attempts of a job that does not give one [default: 3].
    #[arg(long, env = "OFFLOAD_DEFAULT_MAX_ATTEMPTS")]
    pub default_max_attempts: Option<u32>,
    /// First retry delay; doubles each attempt, with jitter [default: 1000].
    #[arg(long, env = "OFFLOAD_RETRY_BASE_MS")]
    pub retry_base_ms: Option<u64>,
    /// Longest retry delay [default: 600000].
    #[arg(long, env = "OFFLOAD_RETRY_MAX_MS")]
    pub retry_max_ms: Option<u64>,
    /// How long finished jobs are kept [default: 604800, 7 days].
    #[arg(long, env = "OFFLOAD_RETENTION_SECS")]
    pub retention_secs: Option<u64>,
    /// How often finished jobs past retention, and blobs no job needs, are pruned [default: 60000].
    #[arg(long, env = "OFFLOAD_PRUNE_INTERVAL_MS")]
    pub prune_interval_ms: Option<u64>,
    /// On shutdown, how long running jobs may take to finish [default: 10000].
    #[arg(long, env = "OFFLOAD_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    /// PostgreSQL: a running job's lease; another server requeues the job when it runs out [default: 15000].
    #[arg(long, env = "OFFLOAD_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Log a warning (and count a stall) when the runtime wakes a timer this much late [default: 100].
    #[arg(long, env = "OFFLOAD_STALL_WARN_MS")]
    pub stall_warn_ms: Option<u64>,
    /// A schedule's tick not fired within this long of its time was missed, and follows the
    /// schedule's catch_up [default: 10000].
    #[arg(long, env = "OFFLOAD_SCHEDULE_GRACE_MS")]
    pub schedule_grace_ms: Option<u64>,
    /// Hosts http_get may fetch, comma-separated; `*` is any, `*.example.com` a domain [default: *].
    #[arg(long, env = "OFFLOAD_HTTP_ALLOW_HOSTS", value_delimiter = ',')]
    pub http_allow_hosts: Option<Vec<String>>,
    /// Let http_get reach loopback and private addresses [default: false].
    #[arg(long, env = "OFFLOAD_HTTP_ALLOW_PRIVATE", num_args = 0..=1, default_missing_value = "true")]
    pub http_allow_private: Option<bool>,
    /// Largest response body http_get reads [default: 10485760].
    #[arg(long, env = "OFFLOAD_HTTP_MAX_BYTES")]
    pub http_max_bytes: Option<u64>,
    /// Time limit of one http_get request [default: 30000].
    #[arg(long, env = "OFFLOAD_HTTP_TIMEOUT_MS")]
    pub http_timeout_ms: Option<u64>,
    /// A tenant's weight in the round-robin of a lane's slots, as `tenant=weight` (1 to 1000; a tenant not named weighs 1). Repeat the flag for several; in OFFLOAD_TENANT_WEIGHTS separate them with `,`.
    #[arg(
        long = "tenant-weight",
        env = "OFFLOAD_TENANT_WEIGHTS",
        value_delimiter = ','
    )]
    pub tenant_weights: Option<Vec<String>>,
    /// Sign completion callbacks with this secret (HMAC-SHA256, the `Offload-Signature` header); without it, a spec's `callback_url` is refused (422).
    #[arg(long, env = "OFFLOAD_CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<String>,
    /// How long a completion callback is retried after its job finished [default: 86400, 24 hours].
    #[arg(long, env = "OFFLOAD_CALLBACK_RETRY_SECS")]
    pub callback_retry_secs: Option<u64>,
    /// Wait before a callback's second try; doubles each try, with jitter, up to an hour [default: 1000].
    #[arg(long, env = "OFFLOAD_CALLBACK_BACKOFF_MS")]
    pub callback_backoff_ms: Option<u64>,
    /// Time limit of one callback request [default: 10000].
    #[arg(long, env = "OFFLOAD_CALLBACK_TIMEOUT_MS")]
    pub callback_timeout_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "cpu_threads = 3\nretry_base_ms = 50\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            cpu_threads: Some(5),
            ..Default::default()
        };
        let s = Settings::load(&args).unwrap();
        assert_eq!(s.cpu_threads, 5);
        assert_eq!(s.retry_base_ms, 50);
        assert_eq!(s.default_max_attempts, 3);
    }

    #[test]
    fn a_bare_boolean_flag_means_true() {
        use clap::Parser;
        let cli = Cli::try_parse_from(["offload", "serve", "--http-allow-private"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert!(Settings::load(&args).unwrap().http_allow_private);
        let cli =
            Cli::try_parse_from(["offload", "serve", "--http-allow-private", "false"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert!(!Settings::load(&args).unwrap().http_allow_private);
    }

    #[test]
    fn task_programs_come_from_repeated_flags_a_separated_list_or_the_file() {
        use clap::Parser;
        let serve = |argv: &[&str]| {
            let cli = Cli::try_parse_from(argv).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!("serve")
            };
            Settings::load(&args).unwrap()
        };
        let s = serve(&[
            "offload",
            "serve",
            "--task-program",
            "python3 a.py",
            "--task-program",
            "cd b && node b.js",
            "--task-program-workers",
            "3",
        ]);
        assert_eq!(s.task_programs, ["python3 a.py", "cd b && node b.js"]);
        assert_eq!(s.task_program_workers, 3);
        // The environment variable's form: `;` between programs (an empty last one is
        // ignored).
        let s = serve(&[
            "offload",
            "serve",
            "--task-program",
            "python3 a.py;ruby b.rb;",
        ]);
        assert_eq!(s.task_programs, ["python3 a.py", "ruby b.rb"]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(
            &path,
            "task_programs = [\"python3 a.py\"]\ntask_program_workers = 2\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let s = Settings::load(&args).unwrap();
        assert_eq!(s.task_programs, ["python3 a.py"]);
        assert_eq!(s.task_program_workers, 2);

        let args = ServeArgs {
            task_programs: Some(vec!["python3 a.py".into(), "python3 a.py".into()]),
            ..Default::default()
        };
        let e = Settings::load(&args).unwrap_err();
        assert!(e.0.contains("task-program"), "{e}");
    }

    #[test]
    fn tenant_weights_and_task_flow_come_from_flags_or_the_file_and_are_checked() {
        use clap::Parser;
        let serve = |argv: &[&str]| {
            let cli = Cli::try_parse_from(argv).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!("serve")
            };
            Settings::load(&args)
        };
        let s = serve(&[
            "offload",
            "serve",
            "--tenant-weight",
            "a=3",
            "--tenant-weight",
            "b=c=2",
        ])
        .unwrap();
        assert_eq!(s.tenant_weights.get("a"), Some(&3));
        assert_eq!(s.tenant_weights.get("b=c"), Some(&2), "the last `=` splits");
        for bad in ["a", "a=0", "=2", "a=x", "a=1001"] {
            let e = serve(&["offload", "serve", "--tenant-weight", bad]).unwrap_err();
            assert!(e.0.contains("tenant-weight"), "{bad}: {e}");
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(
            &path,
            "tenant_weights = { big = 5 }\n[task_flow.sleep]\nconcurrency = { limit = 2 }\n\
             rate = { key = \"api\", per_second = 0.5 }\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let s = Settings::load(&args).unwrap();
        assert_eq!(s.tenant_weights.get("big"), Some(&5));
        let flow = &s.task_flow["sleep"];
        assert_eq!(
            flow.concurrency_for("sleep").unwrap(),
            crate::flow::Concurrency {
                key: "sleep".into(),
                limit: 2
            }
        );
        assert_eq!(flow.rate_for("sleep").unwrap().burst, 1);
        std::fs::write(&path, "[task_flow.sleep]\nrate = { per_second = 0 }\n").unwrap();
        let e = Settings::load(&args).unwrap_err();
        assert!(e.0.contains("task_flow.sleep"), "{e}");
    }

    #[test]
    fn callback_settings_come_from_flags_and_an_empty_secret_is_none() {
        use clap::Parser;
        let serve = |argv: &[&str]| {
            let cli = Cli::try_parse_from(argv).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!("serve")
            };
            Settings::load(&args)
        };
        let s = serve(&["offload", "serve"]).unwrap();
        assert_eq!(s.callback_secret, None);
        assert_eq!(s.callback_retry_secs, 86_400);
        let s = serve(&[
            "offload",
            "serve",
            "--callback-secret",
            "k",
            "--callback-retry-secs",
            "60",
            "--callback-backoff-ms",
            "10",
            "--callback-timeout-ms",
            "500",
        ])
        .unwrap();
        assert_eq!(s.callback_secret.as_deref(), Some("k"));
        assert_eq!(
            (
                s.callback_retry_secs,
                s.callback_backoff_ms,
                s.callback_timeout_ms
            ),
            (60, 10, 500)
        );
        // Masked where the configuration is printed.
        let shown = serde_json::to_string(&s).unwrap();
        assert!(!shown.contains("\"k\""), "{shown}");
        assert!(serve(&["offload", "serve", "--callback-secret", ""])
            .unwrap()
            .callback_secret
            .is_none());
        let e = serve(&["offload", "serve", "--callback-timeout-ms", "0"]).unwrap_err();
        assert!(e.0.contains("callback-timeout-ms"), "{e}");
    }

    #[test]
    fn errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offload.toml");
        std::fs::write(&path, "cpu_treads = 3\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert!(Settings::load(&args).unwrap_err().0.contains("cpu_treads"));
        let args = ServeArgs {
            cpu_threads: Some(0),
            ..Default::default()
        };
        assert!(Settings::load(&args).unwrap_err().0.contains("cpu-threads"));
    }
}
