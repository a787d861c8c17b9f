{# Re-identify a token column; the warehouse's grants and the vault's policy decide who may. #}
{% macro detokenize(column) -%}
    {%- if column is not string -%}
        {{ exceptions.raise_compiler_error("deid.detokenize: the column argument must be a quoted column name or SQL expression, e.g. deid.detokenize('email_token'), not deid.detokenize(email_token)") }}
    {%- endif -%}
    {%- if deid.in_unit_test() -%}
        {{ return(deid.unit_test_value(column)) }}
    {%- endif -%}
    {{ return(adapter.dispatch('detokenize', 'deid')(column)) }}
{%- endmacro %}

{% macro default__detokenize(column) -%}
    deid.detokenize({{ column }})
{%- endmacro %}
