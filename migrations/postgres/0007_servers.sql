-- The servers sharing this schema, one row each, written by its heartbeat: `/v1/stats` lists
-- them. Times are the database's clock (microseconds, as in `jobs`), never a server's. A
-- server silent for long (it died) is forgotten by the others' maintenance.
CREATE TABLE servers (
    id           TEXT PRIMARY KEY,
    address      TEXT,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    lanes        JSONB NOT NULL
);
