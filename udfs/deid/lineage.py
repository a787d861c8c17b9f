"""``deid check``: column lineage over dbt's compiled SQL, before any data moves.

Reads ``target/manifest.json`` (after ``dbt compile``): the PII that sources (and models,
seeds) declare with ``meta: {pii: <kind>}``, and every node's compiled SQL. Each output column
of each relation dbt materializes outside the restricted zone is traced to the columns it is
computed from, through CTEs, subqueries, set operations, joins, window functions, struct/list/
json builders and any other expression. A column whose lineage reaches declared PII must pass
through ``deid.tokenize`` (directly or through ``deid.token_map``) or a registered generalizer
(``deid.generalized``); otherwise the check fails, naming the node, the column and the path —
never a value (it reads no data).

What reveals no value passes: ``count``/``count(distinct …)``, and PII used only to filter,
join, group, order or partition, or in a condition (``where``, ``on``, ``having``,
``qualify``, ``case when``, a boolean predicate).

This is a developer tool: the core never imports it (tests/python/test_layers.py).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlglot
import yaml
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.scope import Scope, build_scope

# The defaults of deid.restricted_zone() and deid.generalized(); tests pin them to the macros.
DEFAULT_RESTRICTED_ZONE = ("raw",)
BUILTIN_GENERALIZERS = ("age_band", "zip3", "card_last4", "year")
# Aggregates that count values and reveal none of them.
COUNTING = (exp.Count, exp.ApproxDistinct)
MATERIALIZED = ("model", "seed", "snapshot")
DIALECTS = {"duckdb": "duckdb", "postgres": "postgres", "redshift": "redshift"}
# deid.generalized renders `/* deid.generalized:<name> */ (<sql>)`: made a call the parser sees.
_MARKER = re.compile(r"/\*\s*deid\.generalized:([a-z][a-z0-9_]*)\s*\*/\s*\(")
_MARKER_FN = "deid_generalized__"
_MAX_PATHS = 3
# Table functions that generate rows rather than read data from somewhere.
_GENERATORS = {"range", "generate_series", "unnest", "generate_subscripts"}
_FILE = re.compile(r"[./\\].*\.(csv|tsv|txt|parquet|json|ndjson|jsonl|gz|zst|xlsx)$", re.I)


@dataclass(frozen=True)
class Origin:
    """Declared PII that reaches a column, and the way it got there."""

    kind: str
    path: tuple[str, ...]   # "relation.column" steps, the declaration first

    def extend(self, step: str) -> Origin:
        return self if self.path[-1] == step else Origin(self.kind, (*self.path, step))


Taint = frozenset[Origin]
CLEAN: Taint = frozenset()


@dataclass(frozen=True)
class Finding:
    node: str                 # unique_id
    name: str                 # model / seed / snapshot name
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.name}.{self.column}" if self.column else self.name
        return f"{where}: {self.message}"


@dataclass
class Settings:
    restricted_zone: tuple[str, ...] = DEFAULT_RESTRICTED_ZONE
    generalizers: tuple[str, ...] = BUILTIN_GENERALIZERS

    @classmethod
    def from_project(cls, project_dir: Path) -> Settings:
        """The root project's vars deid_restricted_zone and deid_generalizers, as the macros
        read them (dbt_project.yml; a var given on the command line is not seen here)."""
        path = project_dir / "dbt_project.yml"
        doc = yaml.safe_load(path.read_text()) if path.is_file() else {}
        variables = (doc or {}).get("vars") or {}
        zone = variables.get("deid_restricted_zone", list(DEFAULT_RESTRICTED_ZONE))
        if isinstance(zone, str):
            zone = [zone]
        extra = variables.get("deid_generalizers") or []
        return cls(tuple(z.lower() for z in zone),
                   (*BUILTIN_GENERALIZERS, *(g.lower() for g in extra)))


def _meta(column: dict[str, Any]) -> dict[str, Any]:
    return {**(column.get("meta") or {}), **((column.get("config") or {}).get("meta") or {})}


def _relation_key(name: str | None) -> tuple[str, ...]:
    """("database", "schema", "identifier") of a relation name as dbt renders it (the
    database is left out where dbt leaves it out)."""
    if not name:
        return ()
    return tuple(p.strip().strip('"`').lower() for p in name.split("."))[-3:]


def _table_key(table: exp.Table) -> tuple[str, ...]:
    """The same for a table in a query; () when it names no schema (a CTE, or a table found
    through the search path)."""
    if not table.db:
        return ()
    parts = (table.catalog, table.db, table.name) if table.catalog else (table.db, table.name)
    return tuple(p.lower() for p in parts)


def _same_relation(table: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """A query's table names the relation `key` (a database left out matches any)."""
    return bool(table) and table[-2:] == key[-2:] and (
        len(table) < 3 or len(key) < 3 or table[0] == key[0])


