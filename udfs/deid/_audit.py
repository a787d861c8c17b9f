"""The audit log's record encoding, its verification and its head kept outside the vault.

One encoding for every store: a record is stored as canonical JSON (sorted keys, no spaces,
UTF-8 escapes as Python's json writes them) and read back by a parser that refuses duplicate
keys, then re-encoded and compared with the stored text. A record whose text names one field
twice (``{"principal": "x", "principal": "y"}``) would otherwise mean one thing to Python
(the last value) and another to SQL's ``json_extract`` (the first); it fails verification.

The chain proves order and integrity *inside* the log; it cannot prove the log's length: a
copy truncated after any record is itself a valid chain, and whoever holds the audit key can
re-chain what is left. A head checkpoint — (seq, hash) appended to a file the vault's
readers cannot rewrite — closes both: ``verify(head=…)`` fails when a checkpointed record is
missing (truncation) or has another hash (re-chained).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import AuditChainError

GENESIS = "0" * 64


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def encode(record: dict[str, Any]) -> str:
    """The stored text of a record: canonical JSON."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def decode(text: str, where: str) -> dict[str, Any]:
    """Parse a stored record strictly. Older vaults stored ``json.dumps(sort_keys=True)``
    with the default separators; both canonical spellings are accepted, nothing else."""
    try:
        record = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        raise AuditChainError(f"deid audit: {where} names the field {str(exc)!r} twice "
                              "(a forged record: readers would disagree on its value)") from None
    except ValueError:
        raise AuditChainError(f"deid audit: {where} is not a JSON record") from None
    if not isinstance(record, dict):
        raise AuditChainError(f"deid audit: {where} is not a JSON object")
    if text not in (encode(record), json.dumps(record, sort_keys=True)):
        raise AuditChainError(f"deid audit: {where} is not in canonical form (rewritten "
                              "outside deid)")
    return record


Chain = Callable[[str, dict[str, Any]], str]


# -- forward-secure sealing (the embedded vault) ---------------------------------------------
#
# Record n is sealed with K_n, and K_{n+1} = HMAC(K_n, label): the one-way step means whoever
# holds the vault's current signing state K_{n+1} (every process that appends) cannot compute
# K_1..K_n, so it cannot re-seal, re-chain or drop earlier records; and since the state moved
# past them, cutting the newest records off shows too. Only the auditor holds K_1 (a file of
# its own, not the key file a reader needs to detokenize).

_EVOLVE = b"deid audit key evolve v1"


def evolve(key: bytes) -> bytes:
    return hmac.digest(key, _EVOLVE, "sha256")


def seal_with(key: bytes, prev: str, record: dict[str, Any]) -> str:
    return hmac.new(key, prev.encode() + b"\n" + encode(record).encode(),
                    hashlib.sha256).hexdigest()


def key_at(first: bytes, seq: int) -> bytes:
    key = first
    for _ in range(seq - 1):
        key = evolve(key)
    return key


class ForwardChain:
    """Verifies forward-secure records from K_1, evolving the key once per record."""

    def __init__(self, first_key: bytes) -> None:
        self._first = first_key
        self._seq, self._key = 1, first_key

    def key(self, seq: int) -> bytes:
        if seq < self._seq:
            self._seq, self._key = 1, self._first
        while self._seq < seq:
            self._seq, self._key = self._seq + 1, evolve(self._key)
        return self._key

    def __call__(self, prev: str, record: dict[str, Any]) -> str:
        return seal_with(self.key(int(record["seq"])), prev, record)


