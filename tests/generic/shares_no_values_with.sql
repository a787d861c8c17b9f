{# No value of the column equals any value of `field` in `to` (e.g. the raw source column). #}
{% test shares_no_values_with(model, column_name, to, field) %}
{{ config(tags=['deid']) }}

select 1 as shared_value
from {{ model }} as mart
inner join {{ to }} as raw_source
    on cast(mart.{{ column_name }} as {{ dbt.type_string() }})
    = cast(raw_source.{{ field }} as {{ dbt.type_string() }})

{% endtest %}
