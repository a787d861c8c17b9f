{# Post-hook (masking mode): PII readers see clear text in this model's tokenized columns; everyone else sees the token. #}
{% macro redshift_attach_masking() -%}
    {%- if target.type != 'redshift' or not var('deid_redshift_masking', false) or not execute -%}
        {{ return('') }}
    {%- endif -%}
    {{ return(deid.redshift_masking_attach_statements(this, model.columns) | join(';\n')) }}
{%- endmacro %}
