-- Blobs: byte arrays uploaded once and read by many jobs. The bytes live in
-- <data-dir>/blobs/<id>; this table says which blobs exist, and is written only after the file
-- is complete, synced and renamed into place.
CREATE TABLE blobs (
    id         TEXT    PRIMARY KEY NOT NULL,   -- UUID v7
    size       INTEGER NOT NULL CHECK (size >= 0),
    sha256     TEXT    NOT NULL,
    created_at INTEGER NOT NULL                -- microseconds since the Unix epoch
) STRICT;
