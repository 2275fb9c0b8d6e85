"""Serve Python functions as offload tasks: the worker side of the worker protocol.

A task program registers its functions with `task` and calls `run`::

    from offload.worker import task, progress, run, Permanent

    @task(kind="cpu")
    def primes_below(n: int) -> dict:
        ...

    @task(kind="io")
    async def fetch_status(url: str) -> dict:
        ...

    @task(kind="cpu", blobs=["data"])
    def column_mean(data, dtype: str = "f64") -> dict:
        ...  # data: a read-only memoryview of the mapped blob file

    if __name__ == "__main__":
        run()

and the server starts it (`offload serve --task-program 'python3 tasks.py'`) as a pool of
worker processes, each speaking the protocol of `docs/worker-protocol.md` over its stdin and
stdout.

One worker process serves all of the program's tasks:

- **cpu** tasks (plain `def`) run in the main thread, one at a time, in the order their runs
  arrive. The server cancels one, or ends it at its timeout, by killing the process.
- **io** tasks (`async def`) run in an asyncio event loop on a thread of its own, up to
  `concurrency` at once (the `concurrency` argument of `run`, else the environment variable
  `OFFLOAD_IO_CONCURRENCY`, else 100). A `cancel` message cancels the one asyncio task.

The handshake's `concurrency` is 1 for a program with only cpu tasks, and the io concurrency
for a program with any io task. A program that mixes both kinds takes several runs at once:
its cpu runs queue for the main thread while its io runs go on in the event loop; a server
that kills such a worker to stop a cpu job ends its io jobs too (they are retried as
`crashed`), so keep long cpu tasks and io tasks in separate programs where that matters.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import math
import mmap
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from . import _schema, _stdio

# Started by the server as a worker: take stdout for the protocol now, at import, so that what
# the task program prints while it loads (after importing this module) goes to stderr and
# cannot come before the handshake.
if os.environ.get("OFFLOAD_PROTOCOL"):
    _stdio.take_stdio()

__all__ = ["Permanent", "Task", "progress", "registered", "run", "task"]

PROTOCOL = 1
DEFAULT_IO_CONCURRENCY = 100
PROGRESS_INTERVAL_S = 0.1  # at most ~10 progress lines a second per job
PARENT_CHECK_INTERVAL_S = 1.0
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")

F = TypeVar("F", bound=Callable[..., Any])


class Permanent(Exception):
    """Raised by a task when retrying cannot help: the job fails at once.

    Any other exception is a transient error, retried while attempts remain. The error's
    `type` on the wire is the exception's class name, so a subclass names the problem::

        class BadInput(Permanent): ...
    """


@dataclass(frozen=True)
class Task:
    """A registered task: the function and what the handshake declares about it."""

    name: str
    kind: str
    fn: Callable[..., Any]
    args_schema: dict[str, Any]
    blob_args: tuple[str, ...] = ()
    version: str = "1"
    description: str = ""
    parent_results: bool = False

    def declaration(self) -> dict[str, Any]:
        declared: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "description": self.description,
            "args_schema": self.args_schema,
            "blob_args": list(self.blob_args),
        }
        if self.parent_results:
            declared["parent_results"] = True
        return declared


_registry: dict[str, Task] = {}


def registered() -> dict[str, Task]:
    """The tasks registered so far, by name."""
    return dict(_registry)


def task(
    fn: F | None = None,
    *,
    name: str | None = None,
    kind: str | None = None,
    blobs: tuple[str, ...] | list[str] = (),
    schema: dict[str, Any] | None = None,
    version: str = "1",
    description: str | None = None,
    parent_results: bool = False,
) -> F | Callable[[F], F]:
    """Registers a function as a task; usable as `@task` or `@task(...)`.

    - `name`: the task's name (default: the function's); `[a-z][a-z0-9_]*`, at most 64 bytes.
    - `kind`: `"cpu"` for a plain `def`, `"io"` for an `async def` (default: from the function).
    - `blobs`: the arguments whose value is a blob id; the function gets a read-only
      `memoryview` of the mapped blob file in their place.
    - `schema`: the JSON Schema of the args (default: derived from the type hints).
    - `version`, `description` (default: the docstring's first line).
    - `parent_results`: the function takes a `parents` keyword argument and gets its job's
      parents' results in it, `{parent id: result}` (`{}` for a job without parents); the
      args schema leaves `parents` out.

    The function is returned unchanged, so it can still be called directly.
    """

    def register(fn: F) -> F:
        t = _make_task(fn, name, kind, tuple(blobs), schema, version, description,
                       parent_results)
        if t.name in _registry:
            raise ValueError(f"a task named {t.name!r} is already registered")
        _registry[t.name] = t
        return fn

    return register(fn) if fn is not None else register


def _make_task(
    fn: Callable[..., Any],
    name: str | None,
    kind: str | None,
    blobs: tuple[str, ...],
    schema: dict[str, Any] | None,
    version: str,
    description: str | None,
    parent_results: bool = False,
) -> Task:
    name = fn.__name__ if name is None else name
    if not _NAME.match(name) or len(name.encode()) > 64:
        raise ValueError(
            f"task name {name!r} must match [a-z][a-z0-9_]* and be at most 64 bytes; "
            "pass name= to task()"
        )
    is_async = inspect.iscoroutinefunction(fn)
    kind = ("io" if is_async else "cpu") if kind is None else kind
    if kind == "io" and not is_async:
        raise TypeError(f"task {name!r}: an io task is an async def (a plain def is kind='cpu')")
    if kind == "cpu" and is_async:
        raise TypeError(f"task {name!r}: a cpu task is a plain def (an async def is kind='io')")
    if kind not in ("cpu", "io"):
        raise ValueError(f"task {name!r}: kind must be 'cpu' or 'io', not {kind!r}")
    if isinstance(blobs, str):
        blobs = (blobs,)
    if parent_results and "parents" not in inspect.signature(fn).parameters:
        raise TypeError(f"task {name!r}: parent_results=True needs a `parents` parameter")
    if schema is None:
        schema = _schema.args_schema(fn, blobs)
        if parent_results:
            # Filled in by the worker, never sent by a client.
            schema["properties"].pop("parents", None)
            if "required" in schema:
                schema["required"] = [r for r in schema["required"] if r != "parents"]
    elif not isinstance(schema, dict):
        raise TypeError(f"task {name!r}: schema must be a dict (a JSON Schema)")
    if description is None:
        doc = inspect.getdoc(fn) or ""
        description = doc.strip().splitlines()[0] if doc.strip() else ""
    return Task(name, kind, fn, schema, blobs, str(version), description, parent_results)


# The job the calling code runs for: set in the main thread for a cpu job and in the asyncio
# task of an io job (each task has its own copy of the context), so `progress` and the
# `[job <id>] ` prefix work alike in both.
@dataclass
class _Job:
    id: str
    wire: _Wire
    last_progress: float = field(default=-math.inf)


_current: contextvars.ContextVar[_Job | None] = contextvars.ContextVar(
    "offload_job", default=None
)


def _current_id() -> str | None:
    job = _current.get()
    return job.id if job is not None else None


def progress(value: float) -> None:
    """Reports the current job's progress, a fraction from 0 to 1.

    Call it from inside a task (cpu or io; not from a thread the task starts). Calls closer
    together than a tenth of a second are dropped, so it is cheap to call in a loop.
    """
    job = _current.get()
    if job is None:
        raise RuntimeError("progress() reports for the job running it: call it inside a task")
    value = float(value)
    if math.isnan(value):
        raise ValueError("progress must be a number from 0 to 1, not NaN")
    now = time.monotonic()
    if now - job.last_progress < PROGRESS_INTERVAL_S:
        return
    job.last_progress = now
    job.wire.send({"progress": {"id": job.id, "value": min(max(value, 0.0), 1.0)}})


class _Wire:
    """The protocol's output: one JSON object per line, written whole under a lock (the main
    thread's cpu jobs and the event loop's io jobs both answer on it)."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0, closefd=False)
        self._lock = threading.Lock()

    @staticmethod
    def encode(message: dict[str, Any]) -> bytes:
        """The message's line; ValueError or TypeError if it is not JSON (NaN included)."""
        text = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8") + b"\n"

    def send(self, message: dict[str, Any]) -> None:
        self.send_line(self.encode(message))

    def send_line(self, line: bytes) -> None:
        with self._lock:
            try:
                self._out.write(line)
            except BrokenPipeError:
                os._exit(0)  # the server has gone: no one is left to answer


