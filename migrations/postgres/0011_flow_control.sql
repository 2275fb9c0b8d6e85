-- Flow control (src/flow.rs): a job may name a tenant (shares its lane round-robin with other
-- tenants), a concurrency key with its limit, and a rate key with its token bucket's rate.
-- `flow` says whether it names any of them. The plain claim, and its index `jobs_ready`, see
-- only jobs without flow control, so a lane with none queued pays nothing for it; the
-- flow-aware claim reads `jobs_flow_ready` tenant by tenant.
ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT '';   -- '' for none
ALTER TABLE jobs ADD COLUMN concurrency_key TEXT;
ALTER TABLE jobs ADD COLUMN concurrency_limit INTEGER;
ALTER TABLE jobs ADD COLUMN rate_key TEXT;
ALTER TABLE jobs ADD COLUMN rate_per_second DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN rate_burst INTEGER;
ALTER TABLE jobs ADD COLUMN flow BOOLEAN NOT NULL DEFAULT FALSE;

DROP INDEX jobs_ready;
-- the plain claim: due queued jobs without flow control, by priority then schedule
CREATE INDEX jobs_ready ON jobs (executor, priority DESC, scheduled_at, id)
    WHERE status = 'queued' AND NOT flow;
-- the flow-aware claim: a tenant's due queued jobs in claim order; and whether a lane has any
CREATE INDEX jobs_flow_ready ON jobs (executor, tenant, priority DESC, scheduled_at, id)
    WHERE status = 'queued' AND flow;
-- how many jobs of a concurrency key run
CREATE INDEX jobs_running_key ON jobs (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;

-- A rate key's token bucket: `tokens` at `updated_at` (microseconds). A key with no row has a
-- full bucket; a claim that takes tokens writes the row, under the key's advisory lock.
CREATE TABLE rate_buckets (
    key        TEXT             PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at BIGINT           NOT NULL
);
