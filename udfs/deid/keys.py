"""Vault keys: the fingerprint key, the audit-chain key and versioned value-encryption keys.

- ``fingerprint_key`` (HMAC-SHA256) makes tokens convergent: the index maps
  HMAC(fingerprint_key, domain, match key) to a token. It is never rotated, because a new one
  would give every value a new fingerprint and so a new token.
- ``keys`` are AES-256-GCM keys by version; ``current`` encrypts new values. Rotation adds a
  version, so tokens stay and every old value stays readable; ``deid keys rewrap`` moves old
  records to the current version so an old key can then be retired.
- ``audit_key`` (HMAC-SHA256) chains audit records so that an edit or a deletion in the middle
  of the log is detected by ``deid audit verify``.

Keys come from ``DEID_KEYS`` (the key file's JSON, for hosts with a secret manager; the host
reads it into `deid.vault.VaultConfig` and the store passes it here) or from a key file
beside the vault, created 0600 on first use. A key set never meets a vault it does
not belong to: the vault stores a check value of the fingerprint key and refuses others.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, VaultKeyError

_FORMAT = 1
_NONCE = 12
_TAMPERED = "deid keys: a vault record failed authentication (tampered record or wrong key)"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise VaultKeyError(f"deid keys: {what} is not valid base64") from None
    if len(raw) != 32:
        raise VaultKeyError(f"deid keys: {what} must be 32 bytes, got {len(raw)}")
    return raw


class Keyring(Protocol):
    """What the token service, the CLI and the stores use of a vault's keys.

    Two implementations: `FileKeyring` (the key material itself: a key file, ``DEID_KEYS``
    or a PostgreSQL keyring row) and `deid.stores.dynamodb.KmsKeyring` (keys KMS-wrapped in
    the vault table, each unwrapped on first use under its own encryption context).
    """

    @property
    def source(self) -> str:
        """Where the keys come from, for messages (a path, ``DEID_KEYS``, ``kms:<key>``)."""

    @property
    def current(self) -> int:
        """The key version that encrypts new values (0: none chosen yet)."""

    @property
    def versions(self) -> list[int]:
        """The key versions this keyring holds (or has loaded), ascending."""

    def check_value(self) -> str:
        """Identifies the fingerprint key without revealing it; stored in the vault."""

    def fingerprints(self, domain: str, match_keys: list[str]) -> list[bytes]:
        """HMAC-SHA256(fingerprint key, domain NUL match key) for each match key."""

    def encrypt(self, token: str, canonical: str) -> tuple[int, bytes]:
        """(key version, nonce ‖ ciphertext) bound to the token."""

    def decrypt(self, token: str, version: int, blob: bytes) -> str:
        """The value; VaultKeyError for a missing version or a record that fails to verify."""

    def chain(self, prev_hash: str, record: dict[str, Any]) -> str:
        """The audit chain's hash of `record` after `prev_hash`."""


# -- the cryptography, shared by every Keyring --------------------------------------------


def check_value_of(fingerprint_key: bytes) -> str:
    return hmac.new(fingerprint_key, b"deid key check v1", hashlib.sha256).hexdigest()


# fingerprint key -> its HMAC inner and outer SHA-256 states (a process holds one or two keys)
_HMAC_PADS: dict[bytes, tuple[Any, Any]] = {}


def fingerprints_under(fingerprint_key: bytes, domain: str, match_keys: list[str]) -> list[bytes]:
    """HMAC-SHA256(fingerprint_key, domain NUL match_key) for each key (batch: hot path).

    RFC 2104 with the key's inner and outer pads hashed once per key (and the domain once
    per batch): per value, two copies of a SHA-256 state instead of hmac.digest's key set-up,
    a third of its cost. The tests check the output against hmac.digest.
    """
    pads = _HMAC_PADS.get(fingerprint_key)
    if pads is None:
        if len(_HMAC_PADS) >= 8:
            _HMAC_PADS.clear()
        key = fingerprint_key if len(fingerprint_key) <= 64 else hashlib.sha256(
            fingerprint_key).digest()
        padded = key.ljust(64, b"\x00")
        pads = _HMAC_PADS[fingerprint_key] = (hashlib.sha256(bytes(b ^ 0x36 for b in padded)),
                                              hashlib.sha256(bytes(b ^ 0x5C for b in padded)))
    inner, outer = pads
    inner = inner.copy()
    inner.update(domain.encode() + b"\x00")
    new_inner, new_outer = inner.copy, outer.copy
    out = []
    for m in match_keys:
        i = new_inner()
        i.update(m.encode("utf-8", "surrogatepass"))
        o = new_outer()
        o.update(i.digest())
        out.append(o.digest())
    return out


def encrypt_under(aead: AESGCM, version: int, token: str, canonical: str) -> tuple[int, bytes]:
    """(version, nonce ‖ ciphertext), bound to the token so records cannot be swapped."""
    return version, encrypt_many_under(aead, version, [token], [canonical])[0]


