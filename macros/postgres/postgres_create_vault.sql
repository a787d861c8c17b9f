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
insert into {{ schema }}.locks (name) values ('audit'), ('mint') on conflict do nothing;
{%- for table in ['meta', 'keyring', 'tokens', 'principals', 'tokenize_grants', 'audit', 'locks'] %}
alter table {{ schema }}.{{ table }} owner to {{ owner }};
revoke all on {{ schema }}.{{ table }} from public;
{%- endfor %}
{%- endmacro %}
