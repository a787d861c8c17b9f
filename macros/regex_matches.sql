{# True where `column` matches `pattern` (a POSIX-style regular expression), per adapter. #}
{% macro regex_matches(column, pattern) -%}
    {{ return(adapter.dispatch('regex_matches', 'deid')(column, pattern)) }}
{%- endmacro %}

{% macro default__regex_matches(column, pattern) -%}
    ({{ column }} ~ '{{ pattern }}')
{%- endmacro %}

{% macro duckdb__regex_matches(column, pattern) -%}
    regexp_matches({{ column }}, '{{ pattern }}')
{%- endmacro %}
