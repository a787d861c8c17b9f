"""Facts that dbt's SQL and deid's Python both need are written twice (dbt cannot import
Python): these tests fail the moment the two copies disagree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from deid import kinds
from deid.stores import postgres as postgres_store

ROOT = Path(__file__).resolve().parents[2]
MACROS = ROOT / "macros"


def _macro(path: str) -> str:
    return (MACROS / path).read_text()


def test_kind_list_in_kind_spec_is_the_python_kind_list() -> None:
    m = re.search(r"set kinds = (\[[^\]]*\])", _macro("kind_spec.sql"))
    assert m, "kind_spec.sql no longer sets its kind list"
    assert ast.literal_eval(m.group(1)) == list(kinds.KINDS)


def test_domain_rule_in_kind_spec_is_the_python_rule() -> None:
    patterns = re.findall(r"modules\.re\.fullmatch\('([^']*)'", _macro("kind_spec.sql"))
    assert patterns == [kinds._DOMAIN.pattern]


def test_vault_schema_rule_in_the_postgres_install_is_the_store_rule() -> None:
    patterns = re.findall(r"modules\.re\.fullmatch\('([^']*)'",
                          _macro("postgres/postgres__create_udfs.sql"))
    assert patterns == [postgres_store._IDENT.pattern]


def _create_tables(sql: str) -> list[str]:
    """The `create table` statements, whitespace-normalized, in order."""
    statements = re.findall(r"create table if not exists .*?\n\);", sql, flags=re.S)
    return [" ".join(s.split()) for s in statements]


def test_postgres_vault_ddl_in_dbt_is_the_store_ddl() -> None:
    """macros/postgres/postgres_create_vault.sql and stores/postgres.py vault_ddl create the
    same tables (the end-to-end test also runs both against a server)."""
    macro = _macro("postgres/postgres_create_vault.sql").replace("{{ schema }}", "v_check")
    python = _create_tables(postgres_store.vault_ddl("v_check"))
    assert python, "vault_ddl creates no table?"
    assert _create_tables(macro) == python
    # Every table is handed to the vault role and closed to PUBLIC.
    tables = re.findall(r"create table if not exists v_check\.(\w+)", macro)
    m = re.search(r"for table in (\[[^\]]*\])", macro)
    assert m and ast.literal_eval(m.group(1)) == tables


def test_luhn_has_one_implementation() -> None:
    """kinds.luhn_valid and kinds.luhn_check_digit are the only Luhn code (the synthetic data
    generator and its tests use them)."""
    for path in [*(ROOT / "udfs").rglob("*.py"), *(ROOT / "tools").rglob("*.py"),
                 *(ROOT / "tests").rglob("*.py")]:
        if path.name == "kinds.py":
            continue
        assert not re.search(r"def _?luhn", path.read_text()), f"{path} has its own Luhn"
    assert kinds.luhn_valid("4111111111111111")
    assert kinds.luhn_check_digit("411111111111111") == "1"
    assert kinds.luhn_check_digit("808401234567893"[:-1]) == "3"


_ADAPTERS = ("default", "duckdb", "postgres", "redshift")


@pytest.mark.parametrize("path", sorted(MACROS.rglob("*.sql")), ids=lambda p: p.name)
def test_adapter_prefixed_macros_are_dispatch_bodies(path: Path) -> None:
    """`postgres__x` reads as the PostgreSQL body of a dispatched macro `x`: a helper named
    like that, with no `adapter.dispatch('x', 'deid')`, misleads. Helpers use one underscore."""
    dispatched = set(re.findall(r"adapter\.dispatch\('(\w+)', 'deid'\)",
                                "".join(p.read_text() for p in MACROS.rglob("*.sql"))))
    for adapter, name in re.findall(r"\{%-?\s*macro\s+(\w+?)__(\w+)\s*\(", path.read_text()):
        assert adapter in _ADAPTERS and name in dispatched, (
            f"{adapter}__{name} in {path.name} is not the body of a dispatched macro; "
            f"rename it {adapter}_{name}")
