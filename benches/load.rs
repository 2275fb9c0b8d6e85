//! The parts of `bench/run.sh` that a load generator cannot do alone: end to end by batch,
//! sequential round trips, the CPU speedup against a plain rayon loop, 10,000 concurrent
//! sleeps, and isolation under mixed load. Prints markdown table rows.
//!
//!   cargo bench --bench load -- --base http://127.0.0.1:PORT --pid PID [--smoke]

// A benchmark prints its table.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use offload::job::JobId;
use offload::task::{sum_squares, JobCtx};
use rayon::prelude::*;
use serde_json::{json, Value};

struct Env {
    base: String,
    /// Other servers sharing the database (their stats count too).
    peers: Vec<String>,
    pid: u32,
    client: reqwest::Client,
    smoke: bool,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// CPU time (user + system) process `pid` has used, in µs (from `/proc/<pid>/stat`).
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) end at its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz * 1e6
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

impl Env {
    async fn post(&self, path: &str, body: &Value) -> Value {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn wait(&self, id: &str) -> Value {
        loop {
            let j = self.get(&format!("/v1/jobs/{id}?wait=30")).await;
            if matches!(
                j["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return j;
            }
        }
    }

    /// The stats of every server (this one and its peers).
    async fn all_stats(&self) -> Vec<Value> {
        let mut out = vec![self.get("/v1/stats").await];
        for peer in &self.peers {
            let s = self
                .client
                .get(format!("{peer}/v1/stats"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            out.push(s);
        }
        out
    }

    /// Jobs succeeded so far, all lanes, all servers.
    async fn settle_count(&self) -> u64 {
        self.all_stats()
            .await
            .iter()
            .flat_map(|s| {
                s["executors"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|l| l["succeeded"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Waits until no lane of any server has queued or running jobs; returns the succeeded
    /// total. (On a shared store a server's `queued` is only what it is claiming, so this also
    /// waits for the succeeded total to stop moving.)
    async fn settle(&self) -> u64 {
        let mut last = u64::MAX;
        loop {
            let stats = self.all_stats().await;
            let idle = stats.iter().all(|s| {
                s["executors"]
                    .as_object()
                    .unwrap()
                    .values()
                    .all(|l| l["queued"] == 0 && l["running"] == 0)
            });
            let done: u64 = stats
                .iter()
                .flat_map(|s| {
                    s["executors"]
                        .as_object()
                        .unwrap()
                        .values()
                        .map(|l| l["succeeded"].as_u64().unwrap())
                        .collect::<Vec<_>>()
                })
                .sum();
            if idle && (self.peers.is_empty() || done == last) {
                return done;
            }
            last = done;
            tokio::time::sleep(Duration::from_millis(if self.peers.is_empty() {
                5
            } else {
                100
            }))
            .await;
        }
    }

    async fn batch(&self, specs: Vec<Value>) -> Vec<String> {
        let r = self.post("/v1/jobs/batch", &json!({ "jobs": specs })).await;
        r["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Submit-then-wait round trips in sequence; sorted latencies in ms.
    async fn round_trips(&self, n: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let job = self.post("/v1/jobs", &json!({"task": "noop"})).await;
            let id = job["id"].as_str().unwrap().to_string();
            let done = self.wait(&id).await;
            assert_eq!(done["status"], "succeeded");
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        out.sort_by(f64::total_cmp);
        out
    }
}

#[tokio::main]
async fn main() {
    let env = Env {
        base: arg("--base").expect("--base http://host:port"),
        peers: arg("--peers")
            .map(|p| {
                p.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
        pid: arg("--pid")
            .and_then(|p| p.parse().ok())
            .expect("--pid of the server"),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap(),
        smoke: std::env::args().any(|a| a == "--smoke"),
    };
    let s = env.smoke;

    // 3. End to end: noop jobs by batch until every one is final.
    let total: usize = if s { 10_000 } else { 100_000 };
    let before = env.settle().await;
    let cpu0 = cpu_us(env.pid);
    let t = Instant::now();
    let mut sends = Vec::new();
    let batches = total / 1000;
    for sender in 0..8 {
        let env = &env;
        sends.push(async move {
            for _ in (sender..batches).step_by(8) {
                env.batch(vec![json!({"task": "noop"}); 1000]).await;
            }
        });
    }
    futures_util::future::join_all(sends).await;
    let done = env.settle().await - before;
    let e2e = done as f64 / t.elapsed().as_secs_f64();
    let per_job = (cpu_us(env.pid) - cpu0) / done.max(1) as f64;
    println!(
        "| end to end: {done} noop jobs by batch until final, jobs/s (server µs CPU per job) | {e2e:.0} ({per_job:.1}) |"
    );

    // 4. Round trip on an idle server.
    let idle = env.round_trips(if s { 200 } else { 1000 }).await;
    println!(
        "| round trip (submit, then ?wait until final), {} in sequence, p50 / p99 ms | {:.3} / {:.3} |",
        idle.len(),
        percentile(&idle, 0.5),
        percentile(&idle, 0.99)
    );

    // 5. CPU: 8 x sum_squares through the rayon lane, against a plain rayon loop, both
    //    against one thread computing them serially.
    let n: u64 = if s { 10_000_000 } else { 100_000_000 };
    let ctx = JobCtx::new(JobId::new(), 1);
    let t = Instant::now();
    for _ in 0..8 {
        std::hint::black_box(sum_squares(n, &ctx).unwrap());
    }
    let serial = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let sums: Vec<u128> = (0..8)
        .into_par_iter()
        .map(|_| sum_squares(n, &ctx).unwrap())
        .collect();
    let plain = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let ids = env
        .batch(vec![json!({"task": "sum_squares", "args": {"n": n}}); 8])
        .await;
    for id in &ids {
        let j = env.wait(id).await;
        assert_eq!(j["result"]["sum"], sums[0].to_string());
    }
    let service = t.elapsed().as_secs_f64();
    println!(
        "| CPU: 8 x sum_squares n={n}: serial / plain rayon loop / service, s | {serial:.3} / {plain:.3} / {service:.3} |"
    );
    println!(
        "| CPU speedup over serial: plain rayon loop / service (service ÷ plain) | {:.2}x / {:.2}x ({:.2}) |",
        serial / plain,
        serial / service,
        (serial / service) / (serial / plain)
    );

    // 6. I/O: 10,000 concurrent 1-second sleeps.
    let count = if s { 2_000 } else { 10_000 };
    let rss_before = rss_kib(env.pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampler = {
        let (peak, pid) = (peak.clone(), env.pid);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let t = Instant::now();
    let mut sends = Vec::new();
    for _ in 0..count / 1000 {
        let env = &env;
        sends.push(async move {
            env.batch(vec![json!({"task": "sleep", "args": {"ms": 1000}}); 1000])
                .await
        });
    }
    let before = env.settle_count().await;
    let ids: Vec<String> = futures_util::future::join_all(sends)
        .await
        .into_iter()
        .flatten()
        .collect();
    // The last result: when the server's lanes have none of them left (polled every 5 ms).
    env.settle().await;
    let wall = t.elapsed().as_secs_f64();
    let succeeded = env.settle_count().await - before;
    assert_eq!(succeeded as usize, ids.len(), "every sleep succeeded");
    sampler.abort();
    println!(
        "| I/O: {count} concurrent sleep 1000 ms, first submit to last result, s | {wall:.3} |"
    );
    println!(
        "| I/O: server resident size before / peak during, MiB | {:.1} / {:.1} |",
        rss_before as f64 / 1024.0,
        peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    );

    // 7. Isolation: noop round trips while blocking and cpu work keep the other lanes full.
    let hogs = env
        .batch(vec![
            json!({"task": "sum_squares", "args": {"n": 1_000_000_000_000u64}});
            8
        ])
        .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (stop, client, base) = (stop.clone(), env.client.clone(), env.base.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let specs = vec![json!({"task": "blocking_sleep", "args": {"ms": 100}}); 200];
                let _ = client
                    .post(format!("{base}/v1/jobs/batch"))
                    .json(&json!({"jobs": specs}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let loaded = env.round_trips(if s { 200 } else { 1000 }).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = feeder.await;
    for id in &hogs {
        let _ = env
            .client
            .post(format!("{}/v1/jobs/{id}/cancel", env.base))
            .send()
            .await;
    }
    env.settle().await;
    println!(
        "| isolation: noop round trip p99 with 200 blocking_sleep + 8 cpu jobs running / idle, ms | {:.3} / {:.3} ({:.2}x) |",
        percentile(&loaded, 0.99),
        percentile(&idle, 0.99),
        percentile(&loaded, 0.99) / percentile(&idle, 0.99)
    );
}
