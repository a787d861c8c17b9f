"""The PII battery: leak shapes that must fail and legitimate transformations that must pass,
measured against both checkers on ONE copy of the example project holding every shape.

- the lineage checker (`deid check`): one `dbt compile`, then the checker over
  target/manifest.json (no data read);
- the in-dbt guard (`deid.pii_guard()` post-hook): one `dbt build`, each node's status read
  from run_results.json.

Run `pytest -q -s tests/python/test_pii_battery.py` to see the rates printed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from dbt_project_copy import ROOT, DbtProject, copy_project
from deid.lineage import Finding, Settings, check
from pii_leak_shapes import LEAKS, LEGIT, MARTS, write_shapes
from test_dbt_duckdb_e2e import raw_values

pytestmark = pytest.mark.e2e


@dataclass
class Battery:
    project: DbtProject
    build_status: dict[str, str]   # node name -> dbt status (success / error / skipped)
    build_output: str
    findings: list[Finding]        # deid check over the compiled manifest


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Battery]:
    project = copy_project(tmp_path_factory.mktemp("pii_battery"))
    write_shapes(project.path, ROOT)
    project.deid("init", "--transformer", "dbt_transformer")  # as the README's setup says
    # Seeds first: models reading raw tables by name have no edge to them in the graph.
    status, output, findings = {}, "", []
    for args in (["seed"], ["compile"],
                 ["build", "--exclude", "resource_type:seed", "resource_type:test"]):
        out = project.dbt(*args, check=args != ["seed"] and args[0] != "build")
        if args == ["compile"]:
            findings = check(project.path / "target" / "manifest.json", project.path)
            continue
        output += out.stdout + out.stderr
        results = json.loads((project.path / "target" / "run_results.json").read_text())
        status.update({r["unique_id"].split(".")[-1]: r["status"] for r in results["results"]})
    yield Battery(project, status, output, findings)


def _rate(hits: int, total: int) -> str:
    return f"{hits} of {total} ({100 * hits / total:.0f} %)"


def _measure(battery: Battery) -> dict[str, tuple[set[str], set[str]]]:
    """Per checker: the leak shapes it caught and the legitimate shapes it refused."""
    leaks = {s.name for s in LEAKS}
    legit = {s.name for s in LEGIT} | set(MARTS)
    refused_by_dbt = {n for n, status in battery.build_status.items() if status != "success"}
    flagged = {f.name for f in battery.findings}
    both = refused_by_dbt | flagged
    return {name: (leaks & refused, legit & refused) for name, refused in
            (("lineage", flagged), ("guard", refused_by_dbt), ("both", both))}


def test_in_dbt_guard_stops_the_shapes_it_can_see_and_builds_the_legitimate_ones(
        battery: Battery) -> None:
    leaks = [s.name for s in LEAKS]
    legit = [s.name for s in LEGIT] + MARTS
    missing = [n for n in leaks + legit if n not in battery.build_status]
    assert not missing, missing
    caught = [n for n in leaks if battery.build_status[n] != "success"]
    false_positives = [n for n in legit if battery.build_status[n] != "success"]
    print(f"\nin-dbt guard: caught {_rate(len(caught), len(leaks))} leak shapes, "
          f"false positives {_rate(len(false_positives), len(legit))}; "
          f"missed: {sorted(set(leaks) - set(caught))}")
    assert not false_positives
    must = [s.name for s in LEAKS if s.guard_sees]
    assert [n for n in must if n not in caught] == []
    # ... refused by the guard itself, naming the relation (not by some other error)
    assert [n for n in must if f"deid.pii_guard: model {n} " not in battery.build_output] == []
    assert not [v for v in raw_values() if len(v) >= 6 and v in battery.build_output]
    # A refused relation is rolled back with its transaction: nothing of it remains.
    con = duckdb.connect(str(battery.project.path / "warehouse.duckdb"), read_only=True)
    try:
        present = {r[0] for r in con.sql("select table_name from information_schema.tables")
                   .fetchall()}
    finally:
        con.close()
    assert sorted(set(must) & present) == []


def test_lineage_checker_catches_every_leak_shape_it_can_see_and_passes_the_legitimate_ones(
        battery: Battery) -> None:
    leaks = [s.name for s in LEAKS]
    legit = [s.name for s in LEGIT] + MARTS
    flagged = {f.name for f in battery.findings}
    caught = [n for n in leaks if n in flagged]
    false_positives = [n for n in legit if n in flagged]
    print(f"\nlineage checker: caught {_rate(len(caught), len(leaks))} leak shapes, "
          f"false positives {_rate(len(false_positives), len(legit))}; "
          f"missed: {sorted(set(leaks) - set(caught))}")
    assert [str(f) for f in battery.findings if f.name in false_positives] == []
    assert sorted(set(leaks) - set(caught)) == sorted(s.name for s in LEAKS if s.lineage_blind)
    # Each leak is reported on the column that exposes it (or, for a read behind dbt's back,
    # on the model), with the path from the declaration.
    for shape in LEAKS:
        if shape.lineage_blind:
            continue
        mine = [f for f in battery.findings if f.name == shape.name]
        assert any(f.column == shape.exposed or f.column is None for f in mine), (shape, mine)
    raw = {v for v in raw_values() if len(v) >= 6}
    assert not [f for f in battery.findings if any(v in str(f) for v in raw)]


def test_lineage_finding_names_model_column_and_path(battery: Battery) -> None:
    [finding] = [f for f in battery.findings if f.name == "leak_cte_chain"]
    assert finding.column == "contact"
    assert "untreated: pharmacy.customers.email -> " in finding.message
    assert "stg_pharmacy__customers.email -> a.e -> b.x -> leak_cte_chain.contact;" \
        in finding.message
    [second] = [f for f in battery.findings if f.name == "leak_second_source_email"]
    assert second.column == "contact" and "pharmacy.customers.email" in second.message
    reads = [f for f in battery.findings if f.name == "leak_raw_direct" and f.column is None]
    assert reads and "raw.raw_customers" in reads[0].message


def test_deid_check_cli_fails_the_documented_build_on_a_leak(battery: Battery) -> None:
    deid = str(Path(sys.executable).with_name("deid"))
    out = subprocess.run([deid, "check", "--project-dir", str(battery.project.path)],
                         capture_output=True, text=True, env=battery.project.env, timeout=120)
    assert out.returncode == 1
    assert "leak_upper_email.contact: declared PII (email)" in out.stderr


def test_checker_defaults_match_the_macros() -> None:
    """The zone and the built-in generalizers live in the macros (a package's vars never reach
    a caller) and in the checker: one list each."""
    zone = (ROOT / "macros" / "restricted_zone.sql").read_text()
    assert f"var('deid_restricted_zone', {list(Settings().restricted_zone)})" in zone
    generalized = (ROOT / "macros" / "generalized.sql").read_text()
    assert f"{list(Settings().generalizers)} + var('deid_generalizers', [])" in generalized


def test_the_readme_states_the_measured_rates(battery: Battery) -> None:
    """The README's guard section quotes these numbers. The in-dbt guard's row is a floor (the
    value scan may catch more); the lineage checker's and the documented build's are exact."""
    readme = (ROOT / "README.md").read_text()
    rates = _measure(battery)
    leaks, legit = len(LEAKS), len(LEGIT) + len(MARTS)
    for name, label in (("lineage", "`deid check` (column lineage)"),
                        ("both", "both (the documented build)")):
        caught, refused = rates[name]
        row = f"| {label} | {_rate(len(caught), leaks)} | {_rate(len(refused), legit)} |"
        print(f"\n{row}")
        assert row in readme
    caught, refused = rates["guard"]
    print(f"\n| in-dbt guard | {_rate(len(caught), leaks)} | {_rate(len(refused), legit)} |")
    stated = re.search(r"\| `deid.pii_guard\(\)` alone \(plain `dbt build`\) \| (\d+) of (\d+) "
                       r"\(\d+ %\) \| (\d+) of (\d+)", readme)
    assert stated, "the README states the in-dbt guard's rates"
    assert (int(stated[2]), int(stated[4])) == (leaks, legit)
    assert len(caught) >= int(stated[1]) and len(refused) <= int(stated[3])
    assert rates["both"] == ({s.name for s in LEAKS}, set())
