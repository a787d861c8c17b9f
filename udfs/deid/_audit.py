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

import datetime as _dt
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import DeidError

GENESIS = "0" * 64


class AuditChainError(DeidError):
    """The audit log does not verify: a record was altered, removed, reordered or forged."""


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


def verify(records: Iterable[dict[str, Any]], chain: Chain,
           head: Path | None = None) -> dict[str, Any]:
    """Walk the chain; raise AuditChainError at the first record that does not verify, and
    (with `head`) when a checkpointed record is missing or differs."""
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
    return {"records": n, "head": prev, "checkpoints": len(checkpoints)}


def read_head(path: Path) -> list[dict[str, Any]]:
    """The checkpoints of a head file (one canonical JSON object per line), oldest first."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise AuditChainError(f"deid audit: the head file {path} does not exist (take a "
                              "checkpoint first: deid audit checkpoint --head …)") from None
    out = []
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
