-- Webhook subscriptions and their deliveries (issue 6).
--
-- Ownership: the api owns this schema (it is applied with the api's migrations). The api writes
-- `webhooks` (CRUD by their owners) and may reset a delivery for redelivery; the notifier service is
-- the only other writer: it inserts deliveries and attempts, updates their state, counts a
-- subscription's consecutive failures and disables it, and keeps its e-mail queue in
-- `notifier_emails`. Nothing else writes these tables.

-- The signing secret (`whsec_<base64>`) is kept in clear: the notifier needs it to sign (HMAC), so it
-- cannot be hashed. It is shown once at creation and never returned by the API afterwards; protect
-- the database (and its backups) accordingly. Encrypting it with a key shared by api and notifier is
-- the next step if the database is not trusted.
create table webhooks (
    id                    bigserial primary key,
    owner_id              bigint not null references users (id) on delete cascade,
    url                   text not null,
    description           text not null default '',
    event_types           text[] not null,
    repo_id               text,
    secret                text not null,
    enabled               boolean not null default true,
    consecutive_failures  integer not null default 0,
    disabled_reason       text,
    disabled_ts           bigint,
    created_at            timestamptz not null default clock_timestamp(),
    created_ts            bigint not null default extract(epoch from now())::bigint,
    updated_ts            bigint not null default extract(epoch from now())::bigint
);
create index webhooks_owner on webhooks (owner_id, id);
create index webhooks_enabled on webhooks (id) where enabled;
create index webhooks_disabled on webhooks (disabled_ts) where disabled_ts is not null;

-- One row per (subscription, event): the unique pair makes a re-consumed Kafka event a no-op, and
-- `message_id` (the `webhook-id` header) is derived from the pair, so it never changes.
-- Deliveries of one (webhook, order_key) are sent in id order (order_key = the event's subject,
-- the repo_id for catalog events): a row is only sent once every earlier row of its key is
-- delivered or given up.
-- `deployment` is the notifier deployment that queued the row and sends it (another deployment on
-- the same database adopts it only once it is long overdue, so a vanished deployment strands nothing).
create table webhook_deliveries (
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
create index webhook_deliveries_due on webhook_deliveries (next_attempt_at) where status in ('pending', 'sending');
create index webhook_deliveries_key on webhook_deliveries (webhook_id, order_key, id)
    where status in ('pending', 'sending');
create index webhook_deliveries_log on webhook_deliveries (webhook_id, id desc);

-- Every attempt of a delivery, for the delivery log.
create table webhook_attempts (
    id            bigserial primary key,
    delivery_id   bigint not null references webhook_deliveries (id) on delete cascade,
    attempt       integer not null,
    status_code   integer,
    latency_ms    integer,
    error         text,
    attempted_at  timestamptz not null default now()
);
create index webhook_attempts_delivery on webhook_attempts (delivery_id, attempt);

-- The notifier's e-mail queue. A row belongs to one notifier deployment (the replicas that share one
-- SMTP relay): `dedupe_key` (kind + event id + recipient) makes a re-consumed event a no-op within a
-- deployment, while two deployments on one database (the stack's and a test suite's) each send
-- their own copy through their own relay.
create table notifier_emails (
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
create index notifier_emails_due on notifier_emails (deployment, next_attempt_at) where status in ('pending', 'sending');
