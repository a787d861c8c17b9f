with

customers as (
    select * from {{ ref('stg_pharmacy__customers') }}
),

final as (
    select
        {{ deid.tokenize('customer_id', 'string', domain='customer') }} as customer_key,
        {{ deid.tokenize('full_name', 'name') }} as full_name_token,
        {{ deid.tokenize('email', 'email') }} as email_token,
        {{ deid.tokenize('phone', 'phone') }} as phone_token,
        {{ deid.tokenize('ssn', 'ssn') }} as ssn_token,
        {{ deid.tokenize('street_address', 'address') }} as street_address_token,
        {{ deid.age_band('date_of_birth') }} as age_band,
        {{ deid.zip3('zip') }} as zip3,
        state,
        region,
        {{ deid.year('created_at') }} as customer_since_year
    from customers
)

select * from final
