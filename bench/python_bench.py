"""Python task programs against what the user would do instead; bench/python.sh drives it.

    python_bench.py run --url URL --workers N --items cpu,numpy[,io] --out FILE [options]
    python_bench.py table FILE [--scaling]

`run` measures against a server already serving bench/python_tasks.py and appends one JSON
line per item to FILE; `table` prints the lines as a markdown table. The items:

- cpu: count_primes(n) x jobs through offload (a batch submitted at once, wall time to the
  last result) against ProcessPoolExecutor(N) mapping the same calls (pool start included,
  as a script would do it) and the calls one after another in this process.
- numpy: a float64 array of size MiB; offload gets it once as a blob (upload timed apart)
  and runs `jobs` reductions over the mapped file; ProcessPoolExecutor(N) is handed the
  array, pickled for every call; and the reductions in this process.
- io: `jobs` sleeps of ms through offload (the server runs one worker), against ms itself and
  asyncio.gather of the same sleeps in this process.

Standard library and NumPy only; `offload.client` from PYTHONPATH=python or an install.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload.client import Client
from python_tasks import count_primes, reduce_array  # the same code all three ways

# Every wait is bounded: a job that is not final by then fails the run.
JOB_TIMEOUT = float(os.environ.get("BENCH_JOB_TIMEOUT", "600"))


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=10) as r:
        return json.load(r)


def finished(url: str) -> int:
    """Jobs that ended on the server since it started (succeeded + failed, all lanes)."""
    lanes = stats(url)["executors"].values()
    return sum(lane["succeeded"] + lane["failed"] for lane in lanes)


def program_pids(url: str) -> set[int]:
    """The pids of the task program's workers now (a changed set means a worker was replaced)."""
    return {w["pid"] for lane in stats(url)["executors"].values()
            for w in lane.get("workers", []) if w.get("program")}


def through_offload(client: Client, task: str, args: list[dict[str, Any]]) -> tuple[float, list]:
    """Submits the jobs in one batch and waits for each; seconds from the submit to the last
    result, and the results in order."""
    start = time.perf_counter()
    jobs = client.batch({"task": task, "args": a, "max_attempts": 1} for a in args)
    done = [client.wait(j["id"], timeout=JOB_TIMEOUT) for j in jobs]
    elapsed = time.perf_counter() - start
    failed = [j for j in done if j["status"] != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} {task} jobs did not succeed: {failed[0]}")
    return elapsed, [j["result"] for j in done]


def in_pool(workers: int, fn: Any, *iterables: Any) -> tuple[float, list]:
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(fn, *iterables, timeout=JOB_TIMEOUT))
    return time.perf_counter() - start, results


def serially(fn: Any, *iterables: Any) -> tuple[float, list]:
    start = time.perf_counter()
    results = list(map(fn, *iterables))
    return time.perf_counter() - start, results


def same(name: str, a: list, b: list) -> None:
    if a != b:
        raise SystemExit(f"{name}: the results differ: {a[:3]}... against {b[:3]}...")


def bench_cpu(client: Client, url: str, workers: int, jobs: int, n: int) -> dict[str, Any]:
    ns = [n] * jobs
    offload_s, via_offload = through_offload(client, "py_count_primes", [{"n": n} for n in ns])
    pool_s, via_pool = in_pool(workers, count_primes, ns)
    serial_s, via_serial = serially(count_primes, ns)
    same("count_primes offload/pool", via_offload, via_pool)
    same("count_primes offload/serial", via_offload, via_serial)
    return {"item": "cpu", "workers": workers, "jobs": jobs, "n": n, "offload_s": offload_s,
            "pool_s": pool_s, "serial_s": serial_s}


