"""A task program for offload's tests: speaks docs/worker-protocol.md (version 1) directly,
with the standard library only (the `offload.worker` library is not needed to serve tasks).

Run by the server as `python3 tests/programs/echo_tasks.py`: one `ready` line on stdout,
then `run` / `cancel` / `shutdown` lines on stdin. cpu tasks run on a thread of their own
(the server sends a cpu worker one job at a time and SIGKILLs it to stop one); io tasks run
on an asyncio loop in another thread, several at once, each cancellable by a `cancel` line.
"""

import asyncio
import json
import mmap
import os
import subprocess
import sys
import threading
import time

OUT = threading.Lock()


def send(message: dict) -> None:
    line = json.dumps(message, separators=(",", ":")) + "\n"
    with OUT:
        sys.stdout.write(line)
        sys.stdout.flush()


def log(job: str, text: str) -> None:
    print(f"[job {job}] {text}", file=sys.stderr, flush=True)


def obj(properties: dict, required: list) -> dict:
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


TASKS = [
    {"name": "py_sum_squares", "kind": "cpu", "version": "1",
     "description": "sum of i*i for i below n",
     "args_schema": obj({"n": {"type": "integer", "minimum": 0}}, ["n"]), "blob_args": []},
    {"name": "py_spin", "kind": "cpu", "version": "1",
     "description": "holds its worker for secs (retry_secs on later attempts)",
     "args_schema": obj({"secs": {"type": "number"}, "retry_secs": {"type": "number"}},
                        ["secs"]), "blob_args": []},
    {"name": "py_io_sleep", "kind": "io", "version": "1",
     "description": "sleeps ms on the worker's event loop; answers its pid",
     "args_schema": obj({"ms": {"type": "integer", "minimum": 0}}, ["ms"]), "blob_args": []},
    {"name": "py_io_deaf", "kind": "io", "version": "1",
     "description": "like py_io_sleep (retry_ms on later attempts), but ignores a cancel "
                    "(the server must kill it)",
     "args_schema": obj({"ms": {"type": "integer", "minimum": 0},
                         "retry_ms": {"type": "integer", "minimum": 0}}, ["ms"]),
     "blob_args": []},
    {"name": "py_blob_sum", "kind": "cpu", "version": "1",
     "description": "maps a blob and sums its bytes",
     "args_schema": obj({"data": {"type": "string"}}, ["data"]), "blob_args": ["data"]},
    {"name": "py_flaky", "kind": "cpu", "version": "1",
     "description": "raises on attempt 1, succeeds on attempt 2",
     "args_schema": obj({}, []), "blob_args": []},
    {"name": "py_progress", "kind": "cpu", "version": "1",
     "description": "reports progress steps times, ms apart",
     "args_schema": obj({"steps": {"type": "integer"}, "ms": {"type": "integer"}},
                        ["steps", "ms"]), "blob_args": []},
    {"name": "py_crash", "kind": "cpu", "version": "1",
     "description": "exits its process on attempt 1, succeeds on attempt 2",
     "args_schema": obj({}, []), "blob_args": []},
    {"name": "py_spawn", "kind": "cpu", "version": "1",
     "description": "starts a child that sleeps on, and answers its pid",
     "args_schema": obj({}, []), "blob_args": []},
    {"name": "py_fork_crash", "kind": "cpu", "version": "1",
     "description": "starts a child that keeps stdout open, then exits its process",
     "args_schema": obj({}, []), "blob_args": []},
    {"name": "py_parents", "kind": "cpu", "version": "1",
     "description": "answers the parents' results its run carried",
     "args_schema": obj({}, []), "blob_args": [], "parent_results": True},
]


