"""The PostgreSQL host: what the plpython3u bodies of ``deid.tokenize`` and ``deid.detokenize``
call (macros/postgres/postgres__create_udfs.sql creates them).

Both functions are SECURITY DEFINER, owned by the vault role, with a pinned ``search_path``:
inside them ``current_user`` is the vault role, which alone may read the vault schema, so the
principal the vault policy checks is ``session_user`` (the login that ran the query).

Caches are per statement. The vault writes of a statement belong to its transaction; a
token cached past a rollback (of the statement, or of a savepoint around it) would be handed
out again with no vault record behind it. So a call whose ``statement_timestamp()`` differs
from the previous call's starts from a fresh token service, and reads the keys again.

Errors: deid's messages (kind, reason, what to do; never a value or a token) with a SQLSTATE;
anything else is reported by class name only, since a Python exception text may quote data.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    DeidError,
    InvalidKindError,
    InvalidValueError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultKeyError,
    VaultUnavailableError,
)
from .postgres_store import DEFAULT_SCHEMA, SpiStore
from .service import VaultTokenService

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


class _Host:
    def __init__(self, plpy: Any, schema: str) -> None:
        self.plpy = plpy
        self.store = SpiStore(plpy, schema)
        self._context = plpy.prepare(
            "select statement_timestamp()::text as statement, session_user::text as principal,"
            " pg_backend_pid() as pid")
        self._statement: str | None = None
        self._service: VaultTokenService | None = None
        self._logged: str | None = None

    def service(self) -> tuple[VaultTokenService, dict[str, Any]]:
        row = self.plpy.execute(self._context)[0]
        if row["statement"] != self._statement or self._service is None:
            self._service = None
            self.store.forget_keyring()
            self._service = VaultTokenService(self.store, cache_size=CACHE_SIZE,
                                              detokenize_cache_size=CACHE_SIZE)
            self._statement = row["statement"]
        return self._service, row


    def log_detokenize(self, ctx: dict[str, Any]) -> None:
        """One server-log line per statement that detokenizes. The vault's audit records
        commit with the caller's transaction, so a client that rolls back erases them; the
        server log keeps who detokenized, when, in which statement (never a value)."""
        key = f"{ctx['pid']}@{ctx['statement']}"
        if key != self._logged:
            self._logged = key
            self.plpy.log(f"deid audit: detokenize by principal {ctx['principal']!r} in "
                          f"statement {key}")


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
    try:
        if kind is None:
            raise InvalidKindError("deid.tokenize: the kind argument is NULL")
        service, _ctx = _host(plpy, vault_schema).service()
        return service.tokenize(kind, [value])[0]
    except InvalidValueError as exc:
        # One value per call here: "row 1 of the batch" would mislead.
        _fail(plpy, InvalidValueError(exc.kind, exc.reason, column=exc.column))
    except Exception as exc:
        _fail(plpy, exc, "deid.tokenize")
    return None  # not reached: _fail raises


def detokenize(plpy: Any, token: str | None, *,
               vault_schema: str = DEFAULT_SCHEMA) -> str | None:
    """``deid.detokenize(token)`` for ``session_user``: NULL → NULL; policy, audit, decrypt."""
    if token is None:
        return None
    try:
        host = _host(plpy, vault_schema)
        service, ctx = host.service()
        host.log_detokenize(ctx)
        return service.detokenize([token], principal=ctx["principal"],
                                  query_id=f"{ctx['pid']}@{ctx['statement']}",
                                  host="postgresql")[0]
    except PermissionDeniedError as exc:
        # The audit record of a refusal rolls back with the failed statement; the server log
        # keeps the refusal (principal only).
        plpy.log(f"deid audit: detokenize denied by the vault policy for principal "
                 f"{_principal(plpy)!r}")
        _fail(plpy, exc)
    except Exception as exc:
        _fail(plpy, exc, "deid.detokenize")
    return None  # not reached


def _principal(plpy: Any) -> str:
    try:
        return str(plpy.execute("select session_user::text as u")[0]["u"])
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
