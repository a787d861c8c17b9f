{# on-run-start: create deid.tokenize / deid.detokenize and their grants where dbt manages them. #}
{% macro create_udfs() -%}
    {%- if not var('deid_manage_udfs', false) -%}
        {{ return('') }}
    {%- endif -%}
    {{ return(adapter.dispatch('create_udfs', 'deid')()) }}
{%- endmacro %}

{% macro default__create_udfs() -%}
    {{ exceptions.raise_compiler_error("deid: deid_manage_udfs is set, but deid cannot create UDFs on adapter '" ~ adapter.type() ~ "'") }}
{%- endmacro %}

{% macro duckdb__create_udfs() -%}
    {#- The dbt-duckdb plugin `deid.duckdb_plugin` registers the UDFs on every connection. -#}
    {{ return('') }}
{%- endmacro %}
