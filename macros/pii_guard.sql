{# Post-hook: fail the model (its swap is rolled back) if it exposes a declared-PII column. #}
{% macro pii_guard() -%}
    {{ return(adapter.dispatch('pii_guard', 'deid')()) }}
{%- endmacro %}

{% macro default__pii_guard() -%}
    {#- Zones, not folders: declared PII may live in the restricted zone only, so every other
        relation (any folder or materialization, snapshots, seeds) is checked. -#}
    {%- if not execute or model.config.materialized == 'ephemeral' or deid.in_restricted_zone(this) -%}
        {{ return('') }}
    {%- endif -%}
    {%- set hidden = deid.restricted_reads(model) -%}
    {%- if hidden -%}
        {{ exceptions.raise_compiler_error("deid.pii_guard: model " ~ model.name ~ " reads the restricted zone without source() or ref(): " ~ hidden | join(', ') ~ "; declare the relation as a source (its PII in meta) and select from source()") }}
    {%- endif -%}
    {#- A seed has no upstream: it is checked against every PII declaration in the project. -#}
    {%- set is_seed = model.resource_type == 'seed' -%}
    {%- set upstream = deid.declared_pii() if is_seed else deid.upstream_pii(model) -%}
    {%- if not upstream -%}
        {{ return('') }}
    {%- endif -%}
    {%- set documented = {} -%}
    {%- for name, col in model.columns.items() -%}
        {%- do documented.update({name | lower: deid.column_meta(col)}) -%}
    {%- endfor -%}
    {%- set problems = [] -%}
    {%- set undocumented = [] -%}
    {%- set yml_path = (model.patch_path or '').split('://')[-1] or (model.original_file_path | replace('.sql', '.yml')) -%}
    {%- set scanned = [] -%}
    {%- for col in adapter.get_columns_in_relation(this) -%}
        {%- set name = col.name | lower -%}
        {%- set meta = documented.get(name) -%}
        {%- set treatment = (meta or {}).get('deid') or {} -%}
        {%- if treatment is string -%}{%- set treatment = {treatment: true} -%}{%- endif -%}
        {%- if treatment.get('tokenized') or treatment.get('generalized') -%}
            {# declared treatment: the value scan below and the generic tests check it #}
        {%- elif meta is none and not is_seed -%}
            {%- do undocumented.append("column " ~ name ~ " of model " ~ model.name ~ " is undocumented; downstream of declared PII every column must be documented (add it to " ~ yml_path ~ ": a description if it is not sensitive, or meta deid: {tokenized: <kind>} / {generalized: <how>})") -%}
        {%- elif name in upstream or (meta or {}).get('pii') -%}
            {%- do problems.append("column '" ~ name ~ "' carries declared PII (" ~ (upstream.get(name, {}).get('kind') or (meta or {}).get('pii')) ~ ") but is neither tokenized nor generalized; use deid.tokenize or a generalizer and declare it in meta") -%}
        {%- endif -%}
        {#- every type: numbers, dates, structs, lists and JSON are scanned as text -#}
        {%- do scanned.append(col) -%}
    {%- endfor -%}
    {%- if problems -%}
        {{ exceptions.raise_compiler_error("deid.pii_guard: model " ~ model.name ~ " would expose PII:\n  - " ~ (problems + undocumented) | join("\n  - ")) }}
    {%- elif undocumented -%}
        {{ exceptions.raise_compiler_error("deid.pii_guard: " ~ undocumented | join("\n  - ")) }}
    {%- endif -%}
    {{ deid.pii_value_scan(scanned, upstream) }}
    {{ return('') }}
{%- endmacro %}
