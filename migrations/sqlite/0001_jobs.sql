-- The jobs table. Every write in src/store/sqlite.rs is one move of the state machine in
-- src/job.rs (JobStatus::can_become), guarded by the status it starts from; these CHECKs keep
-- the stored rows consistent with it whatever the code does.
CREATE TABLE jobs (
    id              TEXT    PRIMARY KEY NOT NULL,   -- UUID v7: sorts by creation time
    task            TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('io', 'cpu')),
    executor        TEXT    NOT NULL CHECK (executor IN ('async', 'blocking', 'rayon', 'process')),
    status          TEXT    NOT NULL
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    args            TEXT    NOT NULL,               -- JSON
    result          TEXT,                           -- JSON, set when succeeded
    error           TEXT,                           -- JSON {"type", "message"}
    priority        INTEGER NOT NULL DEFAULT 0,
    attempt         INTEGER NOT NULL DEFAULT 0,     -- attempts started so far
    max_attempts    INTEGER NOT NULL,
    timeout_ms      INTEGER,
    progress        REAL    NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    spec_hash       TEXT,
    created_at      INTEGER NOT NULL,               -- microseconds since the Unix epoch
    scheduled_at    INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    CHECK (max_attempts >= 1 AND attempt >= 0 AND attempt <= max_attempts),
    CHECK (progress >= 0 AND progress <= 1),
    -- a job has a finish time exactly when it is in a final state
    CHECK ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    -- a running job has started, and has used an attempt
    CHECK (status <> 'running' OR (started_at IS NOT NULL AND attempt >= 1)),
    CHECK (status <> 'succeeded' OR result IS NOT NULL)
) STRICT;

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- listing by status, recovery of running jobs at start
CREATE INDEX jobs_status ON jobs (status, id);
CREATE INDEX jobs_task ON jobs (task, id);
-- retention: pruning the oldest finished jobs
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;
