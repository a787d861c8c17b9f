{# Inside a dbt unit test, tokenize and detokenize never reach the vault: a unit test's
   fixture values would otherwise be minted into the production vault for good (and its
   detokenize audited). A value becomes an obviously fake, deterministic token that expected
   rows can spell out: deid.tokenize('email', 'email') of 'a@example.com' is
   'unit(email):a@example.com'; with a domain, 'unit(string:customer):42'. NULL stays NULL.
   No normalization is applied. detokenize takes the prefix off again. #}
{% macro in_unit_test() -%}
    {{ return(model is defined and model.resource_type == 'unit_test') }}
{%- endmacro %}

{% macro unit_test_token(column, kind, domain=none) -%}
    ('unit({{ deid.kind_spec(kind, domain) }}):' || cast({{ column }} as {{ dbt.type_string() }}))
{%- endmacro %}

{% macro unit_test_value(column) -%}
    substr({{ column }}, position('):' in {{ column }}) + 2)
{%- endmacro %}
