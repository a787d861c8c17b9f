{# The vault's tables in `schema`, owned by `owner` (same DDL as deid.stores.postgres.vault_ddl). #}
{% macro postgres_create_vault(schema, owner) -%}
create schema if not exists {{ schema }};
alter schema {{ schema }} owner to {{ owner }};
revoke all on schema {{ schema }} from public;
create table if not exists {{ schema }}.meta (key text primary key, value text not null);
create table if not exists {{ schema }}.keyring (
    id integer primary key check (id = 1),
    keys text not null
);
create table if not exists {{ schema }}.tokens (
    token text primary key,
    domain text not null,
    fingerprint bytea not null,
    kind text not null,
    key_version integer not null,
    ciphertext bytea not null,
    unique (domain, fingerprint)
);
create table if not exists {{ schema }}.principals (
    principal text primary key,
    granted_at text not null,
    granted_by text not null
);
create table if not exists {{ schema }}.tokenize_grants (
    principal text not null,
    domain text not null,
    mode text not null check (mode in ('tokenize', 'lookup')),
    granted_at text not null,
    granted_by text not null,
    primary key (principal, domain)
);
create table if not exists {{ schema }}.audit (
    seq bigint primary key,
    record text not null,
    prev text not null,
    hash text not null
);
{#- Row locks only the vault role reaches (an advisory lock on a known key, any login could hold). #}
create table if not exists {{ schema }}.locks (name text primary key);
insert into {{ schema }}.locks (name) values ('audit'), ('mint'), ('erase') on conflict do nothing;
create table if not exists {{ schema }}.erased (
    token text primary key,
    domain text not null,
    kind text not null,
    erased_at text not null
);
create index if not exists erased_by_time on {{ schema }}.erased (erased_at);
create or replace function {{ schema }}.erase_guard() returns trigger language plpgsql as $g$
begin
    perform 1 from {{ schema }}.locks where name = 'erase' for share;
    return null;
end $g$;
create or replace trigger erase_guard before insert on {{ schema }}.tokens
    for each statement execute function {{ schema }}.erase_guard();
create or replace function {{ schema }}.never_reissue_erased() returns trigger language plpgsql as $r$
begin
    if exists (select 1 from {{ schema }}.erased where token = new.token) then
        return null;
    end if;
    return new;
end $r$;
create or replace trigger never_reissue_erased before insert on {{ schema }}.tokens
    for each row execute function {{ schema }}.never_reissue_erased();
{%- for table in ['meta', 'keyring', 'tokens', 'principals', 'tokenize_grants', 'audit', 'locks', 'erased'] %}
alter table {{ schema }}.{{ table }} owner to {{ owner }};
revoke all on {{ schema }}.{{ table }} from public;
{%- endfor %}
{%- for fn in ['erase_guard', 'never_reissue_erased'] %}
alter function {{ schema }}.{{ fn }}() owner to {{ owner }};
revoke all on function {{ schema }}.{{ fn }}() from public;
{%- endfor %}
{%- endmacro %}
