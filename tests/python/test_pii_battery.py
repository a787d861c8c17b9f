"""The PII battery: leak shapes that must fail and legitimate transformations that must pass,
measured against both checkers on ONE copy of the example project holding every shape.

- the in-dbt guard (`deid.pii_guard()` post-hook): one `dbt build`, each node's status read
  from run_results.json;

Run `pytest -q -s tests/python/test_pii_battery.py` to see the rates printed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import pytest

from dbt_project_copy import ROOT, DbtProject, copy_project
from pii_leak_shapes import LEAKS, LEGIT, MARTS, write_shapes
from test_dbt_duckdb_e2e import raw_values

pytestmark = pytest.mark.e2e


@dataclass
class Battery:
    project: DbtProject
    build_status: dict[str, str]   # node name -> dbt status (success / error / skipped)
    build_output: str


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Battery]:
    project = copy_project(tmp_path_factory.mktemp("pii_battery"))
    write_shapes(project.path, ROOT)
    # Seeds first: models reading raw tables by name have no edge to them in the graph.
    status, output = {}, ""
    for args in (["seed"], ["build", "--exclude", "resource_type:seed", "resource_type:test"]):
        out = project.dbt(*args, check=False)
        output += out.stdout + out.stderr
        results = json.loads((project.path / "target" / "run_results.json").read_text())
        status.update({r["unique_id"].split(".")[-1]: r["status"] for r in results["results"]})
    yield Battery(project, status, output)


def _rate(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.0f} %)"


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
    assert not [v for v in raw_values() if len(v) >= 6 and v in battery.build_output]
    # A refused relation is rolled back with its transaction: nothing of it remains.
    con = duckdb.connect(str(battery.project.path / "warehouse.duckdb"), read_only=True)
    try:
        present = {r[0] for r in con.sql("select table_name from information_schema.tables")
                   .fetchall()}
    finally:
        con.close()
    assert sorted(set(must) & present) == []
