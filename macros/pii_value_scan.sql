{# Fail if a column of `this` holds values of any upstream PII declaration, in any disguise the
   normalized forms below see through (case, spaces, separators, text around the value,
   structs, lists and JSON cast to text, dates as dates, timestamps or text). #}
{% macro pii_value_scan(columns, upstream) -%}
    {%- if not columns or not var('deid_guard_scan', true) -%}
        {{ return('') }}
    {%- endif -%}
    {%- set sql = deid.pii_value_scan_sql(columns, upstream, this) -%}
    {%- if not sql -%}
        {{ return('') }}
    {%- endif -%}
    {%- set result = run_query(sql) -%}
    {%- if result.rows | length > 0 -%}
        {%- set pairs = [] -%}
        {%- for row in result.rows -%}
            {%- do pairs.append(row[0] ~ " holds values of raw PII column " ~ row[1]) -%}
        {%- endfor -%}
        {{ exceptions.raise_compiler_error("deid.pii_guard: model " ~ model.name ~ " exposes raw PII values: " ~ pairs | join('; ') ~ " (values not shown). Fix: pass the column through deid.tokenize('<column>', '<kind>') or a generalizer (deid.age_band, deid.zip3, deid.card_last4, deid.year) in the model's SQL, or drop it; then declare the treatment in its yml (meta deid: {tokenized: <kind>})") }}
    {%- endif -%}
{%- endmacro %}

{# The scan's query: one row (mart column, raw column) per leak found; none when clean. #}
{% macro pii_value_scan_sql(columns, upstream, relation) -%}
    {#- Kinds whose values the scan compares, and the form they are compared in (a timestamp by
        its date). The `string` and `number` kinds are left out: ids, codes, ZIPs and amounts
        recur by chance in unrelated columns. -#}
    {%- set groups = {'email': 'text', 'name': 'text', 'address': 'text',
                      'phone': 'digits', 'ssn': 'digits', 'card': 'digits',
                      'date': 'date', 'timestamp': 'date'} -%}
    {#- A match of a form that cannot recur by chance (an email, a name, a formatted SSN, 12+
        digits) is a leak at once; a match of a bare 9-11 digit number or a date may be chance
        (a 9-digit id, an order date equal to someone's birthday), so those count as a leak
        when at least this share of the column's distinct numbers or dates are raw values. -#}
    {%- set share = var('deid_guard_scan_share', 0.5) -%}
    {%- if share is not number or share < 0 or share > 1 -%}
        {{ exceptions.raise_compiler_error("deid.pii_guard: var deid_guard_scan_share must be a number from 0 to 1") }}
    {%- endif -%}
    {%- set string = dbt.type_string() -%}
    {%- set raw = [] -%}
    {%- for name, pii in upstream.items() -%}
        {%- for d in pii.get('declarations', [pii]) if d.relation and d.kind in groups
                and deid._pii_relation_exists(d) -%}
            {%- set value = 'r.' ~ adapter.quote(d.column) -%}
            {%- set label = (d.relation | replace('"', '') | replace('`', '')).split('.')[-1]
                            ~ '.' ~ d.column -%}
            {%- set grp = groups[d.kind] -%}
            {%- if grp == 'text' -%}
                {%- set v = deid._scan_text('cast(' ~ value ~ ' as ' ~ string ~ ')') -%}
            {%- elif grp == 'digits' -%}
                {%- set v = deid._scan_digits('cast(' ~ value ~ ' as ' ~ string ~ ')') -%}
            {%- else -%}
                {#- dates and timestamps cast to ISO text; text that is no ISO date is skipped -#}
                {%- set text = 'cast(' ~ value ~ ' as ' ~ string ~ ')' -%}
                {%- set v = "case when " ~ deid.regex_matches(text, '^[0-9]{4}-[0-9]{2}-[0-9]{2}')
                            ~ " then substr(" ~ text ~ ", 1, 10) end" -%}
            {%- endif -%}
            {#- distinct first: normalizing costs more than deduplicating -#}
            {%- do raw.append("select distinct '" ~ grp ~ "' as grp, " ~ v ~ " as v, '"
                ~ label | replace("'", "''") ~ "' as raw_column from (select distinct "
                ~ adapter.quote(d.column) ~ " from " ~ d.relation ~ " where "
                ~ adapter.quote(d.column) ~ " is not null) as r") -%}
        {%- endfor -%}
    {%- endfor -%}
    {%- if not raw -%}
        {{ return('') }}
    {%- endif -%}
    {%- set texts = [] -%}
    {%- for col in columns -%}
        {%- do texts.append("select '" ~ col.name | replace("'", "''") ~ "' as c, cast(m."
            ~ adapter.quote(col.name) ~ " as " ~ string ~ ") as s from " ~ relation
            ~ " as m where m." ~ adapter.quote(col.name) ~ " is not null") -%}
    {%- endfor -%}
    {#- A value that is exactly one of deid's tokens holds nothing else and is never a raw value
        (email tokens are @deid.invalid, SSN tokens in never-issued areas, phone tokens +999):
        skipping them keeps the scan cheap on tokenized marts. Card tokens are scanned anyway:
        a raw card may start with 9 too (they differ by Luhn, which SQL does not check). -#}
    {%- set token_kinds = ['email', 'phone', 'ssn', 'name', 'address', 'date', 'number',
                           'timestamp', 'string'] -%}
    {%- set tokens = [] -%}
    {%- for kind in token_kinds -%}
        {%- do tokens.append(deid.token_pattern(kind)) -%}
    {%- endfor -%}
    {%- set email = '[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+' -%}
    {%- set delimiters = "[][<>{}\"'',;:|()=]" -%}
    {%- set formatted = {
        'phone': '[(]?[0-9]{3}[)]?[ .-]?[0-9]{3}[ .-][0-9]{4}',
        'ssn': '[0-9]{3}[ -][0-9]{2}[ -][0-9]{4}',
        'card': '[0-9]{4}[ -][0-9]{4,6}[ -][0-9]{4,5}(?:[ -][0-9]{1,4})?'} -%}
    with raw_values as (
        {{ raw | join('\n        union all\n        ') }}
    ),
    scanned as (
        select distinct c, s from (
            {{ texts | join('\n            union all\n            ') }}
        ) as mart_values
        where not {{ deid.regex_matches('s', tokens | join('|')) }}
    ),
    candidates as (
        select distinct c, grp, v, exact from (
            -- the whole value, and each part between delimiters (struct, list, JSON, `a <b>`)
            select c, 'text' as grp, {{ deid._scan_text('s') }} as v, true as exact
            from scanned
            union all
            select c, 'text', {{ deid._scan_text('part') }}, true
            from (select c, {{ deid.regex_each_part('s', delimiters) }} as part
                  from scanned where {{ deid.regex_matches('s', delimiters) }}) as parts
            union all
            select c, 'text', lower(found), true
            from (select c, {{ deid.regex_each_match('s', email) }} as found
                  from scanned where s like '%@%') as emails
            {%- for shape, pattern in formatted.items() %}
            union all
            select c, 'digits', {{ deid._scan_digits('found') }}, true
            from (select c, {{ deid.regex_each_match('s', pattern) }} as found
                  from scanned where {{ deid.regex_matches('s', '[0-9]{3}[ .)-]') }}) as {{ shape }}
            {%- endfor %}
            union all
            select c, 'digits', {{ deid._scan_digits('found') }}, length(found) >= 12
            from (select c, {{ deid.regex_each_match('s', '[0-9]{9,19}') }} as found
                  from scanned where {{ deid.regex_matches('s', '[0-9]{9}') }}) as numbers
            union all
            select c, 'date', found, false
            from (select c, {{ deid.regex_each_match('s', '[0-9]{4}-[0-9]{2}-[0-9]{2}') }} as found
                  from scanned where s like '%-%-%') as iso_dates
            union all
            select c, 'date', split_part(found, '/', 3) || '-' || lpad(split_part(found, '/', 1), 2, '0')
                || '-' || lpad(split_part(found, '/', 2), 2, '0'), false
            from (select c, {{ deid.regex_each_match('s', '[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}') }} as found
                  from scanned where s like '%/%/%') as us_dates
        ) as all_candidates
        where v is not null and v <> ''
    ),
    loose_totals as (
        select c, grp, count(*) as n from candidates where not exact group by c, grp
    ),
    matches as (
        select m.c, r.raw_column, m.grp,
            max(case when m.exact then 1 else 0 end) as exact_hits,
            count(distinct case when not m.exact then m.v end) as loose_hits
        from candidates as m
        inner join raw_values as r on m.grp = r.grp and m.v = r.v
        group by m.c, r.raw_column, m.grp
    )
    select matches.c, matches.raw_column
    from matches
    left join loose_totals as t on matches.c = t.c and matches.grp = t.grp
    where matches.exact_hits > 0 or matches.loose_hits >= {{ share }} * t.n
    order by 1, 2
{%- endmacro %}

{# Text compared casefolded, trimmed, inner whitespace collapsed. #}
{% macro _scan_text(expr) -%}
    lower(trim({{ deid.regex_replace_all(expr, '[[:space:]]+', ' ') }}))
{%- endmacro %}

{# Digits only; a North American number with its leading country code 1 loses it. #}
{% macro _scan_digits(expr) -%}
    {%- set digits = deid.regex_replace_all(expr, '[^0-9]', '') -%}
    case when length({{ digits }}) = 11 and {{ digits }} like '1%'
        then substr({{ digits }}, 2) else {{ digits }} end
{%- endmacro %}

{# Whether to scan against a declaration. A source is always scanned: the landing data must be
   there, and if it is not (yet) the scan's query fails, and the relation with it (fail closed).
   A model, seed or snapshot declaring PII may not be built yet in this run, and what was never
   built holds nothing to leak. #}
{% macro _pii_relation_exists(declaration) -%}
    {%- if declaration.get('resource_type', 'source') == 'source' or not declaration.get('identifier') -%}
        {{ return(true) }}
    {%- endif -%}
    {{ return(adapter.get_relation(database=declaration.database, schema=declaration.schema,
                                   identifier=declaration.identifier) is not none) }}
{%- endmacro %}
