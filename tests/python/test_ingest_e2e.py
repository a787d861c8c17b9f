"""One token space: a value tokenized at ingest (file tool, change-stream handler) and by a
dbt model gets the same token; and `make demo-ingest`'s replay runs against a built mart."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

import ingest_events as ev
from conftest import open_service_at
from dbt_project_copy import ROOT, DbtProject, copy_project
from deid.ingest import columns as cols
from deid.ingest.stream import ChangeStreamHandler
from ingest_events import Collect

pytestmark = pytest.mark.e2e

# raw column -> dim_customers column holding its token
TOKENIZED = {"customer_id": "customer_key", "full_name": "full_name_token",
             "email": "email_token", "phone": "phone_token", "ssn": "ssn_token",
             "street_address": "street_address_token"}
SEED = ROOT / "seeds" / "raw" / "raw_customers.csv"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbtProject]:
    project = copy_project(tmp_path_factory.mktemp("ingest_e2e"))
    # The builder and the ingest function each need a tokenize grant (deny by default).
    project.deid("init", "--transformer", "dbt_transformer")
    project.deid("grant", "--tokenize", "deid-ingest")
    project.dbt("seed", "--select", "raw_customers")
    project.dbt("run", "--select", "dim_customers")
    yield project


def mart(project: DbtProject) -> dict[str, dict[str, str | None]]:
    """dim_customers rows by customer key."""
    con = duckdb.connect(str(project.path / "warehouse.duckdb"), read_only=True)
    try:
        rel = con.sql(f"select {', '.join(TOKENIZED.values())} from main.dim_customers")
        names = rel.columns
        return {r[0]: dict(zip(names, r, strict=True)) for r in rel.fetchall()}
    finally:
        con.close()


def seed_rows() -> list[dict[str, str]]:
    with SEED.open() as fh:
        return list(csv.DictReader(fh))


def assert_same_tokens(rows: list[dict[str, str | None]], by_key: dict[str, dict[str, str | None]]
                       ) -> None:
    for row in rows:
        built_row = by_key[row["customer_id"]]  # the customer key itself must match
        for raw, token_col in TOKENIZED.items():
            assert row[raw] == built_row[token_col], (raw, token_col)


def test_file_tool_and_dbt_give_one_token_per_value(built: DbtProject) -> None:
    out = built.path / "customers_tokenized.csv"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("deid")), "tokenize-file", "--quiet", str(SEED),
         str(out), "--map", "target/manifest.json", "--source", "pharmacy.customers"],
        cwd=built.path, env=built.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with out.open() as fh:
        rows = [{k: (v or None) for k, v in r.items()} for r in csv.DictReader(fh)]
    assert len(rows) == len(seed_rows()) == len(mart(built))
    assert_same_tokens(rows, mart(built))
    text = out.read_text()
    raw = {r[c] for r in seed_rows() for c in TOKENIZED if c != "customer_id" and len(r[c]) > 5}
    assert not [v for v in raw if v in text]


def test_stream_handler_and_dbt_give_one_token_per_value(built: DbtProject) -> None:
    columns = cols.source_columns(built.path / "target" / "manifest.json", "pharmacy.customers")
    assert columns.columns["customer_id"] == "string:customer"  # pii_domain, as the mart uses

    sink = Collect()
    service = open_service_at(built.path / ".deid" / "vault.db")
    rows = seed_rows()[:200]
    # DynamoDB carries the numeric key as N: it must tokenize as dbt's cast(id as varchar).
    # An empty seed field is NULL in the warehouse, so it is NULL in the stream too.
    typed = [{**{k: v or None for k, v in r.items()}, "customer_id": int(r["customer_id"])}
             for r in rows]
    out = ChangeStreamHandler(service, columns, sink).dynamodb(
        ev.dynamodb([("INSERT", r, None) for r in typed]))
    assert out == {"batchItemFailures": []}
    assert len(sink.records) == len(rows)
    assert_same_tokens(sink.records, mart(built))


def test_demo_ingest_replay(built: DbtProject, tmp_path: Path) -> None:
    """The replay `make demo-ingest` runs after dbt: joins, the updated token, the refusal.
    On a copy of the built project: its erasure must not change the other tests' vault."""
    shutil.copytree(built.path, tmp_path / "demo")
    demo = DbtProject(tmp_path / "demo", {
        **built.env, "DBT_PROFILES_DIR": str(tmp_path / "demo"),
        "DEID_WAREHOUSE": str(tmp_path / "demo" / "warehouse.duckdb"),
        "DEID_VAULT": f"sqlite:///{(tmp_path / 'demo' / '.deid' / 'vault.db').resolve()}"})
    demo.deid("grant", "pii_reader")
    demo.deid("grant", "--tokenize", "ingest-demo")  # as scripts/demo_ingest.sh does
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_ingest.py"),
                           str(demo.path)], env=demo.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.count('-> {"batchItemFailures": []}') == 2
    assert "karen_johnson1@example.com" in out  # customer 1, re-identified by pii_reader
    assert out.count("ErasedTokenError") == 2  # customer 3, in the stream and in the mart
    # `deid erased` finds customer 3's row in the mart: every identifier erased, not the key.
    found = out.split("5/5")[1]
    assert found.count("│ true ") == 5 and found.count("│ false ") == 1
    con = duckdb.connect(str(demo.path / "warehouse.duckdb"), read_only=True)
    try:
        landed = con.sql("select * from ingest.customer_changes").fetchall()
        ops = [r[0] for r in con.sql("select _op from ingest.customer_changes "
                                     "order by cast(_seq as hugeint)").fetchall()]
        joined = con.sql("""select count(*) from ingest.customers c join main.dim_customers d
                            on c.customer_id = d.customer_key and c.email = d.email_token
                            """).fetchall()
    finally:
        con.close()
    assert ops == ["INSERT"] * 4 + ["MODIFY", "REMOVE"]
    assert joined == [(1,)]  # customer 1; customer 2's email changed, 2001 is new, 3 is gone
    stream_text = (ROOT / "scripts" / "demo_ingest" / "customers_stream.json").read_text()
    raw = {"karen_johnson1@example.com", "913-16-5146", "lisa.cunningham@example.net",
           "ingrid.nakamura2001@example.com", "Benjamin Romero"}
    assert all(v in stream_text for v in raw)
    assert not [v for v in raw if v in str(landed)]
