-- Retention of blobs: a blob that jobs have used goes with the last of them, unless it was
-- uploaded to be kept (POST /v1/blobs?keep=true). A blob no job has used yet stays.
ALTER TABLE blobs ADD COLUMN keep INTEGER NOT NULL DEFAULT 0 CHECK (keep IN (0, 1));
ALTER TABLE blobs ADD COLUMN used INTEGER NOT NULL DEFAULT 0 CHECK (used IN (0, 1));
