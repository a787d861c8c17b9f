"""README "Add deid to your project", followed literally in a fresh consumer project.

The snippets are extracted from README.md: each ```yaml / ```sql block whose first line names
a file (``# packages.yml``, ``-- models/dim_customers.sql``) is written there (the
``dbt_project.yml`` one merged into the consumer's own), and the ```sh blocks run as written
(the ``pip install`` line is checked against pyproject.toml instead: this environment already
has deid installed). The consumer brings its own seed and names that collide with deid's
example (``raw_customers``, ``dim_customers``): none of the example may enter its graph.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
import yaml

from dbt_project_copy import ROOT, copy_project
from deid.vault import open_store

pytestmark = pytest.mark.e2e

SECTION = ("## Add deid to your project", "### Settings")
BASH = shutil.which("bash") or "/bin/bash"
CUSTOMERS = [
    {"customer_id": i, "full_name": f"Customer {i}", "email": f"Shopper.{i}@Example.com",
     "date_of_birth": f"{1950 + i}-0{1 + i % 9}-1{i % 10}",
     "zip": "03601" if i % 10 == 0 else f"{10001 + i * 37:05d}"}
    for i in range(1, 41)
]


def readme_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION[0]):text.index(SECTION[1])]
    return [(m.group(1), m.group(2)) for m in
            re.finditer(r"^```(\w+)\n(.*?)^```", section, flags=re.M | re.S)]


def named_files() -> dict[str, str]:
    files = {}
    for lang, body in readme_blocks():
        first = body.splitlines()[0]
        m = re.fullmatch(r"(?:#|--) ([\w./]+\.(?:yml|sql))", first)
        if lang in ("yaml", "sql") and m:
            files[m.group(1)] = body
    return files


def shell_blocks() -> list[str]:
    return [body for lang, body in readme_blocks() if lang == "sh"]


@dataclass
class Consumer:
    path: Path
    env: dict[str, str]
    setup_output: str

    def run(self, command: str, *, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([BASH, "-euo", "pipefail", "-c", command], cwd=cwd or self.path,
                              env=self.env, text=True, capture_output=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"{command}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def vault_counts(self) -> tuple[int, int]:
        store = open_store(f"sqlite:///{self.path / '.deid' / 'vault.db'}")
        try:
            stats = store.stats()
            return sum(stats["tokens"].values()), stats["audit_records"]
        finally:
            store.close()

    def detokenized(self) -> int:
        store = open_store(f"sqlite:///{self.path / '.deid' / 'vault.db'}")
        try:
            return sum(r.get("count", 0) for r in store.audit_records()
                       if r["action"] == "detokenize")
        finally:
            store.close()

    def query(self, sql: str) -> list[tuple[object, ...]]:
        con = duckdb.connect(str(self.path / "warehouse.duckdb"), read_only=True)
        try:
            return con.sql(sql).fetchall()
        finally:
            con.close()


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> Consumer:
    work = tmp_path_factory.mktemp("consumer")
    # the package, where the README's `local: ../deid` finds it
    copy_project(work / "deid")
    shop = work / "shop"
    (shop / "seeds").mkdir(parents=True)
    project = {"name": "shop", "version": "1.0.0", "config-version": 2, "profile": "shop"}
    for path, body in named_files().items():
        if path == "dbt_project.yml":
            for key, value in yaml.safe_load(body).items():
                project[key] = {**project.get(key, {}), **value}
            continue
        (shop / path).parent.mkdir(parents=True, exist_ok=True)
        (shop / path).write_text(body)
    (shop / "dbt_project.yml").write_text(yaml.safe_dump(project, sort_keys=False))
    # Raw data lands in the restricted zone the way an EL tool would put it there.
    con = duckdb.connect(str(shop / "warehouse.duckdb"))
    con.execute("create schema raw")
    con.execute("create table raw.raw_customers (customer_id integer, full_name varchar, "
                "email varchar, date_of_birth date, zip varchar)")
    con.executemany("insert into raw.raw_customers values (?, ?, ?, ?, ?)",
                    [list(c.values()) for c in CUSTOMERS])
    con.close()
    # The consumer's own seed, named like one of deid's example seeds.
    (shop / "seeds" / "raw_stores.csv").write_text("store_id,region\n1,North\n2,South\n")
    (shop / "seeds" / "_seeds.yml").write_text(
        "version: 2\nseeds:\n  - name: raw_stores\n    description: Store regions.\n"
        "    columns:\n      - {name: store_id, description: Store number.}\n"
        "      - {name: region, description: Sales region.}\n")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DEID_", "DBT_"))}
    env.update({"DBT_PROFILES_DIR": str(shop), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    pip, setup, *_ = shell_blocks()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in re.findall(r"\[(\w+)\]", pip):
        assert extra in extras, f"README installs deid[{extra}], which pyproject.toml lacks"
    out = Consumer(shop, env, "").run(setup)
    return Consumer(shop, env, out.stdout + out.stderr)


def test_the_readme_extras_pin_only_dbt_core(consumer: Consumer) -> None:
    """Engine extras bound dbt-core to deid's require-dbt-version range and leave the
    adapter's upper bound to the user's install."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    project = yaml.safe_load((ROOT / "dbt_project.yml").read_text())
    assert project["require-dbt-version"] == [">=1.11.0", "<1.12.0"]
    for engine in ("duckdb", "postgres", "redshift"):
        assert "dbt-core>=1.11,<1.12" in extras[engine], engine
        adapters = [r for r in extras[engine] if r.startswith("dbt-") and "core" not in r]
        assert adapters and all("<" not in r for r in adapters), adapters


