#!/usr/bin/env bash
# Python task programs against what the user would do instead (ProcessPoolExecutor, one
# process, asyncio.gather). Prints a markdown table; bench/python_bench.py measures.
#
#   bench/python.sh             full run: count_primes × 8, 8 reductions of a 1 GiB array,
#                               1,000 sleeps of 0.5 s on one worker
#   bench/python.sh --smoke     the same, small (256 MiB array, 200 sleeps): for CI
#   bench/python.sh --scaling   the cpu and NumPy items (16 jobs, 256 MiB) for N = 1 2 4 8 16
#
# Environment: OFFLOAD_BIN (default target/release/offload; nothing is built), WORKERS (N,
# default the core count), PYTHON (default python3; needs NumPy), SCALING_NS (the N of
# --scaling, default "1 2 4 8 16"). The offload package comes
# from python/ through PYTHONPATH: no pip, no network.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-full}"
case "$MODE" in full | --smoke | --scaling) ;; *)
  echo "usage: bench/python.sh [--smoke | --scaling]" >&2; exit 2 ;;
esac
BIN="${OFFLOAD_BIN:-target/release/offload}"
PY="${PYTHON:-python3}"
CORES=$(nproc)
WORKERS="${WORKERS:-$CORES}"
[[ -x "$BIN" ]] || { echo "no offload binary at $BIN (set OFFLOAD_BIN)" >&2; exit 2; }
"$BIN" serve --help | grep -q -- --task-program ||
  { echo "$BIN has no --task-program: too old" >&2; exit 2; }
"$PY" -c 'import numpy' || { echo "$PY has no NumPy (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

TMP=$(mktemp -d)
SERVER=""
BENCH=""
stop_server() {
  [[ -n "$SERVER" ]] || return 0
  kill "$SERVER" 2>/dev/null || true
  # The server stops its workers on SIGTERM; past 15 s it is killed.
  for _ in $(seq 150); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}
trap '[[ -z "$BENCH" ]] || kill "$BENCH" 2>/dev/null; stop_server; rm -rf "$TMP"' EXIT
trap 'exit 130' INT TERM

# start_server N IO_CONCURRENCY: a server on a free loopback port and a fresh data dir,
# serving bench/python_tasks.py with N workers; sets URL.
start_server() {
  local port data
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  data=$(mktemp -d -p "$TMP")
  URL="http://127.0.0.1:$port"
  NO_COLOR=1 RUST_LOG=warn "$BIN" serve --bind "127.0.0.1:$port" --data-dir "$data" \
    --task-program "env OFFLOAD_IO_CONCURRENCY=$2 $PY bench/python_tasks.py" \
    --task-program-workers "$1" --cpu-threads "$1" \
    >>"$TMP/server.log" 2>&1 &
  SERVER=$!
  # Ready once the task program's N workers are up (a warm pool), within 60 s.
  if ! "$PY" bench/python_bench.py ready --url "$URL" --workers "$1" --pid "$SERVER" --timeout 60; then
    echo "the server did not get ready; its log:" >&2; tail -30 "$TMP/server.log" >&2; exit 1
  fi
}

# In the background, and waited for: bash runs a trap only once the foreground command is
# done, and a wait is cut short by a signal, so a TERM stops the run at once.
bench() {
  "$PY" bench/python_bench.py run --url "$URL" --out "$TMP/results.jsonl" "$@" &
  BENCH=$!
  wait "$BENCH"
  BENCH=""
}

case "$MODE" in
  full | --smoke)
    if [[ "$MODE" == --smoke ]]; then SIZE=(--mib 256 --io-jobs 200); else SIZE=(); fi
    start_server "$WORKERS" 1
    bench --workers "$WORKERS" --items cpu,numpy "${SIZE[@]}"
    stop_server
    start_server 1 1000
    bench --workers 1 --items io "${SIZE[@]}"
    stop_server
    "$PY" bench/python_bench.py table "$TMP/results.jsonl"
    ;;
  --scaling)
    for n in ${SCALING_NS:-1 2 4 8 16}; do
      echo "N = $n" >&2
      start_server "$n" 1
      bench --workers "$n" --items cpu,numpy --jobs 16 --mib 256
      stop_server
    done
    "$PY" bench/python_bench.py table --scaling "$TMP/results.jsonl"
    ;;
esac
echo >&2
echo "$CORES cores, $(date -u +%Y-%m-%d), $("$PY" --version), NumPy $("$PY" -c 'import numpy; print(numpy.__version__)'), $BIN" >&2
