with

source as (
    select * from {{ source('pharmacy', 'stores') }}
),

renamed as (
    select
        store_id,
        store_name,
        city as store_city,
        state as store_state,
        region as store_region
    from source
)

select * from renamed