@dataclass
class _Relation:
    node: dict[str, Any]
    columns: dict[str, Taint] = field(default_factory=dict)
    computed: bool = False
    label: str = ""   # as paths show it: a source's name wins over a seed's on the same table


class Checker:
    """Trace every materialized node of a manifest; ``findings`` lists what must not build."""

    def __init__(self, manifest: dict[str, Any], settings: Settings,
                 project_dir: Path | None = None) -> None:
        self.manifest = manifest
        self.settings = settings
        self.project_dir = project_dir
        adapter = manifest.get("metadata", {}).get("adapter_type", "")
        self.dialect = DIALECTS.get(adapter, adapter or None)
        self.nodes: dict[str, dict[str, Any]] = {
            uid: n for uid, n in manifest.get("nodes", {}).items()
            if n.get("resource_type") in MATERIALIZED}
        self.relations: dict[tuple[str, ...], _Relation] = {}
        self.by_name: dict[tuple[str, ...], list[tuple[str, ...]]] = {}   # (schema, name)
        # Ephemeral models are inlined as CTEs named __dbt__cte__<name>: their declarations.
        self.ephemeral: dict[str, dict[str, Taint]] = {}
        self.declared_names: dict[str, str] = {}   # column name -> kind, anywhere
        self.findings: list[Finding] = []
        for source in manifest.get("sources", {}).values():
            rel = self._relation_for(source)
            for name, col in (source.get("columns") or {}).items():
                self._declare(rel, source, name, col)
            rel.computed = True
        for node in self.nodes.values():
            if node.get("relation_name"):
                rel = self._relation_for(node)
            else:
                rel = _Relation(node, computed=True)
                self.ephemeral[f"__dbt__cte__{node['name'].lower()}"] = rel.columns
            for name, col in (node.get("columns") or {}).items():
                self._declare(rel, node, name, col)

    def _relation_for(self, node: dict[str, Any]) -> _Relation:
        key = _relation_key(node.get("relation_name"))
        if key not in self.relations:
            self.relations[key] = _Relation(node, label=_display(node))
            self.by_name.setdefault(key[-2:], []).append(key)
        elif node.get("resource_type") != "source":
            self.relations[key].node = node   # a seed and a source over one table: trace the node
        return self.relations[key]

    def _declare(self, rel: _Relation, node: dict[str, Any], name: str,
                 col: dict[str, Any]) -> None:
        kind = _meta(col).get("pii")
        if not kind:
            return
        label = f"{_display(node)}.{name.lower()}"
        origin = Origin(str(kind), (label,))
        rel.columns[name.lower()] = rel.columns.get(name.lower(), CLEAN) | {origin}
        self.declared_names.setdefault(name.lower(), str(kind))

    # -- zones ---------------------------------------------------------------------------

    def in_zone(self, node: dict[str, Any]) -> bool:
        schema = (node.get("schema") or "").lower()
        database = (node.get("database") or "").lower()
        zone = self.settings.restricted_zone
        return schema in zone or database in zone or f"{database}.{schema}" in zone

    def _table_in_zone(self, table: exp.Table) -> bool:
        zone = self.settings.restricted_zone
        db, catalog = table.db.lower(), table.catalog.lower()
        return bool(db) and (db in zone or catalog in zone or f"{catalog}.{db}" in zone)

    # -- the check -------------------------------------------------------------------------

    def run(self) -> list[Finding]:
        for uid, node in sorted(self.nodes.items()):
            if node.get("config", {}).get("materialized") == "ephemeral" or self.in_zone(node):
                continue
            if not _has_guard(node):
                self._find(node, None, "has no deid.pii_guard() post-hook; configure it once "
                           "for models, seeds and snapshots in dbt_project.yml")
            if node["resource_type"] == "seed":
                self._check_seed(node)
                continue
            outputs = self.outputs(uid)
            if outputs is None:
                continue
            for column, taint in outputs.items():
                if taint:
                    self._find(node, column, _describe(taint, f"{_display(node)}.{column}"))
        return self.findings

    def _find(self, node: dict[str, Any], column: str | None, message: str) -> None:
        self.findings.append(Finding(node["unique_id"], node["name"], column, message))

    def _check_seed(self, node: dict[str, Any]) -> None:
        """A seed has no SQL: its header against every PII name declared in the project."""
        documented = {k.lower(): _meta(v) for k, v in (node.get("columns") or {}).items()}
        for name in self._seed_header(node):
            meta = documented.get(name, {})
            treated = (meta.get("deid") or {}) if isinstance(meta.get("deid"), dict) else {}
            kind = meta.get("pii") or self.declared_names.get(name)
            if kind and not (treated.get("tokenized") or treated.get("generalized")):
                self._find(node, name, f"a seed outside the restricted zone holds a column "
                           f"declared as PII ({kind}); land it in the restricted zone")

    def _seed_header(self, node: dict[str, Any]) -> list[str]:
        names = [c.lower() for c in node.get("columns") or {}]
        root = Path(node.get("root_path") or self.project_dir or ".")
        path = root / node.get("original_file_path", "")
        if path.is_file():
            with path.open(newline="") as fh:
                names += [h.strip().lower() for h in next(csv.reader(fh), [])]
        return list(dict.fromkeys(names))

    def outputs(self, uid: str) -> dict[str, Taint] | None:
        """Each output column of a node, with the declared PII that reaches it untreated."""
        node = self.nodes[uid]
        rel = self._relation_for(node)
        if rel.computed:
            return rel.columns
        rel.computed = True   # a self-reference (incremental `this`) reads what is being checked
        sql = node.get("compiled_code")
        if node["resource_type"] == "seed":
            return rel.columns
        if node.get("language", "sql") != "sql":
            self._find(node, None, f"a {node.get('language')} model: deid check traces SQL "
                       "only (the check fails closed); build it in the restricted zone and "
                       "read it from a SQL model")
            return None
        if sql is None:
            self._find(node, None, "has no compiled SQL in the manifest; run `dbt compile` "
                       "first (the check fails closed)")
            return None
        try:
            tree = sqlglot.parse_one(_unmark(sql), read=self.dialect)
        except SqlglotError as err:
            # The parser's message quotes SQL text, which may hold literals: keep only its type.
            self._find(node, None, f"compiled SQL could not be parsed ({type(err).__name__}); "
                       "the check fails closed")
            return None
        root = build_scope(tree)
        if root is None:
            self._find(node, None, "compiled SQL is not a query the check can trace; "
                       "the check fails closed")
            return None
        if not self.in_zone(node):
            self._check_reads(node, root)
        trace = _Trace(self)
        columns = trace.scope_output(root)
        out = {name: frozenset(o.extend(f"{_display(node)}.{name}") for o in taint)
               for name, taint in columns.items()}
        for name, taint in rel.columns.items():   # declared on the node itself
            out[name] = out.get(name, CLEAN) | taint
        rel.columns = out
        return out

    def _check_reads(self, node: dict[str, Any], root: Scope) -> None:
        allowed = self._declared_relations(node["unique_id"], set())
        for scope in root.traverse():
            for table in scope.tables:
                reader = _file_reader(table)
                if reader:
                    self._find(node, None, f"reads data outside any relation ({reader}): "
                               "deid cannot know what it holds; land it in the restricted "
                               "zone and declare it as a source")
                    continue
                key = _table_key(table)
                if self._table_in_zone(table) and not any(
                        _same_relation(key, k) for k in allowed):
                    self._find(node, None, f"reads the restricted zone without source() or "
                               f"ref(): {'.'.join(key)}; declare it as a source (its PII in "
                               "meta) and select from source()")

    def _declared_relations(self, uid: str, seen: set[str]) -> set[tuple[str, ...]]:
        """Relations a node reads through source()/ref(), through ephemeral models."""
        keys: set[tuple[str, ...]] = set()
        node = self.nodes.get(uid) or self.manifest.get("sources", {}).get(uid) or {}
        for parent in (node.get("depends_on") or {}).get("nodes", []):
            if parent in seen:
                continue
            seen.add(parent)
            pnode = self.nodes.get(parent) or self.manifest.get("sources", {}).get(parent) or {}
            keys.add(_relation_key(pnode.get("relation_name")))
            if pnode.get("config", {}).get("materialized") == "ephemeral":
                keys |= self._declared_relations(parent, seen)
        return keys

    def table_columns(self, table: exp.Table) -> tuple[dict[str, Taint], str]:
        """Tainted columns of a physical relation, and its display name."""
        key = _table_key(table)
        matches = [self.relations[k] for k in self.by_name.get(key[-2:], [])
                   if _same_relation(key, k)] if key else []
        if not matches:
            return {}, ".".join(key) or table.name.lower()
        columns: dict[str, Taint] = {}
        for rel in matches:   # one, unless two databases hold schema.name and none is named
            uid = rel.node.get("unique_id", "")
            if uid in self.nodes and not rel.computed:
                self.outputs(uid)
            for name, taint in rel.columns.items():
                columns[name] = columns.get(name, CLEAN) | taint
        return columns, matches[0].label


