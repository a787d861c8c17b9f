"""Which columns of a source are sensitive, and as which kind: declared once.

A dbt project declares PII on its source columns (``meta: {pii: email}``); the PII guard
reads the same declarations. Ingest reads them from the compiled ``target/manifest.json`` so
a value tokenized before landing and the same value tokenized by a dbt model share a token.
A column's token domain, when it is not the kind's default, is ``meta: {pii_domain: customer}``
— what the model passes as ``deid.tokenize(column, 'string', domain='customer')``.

Sources outside dbt use a small YAML (or JSON) file of the same shape::

    sources:
      crm.contacts:
        columns:
          contact_id: string:customer   # a kind spec, as deid.tokenize takes it
          email: email
          city: null                    # declared, not sensitive: passed through
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import kinds as _kinds
from ..errors import ConfigError


@dataclass(frozen=True)
class SourceColumns:
    """One source's declared columns: name -> kind spec (``None``: declared, passed through).

    ``strict``: a column not declared at all fails its row, since a column nobody looked at
    may hold PII. Only an explicit choice (``--allow-undeclared``) lets it through.
    """

    source: str
    columns: dict[str, str | None]
    strict: bool = True

    @property
    def sensitive(self) -> dict[str, str]:
        return {c: k for c, k in self.columns.items() if k is not None}


def _spec(kind: Any, domain: Any, where: str) -> str:
    spec = f"{kind}:{domain}" if domain else str(kind)
    try:
        _kinds.parse_kind(spec)
    except Exception:
        raise ConfigError(f"deid ingest: {where} declares an unknown kind or bad domain "
                          f"{spec[:80]!r}") from None
    return spec


def _column_meta(col: dict[str, Any]) -> dict[str, Any]:
    # dbt keeps a column's meta under `meta` or `config.meta` depending on how it was written.
    meta = dict(col.get("meta") or {})
    meta.update((col.get("config") or {}).get("meta") or {})
    return meta


def from_manifest(doc: dict[str, Any]) -> dict[str, SourceColumns]:
    """Every dbt source table, keyed ``source_name.table`` (and by its identifier)."""
    out: dict[str, SourceColumns] = {}
    for node in (doc.get("sources") or {}).values():
        name = f"{node['source_name']}.{node['name']}"
        columns: dict[str, str | None] = {}
        for col_name, col in (node.get("columns") or {}).items():
            meta = _column_meta(col)
            pii = meta.get("pii")
            columns[col_name.lower()] = (_spec(pii, meta.get("pii_domain"),
                                               f"source {name}, column {col_name},")
                                         if pii else None)
        out[name] = SourceColumns(name, columns)
        identifier = node.get("identifier")
        if identifier and identifier != node["name"]:
            out.setdefault(f"{node['source_name']}.{identifier}", out[name])
    return out


def from_mapping(doc: dict[str, Any]) -> dict[str, SourceColumns]:
    out = {}
    for name, body in (doc.get("sources") or {}).items():
        cols = (body or {}).get("columns") or {}
        out[name] = SourceColumns(name, {
            c.lower(): (_spec(k, None, f"source {name}, column {c},") if k else None)
            for c, k in cols.items()})
    return out


def load(path: str | Path) -> dict[str, SourceColumns]:
    """Read a dbt ``manifest.json``, or a YAML/JSON map of sources outside dbt."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"deid ingest: cannot read the column map {p} ({exc.strerror}); "
                          "run `dbt parse` to write target/manifest.json") from None
    if p.suffix in (".yml", ".yaml"):
        import yaml  # only maps outside dbt need it

        doc = yaml.safe_load(text) or {}
    else:
        doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ConfigError(f"deid ingest: the column map {p} is not a mapping")
    return from_manifest(doc) if "nodes" in doc and "sources" in doc else from_mapping(doc)


def source_columns(path: str | Path, source: str) -> SourceColumns:
    sources = load(path)
    if source not in sources:
        known = ", ".join(sorted(sources)[:20]) or "none"
        raise ConfigError(f"deid ingest: the column map {path} declares no source {source!r} "
                          f"(known: {known})")
    return sources[source]
