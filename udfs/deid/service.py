"""The token service: batch in, batch out. Every engine host calls only this.

``tokenize(kind, values)`` normalizes each value, fingerprints it under the vault's key,
looks the fingerprint up, and mints a random token (with its value encrypted) only for
fingerprints never seen. ``detokenize(tokens, principal)`` checks the vault policy, audits,
then decrypts. Both check the vault's policy for the caller's principal once per batch and
audit through one `Gate` (deid._policy); tokenize's front half (`TokenizeBatch`) is shared
with every other token service. Both fail whole: one bad row fails the batch, so a query
(and the dbt model that runs it) fails instead of storing a NULL, a raw value or an error
string.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import chain, compress, repeat
from operator import attrgetter, is_, itemgetter
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

from . import _audit
from . import keys as _keys
from . import kinds as _kinds
from ._cache import BoundedCache
from ._policy import Gate
from .errors import (
    DeidError,
    ErasedTokenError,
    InvalidValueError,
    StaleKeyVersionError,
    UnknownTokenError,
    VaultKeyError,
    VaultUnavailableError,
)
from .stores import Erasure, NewRecords, StoredValue, VaultStore

DEFAULT_CACHE_SIZE = 1_000_000
# How stale a long-lived process's tokenize cache may be after an erasure elsewhere (s).
DEFAULT_ERASURE_CHECK_S = 1.0
_MAX_COLLISION_RETRIES = 8


# key (match key or canonical form) -> (canonical form, the raw spellings that have it)
Groups = dict[str, tuple[str, Sequence[str]]]
_CANONICAL, _MATCH_KEY, _SPELLINGS = itemgetter(0), itemgetter(1), itemgetter(1)
_FIRST = itemgetter(0)
_KEY_VERSION = attrgetter("key_version")
_CIPHERTEXT = attrgetter("ciphertext")


def _classify(distinct: list[Any], counts: Sequence[int], cached: list[str | None],
              need: list[Any]) -> tuple[Counter[str], list[Any]]:
    """(rows per kind, the tokens that are not deid tokens) for an audit record. A cached
    token was validated when it was fetched: only its kind is needed; the others are checked
    against their kind's format. Tokens of one kind told by a prefix or suffix (a column of
    one kind) take C-level passes; anything else goes token by token."""
    kinds: Counter[str] = Counter()
    if all(map(isinstance, need, repeat(str))):
        common = _kinds.common_kind(distinct)
        if common is not None and all(map(common.token_pattern.fullmatch, need)):
            kinds[common.name] = sum(counts)
            return kinds, []
    malformed = []
    for t, n, v in zip(distinct, counts, cached, strict=True):
        k = _kinds.kind_of_token(t, validate=v is None) if isinstance(t, str) else None
        if k is None:
            malformed.append(t)
        else:
            kinds[k.name] += n
    return kinds, malformed


def _first_row(tokens: list[str | None], bad: list[Any]) -> int:
    """1-based row of the first bad token, for an error message that names no token."""
    wanted = set(bad)
    return next(i for i, t in enumerate(tokens) if t in wanted) + 1


@runtime_checkable
class TokenService(Protocol):
    """What a UDF host needs. Implemented by `VaultTokenService` and by external vaults.

    `principal` is the engine's identity of the caller (PostgreSQL ``session_user``, the
    Redshift payload's ``user``, the DuckDB profile's principal). Hosts always pass it; None
    means an in-process caller that holds the vault itself (its store and keys), for which a
    policy would prove nothing.
    """

    def tokenize(self, kind: str, values: Sequence[str | None], *,
                 column: str | None = None, principal: str | None = None,
                 query_id: str | None = None, host: str | None = None) -> list[str | None]: ...

    def detokenize(self, tokens: Sequence[str | None], *, principal: str,
                   query_id: str | None = None, host: str | None = None) -> list[str | None]: ...

    def flush_audit(self) -> None: ...


@runtime_checkable
class Eraser(Protocol):
    """A token service that can erase (`VaultTokenService`, Skyflow's). Not part of
    `TokenService`: no engine host erases; the CLI and the ingest handlers do."""

    def forget(self, kind: str, *, values: Sequence[str] | None = None,
               tokens: Sequence[str] | None = None, principal: str) -> int: ...

    def erasures(self, since: str | None = None) -> Iterator[Erasure]: ...


class TokenizeBatch:
    """The front half of tokenize, shared by every token service: parse the kind, check the
    tokenize policy (once per batch), serve cached tokens, refuse non-text values, normalize
    the rest. NULL stays NULL and is never counted, checked or sent to a vault."""

    __slots__ = ("column", "gate", "host", "mode", "namespace", "nulls", "out", "pending",
                 "principal", "query_id", "spec", "values")

    def __init__(self, kind: str, values: Sequence[str | None], *, column: str | None,
                 cache: BoundedCache, gate: Gate, principal: str | None,
                 query_id: str | None, host: str | None) -> None:
        self.spec = spec = _kinds.parse_kind(kind)
        self.values = values if isinstance(values, list) else list(values)
        self.column, self.gate = column, gate
        self.principal, self.query_id, self.host = principal, query_id, host
        self.nulls = self.values.count(None)
        mode = "tokenize" if principal is None else gate.tokenize_mode(principal, spec.domain)
        if mode is None:
            assert principal is not None
            raise gate.refuse_tokenize(principal, spec.domain, spec.name,
                                       len(self.values) - self.nulls, query_id=query_id,
                                       host=host)
        self.mode = mode
        # One cache namespace per domain and kind: a value has one token per domain.
        self.namespace = (spec.domain, spec.name)
        self.out = cache.lookup(self.namespace, self.values)
        self.pending: Counter[str] = Counter()  # raw values the cache did not answer: rows

    def done(self) -> bool:
        """True when every non-NULL value was cached (the steady-state fast path)."""
        values, out = self.values, self.out
        if out.count(None) == self.nulls:
            self.count(new=0, existing=len(values) - self.nulls)
            return True
        # C-level passes over the rows (this runs once per DuckDB vector).
        pending = self.pending
        pending.update(compress(values, map(is_, out, repeat(None))))
        pending.pop(None, None)  # type: ignore[call-overload]
        if not all(map(isinstance, pending, repeat(str))):
            row = next(i for i, v in enumerate(values) if v is not None and not isinstance(v, str))
            raise InvalidValueError(self.spec.name, "is not text", row=row + 1,
                                    column=self.column)
        return False

    def groups(self, *, by: str) -> Groups:
        """Pending raw values grouped by match key (``by="match"``) or canonical form
        (``by="canonical"``): key -> (canonical, raw spellings). Several spellings may share
        one key."""
        raws = list(self.pending)
        try:
            normalized = _kinds.normalize_many(self.spec.kind, raws)
        except _kinds._Invalid as exc:
            raise InvalidValueError(self.spec.name, str(exc),
                                    row=self.values.index(raws[exc.index]) + 1,
                                    column=self.column) from None
        canonicals = list(map(_CANONICAL, normalized))
        keys = canonicals if by == "canonical" else list(map(_MATCH_KEY, normalized))
        out: Groups = dict(zip(keys, zip(canonicals, zip(raws), strict=True), strict=True))
        if len(out) == len(raws):
            return out  # one spelling per key (the common case): built in C-level passes
        several: dict[str, tuple[str, list[str]]] = {}
        for raw, (canonical, match_key) in zip(raws, normalized, strict=True):
            key = match_key if by == "match" else canonical
            entry = several.get(key)
            if entry is None:
                several[key] = (canonical, [raw])
            else:
                entry[1].append(raw)
        return dict(several)

    def rows(self, raws: list[str]) -> int:
        return sum(map(self.pending.__getitem__, raws))

    def refuse_misses(self, missing_raws: list[str]) -> None:
        """For a look-up-only principal: fail the batch (audited) if a value is unseen."""
        if self.mode == "lookup" and missing_raws:
            assert self.principal is not None
            missed = self.rows(missing_raws)
            present = len(self.values) - self.nulls
            row = min(map(self.values.index, missing_raws)) + 1
            raise self.gate.missed(self.principal, self.spec.domain, self.spec.name,
                                   existing=present - missed, missed=missed, row=row,
                                   query_id=self.query_id, host=self.host)

    def finish(self, cache: BoundedCache, groups: Groups,
               token_of: dict[str, str], *, new_raws: int) -> list[str | None]:
        """Fill the output from key -> token, remember the spellings, count for the audit."""
        if len(groups) == len(self.pending):  # one spelling per key: C-level passes
            learned = list(zip(map(_FIRST, map(_SPELLINGS, groups.values())),
                               map(token_of.__getitem__, groups), strict=True))
        else:
            learned = [(raw, token_of[key])
                       for key, (_canonical, spellings) in groups.items() for raw in spellings]
        cache.store(self.namespace, learned)
        # Every row's answer by one dict lookup: cached tokens, then the ones just learned.
        answer = dict(zip(self.values, self.out, strict=True))
        answer.update(learned)
        self.out = out = list(map(answer.get, self.values))
        present = len(self.values) - self.nulls
        self.count(new=new_raws, existing=present - new_raws)
        return out

    def count(self, *, new: int, existing: int) -> None:
        if self.principal is not None:
            self.gate.count_tokenize(self.principal, self.spec.domain, self.spec.name,
                                     new=new, existing=existing, query_id=self.query_id,
                                     host=self.host)


class VaultTokenService:
    """deid's own vault: convergent random tokens over a `VaultStore`.

    `cache_size` bounds the tokenize cache (raw value → token, per kind spec) and
    `detokenize_cache_size` the detokenize cache (token → value); 0 disables one. These, not
    the row count, bound the service's memory. `gate` checks the vault's policies and appends
    the audit log (one is made over the store when not given).

    Erasure and the caches: `forget` empties this service's caches. Another process's erasure
    is seen through the vault's erasure epoch: detokenize reads it on every call that would
    serve a value from the cache, so no cached value of an erased token is served once the
    erasure has committed; tokenize reads it at most every `erasure_check_s` seconds, so a
    long-lived process may hand out an erased value's old token for that long (the mart then
    holds an erased token, which ``deid erased`` and the ``deid.no_erased_tokens`` test
    report).
    """

    def __init__(self, store: VaultStore, *, cache_size: int = DEFAULT_CACHE_SIZE,
                 detokenize_cache_size: int = DEFAULT_CACHE_SIZE,
                 gate: Gate | None = None,
                 erasure_check_s: float = DEFAULT_ERASURE_CHECK_S) -> None:
        self.store = store
        self.keyring = store.keyring()
        self._token_cache = BoundedCache(cache_size)
        self._value_cache = BoundedCache(detokenize_cache_size)
        self.gate = gate or Gate(store)
        if self.gate.seal is None:
            self.gate.seal = self._seal
        self._erasure_check_s = erasure_check_s
        self._epoch: int | None = None
        self._epoch_checked = float("-inf")

    def _check_erasures(self, *, now: bool = False) -> bool:
        """Empty the caches if the vault erased something since the last look; True if so."""
        t = time.monotonic()
        if not now and t - self._epoch_checked < self._erasure_check_s:
            return False
        epoch = self.store.erasure_epoch()
        self._epoch_checked = t
        cleared = self._epoch is not None and epoch != self._epoch
        if cleared:
            self._token_cache.clear()
            self._value_cache.clear()
        self._epoch = epoch
        return cleared

    def _seal(self, prev: str, record: dict[str, Any]) -> str:
        return self.keyring.chain(prev, record)  # the keyring may be reloaded meanwhile

    # -- tokenize -------------------------------------------------------------------------

    def tokenize(self, kind: str, values: Sequence[str | None], *,
                 column: str | None = None, principal: str | None = None,
                 query_id: str | None = None, host: str | None = None) -> list[str | None]:
        self._check_erasures()
        batch = TokenizeBatch(kind, values, column=column, cache=self._token_cache,
                              gate=self.gate, principal=principal, query_id=query_id,
                              host=host)
        if batch.done():
            return batch.out
        by_match = batch.groups(by="match")
        tokens_by_match, minted = self._tokens_for(batch, by_match)
        new_raws = batch.rows(list(chain.from_iterable(
            map(_SPELLINGS, map(by_match.__getitem__, minted)))))
        return batch.finish(self._token_cache, by_match, tokens_by_match, new_raws=new_raws)

    def _insert(self, spec: _kinds.KindSpec, fingerprints: list[bytes], canonicals: list[str],
                tokens: list[str]) -> dict[bytes, str]:
        """Encrypt and insert new records; if the vault refuses the key version (rotated by
        another process since this one loaded its keys), reload the keys and encrypt again,
        for as long as each reload brings a newer version (rotations may follow each other
        faster than one retry: two of them a few milliseconds apart refused the retry too)."""
        while True:
            versions, blobs = _keys.encrypt_many(self.keyring, tokens, canonicals)
            records = NewRecords([spec.domain] * len(tokens), fingerprints, tokens,
                                 [spec.name] * len(tokens), versions, blobs)
            try:
                return self.store.insert_tokens(
                    records, random_tokens=spec.kind.random_bits >= _kinds.RANDOM_TOKEN_BITS)
            except StaleKeyVersionError:
                had = self.keyring.current
                self.keyring = self.store.reload_keyring()
                if self.keyring.current <= had:
                    raise VaultKeyError(
                        f"deid.tokenize: kind {spec.name!r}: the vault's current key version "
                        "is newer than any key this host can load; give it the vault's current "
                        "key file (or DEID_KEYS)") from None

    def _tokens_for(self, batch: TokenizeBatch, by_match: Groups
                    ) -> tuple[dict[str, str], list[str]]:
        """(match key -> token, the match keys whose token this call minted)."""
        spec = batch.spec
        missing = list(by_match)
        fps = self.keyring.fingerprints(spec.domain, missing)
        found = self.store.find_tokens(spec.domain, fps)
        result: dict[str, str] = {}
        if found:
            tokens = list(map(found.get, fps))
            # compress keeps the keys with a token: no None reaches the result
            result.update(compress(zip(missing, cast("list[str]", tokens), strict=True), tokens))
            absent = list(map(is_, tokens, repeat(None)))
            missing, fps = list(compress(missing, absent)), list(compress(fps, absent))
        if missing and batch.mode == "lookup":
            batch.refuse_misses([raw for m in missing for raw in by_match[m][1]])
        minted: list[str] = []
        for _attempt in range(_MAX_COLLISION_RETRIES):
            if not missing:
                return result, minted
            canonicals = list(map(_CANONICAL, map(by_match.__getitem__, missing)))
            fresh = spec.kind.new_tokens(len(missing), canonicals)
            won = list(map(self._insert(spec, fps, canonicals, fresh).get, fps))
            if won == fresh:  # every proposed token went in (no concurrent writer, no clash)
                result.update(zip(missing, fresh, strict=True))
                minted += missing
                return result, minted
            still, still_fps = [], []
            for m, fp, token, proposed in zip(missing, fps, won, fresh, strict=True):
                if token is None:
                    still.append(m)  # proposed token collided with another value's token
                    still_fps.append(fp)
                else:
                    result[m] = token
                    if token == proposed:
                        minted.append(m)  # ours, not a concurrent writer's
            missing, fps = still, still_fps
        raise VaultUnavailableError(
            f"deid.tokenize: kind {spec.name!r}: could not mint unique tokens after "
            f"{_MAX_COLLISION_RETRIES} attempts; the {spec.domain!r} domain's token space "
            "is nearly full (see the token format table)")

    # -- detokenize -----------------------------------------------------------------------

    def detokenize(self, tokens: Sequence[str | None], *, principal: str,
                   query_id: str | None = None, host: str | None = None) -> list[str | None]:
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        counts = Counter(tokens)  # the work below is per distinct token, not per row
        counts.pop(None, None)
        distinct = list(counts)
        values = self.detokenize_counted(distinct, list(counts.values()), principal=principal,
                                         query_id=query_id, host=host,
                                         first_row=partial(_first_row, tokens))
        if len(distinct) == len(tokens):  # no NULL and no repeat: already in row order
            return values  # type: ignore[return-value]
        answer = dict(zip(distinct, values, strict=True))
        return list(map(answer.get, tokens))

    def detokenize_counted(self, distinct: list[str], counts: Sequence[int], *, principal: str,
                           first_row: Callable[[list[Any]], int], query_id: str | None = None,
                           host: str | None = None) -> list[str]:
        """`detokenize` for a host that has already counted its batch: `distinct` holds each
        non-NULL token once and `counts[i]` the rows that hold `distinct[i]`; returns the
        values in the order of `distinct`. `first_row(bad)` is the 1-based row of the first
        of the `bad` tokens in the host's batch, for an error message that names no token.
        The same policy check, audit (rows, not distinct tokens) and erasure check."""
        cached = self._value_cache.lookup("values", distinct)
        missing = cached.count(None)
        # Before a cached value is served, ask the vault whether anything was erased since
        # (tokens not in the cache are read from the vault anyway, which knows).
        if missing < len(distinct) and self._check_erasures(now=True):
            cached, missing = [None] * len(distinct), len(distinct)
        need = list(compress(distinct, map(is_, cached, repeat(None)))) if missing else []
        kinds, malformed = _classify(distinct, counts, cached, need)
        self.gate.detokenize(principal, count=sum(counts), kinds=kinds, query_id=query_id,
                             host=host, rejected=bool(malformed))
        if malformed:
            raise UnknownTokenError(
                f"deid.detokenize: row {first_row(malformed)} of the batch is not a deid "
                "token (the input is not shown)")
        if not need:
            return cached  # type: ignore[return-value]
        if self._epoch is None:
            # The epoch later checks compare with must predate what this call caches.
            self._check_erasures(now=True)
        stored = self.store.fetch_values(need)
        if len(stored) < len(need):
            unknown = [t for t in need if t not in stored]
            erased = self.store.erased(unknown)
            if erased:
                raise ErasedTokenError(
                    f"deid.detokenize: row {first_row(list(erased))} of the batch holds a "
                    "token whose value was erased from the vault (deid forget); it can never "
                    "be detokenized again (not shown)")
            raise UnknownTokenError(
                f"deid.detokenize: row {first_row(unknown)} of the batch holds a token this "
                "vault never issued (forged, truncated, or from another vault; not shown)")
        fetched = self._decrypt_many(need, list(map(stored.__getitem__, need)))
        self._value_cache.store("values", list(zip(need, fetched, strict=True)))
        if missing == len(distinct):
            return fetched
        values: dict[str, str | None] = dict(zip(distinct, cached, strict=True))
        values.update(zip(need, fetched, strict=True))
        return list(map(values.__getitem__, distinct))  # type: ignore[arg-type]

    # -- erasure ----------------------------------------------------------------------------

    def forget(self, kind: str, *, values: Sequence[str] | None = None,
               tokens: Sequence[str] | None = None, principal: str) -> int:
        """Erase a person's values (or tokens) of one kind spec from the vault; return how
        many vault records were erased.

        By value: each value is normalized as `kind`, so any spelling that tokenize would
        have matched finds the record. By token: only tokens of `kind`'s domain are erased.
        Absent values, unknown and already-erased tokens count zero. The erasure is audited
        (principal, kind spec with its domain, count; never a value or a token). Who may
        call it is whoever holds the vault store itself (an administrator): no engine host
        exposes it.
        """
        spec = _kinds.parse_kind(kind)
        if (values is None) == (tokens is None):
            raise DeidError("deid forget: pass values or tokens (exactly one)")
        if values is not None:
            distinct = list(dict.fromkeys(values))
            for i, v in enumerate(distinct):
                if not isinstance(v, str):
                    raise InvalidValueError(spec.name, "is not text", row=i + 1)
            try:
                normalized = _kinds.normalize_many(spec.kind, distinct)
            except _kinds._Invalid as exc:
                raise InvalidValueError(spec.name, str(exc), row=exc.index + 1) from None
            match_keys = list(dict.fromkeys(m for _c, m in normalized))
            fps = self.keyring.fingerprints(spec.domain, match_keys)
            erased = self.store.erase(spec.domain, fps) if fps else []
        else:
            assert tokens is not None
            wanted = [t for t in dict.fromkeys(tokens) if isinstance(t, str)]
            erased = self.store.erase_tokens(spec.domain, wanted) if wanted else []
        # This process never serves what it just erased; others notice the epoch.
        self._token_cache.clear()
        self._value_cache.clear()
        self._epoch = None
        self._epoch_checked = float("-inf")
        n = len(erased)
        self.audit("forget", principal, "erased" if n else "nothing to erase", count=n,
                   kinds={f"{spec.name}:{spec.domain}": n})
        self.store.purge_erased()
        return n

    def erasures(self, since: str | None = None) -> Iterator[Erasure]:
        """Tombstones of tokens erased at or after `since` (ISO 8601 UTC), oldest first."""
        return self.store.erasures(since)

    def _decrypt_many(self, tokens: list[str], stored: list[StoredValue]) -> list[str]:
        """Decrypt a batch: one pass per key version (almost always one)."""
        versions = set(map(_KEY_VERSION, stored))
        if len(versions) == 1:
            (version,) = versions
            blobs = list(map(_CIPHERTEXT, stored))
            try:
                return _keys.decrypt_many(self.keyring, version, tokens, blobs)
            except VaultKeyError:
                if version in self.keyring.versions:
                    raise
                # Keys were rotated by another process since this one loaded them: reload.
        return [self._decrypt(t, v) for t, v in zip(tokens, stored, strict=True)]

    def _decrypt(self, token: str, value: StoredValue) -> str:
        try:
            return self.keyring.decrypt(token, value.key_version, value.ciphertext)
        except VaultKeyError:
            if value.key_version in self.keyring.versions:
                raise
            # Keys were rotated by another process since this one loaded them.
            reload = getattr(self.store, "reload_keyring", None)
            if reload is None:
                raise
            self.keyring = reload()
            return self.keyring.decrypt(token, value.key_version, value.ciphertext)

    def audit(self, action: str, principal: str, outcome: str, **fields: Any) -> None:
        """Append one record to the hash-chained audit log: `principal` is who acted; for a
        grant or revoke, `subject` is whom it concerns. Never pass values or tokens."""
        self.gate.append({"action": action, "principal": principal, "outcome": outcome,
                          **fields})

    def flush_audit(self) -> None:
        """Append the aggregated tokenize records now (hosts call it where a process may
        end without warning, e.g. after each Lambda invocation)."""
        self.gate.flush()

    # -- audit verification -----------------------------------------------------------------

    def verify_audit(self, head: Path | None = None,
                     audit_key: Path | None = None) -> dict[str, Any]:
        """Walk the chain; raise AuditChainError at the first record that does not verify,
        and, given a head file, when the log was truncated or re-chained since a checkpoint.
        `audit_key`: the auditor's key file of a forward-secure log (default: beside it)."""
        self.gate.flush()
        chain, finish = self.store.audit_verifier(self._seal, audit_key)
        result = _audit.verify(self.store.audit_records(), chain, head, finish)
        return {**result, "forward_secure": finish is not None}

    def checkpoint_audit(self, head: Path) -> dict[str, Any]:
        """Verify the log against `head` (if it exists yet), then append its current head."""
        result = self.verify_audit(head if head.exists() else None)
        return _audit.append_head(head, result["records"], result["head"])
