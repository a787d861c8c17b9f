{# A (value, token) map over the distinct non-null values of a column: tokenize each distinct
   value once, then join it back. On large tables with repeated values this beats calling
   tokenize per row (one UDF call per distinct value, joins run in parallel in the engine). #}
{% macro token_map(relation, column, kind, domain=none) -%}
    select
        distinct_values.value,
        {{ deid.tokenize('distinct_values.value', kind, domain) }} as token
    from (
        select distinct {{ column }} as value
        from {{ relation }}
        where {{ column }} is not null
    ) as distinct_values
{%- endmacro %}
