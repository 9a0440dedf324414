-- Stores without bucket notifications (STORAGE_NOTIFICATIONS=none): ingest lists the upload prefix page by
-- page instead, and records in `listed_at` when a listing last saw each object. After a full pass, objects
-- believed present that the pass did not see are recorded as removed (vanished).
ALTER TABLE ingest.objects ADD COLUMN IF NOT EXISTS listed_at timestamptz;
