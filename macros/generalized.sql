{# Mark `sql` as the output of generalizer `name` so that `deid check` accepts declared PII flowing through it. Built in: age_band, zip3, card_last4, year; register your own with var deid_generalizers. #}
{% macro generalized(name, sql) -%}
    {%- set registered = ['age_band', 'zip3', 'card_last4', 'year'] + var('deid_generalizers', []) -%}
    {%- if name not in registered -%}
        {{ exceptions.raise_compiler_error("deid.generalized: '" ~ name ~ "' is not a registered generalizer (" ~ registered | join(', ') ~ "); add it to var deid_generalizers in dbt_project.yml") }}
    {%- endif -%}
    {%- if not modules.re.fullmatch('[a-z][a-z0-9_]*', name) -%}
        {{ exceptions.raise_compiler_error("deid.generalized: a generalizer's name is lower case letters, digits and _") }}
    {%- endif -%}
    {#- The marker is a comment, so the engine ignores it; `deid check` reads it from the compiled SQL. -#}
    /* deid.generalized:{{ name }} */ ({{ sql }})
{%- endmacro %}
