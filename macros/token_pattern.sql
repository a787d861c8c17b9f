{# The regular expression a token of `kind` matches (kept equal to deid/kinds.py by a test). #}
{% macro token_pattern(kind) -%}
    {%- set patterns = {
        'email': '^[a-z2-7]{24}@deid[.]invalid$',
        'phone': '^[+]999[0-9]{12}$',
        'ssn': '^9[5-9][0-9]-[0-4][0-9]-[0-9]{4}$',
        'card': '^9[0-9]{15}$',
        'name': '^name_[a-z2-7]{24}$',
        'address': '^addr_[a-z2-7]{24}$',
        'date': '^date_[a-z2-7]{24}$',
        'number': '^num_[a-z2-7]{24}$',
        'timestamp': '^ts_[a-z2-7]{24}$',
        'string': '^str_[a-z2-7]{24}$',
    } -%}
    {%- if kind not in patterns -%}
        {{ exceptions.raise_compiler_error("deid: unknown kind '" ~ kind ~ "'; expected one of " ~ patterns.keys() | join(', ')) }}
    {%- endif -%}
    {{ return(patterns[kind]) }}
{%- endmacro %}
