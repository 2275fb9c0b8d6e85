-- The jobs and blobs tables for PostgreSQL: the same states and CHECKs as the SQLite schema
-- (migrations/sqlite), with native UUIDs and JSONB.
CREATE TABLE jobs (
    id              UUID    PRIMARY KEY,            -- UUID v7: sorts by creation time
    task            TEXT    NOT NULL,
    kind            TEXT    NOT NULL CHECK (kind IN ('io', 'cpu')),
    executor        TEXT    NOT NULL CHECK (executor IN ('async', 'blocking', 'rayon', 'process')),
    status          TEXT    NOT NULL
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    args            JSONB   NOT NULL,
    result          JSONB,
    error           JSONB,
    priority        INTEGER NOT NULL DEFAULT 0,
    attempt         INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    timeout_ms      BIGINT,
    progress        DOUBLE PRECISION NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    spec_hash       TEXT,
    created_at      BIGINT  NOT NULL,               -- microseconds since the Unix epoch
    scheduled_at    BIGINT  NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    CHECK (max_attempts >= 1 AND attempt >= 0 AND attempt <= max_attempts),
    CHECK (progress >= 0 AND progress <= 1),
    CHECK ((status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (status <> 'running' OR (started_at IS NOT NULL AND attempt >= 1)),
    CHECK (status <> 'succeeded' OR result IS NOT NULL)
);

CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_status ON jobs (status, id);
CREATE INDEX jobs_task ON jobs (task, id);
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;
-- claiming in priority and schedule order (the multi-server claimer)
CREATE INDEX jobs_ready ON jobs (executor, priority DESC, scheduled_at, id) WHERE status = 'queued';

CREATE TABLE blobs (
    id         UUID    PRIMARY KEY,
    size       BIGINT  NOT NULL CHECK (size >= 0),
    sha256     TEXT    NOT NULL,
    created_at BIGINT  NOT NULL
);
