-- Notifications per write, not per row: the store sends them itself, inside the transaction
-- that made the change (one `new:<executor>` per lane and one `change:<id>,...` list per
-- round of the batcher; `cancel:<id>` from a cancel), so they arrive at its commit as before.
-- The per-row trigger sent one NOTIFY for every changed row, lease renewals and claims
-- included, each taking the notification queue's lock until its transaction committed.
DROP TRIGGER IF EXISTS jobs_notify ON jobs;
DROP FUNCTION IF EXISTS offload_notify();
