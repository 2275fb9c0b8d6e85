#!/usr/bin/env bash
# The load benchmark: what a user pointing an HTTP load generator at offload would measure.
#
#   bench/run.sh            full run (10 s per load phase, 100,000 jobs end to end); writes
#                           the table into BENCHMARKS.md
#   bench/run.sh --smoke    a few seconds per phase, prints only (CI runs this)
#
# SQLite and PostgreSQL are measured one after the other in one run and printed side by side,
# each rate with the server's CPU per request (µs, from /proc) beside it.
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
# Both stores, one after the other in one run, printed side by side. DBS=sqlite (or postgres)
# runs one. PostgreSQL: PG_URL names the server's database, created anew for each run
# (default: the machine's PostgreSQL, database offload_bench); SERVERS=3 starts two more
# servers on it (the load goes to the first one's port, the work to whichever claims it).
PG_URL="${PG_URL:-postgres://postgres@127.0.0.1:5432/offload_bench}"
if [[ -z "${DBS:-}" ]]; then
  DBS="sqlite"
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || psql "${PG_URL%/*}/postgres" -c 'select 1' >/dev/null 2>&1; then
    DBS="sqlite postgres"
  else
    echo "PostgreSQL not reachable: measuring SQLite only" >&2
  fi
fi
CONNS=64
# The store is chosen per measurement, never by the environment.
unset OFFLOAD_DATABASE_URL

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
TICK=$(getconf CLK_TCK)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# CPU ticks (user + system) a process has used, all its threads.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# µs of CPU per request: ticks used, requests answered.
per_req() { python3 -c "import sys; print('%.1f' % ($1 / $TICK * 1e6 / max($2, 1)))"; }
rate() { awk '/Requests\/sec/ {print int($2)}'; }
total() { awk '/requests in/ {print $1}'; }
non2xx() { awk '/Non-2xx/ {print $5}' | grep . || echo 0; }

LUA=$(mktemp --suffix .lua)
cat > "$LUA" <<'LUA'
wrk.method = "POST"
wrk.body = '{"task":"noop"}'
wrk.headers["Content-Type"] = "application/json"
LUA
OUT=$(mktemp -d)
PIDS=()
DIRS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "${DIRS[@]}" "$LUA" "$OUT"' EXIT