def _file_reader(table: exp.Table) -> str | None:
    """The function or path a FROM item reads when it is not a relation (a file, a URL, a
    table function such as read_csv), else None."""
    if isinstance(table.this, exp.Func):
        fn = table.this
        name = (fn.name if isinstance(fn, exp.Anonymous) else fn.sql_name()).lower()
        return None if name in _GENERATORS else name
    if not table.db and _FILE.search(table.name):
        return "a file path"
    return None


def _has_guard(node: dict[str, Any]) -> bool:
    hooks = node.get("config", {}).get("post-hook") or []
    return any("pii_guard" in (h.get("sql", "") if isinstance(h, dict) else str(h))
               for h in hooks)


def _display(node: dict[str, Any]) -> str:
    if node.get("resource_type") == "source":
        return f"{node.get('source_name')}.{node.get('name')}"
    return str(node.get("name"))


def _unmark(sql: str) -> str:
    return _MARKER.sub(lambda m: f"{_MARKER_FN}{m.group(1)}(", sql)


def _describe(taint: Taint, column: str) -> str:
    paths = sorted(taint, key=lambda o: (len(o.path), o.path))[:_MAX_PATHS]
    kinds = ", ".join(sorted({o.kind for o in taint}))
    lines = "; ".join(" -> ".join(o.path) for o in paths)
    more = f" (+{len(taint) - len(paths)} more)" if len(taint) > len(paths) else ""
    return (f"declared PII ({kinds}) reaches it untreated: {lines}{more}; tokenize it "
            f"(deid.tokenize, deid.token_map) or generalize it (deid.generalized)")


