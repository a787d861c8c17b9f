"""The models' yml keeps its promises: every column declared tokenized (``meta.deid.tokenized``)
carries a format test of that kind, so a mart column that stops holding tokens fails the build."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from deid import kinds

ROOT = Path(__file__).resolve().parents[2]


def _columns() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path in sorted((ROOT / "models").rglob("*.yml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for model in doc.get("models") or []:
            for column in model.get("columns") or []:
                yield path.name, f"{model['name']}.{column['name']}", column


def _tokenized_kind(column: dict[str, Any]) -> str | None:
    for meta in (column.get("meta") or {}, (column.get("config") or {}).get("meta") or {}):
        kind = (meta.get("deid") or {}).get("tokenized")
        if kind:
            return str(kind)
    return None


def _format_test_kinds(column: dict[str, Any]) -> list[str]:
    found = []
    for test in column.get("data_tests") or column.get("tests") or []:
        if isinstance(test, dict) and "deid.tokens_of_kind" in test:
            spec = test["deid.tokens_of_kind"] or {}
            found.append(str((spec.get("arguments") or spec).get("kind")))
    return found


def test_the_models_declare_tokenized_columns() -> None:
    declared = [name for _, name, column in _columns() if _tokenized_kind(column)]
    assert len(declared) >= 11, declared  # the check below is not vacuous


def test_every_tokenized_column_has_a_format_test_of_its_kind() -> None:
    missing = []
    for file, name, column in _columns():
        kind = _tokenized_kind(column)
        if kind is None:
            continue
        assert kinds.parse_kind(kind).name == kind.split(":")[0], f"{name}: unknown kind {kind}"
        if _format_test_kinds(column) != [kind.split(":")[0]]:
            missing.append(f"{file}: {name} (tokenized: {kind})")
    assert not missing, "add `deid.tokens_of_kind: {arguments: {kind: …}}` to: " + ", ".join(
        missing)
