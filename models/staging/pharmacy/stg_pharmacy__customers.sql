with

source as (
    select * from {{ source('pharmacy', 'customers') }}
),

renamed as (
    select
        customer_id,
        full_name,
        email,
        ssn,
        date_of_birth,
        street_address,
        city,
        state,
        zip,
        region,
        created_at,
        nullif(trim(phone), '') as phone
    from source
)

select * from renamed
