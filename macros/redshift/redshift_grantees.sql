{# A role-list var (a list, or one name) as Redshift grantees, validated at compile time. #}
{% macro redshift_grantees(var_name) -%}
    {%- set value = var(var_name, []) -%}
    {%- set names = [value] if value is string else (value or []) -%}
    {%- set out = [] -%}
    {%- for name in names -%}
        {%- do out.append(deid.redshift_grantee(name)) -%}
    {%- endfor -%}
    {{ return(out) }}
{%- endmacro %}
