{# run-operation: create the external functions and their grants now, whatever deid_manage_udfs says. #}
{% macro redshift_install_udfs() -%}
    {%- if target.type != 'redshift' -%}
        {{ exceptions.raise_compiler_error("deid: redshift_install_udfs needs a redshift target; this one is '" ~ target.type ~ "'") }}
    {%- endif -%}
    {%- set statements = deid.redshift_udf_statements() -%}
    {%- for statement in statements -%}
        {%- do run_query(statement) -%}
    {%- endfor -%}
    {%- do run_query('commit') -%}
    {{ log("deid: ran " ~ statements | length ~ " statements: deid.tokenize and deid.detokenize are in place", info=true) }}
{%- endmacro %}
