-- Rules the api used to check with a read before its write now live in the database, so that requests
-- racing each other cannot break them (issue 11):
--   1. repo ids are unique whatever their case (a model keeps the case it was created with, for display;
--      look-ups go through lower(repo_id));
--   2. a namespace belongs to its first developer, whatever its case: one row per lower(namespace);
--   3. a platform user has at most one unrevoked grant per model (creating it again updates it in place).

-- 1. Repo ids differing only by case cannot be merged automatically: say which, and stop.
do $$
declare
    dup text;
begin
    select string_agg(repo_id, ', ' order by repo_id) into dup
    from models
    where lower(repo_id) in (select lower(repo_id) from models group by 1 having count(*) > 1);
    if dup is not null then
        raise exception 'repo ids that differ only by case: %; rename all but one of each before upgrading', dup;
    end if;
end
$$;
create unique index models_repo_id_lower on models (lower(repo_id));

-- 2. Who owns each namespace: the owner of its oldest model that has one (models imported from the
-- 0.3.0 catalog have no owner and claim nothing). `name` keeps the spelling it was first used with.
create table namespaces (
    name_key    text primary key check (name_key = lower(name)),
    name        text not null,
    owner_id    bigint not null references users (id),
    created_ts  bigint not null default extract(epoch from now())::bigint
);
insert into namespaces (name_key, name, owner_id)
select distinct on (lower(split_part(repo_id, '/', 1)))
       lower(split_part(repo_id, '/', 1)), split_part(repo_id, '/', 1), owner_id
from models
where owner_id is not null
order by lower(split_part(repo_id, '/', 1)), id;

-- 3. Identical unrevoked grants of one (platform user, model) become one: the newest keeps the widest
-- window of the group (the access the platform user had through any of them), the others are revoked.
with dup as (
    select platform_user_id, model_id, max(id) as keep, min(permitted_from_ts) as from_ts,
           case when bool_or(permitted_until_ts is null) then null else max(permitted_until_ts) end as until_ts
    from grants
    where revoked_ts is null
    group by platform_user_id, model_id
    having count(*) > 1
), widened as (
    update grants g
    set permitted_from_ts = d.from_ts, permitted_until_ts = d.until_ts,
        updated_ts = extract(epoch from now())::bigint
    from dup d
    where g.id = d.keep
    returning g.id
)
update grants g
set revoked_ts = extract(epoch from now())::bigint, updated_ts = extract(epoch from now())::bigint
from dup d
where g.platform_user_id = d.platform_user_id and g.model_id = d.model_id and g.revoked_ts is null
  and g.id <> d.keep;
drop index if exists grants_user_model;
create unique index grants_one_unrevoked on grants (platform_user_id, model_id) where revoked_ts is null;
