#!/usr/bin/env bash
# Server CPU per request, from /proc: what one /healthz answer and one durable submit cost the
# server (user + system time of the server process over a closed-loop wrk run ÷ requests).
# A figure that does not drift with the machine's speed as much as a rate does.
#
#   bench/cpu_per_request.sh [BIN...]     default target/release/offload; several binaries are
#                                         measured one after the other, in one session
# Environment: DURATION (s per phase, default 10), CONNS (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-10}"
CONNS="${CONNS:-64}"
BINS=("$@")
[[ ${#BINS[@]} -gt 0 ]] || BINS=(target/release/offload)
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
TICK=$(getconf CLK_TCK)
LUA=$(mktemp --suffix .lua)
cat > "$LUA" <<'LUA'
wrk.method = "POST"
wrk.body = '{"task":"noop"}'
wrk.headers["Content-Type"] = "application/json"
LUA
SERVER=""
DATA=""
trap '[[ -z "$SERVER" ]] || kill "$SERVER" 2>/dev/null; rm -rf "$LUA" "$DATA"' EXIT

# CPU ticks (user + system) the process has used, all its threads.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "| binary | /healthz req/s | µs CPU per /healthz | durable submit req/s | µs CPU per submit | submit ÷ healthz CPU |"
echo "|---|---|---|---|---|---|"
for BIN in "${BINS[@]}"; do
  DATA=$(mktemp -d)
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  NO_COLOR=1 RUST_LOG=warn "$BIN" serve --bind "127.0.0.1:$PORT" --data-dir "$DATA" >/dev/null 2>&1 &
  SERVER=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
  wrk -t2 -c"$CONNS" -d2s "http://127.0.0.1:$PORT/healthz" >/dev/null   # warm up
  t0=$(ticks $SERVER)
  H=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$PORT/healthz" | awk '/requests in/ {print $1}')
  t1=$(ticks $SERVER)
  S=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" -s "$LUA" "http://127.0.0.1:$PORT/v1/jobs" | awk '/requests in/ {print $1}')
  t2=$(ticks $SERVER)
  python3 - "$BIN" "$H" "$S" "$((t1 - t0))" "$((t2 - t1))" "$TICK" "$DURATION" <<'PY'
import sys
b, h, s, th, ts, tick, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
uh = th / tick * 1e6 / h
us = ts / tick * 1e6 / s
print(f"| {b} | {h / d:,.0f} | {uh:.1f} | {s / d:,.0f} | {us:.1f} | {us / uh:.2f}x |")
PY
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=""
  rm -rf "$DATA"; DATA=""
done
