-- Failed verifications of an upload (not counting infrastructure outages, which are retried without end):
-- at INGEST_MAX_VERIFY_ATTEMPTS the upload is rejected as `unverifiable` with the last error.
ALTER TABLE ingest.uploads ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;
ALTER TABLE ingest.uploads ADD COLUMN IF NOT EXISTS last_error text;
