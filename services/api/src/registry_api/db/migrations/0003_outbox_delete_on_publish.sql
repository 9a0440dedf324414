-- The outbox holds only what is still to be published: the relay deletes each row once Kafka has
-- acknowledged it (Kafka is the log of what was published). No published_at stamp, so publishing adds no
-- row version and no index entry; no unique index on event_id (a uuid4 made by the writer) either.
-- Every access event passes through this table, so each index left costs on every read counted.
delete from outbox where published_at is not null;
drop index if exists outbox_pending;
alter table outbox drop column published_at;
alter table outbox drop constraint if exists outbox_event_id_key;
