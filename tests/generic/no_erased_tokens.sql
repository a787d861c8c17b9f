{# One failing row per row of the column whose token was erased from the vault (deid forget),
   so downstream copies can be found and cleaned. `erased`: a relation with a `token` column,
   such as the seed `deid erased --out seeds/deid_erased_tokens.csv` writes. Failing rows
   show the erased token only (the vault no longer holds its value). #}
{% test no_erased_tokens(model, column_name, erased) %}

select {{ column_name }} as erased_token
from {{ model }}
where {{ column_name }} in (
    {#- cast: a seed of an empty list is typed as integers -#}
    select cast(token as {{ dbt.type_string() }}) from {{ erased }}
)

{% endtest %}
