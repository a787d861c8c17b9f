{# Swap each value of `column` for its vault token of `kind` (optionally in its own `domain`). #}
{% macro tokenize(column, kind, domain=none) -%}
    {%- if column is not string -%}
        {#- An unquoted name is an undefined Jinja variable: it would render as nothing and the
            warehouse would report a syntax error far from the cause. -#}
        {{ exceptions.raise_compiler_error("deid.tokenize: the column argument must be a quoted column name or SQL expression, e.g. deid.tokenize('email', 'email'), not deid.tokenize(email, 'email') (kind '" ~ kind ~ "')") }}
    {%- endif -%}
    {%- if deid.in_unit_test() -%}
        {{ return(deid.unit_test_token(column, kind, domain)) }}
    {%- endif -%}
    {{ return(adapter.dispatch('tokenize', 'deid')(column, kind, domain)) }}
{%- endmacro %}

{% macro default__tokenize(column, kind, domain) -%}
    deid.tokenize(cast({{ column }} as {{ dbt.type_string() }}), '{{ deid.kind_spec(kind, domain) }}')
{%- endmacro %}
