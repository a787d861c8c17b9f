{# Redshift: cast to varchar(65535); a bare varchar or text is varchar(256) there and a longer value would be cut before tokenizing. #}
{% macro redshift__tokenize(column, kind, domain) -%}
    {%- set call = "deid.tokenize(cast(" ~ column ~ " as varchar(65535)), '" ~ deid.kind_spec(kind, domain) ~ "')" -%}
    {%- if var('deid_redshift_masking', false) -%}
        {#- A masking policy's input and output types must equal the column's: widen the token column to what detokenize returns through the policy. -#}
        cast({{ call }} as varchar({{ deid.redshift_masked_width() }}))
    {%- else -%}
        {{ call }}
    {%- endif -%}
{%- endmacro %}
