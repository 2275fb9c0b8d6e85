// BullMQ on Redis, the two measures of issue 11 (bench/vs_bullmq.sh runs this after offload's):
//
//  (a) end to end: --jobs noop jobs added by Queue.addBulk of --batch (4 addBulk calls in flight,
//      as the offload client keeps 4 batches in flight), one Worker in one other process with
//      concurrency 100 whose processor returns at once; from the first add to the worker's
//      last 'completed' event.
//  (b) round trip: --round-trips sequential Queue.add + job.waitUntilFinished(queueEvents), after
//      10 uncounted warm-up ones; p50 / p99 ms.
//
// BullMQ's defaults otherwise (completed jobs are kept, as offload keeps finished jobs). Each
// measure uses a queue of its own named offload-bench-<pid>-<time>-{e2e,rt}; both are
// obliterated before and after, so only keys under bull:offload-bench-<...> are touched.
//
//   node bench.mjs [--jobs 100000] [--batch 1000] [--round-trips 1000] [--redis 127.0.0.1:6379]
// prints one JSON line on stdout.
import { fork } from 'node:child_process';
import { Queue, QueueEvents } from 'bullmq';
import { arg, pool, summary } from './common.mjs';

const [host, port] = arg('--redis', '127.0.0.1:6379').split(':');
const connection = { host, port: Number(port) };

// The worker process: `node bench.mjs --worker <queue> <count>`; one Worker, concurrency 100;
// tells the parent 'ready', then 'done' after <count> completions, then waits to be closed.
if (process.argv[2] === '--worker') {
  const { Worker } = await import('bullmq');
  const [name, count] = [process.argv[3], Number(process.argv[4])];
  const worker = new Worker(name, async () => null, { connection, concurrency: 100 });
  let completed = 0;
  worker.on('completed', () => {
    if (++completed === count) process.send('done');
  });
  worker.on('failed', (job, err) => {
    console.error('job failed:', err);
    process.exit(1);
  });
  // If the parent goes (killed, or failed), so does this process.
  process.on('disconnect', () => process.exit(1));
  await worker.waitUntilReady();
  process.on('message', async (m) => {
    if (m === 'close') {
      await worker.close();
      process.exit(0);
    }
  });
  process.send('ready');
} else {
  await main();
}

function startWorker(name, count) {
  const child = fork(new URL(import.meta.url).pathname, ['--worker', name, String(count)], {
    env: process.env,
  });
  const next = (what) =>
    new Promise((resolve, reject) => {
      const onMsg = (m) => m === what && (child.off('message', onMsg), resolve());
      child.on('message', onMsg);
      child.once('exit', (code) => reject(new Error(`worker exited with ${code} before '${what}'`)));
    });
  return { child, ready: next('ready'), done: next('done') };
}

async function stopWorker(w) {
  const exited = new Promise((resolve) => w.child.once('exit', resolve));
  w.child.send('close');
  await exited;
}

async function main() {
  const jobs = Number(arg('--jobs', 100000));
  const batch = Number(arg('--batch', 1000));
  const roundTrips = Number(arg('--round-trips', 1000));
  const warmup = 10;
  const base = `offload-bench-${process.pid}-${Date.now()}`;
  // Stopped early (bench/vs_bullmq.sh's trap, Ctrl-C): remove this run's queues before going.
  const open = new Set();
  for (const sig of ['SIGINT', 'SIGTERM']) {
    process.once(sig, async () => {
      for (const q of open) await q.obliterate({ force: true }).catch(() => {});
      process.exit(130);
    });
  }

  // (a) end to end.
  const e2eQueue = new Queue(`${base}-e2e`, { connection });
  open.add(e2eQueue);
  await e2eQueue.obliterate({ force: true });
  const w = startWorker(`${base}-e2e`, jobs);
  await w.ready;
  const data = Array.from({ length: batch }, () => ({ name: 'noop', data: {} }));
  const t0 = performance.now();
  await pool(Math.ceil(jobs / batch), 4, async (i) => {
    const n = Math.min(batch, jobs - i * batch);
    await e2eQueue.addBulk(n === batch ? data : data.slice(0, n));
  });
  await w.done;
  const seconds = (performance.now() - t0) / 1000;
  await stopWorker(w);
  const counts = await e2eQueue.getJobCounts('completed', 'failed', 'wait', 'active');
  if (counts.completed !== jobs) throw new Error(`completed ${JSON.stringify(counts)}, not ${jobs}`);
  await e2eQueue.obliterate({ force: true });
  open.delete(e2eQueue);
  await e2eQueue.close();

  // (b) round trip.
  const rtName = `${base}-rt`;
  const rtQueue = new Queue(rtName, { connection });
  open.add(rtQueue);
  await rtQueue.obliterate({ force: true });
  const queueEvents = new QueueEvents(rtName, { connection });
  await queueEvents.waitUntilReady();
  const rw = startWorker(rtName, warmup + roundTrips);
  await rw.ready;
  const latencies = [];
  for (let i = 0; i < warmup + roundTrips; i++) {
    const t = performance.now();
    const job = await rtQueue.add('noop', {});
    await job.waitUntilFinished(queueEvents, 5000);
    if (i >= warmup) latencies.push(performance.now() - t);
  }
  await rw.done;
  await stopWorker(rw);
  await queueEvents.close();
  await rtQueue.obliterate({ force: true });
  open.delete(rtQueue);
  await rtQueue.close();

  console.log(summary('bullmq', jobs, seconds, latencies));
}
