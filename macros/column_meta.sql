{# A column's meta, wherever this dbt version keeps it (`meta:` or `config: {meta: …}`). #}
{% macro column_meta(column) -%}
    {%- set meta = {} -%}
    {%- do meta.update(column.get('meta') or {}) -%}
    {%- do meta.update((column.get('config') or {}).get('meta') or {}) -%}
    {{ return(meta) }}
{%- endmacro %}
