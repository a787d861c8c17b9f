-- Acting on a result: the emails of customers aged 30-39 in one three-digit ZIP area.
-- Needs detokenize: EXECUTE in the warehouse and the principal in the vault's policy.
-- The ZIP area defaults to the one with the most such customers (var `zip3` to choose).
with

customers as (
    select * from {{ ref('dim_customers') }}
    where age_band = '30-39'
),

busiest_zip3 as (
    select zip3
    from customers
    group by zip3
    order by count(*) desc, zip3
    limit 1
),

chosen as (
    select customers.*
    from customers
    {% if var('zip3', none) %}
        where customers.zip3 = '{{ var("zip3") }}'
    {% else %}
        inner join busiest_zip3 on customers.zip3 = busiest_zip3.zip3
    {% endif %}
),

-- Only the rows shown are re-identified: order and limit first, detokenize last. DuckDB
-- computes a select list before ORDER BY ... LIMIT, so detokenize beside an ORDER BY would
-- decrypt and audit every row of `chosen` (README "Re-identify only what is shown").
shown as (
    select
        zip3,
        age_band,
        email_token
    from chosen
    order by email_token
    limit 50
)

select
    zip3,
    age_band,
    email_token,
    {{ deid.detokenize('email_token') }} as email
from shown
order by email_token
