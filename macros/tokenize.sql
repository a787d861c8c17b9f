{# Swap each value of `column` for its vault token of `kind` (optionally in its own `domain`). #}
{% macro tokenize(column, kind, domain=none) -%}
    {{ return(adapter.dispatch('tokenize', 'deid')(column, kind, domain)) }}
{%- endmacro %}

{% macro default__tokenize(column, kind, domain) -%}
    deid.tokenize(cast({{ column }} as {{ dbt.type_string() }}), '{{ deid.kind_spec(kind, domain) }}')
{%- endmacro %}
