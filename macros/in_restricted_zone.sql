{# Whether a relation lies in the restricted zone: its schema, its database, or database.schema is listed. #}
{% macro in_restricted_zone(relation) -%}
    {%- set zone = deid.restricted_zone() -%}
    {%- set schema = (relation.schema or '') | lower -%}
    {%- set database = (relation.database or '') | lower -%}
    {{ return(schema in zone or database in zone or (database ~ '.' ~ schema) in zone) }}
{%- endmacro %}
