{# Every column declared `meta: {pii: <kind>}` in the project, by name: what a seed (which has no upstream) is checked against. #}
{% macro declared_pii() -%}
    {%- set found = {} -%}
    {%- do deid._collect_pii((graph.sources.keys() | list) + (graph.nodes.keys() | list), found, {}) -%}
    {{ return(found) }}
{%- endmacro %}
