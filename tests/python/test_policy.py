"""The vault's tokenize policy and the one gate every token service checks and audits through."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deid._policy import Gate
from deid.errors import PermissionDeniedError
from deid.service import VaultTokenService
from deid.stores.sqlite import SQLiteStore

EMAILS = [f"person{i}@example.com" for i in range(50)]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class CountingStore(SQLiteStore):
    mode_reads = 0

    def tokenize_mode(self, principal: str, domain: str) -> str | None:
        self.mode_reads += 1
        return super().tokenize_mode(principal, domain)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def svc(vault_path: Path, clock: Clock) -> VaultTokenService:
    store = CountingStore(vault_path, create=True)
    return VaultTokenService(store, cache_size=0, gate=Gate(store, clock=clock))


def tokenize_records(svc: VaultTokenService) -> list[dict]:
    svc.flush_audit()
    return [r for r in svc.store.audit_records() if r["action"] == "tokenize"]


def test_tokenize_is_denied_by_default_and_the_refusal_is_audited(svc: VaultTokenService) -> None:
    with pytest.raises(PermissionDeniedError, match="'analyst' is not in the vault's tokenize"):
        svc.tokenize("email", EMAILS[:3], principal="analyst", query_id="q1")
    assert svc.store.stats()["tokens"] == {}
    [rec] = tokenize_records(svc)
    assert (rec["principal"], rec["outcome"], rec["domain"], rec["count"], rec["query_id"]) == (
        "analyst", "denied", "email", 3, "q1")


def test_grants_are_per_domain_and_lookup_never_mints(svc: VaultTokenService) -> None:
    svc.store.grant_tokenize("etl", "email", "tokenize", "test")
    svc.store.grant_tokenize("matcher", "email", "lookup", "test")
    tokens = svc.tokenize("email", EMAILS[:5], principal="etl")
    with pytest.raises(PermissionDeniedError, match="domain 'marketing'"):
        svc.tokenize("email:marketing", EMAILS[:1], principal="etl")
    assert svc.tokenize("email", [EMAILS[3], None, EMAILS[0].upper()],
                        principal="matcher") == [tokens[3], None, tokens[0]]
    with pytest.raises(PermissionDeniedError, match="row 2 of the batch") as err:
        svc.tokenize("email", [EMAILS[1], "guess@example.com"], principal="matcher")
    assert "guess" not in str(err.value)
    assert svc.store.stats()["tokens"] == {"email (email)": 5}
    miss = [r for r in tokenize_records(svc) if r["outcome"] == "missed"]
    assert [(r["principal"], r["existing"], r["missed"]) for r in miss] == [("matcher", 1, 1)]


def test_the_policy_is_read_once_per_batch_and_cached_briefly(svc: VaultTokenService,
                                                              clock: Clock) -> None:
    svc.store.grant_tokenize("etl", "*", "tokenize", "test")
    for i in range(20):
        svc.tokenize("email", EMAILS[i : i + 5], principal="etl")
    assert svc.store.mode_reads == 1
    svc.store.revoke_tokenize("etl", "*")
    svc.tokenize("email", EMAILS[:1], principal="etl")  # within the 5 s the grant is cached
    clock.t += 5
    with pytest.raises(PermissionDeniedError):
        svc.tokenize("email", EMAILS[:1], principal="etl")
    assert svc.store.mode_reads == 2


def test_tokenize_is_audited_in_aggregate_without_values(svc: VaultTokenService,
                                                         clock: Clock) -> None:
    svc.store.grant_tokenize("etl", "*", "tokenize", "test")
    svc.tokenize("email", EMAILS[:10], principal="etl", query_id="q", host="duckdb")
    svc.tokenize("email", [*EMAILS[5:15], None], principal="etl", query_id="q", host="duckdb")
    assert [r for r in svc.store.audit_records() if r["action"] == "tokenize"] == [], \
        "nothing appended per batch"
    clock.t += 10
    svc.tokenize("email", EMAILS[:1], principal="etl", query_id="q", host="duckdb")
    [rec] = [r for r in svc.store.audit_records() if r["action"] == "tokenize"]
    assert (rec["new"], rec["existing"], rec["count"], rec["kinds"]) == (
        15, 6, 21, {"email": 21})
    assert (rec["principal"], rec["domain"], rec["query_id"], rec["host"]) == (
        "etl", "email", "q", "duckdb")
    assert not any(e in json.dumps(rec) for e in EMAILS)
    assert svc.verify_audit()["records"] == 1


def test_an_all_null_batch_is_checked_but_never_counted(svc: VaultTokenService) -> None:
    """One front half for every token service: NULLs are never sent, counted or audited as
    values, and a refused principal is refused even for NULLs."""
    with pytest.raises(PermissionDeniedError):
        svc.tokenize("email", [None, None], principal="analyst")
    svc.store.grant_tokenize("etl", "*", "tokenize", "test")
    assert svc.tokenize("email", [None, None], principal="etl") == [None, None]
    assert [(r["principal"], r["outcome"], r["count"]) for r in tokenize_records(svc)] == [
        ("analyst", "denied", 0)]


def test_the_aggregate_is_written_when_the_process_exits(vault_path: Path) -> None:
    import subprocess
    import sys

    SQLiteStore(vault_path, create=True).grant_tokenize("etl", "*", "tokenize", "test")
    code = ("import sys; from deid.service import VaultTokenService; "
            "from deid.stores.sqlite import SQLiteStore; "
            "s = VaultTokenService(SQLiteStore(sys.argv[1])); "
            "s.tokenize('email', ['a@example.com', 'b@example.com'], principal='etl')")
    subprocess.run([sys.executable, "-c", code, str(vault_path)], check=True, timeout=60)
    [rec] = [r for r in SQLiteStore(vault_path).audit_records() if r["action"] == "tokenize"]
    assert (rec["principal"], rec["new"]) == ("etl", 2)
