-- The claim's probes ask whether a lane has flow-controlled jobs queued, and when its first
-- scheduled job is due. With `flow` in the key each is answered at the head of one range of
-- this index, whichever jobs of the other kind are queued beside them: the old index
-- (executor, scheduled_at) made the planner walk every queued plain job of the lane to find
-- a flow-controlled one when its statistics were stale (a queue table's statistics always
-- are: they are taken while the queue is empty).
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (executor, flow, scheduled_at) WHERE status = 'queued';
