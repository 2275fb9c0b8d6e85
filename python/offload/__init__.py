"""offload for Python: serve functions as offload tasks, and submit jobs to an offload server.

- `offload.worker`: `@task`, `progress`, `run` and `Permanent`, the worker side of the
  worker protocol (`docs/worker-protocol.md`), for task programs the server starts.
- `offload.client`: `Client`, a small HTTP client for the job API (`openapi.yaml`).
"""

__version__ = "0.1.0"
