"""A task program: three Python functions served as offload tasks.

    pip install ./python
    offload serve --task-program 'python3 examples/python/tasks.py'

Then `GET /v1/tasks` lists `primes_below`, `column_mean` and `sleep_then_echo` beside the
built-in tasks, and jobs naming them run in this program's worker processes.
"""

from __future__ import annotations

import asyncio

from offload.worker import Permanent, progress, run, task


@task(kind="cpu")
def primes_below(n: int) -> dict:
    """Count the primes below n (pure Python: a sieve of Eratosthenes)."""
    if n < 0 or n > 10**9:
        raise Permanent(f"n must be from 0 to 10^9, not {n}")
    sieve = bytearray([1]) * max(n, 2)
    sieve[0:2] = b"\0\0"
    limit = int(n**0.5) + 1
    for i in range(2, limit):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, n, i)))
            progress(i / limit)
    return {"count": sum(sieve[:n])}


_DTYPES = {"f64": "<f8", "f32": "<f4", "i64": "<i8", "u8": "u1"}


@task(kind="cpu", blobs=["data"])
def column_mean(data: memoryview, dtype: str = "f64", columns: int = 1) -> dict:
    """The mean of each column of a row-major array blob (NumPy, reading the mapped file)."""
    import numpy as np  # here, not at the top: the program starts without NumPy installed

    if dtype not in _DTYPES:
        raise Permanent(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    values = np.frombuffer(data, dtype=_DTYPES[dtype])  # no copy: a view of the mapping
    if columns < 1 or values.size % columns:
        raise Permanent(f"{values.size} values do not make rows of {columns} columns")
    means = values.reshape(-1, columns).mean(axis=0)
    return {"rows": values.size // columns, "mean": [float(m) for m in means]}


@task(kind="io")
async def sleep_then_echo(ms: int, message: str = "") -> dict:
    """Sleep ms milliseconds without blocking the worker's other jobs, then echo message."""
    await asyncio.sleep(ms / 1000)
    return {"slept_ms": ms, "message": message}


if __name__ == "__main__":
    run()
