{# Re-identify a token column; the warehouse's grants and the vault's policy decide who may. #}
{% macro detokenize(column) -%}
    {{ return(adapter.dispatch('detokenize', 'deid')(column)) }}
{%- endmacro %}

{% macro default__detokenize(column) -%}
    deid.detokenize({{ column }})
{%- endmacro %}
