"""offload.worker over its pipes, as the server drives it (docs/worker-protocol.md)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import pytest

TASKS = """
import asyncio
from offload.worker import Permanent, progress, run, task

class BadInput(Permanent):
    pass

@task(kind="cpu")
def primes_below(n: int) -> dict:
    '''Count the primes below n.

    A sieve; more lines here are not part of the description.
    '''
    sieve = bytearray([1]) * max(n, 2)
    sieve[0:2] = b"\\0\\0"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytes(len(range(i * i, n, i)))
    return {"count": sum(sieve[:n])}

@task
def explode(message: str) -> dict:
    raise ValueError(message)

@task
def refuse(message: str) -> dict:
    raise BadInput(message)

@task
def give_set() -> dict:
    return {"numbers": {1, 2}}

@task
def give_nan() -> float:
    return float("nan")

@task
def chatty(text: str) -> str:
    print(text)
    print("no newline", end="")
    import os
    os.write(1, b"straight to fd 1\\n")
    return text

@task
def steps(n: int) -> int:
    for i in range(n):
        progress((i + 1) / n)
    return n

@task(kind="cpu", blobs=["data"])
def blob_info(data, dtype: str = "f64") -> dict:
    info = {"type": type(data).__name__, "readonly": data.readonly, "nbytes": data.nbytes}
    try:
        data[0:1] = b"x"
    except TypeError:
        info["write"] = "refused"
    import struct
    info["values"] = list(struct.unpack(f"<{data.nbytes // 8}d", data))
    return info

@task(parent_results=True)
def total(parents: dict, add: int = 0) -> dict:
    return {"sum": add + sum(r["n"] for r in parents.values()), "seen": sorted(parents)}

@task(kind="io")
async def nap(ms: int, tag: str = "") -> dict:
    '''Sleep, then answer.'''
    print("napping", tag)
    progress(0.5)
    await asyncio.sleep(ms / 1000)
    return {"tag": tag}

if __name__ == "__main__":
    run(concurrency=7)
