-- Schedules: the same table as migrations/sqlite/0009_schedules.sql. Each tick's job carries
-- the idempotency key `schedule:<name>:<tick µs>` and is stored in the transaction that moves
-- `next_run` on, guarded by the `next_run` the ticker read (its row lock makes a second
-- server's guard see the first one's move): one job per tick across servers.
CREATE TABLE schedules (
    name        TEXT    PRIMARY KEY,
    cron        TEXT    NOT NULL,
    timezone    TEXT    NOT NULL,
    job         JSONB   NOT NULL,
    catch_up    TEXT    NOT NULL CHECK (catch_up IN ('none', 'one', 'all')),
    paused      BOOLEAN NOT NULL DEFAULT FALSE,
    next_run    BIGINT  NOT NULL,
    last_tick   BIGINT,
    last_error  TEXT,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_run) WHERE NOT paused;
-- A schedule's recent jobs, by their keys' range in byte order (the database's collation may
-- order `:` and digits otherwise); only schedules' jobs are in it.
CREATE INDEX jobs_schedule_key ON jobs ((idempotency_key COLLATE "C"))
    WHERE idempotency_key LIKE 'schedule:%';
