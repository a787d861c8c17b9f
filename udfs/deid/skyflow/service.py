"""Skyflow's vault as a deid `TokenService`."""

from __future__ import annotations

import datetime as _dt
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import kinds as _kinds
from .._cache import BoundedCache
from .._policy import Gate
from ..errors import (
    ConfigError,
    DeidError,
    ErasedTokenError,
    InvalidValueError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultUnavailableError,
)
from ..service import DEFAULT_ERASURE_CHECK_S, TokenizeBatch
from ..stores import Erasure, VaultStore
from ..vault import open_store
from .auth import Credentials, load_credentials
from .client import SkyflowClient
from .settings import _CONTROL, _MAX_TOKEN_CHARS, SkyflowSettings, Target, _spec_key, parse_url

# ---------------------------------------------------------------------------------------
# the token service


def _malformed(what: str, reason: str) -> VaultUnavailableError:
    return VaultUnavailableError(f"{what}: malformed Skyflow response: {reason} "
                                 "(nothing from the batch was used)")


def _records(doc: dict[str, Any], expected: int, what: str) -> list[dict[str, Any]]:
    """The response's records: exactly `expected` JSON objects, in request order."""
    records = doc.get("records")
    if not isinstance(records, list) or len(records) != expected:
        raise _malformed(what, f"expected {expected} records, got "
                         f"{len(records) if isinstance(records, list) else 'none'}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _malformed(what, f"record {i + 1} is not an object")
    return records


# What Skyflow answers in place of a value when a role's policy allows less than plain text:
# its REDACTED placeholder, or a MASKED form (runs of X or * over all but a few characters).
# deid always asks for PLAIN_TEXT, so either means the role lacks access. A real value with
# three X or * in a row cannot be detokenized through Skyflow (fail closed; docs/skyflow.md).
_REDACTED = re.compile(r"\*REDACTED\*|\*{3,}|X{3,}")


class SkyflowTokenService:
    """A `TokenService` over a Skyflow vault. Safe to share between threads."""

    def __init__(self, settings: SkyflowSettings, *, credentials: Credentials | None = None,
                 policy_store: VaultStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.client = SkyflowClient(settings, credentials or load_credentials(
            settings.credentials), clock=clock)
        self._policy = policy_store
        if self._policy is None and settings.policy is not None and settings.policy != "skyflow":
            self._policy = open_store(settings.policy)
        self._keyring = self._policy.keyring() if self._policy is not None else None
        # policy=skyflow (no store): both policies and the audit are Skyflow's roles and log.
        self.gate = Gate(self._policy, self._keyring.chain if self._keyring else None,
                         extra={"vault": settings.label})
        self._cache = BoundedCache(settings.cache_size)
        self._epoch: int | None = None
        self._epoch_checked = float("-inf")
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency,
                                        thread_name_prefix="deid-skyflow")

    # -- helpers ---------------------------------------------------------------------------

    def _target(self, spec: _kinds.KindSpec) -> Target:
        key = _spec_key(spec)
        target = self.settings.mapping.get(key)
        if target is None:
            # Never fall back to the kind's default column: that would link a separate domain.
            raise ConfigError(f"deid.tokenize: kind {key!r} has no Skyflow column; add "
                              f'"{key}": {{"table": …, "column": …}} to the mapping file')
        if self.settings.mode == "lookup" and target.column_group is None:
            raise ConfigError(f"deid.tokenize: kind {key!r}: mode=lookup needs a "
                              "column_group for it in the mapping file")
        return target

    def _map_chunks(self, fn: Callable[[list[str]], list[str]], items: list[str],
                    size: int) -> list[str]:
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        if len(chunks) == 1:
            return fn(chunks[0])
        out: list[str] = []
        for part in self._pool.map(fn, chunks):  # map keeps the chunks' order
            out.extend(part)
        return out

    @staticmethod
    def _scope(role: str | None) -> str | None:
        return f"role:{role}" if role else None

    # -- tokenize ----------------------------------------------------------------------------

    def tokenize(self, kind: str, values: Sequence[str | None], *,
                 column: str | None = None, principal: str | None = None,
                 query_id: str | None = None, host: str | None = None) -> list[str | None]:
        if principal is not None and self.settings.policy is None:
            raise ConfigError(
                "deid.tokenize: the Skyflow vault URL has no policy= parameter: set "
                "policy=<deid vault URL> for deid's tokenize and detokenize policies and "
                "audit log, or policy=skyflow to leave them to Skyflow's roles and audit")
        self._check_erasures()
        batch = TokenizeBatch(kind, values, column=column, cache=self._cache, gate=self.gate,
                              principal=principal, query_id=query_id, host=host)
        target = self._target(batch.spec)
        if batch.done():
            return batch.out
        by_canonical = batch.groups(by="canonical")
        canonicals = list(by_canonical)
        spec = batch.spec
        what = f"deid.tokenize: kind {_spec_key(spec)!r}" + (f", column {column!r}"
                                                             if column else "")
        if batch.mode == "lookup" and self.settings.mode != "lookup":
            # Skyflow's upsert cannot say which values were new: a look-up-only principal
            # needs mode=lookup (the vault's own lookup endpoint), where unseen values fail.
            raise PermissionDeniedError(
                f"{what}: principal {principal!r} may only look up existing tokens; this "
                "Skyflow vault URL upserts (mode=upsert), so it is refused (use mode=lookup)")
        ctx = None if principal is None else self._ctx(principal, query_id)
        if self.settings.mode == "lookup":
            def call(chunk: list[str]) -> list[str]:
                return self._lookup(target, chunk, what, ctx)
        else:
            def call(chunk: list[str]) -> list[str]:
                return self._upsert(target, chunk, what, ctx)
        tokens = self._map_chunks(call, canonicals, self.settings.batch_size)
        if len(tokens) != len(canonicals):  # pragma: no cover - guarded per chunk
            raise _malformed(what, "token count differs from value count")
        if self._policy is not None and self._policy.erased(tokens):
            # A column whose tokens are derived from the value hands an erased person's old
            # token out again: that would relink their new rows to the old ones.
            raise VaultUnavailableError(
                f"{what}: Skyflow returned a token that was erased (deid forget) for a value "
                "of the batch; the column's token type gives a deleted value its old token "
                "back, so erasure cannot unlink it: use a random token type (fail closed)")
        # Skyflow does not say which upserts were new: every value counts as existing.
        return batch.finish(self._cache, by_canonical, dict(zip(canonicals, tokens,
                                                                strict=True)), new_raws=0)

    def flush_audit(self) -> None:
        self.gate.flush()

    @staticmethod
    def _check_token(token: Any, value: str, what: str, index: int, target: Target) -> str:
        if not isinstance(token, str) or not token:
            raise _malformed(what, f"record {index + 1} of the request has no token")
        if token == value:
            # The column is not tokenized (or the token type is a pass-through): the
            # warehouse would receive the clear value.
            raise VaultUnavailableError(
                f"{what}: Skyflow returned the value itself as its token for record "
                f"{index + 1}: enable tokenization on {target.table}.{target.column} (fail closed)")
        return token

    def _upsert(self, target: Target, chunk: list[str], what: str,
                ctx: dict[str, str] | None = None) -> list[str]:
        body = {"records": [{"fields": {target.column: v}} for v in chunk],
                "tokenization": True, "upsert": target.column}
        doc = self.client.post(f"/{target.table}", body, what=what,
                               scope=self._scope(self.settings.tokenize_role), ctx=ctx)
        records = _records(doc, len(chunk), what)
        out = []
        for i, (rec, value) in enumerate(zip(records, chunk, strict=True)):
            if rec.get("error"):
                raise VaultUnavailableError(f"{what}: Skyflow reported an error for record "
                                            f"{i + 1} of the request (the value is not shown)")
            tokens = rec.get("tokens")
            if not isinstance(tokens, dict):
                raise _malformed(what, f"record {i + 1} has no tokens (is tokenization "
                                 "enabled on the column?)")
            out.append(self._check_token(tokens.get(target.column), value, what, i, target))
        return out

    def _lookup(self, target: Target, chunk: list[str], what: str,
                ctx: dict[str, str] | None = None) -> list[str]:
        body = {"tokenizationParameters": [{"value": v, "columnGroup": target.column_group}
                                           for v in chunk]}
        doc = self.client.post("/tokenize", body, what=what,
                               scope=self._scope(self.settings.tokenize_role), ctx=ctx)
        records = _records(doc, len(chunk), what)
        out = []
        for i, (rec, value) in enumerate(zip(records, chunk, strict=True)):
            if rec.get("error"):
                raise VaultUnavailableError(f"{what}: Skyflow reported an error for record "
                                            f"{i + 1} of the request (the value is not shown; "
                                            "mode=lookup needs values already in the vault)")
            out.append(self._check_token(rec.get("token"), value, what, i, target))
        return out

    # -- detokenize --------------------------------------------------------------------------

    def detokenize(self, tokens: Sequence[str | None], *, principal: str,
                   query_id: str | None = None, host: str | None = None) -> list[str | None]:
        what = "deid.detokenize"
        present = [t for t in tokens if t is not None]
        bad_row = None
        for i, t in enumerate(tokens):
            if t is None:
                continue
            if (not isinstance(t, str) or not t or len(t) > _MAX_TOKEN_CHARS
                    or _CONTROL.search(t)):
                bad_row = i + 1
                break
        self._gate(principal, len(present), query_id, host, rejected=bad_row is not None)
        if bad_row is not None:
            raise UnknownTokenError(f"{what}: row {bad_row} of the batch is not a Skyflow "
                                    "token (the input is not shown)")
        if not present:
            return [None] * len(tokens)
        distinct = list(dict.fromkeys(present))
        ctx = self._ctx(principal, query_id)
        scope = self._scope(self.settings.detokenize_role)

        def call(chunk: list[str]) -> list[str]:
            return self._detokenize_chunk(chunk, ctx, scope, what)

        try:
            found = self._map_chunks(call, distinct, self.settings.detokenize_batch_size)
        except UnknownTokenError:
            erased = self._policy.erased(distinct) if self._policy is not None else {}
            if erased:
                raise ErasedTokenError(
                    f"{what}: row {next(i for i, t in enumerate(tokens) if t in erased) + 1} "
                    "of the batch holds a token whose value was erased from the vault (deid "
                    "forget); it can never be detokenized again (not shown)") from None
            raise
        values = dict(zip(distinct, found, strict=True))
        return [values[t] if t is not None else None for t in tokens]

    def _ctx(self, principal: str, query_id: str | None) -> dict[str, str] | None:
        mode = self.settings.ctx
        if mode == "none":
            return None
        ctx = {"user": str(principal)}
        if mode == "user+query" and query_id is not None:
            ctx["query_id"] = str(query_id)
        return ctx

    def _detokenize_chunk(self, chunk: list[str], ctx: dict[str, str] | None,
                          scope: str | None, what: str) -> list[str]:
        body = {"detokenizationParameters": [{"token": t, "redaction": "PLAIN_TEXT"}
                                             for t in chunk],
                "continueOnError": False}
        doc = self.client.post("/detokenize", body, what=what, scope=scope, ctx=ctx)
        records = _records(doc, len(chunk), what)
        out = []
        for i, (rec, token) in enumerate(zip(records, chunk, strict=True)):
            if rec.get("error"):
                raise UnknownTokenError(f"{what}: Skyflow reported an error for record "
                                        f"{i + 1} of the request (token not found or not "
                                        "allowed; the token is not shown)")
            if rec.get("token") != token:
                raise _malformed(what, f"record {i + 1} answers a different token than was "
                                 "asked (out of order)")
            value = rec.get("value")
            if not isinstance(value, str) or value == token:
                raise _malformed(what, f"record {i + 1} carries no plain-text value")
            if _REDACTED.search(value):
                raise PermissionDeniedError(
                    f"{what}: Skyflow answered record {i + 1} with a redacted or masked value "
                    "although plain text was asked for: the service account's role lacks "
                    "plain-text access to this column (grant the role PLAIN_TEXT redaction "
                    "in its Skyflow policy, or use a detokenize_role= that has it); nothing "
                    "from the batch was returned")
            out.append(value)
        return out

    # -- erasure ------------------------------------------------------------------------------

    def _check_erasures(self) -> None:
        """Empty the tokenize cache when the policy store recorded an erasure (another
        process ran deid forget); looked at every DEFAULT_ERASURE_CHECK_S seconds."""
        if self._policy is None:
            return
        t = time.monotonic()
        if t - self._epoch_checked < DEFAULT_ERASURE_CHECK_S:
            return
        epoch = self._policy.erasure_epoch()
        self._epoch_checked = t
        if epoch != self._epoch:
            if self._epoch is not None:
                self._cache.clear()
            self._epoch = epoch

    def forget(self, kind: str, *, values: Sequence[str] | None = None,
               tokens: Sequence[str] | None = None, principal: str) -> int:
        """Delete the Skyflow records holding these values (or the values of these tokens)
        in the kind's column; return how many records were deleted.

        Skyflow deletes by record id. The id comes from the same upsert tokenize sends (the
        value travels in a request body, never in a URL), which also means a value Skyflow
        did not hold is inserted and deleted at once and counts as deleted. By token, the
        tokens are first detokenized (the service account needs the detokenize role) and
        only records whose token was given are deleted. With a deid policy store the
        erased tokens are kept there as tombstones and the deletion is audited.
        """
        spec = _kinds.parse_kind(kind)
        target = self._target(spec)
        if (values is None) == (tokens is None):
            raise DeidError("deid forget: pass values or tokens (exactly one)")
        what = f"deid forget: kind {_spec_key(spec)!r}"
        wanted: set[str] | None = None
        if values is not None:
            canonicals = []
            for i, v in enumerate(values):
                if not isinstance(v, str):
                    raise InvalidValueError(spec.name, "is not text", row=i + 1)
                try:
                    canonicals.append(_kinds.normalize(spec.kind, v)[0])
                except _kinds._Invalid as exc:
                    raise InvalidValueError(spec.name, str(exc), row=i + 1) from None
        else:
            assert tokens is not None
            wanted = {t for t in tokens if isinstance(t, str) and t}
            canonicals = self._held_values(sorted(wanted), what)
        canonicals = list(dict.fromkeys(canonicals))
        size = self.settings.batch_size
        records: list[tuple[str, str]] = []  # (skyflow_id, token)
        for i in range(0, len(canonicals), size):
            chunk = canonicals[i : i + size]
            body = {"records": [{"fields": {target.column: v}} for v in chunk],
                    "tokenization": True, "upsert": target.column}
            doc = self.client.post(f"/{target.table}", body, what=what)
            for n, rec in enumerate(_records(doc, len(chunk), what)):
                sid, tok = rec.get("skyflow_id"), (rec.get("tokens") or {}).get(target.column)
                if not isinstance(sid, str) or not sid or not isinstance(tok, str) or not tok:
                    raise _malformed(what, f"record {n + 1} has no skyflow_id or token")
                records.append((sid, tok))
        if wanted is not None:
            records = [(sid, tok) for sid, tok in records if tok in wanted]
        ids = list(dict.fromkeys(sid for sid, _tok in records))
        for i in range(0, len(ids), size):
            chunk = ids[i : i + size]
            doc = self.client.delete(f"/{target.table}", {"skyflow_ids": chunk}, what=what)
            confirmed = doc.get("RecordIDResponse")
            if not isinstance(confirmed, list) or set(confirmed) != set(chunk):
                raise _malformed(what, "the delete did not confirm every record")
        self._cache.clear()
        if self._policy is not None:
            at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
            self._policy.record_erasures([Erasure(tok, spec.domain, spec.name, at)
                                          for _sid, tok in records])
        self.gate.append({"action": "forget", "principal": principal,
                          "outcome": "erased" if ids else "nothing to erase",
                          "count": len(ids), "kinds": {f"{spec.name}:{spec.domain}": len(ids)}})
        return len(ids)

    def _held_values(self, tokens: list[str], what: str) -> list[str]:
        """The values of the tokens Skyflow holds (unknown ones are skipped, not fatal)."""
        out: list[str] = []
        size = self.settings.detokenize_batch_size
        for i in range(0, len(tokens), size):
            chunk = tokens[i : i + size]
            body = {"detokenizationParameters": [{"token": t, "redaction": "PLAIN_TEXT"}
                                                 for t in chunk],
                    "continueOnError": True}
            doc = self.client.post("/detokenize", body, what=what,
                                   scope=self._scope(self.settings.detokenize_role))
            for rec, token in zip(_records(doc, len(chunk), what), chunk, strict=True):
                value = rec.get("value")
                if rec.get("error") or rec.get("token") != token or not isinstance(value, str) \
                        or not value or value == token:
                    continue
                out.append(value)
        return out

    def erasures(self, since: str | None = None) -> Iterator[Erasure]:
        """Tombstones kept by the deid policy store (none with policy=skyflow)."""
        if self._policy is None:
            raise ConfigError("deid erased: with policy=skyflow no deid store keeps the erased "
                              "tokens; use Skyflow's audit log, or set policy=<deid vault URL>")
        return self._policy.erasures(since)

    # -- deid-side policy and audit ----------------------------------------------------------

    def _gate(self, principal: str, count: int, query_id: str | None, host: str | None,
              *, rejected: bool) -> None:
        if self.settings.policy is None:
            raise ConfigError(
                "deid.detokenize: the Skyflow vault URL has no policy= parameter: set "
                "policy=<deid vault URL> (e.g. sqlite:///.deid/skyflow-policy.db) for deid's "
                "detokenize policy and audit log, or policy=skyflow to leave both to "
                "Skyflow's roles and audit")
        # Skyflow tokens do not carry their kind: no kinds in the record.
        self.gate.detokenize(principal, count=count, kinds=Counter(), query_id=query_id,
                             host=host, rejected=rejected)

    def close(self) -> None:
        self.gate.flush()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        if self._policy is not None:
            self._policy.close()


def open_service(config: Any) -> SkyflowTokenService:
    """Entry point for `deid.vault.open_service` (scheme ``skyflow``)."""
    settings = parse_url(config.url, cache_size=config.cache_size)
    policy = None
    if settings.policy is not None and settings.policy != "skyflow":
        policy = open_store(settings.policy, keys=config.keys)
    return SkyflowTokenService(settings, policy_store=policy)