def cpu_body(run: dict):
    task, args, attempt, job = run["task"], run["args"], run["attempt"], run["id"]
    if task == "py_sum_squares":
        return {"sum": sum(i * i for i in range(args["n"]))}
    if task == "py_spin":
        secs = args["secs"] if attempt == 1 else args.get("retry_secs", args["secs"])
        time.sleep(secs)
        return {"slept": secs, "pid": os.getpid()}
    if task == "py_blob_sum":
        with open(run["blobs"]["data"], "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)  # iterates as ints, without a copy
                try:
                    return {"sum": sum(view), "size": len(m)}
                finally:
                    view.release()
    if task == "py_flaky":
        if attempt < 2:
            raise ValueError("attempt 1 always fails")
        return {"attempt": attempt}
    if task == "py_progress":
        for i in range(args["steps"]):
            send({"progress": {"id": job, "value": i / args["steps"]}})
            time.sleep(args["ms"] / 1000)
        return {"steps": args["steps"]}
    if task == "py_crash":
        if attempt < 2:
            log(job, "exiting mid-job")
            os._exit(1)
        return {"attempt": attempt}
    if task == "py_spawn":
        child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {"child": child.pid}
    if task == "py_parents":
        return {"parents": run.get("parents")}
    if task == "py_fork_crash":
        child = subprocess.Popen(["sleep", "1000"])  # inherits stdout: the pipe stays open
        log(job, f"child {child.pid} holds stdout; exiting")
        os._exit(1)
    raise LookupError(f"no task {task}")


def run_cpu(run: dict) -> None:
    log(run["id"], f"running {run['task']}")
    try:
        send({"ok": {"id": run["id"], "result": cpu_body(run)}})
    except Exception as e:  # noqa: BLE001 - every failure is reported to the server
        send({"error": {"id": run["id"], "kind": "transient", "type": type(e).__name__,
                        "message": str(e)}})


LOOP = asyncio.new_event_loop()
RUNNING: dict = {}  # job id -> asyncio.Task, touched on LOOP's thread only


async def io_job(run: dict) -> None:
    args = run["args"]
    ms = args["ms"] if run["attempt"] == 1 else args.get("retry_ms", args["ms"])
    await asyncio.sleep(ms / 1000)
    send({"ok": {"id": run["id"], "result": {"slept_ms": ms, "pid": os.getpid(),
                                            "attempt": run["attempt"]}}})


def start_io(run: dict) -> None:
    job = run["id"]
    task = LOOP.create_task(io_job(run))
    if run["task"] != "py_io_deaf":
        RUNNING[job] = task

    # A callback, not an `except CancelledError` in io_job: a task cancelled before it first
    # runs never enters its body, and the server still waits for an answer.
    def done(t: asyncio.Task) -> None:
        RUNNING.pop(job, None)
        if t.cancelled():
            send({"error": {"id": job, "kind": "permanent", "type": "Cancelled",
                            "message": "cancelled by the server"}})

    task.add_done_callback(done)


def cancel_io(job: str) -> None:
    task = RUNNING.get(job)
    if task is not None:
        task.cancel()


def watch_parent() -> None:
    parent = int(os.environ.get("OFFLOAD_PARENT_PID", "0"))
    while parent:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(0)
        time.sleep(1)


def main() -> None:
    assert os.environ.get("OFFLOAD_PROTOCOL") == "1", "started by an offload server"
    assert os.path.isdir(os.environ["OFFLOAD_DATA_DIR"])
    threading.Thread(target=watch_parent, daemon=True).start()
    threading.Thread(target=LOOP.run_forever, daemon=True).start()
    # `--pid-1`: says pid 1, as a program in a pid namespace of its own would, every worker.
    pid = 1 if "--pid-1" in sys.argv else os.getpid()
    # `--reorder`: every worker but the first declares the tasks in reverse order.
    tasks = TASKS
    if "--reorder" in sys.argv:
        try:
            os.close(os.open(os.path.join(os.environ["OFFLOAD_DATA_DIR"], "first-worker"),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            tasks = TASKS[::-1]
    send({"ready": {"protocol": 1, "pid": pid, "concurrency": 10, "tasks": tasks}})
    kinds = {t["name"]: t["kind"] for t in TASKS}
    for line in sys.stdin:
        message = json.loads(line)
        if "run" in message:
            run = message["run"]
            if kinds.get(run["task"]) == "io":
                LOOP.call_soon_threadsafe(start_io, run)
            else:
                threading.Thread(target=run_cpu, args=(run,), daemon=True).start()
        elif "cancel" in message:
            LOOP.call_soon_threadsafe(cancel_io, message["cancel"]["id"])
        elif "shutdown" in message:
            break
    os._exit(0)


if __name__ == "__main__":
    main()