def bench_numpy(client: Client, url: str, workers: int, jobs: int, mib: int) -> dict[str, Any]:
    x = np.random.default_rng(0).standard_normal(mib * (1 << 20) // 8)
    thresholds = [round(-2 + 4 * k / max(jobs - 1, 1), 3) for k in range(jobs)]
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        path = Path(tmp) / "x.f64"
        x.tofile(path)
        start = time.perf_counter()
        blob = client.upload(path)  # streamed from the file, its sha256 checked
        upload_s = time.perf_counter() - start
    before = program_pids(url)
    offload_s, via_offload = through_offload(
        client, "py_exceedances", [{"data": blob["id"], "threshold": t} for t in thresholds])
    replaced = len(before - program_pids(url))
    client.delete_blob(blob["id"])
    pool_s, via_pool = in_pool(workers, reduce_array, [x] * jobs, thresholds)
    serial_s, via_serial = serially(reduce_array, [x] * jobs, thresholds)
    same("reduce offload/pool", via_offload, via_pool)
    same("reduce offload/serial", via_offload, via_serial)
    return {"item": "numpy", "workers": workers, "jobs": jobs, "mib": mib,
            "upload_s": upload_s, "offload_s": offload_s, "pool_s": pool_s,
            "serial_s": serial_s, "workers_replaced": replaced}


async def _gather_sleeps(jobs: int, ms: int) -> None:
    await asyncio.gather(*(asyncio.sleep(ms / 1000) for _ in range(jobs)))


def bench_io(client: Client, url: str, workers: int, jobs: int, ms: int) -> dict[str, Any]:
    if jobs > 1000:
        raise SystemExit("io: at most 1000 jobs (one batch)")
    base = finished(url)
    start = time.perf_counter()
    batch = client.batch({"task": "py_sleep_ms", "args": {"ms": ms}, "max_attempts": 1}
                         for _ in range(jobs))
    # Long-poll the last job, then watch the server's count of finished jobs: a thousand
    # GETs, one per job, would measure this client more than the server.
    client.wait(batch[-1]["id"], timeout=JOB_TIMEOUT)
    deadline = time.monotonic() + JOB_TIMEOUT
    while finished(url) < base + jobs:
        if time.monotonic() > deadline:
            raise SystemExit(f"io: {jobs} sleeps not done after {JOB_TIMEOUT:g} s")
        time.sleep(0.002)
    offload_s = time.perf_counter() - start
    bad = [j for j in (client.get(b["id"]) for b in batch)
           if j["status"] != "succeeded" or j["result"] != ms]
    if bad:
        raise SystemExit(f"io: {len(bad)} sleeps did not succeed: {bad[0]}")
    start = time.perf_counter()
    asyncio.run(_gather_sleeps(jobs, ms))
    gather_s = time.perf_counter() - start
    return {"item": "io", "workers": workers, "jobs": jobs, "ms": ms, "offload_s": offload_s,
            "gather_s": gather_s}


def run(a: argparse.Namespace) -> None:
    with Client(a.url, timeout=60) as client:
        for item in a.items.split(","):
            if item == "cpu":
                row = bench_cpu(client, a.url, a.workers, a.jobs, a.primes_n)
            elif item == "numpy":
                row = bench_numpy(client, a.url, a.workers, a.jobs, a.mib)
            elif item == "io":
                row = bench_io(client, a.url, a.workers, a.io_jobs, a.sleep_ms)
            else:
                raise SystemExit(f"unknown item {item!r}: cpu, numpy, io")
            print(json.dumps(row), file=sys.stderr)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


# -- the tables -------------------------------------------------------------------------


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def _x(base: float, seconds: float) -> str:
    return f"{base / seconds:.2f}x"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| workload | offload | ProcessPoolExecutor(N) | one process |",
           "|---|---|---|---|"]
    for r in rows:
        n, k, serial = r["workers"], r["jobs"], r.get("serial_s")
        if r["item"] == "cpu":
            what = f"pure-Python count_primes({r['n']:,}) × {k}, N = {n}"
        elif r["item"] == "numpy":
            size = f"{r['mib'] // 1024} GiB" if r["mib"] % 1024 == 0 else f"{r['mib']} MiB"
            what = f"NumPy: {k} reductions of a {size} float64 array, N = {n}"
        else:
            what = (f"{r['jobs']:,} × asyncio.sleep({r['ms'] / 1000:g}), one worker "
                    f"(ideal {_s(r['ms'] / 1000)})")
            out.append(f"| {what} | {_s(r['offload_s'])} "
                       f"({r['offload_s'] / (r['ms'] / 1000):.2f} × ideal) | — | "
                       f"{_s(r['gather_s'])} (asyncio.gather) |")
            continue
        offload = f"{_s(r['offload_s'])} ({_x(serial, r['offload_s'])})"
        if r["item"] == "numpy":
            offload += f" + upload {_s(r['upload_s'])} once"
            if r.get("workers_replaced"):
                offload += f"; {r['workers_replaced']} workers replaced"
        out.append(f"| {what} | {offload} | {_s(r['pool_s'])} ({_x(serial, r['pool_s'])}) "
                   f"| {_s(serial)} (1.00x) |")
    return "\n".join(out)