def encrypt_many_under(aead: AESGCM, version: int, tokens: list[str],
                       canonicals: list[str]) -> list[bytes]:
    """`encrypt_under` over a batch (hot path), byte for byte the same format: one urandom
    call for every nonce, the AAD prefix built once, the cipher's method bound once."""
    pool = os.urandom(_NONCE * len(tokens))
    nonces = [pool[i : i + _NONCE] for i in range(0, len(pool), _NONCE)]
    enc, prefix = aead.encrypt, _aad_prefix(version)
    return [n + enc(n, c.encode("utf-8", "surrogatepass"), (prefix + t).encode())
            for n, t, c in zip(nonces, tokens, canonicals, strict=True)]


def decrypt_many_under(aead: AESGCM | None, version: int, tokens: list[str],
                       blobs: list[bytes], source: str) -> list[str]:
    """`decrypt_under` over a batch of records under one key version (hot path)."""
    if aead is None:
        raise _missing_version(version, source)
    dec, prefix = aead.decrypt, _aad_prefix(version)
    try:
        return [dec(b[:_NONCE], b[_NONCE:], (prefix + t).encode()).decode("utf-8", "surrogatepass")
                for t, b in zip(tokens, blobs, strict=True)]
    except InvalidTag:
        raise VaultKeyError(_TAMPERED) from None


def _missing_version(version: int, source: str) -> VaultKeyError:
    return VaultKeyError(f"deid keys: key version {version} is not in {source}; "
                         "restore it (rotation keeps old versions for this reason)")


def decrypt_under(aead: AESGCM | None, version: int, token: str, blob: bytes,
                  source: str) -> str:
    return decrypt_many_under(aead, version, [token], [blob], source)[0]


def chain_under(audit_key: bytes, prev_hash: str, record: dict[str, Any]) -> str:
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(audit_key, prev_hash.encode() + b"\n" + body, hashlib.sha256).hexdigest()


