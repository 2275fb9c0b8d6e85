#!/usr/bin/env bash
# Throughput of noop jobs through the HTTP API, against the bare /healthz rate in the same run.
#
#   bench/noop.sh            full run (10 s per wrk phase, 100,000 jobs end to end)
#   bench/noop.sh --smoke    a few seconds in all (CI keeps the script working)
#
# Builds the release binary, starts it on a temp data dir and a free loopback port, and
# drives it with wrk (installed from Debian's packages when missing). Prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=10s
TOTAL=100000
CONNS=64
if [[ "${1:-}" == "--smoke" ]]; then
  DURATION=2s
  TOTAL=5000
fi

if ! command -v wrk >/dev/null; then
  echo "installing wrk..." >&2
  (apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null))
fi

cargo build --release --quiet
DATA=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
DURABILITY="${OFFLOAD_DURABILITY:-full}"
NO_COLOR=1 RUST_LOG=warn ./target/release/offload serve --bind "127.0.0.1:$PORT" \
  --data-dir "$DATA" --durability "$DURABILITY" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do curl -sf "$BASE/healthz" >/dev/null && break; sleep 0.1; done

LUA=$(mktemp --suffix .lua)
cat > "$LUA" <<'LUA'
wrk.method = "POST"
wrk.body = '{"task":"noop"}'
wrk.headers["Content-Type"] = "application/json"
LUA

rate() { awk '/Requests\/sec/ {print $2}'; }
non2xx() { awk '/Non-2xx/ {print $5}' | grep . || echo 0; }
latency() { awk '/^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {print p50" / "p99}'; }

# Waits until no job is queued or running; prints the total succeeded so far.
settle() {
  python3 - "$BASE" <<'PY'
import json, sys, time, urllib.request
base = sys.argv[1]
while True:
    s = json.load(urllib.request.urlopen(base + "/v1/stats"))["executors"]
    if all(l["queued"] == 0 and l["running"] == 0 for l in s.values()):
        print(sum(l["succeeded"] for l in s.values()))
        break
    time.sleep(0.05)
PY
}

HEALTH=$(wrk -t2 -c$CONNS -d$DURATION --latency "$BASE/healthz")
SUBMIT=$(wrk -t2 -c$CONNS -d$DURATION --latency -s "$LUA" "$BASE/v1/jobs")
BEFORE=$(settle)

BATCH=$(mktemp)
python3 -c 'import json; print(json.dumps({"jobs": [{"task": "noop"}] * 1000}))' > "$BATCH"
START=$(date +%s.%N)
seq $((TOTAL / 1000)) | xargs -P 8 -I{} curl -sf -o /dev/null -X POST "$BASE/v1/jobs/batch" \
  -H 'content-type: application/json' --data-binary @"$BATCH"
AFTER=$(settle)
END=$(date +%s.%N)
DONE=$((AFTER - BEFORE))

H=$(echo "$HEALTH" | rate)
S=$(echo "$SUBMIT" | rate)
E2E=$(python3 -c "print(round($DONE / ($END - $START)))")
printf '\n| measure (%s cores, durability=%s, %s per phase) | value |\n|---|---|\n' "$(nproc)" "$DURABILITY" "$DURATION"
printf '| GET /healthz, requests/s (%s connections) | %s |\n' "$CONNS" "$H"
printf '| POST /v1/jobs noop, requests/s | %s (%.2f x healthz) |\n' "$S" "$(python3 -c "print($S/$H)")"
printf '| POST /v1/jobs latency p50 / p99 (closed loop) | %s |\n' "$(echo "$SUBMIT" | latency)"
printf '| POST /v1/jobs non-2xx answers | %s |\n' "$(echo "$SUBMIT" | non2xx)"
printf '| end to end: %s noop jobs by batch until final, jobs/s | %s |\n' "$DONE" "$E2E"
if [[ "$DONE" -lt "$TOTAL" ]]; then
  echo "error: only $DONE of $TOTAL batch jobs succeeded" >&2
  exit 1
fi
