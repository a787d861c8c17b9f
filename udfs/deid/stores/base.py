"""The interface every deid vault backend implements (SQLite, PostgreSQL, DynamoDB).

A store keeps six things: the token index (domain + keyed fingerprint → token, unique on
both), the encrypted values (token → key version + AES-GCM blob), the tombstones of erased
tokens, the detokenize policy (principals), the tokenize policy (principal, domain, mode) and
the hash-chained audit log. It never sees a clear value or a key: the token service encrypts
and fingerprints before calling it. Every method takes and returns whole batches, because
each call may be a network round trip.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import Any, NamedTuple, overload

from .._audit import GENESIS
from ..errors import ConfigError, StaleKeyVersionError
from ..keys import Keyring


class NewRecord(NamedTuple):
    """One record to insert (a tuple: `NewRecords.of` turns a list of them into columns in
    C-level passes)."""

    domain: str
    fingerprint: bytes
    token: str
    kind: str
    key_version: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class StoredValue:
    key_version: int
    ciphertext: bytes


class NewRecords(Sequence[NewRecord]):
    """New records column by column: a token service's vector of thousands is six lists,
    not a tuple per record that the allocator builds and the garbage collector walks (a
    tuple subclass is never untracked). A store reads the columns; indexing or iterating
    gives `NewRecord`s, for stores that work record by record."""

    __slots__ = ("ciphertexts", "domains", "fingerprints", "key_versions", "kinds", "tokens")

    def __init__(self, domains: list[str], fingerprints: list[bytes], tokens: list[str],
                 kinds: list[str], key_versions: list[int], ciphertexts: list[bytes]) -> None:
        n = len(tokens)
        if not (len(domains) == len(fingerprints) == len(kinds) == len(key_versions)
                == len(ciphertexts) == n):
            raise ValueError("NewRecords: the columns differ in length")
        self.domains, self.fingerprints, self.tokens = domains, fingerprints, tokens
        self.kinds, self.key_versions, self.ciphertexts = kinds, key_versions, ciphertexts

    @classmethod
    def of(cls, records: Sequence[NewRecord]) -> NewRecords:
        if isinstance(records, NewRecords):
            return records
        if not records:
            return cls([], [], [], [], [], [])
        domains, fingerprints, tokens, kinds, versions, ciphertexts = map(
            list, zip(*records, strict=True))
        return cls(domains, fingerprints, tokens, kinds, versions, ciphertexts)

    def where(self, keep: Sequence[bool]) -> NewRecords:
        """The records at the positions `keep` marks."""
        def pick(column: list[Any]) -> list[Any]:
            return list(compress(column, keep))
        return NewRecords(pick(self.domains), pick(self.fingerprints), pick(self.tokens),
                          pick(self.kinds), pick(self.key_versions), pick(self.ciphertexts))

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[NewRecord]:
        return map(NewRecord, self.domains, self.fingerprints, self.tokens, self.kinds,
                   self.key_versions, self.ciphertexts)

    @overload
    def __getitem__(self, i: int) -> NewRecord: ...

    @overload
    def __getitem__(self, i: slice) -> NewRecords: ...

    def __getitem__(self, i: int | slice) -> NewRecord | NewRecords:
        if isinstance(i, slice):
            return NewRecords(self.domains[i], self.fingerprints[i], self.tokens[i],
                              self.kinds[i], self.key_versions[i], self.ciphertexts[i])
        return NewRecord(self.domains[i], self.fingerprints[i], self.tokens[i], self.kinds[i],
                         self.key_versions[i], self.ciphertexts[i])


def check_key_versions(current: int | None, records: Sequence[NewRecord]) -> int | None:
    """The rule every store applies inside the transaction that inserts `records`, against
    the vault's recorded current key version: a record under an older version is refused
    (StaleKeyVersionError: the writer loaded its keys before a rotation and must reload), so
    once a rotation is recorded no new record lands under an old version and a rewrap that
    starts afterwards can finish. Returns the newer version to record when the records carry
    one (keys from DEID_KEYS are rotated where that secret lives), else None."""
    versions = set(NewRecords.of(records).key_versions)
    if current is not None and min(versions) < current:
        raise StaleKeyVersionError(
            f"deid keys: values were encrypted under key version {min(versions)} but the "
            f"vault's current version is {current} (keys rotated by another process)")
    newest = max(versions)
    return newest if current is None or newest > current else None


@dataclass(frozen=True, slots=True)
class Erasure:
    """The tombstone of an erased token: what remains after its value and fingerprint are
    destroyed. It keeps the token reserved (never issued again) and lets detokenize tell
    "erased" from "unknown"; it holds nothing about the value."""

    token: str
    domain: str
    kind: str
    erased_at: str  # ISO 8601, UTC


# seal(prev_hash, record) -> hash of this record; provided by the token service (keyed).
Sealer = Callable[[str, dict[str, Any]], str]

__all__ = ["GENESIS", "NewRecord", "NewRecords", "Sealer", "StoredValue", "VaultStore"]


class VaultStore(ABC):
    """A vault backend. Implementations must be safe to share between threads."""

    url: str
    _keyring: Keyring | None = None
    # Shared by all stores of a process: loading keys is rare, and this keeps subclasses free
    # of set-up code for it.
    _keyring_lock = threading.Lock()

    def keyring(self) -> Keyring:
        """The vault's keys, loaded once (created on first use only while the vault holds no
        record)."""
        with self._keyring_lock:
            if self._keyring is None:
                self._keyring = self._load_keyring()
            return self._keyring

    def reload_keyring(self) -> Keyring:
        """Load the keys again (another process rotated them)."""
        with self._keyring_lock:
            self._keyring = self._load_keyring()
            return self._keyring

    @abstractmethod
    def _load_keyring(self) -> Keyring:
        """Read (or, for an empty vault, create) the keys and check they belong here."""

    def rotate_keyring(self, seen_current: int) -> tuple[Keyring, bool]:
        """Add a key version unless one newer than `seen_current` exists already; return the
        vault's key set and whether this call made the new version.

        Compare-and-swap: two concurrent rotations that both saw version N make one version
        N+1 between them, never two different keys for it. The vault then records N+1 as
        its current version, so every writer still encrypting under N is refused at its
        next insert (`check_key_versions`) and reloads."""
        raise ConfigError(f"deid keys: {type(self).__name__} keeps its keys elsewhere; rotate "
                          "them there (see the backend's documentation)")

    def retire_key_version(self, version: int) -> Keyring:
        """Remove key `version`; refused while any record is still encrypted under it."""
        raise ConfigError(f"deid keys: {type(self).__name__} keeps its keys elsewhere; retire "
                          "them there (see the backend's documentation)")

    def key_version_counts(self) -> dict[int, int]:
        """Records per key version."""
        return {int(v): n for v, n in self.stats()["key_versions"].items()}

    # -- token index and values --------------------------------------------------------

    @abstractmethod
    def find_tokens(self, domain: str, fingerprints: Sequence[bytes]) -> dict[bytes, str]:
        """Tokens already issued for these fingerprints (absent ones are left out)."""

    @abstractmethod
    def insert_tokens(self, records: Sequence[NewRecord], *,
                      random_tokens: bool = False) -> dict[bytes, str]:
        """Insert where the (domain, fingerprint) is new; return the token each fingerprint
        now has — the caller's, or a concurrent writer's that got there first.

        A fingerprint missing from the result means its proposed token collided with an
        existing token of another value: the caller retries it with a fresh token.
        All records of one call share a domain.

        `random_tokens`: every proposed token carries `kinds.RANDOM_TOKEN_BITS` (120) random
        bits, so one equal to any token ever issued (or erased) is less likely than guessing
        an AES-128 key: a store may skip looking the proposed tokens up on disk. It still
        checks them against what it holds in memory and in its batch, and a unique
        constraint still refuses a clash that reaches one.
        """

    @abstractmethod
    def fetch_values(self, tokens: Sequence[str]) -> dict[str, StoredValue]:
        """Encrypted values of the tokens this vault holds (unknown tokens are left out)."""

    @abstractmethod
    def iter_values(self, batch_size: int = 10_000) -> Iterator[list[tuple[str, StoredValue]]]:
        """Every (token, value) in batches: for rewrapping under a new key version."""

    @abstractmethod
    def update_values(self, rows: Sequence[tuple[str, StoredValue, StoredValue]]) -> int:
        """Rewrap: for each (token, old, new), replace the value only where it still is `old`
        (compare-and-swap: a record erased or rewrapped meanwhile is left alone); return how
        many were replaced."""

    # -- erasure (crypto-shredding) ---------------------------------------------------
    #
    # Erasing a token deletes its encrypted value and its fingerprint index entry in one
    # atomic step and leaves a tombstone (`Erasure`). Without the fingerprint entry the same
    # value gets a new random token next time; without the ciphertext nothing can recover
    # the value (backups aside, see README "Erasure"); the tombstone keeps the old token from
    # ever being issued again, which would make old mart rows resolve to someone else.
    # Every erase bumps the vault's erasure epoch, which long-lived token services poll to
    # drop cached values and tokens.

    @abstractmethod
    def erase(self, domain: str, fingerprints: Sequence[bytes]) -> list[Erasure]:
        """Erase the tokens these fingerprints map to in `domain`; return the tombstones
        written (absent fingerprints are left out)."""

    @abstractmethod
    def erase_tokens(self, domain: str, tokens: Sequence[str]) -> list[Erasure]:
        """Erase these tokens of `domain`; tokens that are unknown, already erased or of
        another domain are left out of the result."""

    @abstractmethod
    def record_erasures(self, erasures: Sequence[Erasure]) -> None:
        """Keep tombstones of tokens erased in an external vault (Skyflow), for its policy
        store: detokenize can then say "erased", and a token that vault issues again for
        another value is caught. Existing tombstones are kept."""

    def purge_erased(self) -> None:  # noqa: B027 - optional hook
        """Remove leftover copies of erased records from the store's own files (e.g. a
        write-ahead log); raise VaultUnavailableError if that cannot be done now. Runs after
        the erasure is committed and audited, so a retry is always safe."""

    @abstractmethod
    def erased(self, tokens: Sequence[str]) -> dict[str, Erasure]:
        """The tombstones among these tokens (cold path: only for tokens not found)."""

    @abstractmethod
    def erasures(self, since: str | None = None) -> Iterator[Erasure]:
        """Every tombstone erased at or after `since` (ISO 8601), oldest first."""

    @abstractmethod
    def erasure_epoch(self) -> int:
        """A number that changes whenever something is erased (one cheap read)."""

    # -- policy ----------------------------------------------------------------------

    @abstractmethod
    def grant(self, principal: str, granted_by: str) -> bool:
        """Allow `principal` to detokenize; False if it already was."""

    @abstractmethod
    def revoke(self, principal: str) -> bool:
        """Remove `principal` from the policy; False if it was not there."""

    @abstractmethod
    def principals(self) -> list[dict[str, str]]:
        """The policy: [{principal, granted_at, granted_by}]."""

    @abstractmethod
    def is_allowed(self, principal: str) -> bool:
        """Whether `principal` may detokenize."""

    @abstractmethod
    def grant_tokenize(self, principal: str, domain: str, mode: str, granted_by: str) -> bool:
        """Allow `principal` to tokenize in `domain` (``*``: every domain) with `mode`
        (``tokenize``: mint and look up; ``lookup``: existing tokens only); False if that
        grant already stood. A new mode replaces the old one for that domain."""

    @abstractmethod
    def revoke_tokenize(self, principal: str, domain: str) -> bool:
        """Remove `principal`'s tokenize grant for `domain`; False if there was none."""

    @abstractmethod
    def tokenize_grants(self) -> list[dict[str, str]]:
        """The tokenize policy: [{principal, domain, mode, granted_at, granted_by}]."""

    @abstractmethod
    def tokenize_mode(self, principal: str, domain: str) -> str | None:
        """The strongest mode granted to `principal` for `domain` or for every domain."""

    # -- audit ------------------------------------------------------------------------

    @abstractmethod
    def append_audit(self, record: dict[str, Any], seal: Sealer) -> dict[str, Any]:
        """Atomically append: set record["seq"] and record["prev"] from the current head,
        store it with hash = seal(prev, record), and return the stored record."""

    @abstractmethod
    def audit_records(self) -> Iterator[dict[str, Any]]:
        """All audit records in sequence order, each with seq, prev and hash."""

    def audit_verifier(self, seal: Sealer, audit_key: Path | None = None
                       ) -> tuple[Sealer, Callable[[int, str], None] | None]:
        """How to verify this store's log: (chain, end-of-log check or None). A store that
        seals with the vault's audit key (`seal`) needs nothing more."""
        return seal, None

    # -- introspection ------------------------------------------------------------------

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counts for `deid stats`: tokens per domain and kind, values per key version."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
