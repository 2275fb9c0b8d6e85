"""A small client for offload's HTTP API (`openapi.yaml`), on `http.client`.

    from offload.client import Client

    client = Client("http://127.0.0.1:8080")
    job = client.submit("primes_below", {"n": 1_000_000})
    done = client.wait(job["id"])          # long-polls until the job is final
    print(done["status"], done["result"])

One `Client` keeps one keep-alive connection and reuses it for every request; it is not for
sharing between threads (give each thread its own). An error answer raises `OffloadError`
with the server's problem+json: `status`, `title`, `detail`.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import io
import json
import os
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any, BinaryIO, Union

__all__ = ["ChecksumMismatch", "Client", "OffloadError"]

FINAL = frozenset({"succeeded", "failed", "cancelled"})
_CHUNK = 1 << 20


class OffloadError(Exception):
    """The server answered with an error: its problem+json (RFC 9457) as attributes."""

    def __init__(self, status: int, title: str, detail: str, type: str = "about:blank",
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.retry_after = retry_after  # seconds, from Retry-After on a 429 or 503


class ChecksumMismatch(OffloadError):
    """The sha256 the server reports for a blob is not the one of the bytes sent or read."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(0, "Checksum mismatch", f"expected sha256 {expected}, got {got}")
        self.expected = expected
        self.got = got


