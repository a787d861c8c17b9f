{# Every non-null value of the column is a deid token of `kind` (with an external vault:
   non-empty). Failing rows show no value. #}
{% test tokens_of_kind(model, column_name, kind) %}
{{ config(tags=['deid']) }}

select 1 as not_a_token
from {{ model }}
where {{ column_name }} is not null
    {% if var('deid_external_tokens', false) -%}
        {#- an external vault's tokens have its own formats: only emptiness is checked -#}
        and {{ column_name }} = ''
    {%- else -%}
        and not {{ deid.regex_matches(column_name, deid.token_pattern(kind)) }}
    {%- endif %}

{% endtest %}
