"""The PII guard's value scan, attacked on DuckDB: leak shapes whose yml lies (each column
declared tokenized) so that only the scan of values can stop them, and legitimate shapes that
must build. One seed + one run for the module."""

from __future__ import annotations

import re
from collections.abc import Iterator

import duckdb
import pytest

from dbt_project_copy import DbtProject, copy_project
from test_dbt_duckdb_e2e import raw_values

pytestmark = pytest.mark.e2e

CUSTOMERS = "{{ source('pharmacy', 'customers') }}"
JOINED = CUSTOMERS + " as c join {{ source('web', 'leads') }} as l on c.customer_id = l.lead_id"
# model name -> (select list, from clause): each exposes raw PII in some disguise
LEAKS = {
    "leak_upper_email": ("upper(email) as contact", CUSTOMERS),
    "leak_name_angle_email": ("full_name || ' <' || email || '>' as contact", CUSTOMERS),
    "leak_email_trailing_space": ("email || ' ' as contact", CUSTOMERS),
    "leak_email_in_text": ("'write to ' || email || ' today' as contact", CUSTOMERS),
    "leak_phone_digits": ("regexp_replace(phone, '[^0-9]', '', 'g') as contact", CUSTOMERS),
    "leak_phone_in_text": ("'call ' || phone || ' after 5pm' as contact", CUSTOMERS),
    "leak_struct": ("struct_pack(e := email, s := ssn) as contact", CUSTOMERS),
    "leak_list": ("list_value(email) as contact", CUSTOMERS),
    "leak_json_name": ("to_json(struct_pack(n := full_name)) as contact", CUSTOMERS),
    "leak_struct_address": ("struct_pack(a := street_address) as contact", CUSTOMERS),
    "leak_name_casefold": ("'  ' || upper(full_name) as contact", CUSTOMERS),
    "leak_dob": ("date_of_birth as contact", CUSTOMERS),
    "leak_dob_us_format": ("strftime(date_of_birth, '%m/%d/%Y') as contact", CUSTOMERS),
    "leak_dob_timestamp": ("cast(date_of_birth as timestamp) as contact", CUSTOMERS),
    "leak_ssn_no_dashes": ("replace(ssn, '-', '') as contact", CUSTOMERS),
    "leak_ssn_integer": ("cast(replace(ssn, '-', '') as bigint) as contact", CUSTOMERS),
    "leak_ssn_in_text": ("'ssn=' || ssn as contact", CUSTOMERS),
    "leak_token_then_email": ("{{ deid.tokenize('email', 'email') }} || ' ' || email as contact",
                              CUSTOMERS),
    "leak_string_agg": ("string_agg(email, ',') as contact",
                        CUSTOMERS + " group by region"),
    "leak_card_digits": ("regexp_replace(card_number, '[^0-9]', '', 'g') as contact",
                         "{{ source('pharmacy', 'payments') }}"),
    "leak_card_in_text": ("'paid with ' || card_number as contact",
                          "{{ source('pharmacy', 'payments') }}"),
    "leak_prescriber_list": ("list_value(lower(prescriber_name)) as contact",
                             "{{ source('pharmacy', 'prescriptions') }}"),
    # two sources declare `email`: each one's values must be caught, whichever comes first
    "leak_email_of_source_a": ("c.customer_id as contact, lower(l.email) as contact_b", JOINED),
    "leak_email_of_source_b": ("c.customer_id as contact, lower(c.email) as contact_b", JOINED),
}
# must build: tokens, counts, generalizations, dates that are not raw dates
LEGIT = {
    "ok_counts": ("region, count(distinct email) as contact, count(*) as contact_b",
                  CUSTOMERS + " group by region"),
    "ok_token_struct": ("struct_pack(t := {{ deid.tokenize('email', 'email') }},"
                        " s := {{ deid.tokenize('ssn', 'ssn') }}) as contact,"
                        " {{ deid.tokenize('phone', 'phone') }} as contact_b", CUSTOMERS),
    "ok_token_list": ("list_value({{ deid.tokenize('full_name', 'name') }},"
                      " {{ deid.tokenize('street_address', 'address') }}) as contact,"
                      " {{ deid.tokenize('card_number', 'card') }} || ' ' ||"
                      " {{ deid.card_last4('card_number') }} as contact_b",
                      "{{ source('pharmacy', 'payments') }}"
                      " join " + CUSTOMERS + " on true limit 500"),
    "ok_generalized": ("{{ deid.age_band('date_of_birth') }} || ' ' || {{ deid.zip3('zip') }}"
                       " as contact, {{ deid.year('date_of_birth') }} as contact_b", CUSTOMERS),
    "ok_event_dates": ("o.ordered_at as contact, cast(o.ordered_at as date) as contact_b",
                       "{{ source('pharmacy', 'orders') }} as o join " + CUSTOMERS
                       + " as c using (customer_id)"),
}
LEADS = "lead_id,email\n" + "".join(f"{i},lead.{i}@example.org\n" for i in range(1, 51))
CRM_SOURCE = """version: 2
sources:
  - name: web
    database: raw
    schema: raw
    tables:
      - name: leads
        identifier: raw_leads
        columns:
          - name: lead_id
          - name: email
            config: {meta: {pii: email}}
"""


