-- The ingest worker's own state, in its own schema. It never touches the api's tables.

-- One row per upload (UploadInitiated and/or UploadCompleted, whichever came first).
CREATE TABLE IF NOT EXISTS ingest.uploads (
    upload_id           bigint PRIMARY KEY,
    object_key          text NOT NULL,
    repo_id             text NOT NULL,
    version             text NOT NULL,
    rfilename           text NOT NULL,
    initiated_event_id  text,
    initiated_at        timestamptz,            -- when ingest learnt of it: the TTL counts from here
    completed_event_id  text,                   -- the first UploadCompleted wins; later ones are duplicates
    completed_at        timestamptz,
    declared_size       bigint,
    declared_sha256     text,
    missing_since       timestamptz,            -- first time the object was absent after complete
    due_at              timestamptz,            -- when the sweeper should look at it again
    attempts            integer NOT NULL DEFAULT 0,
    lease_owner         text,                   -- the process verifying it now ...
    lease_until         timestamptz,            -- ... until then, unless it renews
    bytes_read          bigint NOT NULL DEFAULT 0,  -- progress of the running verification
    verdict             text CHECK (verdict IN ('verified', 'rejected')),
    reason              text,
    judged_etag         text,                   -- the object version the verdict is about
    verdict_event_id    uuid,
    verdict_at          timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS uploads_pending_by_key ON ingest.uploads (object_key) WHERE verdict IS NULL;
CREATE INDEX IF NOT EXISTS uploads_pending_due ON ingest.uploads (due_at) WHERE verdict IS NULL;
CREATE INDEX IF NOT EXISTS uploads_judged_by_key ON ingest.uploads (object_key, judged_etag) WHERE verdict IS NOT NULL;

-- The latest state of each object under an owned prefix, from MinIO's notifications.
CREATE TABLE IF NOT EXISTS ingest.objects (
    object_key   text PRIMARY KEY,
    present      boolean NOT NULL,
    etag         text,
    size         bigint,
    sequencer    text,                   -- MinIO's per-object order; older notifications are ignored
    version_id   text,
    event_name   text NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT now(),
    judged       boolean NOT NULL DEFAULT false,   -- this version was accounted for (verdict or stray)
    lease_owner  text,
    lease_until  timestamptz
);
CREATE INDEX IF NOT EXISTS objects_unjudged ON ingest.objects (changed_at) WHERE present AND NOT judged;

-- Verdicts, claimed once (dedupe_key) and kept until Kafka acknowledged them: an outbox.
CREATE TABLE IF NOT EXISTS ingest.verdicts (
    event_id        uuid PRIMARY KEY,
    dedupe_key      text NOT NULL UNIQUE,   -- upload:<id> or stray:<key>@<sequencer>
    object_key      text NOT NULL,
    topic           text NOT NULL,
    message_key     text NOT NULL,
    event           bytea NOT NULL,         -- the encoded CloudEvent, published byte for byte
    action          text NOT NULL CHECK (action IN ('none', 'quarantine', 'remove')),
    action_etag     text,                   -- act on the object only while it is still this version
    quarantine_key  text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz,
    lease_owner     text,
    lease_until     timestamptz
);
CREATE INDEX IF NOT EXISTS verdicts_unpublished ON ingest.verdicts (created_at) WHERE published_at IS NULL;
