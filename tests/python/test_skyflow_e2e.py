"""End to end: `dbt build` (seeds, models, tests) on DuckDB with DEID_VAULT=skyflow://…
pointed at the local Skyflow-shaped server; a granted principal re-identifies, the default
one is refused, and a second run adds no record to the vault (upsert)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import pytest

from dbt_project_copy import ROOT, copy_project
from deid import kinds as _kinds
from deid.stores.sqlite import SQLiteStore
from fake_skyflow import DEFAULT_SCHEMA, FakeSkyflow

pytestmark = pytest.mark.e2e

# The project's domains get columns of their own (a separate domain must not link).
SCHEMA = {
    **DEFAULT_SCHEMA,
    "deid_strings": {"value": "string_group", "customer_id": "customer_group",
                     "npi": "npi_group"},
    "prescribers": {"name": "prescriber_group"},
}
MAPPING = {
    "string:customer": "deid_strings.customer_id",
    "string:npi": "deid_strings.npi",
    "name:prescriber": "prescribers.name",
}
# The package's token-format tests check deid's own token shapes; Skyflow's are UUIDs.


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One build for the module, so every test (in any order, or alone) sees its results."""
    work = tmp_path_factory.mktemp("skyflow_e2e")
    fake = FakeSkyflow(schema=SCHEMA).start()
    creds = fake.write_credentials(work / "credentials.json")
    (work / "mapping.json").write_text(json.dumps(MAPPING))
    policy_db = work / "policy" / "policy.db"
    SQLiteStore(policy_db, create=True).grant("pii_reader", granted_by="test")
    SQLiteStore(policy_db).grant_tokenize("dbt_transformer", "*", "tokenize", "test")
    url = fake.vault_url(credentials=str(creds), mapping=str(work / "mapping.json"),
                         policy=f"sqlite:///{policy_db}", batch_size="100", concurrency="4",
                         backoff="0.1")
    project = copy_project(work / "project", DEID_VAULT=url)
    try:
        # Seeds first: the sources read the seeded raw tables, and dbt build would run the
        # source tests in parallel with the seeds (it cannot know a source is a seed).
        project.dbt("seed")
        project.dbt("build", "--exclude", "resource_type:seed", "--vars",
                    "{deid_external_tokens: true}")
        yield {"fake": fake, "project": project, "policy_db": policy_db}
    finally:
        fake.stop()


def raw(name: str) -> list[dict[str, str]]:
    with (ROOT / "seeds" / "raw" / f"{name}.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_dbt_build_stores_skyflow_tokens_and_reidentifies_through_skyflow(env):
    fake, project = env["fake"], env["project"]
    customers = raw("raw_customers")
    emails = {_kinds.normalize(_kinds.KINDS["email"], r["email"])[0]
              for r in customers if r["email"]}
    assert sorted(fake.values("persons", "email")) == sorted(emails), "one record per value"
    ids = fake.values("deid_strings", "customer_id")
    assert sorted(ids) == sorted(r["customer_id"] for r in customers)

    with duckdb.connect(project.env["DEID_WAREHOUSE"], read_only=True) as con:
        marts = {r[0] for r in con.execute(
            "select table_name from information_schema.tables "
            "where table_schema not in ('raw', 'main_raw')").fetchall()}
        dim = next(t for t in marts if t == "dim_customers")
        rows = con.execute(f"select customer_key, email_token from {dim}").fetchall()
    # Every mart token is the token Skyflow holds for the customer's value (join intact).
    skyflow_tokens = {fake.token_for("deid_strings", "customer_id", r["customer_id"])
                      for r in customers}
    assert {k for k, _ in rows} == skyflow_tokens
    email_tokens = {fake.token_for("persons", "email", e) for e in emails}
    assert {t for _, t in rows if t is not None} == email_tokens
    assert not ({e for e in emails} & {t for _, t in rows}), "no clear email in the mart"

    # Re-running the build (new process, no local cache) adds no record to the vault.
    counts = {t: fake.record_count(t) for t in SCHEMA}
    project.dbt("run", "--full-refresh")
    assert {t: fake.record_count(t) for t in SCHEMA} == counts

    # A principal in the policy re-identifies through Skyflow, with its name in the ctx claim.
    shown = project.dbt("show", "--select", "reidentify_emails_by_age_and_zip3", "--target",
                        "pii_reader", "--output", "json", "--limit", "20", "--quiet",
                        "--log-level-file", "none")
    out = json.loads(shown.stdout[shown.stdout.index("{"):])["show"]
    assert out, "the analysis returns rows"
    by_token = {fake.token_for("persons", "email", e): e for e in emails}
    for row in out:
        assert row["email"] == by_token[row["email_token"]]
    assert {e.ctx["user"] for e in fake.requests("detokenize")} == {"pii_reader"}

    # The default principal is refused by deid's policy before Skyflow is asked.
    before = len(fake.requests("detokenize"))
    denied = project.dbt("show", "--select", "reidentify_emails_by_age_and_zip3",
                         "--quiet", check=False)
    assert denied.returncode != 0
    assert "PermissionDeniedError" in denied.stdout + denied.stderr
    assert len(fake.requests("detokenize")) == before
    leaked = denied.stdout + denied.stderr
    assert not any(e in leaked for e in list(emails)[:200])

    audit = list(SQLiteStore(env["policy_db"]).audit_records())
    assert {(a["principal"], a["outcome"]) for a in audit} >= {
        ("pii_reader", "allowed"), ("dbt_transformer", "denied")}


def test_target_dir_and_logs_hold_no_credentials_or_values(env):
    project = env["project"]
    sa = next(iter(env["fake"].accounts.values()))
    key_line = sa.private_pem.splitlines()[1]
    emails = [r["email"] for r in raw("raw_customers")[:200] if r["email"]]
    scanned = [p for p in [*Path(project.path, "target").rglob("*"),
                           *Path(project.path, "logs").rglob("*")]
               if p.is_file() and p.suffix in (".json", ".sql", ".log", ".txt")]
    # The build's manifest, compiled models and log must be there, or this proves nothing.
    names = {p.name for p in scanned}
    assert {"manifest.json", "run_results.json", "dbt.log", "dim_customers.sql"} <= names
    for path in scanned:
        text = path.read_text(errors="replace")
        assert key_line not in text, f"private key material in {path.name}"
        assert "accessToken" not in text and "Bearer ey" not in text
        assert not any(e in text for e in emails), f"a raw email in {path.name}"