def create_audit_key_file(path: Path) -> bytes:
    """K_1 for a new log: written 0600 once (an existing file is the log's key: reused)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_audit_key_file(path)
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"format": 1, "first_audit_key": base64.b64encode(key).decode()})
                 + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key


def read_audit_key_file(path: Path) -> bytes:
    try:
        doc = json.loads(path.read_text())
        key = base64.b64decode(doc["first_audit_key"], validate=True)
    except FileNotFoundError:
        raise AuditChainError(f"deid audit: the audit key file {path} is missing; pass the "
                              "auditor's copy with --audit-key") from None
    except (ValueError, KeyError, TypeError):
        raise AuditChainError(f"deid audit: {path} is not a deid audit key file") from None
    if len(key) != 32:
        raise AuditChainError(f"deid audit: {path} holds a key of the wrong size")
    return key


def verify(records: Iterable[dict[str, Any]], chain: Chain,
           head: Path | None = None,
           finish: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """Walk the chain; raise AuditChainError at the first record that does not verify, and
    (with `head`) when a checkpointed record is missing or differs. `finish(n, head_hash)`
    runs after the walk (a store's own end-of-log check)."""
    checkpoints = read_head(head) if head is not None else []
    expected = {c["seq"]: c["hash"] for c in checkpoints}
    prev, n = GENESIS, 0
    for rec in records:
        n += 1
        body = {k: v for k, v in rec.items() if k not in ("prev", "hash")}
        if rec["seq"] != n:
            raise AuditChainError(f"deid audit: record {n} is missing (found seq "
                                  f"{rec['seq']}): records were deleted")
        if rec["prev"] != prev:
            raise AuditChainError(f"deid audit: record {n} does not follow record {n - 1}")
        if chain(prev, body) != rec["hash"]:
            raise AuditChainError(f"deid audit: record {n} was altered (its hash does not "
                                  "verify)")
        if n in expected and expected[n] != rec["hash"]:
            raise AuditChainError(
                f"deid audit: record {n} differs from the head checkpoint in {head}: the log "
                "was rewritten and re-chained after that checkpoint was taken")
        prev = rec["hash"]
    if checkpoints and checkpoints[-1]["seq"] > n:
        raise AuditChainError(
            f"deid audit: the log ends at record {n} but the head checkpoint in {head} saw "
            f"record {checkpoints[-1]['seq']}: the log was truncated")
    if finish is not None:
        finish(n, prev)
    return {"records": n, "head": prev, "checkpoints": len(checkpoints)}


def read_head(path: Path) -> list[dict[str, Any]]:
    """The checkpoints of a head file (one canonical JSON object per line), oldest first."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise AuditChainError(f"deid audit: the head file {path} does not exist (take a "
                              "checkpoint first: deid audit checkpoint --head …)") from None
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        doc = decode(line, f"line {i} of the head file {path}")
        if not isinstance(doc.get("seq"), int) or not isinstance(doc.get("hash"), str):
            raise AuditChainError(f"deid audit: line {i} of the head file {path} has no "
                                  "seq and hash")
        if out and doc["seq"] < out[-1]["seq"]:
            raise AuditChainError(f"deid audit: line {i} of the head file {path} goes back "
                                  "in the log (the head file was edited)")
        out.append(doc)
    return out


def append_head(path: Path, seq: int, digest: str) -> dict[str, Any]:
    """Append one checkpoint. O_APPEND: on a file marked append-only (``chattr +a``) or on a
    write-once store, earlier checkpoints cannot be rewritten by whoever writes new ones."""
    doc = {"at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "hash": digest,
           "seq": seq}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (encode(doc) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return doc


def suspected_guessing(records: Iterable[dict[str, Any]], *, min_lookups: int = 20,
                       miss_ratio: float = 0.5) -> list[dict[str, Any]]:
    """Principals whose tokenize lookups mostly miss: someone testing guesses against the
    vault (a look-up-only principal, or a refused one), per principal over the whole log."""
    tally: dict[str, list[int]] = {}
    for rec in records:
        if rec.get("action") != "tokenize":
            continue
        t = tally.setdefault(str(rec.get("principal")), [0, 0])
        if rec.get("outcome") == "denied":  # refused outright: every value was a probe
            t[0] += int(rec.get("count", 0))
            t[1] += int(rec.get("count", 0))
            continue
        t[0] += int(rec.get("existing", 0)) + int(rec.get("missed", 0))
        t[1] += int(rec.get("missed", 0))
    return [{"principal": p, "lookups": n, "missed": m}
            for p, (n, m) in sorted(tally.items()) if n >= min_lookups and m >= miss_ratio * n]
