-- The audit log (issue 15): one row per state-changing action, written in the change's transaction.
-- Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE to every role (the api's own included), and
-- those privileges are revoked from PUBLIC.
create table audit_log (
    id             bigserial primary key,
    ts             double precision not null,
    actor_kind     text not null check (actor_kind in ('user', 'admin-token', 'anonymous', 'system')),
    actor_user_id  bigint,
    action         text not null,
    target_type    text not null,
    target_id      text,
    repo_id        text,
    before         jsonb,
    after          jsonb,
    request_id     text,
    client_ip      text
);
create index audit_log_actor on audit_log (actor_kind, actor_user_id, id);
create index audit_log_action on audit_log (action, id);
create index audit_log_repo on audit_log (lower(repo_id), id) where repo_id is not null;
create index audit_log_ts on audit_log (ts);

create function audit_log_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'audit_log is append-only: % refused', tg_op using errcode = 'insufficient_privilege';
end
$$;
create trigger audit_log_no_change before update or delete on audit_log
    for each row execute function audit_log_append_only();
create trigger audit_log_no_truncate before truncate on audit_log
    for each statement execute function audit_log_append_only();
revoke update, delete, truncate on audit_log from public;
