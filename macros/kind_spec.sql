{# Validate a kind (and domain) at compile time and render the UDF's kind argument. #}
{% macro kind_spec(kind, domain=none) -%}
    {%- set kinds = ['email', 'phone', 'ssn', 'card', 'name', 'address', 'date', 'number', 'timestamp', 'string'] -%}
    {%- if kind not in kinds -%}
        {{ exceptions.raise_compiler_error("deid.tokenize: unknown kind '" ~ kind ~ "'; expected one of " ~ kinds | join(', ')) }}
    {%- endif -%}
    {%- if domain is not none -%}
        {%- if not modules.re.fullmatch('[a-z][a-z0-9_]{0,62}', domain) -%}
            {{ exceptions.raise_compiler_error("deid.tokenize: invalid domain for kind '" ~ kind ~ "': 1-63 characters of a-z, 0-9 and _, starting with a letter") }}
        {%- endif -%}
        {{ kind }}:{{ domain }}
    {%- else -%}
        {{ kind }}
    {%- endif -%}
{%- endmacro %}
