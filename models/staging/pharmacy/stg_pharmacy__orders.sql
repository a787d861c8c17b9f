with

source as (
    select * from {{ source('pharmacy', 'orders') }}
),

renamed as (
    select
        order_id,
        customer_id,
        store_id,
        ordered_at,
        channel,
        status,
        order_total
    from source
)

select * from renamed
