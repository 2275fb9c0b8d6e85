"""Schemathesis hooks for offload: the one thing openapi.yaml cannot say.

A job spec names a task from the catalogue (`GET /v1/tasks`) and gives args that match that
task's own JSON Schema. The catalogue is not fixed: a program that embeds the library and every
`--task-program` add tasks at run time, so the spec can only say "a task name" and "an
object", and the server rightly answers 422 to a name it does not know. Left alone,
schemathesis's positive_data_acceptance check reports every such 422 as a schema-valid request
rejected.

So for the *positive* cases of the submit operations only, each spec names the built-in task
`noop` (which runs as io or cpu and takes `{}`), and its args are `{}`. Every other field stays
as generated, so kind, priority, attempts, timeouts, run_at, delay_ms, isolate and the
idempotency key are still checked in both directions. Negative cases are left exactly as
generated: whatever makes them invalid must still be refused.

A schedule (`createSchedule`) has the same job spec, and three fields whose valid values no
schema can list: its cron expression (a grammar), its time zone (the server's tz database) and
its name (unique, so a second positive case with a generated name collides with the first, a
409). Its positive cases get a cron expression and a time zone from small lists of valid ones,
and a name made unique by a counter; the rest stays as generated.

A `callback_url` must pass the server's address rules too (no literal loopback or private
address), which a URI format cannot say: positive cases get a public one. And `depends_on`
names stored jobs (or `#i` of the batch, without cycles), which no schema can know: positive
cases name none.

One more, for time only: `GET /v1/jobs/{id}?wait=S` holds the request up to S seconds (60 at
most) while the job is unfinished, and many generated jobs are scheduled years ahead. A
`wait` from 0.5 to 60 is cut to half a second, still a valid value, so that the run stays
within the request timeout and CI's time budget; out-of-range values are sent as generated.
"""

import schemathesis
from schemathesis.generation.modes import GenerationMode

SUBMITS = {"submitJob", "submitBatch"}
MAX_WAIT_S = 0.5
CRONS = ["*/5 * * * *", "0 9 * * MON-FRI", "30 */2 * * * *", "@hourly", "0 0 1 * *"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo"]
_made = 0


def _specs(body):
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("jobs"), list):
        return [s for s in body["jobs"] if isinstance(s, dict)]
    return [body]


@schemathesis.hook
def map_case(context, case):
    operation = context.operation
    if operation is None:
        return case
    operation_id = operation.definition.raw.get("operationId")
    if operation_id == "getJob":
        # Also in negative cases (whose fault may lie elsewhere, as in an unknown parameter);
        # a wait out of range is left as it is.
        wait = (case.query or {}).get("wait")
        try:
            seconds = float(wait) if not isinstance(wait, bool) else None
        except (TypeError, ValueError):
            seconds = None
        if seconds is not None and MAX_WAIT_S < seconds <= 60:
            case.query["wait"] = MAX_WAIT_S
        return case
    meta = case.meta
    if (
        operation_id == "createSchedule"
        and meta is not None
        and meta.generation.mode == GenerationMode.POSITIVE
        and isinstance(case.body, dict)
    ):
        global _made
        _made += 1
        body = case.body
        if isinstance(body.get("name"), str):
            body["name"] = f"{body['name'][:80]}-{_made}"
        body["cron"] = CRONS[_made % len(CRONS)]
        if "timezone" in body:
            body["timezone"] = ZONES[_made % len(ZONES)]
        for spec in _specs(body.get("job")):
            spec["task"] = "noop"
            if "args" in spec:
                spec["args"] = {}
            _refer(spec)
        return case
    if operation_id not in SUBMITS or meta is None or meta.generation.mode != GenerationMode.POSITIVE:
        return case
    header_key = None
    for name, value in (case.headers or {}).items():
        if name.lower() == "idempotency-key":
            header_key = value
    for spec in _specs(case.body):
        spec["task"] = "noop"
        if "args" in spec:
            spec["args"] = {}
        # The body's key and the header stand for one another; two different keys in one
        # request are refused (422), which the spec cannot say either.
        if header_key is not None and "idempotency_key" in spec:
            spec["idempotency_key"] = header_key
        _refer(spec)
    return case


def _refer(spec):
    # `depends_on` names stored jobs (or `#i` of the same batch, without cycles): a generated
    # string, or a well-formed id of no job, is rightly refused (422). Positive cases name none.
    spec.pop("depends_on", None)

    # A `callback_url` must also pass the server's address rules (a literal loopback or
    # private address is refused), which a URI format cannot say: positive cases get a
    # public one. (CI's server has a callback secret, so callbacks are on.)
    if "callback_url" in spec:
        spec["callback_url"] = "https://example.com/offload-callback"
