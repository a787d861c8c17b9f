"""The token service over the SQLite vault: convergence, randomness, policy, audit, faults."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest

from conftest import open_service_at as fresh_service
from deid._cache import BoundedCache
from deid.errors import (
    AuditChainError,
    InvalidKindError,
    InvalidValueError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultKeyError,
)
from deid.keys import key_file_for
from deid.service import VaultTokenService
from deid.stores.sqlite import journal_file_for
from deid.vault import VaultConfig, open_service, open_store

EMAILS = [f"person{i}@example.com" for i in range(300)]


def test_same_value_same_token_across_instances_and_spellings(service: VaultTokenService,
                                                              vault_path: Path) -> None:
    first = service.tokenize("email", EMAILS)
    other = fresh_service(vault_path, cache_size=0)
    assert other.tokenize("email", [e.upper() for e in EMAILS]) == first
    assert len(set(first)) == len(EMAILS)


def test_spellings_of_one_value_in_one_batch_share_a_token_and_count_once(
        service: VaultTokenService) -> None:
    """Several spellings in one batch are one value: one token, one new record, every row
    counted; then the same batch again is answered from the cache, spelling by spelling."""
    service.store.grant_tokenize("etl", "*", "tokenize", "test")
    batch = ["A@X.com", "a@x.com", None, " a@x.com ", "b@x.com", "a@x.com"]
    for _ in range(2):
        out = service.tokenize("email", batch, principal="etl", query_id="q")
        assert out[2] is None and len({out[0], out[1], out[3], out[5]}) == 1
        assert out[4] not in (out[0], None)
    assert sum(service.store.key_version_counts().values()) == 2
    service.flush_audit()
    (record,) = [r for r in service.store.audit_records() if r["action"] == "tokenize"]
    assert (record["new"], record["existing"]) == (5, 5)  # rows, not values


def test_tokens_are_random_not_derived_from_values(tmp_path: Path) -> None:
    a = fresh_service(tmp_path / "a" / "v.db").tokenize("email", EMAILS)
    b = fresh_service(tmp_path / "b" / "v.db").tokenize("email", EMAILS)
    assert not set(a) & set(b)  # two vaults, same values: unrelated tokens


def test_domains_separate_token_spaces(service: VaultTokenService) -> None:
    shared = service.tokenize("email", EMAILS[:10])
    private = service.tokenize("email:marketing", EMAILS[:10])
    assert not set(shared) & set(private)
    assert service.tokenize("email", EMAILS[:10]) == shared


def test_null_stays_null_and_empty_string_gets_a_token(service: VaultTokenService) -> None:
    out = service.tokenize("string", [None, "", None, ""])
    assert out[0] is None and out[2] is None
    assert out[1] is not None and out[1] == out[3]


def test_a_value_shaped_like_a_token_is_tokenized_like_any_other(
        service: VaultTokenService) -> None:
    token = service.tokenize("email", ["a@example.com"])[0]
    again = service.tokenize("email", [token])[0]
    assert again != token
    service.store.grant("reader", "test")
    assert service.detokenize([again], principal="reader") == [token]


def test_bad_value_fails_the_whole_batch_naming_kind_column_and_row(
        service: VaultTokenService) -> None:
    secret = "not-an-email-but-secret"
    with pytest.raises(InvalidValueError) as exc:
        service.tokenize("email", ["ok@example.com", None, secret], column="email")
    msg = str(exc.value)
    assert "row 3" in msg and "'email'" in msg and "column 'email'" in msg
    assert secret not in msg
    # nothing of the batch was minted: fail whole, before the vault is touched
    assert service.store.stats()["tokens"] == {}


def test_over_long_value_names_the_limit(service: VaultTokenService) -> None:
    with pytest.raises(InvalidValueError, match="limit of 16 characters"):
        service.tokenize("ssn", ["9" * 40])


def test_unknown_kind(service: VaultTokenService) -> None:
    with pytest.raises(InvalidKindError, match="unknown kind") as exc:
        service.tokenize("passport", ["x"])
    assert "passport" not in str(exc.value)  # a kind from a column could be a value


def test_non_text_value_is_refused(service: VaultTokenService) -> None:
    with pytest.raises(InvalidValueError, match="not text"):
        service.tokenize("string", ["a", 5])  # type: ignore[list-item]


def test_detokenize_returns_canonical_values_for_granted_principal(
        service: VaultTokenService) -> None:
    tokens = service.tokenize("phone", ["(212) 555-0142", None, "212.555.0199"])
    service.store.grant("pii_reader", "test")
    assert service.detokenize(tokens, principal="pii_reader") == [
        "+12125550142", None, "+12125550199"]


def test_detokenize_refused_outside_policy_and_audited(service: VaultTokenService) -> None:
    tokens = service.tokenize("ssn", ["901-23-4567"])
    with pytest.raises(PermissionDeniedError, match="'analyst' is not in the vault"):
        service.detokenize(tokens, principal="analyst", query_id="q1", host="test")
    (record,) = list(service.store.audit_records())
    assert record["principal"] == "analyst" and record["outcome"] == "denied"
    assert record["kinds"] == {"ssn": 1} and record["query_id"] == "q1"
    assert "901-23-4567" not in json.dumps(record) and tokens[0] not in json.dumps(record)


def test_cached_detokenize_counts_kinds_and_still_rejects_non_tokens(
        service: VaultTokenService) -> None:
    """A batch answered from the cache is classified in one pass; the audit counts agree
    with the first, uncached call, and one stranger in the batch still fails it."""
    tokens = service.tokenize("email", ["a@example.com", "b@example.com"]) * 3
    service.store.grant("p", "test")
    for _ in range(2):
        assert service.detokenize(tokens, principal="p") == ["a@example.com",
                                                             "b@example.com"] * 3
    with pytest.raises(UnknownTokenError):
        service.detokenize([*tokens, "x@deid.invalid"], principal="p")
    records = list(service.store.audit_records())
    assert [(r["count"], r["kinds"], r["outcome"]) for r in records] == [
        (6, {"email": 6}, "allowed"), (6, {"email": 6}, "allowed"),
        (7, {"email": 6}, "rejected")]


def test_revoked_principal_is_refused(service: VaultTokenService) -> None:
    tokens = service.tokenize("email", ["a@example.com"])
    service.store.grant("p", "test")
    assert service.detokenize(tokens, principal="p") == ["a@example.com"]
    service.store.revoke("p")
    with pytest.raises(PermissionDeniedError):
        service.detokenize(tokens, principal="p")


def test_forged_or_foreign_tokens_fail_without_echo(service: VaultTokenService,
                                                    tmp_path: Path) -> None:
    service.store.grant("p", "test")
    foreign = fresh_service(tmp_path / "other" / "v.db").tokenize("email", ["a@example.com"])[0]
    for bad in [foreign, "hello", "name_" + "a" * 24]:
        with pytest.raises(UnknownTokenError) as exc:
            service.detokenize(["x" if bad == "hello" else bad], principal="p")
        assert bad not in str(exc.value)


@pytest.mark.parametrize("table", ["journal", "recent", "tokens"])
def test_tampered_record_fails_authentication(service: VaultTokenService,
                                              vault_path: Path, table: str) -> None:
    a, b = service.tokenize("email", ["a@example.com", "b@example.com"])
    service.store.grant("p", "test")
    if table != "journal":
        service.store.merge_journal(down=table == "tokens")  # type: ignore[attr-defined]
    db = sqlite3.connect(vault_path)
    db.execute("attach database ? as j", (str(journal_file_for(vault_path)),))
    table = "j.journal" if table == "journal" else table
    # swap the two ciphertexts: each is bound to its own token
    rows = dict(db.execute(f"select token, ciphertext from {table}").fetchall())
    db.execute(f"update {table} set ciphertext = ? where token = ?", (rows[b], a))
    db.commit()
    with pytest.raises(VaultKeyError, match="failed authentication"):
        fresh_service(vault_path).detokenize([a], principal="p")


def test_audit_chain_verifies_and_detects_edits_and_deletions(service: VaultTokenService,
                                                             vault_path: Path) -> None:
    tokens = service.tokenize("email", EMAILS[:5])
    service.store.grant("p", "test")
    for _ in range(4):
        service.detokenize(tokens, principal="p")
    assert service.verify_audit()["records"] == 4
    db = sqlite3.connect(vault_path)
    record = json.loads(db.execute("select record from audit where seq = 2").fetchone()[0])
    record["principal"] = "someone_else"
    db.execute("update audit set record = ? where seq = 2", (json.dumps(record),))
    db.commit()
    with pytest.raises(AuditChainError, match="record 2 was altered"):
        service.verify_audit()
    db.execute("delete from audit where seq = 2")
    db.commit()
    with pytest.raises(AuditChainError, match="record 2 is missing"):
        service.verify_audit()


def test_rotation_changes_no_token_and_keeps_old_values_readable(
        service: VaultTokenService, vault_path: Path) -> None:
    from deid.keys import write_key_file

    old = service.tokenize("email", EMAILS[:50])
    write_key_file(key_file_for(vault_path), service.keyring.rotated(), exclusive=False)
    rotated = fresh_service(vault_path, cache_size=0)
    assert rotated.keyring.current == 2
    assert rotated.tokenize("email", EMAILS[:50]) == old
    new = rotated.tokenize("email", ["late@example.com"])
    rotated.store.grant("p", "test")
    assert rotated.detokenize(old + new, principal="p") == [*EMAILS[:50], "late@example.com"]
    # the service that loaded keys before the rotation reloads them on an unknown version
    assert service.detokenize(new, principal="p") == ["late@example.com"]
    versions = service.store.stats()["key_versions"]
    assert versions == {"1": 50, "2": 1}


def test_missing_key_file_for_a_vault_with_records_is_refused(
        service: VaultTokenService, vault_path: Path) -> None:
    service.tokenize("email", ["a@example.com"])
    key_file_for(vault_path).unlink()
    with pytest.raises(VaultKeyError, match="refusing to create new keys"):
        fresh_service(vault_path)


def test_keys_of_another_vault_are_refused(service: VaultTokenService, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from deid.keys import FileKeyring

    monkeypatch.setenv("DEID_KEYS", FileKeyring.generate().to_json())
    with pytest.raises(VaultKeyError, match="does not belong"):
        open_service(VaultConfig.from_env({"vault": f"sqlite:///{service.store.path}"}))


def test_key_file_is_created_0600_and_group_readable_one_refused(
        service: VaultTokenService, vault_path: Path) -> None:
    kf = key_file_for(vault_path)
    assert kf.stat().st_mode & 0o777 == 0o600
    assert "fingerprint_key" in kf.read_text()
    kf.chmod(0o640)
    with pytest.raises(VaultKeyError, match="chmod 600"):
        fresh_service(vault_path)


def test_keys_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deid.keys import FileKeyring

    monkeypatch.setenv("DEID_KEYS", FileKeyring.generate().to_json())
    open_store(f"sqlite:///{tmp_path / 'v.db'}", create=True).close()  # deid init, no keys yet
    # Read once at the host's edge (VaultConfig), then passed to the store explicitly.
    svc = open_service(VaultConfig.from_env({"vault": f"sqlite:///{tmp_path / 'v.db'}"}))
    assert isinstance(svc, VaultTokenService)
    assert svc.keyring.source == "DEID_KEYS"
    assert not key_file_for(tmp_path / "v.db").exists()
    assert svc.tokenize("email", ["a@example.com"])[0]
    assert "DEID_KEYS" not in repr(VaultConfig.from_env()) and "keys=" not in repr(
        VaultConfig.from_env())  # the key set never reaches a log line through the config


def test_keyring_repr_never_shows_key_material(service: VaultTokenService) -> None:
    text = repr(service.keyring)
    assert service.keyring.to_json().split('"')[7] not in text
    assert "versions=[1]" in text


def test_threads_racing_on_new_values_converge(vault_path: Path) -> None:
    fresh_service(vault_path)  # create keys once; each thread then opens its own service
    values = [f"race{i}@example.com" for i in range(2000)]
    results: list[list[str | None]] = []
    barrier = threading.Barrier(6)

    def work() -> None:
        svc = fresh_service(vault_path, cache_size=0)
        barrier.wait()
        results.append(svc.tokenize("email", values))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and all(r == results[0] for r in results)
    assert fresh_service(vault_path).store.stats()["tokens"] == {"email (email)": 2000}


def _tokenize_in_process(args: tuple[str, list[str]]) -> list[str | None]:
    path, values = args
    return fresh_service(Path(path), cache_size=0).tokenize("ssn", values)


@pytest.mark.slow  # spawns processes
def test_processes_racing_on_new_values_converge(vault_path: Path) -> None:
    values = [f"90{i // 10000 % 10}-{i // 100 % 100:02d}-{i:04d}" for i in range(3000)]
    # no keys yet: the processes also race to create the key file
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_tokenize_in_process, [(str(vault_path), values)] * 4)
    assert all(r == results[0] for r in results)
    assert len(set(results[0])) == len(set(values))
    assert fresh_service(vault_path).store.stats()["tokens"] == {"ssn (ssn)": len(set(values))}


@pytest.mark.parametrize("merged", [False, True])
def test_token_collisions_are_retried(service: VaultTokenService, merged: bool) -> None:
    """A phone token has 12 random digits: a fresh one can equal a token already issued, in
    the journal or in an indexed level."""
    from deid import kinds

    first = service.tokenize("phone", ["+1 415 555 0100"])[0]
    if merged:
        service.store.merge_journal()  # type: ignore[attr-defined]
    real = kinds.KINDS["phone"].new_tokens
    calls = []

    def colliding(n: int, canonicals: list[str]) -> list[str]:
        calls.append(n)
        return [first] * n if len(calls) == 1 else real(n, canonicals)

    object.__setattr__(kinds.KINDS["phone"], "new_tokens", colliding)  # frozen dataclass
    try:
        second = service.tokenize("phone", ["+1 415 555 0101"])[0]
    finally:
        object.__setattr__(kinds.KINDS["phone"], "new_tokens", real)
    assert second != first and len(calls) == 2
    service.store.grant("p", "test")
    assert service.detokenize([first, second], principal="p") == ["+14155550100",
                                                                   "+14155550101"]


def test_bounded_cache_never_exceeds_capacity_and_keeps_recent_entries() -> None:
    cache = BoundedCache(1000)
    for i in range(0, 50_000, 100):
        cache.store("ns", [(j, str(j)) for j in range(i, i + 100)])
        assert len(cache) <= 1000
    assert cache.lookup("ns", [49_999, 0, None]) == ["49999", None, None]
    assert cache.lookup("other", [49_999]) == [None]  # namespaces never mix


def test_bounded_cache_counts_each_entry_once_when_stored_again() -> None:
    """Storing known keys again (every vector of a rebuild does) adds nothing: no rollover,
    so nothing recent is dropped early; new keys still roll the generations over."""
    cache = BoundedCache(1000)
    for ns in ("a", "b"):
        cache.store(ns, [(j, str(j)) for j in range(200)])
    for _ in range(50):
        cache.store("a", [(j, str(j)) for j in range(0, 200, 2)])
    assert cache._hot_size == len(cache) == 400  # still one generation
    cache.store("c", [(j, str(j)) for j in range(150)])
    assert len(cache) <= 1000 and cache._hot_size < 500
    assert cache.lookup("a", [0, 199]) == ["0", "199"]


def test_service_cache_is_bounded(service: VaultTokenService, vault_path: Path) -> None:
    svc = fresh_service(vault_path, cache_size=100)
    svc.tokenize("string", [str(i) for i in range(5000)])
    assert len(svc._token_cache) <= 100


def test_vault_unavailable_fails_closed(tmp_path: Path) -> None:
    from deid.errors import VaultUnavailableError

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(VaultUnavailableError):
        fresh_service(blocker / "vault.db")


def test_sqlite_url_parameters(tmp_path: Path) -> None:
    from deid.errors import ConfigError
    from deid.stores.sqlite import open_store

    store = open_store(f"sqlite:///{tmp_path / 'p.db'}?synchronous=normal&cache_mib=8",
                       create=True)
    db = store._db()
    assert db.execute("pragma synchronous").fetchall() == [(1,)]  # NORMAL
    assert db.execute("pragma cache_size").fetchall() == [(-8192,)]
    with pytest.raises(ConfigError, match="unknown SQLite vault parameter"):
        open_store(f"sqlite:///{tmp_path / 'p.db'}?journal=off")
    with pytest.raises(ConfigError, match="synchronous must be"):
        open_store(f"sqlite:///{tmp_path / 'p.db'}?synchronous=off")


def test_fingerprints_are_hmac_sha256_of_domain_and_match_key() -> None:
    """The batch fingerprint (pads hashed once per key) equals the library's HMAC-SHA256."""
    import hmac
    import secrets

    from deid.keys import fingerprints_under

    keys = ["a@example.com", "", "ünïcödé", "\udcff lone surrogate", "x" * 300]
    for key in (secrets.token_bytes(32), secrets.token_bytes(32), bytes(32), b"k" * 100):
        for domain in ("email", "email:marketing"):
            expected = [hmac.digest(key, domain.encode() + b"\x00"
                                    + k.encode("utf-8", "surrogatepass"), "sha256")
                        for k in keys]
            assert fingerprints_under(key, domain, keys) == expected


