"""Helpers: a task program started as the server starts one, spoken to over its pipes."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A task program under test: send() messages to its stdin, recv() them from its stdout."""

    def __init__(self, script: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.stderr: list[str] = []
        self.pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                             daemon=True),
            threading.Thread(target=self._pump,
                             args=(self.proc.stderr, lambda b: self.stderr.append(b.decode())),
                             daemon=True),
        ]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream: Any, put: Callable[[bytes], None]) -> None:
        for line in stream:
            put(line)

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 10) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no message within {timeout} s; stderr:\n{''.join(self.stderr)}"
            ) from None
        assert line.endswith(b"\n")
        message = json.loads(line)  # anything but a JSON line fails the test here
        assert isinstance(message, dict) and len(message) == 1, message
        return message

    def run(self, job_id: str, task: str, args: dict[str, Any], **extra: Any) -> None:
        self.send({"run": {"id": job_id, "attempt": 1, "task": task, "args": args,
                           "blobs": extra.pop("blobs", {}), "part": None, **extra}})

    def answer(self, timeout: float = 10) -> dict[str, Any]:
        """The next ok or error message (skipping progress)."""
        while True:
            message = self.recv(timeout)
            if "progress" not in message:
                return message

    def close(self) -> int:
        """Closes stdin, waits for the exit, and for stdout and stderr to be read to the end."""
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=10)
            for pump in self.pumps:
                pump.join(timeout=10)
            return code
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def worker(tmp_path: Path):
    """start(source, **env) runs `source` (a task program) and reads its `ready` line."""
    started: list[WorkerProcess] = []

    def start(source: str, *, handshake: bool = True, **env: str) -> WorkerProcess:
        script = tmp_path / f"tasks_{len(started)}.py"
        script.write_text(textwrap.dedent(source))
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]),
            "OFFLOAD_PROTOCOL": "1",
            "OFFLOAD_DATA_DIR": str(tmp_path),
            "OFFLOAD_PARENT_PID": str(os.getpid()),
            **env,
        }
        w = WorkerProcess(script, environment)
        started.append(w)
        if handshake:
            w.ready = w.recv()["ready"]
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