"""


def test_handshake_declares_every_task(worker):
    w = worker(TASKS)
    ready = w.ready
    assert ready["protocol"] == 1
    assert ready["pid"] == w.proc.pid
    assert ready["concurrency"] == 7  # the program has an io task
    tasks = {t["name"]: t for t in ready["tasks"]}
    assert set(tasks) == {"primes_below", "explode", "refuse", "give_set", "give_nan",
                          "chatty", "steps", "blob_info", "nap", "total"}
    assert tasks["primes_below"] == {
        "name": "primes_below", "kind": "cpu", "version": "1",
        "description": "Count the primes below n.",
        "args_schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                        "required": ["n"], "additionalProperties": False},
        "blob_args": [],
    }
    assert tasks["nap"]["kind"] == "io"
    assert tasks["blob_info"]["blob_args"] == ["data"]
    assert tasks["blob_info"]["args_schema"]["properties"]["data"] == {"type": "string"}
    assert "parent_results" not in tasks["primes_below"]
    assert tasks["total"]["parent_results"] is True
    assert tasks["total"]["args_schema"]["properties"] == {"add": {"type": "integer", "default": 0}}
    assert "parents" not in tasks["total"]["args_schema"].get("required", [])


def test_a_task_that_asks_gets_its_parents_results(worker):
    w = worker(TASKS)
    w.run("p1", "total", {"add": 1}, parents={"a": {"n": 2}, "b": {"n": 3}})
    assert w.answer() == {"ok": {"id": "p1", "result": {"sum": 6, "seen": ["a", "b"]}}}
    # A run without `parents` (a job with none) gets an empty dict.
    w.run("p2", "total", {})
    assert w.answer() == {"ok": {"id": "p2", "result": {"sum": 0, "seen": []}}}


def test_parent_results_needs_a_parents_parameter():
    from offload.worker import _make_task

    def no_parents(n: int) -> int:
        return n

    with pytest.raises(TypeError, match="parents"):
        _make_task(no_parents, None, None, (), None, "1", None, True)


def test_cpu_only_program_takes_one_run_at_a_time(worker):
    w = worker("""
        from offload.worker import run, task

        @task
        def one() -> int:
            return 1

        run()
    """)
    assert w.ready["concurrency"] == 1


def test_run_answers_ok_with_the_result(worker):
    w = worker(TASKS)
    w.run("j1", "primes_below", {"n": 100})
    assert w.answer() == {"ok": {"id": "j1", "result": {"count": 25}}}


def test_an_exception_is_a_transient_error_with_its_type(worker):
    w = worker(TASKS)
    w.run("j2", "explode", {"message": "n must be ≥ 0"})
    assert w.answer() == {"error": {"id": "j2", "kind": "transient", "type": "ValueError",
                                    "message": "n must be ≥ 0"}}
    w.close()
    assert "[job j2] ValueError: n must be ≥ 0\n" in "".join(w.stderr)  # the traceback's end


def test_permanent_is_a_permanent_error_named_by_its_subclass(worker):
    w = worker(TASKS)
    w.run("j3", "refuse", {"message": "never"})
    assert w.answer() == {"error": {"id": "j3", "kind": "permanent", "type": "BadInput",
                                    "message": "never"}}


@pytest.mark.parametrize("task", ["give_set", "give_nan"])
def test_a_result_that_is_not_json_is_a_permanent_error(worker, task):
    w = worker(TASKS)
    w.run("j4", task, {})
    error = w.answer()["error"]
    assert error["id"] == "j4"
    assert error["kind"] == "permanent"
    assert "not JSON" in error["message"]


def test_print_in_a_task_goes_to_stderr_with_the_job_id(worker):
    w = worker(TASKS)
    w.run("j5", "chatty", {"text": "hello\nworld"})
    assert w.answer() == {"ok": {"id": "j5", "result": "hello\nworld"}}
    w.run("j6", "primes_below", {"n": 10})  # stdout is still clean for the next job
    assert w.answer() == {"ok": {"id": "j6", "result": {"count": 4}}}
    assert w.close() == 0
    err = "".join(w.stderr)
    assert "[job j5] hello\n[job j5] world\n" in err
    assert "[job j5] no newline\n" in err  # a partial line is written out when the job ends
    assert "straight to fd 1\n" in err  # fd 1 itself points at stderr


def test_progress_lines_are_throttled(worker):
    w = worker(TASKS)
    w.run("j7", "steps", {"n": 10000})
    messages = []
    while True:
        m = w.recv()
        messages.append(m)
        if "ok" in m:
            break
    progress = [m["progress"] for m in messages if "progress" in m]
    assert progress, "the first progress call is always sent"
    assert all(p["id"] == "j7" and 0 < p["value"] <= 1 for p in progress)
    assert len(progress) < 100  # 10,000 calls in well under 10 s
    assert messages[-1] == {"ok": {"id": "j7", "result": 10000}}


def test_a_blob_arg_is_a_read_only_memoryview_of_the_file(worker, tmp_path):
    w = worker(TASKS)
    blob = tmp_path / "blobs" / "b1"
    blob.parent.mkdir()
    blob.write_bytes(struct.pack("<3d", 1.5, 2.5, -1))
    w.run("j8", "blob_info", {"data": "b1"}, blobs={"data": str(blob)})
    assert w.answer() == {"ok": {"id": "j8", "result": {
        "type": "memoryview", "readonly": True, "nbytes": 24, "write": "refused",
        "values": [1.5, 2.5, -1.0]}}}
    # Without a path in `blobs`, the blob is looked for in $OFFLOAD_DATA_DIR/blobs/<id>.
    w.run("j9", "blob_info", {"data": "b1"})
    assert w.answer()["ok"]["result"]["nbytes"] == 24


def test_a_blob_is_unmapped_before_the_answer_is_sent(worker, tmp_path):
    # The server reads the worker's resident size when the answer comes; a blob still
    # mapped then would count in it (and get a worker that read a large blob replaced).
    w = worker(TASKS)
    blob = tmp_path / "blobs" / "big"
    blob.parent.mkdir()
    blob.write_bytes(struct.pack("<d", 1.0) * 4096)
    maps = f"/proc/{w.ready['pid']}/maps"
    if not os.path.exists(maps):
        pytest.skip("no /proc here")
    for i in range(20):  # the old order (answer, then unmap) lost this race most times
        w.run(f"u{i}", "blob_info", {"data": "big"}, blobs={"data": str(blob)})
        assert "ok" in w.answer()
        with open(maps) as f:
            assert str(blob) not in f.read()


def test_io_jobs_run_concurrently_and_print_with_their_ids(worker):
    w = worker(TASKS)
    start = time.monotonic()
    for i in range(5):
        w.run(f"io{i}", "nap", {"ms": 1000, "tag": str(i)})
    answers = {w.answer()["ok"]["id"] for _ in range(5)}
    assert answers == {f"io{i}" for i in range(5)}
    assert time.monotonic() - start < 4  # five one-second naps, not one after another
    w.close()
    err = "".join(w.stderr)
    for i in range(5):
        assert f"[job io{i}] napping {i}\n" in err


def test_cancel_stops_one_io_job_and_spares_the_others(worker):
    w = worker(TASKS)
    w.run("long", "nap", {"ms": 30000})
    w.run("short", "nap", {"ms": 300, "tag": "s"})
    time.sleep(0.1)
    w.send({"cancel": {"id": "long"}})
    first = w.answer()
    assert first == {"error": {"id": "long", "kind": "permanent", "type": "Cancelled",
                               "message": "cancelled by the server"}}
    assert w.answer() == {"ok": {"id": "short", "result": {"tag": "s"}}}


def test_unknown_task_and_bad_args_are_permanent_errors(worker):
    w = worker(TASKS)
    w.run("u1", "no_such_task", {})
    assert w.answer()["error"] == {"id": "u1", "kind": "permanent", "type": "UnknownTask",
                                   "message": "this program has no task named 'no_such_task'"}
    w.run("u2", "primes_below", {"m": 3})
    error = w.answer()["error"]
    assert (error["id"], error["kind"]) == ("u2", "permanent")


def test_exits_when_stdin_ends_after_answering_jobs_in_flight(worker):
    w = worker(TASKS)
    w.run("last", "nap", {"ms": 300})
    time.sleep(0.1)
    assert w.close() == 0
    assert w.answer(timeout=1) == {"ok": {"id": "last", "result": {"tag": ""}}}


def test_exits_on_shutdown(worker):
    w = worker(TASKS)
    w.send({"shutdown": {}})
    assert w.proc.wait(timeout=10) == 0


def test_exits_when_its_parent_is_gone(worker):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    w = worker(TASKS, OFFLOAD_PARENT_PID=str(parent.pid))
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert w.proc.wait(timeout=10) == 0  # within a couple of checks, stdin still open


def test_takes_its_process_group_along_when_its_parent_is_gone(worker):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    w = worker("""
        import os
        import subprocess
        from offload.worker import run, task

        os.setpgrp()  # a group of its own, as the server starts it

        @task
        def spawn() -> int:
            return subprocess.Popen(["sleep", "60"]).pid

        run()
    """, OFFLOAD_PARENT_PID=str(parent.pid))
    w.run("a", "spawn", {})
    child = w.answer()["ok"]["result"]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert w.proc.wait(timeout=10) == -signal.SIGKILL
    for _ in range(100):  # the child, reparented, is reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if ") Z " in f.read():
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the task's child {child} outlived its worker")


def test_an_io_task_raising_a_base_exception_is_still_answered(worker):
    w = worker("""
        from offload.worker import run, task

        class Abort(BaseException):
            pass

        @task(kind="io")
        async def abort(why: str) -> int:
            raise Abort(why)

        @task(kind="io")
        async def fine() -> int:
            return 1

        run()
    """)
    w.run("a", "abort", {"why": "no"})
    assert w.answer() == {"error": {"id": "a", "kind": "transient", "type": "Abort",
                                    "message": "no"}}
    w.run("b", "fine", {})
    assert w.answer() == {"ok": {"id": "b", "result": 1}}


def test_print_at_import_time_does_not_reach_the_protocol(worker):
    w = worker("""
        import sys
        from offload.worker import run, task
        sys.stdout = open(1, "w", buffering=1 << 16, closefd=False)  # buffered, as on a pipe
        print("at import")

        @task
        def one() -> int:
            return 1

        run()
    """, PYTHONUNBUFFERED="")
    w.run("a", "one", {})
    assert w.answer() == {"ok": {"id": "a", "result": 1}}


def test_an_unbuffered_print_while_the_program_loads_does_not_break_the_handshake(worker):
    # Under the server (OFFLOAD_PROTOCOL set), importing offload.worker takes stdout at once.
    w = worker("""
        from offload.worker import run, task
        print("loading my tasks", flush=True)

        @task
        def one() -> int:
            return 1

        run()
    """, PYTHONUNBUFFERED="1")
    w.run("a", "one", {})
    assert w.answer() == {"ok": {"id": "a", "result": 1}}
    assert w.close() == 0
    assert "loading my tasks" in "".join(w.stderr)


def test_the_example_program_starts_without_numpy(worker):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "python",
                           "tasks.py")
    with open(example) as f:
        w = worker(f.read())
    names = {t["name"] for t in w.ready["tasks"]}
    assert {"primes_below", "column_mean", "sleep_then_echo"} <= names
    w.run("p", "primes_below", {"n": 1000})
    assert w.answer() == {"ok": {"id": "p", "result": {"count": 168}}}


def test_the_example_column_mean_reads_a_blob_with_numpy(worker, tmp_path):
    pytest.importorskip("numpy")
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "python",
                           "tasks.py")
    with open(example) as f:
        w = worker(f.read())
    blob = tmp_path / "m"
    blob.write_bytes(struct.pack("<6d", 1, 10, 2, 20, 3, 30))
    w.run("m", "column_mean", {"data": "m", "columns": 2}, blobs={"data": str(blob)})
    assert w.answer() == {"ok": {"id": "m", "result": {"rows": 3, "mean": [2.0, 20.0]}}}
