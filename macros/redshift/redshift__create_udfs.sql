{# Redshift: (re)create the Lambda external functions, revoke EXECUTE from PUBLIC, grant it to the roles in vars. #}
{% macro redshift__create_udfs() -%}
    {{ return(deid.redshift_udf_ddl()) }}
{%- endmacro %}
