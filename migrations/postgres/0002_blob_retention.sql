-- Retention of blobs: a blob that jobs have used goes with the last of them, unless it was
-- uploaded to be kept (POST /v1/blobs?keep=true). A blob no job has used yet stays.
ALTER TABLE blobs ADD COLUMN keep BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE blobs ADD COLUMN used BOOLEAN NOT NULL DEFAULT FALSE;
