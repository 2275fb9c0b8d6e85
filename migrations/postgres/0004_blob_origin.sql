-- Blobs across servers: the address of the server that took the upload, from which another
-- server fetches (and keeps) the bytes when it runs a job that names the blob.
ALTER TABLE blobs ADD COLUMN origin TEXT;
