{# A role-list var as quoted identifiers; "group x" is accepted (PostgreSQL takes TO GROUP x too). #}
{% macro postgres_role_list(var_name) -%}
{%- set value = var(var_name, []) -%}
{%- set names = [value] if value is string else (value or []) -%}
{%- set quoted = [] -%}
{%- for name in names -%}
    {%- set bare = modules.re.sub('^group\\s+', '', name | trim, flags=modules.re.I) -%}
    {%- do quoted.append('"' ~ bare | replace('"', '""') ~ '"') -%}
{%- endfor -%}
{{ return(quoted) }}
{%- endmacro %}
