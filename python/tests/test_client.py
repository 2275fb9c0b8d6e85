"""offload.client: against an in-process stub server always, and against the real server when
OFFLOAD_BIN names its binary (e.g. OFFLOAD_BIN=target/debug/offload)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from offload.client import ChecksumMismatch, Client, OffloadError

# -- a stub: records requests, answers from a script ------------------------------------


class Stub(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.requests: list[dict] = []
        self.connections: set[int] = set()
        self.blob = b""
        self.job_polls = 0
        self.lie = False


class StubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Stub

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return data
                data += chunk
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, status: int, body: object, content_type: str = "application/json",
                **headers: str) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        body = self._body()
        s = self.server
        s.connections.add(self.client_address[1])
        s.requests.append({"method": method, "path": self.path, "body": body,
                           "headers": dict(self.headers)})
        if self.path == "/v1/jobs" and method == "POST":
            spec = json.loads(body)
            self._answer(202, {"id": "j1", "status": "queued", **spec}, Location="/v1/jobs/j1")
        elif self.path.startswith("/v1/jobs/j1?wait="):
            s.job_polls += 1
            status = "succeeded" if s.job_polls >= 2 else "running"
            self._answer(200, {"id": "j1", "status": status, "result": {"x": 1}})
        elif self.path.startswith("/v1/jobs/slow?wait="):
            self._answer(200, {"id": "slow", "status": "running"})
        elif self.path.startswith("/v1/blobs?"):
            s.blob = body
            sha = "0" * 64 if s.lie else hashlib.sha256(body).hexdigest()
            self._answer(201, {"id": "b1", "size": len(body), "sha256": sha, "keep": False})
        elif self.path == "/v1/blobs/b1":
            self._answer(200, s.blob, "application/octet-stream")
        elif self.path == "/v1/jobs/full":
            self._answer(429, {"type": "https://offload.dev/problems/queue-full",
                               "title": "Queue full", "status": 429,
                               "detail": "try again later"},
                         "application/problem+json", Retry_After="3")
        else:
            self._answer(404, {"type": "https://offload.dev/problems/not-found",
                               "title": "Not found", "status": 404,
                               "detail": f"no route {self.path}"}, "application/problem+json")


@pytest.fixture
def stub():
    server = Stub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def stub_client(stub):
    with Client(f"http://127.0.0.1:{stub.server_address[1]}", token="t0k") as c:
        yield c


def test_submit_sends_the_spec_with_the_token(stub, stub_client):
    job = stub_client.submit("sleep", {"ms": 5}, priority=3, timeout_ms=100, run_at=None)
    assert job["id"] == "j1"
    request = stub.requests[-1]
    assert json.loads(request["body"]) == {"task": "sleep", "args": {"ms": 5}, "priority": 3,
                                           "timeout_ms": 100}
    assert request["headers"]["Authorization"] == "Bearer t0k"
    assert request["headers"]["Content-Type"] == "application/json"


def test_one_connection_is_reused(stub, stub_client):
    for _ in range(5):
        stub_client.submit("noop")
    assert len(stub.connections) == 1


def test_wait_long_polls_until_final(stub, stub_client):
    job = stub_client.wait("j1", timeout=10)
    assert job["status"] == "succeeded"
    assert stub.job_polls == 2
    assert all(r["path"].startswith("/v1/jobs/j1?wait=") for r in stub.requests)


def test_wait_raises_on_timeout(stub, stub_client):
    with pytest.raises(TimeoutError, match="still running"):
        stub_client.wait("slow", timeout=0.2)


def test_errors_carry_the_problem(stub_client):
    with pytest.raises(OffloadError) as e:
        stub_client.get("nope")
    assert (e.value.status, e.value.title) == (404, "Not found")
    assert e.value.detail == "no route /v1/jobs/nope"
    with pytest.raises(OffloadError) as e:
        stub_client.get("full")
    assert (e.value.status, e.value.retry_after) == (429, 3.0)


@pytest.mark.parametrize("form", ["bytes", "path", "file", "pipe"])
def test_upload_streams_and_checks_the_sha256(stub, stub_client, tmp_path, form):
    data = os.urandom(3 << 20)
    source: object = data
    if form in ("path", "file"):
        (tmp_path / "blob").write_bytes(data)
        source = tmp_path / "blob" if form == "path" else open(tmp_path / "blob", "rb")  # noqa: SIM115
    elif form == "pipe":
        source = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]
        source.seekable = lambda: False  # type: ignore[method-assign]
        source.tell = _unseekable  # type: ignore[method-assign]
    blob = stub_client.upload(source, keep=False)
    assert blob["size"] == len(data)
    assert stub.blob == data
    assert stub_client.download("b1", sha256=blob["sha256"]) == data


def _unseekable() -> int:
    raise OSError("not seekable")


def test_upload_refuses_a_wrong_sha256(stub, stub_client):
    stub.lie = True  # the stub answers a sha256 that is not the bytes'
    with pytest.raises(ChecksumMismatch):
        stub_client.upload(b"abc")


def test_download_checks_a_given_sha256(stub, stub_client):
    stub.blob = b"hello"
    with pytest.raises(ChecksumMismatch):
        stub_client.download("b1", sha256="0" * 64)


# -- the real server -----------------------------------------------------------------------

OFFLOAD_BIN = os.environ.get("OFFLOAD_BIN")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not OFFLOAD_BIN:
        pytest.skip("OFFLOAD_BIN is not set: the client is not tried against the real server "
                    "(OFFLOAD_BIN=target/debug/offload pytest python/tests)")
    data_dir = tmp_path_factory.mktemp("offload-data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([OFFLOAD_BIN, "serve", "--bind", f"127.0.0.1:{port}",
                             "--data-dir", str(data_dir)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((data_dir / "server.log").read_text()) from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_real_server_submit_wait_cancel(server):
    with Client(server) as c:
        job = c.submit("sum_squares", {"n": 1000}, priority=1, max_attempts=1)
        done = c.wait(job["id"], timeout=30)
        assert (done["status"], done["result"]) == ("succeeded", {"sum": "332833500"})
        sleeper = c.submit("sleep", {"ms": 60000})
        assert c.cancel(sleeper["id"])["status"] == "cancelled"
        with pytest.raises(OffloadError) as e:
            c.cancel(sleeper["id"])
        assert e.value.status == 409
        jobs = c.batch([{"task": "noop"}, {"task": "noop", "kind": "cpu"}])
        assert [j["task"] for j in jobs] == ["noop", "noop"]
        assert any(t["name"] == "sum_squares" for t in c.tasks())


def test_real_server_problem(server):
    with Client(server) as c, pytest.raises(OffloadError) as e:
        c.submit("sleep", {"ms": "soon"})
    assert e.value.status == 422
    assert "args.ms" in e.value.detail


def test_real_server_blob_round_trip(server, tmp_path):
    import struct

    data = struct.pack("<1000d", *range(1, 1001))
    (tmp_path / "a.f64").write_bytes(data)
    with Client(server) as c:
        blob = c.upload(tmp_path / "a.f64")
        assert blob["size"] == 8000
        assert c.download(blob["id"], sha256=blob["sha256"]) == data
        stats = c.wait(c.submit("array_stats", {"blob": blob["id"]})["id"], timeout=30)
        assert stats["result"]["mean"] == 500.5
        c.delete_blob(blob["id"])
        with pytest.raises(OffloadError) as e:
            c.download(blob["id"])
        assert e.value.status == 404
