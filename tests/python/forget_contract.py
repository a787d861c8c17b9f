"""The erasure contract every deid store keeps, run by test_forget.py (SQLite, DynamoDB) and
test_forget_postgres.py (PostgreSQL): each module supplies an ``open_vault`` fixture that
opens independent stores over one fresh vault, as separate processes would.

`forget` destroys the value and its fingerprint entry, detokenize then fails with
ErasedTokenError (not "unknown"), the value's next token is new, an erased token is never
issued again, other processes' caches stop serving it, and the erasure is audited without the
value or the token.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from deid import kinds
from deid.errors import DeidError, ErasedTokenError, UnknownTokenError
from deid.service import VaultTokenService
from deid.stores import VaultStore

Opener = Callable[[], VaultStore]


def svc(open_vault: Opener, **kw: float) -> VaultTokenService:
    return VaultTokenService(open_vault(), **kw)  # type: ignore[arg-type]


def test_forget_by_value_destroys_the_record_and_detokenize_says_erased(
        open_vault: Opener) -> None:
    s = svc(open_vault)
    s.store.grant("reader", "test")
    ana, bo = s.tokenize("email", ["ana@example.com", "bo@example.com"])
    assert s.detokenize([ana], principal="reader") == ["ana@example.com"]  # now cached
    # Any spelling tokenize would match finds the record.
    assert s.forget("email", values=["ANA@Example.com"], principal="dpo") == 1
    with pytest.raises(ErasedTokenError) as info:
        s.detokenize([bo, ana], principal="reader")
    assert isinstance(info.value, UnknownTokenError)  # callers that fail closed still do
    assert "row 2" in str(info.value) and "erased" in str(info.value)
    assert ana not in str(info.value) and "ana@" not in str(info.value)
    assert s.detokenize([bo], principal="reader") == ["bo@example.com"]
    # A token this vault never issued is still "unknown", not "erased".
    forged = kinds.KINDS["email"].new_tokens(1, ["x@example.com"])[0]
    with pytest.raises(UnknownTokenError) as unknown:
        s.detokenize([forged], principal="reader")
    assert not isinstance(unknown.value, ErasedTokenError)
    ring = s.store.keyring()
    assert s.store.find_tokens("email", [ring.fingerprints("email", ["ana@example.com"])[0]]) == {}
    assert s.store.fetch_values([ana]) == {}


def test_the_value_tokenized_again_gets_a_new_token(open_vault: Opener) -> None:
    s = svc(open_vault)
    s.store.grant("reader", "test")
    old = s.tokenize("email", ["cy@example.com"])[0]
    s.forget("email", values=["cy@example.com"], principal="dpo")
    new = svc(open_vault).tokenize("email", ["cy@example.com"])[0]
    assert new != old and kinds.is_token(new, "email")
    assert s.tokenize("email", ["cy@example.com"]) == [new]  # converges again
    assert s.detokenize([new], principal="reader") == ["cy@example.com"]
    with pytest.raises(ErasedTokenError):
        s.detokenize([old], principal="reader")


def test_forget_by_token_stays_in_the_kind_domain(open_vault: Opener) -> None:
    s = svc(open_vault)
    shared, = s.tokenize("email", ["di@example.com"])
    private, = s.tokenize("email:marketing", ["di@example.com"])
    assert s.forget("email", tokens=[private], principal="dpo") == 0  # other domain: kept
    assert s.forget("email:marketing", tokens=[private, private, "junk"], principal="dpo") == 1
    assert s.forget("email:marketing", tokens=[private], principal="dpo") == 0  # already gone
    assert s.forget("email", values=["nobody@example.com"], principal="dpo") == 0
    s.store.grant("reader", "test")
    assert s.detokenize([shared], principal="reader") == ["di@example.com"]
    assert [e.token for e in s.store.erasures()] == [private]
    e = s.store.erased([private, shared])
    assert list(e) == [private] and (e[private].domain, e[private].kind) == ("marketing", "email")


def test_forget_is_audited_without_the_value_or_the_token(open_vault: Opener) -> None:
    s = svc(open_vault)
    tok, = s.tokenize("ssn", ["123-45-6789"])
    s.forget("ssn", values=["123456789"], principal="dpo@corp")
    rec = list(s.store.audit_records())[-1]
    assert (rec["action"], rec["principal"], rec["outcome"], rec["count"]) == (
        "forget", "dpo@corp", "erased", 1)
    assert rec["kinds"] == {"ssn:ssn": 1}  # kind:domain
    assert rec["at"]
    text = json.dumps(list(s.store.audit_records()))
    assert tok not in text and "6789" not in text
    assert s.verify_audit()["records"] == 1


def test_forget_needs_values_or_tokens_and_rejects_a_malformed_value(
        open_vault: Opener) -> None:
    s = svc(open_vault)
    with pytest.raises(DeidError, match="exactly one"):
        s.forget("email", principal="dpo")
    with pytest.raises(DeidError, match="exactly one"):
        s.forget("email", values=["a@b.co"], tokens=["x"], principal="dpo")
    with pytest.raises(DeidError) as info:
        s.forget("email", values=["a@b.co", "not-an-email-secret"], principal="dpo")
    assert "row 2" in str(info.value) and "secret" not in str(info.value)


def test_an_erased_token_is_never_issued_again(open_vault: Opener,
                                               monkeypatch: pytest.MonkeyPatch,
                                               request: pytest.FixtureRequest) -> None:
    """Attack: random tokens of a short format (a phone token has 12 random digits) can
    collide. If an erased token could be minted again for another value, every old mart row
    holding it would detokenize to a different person. The vault must treat the tombstone as
    taken."""
    s = svc(open_vault, cache_size=0)
    old, = s.tokenize("phone", ["+1 415 555 0100"])
    s.forget("phone", tokens=[old], principal="dpo")
    phone = kinds.KINDS["phone"]
    proposals = iter([[old]])

    def collide_once(n: int, canonicals: list[str]) -> list[str]:
        return next(proposals, None) or phone.new_tokens(n, canonicals)

    monkeypatch.setitem(kinds.KINDS, "phone", dataclasses.replace(phone,
                                                                  new_tokens=collide_once))
    kinds.parse_kind.cache_clear()  # parsed kind specs are cached; so is the patched one
    request.addfinalizer(kinds.parse_kind.cache_clear)
    fresh, = s.tokenize("phone", ["+1 415 555 0101"])
    assert next(proposals, None) is None  # the erased token was proposed
    assert fresh != old
    s.store.grant("reader", "test")
    with pytest.raises(ErasedTokenError):
        s.detokenize([old], principal="reader")
    assert s.detokenize([fresh], principal="reader") == ["+14155550101"]


def test_other_processes_stop_serving_erased_values_and_tokens(open_vault: Opener) -> None:
    """A long-lived host (DuckDB plugin, warm Lambda) cached both directions before another
    process erased the value."""
    host = svc(open_vault, erasure_check_s=0.0)
    stale = svc(open_vault, erasure_check_s=3600.0)
    host.store.grant("reader", "test")
    old, = host.tokenize("email", ["gus@example.com"])
    assert stale.tokenize("email", ["gus@example.com"]) == [old]
    for h in (host, stale):
        assert h.detokenize([old], principal="reader") == ["gus@example.com"]
    svc(open_vault).forget("email", values=["gus@example.com"], principal="dpo")
    for h in (host, stale):  # a cached value is served only after an epoch check
        with pytest.raises(ErasedTokenError):
            h.detokenize([old], principal="reader")
    new, = host.tokenize("email", ["gus@example.com"])
    assert new != old
    # The documented bound: tokenize looks at the epoch every erasure_check_s seconds; the
    # detokenize above already refreshed `stale`, so it too mints the new token now.
    assert stale.tokenize("email", ["gus@example.com"]) == [new]


def test_a_reader_that_only_detokenizes_stops_serving_an_erased_value(
        open_vault: Opener) -> None:
    """A detokenize-only process (a warm detokenize Lambda) caches a value before it ever
    looked at the erasure epoch; the epoch it compares with must predate that cache entry."""
    writer = svc(open_vault)
    writer.store.grant("reader", "test")
    tok, = writer.tokenize("email", ["rae@example.com"])
    reader = svc(open_vault)
    assert reader.detokenize([tok], principal="reader") == ["rae@example.com"]
    writer.forget("email", tokens=[tok], principal="dpo")
    with pytest.raises(ErasedTokenError):
        reader.detokenize([tok], principal="reader")


def test_tokenize_cache_staleness_is_bounded_by_erasure_check_s(open_vault: Opener) -> None:
    stale = svc(open_vault, erasure_check_s=3600.0)
    old, = stale.tokenize("email", ["hal@example.com"])
    svc(open_vault).forget("email", values=["hal@example.com"], principal="dpo")
    assert stale.tokenize("email", ["hal@example.com"]) == [old]  # within the bound
    stale._epoch_checked = float("-inf")  # the interval has passed
    assert stale.tokenize("email", ["hal@example.com"]) != [old]


def test_erasures_since_lists_tombstones_in_order(open_vault: Opener) -> None:
    s = svc(open_vault)
    a, b = s.tokenize("phone", ["+1 415 555 0100", "+1 415 555 0101"])
    s.forget("phone", tokens=[a], principal="dpo")
    first = list(s.store.erasures())
    s.forget("phone", tokens=[b], principal="dpo")
    both = list(s.store.erasures())
    assert [e.token for e in both] == [a, b]
    assert [e.token for e in s.store.erasures(since=both[1].erased_at)] == [b]
    assert first[0].kind == "phone" and first[0].domain == "phone"
    assert s.store.stats()["erased"] == 2


