{# A role-list var in dbt-redshift's grants syntax ('role:x', 'group:x', 'user:x'; needs flags: redshift_grants_extended). #}
{% macro redshift_dbt_grantees(var_name) -%}
    {%- set out = [] -%}
    {%- for grantee in deid.redshift_grantees(var_name) -%}
        {%- set kind, _, name = grantee.partition(' ') -%}
        {%- do out.append((kind ~ ':' ~ name) if name else ('user:' ~ kind)) -%}
    {%- endfor -%}
    {{ return(out) }}
{%- endmacro %}