_STOP = object()


class _Worker:
    def __init__(self, tasks: dict[str, Task], wire: _Wire, concurrency: int,
                 lines: _stdio.JobLines) -> None:
        self.tasks = tasks
        self.wire = wire
        self.concurrency = concurrency
        self.lines = lines
        self.cpu_runs: queue.Queue[Any] = queue.Queue()
        self.waiting_cpu: dict[str, bool] = {}  # queued cpu runs: id -> cancelled meanwhile
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.io_jobs: dict[str, asyncio.Task[None]] = {}  # touched only on the loop's thread
        self.io_slots: asyncio.Semaphore | None = None

    # -- the stdin reader thread --------------------------------------------------------

    def read(self, stdin: Any) -> None:
        """Reads messages until `shutdown` or the end of stdin, and hands each on."""
        for raw in stdin:
            try:
                message = json.loads(raw)
                (kind, body), = message.items()
            except (ValueError, AttributeError):
                print(f"offload.worker: ignoring a line that is not a message: {raw[:200]!r}",
                      file=sys.stderr)
                continue
            if kind == "run":
                self.dispatch(body)
            elif kind == "cancel":
                self.cancel(str(body.get("id")))
            elif kind == "shutdown":
                break
            # Other types come from a later protocol version: ignored, as version 1 says.
        self.cpu_runs.put(_STOP)

    def dispatch(self, run: dict[str, Any]) -> None:
        job_id = str(run.get("id"))
        t = self.tasks.get(run.get("task"))  # type: ignore[arg-type]
        if t is None:
            self.wire.send(_error(job_id, "permanent", "UnknownTask",
                                  f"this program has no task named {run.get('task')!r}"))
        elif t.kind == "cpu":
            with self.lock:
                self.waiting_cpu[job_id] = False
            self.cpu_runs.put((t, run))
        else:
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self.start_io, t, run)

    def cancel(self, job_id: str) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.cancel_io, job_id)
        # A cpu run that has not started yet is skipped; one running is the server's to kill.
        with self.lock:
            if job_id in self.waiting_cpu:
                self.waiting_cpu[job_id] = True

    # -- cpu jobs, in the main thread ---------------------------------------------------

    def serve_cpu(self) -> None:
        while True:
            item = self.cpu_runs.get()
            if item is _STOP:
                return
            t, run = item
            job_id = str(run.get("id"))
            with self.lock:
                cancelled = self.waiting_cpu.pop(job_id, False)
            if cancelled:
                self.wire.send(
                    _error(job_id, "permanent", "Cancelled", "cancelled before it started")
                )
                continue
            job = _Job(job_id, self.wire)
            token = _current.set(job)
            views: list[_Mapped] = []
            try:
                try:
                    answer = _success(job_id, t.fn(**_arguments(t, run, views)))
                except Exception as e:
                    answer = _failure(job_id, e)
                finally:
                    _unmap(views)
                self.wire.send_line(answer)
            finally:
                _current.reset(token)
                self.lines.end_job(job_id)

    # -- io jobs, in the event loop's thread --------------------------------------------

    def start_loop(self) -> threading.Thread:
        self.loop = asyncio.new_event_loop()

        def main() -> None:
            assert self.loop is not None
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_forever()
            except BaseException:
                traceback.print_exc()
                os._exit(70)  # the loop died under its jobs: let the server see a crash

        thread = threading.Thread(target=main, name="offload-io", daemon=True)
        thread.start()
        return thread

    def start_io(self, t: Task, run: dict[str, Any]) -> None:
        if self.io_slots is None:
            self.io_slots = asyncio.Semaphore(self.concurrency)
        job_id = str(run.get("id"))
        assert self.loop is not None
        job = self.loop.create_task(self.run_io(t, run, job_id))
        job.add_done_callback(lambda job: self.io_done(job_id, job))
        self.io_jobs[job_id] = job

    def io_done(self, job_id: str, job: asyncio.Task[None]) -> None:
        # Here rather than in run_io: a task cancelled before its first step never runs
        # any of its coroutine's code.
        self.io_jobs.pop(job_id, None)
        if job.cancelled():
            self.wire.send(_error(job_id, "permanent", "Cancelled", "cancelled by the server"))
        elif (e := job.exception()) is not None:
            # Not an Exception (run_io answers those): a BaseException of the task's own. The
            # server still gets an answer, else it would wait for this job forever.
            traceback.print_exception(type(e), e, e.__traceback__)
            self.wire.send(_error(job_id, "transient", type(e).__name__, str(e)))

    def cancel_io(self, job_id: str) -> None:
        job = self.io_jobs.get(job_id)
        if job is not None:
            job.cancel()

    async def run_io(self, t: Task, run: dict[str, Any], job_id: str) -> None:
        _current.set(_Job(job_id, self.wire))  # this asyncio task's own context
        views: list[_Mapped] = []
        try:
            try:
                assert self.io_slots is not None
                async with self.io_slots:
                    answer = _success(job_id, await t.fn(**_arguments(t, run, views)))
            except Exception as e:
                answer = _failure(job_id, e)
            finally:  # also when cancelled: the CancelledError goes on up, to io_done
                _unmap(views)
            self.wire.send_line(answer)
        finally:
            self.lines.end_job(job_id)

    async def drain(self) -> None:
        """Waits for the io jobs in flight (nothing new starts: stdin is done)."""
        while self.io_jobs:
            await asyncio.gather(*self.io_jobs.values(), return_exceptions=True)


