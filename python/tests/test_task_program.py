"""examples/python/tasks.py served by the real server (`offload serve --task-program`), when
OFFLOAD_BIN names a binary that has the flag."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from offload.client import Client

ROOT = Path(__file__).resolve().parents[2]
OFFLOAD_BIN = os.environ.get("OFFLOAD_BIN")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not OFFLOAD_BIN:
        pytest.skip("OFFLOAD_BIN is not set: task programs are not tried against the server")
    help_text = subprocess.run([OFFLOAD_BIN, "serve", "--help"], capture_output=True,
                               text=True).stdout
    if "--task-program" not in help_text:
        pytest.skip(f"{OFFLOAD_BIN} has no --task-program flag")
    data_dir = tmp_path_factory.mktemp("offload-data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115
    program = f"{sys.executable} {ROOT / 'examples' / 'python' / 'tasks.py'}"
    proc = subprocess.Popen([OFFLOAD_BIN, "serve", "--bind", f"127.0.0.1:{port}",
                             "--data-dir", str(data_dir), "--task-program", program],
                            stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            urllib.request.urlopen(url + "/readyz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((data_dir / "server.log").read_text()) from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_python_tasks_join_the_catalogue_and_run(server):
    with Client(server) as c:
        names = {t["name"] for t in c.tasks()}
        assert {"primes_below", "column_mean", "sleep_then_echo"} <= names
        done = c.wait(c.submit("primes_below", {"n": 1000})["id"], timeout=60)
        assert (done["status"], done["result"]) == ("succeeded", {"count": 168})
        echo = c.wait(c.submit("sleep_then_echo", {"ms": 10, "message": "hi"})["id"], timeout=60)
        assert echo["result"] == {"slept_ms": 10, "message": "hi"}


def test_python_task_reads_a_blob(server):
    pytest.importorskip("numpy")
    with Client(server) as c:
        blob = c.upload(struct.pack("<6d", 1, 10, 2, 20, 3, 30))
        done = c.wait(c.submit("column_mean", {"data": blob["id"], "columns": 2})["id"],
                      timeout=60)
        assert done["result"] == {"rows": 3, "mean": [2.0, 20.0]}
