{{
    config(
        materialized='incremental',
        unique_key='order_id',
        on_schema_change='fail'
    )
}}

with

orders as (
    select * from {{ ref('stg_pharmacy__orders') }}
    {% if is_incremental() %}
        where ordered_at > (select max(ordered_at) from {{ this }})
    {% endif %}
),

stores as (
    select * from {{ ref('stg_pharmacy__stores') }}
),

final as (
    select
        orders.order_id,
        {{ deid.tokenize('orders.customer_id', 'string', domain='customer') }} as customer_key,
        orders.store_id,
        stores.store_region,
        orders.ordered_at,
        cast(orders.ordered_at as date) as order_date,
        orders.channel,
        orders.status,
        orders.order_total
    from orders
    left join stores on orders.store_id = stores.store_id
)

select * from final