# Measures one store; writes "measure<TAB>value" rows to $OUT/<db>.rows.
measure() {
  local db=$1 url servers=1
  if [[ $db == postgres ]]; then
    psql -q "${PG_URL%/*}/postgres" -c "DROP DATABASE IF EXISTS ${PG_URL##*/}" -c "CREATE DATABASE ${PG_URL##*/}" >/dev/null
    url=$PG_URL
    servers=${SERVERS:-1}
  fi
  local data port base server peers="" rows="$OUT/$db.rows"
  data=$(mktemp -d); DIRS+=("$data")
  port=$(free_port); base="http://127.0.0.1:$port"
  NO_COLOR=1 RUST_LOG=warn "${SERVER_PIN[@]}" ./target/release/offload serve --bind "127.0.0.1:$port" \
    --data-dir "$data" --durability "$DURABILITY" ${url:+--database-url "$url"} &
  server=$!; PIDS+=("$server")
  for _ in $(seq 100); do curl -sf "$base/healthz" >/dev/null && break; sleep 0.1; done
  for _ in $(seq 2 "$servers"); do
    local p d
    p=$(free_port); d=$(mktemp -d); DIRS+=("$d")
    NO_COLOR=1 RUST_LOG=warn "${SERVER_PIN[@]}" ./target/release/offload serve --bind "127.0.0.1:$p" \
      --data-dir "$d" --durability "$DURABILITY" --database-url "$url" >/dev/null &
    PIDS+=($!)
    peers="$peers,http://127.0.0.1:$p"
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/healthz" >/dev/null && break; sleep 0.1; done
  done

  # Waits until no job is queued or running.
  settle() {
    python3 - "$base" <<'PY'
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
      -m POST -H 'content-type: application/json' -d '{"task":"noop"}' "$base/v1/jobs" |
      python3 -c '
import json, sys
r = json.load(sys.stdin)
p = r["latencyPercentiles"]
codes = r.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if not k.startswith("2"))
print("%.2f %.2f %d %d" % (p["p50"] * 1000, p["p99"] * 1000, bad, r["summary"]["requestsPerSec"]))'
  }

  local t0 t1 t2 hout sout health submit bad
  t0=$(ticks "$server")
  hout=$("${LOAD_PIN[@]}" wrk -t2 -c$CONNS -d${DURATION}s "$base/healthz")
  t1=$(ticks "$server")
  sout=$("${LOAD_PIN[@]}" wrk -t2 -c$CONNS -d${DURATION}s -s "$LUA" "$base/v1/jobs")
  t2=$(ticks "$server")
  health=$(echo "$hout" | rate)
  submit=$(echo "$sout" | rate)
  bad=$(echo "$sout" | non2xx)
  local hcpu scpu
  hcpu=$(per_req $((t1 - t0)) "$(echo "$hout" | total)")
  scpu=$(per_req $((t2 - t1)) "$(echo "$sout" | total)")
  {
    printf '1. ceiling: GET /healthz, requests/s (server µs CPU per request)\t%s (%s)\n' "$health" "$hcpu"
    printf '2. durable submit POST /v1/jobs noop, max requests/s (server µs CPU per request)\t%s (%s)\n' "$submit" "$scpu"
    printf '2. durable submit ÷ healthz: rate / CPU per request\t%s / %s, non-2xx: %s\n' \
      "$(python3 -c "print('%.2fx' % ($submit / $health))")" "$(python3 -c "print('%.2fx' % ($scpu / $hcpu))")" "$bad"
  } >"$rows"
  settle
  local p50 p99 b rps
  read -r p50 p99 b rps <<<"$(fixed_rate $((submit / 2)))"
  printf '2. submit at 50%% of max (oha, latency-corrected): p50 / p99 ms, non-2xx\t%s / %s, %s (%s/s)\n' "$p50" "$p99" "$b" "$rps" >>"$rows"
  settle
  read -r p50 p99 b rps <<<"$(fixed_rate $((submit * 9 / 10)))"
  printf '2. submit at 90%% of max: p50 / p99 ms, non-2xx\t%s / %s, %s (%s/s)\n' "$p50" "$p99" "$b" "$rps" >>"$rows"
  settle
  cargo bench --quiet --bench load -- --base "$base" --pid "$server" --peers "${peers#,}" $SMOKE |
    sed -n 's/^| \(.*\) | \(.*\) |$/\1\t\2/p' >>"$rows"
  kill "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
}

for db in $DBS; do
  echo "measuring $db..." >&2
  measure "$db"
done

# Side by side: one column per store, and PostgreSQL's rates as a share of SQLite's.
ROWS=$(python3 - "$OUT" $DBS <<'PY'
import os, re, sys
out, dbs = sys.argv[1], sys.argv[2:]
cols = {db: [l.rstrip("\n").split("\t", 1) for l in open(os.path.join(out, db + ".rows"))] for db in dbs}
first = cols[dbs[0]]
head = "| measure | " + " | ".join(dbs) + (" | postgres ÷ sqlite |" if len(dbs) == 2 else " |")
print(head)
print("|---" * (len(dbs) + 1 + (len(dbs) == 2)) + "|")
num = lambda v: float(re.match(r"[\d.]+", v).group()) if re.match(r"[\d.]+", v) else None
for i, (label, _) in enumerate(first):
    vals = [cols[db][i][1] if i < len(cols[db]) else "" for db in dbs]
    ratio = ""
    if len(dbs) == 2 and ("/s" in label) and num(vals[0]) and num(vals[1]) is not None:
        ratio = "%.2f" % (num(vals[1]) / num(vals[0]))
    print("| " + label + " | " + " | ".join(vals) + (" | " + ratio + " |" if len(dbs) == 2 else " |"))
PY
)

TABLE=$(cat <<EOT
$(date -u +%Y-%m-%d), $(nproc) cores, stores: ${DBS// / then }, PostgreSQL servers=${SERVERS:-1}, durability=$DURABILITY, ${DURATION} s per load phase, $CONNS connections, $([[ "${PIN:-0}" == 1 ]] && echo "server pinned to CPU 0 and load to CPU 1" || echo "server and load generators not pinned")$([[ -n "$SMOKE" ]] && echo ", SMOKE RUN (not for figures)")

$ROWS
EOT
)
echo
echo "$TABLE"

if [[ -z "$SMOKE" ]]; then
  python3 - "$TABLE" "$DURABILITY" "$DBS" "${SERVERS:-1}" <<'PY'
import sys, re
table, durability, dbs, servers = sys.argv[1:5]
key = f"{dbs.replace(' ', '+')} durability={durability} servers={servers}"
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
