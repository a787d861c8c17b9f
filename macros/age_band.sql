{# Generalize a date of birth to an age band ('30-39'; '90+' as HIPAA Safe Harbor requires). #}
{% macro age_band(date_of_birth, as_of=none, width=10) -%}
    {{ return(deid.generalized('age_band', adapter.dispatch('age_band', 'deid')(date_of_birth, as_of, width))) }}
{%- endmacro %}

{% macro default__age_band(date_of_birth, as_of, width) -%}
    {%- if as_of is none -%}
        {%- set as_of_date = var('deid_as_of', none) -%}
        {%- set as_of = "cast('" ~ as_of_date ~ "' as date)" if as_of_date else 'current_date' -%}
    {%- endif -%}
    {%- set age -%}
        (extract(year from {{ as_of }}) - extract(year from {{ date_of_birth }})
         - case when extract(month from {{ as_of }}) * 100 + extract(day from {{ as_of }})
                   < extract(month from {{ date_of_birth }}) * 100 + extract(day from {{ date_of_birth }})
                then 1 else 0 end)
    {%- endset -%}
    case
        when {{ date_of_birth }} is null then null
        when {{ age }} >= 90 then '90+'
        when {{ age }} < 0 then null
        else cast(cast(floor({{ age }} / {{ width }}) * {{ width }} as integer) as {{ dbt.type_string() }})
            || '-'
            || cast(cast(floor({{ age }} / {{ width }}) * {{ width }} + {{ width - 1 }} as integer) as {{ dbt.type_string() }})
    end
{%- endmacro %}
