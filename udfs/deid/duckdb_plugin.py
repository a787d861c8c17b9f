"""The DuckDB host: a dbt-duckdb plugin that registers deid's UDFs on every connection.

Profile (``profiles.yml``)::

    plugins:
      - module: deid.duckdb_plugin
        config:
          vault: sqlite:///.deid/vault.db   # or env DEID_VAULT; relative to the dbt project
          principal: dbt_transformer        # who tokenize/detokenize run as (the vault's
                                            # policies check it)
          cache_size: 1000000               # tokenize cache entries (bounds memory)

SQL sees ``deid.tokenize(value, kind)`` and ``deid.detokenize(token)``: two macros in an
in-memory catalog named ``deid`` (attached per connection, so nothing is written into the
warehouse file) over vectorized Arrow UDFs. DuckDB has no roles: the principal comes from the
profile, and the real protection is who can read the vault and its key file. The vault's
tokenize and detokenize policies are checked against that principal once per vector (and the
tokenize rights cached for a few seconds), so the checks stop a misconfigured profile, not a
person who can edit the profile or read the key file.

A relative SQLite vault path is resolved against the dbt project directory (dbt's own
``--project-dir`` / ``DBT_PROJECT_DIR`` / the directory holding dbt_project.yml), never the
working directory; a missing vault fails the first query that needs it (``deid init``
creates vaults, a build never does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from duckdb import func
from duckdb.sqltypes import UBIGINT, VARCHAR

from .errors import DeidError, InvalidKindError
from .service import TokenService, VaultTokenService
from .vault import VaultConfig, anchored, open_service

try:  # the plugin base class exists only where dbt-duckdb is installed
    from dbt.adapters.duckdb.plugins import BasePlugin
    from dbt.flags import get_flags
except ImportError:  # pragma: no cover - deid can register UDFs without dbt
    BasePlugin = object  # type: ignore[assignment,misc]

    def get_flags() -> Any:
        return None

_CATALOG = "deid"


def register(conn: duckdb.DuckDBPyConnection,
             service: TokenService | Callable[[], TokenService], principal: str, *,
             threads: int = 1, detokenize_threads: int | None = None) -> None:
    """Register deid.tokenize / deid.detokenize on `conn` (idempotent per connection).

    `service` may be a factory: the vault is then opened by the first call that needs it, so
    connecting (dbt parse, compile, lint) never touches the vault, and an unavailable vault
    fails the query that needed it. Tokenize calls run on a process-wide pool of `threads`
    Python threads, detokenize calls on one of `detokenize_threads` (default: `threads`);
    see `udf_threads`.
    """
    pool = _worker_pool(threads)
    detokenize_pool = _worker_pool(detokenize_threads or threads)
    if isinstance(service, TokenService):
        ready = service

        def factory() -> TokenService:
            return ready
    else:
        factory = service

    def tokenize(values: pa.Array | pa.ChunkedArray, kinds: pa.Array | pa.ChunkedArray) -> pa.Array:
        return _guarded(pool, "tokenize", _tokenize, values, kinds)

    def _tokenize(values: pa.Array | pa.ChunkedArray,
                  kinds: pa.Array | pa.ChunkedArray) -> pa.Array:
        distinct = pc.unique(kinds).to_pylist()
        if len(distinct) == 1 and distinct[0] is not None:
            return pa.array(factory().tokenize(distinct[0], values.to_pylist(),
                                               principal=principal, host="duckdb"),
                            type=pa.string())
        # Several kinds in one vector (kind taken from a column): one call per kind.
        vals, ks = values.to_pylist(), kinds.to_pylist()
        out: list[str | None] = [None] * len(vals)
        for kind in distinct:
            if kind is None:
                if any(v is not None for v, k in zip(vals, ks, strict=True) if k is None):
                    raise InvalidKindError("deid.tokenize: the kind argument is NULL")
                continue
            rows = [i for i, k in enumerate(ks) if k == kind]
            tokens = factory().tokenize(kind, [vals[i] for i in rows], principal=principal,
                                        host="duckdb")
            for i, t in zip(rows, tokens, strict=True):
                out[i] = t
        return pa.array(out, type=pa.string())

    # DuckDB numbers transactions per database instance; the tag and pid make the query id
    # unique in the audit log across connections and processes.
    tag = f"{os.getpid()}:{secrets.token_hex(4)}"

    def detokenize(tokens: pa.Array | pa.ChunkedArray,
                   txids: pa.Array | pa.ChunkedArray) -> pa.Array:
        return _guarded(detokenize_pool, "detokenize", _detokenize, tokens, txids)

    def _detokenize(tokens: pa.Array | pa.ChunkedArray,
                    txids: pa.Array | pa.ChunkedArray) -> pa.Array:
        # One transaction id per query: the vault audits every vector under it, and makes
        # the query's first record durable before any of its values leave (see SQLiteStore).
        txid = txids[0].as_py() if len(txids) else None
        query_id = f"duckdb:{tag}:{txid}"
        service = factory()
        if not isinstance(service, VaultTokenService):
            return pa.array(service.detokenize(tokens.to_pylist(), principal=principal,
                                               query_id=query_id, host="duckdb"),
                            type=pa.string())
        # Rows to distinct tokens and back in Arrow's C code: Python sees each distinct
        # token once, and a vector without repeats skips the counting.
        encoded = pc.dictionary_encode(tokens.combine_chunks()
                                       if isinstance(tokens, pa.ChunkedArray) else tokens)
        distinct = encoded.dictionary
        if len(distinct) == len(encoded) - encoded.null_count:
            counts: list[int] = [1] * len(distinct)
        else:
            # value_counts lists indices in an order of its own: sort them back.
            tally = pc.value_counts(pc.drop_null(encoded.indices))
            counts = pc.take(tally.field("counts"),
                             pc.sort_indices(tally.field("values"))).to_pylist()

        def first_row(bad: list[str]) -> int:
            hit = pc.is_in(tokens, value_set=pa.array(bad, type=pa.string()))
            return int(pc.index(hit, True).as_py()) + 1

        values = service.detokenize_counted(distinct.to_pylist(), counts, principal=principal,
                                            first_row=first_row, query_id=query_id,
                                            host="duckdb")
        return pc.take(pa.array(values, type=pa.string()), encoded.indices)

    _create(conn, "__deid_tokenize", tokenize, [VARCHAR, VARCHAR], side_effects=False)
    # Detokenize audits every call: never constant-folded or deduplicated away.
    _create(conn, "__deid_detokenize", detokenize, [VARCHAR, UBIGINT], side_effects=True)
    conn.execute(f"attach if not exists ':memory:' as {_CATALOG}")
    conn.execute(f"create or replace macro {_CATALOG}.tokenize(value, kind) as "
                 "__deid_tokenize(value, kind)")
    conn.execute(f"create or replace macro {_CATALOG}.detokenize(token) as "
                 "__deid_detokenize(token, txid_current())")


# DuckDB calls a UDF on its own worker threads as well as on the thread that runs the query,
# and Python gives a thread it did not start a new thread state for every call: state kept
# per thread (a vault store's connection, its note of the query's first audit record) would
# be rebuilt for every vector, a new SQLite connection and a synced audit record each time.
# Every call runs on a pool of Python threads instead, whose state lasts.
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools_after_fork() -> None:
    """A forked child has none of the parent's threads: a pool inherited from it would queue
    calls that nothing runs."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _worker_pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(max_workers=threads,
                                                        thread_name_prefix="deid-udf")
        return pool


