"""The package's layers point one way: the core never imports a host, a store or a tool.

Hosts (DuckDB plugin, Lambda handler, plpython3u host, CLI) adapt the token service to an
engine; stores and Skyflow are vault backends. The core (kinds, keys, the token service, the
cache, errors) must stay importable without either, so a new engine or a new vault never
touches it. Read from the source with `ast`, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "udfs" / "deid"

CORE = ["errors.py", "kinds.py", "keys.py", "service.py", "_cache.py", "_url.py", "_audit.py",
        "_policy.py"]
HOSTS = ["duckdb_plugin", "lambda_handler", "plpython_host", "cli", "ingest"]
# Developer tools inside the package: `deid check` (column lineage; needs sqlglot).
TOOLS = ["lineage"]
BACKENDS = ["stores.sqlite", "stores.postgres", "stores.dynamodb", "skyflow"]


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports, relative imports resolved against `deid`."""
    module = "deid." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    return _imports_of(path.read_text(), package)


def _imports_of(source: str, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _hits(imports: set[str], forbidden: list[str]) -> list[str]:
    return sorted(i for i in imports for f in forbidden
                  if i == f"deid.{f}" or i.startswith(f"deid.{f}."))


@pytest.mark.parametrize("name", CORE)
def test_core_imports_no_host_store_or_tool(name: str) -> None:
    imports = _imports(PACKAGE / name)
    assert _hits(imports, [*HOSTS, *BACKENDS, *TOOLS, "vault"]) == []
    assert not any(i == "sqlglot" or i.startswith("sqlglot.") for i in imports)
    assert not any(i.startswith("deid_synth") for i in imports)


@pytest.mark.parametrize("path", sorted((PACKAGE / "stores").glob("*.py")), ids=lambda p: p.name)
def test_stores_import_no_host_and_no_other_backend(path: Path) -> None:
    imports = _imports(path)
    others = [b for b in BACKENDS if b != f"stores.{path.stem}"]
    assert _hits(imports, [*HOSTS, *others, *TOOLS, "vault"]) == []


def test_runtime_package_does_not_ship_synthetic_data() -> None:
    """Synthetic data is a developer tool: the Lambda bundle (udfs/) must not carry it."""
    assert not list(PACKAGE.rglob("synth*.py"))
    for path in PACKAGE.rglob("*.py"):
        assert not any(i.startswith("deid_synth") for i in _imports(path)
                       if path.name != "cli.py"), path


def test_the_checker_sees_a_lazy_import() -> None:
    """The walk covers function bodies, so an import hidden in a function is still seen."""
    source = "def f():\n    from ..stores import sqlite\n"
    assert "deid.stores.sqlite" in _imports_of(source, "deid.skyflow")
    assert _hits(_imports_of(source, "deid.skyflow"), BACKENDS) == ["deid.stores.sqlite"]


@pytest.mark.parametrize("path", [*(PACKAGE / n for n in CORE),
                                  *sorted((PACKAGE / "stores").glob("*.py"))],
                         ids=lambda p: p.name)
def test_core_and_stores_read_no_configuration_from_the_environment(path: Path) -> None:
    """Configuration is read once at a host's edge (VaultConfig, the plpython3u host) and
    passed in; the core and the stores take explicit arguments. (A DynamoDB URL without a
    region falls back to AWS_REGION, as boto3 itself would.)"""
    text = path.read_text()
    allowed = {"dynamodb.py": {'os.environ.get("AWS_REGION")',
                               'os.environ.get("AWS_DEFAULT_REGION")'}}.get(path.name, set())
    for use in ("os.environ", "os.getenv"):
        for i in [i for i in range(len(text)) if text.startswith(use, i)]:
            assert any(text.startswith(a, i) for a in allowed), (
                f"{path.name} reads the environment: read it in the host and pass it in")


def test_the_lineage_tool_imports_no_host_store_or_vault() -> None:
    """`deid check` reads a manifest: it needs neither a vault nor an engine host."""
    imports = _imports(PACKAGE / "lineage.py")
    assert _hits(imports, [*HOSTS, *BACKENDS, "vault", "service", "keys"]) == []
