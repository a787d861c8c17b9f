with

source as (
    select * from {{ source('pharmacy', 'prescriptions') }}
),

renamed as (
    select
        prescription_id,
        order_id,
        customer_id,
        drug_name,
        ndc_code,
        diagnosis_code,
        prescriber_name,
        prescriber_npi,
        filled_at,
        days_supply,
        quantity,
        copay
    from source
)

select * from renamed
