-- Schedules: a cron expression in a time zone that makes a job at each tick (src/schedule/).
-- Each tick's job carries the idempotency key `schedule:<name>:<tick µs>` and is stored in the
-- transaction that moves `next_run` on, guarded by the `next_run` the ticker read: one job per
-- tick, whatever restarts.
CREATE TABLE schedules (
    name        TEXT    PRIMARY KEY NOT NULL,
    cron        TEXT    NOT NULL,
    timezone    TEXT    NOT NULL,                 -- IANA name
    job         TEXT    NOT NULL,                 -- the job spec, JSON, as given
    catch_up    TEXT    NOT NULL CHECK (catch_up IN ('none', 'one', 'all')),
    paused      INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    next_run    INTEGER NOT NULL,                 -- the next tick due, µs since the epoch
    last_tick   INTEGER,                          -- the latest tick a job was made for
    last_error  TEXT,                             -- why the latest wake-up made no job
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
-- what the tickers sleep until: the soonest active schedule
CREATE INDEX schedules_due ON schedules (next_run) WHERE paused = 0;
-- A schedule's recent jobs are found by their keys' range on jobs_idempotency_key (BINARY
-- collation: byte order is tick order).
