{# Fail if any string column of `this` holds a value found in an upstream raw PII column. #}
{% macro pii_value_scan(columns, upstream) -%}
    {#- Only kinds whose values cannot plausibly recur by chance in other columns: a ZIP prefix
        may equal a customer id, but no mart value should ever equal a raw email or SSN. -#}
    {%- set specific = ['email', 'phone', 'ssn', 'card', 'name', 'address'] -%}
    {%- set checks = [] -%}
    {%- for col in columns -%}
        {%- for pii_name, pii in upstream.items() if pii.relation and pii.kind in specific -%}
            {%- do checks.append(
                "select '" ~ col.name ~ "' as mart_column, '" ~ pii_name ~ "' as raw_column"
                ~ " where exists (select 1 from " ~ this ~ " m join " ~ pii.relation ~ " r"
                ~ " on cast(m." ~ adapter.quote(col.name) ~ " as " ~ dbt.type_string() ~ ")"
                ~ " = cast(r." ~ adapter.quote(pii.column) ~ " as " ~ dbt.type_string() ~ "))") -%}
        {%- endfor -%}
    {%- endfor -%}
    {%- if not checks or not var('deid_guard_scan', true) -%}
        {{ return('') }}
    {%- endif -%}
    {%- set result = run_query(checks | join('\nunion all\n')) -%}
    {%- if result.rows | length > 0 -%}
        {%- set pairs = [] -%}
        {%- for row in result.rows -%}
            {%- do pairs.append(row[0] ~ " holds values of raw " ~ row[1]) -%}
        {%- endfor -%}
        {{ exceptions.raise_compiler_error("deid.pii_guard: model " ~ model.name ~ " exposes raw PII values: " ~ pairs | join('; ') ~ " (values not shown)") }}
    {%- endif -%}
{%- endmacro %}
