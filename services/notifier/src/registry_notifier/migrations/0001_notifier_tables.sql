-- The notifier's own tables: webhook deliveries, their attempts, and its e-mail queue.
--
-- Ownership: the notifier owns these tables and applies this folder with the shared runner
-- (registry_shared.migrations, recorded in `notifier_schema_migrations`) at start-up. The api owns
-- `webhooks` (its migration 0002), which `webhook_deliveries` references: the notifier waits for the api's
-- schema before applying this. The api reads the delivery log and may reset a delivery for redelivery.
--
-- The api's released migration 0002 also created these three tables, and released migrations are never
-- edited (the runner checks their checksums): on a database the api migrated first, this file finds them
-- there (`if not exists`, same definitions) and only records that the notifier's history starts here.
-- Every later change to these tables is a migration of this folder.

-- One row per (subscription, event): the unique pair makes a re-consumed Kafka event a no-op, and
-- `message_id` (the `webhook-id` header) is derived from the pair, so it never changes.
-- Deliveries of one (webhook, order_key) are sent in id order (order_key = the event's subject,
-- the repo_id for catalog events): a row is only sent once every earlier row of its key is
-- delivered or given up.
-- `deployment` is the notifier deployment that queued the row and sends it (another deployment on
-- the same database adopts it only once it is long overdue, so a vanished deployment strands nothing).
create table if not exists webhook_deliveries (
    id                bigserial primary key,
    webhook_id        bigint not null references webhooks (id) on delete cascade,
    deployment        text not null default 'default',
    event_id          uuid not null,
    event_type        text not null,
    order_key         text not null,
    message_id        text not null unique,
    payload           text not null,
    event_time        timestamptz not null,
    status            text not null default 'pending'
                      check (status in ('pending', 'sending', 'delivered', 'failed')),
    attempts          integer not null default 0,
    next_attempt_at   timestamptz not null default now(),
    lease_until       timestamptz,
    last_status_code  integer,
    last_latency_ms   integer,
    last_error        text,
    delivered_at      timestamptz,
    created_at        timestamptz not null default now(),
    unique (webhook_id, event_id)
);
create index if not exists webhook_deliveries_due on webhook_deliveries (next_attempt_at) where status in ('pending', 'sending');
create index if not exists webhook_deliveries_key on webhook_deliveries (webhook_id, order_key, id)
    where status in ('pending', 'sending');
create index if not exists webhook_deliveries_log on webhook_deliveries (webhook_id, id desc);

-- Every attempt of a delivery, for the delivery log.
create table if not exists webhook_attempts (
    id            bigserial primary key,
    delivery_id   bigint not null references webhook_deliveries (id) on delete cascade,
    attempt       integer not null,
    status_code   integer,
    latency_ms    integer,
    error         text,
    attempted_at  timestamptz not null default now()
);
create index if not exists webhook_attempts_delivery on webhook_attempts (delivery_id, attempt);

-- The notifier's e-mail queue. A row belongs to one notifier deployment (the replicas that share one
-- SMTP relay): `dedupe_key` (kind + event id + recipient) makes a re-consumed event a no-op within a
-- deployment, while two deployments on one database (the stack's and a test suite's) each send
-- their own copy through their own relay.
create table if not exists notifier_emails (
    id               bigserial primary key,
    deployment       text not null,
    dedupe_key       text not null,
    kind             text not null,
    to_addr          text not null,
    subject          text not null,
    body             text not null,
    status           text not null default 'pending' check (status in ('pending', 'sending', 'sent', 'failed')),
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    lease_until      timestamptz,
    last_error       text,
    sent_at          timestamptz,
    created_at       timestamptz not null default now(),
    unique (deployment, dedupe_key)
);
create index if not exists notifier_emails_due on notifier_emails (deployment, next_attempt_at) where status in ('pending', 'sending');
