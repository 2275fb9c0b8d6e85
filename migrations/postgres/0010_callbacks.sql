-- Completion callbacks: the same outbox as SQLite's (migrations/sqlite/0010_callbacks.sql).
-- The row is written in the same transaction as the job's move into a final state; servers
-- claim due rows with FOR UPDATE SKIP LOCKED and push due_at out by a lease while they
-- deliver, so no two deliver one row at once.
ALTER TABLE jobs ADD COLUMN callback_url TEXT;

CREATE TABLE callbacks (
    job_id     UUID    PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    status     TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts   INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error TEXT,
    since      BIGINT  NOT NULL,
    due_at     BIGINT  NOT NULL,
    done_at    BIGINT,
    CHECK ((status = 'pending') = (done_at IS NULL))
);
CREATE INDEX callbacks_due ON callbacks (due_at) WHERE status = 'pending';
