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
    # Random, not derived from the (identical) value: a derived token would repeat 200 times.
    # Not "all distinct": SSN tokens have 25 M values, so two of 200 collide once in ~1,256
    # runs (the vault retries a colliding token); 10 collisions have odds below 1e-30.
    assert len(set(tokens)) >= 190
    for t in tokens:
        assert k.token_pattern.fullmatch(t)
        assert kinds.kind_of_token(t) is k
        assert kinds.is_token(t, kind)


@pytest.mark.parametrize("kind", list(kinds.KINDS))
def test_a_kind_claims_unique_by_chance_tokens_only_with_120_random_bits(kind: str) -> None:
    """A store skips looking up fresh tokens of a kind that claims RANDOM_TOKEN_BITS: the
    claim must hold (24 base32 characters, each uniform), and short formats must not make it.
    """
    k = kinds.KINDS[kind]
    tokens = k.new_tokens(4000, ["4111111111111111"] * 4000)
    bodies = ["".join(re.findall("[a-z2-7]{24}", t)) for t in tokens]
    has_body = all(len(b) == 24 for b in bodies)
    assert (k.random_bits == kinds.RANDOM_TOKEN_BITS) == has_body
    assert k.random_bits in (0, kinds.RANDOM_TOKEN_BITS)
    if has_body:
        # Every position takes all 32 symbols (4,000 draws miss one with odds below 1e-50).
        assert all(len({b[i] for b in bodies}) == 32 for i in range(24))


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


# -- one value, one token: numbers, timestamps, invisible characters -----------------------


@pytest.mark.parametrize("spellings", [
    ["12.50", "12.5", " 12.500 ", "1.25e1", "+12.5"],
    ["1", "1.0", "1.", "01", "1e0", "0.1e1"],
    ["0", "-0", "0.000", "+0e5"],
    ["-3.25", "-3.250", "-325e-2"],
    ["1000", "1e3", "1000.0"],
])
def test_spellings_of_one_number_share_one_token(service, spellings: list[str]) -> None:
    """The attack: `12.50` (a DECIMAL(10,2) cast to text) and `12.5` (a double) got two
    tokens under the `string` kind. The `number` kind makes them one."""
    assert len(set(service.tokenize("string", spellings))) == len(set(spellings))  # the attack
    assert len(set(service.tokenize("number", spellings))) == 1


def test_number_canonical_form_is_a_plain_decimal() -> None:
    assert canon("number", "1.25e1") == "12.5"
    assert canon("number", "1e3") == "1000"
    assert canon("number", "-0.000") == "0"
    assert canon("number", "123456789012345678901234567890.000100") == \
        "123456789012345678901234567890.0001"


@pytest.mark.parametrize("bad", ["1,000", "NaN", "inf", "-Infinity", "12.5.1", "", "0x10",
                                 "1e99999", "twelve"])
def test_number_refuses_what_is_not_a_plain_number(bad: str) -> None:
    with pytest.raises(kinds._Invalid, match="number"):
        canon("number", bad)


def test_timestamps_of_one_instant_share_one_token(service) -> None:
    """The attack: one `timestamptz` cast to text under two TimeZone settings printed two
    strings and got two tokens; the `timestamp` kind keys on the instant in UTC."""
    duckdb = pytest.importorskip("duckdb")
    printed = []
    con = duckdb.connect()
    for zone in ("UTC", "Asia/Kolkata", "America/Los_Angeles"):
        con.execute(f"set TimeZone = '{zone}'")
        printed.append(con.execute(
            "select cast(timestamptz '2024-01-02 03:04:05.25+00' as varchar)").fetchall()[0][0])
    assert len(set(printed)) == 3  # three spellings of one instant
    assert len(set(service.tokenize("string", printed))) == 3  # the attack
    tokens = service.tokenize("timestamp", [*printed, "2024-01-02T03:04:05.250Z"])
    assert len(set(tokens)) == 1
    assert service.store.is_allowed  # keep the vault open for detokenize below
    service.store.grant("reader", "admin")
    assert service.detokenize(tokens[:1], principal="reader") == ["2024-01-02T03:04:05.250000Z"]


def test_a_timestamp_without_offset_is_utc() -> None:
    assert canon("timestamp", "2024-01-02 03:04:05") == "2024-01-02T03:04:05Z"
    assert canon("timestamp", "2024-01-02T05:04:05+02:00") == "2024-01-02T03:04:05Z"


@pytest.mark.parametrize("bad", ["2024-13-01 00:00:00", "yesterday", "", "2024-01-02 25:00"])
def test_timestamp_refuses_what_is_not_iso_8601(bad: str) -> None:
    with pytest.raises(kinds._Invalid, match="timestamp"):
        canon("timestamp", bad)


INVISIBLE = ["\u200b", "\u200e", "\u200f", "\u202e", "\u2066", "\u2069", "\ufeff", "\u00ad",
             "\u2060", "\u061c"]


