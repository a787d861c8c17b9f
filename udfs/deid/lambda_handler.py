"""Amazon Redshift Lambda UDF handlers: ``deid.tokenize(varchar, varchar)`` and
``deid.detokenize(varchar)``.

Redshift sends one batch per invocation::

    {"request_id": "...", "cluster": "arn:aws:redshift:...", "user": "etl", "database": "dev",
     "external_function": "deid.tokenize", "query_id": 5678234, "num_records": 3,
     "arguments": [["a@b.com", "email"], [null, "email"], null]}

and expects a JSON string back: ``{"success": true, "num_records": 3, "results": [...]}``
with exactly ``num_records`` results in order, or ``{"success": false, "error_msg": "..."}``.
One bad row fails the whole batch, so the query (and the dbt model running it) fails rather
than storing a NULL, a raw value or an error text in a mart.

The token service is built once per container (module level, on the first invocation or at
init inside Lambda) from ``DEID_VAULT`` and friends, so warm invocations reuse the vault
clients, keys and caches. Nothing here logs or returns an argument value: log lines carry
counts, timings, the function name, the query id and (for detokenize) the user.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import DeidError, InvalidValueError, PermissionDeniedError
from .service import TokenService
from .vault import VaultConfig, open_service

# Lambda's synchronous invocation limit, each way (6 MB).
LAMBDA_PAYLOAD_LIMIT = 6_291_456

log = logging.getLogger("deid.lambda")


class ProtocolError(DeidError):
    """The event is not a well-formed Redshift external-function request."""


@dataclass(frozen=True)
class HandlerConfig:
    """Read once from the environment at container start.

    ``tokenize_functions`` / ``detokenize_functions``: the SQL names (``schema.function``,
    lowercase) this Lambda accepts in the payload's ``external_function``. Anyone allowed to
    CREATE EXTERNAL FUNCTION with the cluster's role could point a differently named, and
    differently granted, function at the same Lambda; this check refuses that.

    ``databases``: the databases whose queries this Lambda serves (``DEID_DATABASES``, comma
    separated). Redshift reports the caller as the payload's ``user`` *and* ``database``; the
    vault's policies name the user, this names the database. Empty refuses every request.
    """

    vault: VaultConfig = field(default_factory=VaultConfig)
    tokenize_functions: frozenset[str] = frozenset({"deid.tokenize"})
    detokenize_functions: frozenset[str] = frozenset({"deid.detokenize"})
    databases: frozenset[str] = frozenset()
    payload_limit: int = LAMBDA_PAYLOAD_LIMIT

    @classmethod
    def from_env(cls) -> HandlerConfig:
        def names(var: str, default: str) -> frozenset[str]:
            raw = os.environ.get(var) or default
            return frozenset(n.strip().lower() for n in raw.split(",") if n.strip())

        return cls(
            vault=VaultConfig.from_env(),
            tokenize_functions=names("DEID_TOKENIZE_FUNCTION", "deid.tokenize"),
            detokenize_functions=names("DEID_DETOKENIZE_FUNCTION", "deid.detokenize"),
            databases=frozenset(n.strip() for n in os.environ.get("DEID_DATABASES", "").split(",")
                                if n.strip()),
        )


@dataclass(frozen=True, slots=True)
class _Request:
    rows: list[Any]
    user: str
    database: str
    query_id: str | None
    function: str
    host: str


class RedshiftUDF:
    """The two handlers over one token service. Thin: parse, call the core, answer."""

    def __init__(self, service: TokenService, config: HandlerConfig | None = None) -> None:
        self.service = service
        self.config = config or HandlerConfig()

    # -- handlers ---------------------------------------------------------------------------

    def tokenize(self, event: Any) -> str:
        return self._run("tokenize", event, self._tokenize)

    def detokenize(self, event: Any) -> str:
        return self._run("detokenize", event, self._detokenize)

    # -- protocol ---------------------------------------------------------------------------

    def _run(self, action: str, event: Any, body: Any) -> str:
        started = time.perf_counter()
        query_id = None
        try:
            expected = (self.config.tokenize_functions if action == "tokenize"
                        else self.config.detokenize_functions)
            req = _parse(event, arity=2 if action == "tokenize" else 1, expected=expected,
                         action=action)
            query_id = req.query_id
            if req.database not in self.config.databases:
                raise PermissionDeniedError(
                    f"deid.{action}: permission denied: user {req.user[:128]!r} called from "
                    f"database {req.database[:128]!r}, which this Lambda does not serve (its "
                    "DEID_DATABASES setting lists the databases it serves)")
            results = body(req)
            response = _dumps({"success": True, "num_records": len(results),
                               "results": results})
            size = _wire_size(response)
            if size > self.config.payload_limit:
                raise ProtocolError(
                    f"deid.{action}: the response ({size} bytes for {len(results)} rows) would "
                    f"exceed Lambda's {self.config.payload_limit}-byte payload limit; lower "
                    "MAX_BATCH_ROWS of the external function (see docs/redshift.md)")
        except DeidError as exc:
            # deid's messages are value-free by contract (see errors.py).
            return self._fail(action, query_id, started, str(exc), type(exc).__name__)
        except Exception as exc:
            # A library's message may quote a value or a key: report the class name only.
            return self._fail(action, query_id, started,
                              f"deid.{action}: internal error ({type(exc).__name__}); the "
                              "function's log has the request id", type(exc).__name__)
        log.info("deid.%s ok: query_id=%s rows=%d bytes=%d ms=%.1f", action, query_id,
                 len(results), size, (time.perf_counter() - started) * 1000)
        return response

    @staticmethod
    def _fail(action: str, query_id: str | None, started: float, message: str,
              error_class: str) -> str:
        log.warning("deid.%s failed: query_id=%s error=%s ms=%.1f", action, query_id,
                    error_class, (time.perf_counter() - started) * 1000)
        return _dumps({"success": False, "error_msg": message})

    # -- tokenize ---------------------------------------------------------------------------

    def _tokenize(self, req: _Request) -> list[str | None]:
        # Deduplicate per kind spec: one service call (one vault round trip) per kind in the
        # batch, usually exactly one. dict keeps first-seen order and remembers the first row.
        by_kind: dict[str, dict[str, int]] = {}
        for r, row in enumerate(req.rows):
            if row is None or row[0] is None:
                continue
            value, kind = row
            if kind is None:
                raise ProtocolError(f"deid.tokenize: row {r + 1} of the batch has a NULL kind "
                                    "argument; pass a kind such as 'email'")
            distinct = by_kind.get(kind)
            if distinct is None:
                distinct = by_kind[kind] = {}
            if value not in distinct:
                distinct[value] = r
        token_of: dict[str, dict[str, str]] = {}
        for kind, distinct in by_kind.items():
            values = list(distinct)
            try:
                tokens = self.service.tokenize(kind, values, principal=req.user,
                                               query_id=req.query_id, host=req.host)
            except InvalidValueError as exc:
                row = distinct[values[exc.row - 1]] + 1 if exc.row else None
                raise InvalidValueError(exc.kind, exc.reason, row=row,
                                        column=exc.column) from None
            answered = [t for t in tokens if isinstance(t, str)]
            if len(answered) != len(values) or len(tokens) != len(values):
                raise ProtocolError(f"deid.tokenize: the vault returned {len(answered)} tokens "
                                    f"for {len(values)} values of kind {kind[:40]!r}")
            token_of[kind] = dict(zip(values, answered, strict=True))
        # A container may be frozen or dropped after any invocation: no aggregate waits.
        self.service.flush_audit()
        return [None if row is None or row[0] is None else token_of[row[1]][row[0]]
                for row in req.rows]

    # -- detokenize -------------------------------------------------------------------------

    def _detokenize(self, req: _Request) -> list[str | None]:
        tokens = [None if row is None else row[0] for row in req.rows]
        if all(t is None for t in tokens):
            return list(tokens)  # nothing revealed: no policy check or audit needed
        # The service checks `user` against the vault policy, audits (user, query id, count,
        # kinds) and fetches each distinct token once.
        values = self.service.detokenize(tokens, principal=req.user, query_id=req.query_id,
                                         host=req.host)
        if len(values) != len(tokens) or any(
                (v is None) != (t is None) for t, v in zip(tokens, values, strict=True)):
            raise ProtocolError("deid.detokenize: the vault's answer does not match the batch")
        return values


def _parse(event: Any, *, arity: int, expected: frozenset[str], action: str) -> _Request:
    what = f"deid.{action}"
    if not isinstance(event, dict):
        raise ProtocolError(f"{what}: the event is not a Redshift external-function request "
                            "(expected a JSON object)")
    args = event.get("arguments")
    if not isinstance(args, list):
        raise ProtocolError(f"{what}: the request has no 'arguments' array")
    n = event.get("num_records")
    if type(n) is not int or n != len(args):
        raise ProtocolError(f"{what}: num_records does not match the {len(args)} argument rows")
    user = event.get("user")
    if not isinstance(user, str) or not user:
        raise ProtocolError(f"{what}: the request names no 'user'")
    function = event.get("external_function")
    if not isinstance(function, str) or function.strip().lower() not in expected:
        raise ProtocolError(
            f"{what}: this Lambda serves {', '.join(sorted(expected))}, not the function "
            f"{str(function)[:128]!r}; create it with the expected name (see docs/redshift.md)")
    query_id = event.get("query_id")
    qid = None if query_id is None else str(query_id)[:64]
    for r, row in enumerate(args):
        if row is None:
            continue
        if not isinstance(row, list) or len(row) != arity:
            raise ProtocolError(f"{what}: row {r + 1} of the batch does not have {arity} "
                                f"argument{'s' if arity > 1 else ''}")
        for c, v in enumerate(row):
            if v is not None and not isinstance(v, str):
                raise ProtocolError(f"{what}: argument {c + 1} of row {r + 1} is not text; "
                                    "cast it to varchar in SQL")
    cluster = event.get("cluster")
    database = event.get("database")
    if not isinstance(database, str) or not database:
        raise ProtocolError(f"{what}: the request names no 'database'")
    host = f"redshift:{str(cluster)[:256]}/{database[:128]}"
    return _Request(args, user, database, qid, function.strip().lower(), host)


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _wire_size(response: str) -> int:
    """Bytes on the wire, counted pessimistically: the runtime encodes the returned string
    as a JSON string literal again (quotes escaped, non-ASCII as \\u escapes)."""
    return len(json.dumps(response))


# ---------------------------------------------------------------------------------------
# module-level state: one service per container


_udf: RedshiftUDF | None = None
_lock = threading.Lock()


def _get_udf() -> RedshiftUDF:
    global _udf
    if _udf is None:
        with _lock:
            if _udf is None:
                config = HandlerConfig.from_env()
                _udf = RedshiftUDF(open_service(config.vault), config)
    return _udf


def reset(udf: RedshiftUDF | None = None) -> None:
    """Replace (or drop) the container's service: for tests and benchmarks."""
    global _udf
    with _lock:
        _udf = udf


