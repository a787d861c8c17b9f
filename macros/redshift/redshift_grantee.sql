{# One entry of a role-list var as a Redshift grantee: 'name' or 'role name' → ROLE name, 'group name' → GROUP name, 'user name' → name. #}
{% macro redshift_grantee(entry) -%}
    {%- set m = modules.re.fullmatch('(?:(role|group|user)[\\s:]+)?([a-z_][a-z0-9_$]{0,126})', (entry | string | trim | lower)) -%}
    {%- if not m -%}
        {{ exceptions.raise_compiler_error("deid: '" ~ entry ~ "' is not a Redshift grantee; write a lowercase role name, or 'group <name>' or 'user <name>'") }}
    {%- endif -%}
    {%- set kind = m.group(1) or 'role' -%}
    {{ return(m.group(2) if kind == 'user' else kind ~ ' ' ~ m.group(2)) }}
{%- endmacro %}
