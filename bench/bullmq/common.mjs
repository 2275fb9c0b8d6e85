// Helpers shared by bench.mjs (BullMQ) and offload.mjs (offload): argument parsing, percentiles
// (the same rule as benches/load.rs) and the JSON line each script prints.

export function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

export function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  return sorted[Math.round((sorted.length - 1) * p)];
}

// Runs `send(i)` for i in [0, count) with `inFlight` of them outstanding at once.
export async function pool(count, inFlight, send) {
  let next = 0;
  const lanes = Array.from({ length: Math.min(inFlight, count) }, async () => {
    while (next < count) await send(next++);
  });
  await Promise.all(lanes);
}

export function summary(name, jobs, seconds, latencies) {
  latencies.sort((a, b) => a - b);
  return JSON.stringify({
    system: name,
    e2e_jobs: jobs,
    e2e_seconds: +seconds.toFixed(3),
    e2e_jobs_per_s: Math.round(jobs / seconds),
    rt_n: latencies.length,
    rt_p50_ms: +percentile(latencies, 0.5).toFixed(3),
    rt_p99_ms: +percentile(latencies, 0.99).toFixed(3),
  });
}