def _error(job_id: str, kind: str, type_: str, message: str) -> dict[str, Any]:
    return {"error": {"id": job_id, "kind": kind, "type": type_, "message": message}}


def _failure(job_id: str, e: Exception) -> bytes:
    traceback.print_exc()  # to stderr, each line prefixed with the job id
    kind = "permanent" if isinstance(e, Permanent) else "transient"
    return _Wire.encode(_error(job_id, kind, type(e).__name__, str(e)))


def _success(job_id: str, result: Any) -> bytes:
    try:
        return _Wire.encode({"ok": {"id": job_id, "result": result}})
    except (TypeError, ValueError) as e:  # ValueError: NaN, a cycle, a lone surrogate
        print(f"the task's result is not JSON: {e}", file=sys.stderr)
        return _Wire.encode(_error(job_id, "permanent", type(e).__name__,
                                   f"the task's result is not JSON-serialisable: {e}"))


class InvalidArgs(Permanent):
    """A run's args do not fit the task's function (the schema let them through)."""


def _arguments(t: Task, run: dict[str, Any], views: list[_Mapped]) -> dict[str, Any]:
    """The run's args as keyword arguments, each blob arg a memoryview of its mapped file."""
    args = run.get("args") or {}
    if not isinstance(args, dict):
        raise InvalidArgs(f"args must be a JSON object, not {type(args).__name__}")
    kwargs = dict(args)
    paths = run.get("blobs") or {}
    for name in t.blob_args:
        if kwargs.get(name) is None:
            continue
        path = paths.get(name) or os.path.join(
            os.environ.get("OFFLOAD_DATA_DIR", "."), "blobs", str(kwargs[name])
        )
        mapped = _Mapped(path)
        views.append(mapped)
        kwargs[name] = mapped.view
    if t.parent_results:
        parents = run.get("parents")
        kwargs["parents"] = parents if isinstance(parents, dict) else {}
    try:
        inspect.signature(t.fn).bind(**kwargs)
    except TypeError as e:
        raise InvalidArgs(f"{t.name}: {e}") from None
    return kwargs


