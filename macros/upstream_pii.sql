{# Columns declared `meta: {pii: <kind>}` on any source or model upstream of `node`, by name.
   Each entry keeps the first declaration's kind and, under `declarations`, every declaration
   of that name (two sources may both declare `email`: the value scan needs both). #}
{% macro upstream_pii(node) -%}
    {%- set found = {} -%}
    {%- set seen = {} -%}
    {%- do deid._collect_pii(node.depends_on.nodes, found, seen) -%}
    {{ return(found) }}
{%- endmacro %}

{% macro _collect_pii(unique_ids, found, seen) -%}
    {%- for uid in unique_ids if uid not in seen -%}
        {%- do seen.update({uid: true}) -%}
        {%- set parent = graph.sources.get(uid) or graph.nodes.get(uid) -%}
        {%- if parent -%}
            {%- set materialized = parent.resource_type == 'source'
                or (parent.config.materialized | default('')) not in ['ephemeral', ''] -%}
            {%- for name, col in parent.columns.items() -%}
                {%- set kind = deid.column_meta(col).get('pii') -%}
                {%- if kind -%}
                    {%- set declaration = {
                        'kind': kind,
                        'relation': parent.relation_name if materialized else none,
                        'resource_type': parent.resource_type,
                        'database': parent.database, 'schema': parent.schema,
                        'identifier': parent.identifier if parent.resource_type == 'source'
                                      else parent.alias,
                        'column': name} -%}
                    {%- if (name | lower) not in found -%}
                        {%- do found.update({name | lower: {
                            'kind': kind, 'relation': declaration.relation, 'column': name,
                            'declarations': []}}) -%}
                    {%- endif -%}
                    {%- do found[name | lower].declarations.append(declaration) -%}
                {%- endif -%}
            {%- endfor -%}
            {%- if parent.depends_on is defined and parent.depends_on.nodes -%}
                {%- do deid._collect_pii(parent.depends_on.nodes, found, seen) -%}
            {%- endif -%}
        {%- endif -%}
    {%- endfor -%}
{%- endmacro %}
