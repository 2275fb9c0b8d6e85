-- Completion callbacks. A job may name a URL to POST itself to once it is final; the outbox
-- row below is written in the same transaction as the job's move into a final state, so a
-- crash between the two loses nothing, and the delivery task works from it: claim what is
-- due (the claim pushes due_at out by a lease), POST, record the outcome.
ALTER TABLE jobs ADD COLUMN callback_url TEXT;

CREATE TABLE callbacks (
    job_id     TEXT    PRIMARY KEY NOT NULL,
    status     TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts   INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),   -- deliveries tried
    last_error TEXT,
    since      INTEGER NOT NULL,   -- when the job became final: the retry window starts here
    due_at     INTEGER NOT NULL,   -- the next try; while one runs, when its lease ends
    done_at    INTEGER,            -- delivered or given up
    CHECK ((status = 'pending') = (done_at IS NULL))
) STRICT, WITHOUT ROWID;
-- the delivery task's claim: pending rows in due order
CREATE INDEX callbacks_due ON callbacks (due_at) WHERE status = 'pending';
CREATE TRIGGER jobs_forget_callbacks AFTER DELETE ON jobs BEGIN
    DELETE FROM callbacks WHERE job_id = OLD.id;
END;
