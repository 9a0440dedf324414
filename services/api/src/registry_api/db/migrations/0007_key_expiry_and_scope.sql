-- Keys with a lifetime and a scope (issue 15). Existing keys: no expiry, full scope (unchanged).
alter table api_keys add column expires_ts bigint;
alter table api_keys add column scope text not null default 'full' check (scope in ('full', 'read-only'));
