"""The token service: batch in, batch out. Every engine host calls only this.

``tokenize(kind, values)`` normalizes each value, fingerprints it under the vault's key,
looks the fingerprint up, and mints a random token (with its value encrypted) only for
fingerprints never seen. ``detokenize(tokens, principal)`` checks the vault policy, audits,
then decrypts. Both fail whole: one bad row fails the batch, so a query (and the dbt model
that runs it) fails instead of storing a NULL, a raw value or an error string.
"""

from __future__ import annotations

import datetime as _dt
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from . import kinds as _kinds
from ._cache import BoundedCache
from .errors import (
    DeidError,
    InvalidValueError,
    PermissionDeniedError,
    StaleKeyVersionError,
    UnknownTokenError,
    VaultKeyError,
    VaultUnavailableError,
)
from .stores import GENESIS, NewRecord, StoredValue, VaultStore

DEFAULT_CACHE_SIZE = 1_000_000
_MAX_COLLISION_RETRIES = 8


def _first_row(tokens: list[str | None], bad: list[Any]) -> int:
    """1-based row of the first bad token, for an error message that names no token."""
    wanted = set(bad)
    return next(i for i, t in enumerate(tokens) if t in wanted) + 1


class TokenService(Protocol):
    """What a UDF host needs. Implemented by `VaultTokenService` and by external vaults."""

    def tokenize(self, kind: str, values: Sequence[str | None], *,
                 column: str | None = None) -> list[str | None]: ...

    def detokenize(self, tokens: Sequence[str | None], *, principal: str,
                   query_id: str | None = None, host: str | None = None) -> list[str | None]: ...