@pytest.mark.parametrize("char", INVISIBLE, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize(("kind", "value"), [
    ("email", "jane.doe@example.com"), ("phone", "+12125550142"), ("ssn", "901-23-4567"),
    ("card", "4111111111111111"), ("name", "Jane Doe"), ("address", "1 Main St"),
    ("date", "1990-01-02"), ("number", "12.5"), ("timestamp", "2024-01-02T03:04:05Z"),
    ("string", "order note"),
])
def test_invisible_characters_do_not_make_a_second_person(service, kind: str, value: str,
                                                         char: str) -> None:
    """The attack: a zero-width or right-to-left control character inside an email or a
    name gave the same rendered value a second token. Every kind now ignores them."""
    disguised = value[:3] + char + value[3:]
    assert service.tokenize(kind, [disguised]) == service.tokenize(kind, [value])
    assert char not in canon(kind, disguised)


@pytest.mark.parametrize("kind", ["name", "address", "string"])
def test_joiners_are_kept_for_display_but_ignored_for_matching(kind: str) -> None:
    """ZWJ/ZWNJ change how some scripts render (Persian, Indic, emoji): kept in the stored
    form, ignored for matching, so the first spelling seen is what detokenize returns."""
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    assert canon(kind, persian) == persian
    assert match(kind, persian) == match(kind, persian.replace("\u200c", ""))


def test_joiners_are_dropped_where_they_never_belong() -> None:
    assert canon("email", "jane\u200d@example.com") == "jane@example.com"
def test_common_kind_tells_one_kind_batches_and_refuses_mixtures() -> None:
    from deid.kinds import KINDS, common_kind

    emails = KINDS["email"].new_tokens(3, ["", "", ""])
    names = KINDS["name"].new_tokens(2, ["", ""])
    assert common_kind(emails) is KINDS["email"] and common_kind(names) is KINDS["name"]
    for kind in KINDS.values():  # every kind but SSN and card has a mark; a new kind too
        if kind.name not in ("ssn", "card"):
            assert common_kind(kind.new_tokens(2, ["1234", "5678"])) is kind
    assert common_kind(emails + names) is None and common_kind([]) is None
    # SSN and card tokens are told apart by length, not a mark: the per-token path does them
    assert common_kind(KINDS["ssn"].new_tokens(2, ["", ""])) is None


_SPELLINGS = {
    "email": [" Ann.Lee@Example.COM ", "bob@x.org", "c+tag@sub.example.co.uk", "a@b", "a@@b.co",
              "a b@c.de", "@b.co", "a@b.", "Zoë@Example.com", "a\u200b@x.com", "a@b.co\t"],
    "phone": ["(212) 555-0142", "212-555-0142", "+1 212 555 0142", "1 (212) 555.0142",
              "2125550142", "12125550142", "+44 20 7946 0958", "+", "++12125550142",
              "212555014", "22125550142", "+1234567", "+1234567890123456", "212/555/0142",
              "212 555 0142 x7", "(212)\t555-0142",
              "\uff12\uff11\uff12\uff15\uff15\uff15\uff10\uff11\uff14\uff12"],
    "ssn": ["123-45-6789", "123456789", " 123-45-6789 ", "123-456789", "12-345-6789",
            "1234567890", "123 45 6789", "abc-de-fghi", "\uff11\uff12\uff13-45-6789"],
}


@pytest.mark.parametrize("name", sorted(_SPELLINGS))
def test_batch_normalization_agrees_with_the_value_by_value_path(name: str) -> None:
    """Batches of printable ASCII are normalized in C-level passes: each value, alone or in
    a batch, gets what its own normalization gives, and a bad value still fails at its
    index with its reason (the batch then takes the value-by-value path)."""
    from deid.kinds import KINDS, _Invalid, normalize, normalize_many

    kind = KINDS[name]
    good, answers = [], []
    for value in _SPELLINGS[name]:
        try:
            expected = normalize(kind, value)
        except _Invalid as exc:
            with pytest.raises(_Invalid, match=re.escape(str(exc))) as got:
                normalize_many(kind, [*good[:2], value])
            assert got.value.index == len(good[:2])
            continue
        assert normalize_many(kind, [value]) == [expected]
        good.append(value)
        answers.append(expected)
    assert len(good) >= 4
    assert normalize_many(kind, good) == answers
    with pytest.raises(_Invalid, match="longer than"):
        normalize_many(kind, [*good, "1" * (kind.max_length + 1)])


def test_token_bodies_are_base32_and_use_every_character() -> None:
    from deid.kinds import KINDS

    for name in ("email", "name", "string"):
        kind = KINDS[name]
        tokens = kind.new_tokens(2000, [""] * 2000)
        assert len(set(tokens)) == 2000 and all(map(kind.token_pattern.fullmatch, tokens))
    body = "".join(t[:24] for t in KINDS["email"].new_tokens(2000, [""] * 2000))
    assert set(body) == set("abcdefghijklmnopqrstuvwxyz234567")


def test_random_digits_are_uniform_even_where_a_bound_does_not_divide_2_to_the_64() -> None:
    """Attack on the batch draw: `x % bound` over 64-bit draws favours the low values when
    2**64 is not a multiple of the bound. With a bound of 3 * 2**62 the low third would get a
    quarter more draws (mean 0.417 of the bound); rejection sampling keeps it at 0.5."""
    bound = 3 << 62
    draws = kinds._uniform_below(40_000, bound)
    assert all(0 <= d < bound for d in draws) and len(draws) == 40_000
    mean = sum(draws) / len(draws) / bound
    assert abs(mean - 0.5) < 0.01, mean


@pytest.mark.parametrize("kind", ["phone", "ssn", "card"])
def test_short_token_formats_use_every_digit_position(kind: str) -> None:
    tokens = kinds.KINDS[kind].new_tokens(5000, ["4111111111111111"] * 5000)
    digits = ["".join(ch for ch in t if ch.isdigit()) for t in tokens]
    varying = [len({d[i] for d in digits}) for i in range(len(digits[0]))]
    # Fixed positions: the +999 prefix, the card's leading 9 and kept last four; the SSN's
    # area starts 9 and its group's first digit is 0-4.
    expected = {"phone": [1, 1, 1] + [10] * 12, "ssn": [1, 5, 10, 5, 10, 10, 10, 10, 10],
                "card": [1] + [10] * 11 + [1, 1, 1, 1]}[kind]
    assert varying == expected
