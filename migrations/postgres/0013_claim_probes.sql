-- The claim's probes ask whether a lane has flow-controlled jobs queued, and when its first
-- scheduled job is due. With `flow` in the key each is answered at the head of one range of
-- this index, whichever jobs of the other kind are queued beside them: the old index
-- (executor, scheduled_at) made the planner walk every queued plain job of the lane to find
-- a flow-controlled one when its statistics were stale (a queue table's statistics always
-- are: they are taken while the queue is empty).
DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (executor, flow, scheduled_at) WHERE status = 'queued';

-- Every job passes through the partial indexes above and leaves a dead entry in each until a
-- vacuum removes it; claims walk those entries. Vacuum the queue after every 10,000 changed
-- rows, unthrottled, rather than after a fifth of the table: a busy queue's table is mostly
-- finished jobs, and a fifth of it is many minutes of dead entries. (Analyze is left as it
-- was: a queue's statistics are a snapshot of a moment, and the statements that must not
-- depend on them are written not to.)
ALTER TABLE jobs SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_cost_delay = 0
);