def scaling_table(rows: list[dict[str, Any]]) -> str:
    cpu = {r["workers"]: r for r in rows if r["item"] == "cpu"}
    arr = {r["workers"]: r for r in rows if r["item"] == "numpy"}
    out = []
    if cpu:
        r0 = next(iter(cpu.values()))
        out.append(f"count_primes({r0['n']:,}) × {r0['jobs']}; speedup over one process "
                   "(the same calls one after another) in brackets.")
    if arr:
        r0 = next(iter(arr.values()))
        out.append(f"NumPy: {r0['jobs']} reductions of a {r0['mib']} MiB float64 array; offload "
                   f"after one upload, ProcessPoolExecutor handed the array (pickled per call).")
    out += ["", ("| N | cpu: offload | cpu: pool | cpu: one process "
                 "| numpy: upload | numpy: offload | numpy: pool | numpy: one process |"),
            "|---|---|---|---|---|---|---|---|"]
    for n in sorted(set(cpu) | set(arr)):
        cells = [str(n)]
        if n in cpu:
            c = cpu[n]
            cells += [f"{_s(c['offload_s'])} ({_x(c['serial_s'], c['offload_s'])})",
                      f"{_s(c['pool_s'])} ({_x(c['serial_s'], c['pool_s'])})", _s(c["serial_s"])]
        else:
            cells += ["—"] * 3
        if n in arr:
            a = arr[n]
            cells += [_s(a["upload_s"]),
                      f"{_s(a['offload_s'])} ({_x(a['serial_s'], a['offload_s'])})",
                      f"{_s(a['pool_s'])} ({_x(a['serial_s'], a['pool_s'])})", _s(a["serial_s"])]
        else:
            cells += ["—"] * 4
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def ready(a: argparse.Namespace) -> None:
    """Waits until the server lists `workers` live workers of the task program."""
    deadline = time.monotonic() + a.timeout
    live: set[int] = set()
    while time.monotonic() < deadline:
        if a.pid:
            try:
                os.kill(a.pid, 0)
            except ProcessLookupError:
                raise SystemExit(f"the server (pid {a.pid}) exited") from None
        try:
            live = program_pids(a.url)
        except OSError:
            live = set()
        if len(live) >= a.workers:
            return
        time.sleep(0.1)
    raise SystemExit(f"{len(live)} of {a.workers} workers up after {a.timeout:g} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure against a running server; append JSON lines")
    r.add_argument("--url", required=True)
    r.add_argument("--workers", type=int, required=True, help="the server's worker count N")
    r.add_argument("--items", default="cpu,numpy", help="cpu, numpy, io, comma-separated")
    r.add_argument("--out", required=True, help="file to append the results to")
    r.add_argument("--jobs", type=int, default=8, help="jobs of the cpu and numpy items")
    r.add_argument("--primes-n", type=int, default=250_000)
    r.add_argument("--mib", type=int, default=1024, help="the numpy array's size")
    r.add_argument("--io-jobs", type=int, default=1000)
    r.add_argument("--sleep-ms", type=int, default=500)
    w = sub.add_parser("ready", help="wait until the task program's workers are up")
    w.add_argument("--url", required=True)
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--pid", type=int, help="the server's pid: give up if it exits")
    w.add_argument("--timeout", type=float, default=60)
    t = sub.add_parser("table", help="print the results as a markdown table")
    t.add_argument("file")
    t.add_argument("--scaling", action="store_true", help="one row per N, items cpu and numpy")
    a = p.parse_args()
    if a.command == "run":
        run(a)
    elif a.command == "ready":
        ready(a)
    else:
        rows = [json.loads(line) for line in Path(a.file).read_text().splitlines() if line]
        print(scaling_table(rows) if a.scaling else table(rows))


if __name__ == "__main__":
    main()
