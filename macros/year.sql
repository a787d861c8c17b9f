{# Generalize a date or timestamp to its year (an integer). #}
{% macro year(date_column) -%}
    {{ return(deid.generalized('year', adapter.dispatch('year', 'deid')(date_column))) }}
{%- endmacro %}

{% macro default__year(date_column) -%}
    cast(extract(year from {{ date_column }}) as integer)
{%- endmacro %}