@dataclass
class FileKeyring:
    """The key material of one vault, held in memory: read from a key file, ``DEID_KEYS`` or
    a PostgreSQL keyring row. Build with `generate()` or `from_json()`."""

    fingerprint_key: bytes
    audit_key: bytes
    keys: dict[int, bytes]
    current: int
    source: str = "memory"
    _aead: dict[int, AESGCM] = field(default_factory=dict, repr=False)
    _hmac_pads: tuple[bytes, Any, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise VaultKeyError(f"deid keys: current version {self.current} has no key")
        self._aead = {v: AESGCM(k) for v, k in self.keys.items()}

    def __repr__(self) -> str:  # never print key material
        return (f"FileKeyring(versions={self.versions}, current={self.current}, "
                f"source={self.source!r})")

    @property
    def versions(self) -> list[int]:
        return sorted(self.keys)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def generate(cls, source: str = "memory") -> FileKeyring:
        return cls(secrets.token_bytes(32), secrets.token_bytes(32), {1: secrets.token_bytes(32)},
                   1, source)

    @classmethod
    def from_json(cls, text: str, source: str) -> FileKeyring:
        try:
            doc = json.loads(text)
            if doc.get("format") != _FORMAT:
                raise VaultKeyError(
                    f"deid keys: {source} has unsupported format {doc.get('format')!r}")
            keys = {int(v): _unb64(k, f"key version {v}") for v, k in doc["keys"].items()}
            return cls(_unb64(doc["fingerprint_key"], "fingerprint_key"),
                       _unb64(doc["audit_key"], "audit_key"), keys, int(doc["current"]), source)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise VaultKeyError(f"deid keys: {source} is not a deid key set (JSON with format, "
                                "fingerprint_key, audit_key, keys, current)") from None

    def to_json(self) -> str:
        return json.dumps({
            "format": _FORMAT,
            "fingerprint_key": _b64(self.fingerprint_key),
            "audit_key": _b64(self.audit_key),
            "current": self.current,
            "keys": {str(v): _b64(k) for v, k in sorted(self.keys.items())},
        }, indent=2) + "\n"

    def rotated(self) -> FileKeyring:
        """A copy with a new current encryption key; fingerprint and audit keys unchanged."""
        version = max(self.keys) + 1
        keys = {**self.keys, version: secrets.token_bytes(32)}
        return FileKeyring(self.fingerprint_key, self.audit_key, keys, version, self.source)

    def without(self, version: int) -> FileKeyring:
        """A copy without key `version` (retired); the current version cannot be retired."""
        if version == self.current:
            raise VaultKeyError(f"deid keys: version {version} is the current key; rotate first")
        if version not in self.keys:
            raise VaultKeyError(f"deid keys: version {version} is not in {self.source}")
        keys = {v: k for v, k in self.keys.items() if v != version}
        return FileKeyring(self.fingerprint_key, self.audit_key, keys, self.current, self.source)

    # -- use (the Keyring protocol) -------------------------------------------------------

    def check_value(self) -> str:
        return check_value_of(self.fingerprint_key)

    def fingerprints(self, domain: str, match_keys: list[str]) -> list[bytes]:
        return fingerprints_under(self.fingerprint_key, domain, match_keys)

    def encrypt(self, token: str, canonical: str) -> tuple[int, bytes]:
        return encrypt_under(self._aead[self.current], self.current, token, canonical)

    def decrypt(self, token: str, version: int, blob: bytes) -> str:
        return decrypt_under(self._aead.get(version), version, token, blob, self.source)

    def chain(self, prev_hash: str, record: dict[str, Any]) -> str:
        return chain_under(self.audit_key, prev_hash, record)


def _aad_prefix(version: int) -> str:
    """A record's associated data is ``(_aad_prefix(v) + token).encode()``: the ciphertext is
    bound to its token and key version."""
    return f"deid:v{version}:"


def encrypt_many(ring: Keyring, tokens: list[str], canonicals: list[str]
                 ) -> tuple[list[int], list[bytes]]:
    """`ring.encrypt` over a batch: (key version per record, nonce ‖ ciphertext per record).
    Key material held in memory takes the batch path; any other keyring (KMS-wrapped keys
    may change version mid-batch) encrypts record by record."""
    if isinstance(ring, FileKeyring):
        v = ring.current
        return [v] * len(tokens), encrypt_many_under(ring._aead[v], v, tokens, canonicals)
    pairs = [ring.encrypt(t, c) for t, c in zip(tokens, canonicals, strict=True)]
    return [v for v, _ in pairs], [b for _, b in pairs]


def decrypt_many(ring: Keyring, version: int, tokens: list[str], blobs: list[bytes]) -> list[str]:
    """`ring.decrypt` over a batch of records under one key version."""
    if isinstance(ring, FileKeyring):
        return decrypt_many_under(ring._aead.get(version), version, tokens, blobs, ring.source)
    return [ring.decrypt(t, version, b) for t, b in zip(tokens, blobs, strict=True)]


# ---------------------------------------------------------------------------------------
# sources


_lock = threading.Lock()


def key_file_for(vault_path: Path) -> Path:
    return vault_path.with_name(vault_path.name + ".keys")


def load_or_create(key_file: Path, *, create: bool, keys: str | None = None) -> FileKeyring:
    """`keys` (``DEID_KEYS``, read by the host at its edge) when given; else read the key file,
    or create it (0600, atomically, race-safe) when `create` is set.

    Creation is decided by the caller: only a vault that holds no records yet may get new
    keys. Otherwise a lost key file would silently start a second, divergent token space.
    """
    if keys:
        return FileKeyring.from_json(keys, "DEID_KEYS")
    with _lock:
        try:
            return _read_key_file(key_file)
        except FileNotFoundError:
            if not create:
                raise VaultKeyError(
                    f"deid keys: key file {key_file} is missing and the vault already holds "
                    "records; restore the key file or set DEID_KEYS (refusing to create new "
                    "keys, which would mint different tokens)") from None
        ring = FileKeyring.generate(str(key_file))
        write_key_file(key_file, ring, exclusive=True)
        # Another process may have won the race: whatever is on disk is the vault's key set.
        return _read_key_file(key_file)


@contextlib.contextmanager
def key_file_lock(key_file: Path) -> Iterator[None]:
    """An exclusive lock beside the key file, across processes: rotations and retirements of
    one vault's keys run one at a time, each reading the file as it is under the lock (a
    read-modify-write without it let two rotations write two different version 2 keys)."""
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_file.with_name(key_file.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_key_file(key_file: Path) -> FileKeyring:
    """The key set on disk now (not a process's copy)."""
    try:
        return _read_key_file(key_file)
    except FileNotFoundError:
        raise VaultKeyError(f"deid keys: key file {key_file} is missing") from None


def _read_key_file(key_file: Path) -> FileKeyring:
    """The key file's keys; FileNotFoundError when there is none (the caller decides)."""
    try:
        st = key_file.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise VaultKeyError(
                f"deid keys: key file {key_file} is readable by group or others; "
                f"run: chmod 600 {key_file}")
        text = key_file.read_text()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise VaultKeyError(f"deid keys: key file {key_file} cannot be read ({exc.strerror}); "
                            "give this process read access to it (mode 600, owned by the "
                            "user the host runs as)") from None
    return FileKeyring.from_json(text, str(key_file))


def write_key_file(key_file: Path, ring: FileKeyring, *, exclusive: bool) -> None:
    """Write via a 0600 temp file; `exclusive` links it in only if no file exists yet."""
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise VaultKeyError(f"deid keys: cannot write the key file {key_file} "
                            f"({exc.strerror}); give this process write access to its "
                            "directory") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(ring.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, key_file)
        else:
            os.replace(tmp, key_file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def require_file_source(ring: Keyring) -> Path:
    if ring.source in ("DEID_KEYS", "memory"):
        raise ConfigError("deid keys: keys come from DEID_KEYS; rotate them where that secret "
                          "is kept (add a version, set current) and restart the hosts")
    return Path(ring.source)
