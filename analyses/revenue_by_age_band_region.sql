-- An analyst's question, answered over tokens: revenue by age band and region.
-- No clear identifier is needed (or available): customers join on their token.
with

orders as (
    select * from {{ ref('fct_orders') }}
    where status = 'completed'
),

customers as (
    select * from {{ ref('dim_customers') }}
)

select
    customers.age_band,
    customers.region,
    count(distinct customers.customer_key) as customers,
    count(*) as orders,
    sum(orders.order_total) as revenue
from orders
inner join customers on orders.customer_key = customers.customer_key
group by customers.age_band, customers.region
order by customers.age_band, customers.region
