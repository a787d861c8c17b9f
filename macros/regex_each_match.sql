{# Every match of `pattern` in `expr`, one row each (a set-returning select-list item). #}
{% macro regex_each_match(expr, pattern) -%}
    {{ return(adapter.dispatch('regex_each_match', 'deid')(expr, pattern)) }}
{%- endmacro %}

{% macro default__regex_each_match(expr, pattern) -%}
    {#- PostgreSQL: with no capture group (use `(?:…)`) each match is element 1 -#}
    (regexp_matches({{ expr }}, '{{ pattern }}', 'g'))[1]
{%- endmacro %}

{% macro duckdb__regex_each_match(expr, pattern) -%}
    unnest(regexp_extract_all({{ expr }}, '{{ pattern }}'))
{%- endmacro %}

{% macro redshift__regex_each_match(expr, pattern) -%}
    {#- Redshift has no set-returning regex function: the first match only -#}
    regexp_substr({{ expr }}, '{{ pattern }}')
{%- endmacro %}