class _HashingReader:
    """A file-like body for http.client that hashes what it hands over."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        return data


Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", BinaryIO]


class Client:
    """A connection to one offload server.

    `base_url` is the server's address (a path after the host is kept as a prefix);
    `token` is sent as `Authorization: Bearer <token>`; `timeout` (seconds) bounds each
    socket operation (a long poll adds its wait to it).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None,
                 timeout: float = 30) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be http:// or https:// and name a host: {base_url!r}")
        self._scheme = url.scheme
        self._host = url.hostname
        self._port = url.port
        self._prefix = url.path.rstrip("/")
        self._timeout = timeout
        self._headers = {"User-Agent": "offload-python/0.1", "Accept": "application/json"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, task: str, args: dict[str, Any] | None = None, **options: Any) -> dict:
        """Submits a job and returns it (202, or 200 for an idempotency key seen before).

        `options` are the job spec's other fields: kind, priority, max_attempts, timeout_ms,
        delay_ms, run_at (a string, or an aware `datetime`), idempotency_key, isolate,
        callback_url (POSTed the job, signed, once it is final). None leaves an option out.
        """
        return self._json("POST", "/v1/jobs", _spec(task, args, options))

    def batch(self, specs: Iterable[dict[str, Any]]) -> list[dict]:
        """Submits up to 1000 job specs at once, all or nothing; returns the jobs in order."""
        body = {"jobs": [_spec(s["task"], s.get("args"),
                               {k: v for k, v in s.items() if k not in ("task", "args")})
                         for s in specs]}
        return self._json("POST", "/v1/jobs/batch", body)["jobs"]

    def get(self, id: str, wait: float | None = None) -> dict:
        """The job; with `wait`, the server holds the answer until it is final or `wait`
        seconds (at most 60) pass."""
        query = f"?wait={wait:g}" if wait is not None else ""
        return self._json("GET", f"/v1/jobs/{_quote(id)}{query}",
                          timeout_extra=wait or 0)

    def wait(self, id: str, timeout: float = 60) -> dict:
        """Long-polls until the job is final and returns it; TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            job = self.get(id, wait=min(max(left, 0), 60))
            if job["status"] in FINAL:
                return job
            if deadline - time.monotonic() <= 0:
                raise TimeoutError(f"job {id} is still {job['status']} after {timeout:g} s")

    def cancel(self, id: str) -> dict:
        """Cancels a queued or running job and returns it (409 if it is already final)."""
        return self._json("POST", f"/v1/jobs/{_quote(id)}/cancel")

    def delete(self, id: str) -> None:
        """Deletes a finished job (409 while it is unfinished)."""
        self._request("DELETE", f"/v1/jobs/{_quote(id)}")

    def jobs(self, **filters: Any) -> dict:
        """A page of jobs, newest first: `{"jobs": [...], "next_cursor": ...}`; filters are
        status, task, kind, limit and cursor."""
        query = urllib.parse.urlencode({k: v for k, v in filters.items() if v is not None})
        return self._json("GET", "/v1/jobs" + (f"?{query}" if query else ""))

    def tasks(self) -> list[dict]:
        """The task catalogue, each task with its args' JSON Schema."""
        return self._json("GET", "/v1/tasks")["tasks"]

    # -- blobs --------------------------------------------------------------------------

    def upload(self, data: Source, keep: bool = False) -> dict:
        """Uploads a blob and returns `{"id", "size", "sha256", "keep"}`.

        `data` is bytes, a path, or a binary file open for reading; files are streamed in
        1 MiB reads, never read whole. The sha256 the server answers is checked against the
        one of the bytes sent (ChecksumMismatch if they differ).
        """
        path = f"/v1/blobs?keep={'true' if keep else 'false'}"
        headers = {"Content-Type": "application/octet-stream"}
        if isinstance(data, (bytes, bytearray, memoryview)):
            digest = hashlib.sha256(data).hexdigest()
            blob = self._json("POST", path, raw=bytes(data), headers=headers)
        elif isinstance(data, (str, os.PathLike)):
            with open(data, "rb") as f:
                return self.upload(f, keep=keep)
        else:
            size = _remaining(data)
            if size is not None:
                headers["Content-Length"] = str(size)
            reader = _HashingReader(data)
            blob = self._json("POST", path, raw=reader, headers=headers)
            digest = reader.sha256.hexdigest()
        if blob.get("sha256") != digest:
            raise ChecksumMismatch(digest, str(blob.get("sha256")))
        return blob

    def download(self, id: str, sha256: str | None = None) -> bytes:
        """A blob's bytes. The API offers no blob metadata to check them against, so pass
        `sha256` (from `upload`'s answer) to have them checked; the length is always checked
        against Content-Length."""
        data = self._request("GET", f"/v1/blobs/{_quote(id)}",
                             headers={"Accept": "application/octet-stream"})
        if sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != sha256:
                raise ChecksumMismatch(sha256, got)
        return data

    def delete_blob(self, id: str) -> None:
        """Deletes a blob (409 while an unfinished job uses it)."""
        self._request("DELETE", f"/v1/blobs/{_quote(id)}")

    # -- the connection -----------------------------------------------------------------

    def _json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        if body is not None:
            kw["raw"] = json.dumps(body).encode()
            kw["headers"] = {"Content-Type": "application/json", **kw.get("headers", {})}
        return json.loads(self._request(method, path, **kw) or b"null")

    def _request(self, method: str, path: str, raw: Any = None,
                 headers: dict[str, str] | None = None, timeout_extra: float = 0) -> bytes:
        headers = {**self._headers, **(headers or {})}
        rewindable = not hasattr(raw, "read")
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection(self._timeout + timeout_extra)
            try:
                conn.request(method, self._prefix + path, body=raw, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                # A kept-alive connection the server closed while idle: the request never
                # reached it, so it is sent again once, on a fresh connection (a streamed
                # upload cannot be rewound, and is not).
                if attempt == 1 and reused and rewindable:
                    continue
                raise
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            if response.status >= 400:
                raise _problem(response, data)
            return data
        raise AssertionError("unreachable")

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (http.client.HTTPSConnection if self._scheme == "https"
                   else http.client.HTTPConnection)
            self._conn = cls(self._host, self._port, timeout=timeout, blocksize=_CHUNK)
        elif self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        self._conn.timeout = timeout
        return self._conn


def _spec(task: str, args: dict[str, Any] | None, options: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"task": task}
    if args is not None:
        spec["args"] = args
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                raise ValueError(f"{key}: give an aware datetime (with a time zone)")
            value = value.isoformat()
        spec[key] = value
    return spec


def _quote(id: str) -> str:
    return urllib.parse.quote(str(id), safe="")


def _remaining(f: BinaryIO) -> int | None:
    """The bytes left in a seekable file, for Content-Length; None streams it chunked."""
    try:
        here = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(here)
    except (AttributeError, OSError, ValueError):
        return None
    return end - here


def _problem(response: http.client.HTTPResponse, data: bytes) -> OffloadError:
    retry_after = response.getheader("Retry-After")
    try:
        problem = json.loads(data)
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"detail": data.decode("utf-8", "replace")}
    return OffloadError(
        int(problem.get("status", response.status)),
        str(problem.get("title", response.reason)),
        str(problem.get("detail", "")),
        str(problem.get("type", "about:blank")),
        float(retry_after) if retry_after and retry_after.isdigit() else None,
    )
