{# run-operation: create the UDFs, vault schema and grants now, as a superuser, whatever deid_manage_udfs says. #}
{% macro postgres_install_udfs() -%}
{%- if target.type != 'postgres' -%}
    {{ exceptions.raise_compiler_error("deid: postgres_install_udfs runs on a postgres target; this one is '" ~ target.type ~ "'") }}
{%- endif -%}
{%- do run_query(deid.postgres__create_udfs()) -%}
{%- do log("deid: deid.tokenize and deid.detokenize are installed; vault schema " ~ var('deid_vault_schema', 'deid_vault'), info=true) -%}
{%- endmacro %}
