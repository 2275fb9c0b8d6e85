#!/usr/bin/env bash
# The load benchmark: what a user pointing an HTTP load generator at offload would measure.
#
#   bench/run.sh            full run (10 s per load phase, 100,000 jobs end to end); writes
#                           the table into BENCHMARKS.md
#   bench/run.sh --smoke    a few seconds per phase, prints only (CI runs this)
#
# Environment: OFFLOAD_DURABILITY=full|normal (default full), PIN=1 to pin the server to
# CPU 0 and the load generators to CPU 1 (steadier, but each side gets one core).
#
# Tools: wrk (Debian package) for the closed-loop ceilings, oha (crates.io) for latency at a
# fixed request rate with latency correction; both are installed when missing. Everything
# is on loopback and every phase is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
DURATION=10
if [[ "${1:-}" == "--smoke" ]]; then
  SMOKE="--smoke"
  DURATION=2
fi
DURABILITY="${OFFLOAD_DURABILITY:-full}"
# OFFLOAD_DATABASE_URL=postgres://... runs the server on PostgreSQL instead of SQLite.
DB=sqlite
[[ "${OFFLOAD_DATABASE_URL:-}" == postgres* ]] && DB=postgres
CONNS=64

if ! command -v wrk >/dev/null; then
  echo "installing wrk..." >&2
  (apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null))
fi
if ! command -v oha >/dev/null && [[ ! -x "$HOME/.cargo/bin/oha" ]]; then
  echo "installing oha (cargo install, a few minutes once)..." >&2
  cargo install oha --locked --quiet
fi
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")

cargo build --release --quiet
cargo bench --quiet --bench load --no-run 2>/dev/null

SERVER_PIN=()
LOAD_PIN=()
if [[ "${PIN:-0}" == "1" ]]; then
  SERVER_PIN=(taskset -c 0)
  LOAD_PIN=(taskset -c 1)
fi

DATA=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
NO_COLOR=1 RUST_LOG=warn "${SERVER_PIN[@]}" ./target/release/offload serve --bind "127.0.0.1:$PORT" \
  --data-dir "$DATA" --durability "$DURABILITY" &
SERVER=$!
# SERVERS=3 (PostgreSQL only): two more servers on the same database share the jobs; the load
# goes to the first one's HTTP port, the work to whichever server claims it.
EXTRA=()
PEERS=""
for _ in $(seq 2 "${SERVERS:-1}"); do
  [[ "$DB" == postgres ]] || { echo "SERVERS>1 needs OFFLOAD_DATABASE_URL=postgres://..." >&2; exit 2; }
  P=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  NO_COLOR=1 RUST_LOG=warn "${SERVER_PIN[@]}" ./target/release/offload serve --bind "127.0.0.1:$P" \
    --data-dir "$(mktemp -d)" --durability "$DURABILITY" >/dev/null &
  EXTRA+=($!)
  PEERS="$PEERS,http://127.0.0.1:$P"
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$P/healthz" >/dev/null && break; sleep 0.1; done
done
LUA=$(mktemp --suffix .lua)
trap 'kill $SERVER "${EXTRA[@]}" 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$DATA" "$LUA"' EXIT
for _ in $(seq 100); do curl -sf "$BASE/healthz" >/dev/null && break; sleep 0.1; done

cat > "$LUA" <<'LUA'
wrk.method = "POST"
wrk.body = '{"task":"noop"}'
wrk.headers["Content-Type"] = "application/json"
LUA

rate() { awk '/Requests\/sec/ {print int($2)}'; }
non2xx() { awk '/Non-2xx/ {print $5}' | grep . || echo 0; }

# Waits until no job is queued or running.
settle() {
  python3 - "$BASE" <<'PY'
import json, sys, time, urllib.request
while True:
    s = json.load(urllib.request.urlopen(sys.argv[1] + "/v1/stats"))["executors"]
    if all(l["queued"] == 0 and l["running"] == 0 for l in s.values()):
        break
    time.sleep(0.05)
PY
}

