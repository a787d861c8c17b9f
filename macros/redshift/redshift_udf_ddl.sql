{# The statements of redshift__create_udfs as one SQL text (what on-run-start runs; also `dbt compile --inline`). #}
{% macro redshift_udf_ddl() -%}
    {{ return(deid.redshift_udf_statements() | join(';\n') ~ ';') }}
{%- endmacro %}
