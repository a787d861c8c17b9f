{# Width of token columns (and of clear text through the masking policy) in dynamic data masking mode. #}
{% macro redshift_masked_width() -%}
    {%- set width = var('deid_redshift_masked_width', 256) | int -%}
    {%- if width < 64 or width > 65535 -%}
        {{ exceptions.raise_compiler_error("deid: deid_redshift_masked_width must be between 64 (the longest token) and 65535") }}
    {%- endif -%}
    {{ return(width) }}
{%- endmacro %}
