// offload, the same two measures as bench.mjs measures on BullMQ, from a Node client (node:http,
// keep-alive), so that both sides have the same kind of client:
//
//  (a) end to end: --jobs noop jobs by POST /v1/jobs/batch of --batch, 4 batches in flight, until
//      GET /v1/stats (polled every 5 ms) shows them all succeeded and nothing queued or running.
//  (b) round trip: --round-trips sequential POST /v1/jobs then GET /v1/jobs/{id}?wait=5 (again
//      while not final), after 10 uncounted warm-up ones; p50 / p99 ms.
//
//   node offload.mjs --base http://127.0.0.1:PORT [--jobs 100000] [--batch 1000] [--round-trips 1000]
// prints one JSON line on stdout.
import http from 'node:http';
import { arg, pool, summary } from './common.mjs';

const base = new URL(arg('--base', 'http://127.0.0.1:8080'));
const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });

function request(method, path, body) {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const req = http.request(
      {
        agent,
        host: base.hostname,
        port: base.port,
        method,
        path,
        headers: payload ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } : {},
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          if (res.statusCode >= 300) reject(new Error(`${method} ${path}: ${res.statusCode} ${text}`));
          else resolve(JSON.parse(text));
        });
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

const FINAL = new Set(['succeeded', 'failed', 'cancelled']);

// Succeeded so far over all lanes, and whether any lane has queued or running jobs.
async function stats() {
  const s = await request('GET', '/v1/stats');
  let succeeded = 0;
  let busy = false;
  for (const lane of Object.values(s.executors)) {
    succeeded += lane.succeeded;
    busy ||= lane.queued > 0 || lane.running > 0;
  }
  return { succeeded, busy };
}

async function settle() {
  for (;;) {
    const s = await stats();
    if (!s.busy) return s.succeeded;
    await new Promise((r) => setTimeout(r, 5));
  }
}

const jobs = Number(arg('--jobs', 100000));
const batch = Number(arg('--batch', 1000));
const roundTrips = Number(arg('--round-trips', 1000));
const warmup = 10;

// (a) end to end.
const before = await settle();
const spec = { task: 'noop' };
const t0 = performance.now();
await pool(Math.ceil(jobs / batch), 4, async (i) => {
  const n = Math.min(batch, jobs - i * batch);
  await request('POST', '/v1/jobs/batch', { jobs: Array(n).fill(spec) });
});
for (;;) {
  const s = await stats();
  if (!s.busy && s.succeeded - before >= jobs) break;
  await new Promise((r) => setTimeout(r, 5));
}
const seconds = (performance.now() - t0) / 1000;
const done = (await settle()) - before;
if (done !== jobs) throw new Error(`succeeded ${done}, not ${jobs}`);

// (b) round trip.
const latencies = [];
for (let i = 0; i < warmup + roundTrips; i++) {
  const t = performance.now();
  const { id } = await request('POST', '/v1/jobs', spec);
  let job;
  do job = await request('GET', `/v1/jobs/${id}?wait=5`);
  while (!FINAL.has(job.status));
  if (job.status !== 'succeeded') throw new Error(`job ${id}: ${job.status}`);
  if (i >= warmup) latencies.push(performance.now() - t);
}

console.log(summary('offload', jobs, seconds, latencies));
agent.destroy();
