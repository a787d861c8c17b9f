"""Tokenize rows (dicts) of one source: what the change-stream handlers share.

Each sensitive column is tokenized in one service call per batch (one vault round trip per
column). A row that cannot be tokenized — a value invalid for its kind, a nested value where
text is declared, a column nobody declared — becomes a `RowError` naming the row, column,
kind and reason, never the value; the other rows still get their tokens. Anything else (the
vault is down, a key is missing) raises: the whole batch fails and is delivered again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidValueError
from ..service import TokenService
from .columns import SourceColumns

RECORD = "(record)"  # a RowError about the whole record (it could not be decoded)


@dataclass(frozen=True)
class RowError:
    """Why row `index` (0-based in the batch) was not tokenized. Holds no value."""

    index: int
    column: str
    kind: str | None
    reason: str

    def describe(self) -> str:
        if self.column == RECORD:
            return f"the record {self.reason}"
        kind = f", kind {self.kind!r}" if self.kind else ""
        return f"column {self.column!r}{kind}: {self.reason}"


def as_text(value: Any) -> str | None:
    """A scalar as text, spelled the way a warehouse's ``cast(x as varchar)`` spells it,
    so a value tokenized here and by a dbt model gets one token."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    raise TypeError(type(value).__name__)


def tokenize_rows(service: TokenService, columns: SourceColumns,
                  rows: Sequence[dict[str, Any]], *, principal: str | None = None,
                  host: str | None = None) -> tuple[list[dict[str, Any]], list[RowError]]:
    """(rows with tokens in place of sensitive values, errors). A failed row's output is
    its input with every sensitive column removed; callers must not emit it. `principal`
    is checked against the vault's tokenize policy (and named in its audit)."""
    errors: dict[int, RowError] = {}
    sensitive = columns.sensitive
    for i, row in enumerate(rows):
        seen: set[str] = set()
        for name in row:
            lower = name.lower()
            if lower in seen:
                # Two spellings of one column: only one could be tokenized, so fail instead.
                errors.setdefault(i, RowError(i, name[:64], None, "appears twice (names that "
                                              "differ only in case)"))
            seen.add(lower)
            if lower not in columns.columns and columns.strict:
                errors.setdefault(i, RowError(i, name[:64], None,
                                              "is not declared in the column map (declare it, "
                                              "with a kind if it is sensitive)"))
    out = [{k: v for k, v in row.items() if k.lower() not in sensitive} for row in rows]
    by_lower = [{k.lower(): k for k in row} for row in rows]
    for column, kind in sensitive.items():
        texts: list[str | None] = []
        for i, row in enumerate(rows):
            key = by_lower[i].get(column)
            value = None if key is None else row[key]
            try:
                texts.append(as_text(value))
            except TypeError:
                texts.append(None)
                errors.setdefault(i, RowError(i, column, kind, "is not a scalar value"))
        live = [i for i, t in enumerate(texts) if t is not None and i not in errors]
        while live:
            try:
                tokens = service.tokenize(kind, [texts[i] for i in live], column=column,
                                          principal=principal, host=host)
            except InvalidValueError as exc:
                if exc.row is None:
                    raise
                bad = live[exc.row - 1]
                errors.setdefault(bad, RowError(bad, column, kind, exc.reason))
                live = [i for i in live if i != bad]
                continue
            for i, token in zip(live, tokens, strict=True):
                out[i][by_lower[i][column]] = token
            break
        for i in range(len(rows)):  # a NULL stays NULL, under the row's own spelling
            key = by_lower[i].get(column)
            if key is not None and texts[i] is None and i not in errors:
                out[i][key] = None
    return out, sorted(errors.values(), key=lambda e: e.index)
