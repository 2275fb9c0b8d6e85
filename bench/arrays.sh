#!/usr/bin/env bash
# array_stats on a 1 GiB f64 blob: process lane vs rayon lane vs a plain single-threaded scan.
#   bench/arrays.sh            full run (1 GiB, best of 3)
#   bench/arrays.sh --smoke    64 MiB, once (CI keeps it working)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo bench --quiet --bench arrays -- "$@"
