with

prescriptions as (
    select * from {{ ref('stg_pharmacy__prescriptions') }}
),

final as (
    select
        prescription_id,
        order_id,
        {{ deid.tokenize('customer_id', 'string', domain='customer') }} as customer_key,
        -- the ingredient without strength or form: what analyses group by
        {{ deid.generalized('drug_ingredient', "lower(split_part(drug_name, ' ', 1))") }}
            as drug_ingredient,
        -- ICD-10 category (first three characters), e.g. E11.9 -> E11
        {{ deid.generalized('icd10_category', 'upper(substring(diagnosis_code, 1, 3))') }}
            as diagnosis_category,
        {{ deid.tokenize('prescriber_name', 'name', domain='prescriber') }} as prescriber_token,
        {{ deid.tokenize('prescriber_npi', 'string', domain='npi') }} as prescriber_npi_token,
        {{ deid.year('filled_at') }} as filled_year,
        days_supply,
        quantity,
        copay
    from prescriptions
)

select * from final
