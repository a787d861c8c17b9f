with

source as (
    select * from {{ source('pharmacy', 'payments') }}
),

renamed as (
    select
        payment_id,
        order_id,
        card_number,
        card_expiry,
        card_brand,
        amount,
        paid_at
    from source
)

select * from renamed
