{# The restricted zone: the schemas (or databases) where declared PII may live. Every other relation dbt materializes is guarded. #}
{% macro restricted_zone() -%}
    {#- The default lives here, not in deid's vars: a package's vars never reach a caller. -#}
    {%- set zone = var('deid_restricted_zone', ['raw']) -%}
    {%- if zone is string -%}{%- set zone = [zone] -%}{%- endif -%}
    {{ return(zone | map('lower') | list) }}
{%- endmacro %}
