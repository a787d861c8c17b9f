{# Every non-null value of the column is a deid token of `kind`. Failing rows show no value. #}
{% test tokens_of_kind(model, column_name, kind) %}

select 1 as not_a_token
from {{ model }}
where {{ column_name }} is not null
    and not {{ deid.regex_matches(column_name, deid.token_pattern(kind)) }}

{% endtest %}
