with

customers as (
    select * from {{ ref('stg_pharmacy__customers') }}
),

-- one tokenize call per distinct value, joined back: the customer table is the largest
email_tokens as (
    {{ deid.token_map('customers', 'email', 'email') }}
),

phone_tokens as (
    {{ deid.token_map('customers', 'phone', 'phone') }}
),

ssn_tokens as (
    {{ deid.token_map('customers', 'ssn', 'ssn') }}
),

final as (
    select
        {{ deid.tokenize('customers.customer_id', 'string', domain='customer') }} as customer_key,
        {{ deid.tokenize('customers.full_name', 'name') }} as full_name_token,
        email_tokens.token as email_token,
        phone_tokens.token as phone_token,
        ssn_tokens.token as ssn_token,
        {{ deid.tokenize('customers.street_address', 'address') }} as street_address_token,
        {{ deid.age_band('customers.date_of_birth') }} as age_band,
        {{ deid.zip3('customers.zip') }} as zip3,
        customers.state,
        customers.region,
        {{ deid.year('customers.created_at') }} as customer_since_year
    from customers
    left join email_tokens on customers.email = email_tokens.value
    left join phone_tokens on customers.phone = phone_tokens.value
    left join ssn_tokens on customers.ssn = ssn_tokens.value
)

select * from final
