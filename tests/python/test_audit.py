"""The hash-chained audit log: attacks on its encoding, on its records and on its length."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from deid.errors import DeidError
from deid.service import VaultTokenService
from deid.stores.base import GENESIS


def _some_records(service: VaultTokenService, n: int = 3) -> list[str]:
    tokens = service.tokenize("email", ["a@example.com", "b@example.com"])
    service.store.grant("reader", "test")
    for i in range(n):
        service.detokenize(tokens, principal="reader", query_id=f"q{i}")
    return tokens


def test_attack_a_duplicated_key_does_not_verify(service: VaultTokenService,
                                                 vault_path: Path) -> None:
    """Attack: a record whose text names two principals verified as intact, while SQLite's
    json_extract (what an auditor's SQL reads) saw the other one."""
    _some_records(service, 1)
    db = sqlite3.connect(vault_path)
    (text,) = db.execute("select record from audit where seq = 1").fetchone()
    forged = '{"principal": "someone_else", ' + text[1:]  # Python's json keeps the last one
    db.execute("update audit set record = ? where seq = 1", (forged,))
    db.commit()
    assert db.execute("select json_extract(record, '$.principal') from audit where seq = 1"
                      ).fetchone() == ("someone_else",)
    db.close()
    with pytest.raises(DeidError, match="record 1"):
        service.verify_audit()


def test_attack_a_reader_deleting_its_records_and_rechaining_is_caught_by_the_head(
        service: VaultTokenService, vault_path: Path, tmp_path: Path) -> None:
    """Attack (DuckDB: the reader holds the key file, audit key included): delete your own
    records, re-chain the rest with the audit key, and verify says intact."""
    _some_records(service, 3)
    head_file = tmp_path / "audit-head.jsonl"
    service.checkpoint_audit(head_file)
    db = sqlite3.connect(vault_path)
    db.execute("delete from audit where seq = 2")
    rows = db.execute("select seq, record from audit order by seq").fetchall()
    db.execute("delete from audit")
    prev = GENESIS
    for new_seq, (_old, text) in enumerate(rows, start=1):
        record = {**json.loads(text), "seq": new_seq}
        digest = service.keyring.chain(prev, record)
        db.execute("insert into audit values (?, ?, ?, ?)",
                   (new_seq, json.dumps(record, sort_keys=True), prev, digest))
        prev = digest
    db.commit()
    db.close()
    assert service.verify_audit()["records"] == 2, "without a head the forgery verifies"
    with pytest.raises(DeidError, match="head"):
        service.verify_audit(head=head_file)


def test_attack_truncating_the_newest_records_is_caught_by_the_head(
        service: VaultTokenService, vault_path: Path, tmp_path: Path) -> None:
    _some_records(service, 3)
    head_file = tmp_path / "audit-head.jsonl"
    service.checkpoint_audit(head_file)
    db = sqlite3.connect(vault_path)
    db.execute("delete from audit where seq > 1")
    db.commit()
    db.close()
    assert service.verify_audit()["records"] == 1, "a truncated chain is still a chain"
    with pytest.raises(DeidError, match="truncated"):
        service.verify_audit(head=head_file)
