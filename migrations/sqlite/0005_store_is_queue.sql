-- The store is the queue: lanes claim due jobs straight from this table, in priority then
-- schedule order, and running jobs hold a lease (owner, expiry) on SQLite too, so both stores
-- speak one claim protocol.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until INTEGER;
-- a lane's claim: due queued jobs by priority, then schedule
CREATE INDEX jobs_ready ON jobs (executor, priority DESC, scheduled_at, id) WHERE status = 'queued';
-- when a lane's next delayed job is due
CREATE INDEX jobs_due ON jobs (executor, scheduled_at) WHERE status = 'queued';
-- rescuing the running jobs of a server whose lease ran out
CREATE INDEX jobs_running_lease ON jobs (lease_until) WHERE status = 'running';

-- Which blobs a job names, from its task's blob arguments (`Task::blob_args`), whatever the
-- arguments are called: what keeps a blob from being deleted or pruned while a job needs it.
CREATE TABLE job_blobs (
    blob_id TEXT NOT NULL,
    job_id  TEXT NOT NULL,
    PRIMARY KEY (blob_id, job_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX job_blobs_job ON job_blobs (job_id);
INSERT OR IGNORE INTO job_blobs (blob_id, job_id)
    SELECT json_extract(args, '$.blob'), id FROM jobs
    WHERE json_type(args, '$.blob') = 'text';
CREATE TRIGGER jobs_forget_blobs AFTER DELETE ON jobs BEGIN
    DELETE FROM job_blobs WHERE job_id = OLD.id;
END;
