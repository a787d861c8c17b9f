{# The parts of `expr` between matches of `pattern`, one row each (set-returning). #}
{% macro regex_each_part(expr, pattern) -%}
    {{ return(adapter.dispatch('regex_each_part', 'deid')(expr, pattern)) }}
{%- endmacro %}

{% macro default__regex_each_part(expr, pattern) -%}
    regexp_split_to_table({{ expr }}, '{{ pattern }}')
{%- endmacro %}

{% macro duckdb__regex_each_part(expr, pattern) -%}
    unnest(string_split_regex({{ expr }}, '{{ pattern }}'))
{%- endmacro %}

{% macro redshift__regex_each_part(expr, pattern) -%}
    {#- Redshift has no set-returning split: the whole value (matched as a whole) -#}
    {{ expr }}
{%- endmacro %}