# oha at a fixed rate: prints "p50_ms p99_ms non2xx achieved_rps".
fixed_rate() {
  "${LOAD_PIN[@]}" "$OHA" -z "${DURATION}s" -q "$1" --latency-correction -c $CONNS --no-tui --output-format json \
    -m POST -H 'content-type: application/json' -d '{"task":"noop"}' "$BASE/v1/jobs" |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
p = r["latencyPercentiles"]
codes = r.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if not k.startswith("2"))
print("%.2f %.2f %d %d" % (p["p50"] * 1000, p["p99"] * 1000, bad, r["summary"]["requestsPerSec"]))'
}

HEALTH=$("${LOAD_PIN[@]}" wrk -t2 -c$CONNS -d${DURATION}s "$BASE/healthz" | rate)
SUBMIT_OUT=$("${LOAD_PIN[@]}" wrk -t2 -c$CONNS -d${DURATION}s -s "$LUA" "$BASE/v1/jobs")
SUBMIT=$(echo "$SUBMIT_OUT" | rate)
SUBMIT_BAD=$(echo "$SUBMIT_OUT" | non2xx)
settle
read -r P50_50 P99_50 BAD_50 RPS_50 <<<"$(fixed_rate $((SUBMIT / 2)))"
settle
read -r P50_90 P99_90 BAD_90 RPS_90 <<<"$(fixed_rate $((SUBMIT * 9 / 10)))"
settle

REST=$(cargo bench --quiet --bench load -- --base "$BASE" --pid "$SERVER" --peers "${PEERS#,}" $SMOKE)

TABLE=$(cat <<EOT
$(date -u +%Y-%m-%d), $(nproc) cores, database=$DB, servers=${SERVERS:-1}, durability=$DURABILITY, ${DURATION} s per load phase, $CONNS connections, $([[ "${PIN:-0}" == 1 ]] && echo "server pinned to CPU 0 and load to CPU 1" || echo "server and load generators not pinned")$([[ -n "$SMOKE" ]] && echo ", SMOKE RUN (not for figures)")

| measure | value |
|---|---|
| 1. ceiling: GET /healthz, requests/s (wrk, closed loop) | $HEALTH |
| 2. durable submit POST /v1/jobs noop, max requests/s (wrk, closed loop) | $SUBMIT ($(python3 -c "print('%.2f' % ($SUBMIT / $HEALTH))") x healthz), non-2xx: $SUBMIT_BAD |
| 2. submit at 50% of max ($((SUBMIT / 2))/s, oha, latency-corrected): p50 / p99 ms, non-2xx | $P50_50 / $P99_50, $BAD_50 (achieved $RPS_50/s) |
| 2. submit at 90% of max ($((SUBMIT * 9 / 10))/s): p50 / p99 ms, non-2xx | $P50_90 / $P99_90, $BAD_90 (achieved $RPS_90/s) |
$REST
EOT
)
echo
echo "$TABLE"

if [[ -z "$SMOKE" ]]; then
  python3 - "$TABLE" "$DURABILITY" "$DB" "${SERVERS:-1}" <<'PY'
import sys, re
table, durability, db = sys.argv[1], sys.argv[2], sys.argv[3]
servers = sys.argv[4]
key = f"durability={durability}" if db == "sqlite" else f"database=postgres servers={servers}"
path = "BENCHMARKS.md"
text = open(path).read()
begin = f"<!-- bench/run.sh {key}:begin -->"
end = f"<!-- bench/run.sh {key}:end -->"
block = f"{begin}\n{table}\n{end}"
if begin in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: block, text, flags=re.S)
else:
    text += f"\n### {key}\n\n{block}\n"
open(path, "w").write(text)
PY
  echo "(written to BENCHMARKS.md)"
fi
