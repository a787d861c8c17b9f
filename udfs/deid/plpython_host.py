"""The PostgreSQL host: what the plpython3u bodies of ``deid.tokenize`` and ``deid.detokenize``
call (macros/postgres/postgres__create_udfs.sql creates them).

Both functions are SECURITY DEFINER, owned by the vault role, with a pinned ``search_path``:
inside them ``current_user`` is the vault role, which alone may read the vault schema, so the
principal the vault policy checks is ``session_user`` (the login that ran the query).

Caches live for one scope: (transaction, statement, subtransaction). The vault writes of a
statement belong to its transaction; a token cached past a rollback (of the statement, of a
savepoint, of a PL/pgSQL exception block) would be handed out again with no vault record
behind it. So a call in a new scope starts from a fresh token service and reads the keys
again. The scope is read from the backend itself (see `_backend_clock`).

Errors: deid's messages (kind, reason, what to do; never a value or a token) with a SQLSTATE;
anything else is reported by class name only, since a Python exception text may quote data.
"""

from __future__ import annotations

import os
from typing import Any

from ._policy import Gate
from .errors import (
    DeidError,
    InvalidKindError,
    InvalidValueError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultKeyError,
    VaultUnavailableError,
)
from .service import VaultTokenService
from .stores.postgres import DEFAULT_SCHEMA, SpiStore

# Bounded per statement: a statement over many distinct values never holds more than this.
CACHE_SIZE = 100_000

_SQLSTATE = {
    PermissionDeniedError: "42501",   # insufficient_privilege
    InvalidKindError: "22023",        # invalid_parameter_value
    InvalidValueError: "22023",
    UnknownTokenError: "22023",
    VaultKeyError: "58000",           # system_error
    VaultUnavailableError: "58000",
}

_hosts: dict[str, _Host] = {}  # per backend (one Python interpreter per session)


def _backend_clock() -> Any:
    """The backend's own (transaction start, statement start, subtransaction id), read
    through ctypes from the postgres executable's exported functions (about a microsecond,
    against tens for a SPI query). None where they cannot be found."""
    try:
        import ctypes

        lib = ctypes.CDLL(None)
        xact, stmt = lib.GetCurrentTransactionStartTimestamp, lib.GetCurrentStatementStartTimestamp
        subxact = lib.GetCurrentSubTransactionId
    except (OSError, AttributeError):
        return None
    xact.restype = stmt.restype = ctypes.c_int64
    subxact.restype = ctypes.c_uint32
    xact.argtypes = stmt.argtypes = subxact.argtypes = []
    return lambda: (xact(), stmt(), subxact())


class _Host:
    """Per backend and vault schema: the store, and a token service valid for one scope.

    The scope is (transaction, statement, subtransaction). Vault writes made in a scope can
    roll back when it ends, so a token cached in it must not be handed out in another: a
    client savepoint rolled back between statements, a PL/pgSQL exception block rolled back
    within one, or a procedure's ROLLBACK between its transactions. Subtransaction ids are
    never reused within a transaction, so a rolled-back scope never comes back.
    """

    def __init__(self, plpy: Any, schema: str) -> None:
        self.plpy = plpy
        # The server's environment is this host's configuration (read once per backend).
        self.store = SpiStore(plpy, schema, keys=os.environ.get("DEID_KEYS") or None)
        self._clock = _backend_clock()
        # Without the backend clock: the statement's timestamps by SPI (no subtransactions).
        self._scope_plan = plpy.prepare(
            "select now()::text as xact, statement_timestamp()::text as statement")
        self._context_plan = plpy.prepare(
            "select session_user::text as principal, pg_backend_pid() as pid, "
            "statement_timestamp()::text as statement")
        self._scope: Any = None
        self._service: VaultTokenService | None = None
        self._context: dict[str, Any] | None = None
        self._logged: str | None = None
        self._tokenize_logged: set[tuple[str, str]] = set()

    def _current_scope(self) -> Any:
        if self._clock is not None:
            return self._clock()
        row = self.plpy.execute(self._scope_plan)[0]
        return (row["xact"], row["statement"])

    def service(self) -> VaultTokenService:
        scope = self._current_scope()
        if scope != self._scope or self._service is None:
            if self._service is not None:
                self._log_tokenize_counts(self._service.gate)
            self._service = self._context = None
            self._tokenize_logged.clear()
            self.store.start_scope()
            # Policy read once per scope; tokenize counts go to the server log (below), since
            # a vault record would roll back with the caller.
            gate = Gate(self.store, ttl_s=float("inf"), flush_s=float("inf"), at_exit=False)
            self._service = VaultTokenService(self.store, cache_size=CACHE_SIZE,
                                              detokenize_cache_size=CACHE_SIZE, gate=gate)
            self._scope = scope
        return self._service

    def context(self) -> dict[str, Any]:
        """session_user and the statement, read once per scope (SET SESSION AUTHORIZATION
        is a statement of its own, so the scope changes with it)."""
        if self._context is None:
            self._context = dict(self.plpy.execute(self._context_plan)[0])
        return self._context

    def log_detokenize(self, ctx: dict[str, Any]) -> None:
        """One server-log line per statement that detokenizes. The vault's audit records
        commit with the caller's transaction, so a client that rolls back erases them; the
        server log keeps who detokenized, when, in which statement (never a value)."""
        key = f"{ctx['pid']}@{ctx['statement']}"
        if key != self._logged:
            self._logged = key
            self.plpy.log(f"deid audit: detokenize by principal {ctx['principal']!r} in "
                          f"statement {key}")


    def log_tokenize(self, ctx: dict[str, Any], kind: str) -> None:
        """One server-log line per statement and kind that tokenizes, written before the
        vault is asked: tokenize is an oracle, and a caller that rolls back (a guess loop)
        erases every vault record of it, but not this line (never a value)."""
        key = (f"{ctx['pid']}@{ctx['statement']}", kind)
        if key not in self._tokenize_logged:
            self._tokenize_logged.add(key)
            self.plpy.log(f"deid audit: tokenize by principal {ctx['principal']!r} in "
                          f"statement {key[0]} (kind {kind[:80]!r})")

    def _log_tokenize_counts(self, gate: Gate) -> None:
        """The previous scope's counts of new and existing values (known only once the next
        scope starts; a session's last statement keeps only its start line above)."""
        for r in gate.drain():
            self.plpy.log(f"deid audit: tokenize by principal {r['principal']!r} in statement "
                          f"{r['query_id']}: domain {r['domain']!r}, "
                          f"{r['new']} new, {r['existing']} existing")


