{# Generalize a ZIP code to its first three digits; sparsely populated prefixes become '000'. #}
{% macro zip3(zip) -%}
    {{ return(deid.generalized('zip3', adapter.dispatch('zip3', 'deid')(zip))) }}
{%- endmacro %}

{% macro default__zip3(zip) -%}
    {%- set restricted = deid.restricted_zip3() -%}
    case
        when {{ zip }} is null then null
        {% if restricted -%}
        when substring(lpad(cast({{ zip }} as {{ dbt.type_string() }}), 5, '0'), 1, 3)
            in ({% for z in restricted %}'{{ z }}'{{ ', ' if not loop.last }}{% endfor %}) then '000'
        {% endif -%}
        else substring(lpad(cast({{ zip }} as {{ dbt.type_string() }}), 5, '0'), 1, 3)
    end
{%- endmacro %}