def _failure(action: str, exc: BaseException) -> str:
    if isinstance(exc, DeidError):
        message = str(exc)
    else:
        message = (f"deid.{action}: the vault could not be opened ({type(exc).__name__}); "
                   "check DEID_VAULT and the function's role")
    log.error("deid.%s: startup failed: %s", action, type(exc).__name__)
    return _dumps({"success": False, "error_msg": message})


def tokenize_handler(event: Any, context: Any = None) -> str:
    """Lambda entry point of ``deid.tokenize(varchar, varchar)``."""
    try:
        udf = _get_udf()
    except Exception as exc:  # fail closed: a broken start answers every batch with an error
        return _failure("tokenize", exc)
    return udf.tokenize(event)


def detokenize_handler(event: Any, context: Any = None) -> str:
    """Lambda entry point of ``deid.detokenize(varchar)``."""
    try:
        udf = _get_udf()
    except Exception as exc:
        return _failure("detokenize", exc)
    return udf.detokenize(event)


if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
    # Inside Lambda: connect and load keys during init, so the first batch is warm. A failure
    # here is not fatal: each invocation retries and reports it as the batch's error.
    logging.getLogger().setLevel(os.environ.get("DEID_LOG_LEVEL", "INFO"))
    try:
        _get_udf()
    except Exception as _exc:  # reported per invocation
        log.error("deid: init failed: %s", type(_exc).__name__)
