"""Normalization (one person, one token), token formats, kind specs and bad input."""

from __future__ import annotations

import re

import pytest

from deid import kinds
from deid.errors import InvalidKindError


def canon(kind: str, value: str) -> str:
    return kinds.normalize(kinds.KINDS[kind], value)[0]


def match(kind: str, value: str) -> str:
    return kinds.normalize(kinds.KINDS[kind], value)[1]


@pytest.mark.parametrize(("kind", "spellings", "canonical"), [
    # the last spelling starts with a fullwidth j, which NFKC folds
    ("email", ["Jane.Doe@Example.COM", "  jane.doe@example.com ", "\uff4aane.doe@example.com"],
     "jane.doe@example.com"),
    ("phone", ["(212) 555-0142", "212-555-0142", "+1 212 555 0142", "1.212.555.0142",
               "2125550142"], "+12125550142"),
    ("ssn", ["901-23-4567", "901234567", " 901-234567 "], "901-23-4567"),
    ("card", ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111"],
     "4111111111111111"),
    ("date", ["1990-01-02", " 1990-01-02"], "1990-01-02"),
])
def test_spellings_of_one_value_share_canonical_form(kind: str, spellings: list[str],
                                                     canonical: str) -> None:
    assert {canon(kind, s) for s in spellings} == {canonical}


def test_names_match_case_and_spacing_insensitively_but_keep_display_form() -> None:
    assert match("name", "JOHN  SMITH") == match("name", " john smith")
    assert canon("name", "John   Smith ") == "John Smith"
    assert match("address", "1 Main St") == match("address", "1  MAIN st")


def test_string_kind_is_exact() -> None:
    assert match("string", "abc") != match("string", "ABC")
    assert canon("string", "") == ""


@pytest.mark.parametrize(("kind", "value", "reason"), [
    ("email", "no-at-sign", "not an email"),
    ("email", "a@b@c.com", "not an email"),
    ("phone", "call me", "not a phone"),
    ("phone", "12345", "not a phone"),
    ("ssn", "12-34-5678", "not an SSN"),
    ("card", "4111 1111", "not a card"),
    ("date", "1990-02-30", "not a date"),
    ("date", "02/01/1990", "not a date"),
    ("string", "bad\x00byte", "control character"),
    ("name", "x" * 257, "limit of 256"),
    ("email", "a" * 250 + "@b.com", "limit of 254"),
])
def test_invalid_values_are_refused_with_a_reason_that_omits_the_value(
        kind: str, value: str, reason: str) -> None:
    with pytest.raises(kinds._Invalid) as exc:
        kinds.normalize(kinds.KINDS[kind], value)
    assert reason in str(exc.value)
    assert value not in str(exc.value)


def test_kind_spec_parses_domain_and_rejects_unknown() -> None:
    assert kinds.parse_kind("email").domain == "email"
    spec = kinds.parse_kind("email:marketing")
    assert (spec.name, spec.domain) == ("email", "marketing")
    with pytest.raises(InvalidKindError, match="unknown kind"):
        kinds.parse_kind("passport")
    with pytest.raises(InvalidKindError, match="invalid domain"):
        kinds.parse_kind("email:Bad-Domain")


@pytest.mark.parametrize("kind", list(kinds.KINDS))
def test_fresh_tokens_have_their_kinds_format(kind: str) -> None:
    k = kinds.KINDS[kind]
    canonical = "4111111111111111" if kind == "card" else "x"
    tokens = k.new_tokens(200, [canonical] * 200)
    assert len(set(tokens)) == 200  # random, not derived from the (identical) value
    for t in tokens:
        assert k.token_pattern.fullmatch(t)
        assert kinds.kind_of_token(t) is k
        assert kinds.is_token(t, kind)


def test_card_tokens_keep_last_four_and_always_fail_luhn() -> None:
    canonicals = [f"4111111111{n:06d}" for n in range(500)]
    for c, t in zip(canonicals, kinds.KINDS["card"].new_tokens(500, canonicals), strict=True):
        assert t[-4:] == c[-4:]
        assert not kinds.luhn_valid(t)
    assert kinds.luhn_valid("4111111111111111")


def test_ssn_tokens_sit_in_never_issued_non_itin_ranges() -> None:
    for t in kinds.KINDS["ssn"].new_tokens(500, [""] * 500):
        area, group, _ = t.split("-")
        assert 950 <= int(area) <= 999  # area 9xx is never issued as an SSN
        assert int(group) < 50  # ITIN groups are 50-65, 70-88, 90-92, 94-99


def test_email_tokens_are_addresses_in_a_reserved_domain() -> None:
    t = kinds.KINDS["email"].new_tokens(1, ["x"])[0]
    assert re.fullmatch(r"[a-z2-7]+@deid\.invalid", t)


def test_values_that_look_like_tokens_are_still_ordinary_values() -> None:
    token = kinds.KINDS["email"].new_tokens(1, ["x"])[0]
    assert canon("email", token) == token  # normalized like any email, no special casing


def test_sql_token_patterns_match_python_patterns() -> None:
    """macros/token_pattern.sql must not drift from kinds.py."""
    from pathlib import Path

    sql = (Path(__file__).parents[2] / "macros" / "token_pattern.sql").read_text()
    for name, kind in kinds.KINDS.items():
        m = re.search(rf"'{name}': '\^(.*?)\$'", sql)
        assert m, f"no SQL pattern for {name}"
        sql_re = re.compile(m.group(1).replace("[.]", r"\.").replace("[+]", r"\+"))
        for t in kind.new_tokens(50, ["4111111111111111"] * 50):
            assert sql_re.fullmatch(t)
        assert sql_re.pattern.replace("\\", "") == kind.token_pattern.pattern.replace("\\", "")
