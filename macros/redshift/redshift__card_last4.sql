{# Redshift: regexp_replace replaces every match by default; its fourth argument is a position, not flags. #}
{% macro redshift__card_last4(card_number) -%}
    right(regexp_replace({{ card_number }}, '[^0-9]', ''), 4)
{%- endmacro %}
