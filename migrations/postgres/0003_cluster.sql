-- Several servers on one database: a running job belongs to a server (owner) for as long as
-- it renews its lease; another server requeues it when the lease runs out. Every change is
-- announced on the schema's channel, so servers wake without polling: `new:<executor>` when
-- a job becomes queued, `cancel:<id>` when a running job is cancelled, `change:<id>` on any
-- update (long-polls and event streams on other servers).
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until BIGINT;
CREATE INDEX jobs_running_lease ON jobs (lease_until) WHERE status = 'running';

CREATE FUNCTION offload_notify() RETURNS trigger AS $$
DECLARE
    channel TEXT := 'offload_' || current_schema();
BEGIN
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status <> 'queued') THEN
        PERFORM pg_notify(channel, 'new:' || NEW.executor);
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF NEW.status = 'cancelled' AND OLD.status = 'running' THEN
            PERFORM pg_notify(channel, 'cancel:' || NEW.id::text);
        END IF;
        PERFORM pg_notify(channel, 'change:' || NEW.id::text);
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION offload_notify();
