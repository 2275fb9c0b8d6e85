//! array_stats on a large f64 blob, three ways in one run: the process lane, the rayon lane,
//! and a plain single-threaded scan here in the benchmark (the memory-bandwidth baseline).
//!
//!   bench/arrays.sh             1 GiB (128 Mi f64), best of 3 each
//!   bench/arrays.sh --smoke     64 MiB, one run each (CI)
//!
//! It starts `target/release/offload` (built by the script) on a temp data dir and a free
//! loopback port, uploads the blob with curl, and reads each job's server-side `run_ms`.

// A benchmark prints its table.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use offload::shm::{Dtype, MappedBlob};
use offload::task::Partial;
use serde_json::{json, Value};

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (bytes, runs) = if smoke {
        (64usize << 20, 1)
    } else {
        (1usize << 30, 3)
    };
    let n = bytes / 8;
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("array.f64");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for i in 0..n {
            out.write_all(&(((i * 7919) % 100_003) as f64 * 0.25).to_le_bytes())
                .unwrap();
        }
    }
    let exe = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/offload");
    let mut server = Command::new(exe)
        .args(["serve", "--bind", "127.0.0.1:0", "--durability", "normal"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // Large enough that a plain array_stats goes to rayon; `isolate` picks the process lane.
        .args(["--process-threshold-bytes", &(u64::MAX / 2).to_string()])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .expect("target/release/offload exists (bench/arrays.sh builds it)");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("the server logs its address").unwrap();
        if let Some(pos) = line.find("127.0.0.1:") {
            let rest = &line[pos..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                .unwrap_or(rest.len());
            break format!("http://{}", &rest[..end]);
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let upload = Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "content-type: application/octet-stream",
            "-T",
        ])
        .arg(&file)
        .arg(format!("{base}/v1/blobs"))
        .output()
        .expect("curl runs");
    let blob: Value = serde_json::from_slice(&upload.stdout).expect("the upload answers JSON");
    let blob = blob["id"].as_str().expect("a blob id").to_string();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let run_job = |isolate: bool| -> (f64, Value) {
        rt.block_on(async {
            let job: Value = client
                .post(format!("{base}/v1/jobs"))
                .json(&json!({"task": "array_stats", "args": {"blob": blob}, "isolate": isolate}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let id = job["id"].as_str().unwrap().to_string();
            loop {
                let job: Value = client
                    .get(format!("{base}/v1/jobs/{id}?wait=60"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if job["status"] == "succeeded" {
                    return (job["timings"]["run_ms"].as_f64().unwrap(), job);
                }
                assert!(job["status"] != "failed", "{job}");
            }
        })
    };

    let mut process = Vec::new();
    let mut rayon = Vec::new();
    let mut scan = Vec::new();
    let mut executors = (String::new(), String::new());
    let mut results = Vec::new();
    for _ in 0..runs {
        let (ms, job) = run_job(true);
        executors.0 = job["executor"].as_str().unwrap().to_string();
        results.push(job["result"].clone());
        process.push(ms);
        let (ms, job) = run_job(false);
        executors.1 = job["executor"].as_str().unwrap().to_string();
        results.push(job["result"].clone());
        rayon.push(ms);
        let map = MappedBlob::open(&file).unwrap();
        let start = Instant::now();
        let mut total = Partial::EMPTY;
        let mut at = 0;
        while at < n {
            let end = (at + (1 << 20)).min(n);
            total = total.merge(Partial::of(map.bytes(), Dtype::F64, at, end));
            at = end;
        }
        scan.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(total.count as usize, n);
    }
    let stats = rt.block_on(async {
        client
            .get(format!("{base}/v1/stats"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    let workers = stats["executors"]["process"]["workers"]
        .as_array()
        .map_or(0, |w| w.len());
    let _ = server.kill();
    let _ = server.wait();
    for r in &results[1..] {
        assert_eq!(r["count"], results[0]["count"]);
        assert_eq!(r["max"], results[0]["max"]);
    }

    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (p, r, s) = (best(&process), best(&rayon), best(&scan));
    let gbs = |ms: f64| bytes as f64 / (ms / 1000.0) / 1e9;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    println!(
        "\narray_stats on a {} MiB f64 blob, best of {runs}, {cores} cores, {workers} workers",
        bytes >> 20
    );
    println!("| way | ms | GB/s | vs plain scan | vs rayon lane |");
    println!("|---|---|---|---|---|");
    println!(
        "| process lane ({}) | {p:.1} | {:.2} | {:.2}x faster | {:.2}x the time |",
        executors.0,
        gbs(p),
        s / p,
        p / r
    );
    println!(
        "| rayon lane ({}) | {r:.1} | {:.2} | {:.2}x faster | 1.00 |",
        executors.1,
        gbs(r),
        s / r
    );
    println!(
        "| plain scan, 1 thread | {s:.1} | {:.2} | 1.00 | {:.2}x the time |",
        gbs(s),
        s / r
    );
    std::thread::sleep(Duration::from_millis(10));
}