class _Trace:
    """Column taint through the scopes of one query."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.memo: dict[int, dict[str, Taint]] = {}
        self.seen_through: dict[tuple[str, int], dict[str, Taint]] = {}
        self.resolving: set[tuple[int, str]] = set()

    def scope_output(self, scope: Scope) -> dict[str, Taint]:
        key = id(scope)
        if key not in self.memo:
            self.memo[key] = {}   # a recursive CTE reads itself: its first pass is clean
            self.memo[key] = self._output(scope)
        return self.memo[key]

    def _output(self, scope: Scope) -> dict[str, Taint]:
        if isinstance(scope.expression, exp.SetOperation):
            left, right = (self.scope_output(s) for s in scope.set_operation_scopes[:2])
            names = list(left) or list(right)   # a star over untainted columns names nothing
            if len(right) == len(left):
                return {n: left.get(n, CLEAN) | r
                        for n, r in zip(names, right.values(), strict=True)}
            everything = frozenset().union(*right.values()) if right else CLEAN
            return {n: left.get(n, CLEAN) | everything for n in names}
        select = scope.expression
        if not isinstance(select, exp.Select):
            return {}
        out: dict[str, Taint] = {}
        for projection in select.expressions:
            star = _star(projection)
            if star is not None:
                out.update(self._expand_star(scope, projection, star))
                continue
            name = projection.alias_or_name.lower()
            out[name] = out.get(name, CLEAN) | self.taint(projection, scope)
        return out

    def _expand_star(self, scope: Scope, projection: exp.Expr,
                     star: exp.Star) -> dict[str, Taint]:
        qualifier = projection.table.lower() if isinstance(projection, exp.Column) else ""
        sources: list[tuple[str, Scope | exp.Table]]
        if qualifier:
            sources = ([(qualifier, scope.sources[qualifier])]
                       if qualifier in scope.sources else [])
        else:
            sources = [(alias, pair[1]) for alias, pair in scope.selected_sources.items()]
        out: dict[str, Taint] = {}
        for alias, source in sources:
            for name, taint in self._source_columns(alias, source).items():
                out[name] = out.get(name, CLEAN) | taint
        for col in star.args.get("except_") or []:
            out.pop(col.name.lower(), None)
        for alias in star.args.get("replace") or []:
            out[alias.alias_or_name.lower()] = self.taint(alias, scope)
        return out

    def _source_columns(self, alias: str, source: Scope | exp.Table) -> dict[str, Taint]:
        """A source's tainted columns, each path extended by `alias.column`."""
        key = (alias, id(source))
        if key not in self.seen_through or not self.seen_through[key]:
            self.seen_through[key] = self._columns_through(alias, source)
        return self.seen_through[key]

    def _columns_through(self, alias: str, source: Scope | exp.Table) -> dict[str, Taint]:
        if isinstance(source, Scope):
            columns = dict(self.scope_output(source))
            for name, taint in self.checker.ephemeral.get(alias, {}).items():
                columns[name] = columns.get(name, CLEAN) | taint
            label = alias.removeprefix("__dbt__cte__")
        else:
            columns, label = self.checker.table_columns(source)
        return {name: frozenset(o.extend(f"{label}.{name}") for o in taint)
                for name, taint in columns.items()}

    def taint(self, node: exp.Expr, scope: Scope) -> Taint:
        """Declared PII that flows into the value of `node`, in `scope`."""
        if isinstance(node, exp.Column):
            return self._column(node, scope)
        if isinstance(node, (exp.Subquery, exp.Select, exp.SetOperation)):
            inner = node.this if isinstance(node, exp.Subquery) else node
            for child in scope.subquery_scopes + scope.derived_table_scopes:
                if child.expression is inner:
                    values = self.scope_output(child).values()
                    return frozenset().union(*values) if values else CLEAN
            return CLEAN
        if isinstance(node, exp.Dot) and isinstance(node.expression, exp.Anonymous) \
                and node.this.name.lower() == "deid":
            fn = node.expression.name.lower()
            if fn == "tokenize":
                return CLEAN
            if fn == "detokenize":
                return frozenset({Origin("re-identified", ("deid.detokenize",))})
        if isinstance(node, exp.Anonymous) and node.name.lower().startswith(_MARKER_FN) \
                and node.name.lower()[len(_MARKER_FN):] in self.checker.settings.generalizers:
            return CLEAN
        if isinstance(node, (*COUNTING, exp.Predicate, exp.Connector, exp.Not, exp.Exists)):
            return CLEAN   # a count, or a boolean: one bit per row, like a filter
        if isinstance(node, exp.Window):
            return self.taint(node.this, scope)   # partition/order reveal no value
        if isinstance(node, exp.Filter):
            return self.taint(node.this, scope)
        if isinstance(node, exp.Case):
            branches = [i.args.get("true") for i in node.args.get("ifs") or []]
            return self._union([*branches, node.args.get("default")], scope)
        if isinstance(node, exp.If):
            return self._union([node.args.get("true"), node.args.get("false")], scope)
        return self._union(node.iter_expressions(), scope)

    def _union(self, nodes: Iterable[exp.Expr | None], scope: Scope) -> Taint:
        out: set[Origin] = set()
        for child in nodes:
            if child is not None:
                out |= self.taint(child, scope)
        return frozenset(out)

    def _column(self, column: exp.Column, scope: Scope) -> Taint:
        name = column.name.lower()
        parts = [column.args[k].name.lower() for k in ("catalog", "db", "table")
                 if column.args.get(k) is not None]
        # t.c; or s.field / t.s.field (struct access): the first part that names a source.
        for current in _scopes_outward(scope):
            if parts and parts[-1] in current.sources and len(parts) == 1:
                return self._from_source(current, parts[-1], name)
            if len(parts) >= 2 and parts[0] in current.sources:
                return self._from_source(current, parts[0], parts[1])
        if parts:   # s.field with s a column: the struct's taint
            return self._unqualified(parts[0], scope)
        return self._unqualified(name, scope)

    def _unqualified(self, name: str, scope: Scope) -> Taint:
        for current in _scopes_outward(scope):
            found: set[Origin] = set()
            hit = False
            for alias in current.sources:
                columns = self._lookup(current, alias)
                if name in columns:
                    hit = True
                    found |= columns[name]
            if hit:
                return frozenset(found)
            # a lateral alias (duckdb lets a select item reuse an earlier one's alias)
            select = current.expression
            if isinstance(select, exp.Select) and (id(current), name) not in self.resolving:
                for projection in select.expressions:
                    if projection.alias.lower() == name and not _star(projection):
                        self.resolving.add((id(current), name))
                        try:
                            return self.taint(projection.this, current)
                        finally:
                            self.resolving.discard((id(current), name))
            # columns of an unnest or a table function in FROM: whatever their arguments carry
            guard = (id(current), "\0udtf")
            if current.udtfs and guard not in self.resolving:
                self.resolving.add(guard)
                try:
                    return self._union(current.udtfs, current)
                finally:
                    self.resolving.discard(guard)
        return CLEAN

    def _lookup(self, scope: Scope, alias: str) -> dict[str, Taint]:
        source = scope.sources[alias]
        return self._source_columns(alias, source)

    def _from_source(self, scope: Scope, alias: str, name: str) -> Taint:
        columns = self._lookup(scope, alias)
        return columns.get(name, CLEAN)


def _scopes_outward(scope: Scope) -> Iterator[Scope]:
    """The scope, then (for a subquery, which may be correlated) the scopes around it. A CTE or
    a derived table sees only its own sources: a column they lack there is untainted."""
    current: Scope | None = scope
    while current is not None:
        yield current
        current = current.parent if current.is_subquery else None


def _star(projection: exp.Expr) -> exp.Star | None:
    if isinstance(projection, exp.Star):
        return projection
    if isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star):
        return projection.this
    return None


def check(manifest_path: Path, project_dir: Path) -> list[Finding]:
    """Findings for the manifest at `manifest_path` of the dbt project at `project_dir`."""
    manifest = json.loads(manifest_path.read_text())
    return Checker(manifest, Settings.from_project(project_dir), project_dir).run()
