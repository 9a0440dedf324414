-- The api's catalog: users and their keys, models, versions, files, uploads, grants, and the outbox.
-- Times the API exposes are epoch seconds (bigint); timestamptz where only humans read them.

create table users (
    id          bigserial primary key,
    email       text not null,
    name        text not null,
    role        text not null check (role in ('developer', 'platform', 'admin')),
    created_ts  bigint not null default extract(epoch from now())::bigint
);
create unique index users_email_key on users (lower(email));

-- API keys are stored as a SHA-256 of the whole key (a 256-bit random secret needs no slow KDF);
-- the prefix after "sk_live_" finds the row, the hash is then compared in constant time.
create table api_keys (
    id          bigserial primary key,
    user_id     bigint not null references users (id) on delete cascade,
    prefix      text not null unique,
    key_hash    bytea not null,
    created_ts  bigint not null default extract(epoch from now())::bigint,
    revoked_ts  bigint
);
create index api_keys_user_active on api_keys (user_id) where revoked_ts is null;

create table models (
    id              bigserial primary key,
    repo_id         text not null unique,
    owner_id        bigint references users (id),
    visibility      text not null default 'public' check (visibility in ('private', 'public')),
    canonical_url   text,
    model_name      text not null,
    author          text,
    pipeline_tag    text,
    license         text,
    parameters      bigint check (parameters >= 0),
    downloads       bigint not null default 0,
    likes           bigint not null default 0,
    created_at      timestamptz not null default now(),
    last_modified   timestamptz not null default now(),
    languages       text,
    tags            text,
    last_update_ts  bigint not null default extract(epoch from now())::bigint,
    -- derived from the available files, maintained when a verdict is applied
    file_count      integer not null default 0,
    has_safetensors boolean not null default false,
    has_bin         boolean not null default false
);
create index models_last_update_ts on models (last_update_ts, id);
create index models_owner on models (owner_id);

create table versions (
    id          bigserial primary key,
    model_id    bigint not null references models (id) on delete cascade,
    version     text not null,
    created_ts  bigint not null default extract(epoch from now())::bigint,
    unique (model_id, version)
);

-- One row per file of a version (version_id null: a file of the 0.3.0 catalog without versions).
create table files (
    id           bigserial primary key,
    model_id     bigint not null references models (id) on delete cascade,
    version_id   bigint references versions (id) on delete cascade,
    rfilename    text not null,
    size         bigint not null check (size >= 0),
    sha256       text not null,
    object_key   text not null,
    file_format  text not null default 'other',
    is_pickle    boolean not null default false,
    updated_ts   bigint not null default extract(epoch from now())::bigint,
    unique nulls not distinct (model_id, version_id, rfilename)
);
create index files_model on files (model_id, rfilename);

create table uploads (
    id              bigserial primary key,
    model_id        bigint not null references models (id) on delete cascade,
    version_id      bigint not null references versions (id) on delete cascade,
    rfilename       text not null,
    object_key      text not null,
    developer_id    bigint not null references users (id),
    status          text not null default 'initiated'
                    check (status in ('initiated', 'pending_verification', 'available', 'rejected', 'expired')),
    declared_size   bigint,
    declared_sha256 text,
    reason          text,
    detail          text,
    quarantine_key  text,
    expires_ts      bigint not null,
    created_ts      bigint not null default extract(epoch from now())::bigint,
    completed_ts    bigint,
    verdict_ts      bigint
);
create index uploads_version_file on uploads (version_id, rfilename, id desc);
create index uploads_object_key on uploads (object_key);

create table grants (
    id                  bigserial primary key,
    platform_user_id    bigint not null references users (id) on delete cascade,
    model_id            bigint not null references models (id) on delete cascade,
    permitted_from_ts   bigint not null,
    permitted_until_ts  bigint,
    revoked_ts          bigint,
    created_ts          bigint not null default extract(epoch from now())::bigint,
    updated_ts          bigint not null default extract(epoch from now())::bigint,
    check (permitted_until_ts is null or permitted_until_ts > permitted_from_ts)
);
create index grants_user_model on grants (platform_user_id, model_id) where revoked_ts is null;
create index grants_model on grants (model_id);

-- Domain events written in the same transaction as the change they describe; the relay publishes
-- them to Kafka in id order and stamps published_at.
create table outbox (
    id            bigserial primary key,
    event_id      uuid not null unique,
    topic         text not null,
    key           text,
    payload       bytea not null,
    created_at    timestamptz not null default now(),
    published_at  timestamptz
);
create index outbox_pending on outbox (id) where published_at is null;

-- Events this service consumed (verdicts, access counts): each is applied once.
create table consumed_events (
    event_id     uuid primary key,
    consumed_at  timestamptz not null default now()
);

-- Kafka offsets of consumers whose effect is stored here, committed in the same transaction as the
-- effect (exactly-once effect for the downloads counter).
create table consumer_offsets (
    group_id    text not null,
    topic       text not null,
    partition   integer not null,
    next_offset bigint not null,
    primary key (group_id, topic, partition)
);
