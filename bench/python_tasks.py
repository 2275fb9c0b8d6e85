"""The task program of bench/python.sh: the benchmark's three functions served as offload tasks.

    PYTHONPATH=python offload serve --task-program 'python3 bench/python_tasks.py'

The tasks are named py_* (the built-in catalogue has a count_primes). The plain functions
(`count_primes`, `reduce_array`) are the very ones bench/python_bench.py runs in a
ProcessPoolExecutor and serially, so all three ways run the same code; `@task` returns them
unchanged. NumPy is imported at the top so that a worker pays its import once,
at start, as a warm pool would.
"""

from __future__ import annotations

import asyncio

import numpy as np
from offload.worker import Permanent, run, task

# 2 Mi float64 values (16 MiB) per step: the temporaries stay in cache-sized pieces.
_STEP = 1 << 21


@task(kind="cpu", name="py_count_primes")
def count_primes(n: int) -> int:
    """Count the primes below n by trial division: a plain Python loop, no tricks."""
    if n < 0 or n > 10**8:
        raise Permanent(f"n must be from 0 to 10^8, not {n}")
    count = 0
    for k in range(2, n):
        d = 2
        while d * d <= k:
            if k % d == 0:
                break
            d += 1
        else:
            count += 1
    return count


def reduce_array(x: np.ndarray, threshold: float) -> dict:
    """One query over a float64 array: its sum and how many values exceed threshold."""
    total = 0.0
    above = 0
    for i in range(0, x.size, _STEP):
        chunk = x[i : i + _STEP]
        total += float(chunk.sum())
        above += int(np.count_nonzero(chunk > threshold))
    return {"sum": total, "above": above}


@task(kind="cpu", blobs=["data"], name="py_exceedances")
def exceedances(data: memoryview, threshold: float) -> dict:
    """reduce_array over a float64 blob, read in place (a view of the mapped file, no copy)."""
    if len(data) % 8:
        raise Permanent(f"a float64 blob's size is a multiple of 8, not {len(data)}")
    return reduce_array(np.frombuffer(data, dtype="<f8"), threshold)


@task(kind="io", name="py_sleep_ms")
async def sleep_ms(ms: int) -> int:
    """Sleep ms milliseconds in the worker's event loop, beside its other io jobs."""
    await asyncio.sleep(ms / 1000)
    return ms


if __name__ == "__main__":
    run()  # io concurrency: OFFLOAD_IO_CONCURRENCY (bench/python.sh sets it), else 100
