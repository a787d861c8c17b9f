"""The vault's policy check and audit append: one implementation for every token service.

Tokenize is an oracle: tokens are convergent, so whoever may tokenize can confirm a guess by
comparing a token it makes with one in a mart. The policy therefore gates tokenize too, per
principal and domain, deny by default:

- ``tokenize``: may mint tokens for values the vault has never seen (and look up the rest);
- ``lookup``: may only receive the tokens of values already in the vault; a batch holding an
  unseen value fails and is audited as a miss, and `deid audit show` flags principals whose
  lookups mostly miss.

Checks run once per batch, never per row, against rights cached per (principal, domain) for
`ttl_s` seconds. Tokenize calls are audited in aggregate: counts of new and existing values
per (principal, domain, kind, query id, host), appended at most every `flush_s` seconds, when
the service closes, at process exit, or when a host flushes (the Lambda host, per
invocation). Refusals and misses are appended at once. Records never hold a value or token.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from .errors import DeidError, PermissionDeniedError

MODES = ("tokenize", "lookup")
ALL_DOMAINS = "*"


class PolicyStore(Protocol):
    """What the gate needs from a vault store (deid's own stores implement it)."""

    def is_allowed(self, principal: str) -> bool: ...

    def tokenize_mode(self, principal: str, domain: str) -> str | None: ...

    def append_audit(self, record: dict[str, Any],
                     seal: Callable[[str, dict[str, Any]], str]) -> dict[str, Any]: ...


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def strongest(modes: list[str]) -> str | None:
    """Rights add up: a principal granted ``tokenize`` anywhere it applies may mint."""
    return "tokenize" if "tokenize" in modes else ("lookup" if "lookup" in modes else None)


_TallyKey = tuple[str, str, str, str | None, str | None]  # principal, domain, kind, query, host


class Gate:
    """Policy and audit over one store. `store` None: policy and audit are delegated (an
    external vault's own roles and log); every check passes and nothing is appended.

    `seal` chains records (the vault's audit key); a token service that owns the keys sets it
    when it is not given. `at_exit` appends what is still aggregated when the process ends.
    """

    def __init__(self, store: PolicyStore | None,
                 seal: Callable[[str, dict[str, Any]], str] | None = None, *,
                 ttl_s: float = 5.0, flush_s: float = 10.0, at_exit: bool = True,
                 extra: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.seal = seal
        self._ttl = ttl_s
        self._flush_s = flush_s
        self._extra = dict(extra or {})
        self._clock = clock
        self._lock = threading.Lock()
        self._modes: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._tally: dict[_TallyKey, list[Any]] = {}  # key -> [new, existing, since]
        self._oldest: float | None = None
        if store is not None and at_exit:
            atexit.register(_flush_at_exit, weakref.ref(self))

    # -- checks ---------------------------------------------------------------------------

    def tokenize_mode(self, principal: str, domain: str) -> str | None:
        if self.store is None:
            return "tokenize"
        key = (principal, domain)
        t = self._clock()
        hit = self._modes.get(key)
        if hit is not None and t - hit[0] < self._ttl:
            return hit[1]
        mode = self.store.tokenize_mode(principal, domain)
        self._modes[key] = (t, mode)
        return mode

    def refuse_tokenize(self, principal: str, domain: str, kind: str, count: int, *,
                        query_id: str | None, host: str | None) -> PermissionDeniedError:
        """Audit (at once) a principal with no tokenize right in the domain; the error to
        raise."""
        self.append({"action": "tokenize", "principal": principal, "outcome": "denied",
                     "domain": domain, "kinds": {kind: count}, "count": count,
                     "new": 0, "existing": 0, "missed": 0, "query_id": query_id,
                     "host": host})
        return PermissionDeniedError(
            f"deid.tokenize: permission denied: principal {principal!r} is not in the "
            f"vault's tokenize policy for domain {domain!r} (ask a vault admin: deid "
            f"grant --tokenize {principal} --domain {domain})")

    def missed(self, principal: str, domain: str, kind: str, *, existing: int, missed: int,
               row: int, query_id: str | None, host: str | None) -> PermissionDeniedError:
        """A look-up-only principal met values the vault never saw: audited at once."""
        self.append({"action": "tokenize", "principal": principal, "outcome": "missed",
                     "domain": domain, "kinds": {kind: existing + missed},
                     "count": existing + missed, "new": 0, "existing": existing,
                     "missed": missed, "query_id": query_id, "host": host})
        return PermissionDeniedError(
            f"deid.tokenize: principal {principal!r} may only look up existing tokens in "
            f"domain {domain!r}, and row {row} of the batch holds a value the vault has never "
            f"seen (not shown; {missed} such value(s) in the batch)")

    def detokenize(self, principal: str, *, count: int, kinds: Counter[str],
                   query_id: str | None, host: str | None, rejected: bool) -> None:
        """Check the detokenize policy (uncached: a revocation takes effect at once) and
        audit the batch; raise when the principal is not granted."""
        allowed = True if self.store is None else self.store.is_allowed(principal)
        outcome = "allowed" if allowed else "denied"
        if allowed and rejected:
            outcome = "rejected"
        if count or not allowed:  # an all-NULL batch reveals nothing: no record needed
            self.append({"action": "detokenize", "principal": principal, "outcome": outcome,
                         "count": count, "kinds": dict(sorted(kinds.items())),
                         "query_id": query_id, "host": host})
        if not allowed:
            raise PermissionDeniedError(
                f"deid.detokenize: permission denied: principal {principal!r} is not in the "
                "vault's detokenize policy (ask a vault admin: deid grant <principal>)")

    # -- audit ----------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        """Append one record to the hash-chained log. Never pass values or tokens."""
        if self.store is None:
            return
        if self.seal is None:
            raise DeidError("deid audit: no audit key to chain records with")
        self.store.append_audit({"at": now(), **record, **self._extra}, self.seal)

    def count_tokenize(self, principal: str, domain: str, kind: str, *, new: int,
                       existing: int, query_id: str | None, host: str | None) -> None:
        """Add a batch to the aggregate; append when the oldest count is `flush_s` old."""
        if self.store is None or not (new or existing):
            return
        t = self._clock()
        key = (principal, domain, kind, query_id, host)
        with self._lock:
            entry = self._tally.get(key)
            if entry is None:
                self._tally[key] = [new, existing, now()]
            else:
                entry[0] += new
                entry[1] += existing
            if self._oldest is None:
                self._oldest = t
            due = t - self._oldest >= self._flush_s
        if due:
            self.flush()

    def drain(self) -> list[dict[str, Any]]:
        """Take the aggregated tokenize records without appending them."""
        with self._lock:
            tally, self._tally, self._oldest = self._tally, {}, None
        return [{"action": "tokenize", "principal": p, "outcome": "allowed", "domain": d,
                 "kinds": {k: new + existing}, "count": new + existing, "new": new,
                 "existing": existing, "missed": 0, "since": since, "query_id": q, "host": h}
                for (p, d, k, q, h), (new, existing, since) in tally.items()]

    def flush(self) -> None:
        records = self.drain()
        for i, rec in enumerate(records):
            try:
                self.append(rec)
            except BaseException:
                with self._lock:  # keep what was not written for the next flush
                    for r in records[i:]:
                        key = (r["principal"], r["domain"], next(iter(r["kinds"])),
                               r["query_id"], r["host"])
                        self._tally.setdefault(key, [r["new"], r["existing"], r["since"]])
                raise


def _flush_at_exit(ref: weakref.ref[Gate]) -> None:
    gate = ref()
    if gate is None:
        return
    try:
        gate.flush()
    except (DeidError, OSError) as exc:
        # Nothing else can report it now; the message is value-free by contract.
        print(f"deid: tokenize audit records could not be written at exit: {exc}",
              file=sys.stderr)
