-- Multipart uploads: the S3 upload id of an upload whose parts are PUT separately (from UploadInitiated).
-- While it is not completed, its parts sit in the bucket; the sweeper aborts it once it is older than
-- INGEST_MULTIPART_TTL_SECONDS and rejects the upload as expired.
ALTER TABLE ingest.uploads ADD COLUMN IF NOT EXISTS multipart_upload_id text;
CREATE INDEX IF NOT EXISTS uploads_open_multipart ON ingest.uploads (initiated_at)
    WHERE multipart_upload_id IS NOT NULL AND verdict IS NULL AND completed_at IS NULL;
