{# The last four digits of a card number (separators ignored), which PCI DSS allows to show. #}
{% macro card_last4(card_number) -%}
    {{ return(deid.generalized('card_last4', adapter.dispatch('card_last4', 'deid')(card_number))) }}
{%- endmacro %}

{% macro default__card_last4(card_number) -%}
    right(regexp_replace({{ card_number }}, '[^0-9]', '', 'g'), 4)
{%- endmacro %}
