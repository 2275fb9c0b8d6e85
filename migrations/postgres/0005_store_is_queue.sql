-- Which blobs a job names, from its task's blob arguments (`Task::blob_args`), whatever the
-- arguments are called: what keeps a blob from being deleted or pruned while a job needs it.
CREATE TABLE job_blobs (
    blob_id UUID NOT NULL,
    job_id  UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (blob_id, job_id)
);
CREATE INDEX job_blobs_job ON job_blobs (job_id);
INSERT INTO job_blobs (blob_id, job_id)
    SELECT (args->>'blob')::uuid, id FROM jobs
    WHERE jsonb_typeof(args->'blob') = 'string'
      AND args->>'blob' ~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$'
ON CONFLICT DO NOTHING;
-- when a lane's next delayed job is due
CREATE INDEX jobs_due ON jobs (executor, scheduled_at) WHERE status = 'queued';
