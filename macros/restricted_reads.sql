{# Restricted-zone relations that a node's compiled SQL reads without source() or ref(): their PII is declared nowhere the guard can see. #}
{% macro restricted_reads(node) -%}
    {%- set declared = {} -%}
    {%- do deid._declared_relations(node.depends_on.nodes if node.depends_on is defined else [], declared, {}) -%}
    {%- set zone = deid.restricted_zone() -%}
    {%- set hidden = [] -%}
    {#- `from|join` then a two- or three-part name; a regex, not a parser (dbt macros have none):
        `deid check` parses the SQL for real. -#}
    {%- set pattern = '(?:from|join)[ \t\r\n]+((?:"[^"]+"|[a-z_][a-z0-9_$]*)(?:[ \t\r\n]*[.][ \t\r\n]*(?:"[^"]+"|[a-z_][a-z0-9_$]*)){1,2})' -%}
    {%- for name in modules.re.findall(pattern, node.compiled_code or '', modules.re.IGNORECASE) -%}
        {%- set parts = deid._relation_parts(name) -%}
        {%- set in_zone = parts[-2] in zone or (parts | length == 3 and (parts[0] in zone or (parts[0] ~ '.' ~ parts[1]) in zone)) -%}
        {%- if in_zone and (parts[-2] ~ '.' ~ parts[-1]) not in declared and name not in hidden -%}
            {%- do hidden.append(name) -%}
        {%- endif -%}
    {%- endfor -%}
    {{ return(hidden) }}
{%- endmacro %}

{#- schema.identifier of every relation a node reads through source()/ref(), through ephemeral models (inlined into its SQL). -#}
{% macro _declared_relations(unique_ids, declared, seen) -%}
    {%- for uid in unique_ids if uid not in seen -%}
        {%- do seen.update({uid: true}) -%}
        {%- set parent = graph.sources.get(uid) or graph.nodes.get(uid) -%}
        {%- if parent and parent.relation_name -%}
            {%- set parts = deid._relation_parts(parent.relation_name) -%}
            {%- do declared.update({parts[-2] ~ '.' ~ parts[-1]: true}) -%}
        {%- endif -%}
        {%- if parent and parent.config.materialized == 'ephemeral' -%}
            {%- do deid._declared_relations(parent.depends_on.nodes, declared, seen) -%}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro %}

{#- ["db", "schema", "name"] of a relation name as written in SQL: quotes dropped, lower case. -#}
{% macro _relation_parts(name) -%}
    {%- set parts = [] -%}
    {%- for part in name.split('.') -%}
        {%- do parts.append(part | trim | replace('"', '') | lower) -%}
    {%- endfor -%}
    {{ return(parts) }}
{%- endmacro %}
