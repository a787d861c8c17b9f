"""Find raw sensitive values in files dbt wrote (logs/, target/) without printing them.

An engine's error message can quote a value (DuckDB: ``Could not convert string
'913-16-5146' to INT32``); dbt writes that message to the console, ``logs/dbt.log`` and
``target/run_results.json``. deid cannot change the engine's message, so this scan reports
which files hold what, by kind or raw column and count, never the value, for a build or CI
step to fail on and to clean up after.

Two detectors:

* shapes (any engine; opt-in, since a unit test's made-up fixture rows have these shapes
  too): email addresses, formatted US phone numbers, SSNs, and 13-19 digit numbers passing
  the Luhn check (card numbers). deid's own tokens are never reported: email tokens end in
  ``@deid.invalid``, SSN tokens use the never-issued areas 950-999 (group 00-49), card
  tokens fail Luhn, phone tokens start ``+999`` (a number after ``+`` is never a card).
* values (DuckDB): every value of length 6 or more of every column declared
  ``meta: {pii: <kind>}`` on a source in ``target/manifest.json`` (dates, timestamps and
  numbers excepted), read from the raw database file, searched byte for byte.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from .kinds import luhn_valid

_EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@([A-Za-z0-9-]+\.)+[A-Za-z]{2,}")
_SSN = re.compile(rb"(?<![0-9A-Za-z-])([0-9]{3})-([0-9]{2})-[0-9]{4}(?![0-9A-Za-z-])")
_PHONE = re.compile(rb"(?<![0-9A-Za-z])(\([0-9]{3}\) ?|[0-9]{3}[-.])[0-9]{3}[-.][0-9]{4}"
                    rb"(?![0-9A-Za-z])")
_CARD = re.compile(rb"(?<![0-9A-Za-z.+-])(?:[0-9]{13,19}|[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{4}"
                   rb"|[0-9]{4}([ -])[0-9]{6}\2[0-9]{5})(?![0-9A-Za-z.-])")
_MIN_VALUE_LENGTH = 6  # shorter values (ids, codes) recur by chance in any log


def _is_ssn_token(area: bytes, group: bytes) -> bool:
    return 950 <= int(area) <= 999 and int(group) <= 49


def shapes(data: bytes) -> Counter[str]:
    """Counts of sensitive-looking strings in `data`, by kind; tokens excluded."""
    found: Counter[str] = Counter()
    found["email"] += sum(1 for m in _EMAIL.finditer(data)
                          if not m.group(0).lower().endswith(b"@deid.invalid"))
    found["ssn"] += sum(1 for m in _SSN.finditer(data)
                        if not _is_ssn_token(m.group(1), m.group(2)))
    found["phone"] += sum(1 for _ in _PHONE.finditer(data))
    found["card"] += sum(1 for m in _CARD.finditer(data)
                         if luhn_valid(re.sub(rb"[^0-9]", b"", m.group(0)).decode()))
    return +found


# Dates, timestamps and numbers recur by chance: in any log, and inside a database file's
# packed strings (a run of SSN tokens holds date-shaped substrings).
_CHANCE_KINDS = {"date", "timestamp", "number"}


def declared_columns(manifest: Path) -> list[tuple[str, str, str]]:
    """(schema, table, column) of every source column declared `meta: {pii: …}`, except
    the kinds whose values recur by chance."""
    nodes = json.loads(manifest.read_text())["sources"].values()
    out = []
    for node in nodes:
        for name, col in node.get("columns", {}).items():
            meta = {**(col.get("meta") or {}), **((col.get("config") or {}).get("meta") or {})}
            if meta.get("pii") and meta["pii"] not in _CHANCE_KINDS:
                out.append((node["schema"], node["identifier"], name))
    return out


def raw_values(raw_db: Path, columns: Iterable[tuple[str, str, str]]) -> dict[bytes, str]:
    """Each distinct raw value (as bytes) -> the first `table.column` that holds it."""
    import duckdb  # the DuckDB extra: only this detector needs it

    values: dict[bytes, str] = {}
    con = duckdb.connect(str(raw_db), read_only=True)
    try:
        # the file's own catalog (a schema may carry the same name, e.g. raw.raw)
        catalog = con.execute("select current_database()").fetchall()[0][0]
        for schema, table, column in columns:
            rows = con.execute(
                f'select distinct cast("{column}" as varchar) '
                f'from "{catalog}"."{schema}"."{table}" '
                f'where length(cast("{column}" as varchar)) >= {_MIN_VALUE_LENGTH}').fetchall()
            for (value,) in rows:
                values.setdefault(value.encode(), f"{table}.{column}")
    finally:
        con.close()
    return values


def files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path


def scan(paths: Iterable[Path], values: dict[bytes, str] | None = None, *,
         by_shape: bool = False) -> dict[Path, Counter[str]]:
    """Per file: counts by kind (shapes) and by raw column (values). Files with none omitted."""
    report: dict[Path, Counter[str]] = {}
    for path in files(paths):
        data = path.read_bytes()
        found = shapes(data) if by_shape else Counter()
        for value, column in (values or {}).items():
            if value in data:
                found[f"value of {column}"] += 1
        if found:
            report[path] = found
    return report
