{# ATTACH MASKING POLICY statements for the columns declared meta deid: {tokenized: <kind>}, one per PII reader role or user. #}
{% macro redshift_masking_attach_statements(relation, columns) -%}
    {%- set statements = [] -%}
    {%- set readers = deid.redshift_grantees('deid_pii_reader_roles') -%}
    {%- for name, col in columns.items() -%}
        {%- set treatment = deid.column_meta(col).get('deid') or {} -%}
        {%- if treatment is mapping and treatment.get('tokenized') -%}
            {%- for grantee in readers -%}
                {%- if grantee.startswith('group ') -%}
                    {{ exceptions.raise_compiler_error("deid: a masking policy attaches to a role or a user, not to '" ~ grantee ~ "'") }}
                {%- endif -%}
                {%- do statements.append("attach masking policy deid_reveal_token on " ~ relation ~ " (" ~ adapter.quote(name | lower) ~ ") to " ~ grantee ~ " priority 10") -%}
            {%- endfor -%}
        {%- endif -%}
    {%- endfor -%}
    {{ return(statements) }}
{%- endmacro %}
