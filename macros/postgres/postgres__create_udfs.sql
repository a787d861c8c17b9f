{# deid.tokenize / deid.detokenize in plpython3u, the vault schema, and their grants (needs a superuser). #}
{% macro postgres__create_udfs() -%}
{%- set vault_schema = var('deid_vault_schema', 'deid_vault') -%}
{%- set vault_role = var('deid_vault_role', 'deid_vault') -%}
{%- set python_path = var('deid_python_path', []) -%}
{%- set python_path = [python_path] if python_path is string else python_path -%}
{%- for name in [vault_schema, vault_role] -%}
    {%- if not modules.re.fullmatch('[a-z_][a-z0-9_]{0,62}', name) -%}
        {{ exceptions.raise_compiler_error("deid: deid_vault_schema and deid_vault_role must be lowercase SQL identifiers; got '" ~ name ~ "'") }}
    {%- endif -%}
{%- endfor -%}
{%- for path in python_path -%}
    {%- if '$' in path or not path.startswith('/') -%}
        {{ exceptions.raise_compiler_error("deid: each deid_python_path entry must be an absolute directory path without '$'") }}
    {%- endif -%}
{%- endfor -%}
{%- if execute -%}
    {%- set who = run_query("select rolsuper from pg_catalog.pg_roles where rolname = current_user") -%}
    {%- if not who.columns[0].values()[0] -%}
        {{ exceptions.raise_compiler_error("deid: creating deid.tokenize / deid.detokenize needs a PostgreSQL superuser (plpython3u is an untrusted language); run `dbt run-operation postgres_install_udfs` once as one, and keep deid_manage_udfs false for the transformer") }}
    {%- endif -%}
{%- endif %}
create extension if not exists plpython3u;
do $deid_role$
begin
    if not exists (select from pg_catalog.pg_roles where rolname = '{{ vault_role }}') then
        create role {{ vault_role }} nologin;
    end if;
end
$deid_role$;
{{ deid.postgres_create_vault(vault_schema, vault_role) }}
create schema if not exists deid;
alter schema deid owner to {{ vault_role }};
revoke create on schema deid from public;
grant usage on schema deid to public;
{{ deid.postgres_udf('tokenize', 'value text, kind text', 'value, kind', vault_schema, python_path) }}
{{ deid.postgres_udf('detokenize', 'token text', 'token', vault_schema, python_path) }}
{#- deid.token_map's batch: one call per chunk of distinct values instead of one per row. #}
{{ deid.postgres_udf('tokenize_batch', 'vals text[], kind text', 'vals, kind', vault_schema, python_path, 'text[]') }}
alter function deid.tokenize(text, text) owner to {{ vault_role }};
alter function deid.tokenize_batch(text[], text) owner to {{ vault_role }};
alter function deid.detokenize(text) owner to {{ vault_role }};
{#- The vars are the whole truth: EXECUTE granted earlier to a role no longer listed is revoked. #}
revoke all on function deid.tokenize(text, text), deid.tokenize_batch(text[], text),
    deid.detokenize(text) from public;
do $deid_acl$
declare
    grant_row record;
begin
    for grant_row in
        select distinct p.oid::regprocedure as fn, a.grantee::regrole as grantee
        from pg_catalog.pg_proc as p
        cross join lateral pg_catalog.aclexplode(p.proacl) as a
        where p.oid in ('deid.tokenize(text, text)'::regprocedure,
                        'deid.tokenize_batch(text[], text)'::regprocedure,
                        'deid.detokenize(text)'::regprocedure)
            and a.grantee <> 0
            and a.grantee <> p.proowner
    loop
        execute format('revoke all on function %s from %s', grant_row.fn, grant_row.grantee);
    end loop;
end
$deid_acl$;
{%- for role in deid.postgres_role_list('deid_transformer_roles') %}
grant execute on function deid.tokenize(text, text) to {{ role }};
grant execute on function deid.tokenize_batch(text[], text) to {{ role }};
{%- endfor %}
{%- for role in deid.postgres_role_list('deid_pii_reader_roles') %}
grant execute on function deid.detokenize(text) to {{ role }};
{%- endfor %}
{%- endmacro %}
