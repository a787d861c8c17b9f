{{
    config(
        materialized='incremental',
        unique_key='order_id',
        on_schema_change='fail'
    )
}}

with

orders as (
    select new_orders.* from {{ ref('stg_pharmacy__orders') }} as new_orders
    {% if is_incremental() %}
        where new_orders.ordered_at > (select max(built.ordered_at) from {{ this }} as built)
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
