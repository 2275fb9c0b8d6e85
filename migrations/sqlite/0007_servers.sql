-- The servers using this store, one row each, written by its heartbeat: `/v1/stats` lists
-- them. Times are the store's clock (this process's, on SQLite). A server silent for long is
-- forgotten by maintenance; on SQLite, one server at a time, the rows of earlier processes go
-- at start.
CREATE TABLE servers (
    id           TEXT PRIMARY KEY,
    address      TEXT,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    lanes        TEXT NOT NULL
) STRICT;
