{# Every non-null value is a three-digit ZIP prefix and none is a restricted (sparsely
   populated) prefix, which deid.zip3 turns into '000'. Failing rows show no value. #}
{% test is_zip3(model, column_name) %}
{{ config(tags=['deid']) }}
{%- set restricted = deid.restricted_zip3() %}

select 1 as not_a_safe_zip3
from {{ model }}
where {{ column_name }} is not null
    and (
        not {{ deid.regex_matches(column_name, '^[0-9]{3}$') }}
        {%- if restricted %}
        or {{ column_name }} in ({% for z in restricted %}'{{ z }}'{{ ', ' if not loop.last }}{% endfor %})
        {%- endif %}
    )

{% endtest %}
