{# One plpython3u UDF: SECURITY DEFINER, pinned search_path, calling deid.plpython_host. #}
{% macro postgres_udf(name, params, args, vault_schema, python_path, returns='text') -%}
create or replace function deid.{{ name }}({{ params }}) returns {{ returns }}
language plpython3u
volatile
{%- if name == 'detokenize' %}
strict
{%- endif %}
security definer
set search_path = pg_catalog, pg_temp
{#- Plans made when the vault was empty would seq-scan it forever after (7x slower at 2,000 tokens). #}
set plan_cache_mode = force_custom_plan
as $deid_udf$
if "host" not in SD:
    import sys
    for entry in reversed({{ tojson(python_path) }}):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    from deid import plpython_host
    SD["host"] = plpython_host
return SD["host"].{{ name }}(plpy, {{ args }}, vault_schema="{{ vault_schema }}")
$deid_udf$;
{%- endmacro %}