def udf_threads(vault_url: str, action: str = "tokenize") -> int:
    """How many Python threads run a UDF's calls (`action`: tokenize or detokenize) for a
    vault. A vault over the network overlaps its round trips: one thread per core. For a
    SQLite vault Python runs one thread at a time, but a tokenize call spends a third of its
    time in SQLite's lookups and commit, which release the interpreter: a second thread runs
    its Python meanwhile (a rebuild of the benchmark mart: 10 % faster with two). Detokenize
    keeps one: a second thread stepping through SQLite rows waited for the interpreter
    behind a busy first at every row (25 % slower with two)."""
    cores = os.cpu_count() or 2
    if not vault_url.startswith("sqlite:"):
        return cores
    return min(2, cores) if action == "tokenize" else 1


def _guarded(pool: ThreadPoolExecutor, action: str, body: Callable[..., pa.Array],
             *args: Any) -> pa.Array:
    """Run `body` on `pool`. DuckDB puts a UDF's exception text in the query's error, which
    reaches dbt's log: a deid error is value-free by contract, any other may quote data, so
    it is reported by class only (as the Lambda and plpython3u hosts do)."""
    try:
        return pool.submit(body, *args).result()
    except DeidError:
        raise
    except Exception as exc:
        raise DeidError(f"deid.{action}: internal error ({type(exc).__name__}); the value "
                        "is not shown") from None


def _create(conn: duckdb.DuckDBPyConnection, name: str, fn: Any, params: list[Any], *,
            side_effects: bool) -> None:
    with contextlib.suppress(duckdb.InvalidInputException, duckdb.CatalogException):
        conn.remove_function(name)
    conn.create_function(name, fn, params, VARCHAR, type=func.ARROW,
                         null_handling=func.SPECIAL, side_effects=side_effects)


def restrict_new_files() -> None:
    """Files this process creates from now on are readable by their owner only.

    dbt-duckdb initializes plugins before it opens the warehouse: the warehouse and the raw
    database files and their write-ahead logs are created 0600, and so is what dbt writes
    later (compiled SQL, run_results.json, which can quote a value in an engine's error
    message). dbt opens logs/dbt.log and writes target/manifest.json before any plugin loads:
    those follow the umask of the shell that runs dbt. DuckDB rewrites an existing file in
    place, so a mode set on it later (0640 for an analysts' group) stays.
    """
    current = os.umask(0o077)
    os.umask(current | 0o077)


class Plugin(BasePlugin):
    """dbt-duckdb calls `initialize` once with the plugin config, then `configure_connection`."""

    def initialize(self, plugin_config: dict[str, Any]) -> None:
        restrict_new_files()
        self.config = VaultConfig.from_env(plugin_config)
        self.project_dir = _dbt_project_dir()
        self.principal = str(plugin_config.get("principal") or os.environ.get("DEID_PRINCIPAL")
                             or getpass.getuser())
        self._service: TokenService | None = None
        self._lock = threading.Lock()

    def service(self) -> TokenService:
        with self._lock:
            if self._service is None:
                url = anchored(self.config.url, self.project_dir)
                self._service = open_service(dataclasses.replace(self.config, url=url))
            return self._service

    def configure_connection(self, conn: duckdb.DuckDBPyConnection) -> None:
        register(conn, self.service, self.principal, threads=udf_threads(self.config.url),
                 detokenize_threads=udf_threads(self.config.url, "detokenize"))


def _dbt_project_dir() -> Path | None:
    """The directory dbt runs the project from (its flags know it, whatever the working
    directory), else DBT_PROJECT_DIR; None outside dbt."""
    flags = get_flags()
    found = getattr(flags, "PROJECT_DIR", None) or os.environ.get("DBT_PROJECT_DIR")
    return Path(found).resolve() if found else None
