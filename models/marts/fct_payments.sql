with

payments as (
    select * from {{ ref('stg_pharmacy__payments') }}
),

final as (
    select
        payment_id,
        order_id,
        {{ deid.tokenize('card_number', 'card') }} as card_token,
        {{ deid.card_last4('card_number') }} as card_last4,
        card_brand,
        amount,
        paid_at
    from payments
)

select * from final
