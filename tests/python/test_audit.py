"""The hash-chained audit log: attacks on its encoding, on its records and on its length.

The embedded vault seals forward-securely (the reader's processes hold only the current
signing state); deid's other stores seal with the vault's audit key, which their readers
cannot reach. `forward_audit=False` gives an SQLite vault of the second kind, to show what an
audit head outside the vault adds there.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from deid._audit import AuditChainError, seal_with
from deid.errors import DeidError
from deid.service import VaultTokenService
from deid.stores.base import GENESIS
from deid.stores.sqlite import SQLiteStore, audit_key_file_for


def _some_records(service: VaultTokenService, n: int = 3) -> list[str]:
    tokens = service.tokenize("email", ["a@example.com", "b@example.com"])
    service.store.grant("reader", "test")
    for i in range(n):
        service.detokenize(tokens, principal="reader", query_id=f"q{i}")
    return tokens


def _rechain_without(vault_path: Path, seq: int, seal) -> None:  # type: ignore[no-untyped-def]
    """What a reader with write access to the vault file does: delete a record, re-chain."""
    db = sqlite3.connect(vault_path)
    db.execute("delete from audit where seq = ?", (seq,))
    rows = db.execute("select seq, record from audit order by seq").fetchall()
    db.execute("delete from audit")
    prev = GENESIS
    for new_seq, (_old, text) in enumerate(rows, start=1):
        record = {**json.loads(text), "seq": new_seq}
        digest = seal(prev, record)
        db.execute("insert into audit values (?, ?, ?, ?)",
                   (new_seq, json.dumps(record, sort_keys=True), prev, digest))
        prev = digest
    db.commit()
    db.close()


@pytest.fixture
def legacy(vault_path: Path) -> VaultTokenService:
    """A vault sealed with the key file's audit key (how PostgreSQL and DynamoDB seal)."""
    return VaultTokenService(SQLiteStore(vault_path, create=True, forward_audit=False))


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
    with pytest.raises(DeidError, match="record 1 names the field 'principal' twice"):
        service.verify_audit()


def test_attack_a_reader_rechaining_with_the_key_file_fails_on_the_embedded_vault(
        service: VaultTokenService, vault_path: Path) -> None:
    """Attack (DuckDB: the reader holds the key file, audit key included): delete your own
    record and re-chain the rest. The forward-secure log was not sealed with that key, and
    the vault's current signing state cannot re-seal older records."""
    _some_records(service, 3)
    _rechain_without(vault_path, 2, service.keyring.chain)
    with pytest.raises(AuditChainError, match="record 1 was altered"):
        service.verify_audit()
    db = sqlite3.connect(vault_path)
    (state,) = db.execute("select value from meta where key = 'audit_state'").fetchone()
    db.close()
    current = bytes.fromhex(json.loads(state)["key"])
    _rechain_without(vault_path, 2, lambda prev, rec: seal_with(current, prev, rec))
    with pytest.raises(AuditChainError, match="record 1 was altered"):
        service.verify_audit()


def test_attack_truncation_fails_on_the_embedded_vault_without_a_head(
        service: VaultTokenService, vault_path: Path) -> None:
    _some_records(service, 3)
    db = sqlite3.connect(vault_path)
    db.execute("delete from audit where seq > 1")
    db.commit()
    db.close()
    with pytest.raises(AuditChainError, match="newest records were removed"):
        service.verify_audit()
    with pytest.raises(AuditChainError, match="records were removed"):
        _some_records(service, 1)  # and no process appends after the cut


def test_the_reader_needs_no_audit_key_and_the_auditor_keeps_it_elsewhere(
        service: VaultTokenService, vault_path: Path, tmp_path: Path) -> None:
    _some_records(service, 2)
    auditor_copy = tmp_path / "auditor" / "vault.audit-key"
    auditor_copy.parent.mkdir()
    audit_key_file_for(vault_path).rename(auditor_copy)
    reader = VaultTokenService(SQLiteStore(vault_path), cache_size=0)
    assert reader.detokenize(reader.tokenize("email", ["a@example.com"]),
                             principal="reader") == ["a@example.com"]
    assert reader.verify_audit(audit_key=auditor_copy)["records"] == 3
    with pytest.raises(AuditChainError, match="audit key file"):
        reader.verify_audit()


def test_attack_rechaining_a_key_sealed_log_is_caught_by_the_head(
        legacy: VaultTokenService, vault_path: Path, tmp_path: Path) -> None:
    """Where the audit key seals (PostgreSQL, DynamoDB, an older SQLite vault), whoever holds
    it can re-chain; a checkpoint kept outside the vault shows it."""
    _some_records(legacy, 3)
    head_file = tmp_path / "audit-head.jsonl"
    legacy.checkpoint_audit(head_file)
    _rechain_without(vault_path, 2, legacy.keyring.chain)
    assert legacy.verify_audit()["records"] == 2, "without a head the forgery verifies"
    with pytest.raises(AuditChainError, match="head"):
        legacy.verify_audit(head=head_file)


def test_attack_truncating_a_key_sealed_log_is_caught_by_the_head(
        legacy: VaultTokenService, vault_path: Path, tmp_path: Path) -> None:
    _some_records(legacy, 3)
    head_file = tmp_path / "audit-head.jsonl"
    legacy.checkpoint_audit(head_file)
    db = sqlite3.connect(vault_path)
    db.execute("delete from audit where seq > 1")
    db.commit()
    db.close()
    assert legacy.verify_audit()["records"] == 1, "a truncated chain is still a chain"
    with pytest.raises(AuditChainError, match="truncated"):
        legacy.verify_audit(head=head_file)


def test_a_head_file_edited_backwards_is_refused(legacy: VaultTokenService,
                                                 tmp_path: Path) -> None:
    _some_records(legacy, 2)
    head_file = tmp_path / "audit-head.jsonl"
    legacy.checkpoint_audit(head_file)
    [line] = head_file.read_text().splitlines()
    earlier = json.dumps({**json.loads(line), "seq": 1}, sort_keys=True, separators=(",", ":"))
    head_file.write_text(f"{line}\n{earlier}\n")
    with pytest.raises(AuditChainError, match="goes back"):
        legacy.verify_audit(head=head_file)
