{# The three-digit ZIP prefixes deid.zip3 reports as '000' (var deid_restricted_zip3).
   The default lives here, not in deid's vars: a package's vars never reach its macros when
   another project's model calls them. HHS Safe Harbor guidance (2000 census): the prefixes
   covering 20,000 people or fewer. #}
{% macro restricted_zip3() -%}
    {{ return(var('deid_restricted_zip3', [
        '036', '059', '063', '102', '203', '556', '692', '790', '821', '823',
        '830', '831', '878', '879', '884', '890', '893'])) }}
{%- endmacro %}
