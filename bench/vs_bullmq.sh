#!/usr/bin/env bash
# offload against BullMQ (Redis), in one session, one after the other (issue 11):
#
#   bench/vs_bullmq.sh          100,000 noop jobs end to end, 1,000 round trips, each side
#   bench/vs_bullmq.sh --smoke  10,000 jobs, 200 round trips (not for figures)
#
# offload: the release binary on SQLite, durability full, a temp data dir, a free port; jobs by
# POST /v1/jobs/batch of 1,000 (4 in flight) until /v1/stats shows them all succeeded; round
# trips of POST /v1/jobs then GET /v1/jobs/{id}?wait=5. BullMQ: jobs by Queue.addBulk of 1,000
# (4 in flight), one Worker in one process with concurrency 100 whose processor returns at once;
# round trips of Queue.add + job.waitUntilFinished(queueEvents). Both clients are Node scripts
# under bench/bullmq/ (offload.mjs, bench.mjs); the BullMQ queues are fresh ones, obliterated
# before and after, so nothing else in Redis is touched. Prints one markdown table.
#
# Environment: OFFLOAD_BIN (default: cargo build --release, then ./target/release/offload),
# REDIS (default 127.0.0.1:6379). Needs node and npm (BullMQ is installed by `npm ci`).
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS=100000
RTS=1000
SMOKE=""
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE=1
  JOBS=10000
  RTS=200
fi
REDIS="${REDIS:-127.0.0.1:6379}"

if [[ -n "${OFFLOAD_BIN:-}" ]]; then
  BIN="$OFFLOAD_BIN"
else
  cargo build --release --quiet
  BIN=./target/release/offload
fi
command -v node >/dev/null || { echo "node is needed (apt-get install -y nodejs npm)" >&2; exit 2; }
[[ -d bench/bullmq/node_modules ]] || (cd bench/bullmq && npm ci --no-audit --no-fund >&2)
redis-cli -h "${REDIS%:*}" -p "${REDIS#*:}" ping >/dev/null || { echo "no Redis at $REDIS" >&2; exit 2; }

DATA=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
SERVER=""
CLIENT=""
OUT=$(mktemp)
cleanup() {
  for p in $CLIENT $SERVER; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$DATA" "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A client runs in the background and is waited for, so that a signal stops the run at once.
client() {
  node "$@" >"$OUT" &
  CLIENT=$!
  wait $CLIENT
  CLIENT=""
}
NO_COLOR=1 RUST_LOG=warn "$BIN" serve --bind "127.0.0.1:$PORT" --data-dir "$DATA" --durability full >&2 &
SERVER=$!
for _ in $(seq 100); do curl -sf "$BASE/healthz" >/dev/null && break; sleep 0.1; done
curl -sf "$BASE/healthz" >/dev/null || { echo "offload did not start" >&2; exit 1; }

echo "offload: $JOBS jobs end to end, $RTS round trips..." >&2
client bench/bullmq/offload.mjs --base "$BASE" --jobs "$JOBS" --round-trips "$RTS"
OFFLOAD=$(cat "$OUT")
# The server is stopped before BullMQ runs, so the two never share the cores.
kill $SERVER
wait $SERVER 2>/dev/null || true
SERVER=""

echo "BullMQ: $JOBS jobs end to end, $RTS round trips..." >&2
client bench/bullmq/bench.mjs --redis "$REDIS" --jobs "$JOBS" --round-trips "$RTS"
BULLMQ=$(cat "$OUT")

REDIS_INFO=$(redis-cli -h "${REDIS%:*}" -p "${REDIS#*:}" info server | tr -d '\r' | awk -F: '/^redis_version/ {print $2}')
REDIS_SAVE=$(redis-cli -h "${REDIS%:*}" -p "${REDIS#*:}" config get save | tr -d '\r' | sed -n 2p)
REDIS_AOF=$(redis-cli -h "${REDIS%:*}" -p "${REDIS#*:}" config get appendonly | tr -d '\r' | sed -n 2p)
BULLMQ_V=$(node -p 'require("./bench/bullmq/node_modules/bullmq/package.json").version')
IOREDIS_V=$(node -p 'require("./bench/bullmq/node_modules/ioredis/package.json").version')

python3 - "$OFFLOAD" "$BULLMQ" <<PY
import json, sys
o, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
e2e = o["e2e_jobs_per_s"] / b["e2e_jobs_per_s"]
p50 = b["rt_p50_ms"] / o["rt_p50_ms"]
p99 = b["rt_p99_ms"] / o["rt_p99_ms"]
def goal(ok): return "met" if ok else "**missed**"
print(f"""$(date -u +%Y-%m-%d), $(nproc) cores, node $(node --version), Redis $REDIS_INFO (save '$REDIS_SAVE', appendonly $REDIS_AOF), BullMQ $BULLMQ_V (ioredis $IOREDIS_V), $("$BIN" --version) on SQLite with durability full$([[ -n "$SMOKE" ]] && echo ", SMOKE RUN (not for figures)")

| measure | offload | BullMQ | ratio | goal |
|---|---|---|---|---|
| end to end, {o['e2e_jobs']:,} noop jobs (offload: POST /v1/jobs/batch of 1,000; BullMQ: addBulk of 1,000, one worker process, concurrency 100; 4 batches in flight each), jobs/s | {o['e2e_jobs_per_s']:,} ({o['e2e_seconds']} s) | {b['e2e_jobs_per_s']:,} ({b['e2e_seconds']} s) | offload ÷ BullMQ = {e2e:.2f} | ≥ 2: {goal(e2e >= 2)} |
| round trip, {o['rt_n']:,} in sequence (offload: POST /v1/jobs + GET ?wait=5; BullMQ: add + waitUntilFinished), p50 ms | {o['rt_p50_ms']:.3f} | {b['rt_p50_ms']:.3f} | BullMQ ÷ offload = {p50:.2f} | ≥ 1: {goal(p50 >= 1)} |
| round trip, p99 ms | {o['rt_p99_ms']:.3f} | {b['rt_p99_ms']:.3f} | BullMQ ÷ offload = {p99:.2f} | |""")
PY
