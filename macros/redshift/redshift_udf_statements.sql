{#- The statements that create deid.tokenize / deid.detokenize on Redshift and gate them (a list of SQL texts).

    Batch sizing keeps every Lambda response under its 6 MB limit, measured pessimistically
    (the runtime re-encodes the returned JSON string: quotes and backslashes escaped, non-ASCII
    as \u escapes, up to 12 bytes per character):
    - tokenize: a token is at most 37 characters (an email token), 42 bytes per row on the wire;
      100,000 rows is at most 4.2 MB whatever the values' size. MAX_BATCH_SIZE 5 MB keeps the
      request under 6 MB too.
    - detokenize: a value is at most 4,096 characters (kind string), 49,158 bytes per row;
      100 rows is at most 4.9 MB. Raise it (var) if only short kinds are ever detokenized:
      a response over the limit fails the query, it is never cut.
    tests/python/test_redshift_sql.py re-derives these bounds from deid/kinds.py. -#}
{% macro redshift_udf_statements() -%}
    {%- set role = var('deid_redshift_iam_role', none) -%}
    {%- if not role or not modules.re.fullmatch('default|arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]+(,arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_/-]+)*', role) -%}
        {{ exceptions.raise_compiler_error("deid: set var deid_redshift_iam_role to the RedshiftRoleArn output of the SAM stack (or 'default'); see docs/redshift.md") }}
    {%- endif -%}
    {%- set functions = {
        'tokenize': var('deid_redshift_tokenize_lambda', 'deid-tokenize'),
        'detokenize': var('deid_redshift_detokenize_lambda', 'deid-detokenize'),
    } -%}
    {%- for fn in functions.values() -%}
        {%- if not modules.re.fullmatch('[A-Za-z0-9_:.-]{1,140}', fn) -%}
            {{ exceptions.raise_compiler_error("deid: deid_redshift_tokenize_lambda / deid_redshift_detokenize_lambda must be Lambda function names or ARNs") }}
        {%- endif -%}
    {%- endfor -%}
    {%- set retry_ms = var('deid_redshift_retry_timeout_ms', 20000) | int -%}
    {%- set rows = {
        'tokenize': var('deid_redshift_tokenize_max_batch_rows', 100000) | int,
        'detokenize': var('deid_redshift_detokenize_max_batch_rows', 100) | int,
    } -%}
    {%- if retry_ms < 0 or rows.tokenize < 1 or rows.detokenize < 1 -%}
        {{ exceptions.raise_compiler_error("deid: the Redshift batch and retry vars must be positive integers") }}
    {%- endif -%}
    {%- set iam = "default" if role == "default" else "'" ~ role ~ "'" -%}
    {%- set transformers = deid.redshift_grantees('deid_transformer_roles') -%}
    {%- set readers = deid.redshift_grantees('deid_pii_reader_roles') -%}
    {%- set s = [] -%}
    {%- do s.append("create schema if not exists deid") -%}
    {%- do s.append("revoke create on schema deid from public") -%}
    {%- do s.append(
        "create or replace external function deid.tokenize(varchar, varchar)\nreturns varchar(64)\nvolatile\nlambda '" ~ functions.tokenize ~ "'\niam_role " ~ iam
        ~ "\nretry_timeout " ~ retry_ms ~ "\nmax_batch_rows " ~ rows.tokenize ~ "\nmax_batch_size 5 mb") -%}
    {%- do s.append(
        "create or replace external function deid.detokenize(varchar)\nreturns varchar(65535)\nvolatile\nlambda '" ~ functions.detokenize ~ "'\niam_role " ~ iam
        ~ "\nretry_timeout " ~ retry_ms ~ "\nmax_batch_rows " ~ rows.detokenize ~ "\nmax_batch_size 5 mb") -%}
    {#- EXECUTE on a new function goes to PUBLIC by default. -#}
    {%- do s.append("revoke execute on function deid.tokenize(varchar, varchar) from public") -%}
    {%- do s.append("revoke execute on function deid.detokenize(varchar) from public") -%}
    {%- for grantee in (transformers + readers) | unique -%}
        {%- do s.append("grant usage on schema deid to " ~ grantee) -%}
    {%- endfor -%}
    {%- for grantee in transformers -%}
        {%- do s.append("grant execute on function deid.tokenize(varchar, varchar) to " ~ grantee) -%}
    {%- endfor -%}
    {%- for grantee in readers -%}
        {%- do s.append("grant execute on function deid.detokenize(varchar) to " ~ grantee) -%}
    {%- endfor -%}
    {%- if var('deid_redshift_masking', false) -%}
        {%- set width = deid.redshift_masked_width() -%}
        {%- do s.append("create masking policy deid_reveal_token if not exists\nwith (token varchar(" ~ width ~ "))\nusing (cast(deid.detokenize(token) as varchar(" ~ width ~ ")))") -%}
    {%- endif -%}
    {{ return(s) }}
{%- endmacro %}