def test_none_of_the_example_enters_the_consumer(consumer: Consumer) -> None:
    listed = consumer.run("dbt ls --resource-type all --output json "
                          "--output-keys unique_id package_name resource_type tags").stdout
    nodes = [json.loads(line) for line in listed.splitlines() if line.startswith("{")]
    assert nodes
    from_deid = [n["unique_id"] for n in nodes
                 if n["package_name"] == "deid" and n["resource_type"] != "operation"]
    assert from_deid == []  # only deid's on-run-start hook (the UDF wiring) is an operation
    # no test on a disabled source, no collision (the README's snapshots path is unused here)
    warnings = [line for line in consumer.setup_output.splitlines() if "WARNING" in line]
    assert all("Configuration paths exist" in line for line in warnings), warnings
    assert "depends on" not in consumer.setup_output and "- deid" not in consumer.setup_output
    tables = consumer.query("select table_schema, table_name from information_schema.tables "
                            "order by all")
    assert tables == [("main", "dim_customers"), ("main", "raw_stores"),
                      ("raw", "raw_customers")]
    results = json.loads((consumer.path / "target" / "run_results.json").read_text())
    assert not [r["unique_id"] for r in results["results"]
                if ".deid." in r["unique_id"] and not r["unique_id"].startswith("operation.")]
    # deid's generic tests carry the tag `deid` in the consumer's graph
    tagged = sorted(n["unique_id"].split(".")[2] for n in nodes if "deid" in n.get("tags", []))
    assert [t.split("_dim_")[0] for t in tagged] == ["deid_shares_no_values_with",
                                                     "deid_tokens_of_kind"]


def test_marts_hold_tokens_and_the_safe_harbor_zip3_default_travels(
        consumer: Consumer) -> None:
    rows = consumer.query("select email_token, zip3 from main.dim_customers")
    assert len(rows) == len(CUSTOMERS)
    assert all(str(t).endswith("@deid.invalid") for t, _ in rows)
    zips = {z for _, z in rows}
    assert "000" in zips and "036" not in zips  # 03601: a restricted prefix, no var set


def test_granted_detokenize_shows_only_what_is_shown_and_default_is_refused(
        consumer: Consumer) -> None:
    """The README's shape (limit, then detokenize) decrypts and audits only the rows shown;
    detokenize beside an ORDER BY decrypts every row that reaches the sort."""
    _, _, granted, refused = shell_blocks()
    before = consumer.detokenized()
    shown = consumer.run(granted).stdout
    assert len(re.findall(r"\| str_\w+\.* \| shopper\.\d+@exampl", shown)) == 5, shown
    assert consumer.detokenized() - before == 5
    before = consumer.detokenized()
    consumer.run("dbt show --target pii_reader --log-level-file none --limit 5 --inline \""
                 "select {{ deid.detokenize('email_token') }} as email "
                 "from {{ ref('dim_customers') }} order by customer_key\"")
    assert consumer.detokenized() - before == len(CUSTOMERS)
    denied = consumer.run(refused, check=False)
    assert denied.returncode != 0
    assert ("permission denied: principal 'dbt_transformer'"
            in denied.stdout + denied.stderr)
    logs = "".join(p.read_text(errors="replace")
                   for p in (consumer.path / "logs").rglob("*") if p.is_file())
    assert not re.findall(r"shopper\.\d+@example\.com", logs)


def test_unit_tests_add_nothing_to_the_vault(consumer: Consumer) -> None:
    before = consumer.vault_counts()
    out = consumer.run("dbt test --select test_type:unit")
    assert "1 unit test" in out.stdout and "ERROR=0" in out.stdout
    assert consumer.vault_counts() == before


def test_dbt_from_another_directory_uses_the_same_vault(consumer: Consumer,
                                                        tmp_path: Path) -> None:
    before = consumer.vault_counts()
    tokens = {t for (t,) in consumer.query("select email_token from main.dim_customers")}
    email = CUSTOMERS[0]["email"]
    shown = consumer.run(f"dbt show --project-dir {consumer.path} --output json --inline "
                         f"\"select {{{{ deid.tokenize(\\\"'{email}'\\\", 'email') }}}} as t\"",
                         cwd=tmp_path).stdout
    token = json.loads(shown[shown.index("{"):])["show"][0]["t"]
    assert token in tokens  # the token the build minted: one vault, one token space
    assert not (tmp_path / ".deid").exists()
    assert consumer.vault_counts()[0] == before[0]


def test_an_unquoted_column_gets_the_fix_at_compile_time(consumer: Consumer) -> None:
    model = consumer.path / "models" / "unquoted.sql"
    model.write_text("select {{ deid.tokenize(email, 'email') }} as t "
                     "from {{ source('crm', 'customers') }}")
    try:
        out = consumer.run("dbt compile --select unquoted", check=False)
    finally:
        model.unlink()
    assert out.returncode != 0
    assert "deid.tokenize('email', 'email'), not deid.tokenize(email, 'email')" in out.stdout
