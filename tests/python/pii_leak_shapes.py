"""Leak shapes that must fail and legitimate transformations that must pass, written into a
copy of the example project (models/reports/ and a few other places) for the PII battery.

Every column of every shape is documented by description only, the way a model author who
forgot about PII would document it: nothing in the yml says the column is sensitive.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

C = "{{ ref('stg_pharmacy__customers') }}"
ORD = "{{ ref('stg_pharmacy__orders') }}"
S = "{{ ref('stg_pharmacy__stores') }}"
P = "{{ ref('stg_pharmacy__payments') }}"
RX = "{{ ref('stg_pharmacy__prescriptions') }}"
# raw.raw_customers by name, without source(): the name the source renders to wherever the
# landing data lives (a schema, or an attached database), and no edge in dbt's graph.
RAW_CUSTOMERS = ("{% if execute %}{{ graph.sources['source.deid.pharmacy.customers']"
                 ".relation_name }}{% else %}raw.raw_customers{% endif %}")
CUSTOMER_COLUMNS = ["customer_id", "full_name", "email", "ssn", "date_of_birth",
                    "street_address", "city", "state", "zip", "region", "created_at", "phone"]


@dataclass(frozen=True)
class Shape:
    name: str
    leak: bool
    sql: str | None               # None: not a model (a seed, a snapshot)
    columns: list[str]
    exposed: str | None = None    # the column a finding must name (leaks)
    folder: str = "models/reports"
    # The in-dbt guard (names, documentation, zones; no parser) must stop this one too.
    guard_sees: bool = False
    # Beyond what a compile-time parser can see: the lineage checker is not expected to catch it.
    lineage_blind: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def leak(name: str, sql: str, columns: list[str], exposed: str | None = None,
         **kw: object) -> Shape:
    return Shape(name, True, sql, columns, exposed or columns[-1], **kw)  # type: ignore[arg-type]


def ok(name: str, sql: str, columns: list[str], **kw: object) -> Shape:
    return Shape(name, False, sql, columns, **kw)  # type: ignore[arg-type]


LEAKS = [
    leak("leak_upper_email", f"select region, upper(email) as contact from {C}",
         ["region", "contact"]),
    leak("leak_name_angle_email",
         f"select full_name || ' <' || email || '>' as recipient from {C}", ["recipient"]),
    leak("leak_email_space", f"select email || ' ' as contact from {C}", ["contact"]),
    leak("leak_phone_digits",
         f"select regexp_replace(phone, '[^0-9]', '', 'g') as phone_digits from {C}",
         ["phone_digits"]),
    leak("leak_md5_email", f"select md5(email) as email_hash from {C}", ["email_hash"]),
    leak("leak_string_agg_email",
         f"select region, string_agg(email, ',') as emails from {C} group by region",
         ["region", "emails"]),
    leak("leak_struct_pack", f"select struct_pack(e := email, s := ssn) as contact from {C}",
         ["contact"]),
    leak("leak_list_value", f"select list_value(email) as emails from {C}", ["emails"]),
    leak("leak_dob", f"select date_of_birth as dob from {C}", ["dob"]),
    leak("leak_lower_email", f"select lower(email) as contact from {C}", ["contact"]),
    leak("leak_ssn_no_dashes", f"select replace(ssn, '-', '') as ssn_digits from {C}",
         ["ssn_digits"]),
    leak("leak_renamed_email", f"select email as contact from {C}", ["contact"]),
    leak("leak_cte_chain", f"with a as (select email as e from {C}),\n"
         "b as (select e as x from a)\nselect x as contact from b", ["contact"]),
    leak("leak_derived_table", f"select s.c as contact from (select email as c from {C}) as s",
         ["contact"]),
    leak("leak_union_names", f"select store_name as label from {S}\n"
         f"union all\nselect full_name as label from {C}", ["label"]),
    leak("leak_join_orders", f"select o.order_id, c.email as contact from {ORD} as o\n"
         f"join {C} as c on o.customer_id = c.customer_id", ["order_id", "contact"]),
    leak("leak_first_value_window",
         f"select region, first_value(email) over (partition by region order by created_at)"
         f" as first_contact from {C}", ["region", "first_contact"]),
    leak("leak_lag_ssn", f"select lag(ssn) over (order by created_at) as previous_id from {C}",
         ["previous_id"]),
    leak("leak_to_json", f"select to_json(struct_pack(n := full_name)) as payload from {C}",
         ["payload"]),
    leak("leak_array_agg_phone",
         f"select region, array_agg(phone) as phones from {C} group by region",
         ["region", "phones"]),
    leak("leak_max_ssn", f"select region, max(ssn) as sample from {C} group by region",
         ["region", "sample"]),
    leak("leak_case_branch",
         f"select case when region = 'West' then email else 'n/a' end as contact from {C}",
         ["contact"]),
    leak("leak_coalesce", f"select coalesce(phone, email) as reach from {C}", ["reach"]),
    leak("leak_substring_ssn", f"select substring(ssn, 1, 11) as ssn_copy from {C}",
         ["ssn_copy"]),
    leak("leak_dob_text", f"select strftime(date_of_birth, '%Y%m%d') as born from {C}",
         ["born"]),
    leak("leak_scalar_subquery",
         f"select c.region, (select max(d.email) from {C} as d"
         f" where d.customer_id = c.customer_id) as contact\nfrom {C} as c",
         ["region", "contact"]),
    leak("leak_select_star", f"select * from {C}", CUSTOMER_COLUMNS, "email", guard_sees=True),
    leak("leak_star_exclude", f"select * exclude (email, ssn, phone) from {C}",
         [c for c in CUSTOMER_COLUMNS if c not in ("email", "ssn", "phone")], "full_name",
         guard_sees=True),
    leak("leak_sha256_ssn", f"select sha256(ssn) as ssn_hash from {C}", ["ssn_hash"]),
    leak("leak_card_pan", f"select card_number as pan from {P}", ["pan"]),
    leak("leak_prescriber", f"select trim(prescriber_name) as doctor from {RX}", ["doctor"]),
    leak("leak_email_local_part", f"select split_part(email, '@', 1) as mailbox from {C}",
         ["mailbox"]),
    leak("leak_distinct_email", f"select distinct email as contact from {C}", ["contact"]),
    leak("leak_group_by_email",
         f"select email as contact, count(*) as accounts from {C} group by email",
         ["contact", "accounts"], "contact"),
    leak("leak_unnest_contacts",
         f"select unnest(list_value(email, phone)) as contact from {C}", ["contact"]),
    leak("leak_concat_ws",
         f"select concat_ws(', ', street_address, city) as mailing from {C}", ["mailing"]),
    leak("leak_struct_field", f"select struct_pack(e := email).e as contact from {C}",
         ["contact"]),
    leak("leak_base64_email", f"select to_base64(encode(email)) as blob from {C}", ["blob"]),
    leak("leak_detokenized",
         "select deid.detokenize({{ deid.tokenize('email', 'email') }}) as contact"
         f" from {C}", ["contact"]),
    leak("leak_timestamp_dob",
         f"select cast(date_of_birth as timestamp) as born_at from {C}", ["born_at"]),
    leak("leak_view", f"{{{{ config(materialized='view') }}}}\nselect email as contact from {C}",
         ["contact"]),
    leak("leak_incremental",
         "{{ config(materialized='incremental', unique_key='account') }}\n"
         f"select customer_id as account, email as contact from {C}",
         ["account", "contact"]),
    leak("leak_ephemeral_chain", "select contact as reach from {{ ref('eph_contacts') }}",
         ["reach"], extra={"eph_contacts": f"{{{{ config(materialized='ephemeral') }}}}\n"
                                           f"select email as contact from {C}"}),
    leak("leak_raw_direct", f"select email as contact from {RAW_CUSTOMERS}", ["contact"],
         guard_sees=True),
    leak("leak_raw_direct_join",
         f"select c.region, r.phone as reach from {C} as c\n"
         f"join {RAW_CUSTOMERS} as r on r.customer_id = c.customer_id",
         ["region", "reach"], guard_sees=True),
    # The landing file itself, read by a model: no relation, no declaration.
    leak("leak_read_csv",
         "select email as contact from read_csv('seeds/raw/raw_customers.csv')", ["contact"]),
    # Two sources declare `email`; dbt lists sources first among a model's parents, so the
    # customers' declaration is the second one found.
    leak("leak_second_source_email",
         "select l.lead_id, c.email as contact from {{ source('battery', 'leads') }} as l\n"
         f"join {C} as c on l.lead_id = c.customer_id", ["lead_id", "contact"]),
    # A staging model switched to a table (in the staging folder).
    leak("stg_pharmacy__customer_contacts",
         "{{ config(materialized='table') }}\n"
         "select customer_id, email, phone from {{ source('pharmacy', 'customers') }}",
         ["customer_id", "email", "phone"], "email", folder="models/staging/pharmacy",
         guard_sees=True),
    # A snapshot of the customers source.
    Shape("snap_customers", True, None, CUSTOMER_COLUMNS, "email", folder="snapshots",
          guard_sees=True),
    # A seed outside seeds/raw: it lands in the marts' schema.
    Shape("contacts", True, None, ["customer_id", "email"], "email", folder="seeds/extra",
          guard_sees=True),
    # The same, with its header renamed: no declared name, no SQL to trace.
    Shape("mailing_list", True, None, ["recipient"], "recipient", folder="seeds/extra",
          lineage_blind=True),
]

LEGIT = [
    ok("ok_tokenized_email",
       f"select region, {{{{ deid.tokenize('email', 'email') }}}} as email_token from {C}",
       ["region", "email_token"]),
    ok("ok_token_map_join", f"with customers as (select * from {C}),\n"
       "email_tokens as ({{ deid.token_map('customers', 'email', 'email') }})\n"
       "select customers.region, email_tokens.token as email_token\nfrom customers\n"
       "left join email_tokens on customers.email = email_tokens.value",
       ["region", "email_token"]),
    ok("ok_age_band", f"select {{{{ deid.age_band('date_of_birth') }}}} as age_group from {C}",
       ["age_group"]),
    ok("ok_zip3", f"select {{{{ deid.zip3('zip') }}}} as zip_area from {C}", ["zip_area"]),
    ok("ok_card_last4", f"select {{{{ deid.card_last4('card_number') }}}} as last_four from {P}",
       ["last_four"]),
    ok("ok_birth_year", f"select {{{{ deid.year('date_of_birth') }}}} as birth_year from {C}",
       ["birth_year"]),
    ok("ok_count_email", f"select region, count(email) as with_email from {C} group by region",
       ["region", "with_email"]),
    ok("ok_count_distinct",
       f"select region, count(distinct email) as distinct_emails from {C} group by region",
       ["region", "distinct_emails"]),
    ok("ok_where_filter", f"select region, count(*) as customers from {C}\n"
       "where email like '%@example.com' group by region", ["region", "customers"]),
    ok("ok_join_on_ssn", f"select a.region, count(*) as shared from {C} as a\n"
       f"join {C} as b on a.ssn = b.ssn and a.customer_id <> b.customer_id\n"
       "group by a.region", ["region", "shared"]),
    ok("ok_row_number_by_email",
       "select region, row_number() over (partition by email order by created_at)"
       f" as nth_account from {C}", ["region", "nth_account"]),
    ok("ok_has_email", f"select region, email is not null as has_email from {C}",
       ["region", "has_email"]),
    ok("ok_exists_subquery", f"select c.region from {C} as c\n"
       f"where exists (select 1 from {ORD} as o where o.customer_id = c.customer_id)",
       ["region"]),
    ok("ok_registered_generalizer",
       "select {{ deid.generalized('email_domain', \"split_part(email, '@', 2)\") }}"
       f" as email_domain from {C}", ["email_domain"]),
    ok("ok_case_condition",
       f"select sum(case when ssn is null then 1 else 0 end) as missing_ssn from {C}",
       ["missing_ssn"]),
    ok("ok_having_filter", f"select region, count(*) as n from {C} group by region\n"
       "having count(distinct phone) > 1", ["region", "n"]),
    ok("ok_qualify_dedupe",
       f"select region, {{{{ deid.tokenize('phone', 'phone') }}}} as phone_token from {C}\n"
       "qualify row_number() over (partition by phone order by created_at) = 1",
       ["region", "phone_token"]),
    ok("ok_union_tokens",
       f"select {{{{ deid.tokenize('email', 'email') }}}} as contact_token from {C}\n"
       f"union all\nselect {{{{ deid.tokenize('phone', 'phone') }}}} from {C}",
       ["contact_token"]),
    ok("ok_count_filter",
       f"select count(*) filter (where email like '%.org') as org_accounts from {C}",
       ["org_accounts"]),
    ok("ok_not_sensitive", f"select state, region, created_at from {C}",
       ["state", "region", "created_at"]),
    # PII may live in the restricted zone, whatever the folder.
    ok("raw_customer_contacts",
       f"{{{{ config(materialized='table', schema='raw') }}}}\nselect email, ssn from {C}",
       ["email", "ssn"]),
]
# The example project's own marts are legitimate too.
MARTS = ["dim_customers", "fct_orders", "fct_prescriptions", "fct_payments"]

SNAPSHOT = """{% snapshot snap_customers %}
{{ config(unique_key='customer_id', strategy='check', check_cols='all') }}
select * from {{ source('pharmacy', 'customers') }}
{% endsnapshot %}
"""

BATTERY_SOURCES = """
sources:
  - name: battery
    schema: raw{database}
    tables:
      - name: leads
        identifier: raw_leads
        columns:
          - name: lead_id
          - name: email
            config: {meta: {pii: email}}