def test_batch_encryption_reads_and_writes_the_per_record_format() -> None:
    """Records sealed by the batch path open with the per-record path and the other way
    round (same nonce ‖ ciphertext layout, same token-bound AAD), under any key version;
    a record moved to another token fails either way."""
    from deid.keys import (
        FileKeyring,
        decrypt_many,
        decrypt_under,
        encrypt_many,
        encrypt_under,
    )

    ring = FileKeyring.generate().rotated()  # current version 2
    tokens = ["a" * 24 + "@deid.invalid", "+999000000000001", "name_" + "b" * 24, "str_x"]
    values = ["a@example.com", "+12125550142", "Zoë  O\u2019Brien", "\udcff lone surrogate"]
    versions, blobs = encrypt_many(ring, tokens, values)
    assert versions == [2] * 4 and len({b[:12] for b in blobs}) == 4  # a nonce per record
    assert [decrypt_under(ring._aead[2], 2, t, b, "k")
            for t, b in zip(tokens, blobs, strict=True)] == values
    old = [encrypt_under(ring._aead[1], 1, t, v)[1] for t, v in zip(tokens, values, strict=True)]
    assert decrypt_many(ring, 1, tokens, old) == values
    with pytest.raises(VaultKeyError, match="failed authentication"):
        decrypt_many(ring, 2, tokens[::-1], blobs)
    with pytest.raises(VaultKeyError, match="failed authentication"):
        decrypt_many(ring, 2, tokens, old)  # sealed under version 1, not 2
    with pytest.raises(VaultKeyError, match="key version 7 is not in"):
        decrypt_many(ring, 7, tokens, blobs)
    # The stored format itself, sealed without deid's code: nonce ‖ AES-GCM(value) with
    # associated data "deid:v<version>:<token>" (what vaults written before hold).
    nonce = bytes(12)
    by_hand = nonce + ring._aead[2].encrypt(nonce, values[0].encode(),
                                            f"deid:v2:{tokens[0]}".encode())
    assert decrypt_under(ring._aead[2], 2, tokens[0], by_hand, "k") == values[0]
    assert decrypt_many(ring, 2, tokens[:1], [by_hand]) == values[:1]


def test_detokenize_counted_audits_rows_and_names_the_hosts_row(
        service: VaultTokenService) -> None:
    """A host that counted its batch passes each token once: the audit counts rows, an
    error names the row the host says, and a batch of mixed kinds is counted per kind."""
    email, phone = service.tokenize("email", ["a@example.com"])[0], \
        service.tokenize("phone", ["2125550142"])[0]
    service.store.grant("p", "test")
    assert service.detokenize_counted([email, phone], [3, 2], principal="p",
                                      first_row=lambda bad: 99) == ["a@example.com",
                                                                    "+12125550142"]
    with pytest.raises(UnknownTokenError, match="row 42 of the batch") as exc:
        service.detokenize_counted([email, "x" * 24 + "@deid.invalid"], [1, 4], principal="p",
                                   first_row=lambda bad: 42 if bad == ["x" * 24
                                                                       + "@deid.invalid"] else 0)
    assert "x" * 24 not in str(exc.value)
    records = [r for r in service.store.audit_records() if r["action"] == "detokenize"]
    assert [(r["count"], r["kinds"]) for r in records] == [
        (5, {"email": 3, "phone": 2}), (5, {"email": 5})]