def _unmap(views: list[_Mapped]) -> None:
    """Unmaps a run's blobs. Done before its answer is sent: the server reads the worker's
    resident size when the answer comes (`--worker-max-rss-bytes`), and a mapped blob's
    pages that the task touched count in it; a worker that read a 1 GiB blob would be
    replaced after every job."""
    for v in views:
        v.close()


class _Mapped:
    """A blob file mapped read-only; `view` is a read-only memoryview of its bytes."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # mmap cannot map an empty file; an empty blob is an empty view.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def close(self) -> None:
        # A task may keep an array over the view (numpy.frombuffer): then the map stays
        # open until the garbage collector takes the last reference.
        try:
            self.view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass


def _parent_watch(parent: int) -> None:
    """Ends the process once the server that started it is gone: with its whole process group
    (the task's children too) when the group is its own, not the server's (offload starts
    each program worker in a group of its own); else the process alone."""
    ppid = os.getppid()
    try:
        own_group = os.getpgrp() != os.getpgid(parent)
    except OSError:
        own_group = os.getpgrp() == os.getpid()
    while True:
        time.sleep(PARENT_CHECK_INTERVAL_S)
        try:
            os.kill(parent, 0)
            gone = os.getppid() != ppid  # reparented: the process that started us has died
        except ProcessLookupError:
            gone = True
        except PermissionError:
            gone = False  # it exists, as another user's process
        if gone:
            if own_group:
                os.killpg(0, signal.SIGKILL)
            os._exit(0)


def _io_concurrency(concurrency: int | None) -> int:
    if concurrency is None:
        raw = os.environ.get("OFFLOAD_IO_CONCURRENCY", "")
        concurrency = int(raw) if raw.strip() else DEFAULT_IO_CONCURRENCY
    if concurrency < 1:
        raise ValueError(f"the io concurrency must be at least 1, not {concurrency}")
    return concurrency


def run(*, concurrency: int | None = None) -> None:
    """Serves the registered tasks over stdin and stdout until shutdown; the server calls it.

    `concurrency` is how many io jobs run at once in the event loop (default: the environment
    variable `OFFLOAD_IO_CONCURRENCY`, else 100); the handshake says 1 for a program with no io
    task. Returns after `{"shutdown": {}}` or the end of stdin, once the jobs in flight have
    answered (cpu runs that had not started are dropped: the server fails them as crashed).
    The process exits at once when its parent (`OFFLOAD_PARENT_PID`) is gone.
    """
    tasks = registered()
    if not tasks:
        raise RuntimeError("no tasks registered: decorate functions with @task before run()")
    has_io = any(t.kind == "io" for t in tasks.values())
    io_concurrency = _io_concurrency(concurrency)
    protocol_in, protocol_out = _stdio.take_stdio()
    lines = _stdio.JobLines(2, _current_id)
    sys.stdout = sys.stderr = lines
    wire = _Wire(protocol_out)
    worker = _Worker(tasks, wire, io_concurrency, lines)

    parent = os.environ.get("OFFLOAD_PARENT_PID", "")
    threading.Thread(
        target=_parent_watch,
        args=(int(parent) if parent.isdigit() else os.getppid(),),
        name="offload-parent-watch",
        daemon=True,
    ).start()
    if has_io:
        worker.start_loop()

    wire.send({"ready": {
        "protocol": PROTOCOL,
        "pid": os.getpid(),
        "concurrency": io_concurrency if has_io else 1,
        "tasks": [t.declaration() for t in tasks.values()],
    }})
    stdin = os.fdopen(protocol_in, "rb", closefd=True)
    threading.Thread(target=worker.read, args=(stdin,), name="offload-stdin", daemon=True).start()
    worker.serve_cpu()
    if worker.loop is not None:
        asyncio.run_coroutine_threadsafe(worker.drain(), worker.loop).result()
        worker.loop.call_soon_threadsafe(worker.loop.stop)
    lines.end_all()
