"""The test tiers stay honest: a module that runs dbt is marked ``e2e`` and one that starts
PostgreSQL is marked ``postgres``, so ``make test-fast`` (which deselects them) stays fast and
never silently includes a dbt run, and deselecting a tier deselects all of it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# What in a module's source means it runs dbt or PostgreSQL.
E2E_SIGNS = ("dbt_project_copy", "dbtRunner", 'with_name("dbt")', 'with_name("sqlfluff")')
POSTGRES_SIGNS = ("import pg_cluster",)


def _module_marks(path: Path) -> set[str]:
    """Marker names in the module-level ``pytestmark`` (a mark or a list of marks)."""
    tree = ast.parse(path.read_text())
    marks: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) \
                        and sub.value.attr == "mark":
                    marks.add(sub.attr)
    return marks


MODULES = sorted(p for p in HERE.glob("test_*.py") if p.name != Path(__file__).name)


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_modules_that_run_dbt_or_postgres_carry_their_marker(path: Path) -> None:
    source = path.read_text()
    marks = _module_marks(path)
    if any(sign in source for sign in E2E_SIGNS):
        assert "e2e" in marks, f"{path.name} runs dbt: add pytestmark = pytest.mark.e2e"
    if any(sign in source for sign in POSTGRES_SIGNS):
        assert "postgres" in marks, f"{path.name} starts PostgreSQL: mark it postgres"


def test_the_signs_are_found() -> None:
    """Guard against a rename that would make the check above vacuous."""
    runs_dbt = [p.name for p in MODULES if any(s in p.read_text() for s in E2E_SIGNS)]
    assert len(runs_dbt) >= 6, runs_dbt


def test_every_test_the_docs_name_exists() -> None:
    """A claim that points at `tests/…::test_name` points at a test that exists: a renamed or
    deleted test would leave the claim unproven."""
    root = Path(__file__).resolve().parents[2]
    docs = [root / "README.md", *(root / "docs").rglob("*.md")]
    named = {(path, name) for doc in docs for path, name in
             re.findall(r"(tests/python/[\w/]+\.py)::(\w+)", doc.read_text())}
    assert named
    missing = [f"{path}::{name}" for path, name in sorted(named)
               if not re.search(rf"^(async )?def {name}\(", (root / path).read_text(), re.M)]
    assert not missing, missing