"""


def _yml_entry(shape: Shape, kind: str = "models") -> str:
    cols = "".join(f"      - name: {c}\n        description: the {c.replace('_', ' ')}.\n"
                   for c in shape.columns)
    # A report is a table unless its SQL says otherwise (SQL config wins over yml).
    config = "    config: {materialized: table}\n" if shape.folder == "models/reports" else ""
    return f"  - name: {shape.name}\n    description: {shape.name}.\n{config}    columns:\n{cols}"


def raw_rows(table: str, root: Path) -> list[dict[str, str]]:
    with (root / "seeds" / "raw" / f"{table}.csv").open() as fh:
        return list(csv.DictReader(fh))


def write_shapes(project: Path, root: Path) -> None:
    """Write every shape into the project copy at `project` (seed values from `root`)."""
    reports = project / "models" / "reports"
    reports.mkdir(parents=True)
    models_yml, staging_yml = ["version: 2\nmodels:\n"], ["version: 2\nmodels:\n"]
    for shape in [*LEAKS, *LEGIT]:
        if shape.sql is None:
            continue
        folder = project / shape.folder
        (folder / f"{shape.name}.sql").write_text(shape.sql + "\n")
        for name, sql in shape.extra.items():
            (folder / f"{name}.sql").write_text(sql + "\n")
        (staging_yml if "staging" in shape.folder else models_yml).append(_yml_entry(shape))
    # The second landing table lives where the example's landing data lives.
    pharmacy = yaml.safe_load((project / "models" / "staging" / "pharmacy" /
                               "_pharmacy__sources.yml").read_text())["sources"][0]
    database = (f"\n    database: {json.dumps(pharmacy['database'])}"
                if "database" in pharmacy else "")
    (reports / "_reports__models.yml").write_text(
        "".join(models_yml) + BATTERY_SOURCES.replace("{database}", database))
    (project / "models" / "staging" / "pharmacy" / "_battery__models.yml").write_text(
        "".join(staging_yml))
    (project / "snapshots").mkdir()
    (project / "snapshots" / "snap_customers.sql").write_text(SNAPSHOT)
    (project / "snapshots" / "_snapshots.yml").write_text(
        "version: 2\nsnapshots:\n" + _yml_entry(next(s for s in LEAKS if s.name ==
                                                       "snap_customers")))
    customers = raw_rows("raw_customers", root)[:5]
    extra = project / "seeds" / "extra"
    extra.mkdir()
    (extra / "contacts.csv").write_text(
        "customer_id,email\n" + "".join(f"{r['customer_id']},{r['email']}\n" for r in customers))
    (extra / "mailing_list.csv").write_text(
        "recipient\n" + "".join(f"{r['email']}\n" for r in customers))
    (extra / "_extra__seeds.yml").write_text("version: 2\nseeds:\n" + "".join(
        _yml_entry(s) for s in LEAKS if s.folder == "seeds/extra"))
    # A second landing table that declares `email` too (its values are not customers').
    (project / "seeds" / "raw" / "raw_leads.csv").write_text(
        "lead_id,email\n" + "".join(f"{i},lead{i}.prospect@leads.example.org\n"
                                    for i in range(1, 6)))
    # Registering a generalizer: one var, read by deid.generalized and by `deid check`.
    text = (project / "dbt_project.yml").read_text()
    registered = text.replace("deid_generalizers: [", "deid_generalizers: [email_domain, ", 1)
    assert registered != text
    (project / "dbt_project.yml").write_text(registered)


def all_shapes() -> list[Shape]:
    return [*LEAKS, *LEGIT]