class VaultTokenService:
    """deid's own vault: convergent random tokens over a `VaultStore`.

    `cache_size` bounds the tokenize cache (raw value → token, per kind spec) and
    `detokenize_cache_size` the detokenize cache (token → value); 0 disables one. These, not
    the row count, bound the service's memory.
    """

    def __init__(self, store: VaultStore, *, cache_size: int = DEFAULT_CACHE_SIZE,
                 detokenize_cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.store = store
        self.keyring = store.keyring()
        self._token_cache = BoundedCache(cache_size)
        self._value_cache = BoundedCache(detokenize_cache_size)

    # -- tokenize -------------------------------------------------------------------------

    def tokenize(self, kind: str, values: Sequence[str | None], *,
                 column: str | None = None) -> list[str | None]:
        spec = _kinds.parse_kind(kind)
        values = values if isinstance(values, list) else list(values)
        # One cache namespace per domain and kind: a value has one token per domain.
        namespace = (spec.domain, spec.name)
        out = self._token_cache.lookup(namespace, values)
        if out.count(None) == values.count(None):
            return out  # every non-NULL value was cached: the steady-state fast path
        pending: dict[str, list[int]] = {}
        for i, (v, t) in enumerate(zip(values, out, strict=True)):
            if t is None and v is not None:
                pending.setdefault(v, []).append(i)
        if any(not isinstance(v, str) for v in pending):
            row = next(i for i, v in enumerate(values) if v is not None and not isinstance(v, str))
            raise InvalidValueError(spec.name, "is not text", row=row + 1, column=column)

        # Normalize every distinct raw value; several spellings may share one match key.
        raws = list(pending)
        try:
            normalized = _kinds.normalize_many(spec.kind, raws)
        except _kinds._Invalid as exc:
            raise InvalidValueError(spec.name, str(exc), row=pending[raws[exc.index]][0] + 1,
                                    column=column) from None
        by_match: dict[str, tuple[str, list[str]]] = {}  # match_key -> (canonical, raw values)
        for raw, (canonical, match_key) in zip(raws, normalized, strict=True):
            entry = by_match.get(match_key)
            if entry is None:
                by_match[match_key] = (canonical, [raw])
            else:
                entry[1].append(raw)

        tokens_by_match = self._tokens_for(spec, by_match)
        learned = []
        for match_key, (_canonical, spellings) in by_match.items():
            token = tokens_by_match[match_key]
            for raw in spellings:
                learned.append((raw, token))
                for i in pending[raw]:
                    out[i] = token
        self._token_cache.store(namespace, learned)
        return out

    def _insert(self, spec: _kinds.KindSpec, fingerprints: list[bytes], canonicals: list[str],
                tokens: list[str]) -> dict[bytes, str]:
        """Encrypt and insert new records; if the vault refuses the key version (rotated by
        another process since this one loaded its keys), reload the keys and encrypt again."""
        for reloaded in (False, True):
            ring = self.keyring
            records = [NewRecord(spec.domain, fp, token, spec.name, *ring.encrypt(token, canonical))
                       for fp, canonical, token in zip(fingerprints, canonicals, tokens,
                                                       strict=True)]
            try:
                return self.store.insert_tokens(records)
            except StaleKeyVersionError:
                if reloaded:
                    raise VaultKeyError(
                        f"deid.tokenize: kind {spec.name!r}: the vault's current key version "
                        "is newer than any key this host can load; give it the vault's current "
                        "key file (or DEID_KEYS)") from None
                self.keyring = self.store.reload_keyring()
        raise AssertionError("unreachable")  # pragma: no cover

    def _tokens_for(self, spec: _kinds.KindSpec,
                    by_match: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
        ring = self.keyring
        fp_of = dict(zip(by_match, ring.fingerprints(spec.domain, list(by_match)), strict=True))
        found = self.store.find_tokens(spec.domain, list(fp_of.values()))
        result = {m: found[fp] for m, fp in fp_of.items() if fp in found}
        missing = [m for m in by_match if m not in result]
        for _attempt in range(_MAX_COLLISION_RETRIES):
            if not missing:
                return result
            canonicals = [by_match[m][0] for m in missing]
            fresh = spec.kind.new_tokens(len(missing), canonicals)
            winners = self._insert(spec, [fp_of[m] for m in missing], canonicals, fresh)
            still = []
            for m in missing:
                token = winners.get(fp_of[m])
                if token is None:
                    still.append(m)  # proposed token collided with another value's token
                else:
                    result[m] = token
            missing = still
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
        values = dict(zip(distinct, self._value_cache.lookup("values", distinct), strict=True))
        kinds: Counter[str] = Counter()
        malformed = []
        for t, n in counts.items():
            # A cached token was validated when it was fetched: only its kind is needed.
            k = _kinds.kind_of_token(t, validate=values[t] is None) \
                if isinstance(t, str) else None
            if k is None:
                malformed.append(t)
            else:
                kinds[k.name] += n
        allowed = self.store.is_allowed(principal)
        outcome = "allowed" if allowed else "denied"
        if allowed and malformed:
            outcome = "rejected"
        if counts or not allowed:  # an all-NULL batch reveals nothing: no record needed
            self.audit("detokenize", principal, outcome, count=sum(counts.values()),
                       kinds=kinds, query_id=query_id, host=host)
        if not allowed:
            raise PermissionDeniedError(
                f"deid.detokenize: permission denied: principal {principal!r} is not in the "
                "vault's detokenize policy (ask a vault admin: deid grant <principal>)")
        if malformed:
            raise UnknownTokenError(
                f"deid.detokenize: row {_first_row(tokens, malformed)} of the batch is not a "
                "deid token (the input is not shown)")

        need = [t for t, v in values.items() if v is None]
        if need:
            stored = self.store.fetch_values(need)
            unknown = [t for t in need if t not in stored]
            if unknown:
                raise UnknownTokenError(
                    f"deid.detokenize: row {_first_row(tokens, unknown)} of the batch holds a "
                    "token this vault never issued (forged, truncated, or from another vault; "
                    "not shown)")
            fetched = [(t, self._decrypt(t, stored[t])) for t in need]
            values.update(fetched)
            self._value_cache.store("values", fetched)
        return list(map(values.get, tokens))

    def _decrypt(self, token: str, value: StoredValue) -> str:
        try:
            return self.keyring.decrypt(token, value.key_version, value.ciphertext)
        except VaultKeyError:
            if value.key_version in self.keyring.keys:
                raise
            # Keys were rotated by another process since this one loaded them.
            reload = getattr(self.store, "reload_keyring", None)
            if reload is None:
                raise
            self.keyring = reload()
            return self.keyring.decrypt(token, value.key_version, value.ciphertext)

    def audit(self, action: str, principal: str, outcome: str, *, count: int = 0,
              kinds: Counter[str] | None = None, query_id: str | None = None,
              host: str | None = None) -> None:
        """Append one record to the hash-chained audit log. Never pass values or tokens."""
        record = {
            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "action": action,
            "principal": principal,
            "outcome": outcome,
            "count": count,
            "kinds": dict(sorted((kinds or {}).items())),
            "query_id": query_id,
            "host": host,
        }
        self.store.append_audit(record, self.keyring.chain)

    # -- audit verification -----------------------------------------------------------------

    def verify_audit(self) -> dict[str, Any]:
        """Walk the chain; raise DeidError at the first record that does not verify."""
        prev, n = GENESIS, 0
        for rec in self.store.audit_records():
            n += 1
            body = {k: v for k, v in rec.items() if k not in ("prev", "hash")}
            if rec["seq"] != n:
                raise DeidError(f"deid audit: record {n} is missing (found seq {rec['seq']}): "
                                "records were deleted")
            if rec["prev"] != prev:
                raise DeidError(f"deid audit: record {n} does not follow record {n - 1}")
            if self.keyring.chain(prev, body) != rec["hash"]:
                raise DeidError(f"deid audit: record {n} was altered (its hash does not verify)")
            prev = rec["hash"]
        return {"records": n, "head": prev}
