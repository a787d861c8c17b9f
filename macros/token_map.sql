{# A (value, token) map over the distinct non-null values of a column: tokenize each distinct
   value once, then join it back. On large tables with repeated values this beats calling
   tokenize per row (one UDF call per distinct value, joins run in parallel in the engine). #}
{% macro token_map(relation, column, kind, domain=none) -%}
    {{ return(adapter.dispatch('token_map', 'deid')(relation, column, kind, domain)) }}
{%- endmacro %}

{% macro default__token_map(relation, column, kind, domain) -%}
    select
        distinct_values.value,
        {{ deid.tokenize('distinct_values.value', kind, domain) }} as token
    from (
        select distinct {{ column }} as value
        from {{ relation }}
        where {{ column }} is not null
    ) as distinct_values
{%- endmacro %}

{#- plpython3u is called once per row: hand it the distinct values in chunks of 50,000 (one
    vault lookup per chunk instead of one per value; a chunk bounds the function's memory). #}
{% macro postgres__token_map(relation, column, kind, domain) -%}
    select
        mapped.value,
        mapped.token
    from (
        select array_agg(numbered.value) as vals
        from (
            select
                distinct_values.value,
                (row_number() over () - 1) / 50000 as chunk
            from (
                select distinct {{ column }} as value
                from {{ relation }}
                where {{ column }} is not null
            ) as distinct_values
        ) as numbered
        group by numbered.chunk
    ) as chunks
    cross join lateral unnest(
        chunks.vals,
        deid.tokenize_batch(cast(chunks.vals as text[]), '{{ deid.kind_spec(kind, domain) }}')
    ) as mapped (value, token)
{%- endmacro %}