def model_yml(names: list[str]) -> str:
    # every column declared tokenized: the name check passes, only the values tell
    lie = "config: {meta: {deid: {tokenized: string}}}"
    out = ["version: 2", "models:"]
    for name in names:
        out += [f"  - name: {name}", "    columns:",
                f"      - {{name: contact, {lie}}}", f"      - {{name: contact_b, {lie}}}",
                "      - {name: region, description: Sales region.}"]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DbtProject, str]]:
    project = copy_project(tmp_path_factory.mktemp("value_scan"))
    (project.path / "seeds" / "raw" / "raw_leads.csv").write_text(LEADS)
    (project.path / "models" / "staging" / "_web__sources.yml").write_text(CRM_SOURCE)
    folder = project.path / "models" / "marts" / "scan"
    folder.mkdir()
    for name, (select, source) in {**LEAKS, **LEGIT}.items():
        (folder / f"{name}.sql").write_text(f"select {select} from {source}\n")
    (folder / "_scan__models.yml").write_text(model_yml([*LEAKS, *LEGIT]))
    project.deid("init", "--transformer", "dbt_transformer")
    project.dbt("seed")
    run = project.dbt("run", check=False)
    yield project, run.stdout + run.stderr


def relations(project: DbtProject) -> set[str]:
    con = duckdb.connect(str(project.path / "warehouse.duckdb"), read_only=True)
    try:
        return {r[0] for r in con.sql("select table_name from information_schema.tables")
                .fetchall()}
    finally:
        con.close()


@pytest.mark.parametrize("name", sorted(LEAKS))
def test_value_scan_fails_the_leak(scanned: tuple[DbtProject, str], name: str) -> None:
    project, out = scanned
    caught = rf"model {name} exposes raw PII values: contact(_b)? holds values of raw PII column"
    assert re.search(caught, out), out[-3000:]
    assert name not in relations(project)


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_value_scan_passes_tokens_and_generalizations(scanned: tuple[DbtProject, str],
                                                      name: str) -> None:
    project, out = scanned
    assert f"model {name} " not in out
    assert name in relations(project)


def test_value_scan_compares_every_declaration_of_a_name(
        scanned: tuple[DbtProject, str]) -> None:
    _, out = scanned
    assert re.search(r"model leak_email_of_source_a exposes .*raw_leads[.]email", out)
    assert re.search(r"model leak_email_of_source_b exposes .*raw_customers[.]email", out)


def test_value_scan_passes_the_example_marts_and_names_no_value(
        scanned: tuple[DbtProject, str]) -> None:
    project, out = scanned
    assert {"dim_customers", "fct_orders", "fct_prescriptions", "fct_payments"} \
        <= relations(project)
    shown = [v for v in raw_values() if len(v) >= 6 and v in out]
    assert not shown, f"the guard's output quotes {len(shown)} raw values"
    rate = sum(bool(re.search(rf"model {n} exposes", out)) for n in LEAKS) / len(LEAKS)
    print(f"value scan: {rate:.0%} of {len(LEAKS)} leak shapes caught, "
          f"0 of {len(LEGIT) + 4} legitimate models refused")
