-- Jobs that depend on jobs, and retries by hand: a new status, `waiting` (for its parents).
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('waiting', 'queued', 'running', 'succeeded', 'failed', 'cancelled'));

-- The parents a job waits for, as a JSON array of ids (NULL: none), as the job lists them.
ALTER TABLE jobs ADD COLUMN depends_on JSONB;
-- Whether it runs once its parents are final even if one failed or was cancelled.
ALTER TABLE jobs ADD COLUMN run_on_parent_failure BOOLEAN NOT NULL DEFAULT FALSE;
-- How many times it was retried by hand (POST /v1/jobs/{id}/retry).
ALTER TABLE jobs ADD COLUMN retried INTEGER NOT NULL DEFAULT 0 CHECK (retried >= 0);

-- The edges, for finding a parent's children when it finishes (and a child's parents). A
-- parent may be deleted (pruned) before its child: no foreign key on parent_id.
CREATE TABLE job_deps (
    parent_id UUID NOT NULL,
    child_id  UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX job_deps_child ON job_deps (child_id);
