"""Every node of deid's example pipeline is enabled only when deid is the root project
(docs/decisions/006): models, seeds, sources, analyses, unit tests and each data test, which
would otherwise attach to a consumer's model of the same name. Read from the yml, so a node
added without the config fails here before a consumer's build does
(test_dbt_package.py checks a consumer's graph end to end)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]

ONLY_AT_THE_ROOT = "{{ project_name == 'deid' }}"


def _documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for folder in ("models", "seeds", "analyses"):
        for path in sorted((ROOT / folder).rglob("*.yml")):
            yield path, yaml.safe_load(path.read_text()) or {}


def _enabled(entry: Any) -> Any:
    return ((entry or {}).get("config") or {}).get("enabled")


def _tests(columns: list[dict[str, Any]] | None) -> Iterator[tuple[str, Any]]:
    for column in columns or []:
        for test in column.get("data_tests") or []:
            name, body = next(iter(test.items())) if isinstance(test, dict) else (test, None)
            yield f"{column['name']}: {name}", body


def test_every_example_node_and_test_is_enabled_only_at_the_root() -> None:
    missing = []
    sql_nodes = {p.stem for folder in ("models", "analyses")
                 for p in (ROOT / folder).rglob("*.sql")}
    sql_nodes |= {p.stem for p in (ROOT / "seeds").rglob("*.csv")}
    configured = set()
    for path, doc in _documents():
        where = path.relative_to(ROOT)
        for kind in ("models", "seeds", "analyses", "unit_tests"):
            for entry in doc.get(kind) or []:
                configured.add(entry["name"])
                if _enabled(entry) != ONLY_AT_THE_ROOT:
                    missing.append(f"{where}: {kind} {entry['name']}")
                for test, body in _tests(entry.get("columns")):
                    if _enabled(body) != ONLY_AT_THE_ROOT:
                        missing.append(f"{where}: {entry['name']}.{test}")
        for source in doc.get("sources") or []:
            if _enabled(source) != ONLY_AT_THE_ROOT:
                missing.append(f"{where}: source {source['name']}")
            for table in source.get("tables") or []:
                for test, body in _tests(table.get("columns")):
                    if _enabled(body) != ONLY_AT_THE_ROOT:
                        missing.append(f"{where}: {source['name']}.{table['name']}.{test}")
    assert missing == []
    assert sql_nodes - configured == set(), "a model, analysis or seed without its yml entry"