def _host(plpy: Any, schema: str) -> _Host:
    host = _hosts.get(schema)
    if host is None:
        host = _hosts[schema] = _Host(plpy, schema)
    return host


def tokenize(plpy: Any, value: str | None, kind: str | None, *,
             vault_schema: str = DEFAULT_SCHEMA) -> str | None:
    """``deid.tokenize(value, kind)``: NULL value → NULL; the kind is required otherwise."""
    if value is None:
        return None
    # One value per call here: "row 1 of the batch" would mislead.
    return _tokenize(plpy, [value], kind, vault_schema, one_value=True)[0]


def tokenize_batch(plpy: Any, values: list[str | None] | None, kind: str | None, *,
                   vault_schema: str = DEFAULT_SCHEMA) -> list[str | None] | None:
    """``deid.tokenize_batch(values text[], kind)``: the tokens of `values`, in order (NULL
    stays NULL). What ``deid.token_map`` calls: one vault lookup for the whole array."""
    if values is None:
        return None
    return _tokenize(plpy, values, kind, vault_schema, one_value=False)


def _tokenize(plpy: Any, values: list[str | None], kind: str | None, vault_schema: str, *,
              one_value: bool) -> list[str | None]:
    """Both tokenize functions: policy for ``session_user``, a server-log trail that no
    rollback erases, then the token service."""
    try:
        if kind is None:
            raise InvalidKindError("deid.tokenize: the kind argument is NULL")
        host = _host(plpy, vault_schema)
        service = host.service()
        ctx = host.context()
        host.log_tokenize(ctx, kind)
        return service.tokenize(kind, values, principal=ctx["principal"],
                                query_id=f"{ctx['pid']}@{ctx['statement']}", host="postgresql")
    except InvalidValueError as exc:
        _fail(plpy, InvalidValueError(exc.kind, exc.reason, column=exc.column) if one_value
              else exc)
    except PermissionDeniedError as exc:
        # The vault's record of the refusal rolls back with the failed statement.
        plpy.log(f"deid audit: tokenize refused by the vault policy for principal "
                 f"{_principal(plpy, vault_schema)!r}")
        _fail(plpy, exc)
    except Exception as exc:
        _fail(plpy, exc, "deid.tokenize")
    raise AssertionError("unreachable: _fail raises")  # pragma: no cover


def detokenize(plpy: Any, token: str | None, *,
               vault_schema: str = DEFAULT_SCHEMA) -> str | None:
    """``deid.detokenize(token)`` for ``session_user``: NULL → NULL; policy, audit, decrypt."""
    if token is None:
        return None
    try:
        host = _host(plpy, vault_schema)
        service = host.service()
        ctx = host.context()
        host.log_detokenize(ctx)
        return service.detokenize([token], principal=ctx["principal"],
                                  query_id=f"{ctx['pid']}@{ctx['statement']}",
                                  host="postgresql")[0]
    except PermissionDeniedError as exc:
        # The audit record of a refusal rolls back with the failed statement; the server log
        # keeps the refusal (principal only).
        plpy.log(f"deid audit: detokenize denied by the vault policy for principal "
                 f"{_principal(plpy, vault_schema)!r}")
        _fail(plpy, exc)
    except Exception as exc:
        _fail(plpy, exc, "deid.detokenize")
    return None  # not reached


def _principal(plpy: Any, schema: str) -> str:
    try:
        return str(_host(plpy, schema).context()["principal"])
    except Exception:
        return "unknown"


def _fail(plpy: Any, exc: BaseException, where: str = "deid") -> None:
    if isinstance(exc, DeidError):
        sqlstate = getattr(exc, "sqlstate", None) or next(
            (code for cls, code in _SQLSTATE.items() if isinstance(exc, cls)), "XX000")
        plpy.error(str(exc), sqlstate=sqlstate)
    # Not one of ours: its text may quote data (a UnicodeError quotes the bytes), so only
    # the class is reported.
    plpy.error(f"{where}: internal error ({exc.__class__.__name__}); the value is not shown",
               sqlstate="XX000")
