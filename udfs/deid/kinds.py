"""Kinds of sensitive value: how each is normalized, validated, and what its tokens look like.

A *kind spec* is what SQL passes as the second argument of ``deid.tokenize``:
``"<kind>"`` or ``"<kind>:<domain>"``. Tokens of one domain converge (same normalized
value, same token); the default domain is the kind itself, so an email joins across every
table. A separate domain (``"email:marketing"``) gives unlinkable tokens for the same values.

Normalization is what makes one person one token: it maps the spellings of one value to
one *match key* (what the fingerprint is computed over) and one *canonical* form (what the
vault stores and detokenize returns). Both are documented per kind in the README.

Token formats (all random; nothing in a token is computed from the value except a card
token's last four digits, which PCI DSS allows to be shown):

======== ======================================= =====================================
kind     token                                   why that shape
======== ======================================= =====================================
email    ``<24 base32>@deid.invalid``            valid address in a reserved TLD
phone    ``+999`` + 12 digits                    E.164-shaped; 999 is a reserved code
ssn      ``9AA-GG-SSSS``, AA 50-99, GG 00-49     area 9xx is never issued; GG is
                                                 outside every ITIN group range
card     ``9`` + 11 digits + last four           16 digits, MII 9, always fails Luhn
name     ``name_<24 base32>``                    recognizable prefix
address  ``addr_<24 base32>``
date     ``date_<24 base32>``
number   ``num_<24 base32>``
timestamp ``ts_<24 base32>``
string   ``str_<24 base32>``
======== ======================================= =====================================
"""

from __future__ import annotations

import datetime as _dt
import decimal
import re
import secrets
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat

from .errors import InvalidKindError

# Crockford-free: the standard base32 alphabet, lowercased. 24 chars of 5 random bits: 120 bits.
_TOKEN_CHARS = 24
RANDOM_TOKEN_BITS = 5 * _TOKEN_CHARS


class _Invalid(ValueError):
    """Internal: a value failed its kind's rules. The reason never contains the value."""

    index: int = -1  # position in the batch, set by normalize_many


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    max_length: int  # of the raw value, in characters, before normalization
    normalize: Callable[[str], tuple[str, str]]  # value -> (canonical, match_key)
    new_tokens: Callable[[int, list[str]], list[str]]  # (n, canonicals) -> n fresh tokens
    token_pattern: re.Pattern[str]
    # Random bits in each fresh token: at RANDOM_TOKEN_BITS, a fresh token is unique by chance
    # (see VaultStore.insert_tokens); below it (phone, SSN, card formats), stores look it up.
    random_bits: int = 0


@dataclass(frozen=True, slots=True)
class KindSpec:
    kind: Kind
    domain: str

    @property
    def name(self) -> str:
        return self.kind.name


# ---------------------------------------------------------------------------------------
# random token bodies


# Each random byte picks one character: 256 is a multiple of 32, so byte % 32 is uniform
# and a character carries 5 random bits, as in base32 (whose pure-Python encoder cost more
# than a microsecond per token).
_B32_OF_BYTE = b"abcdefghijklmnopqrstuvwxyz234567" * 8


def _base32_bodies(n: int, suffix: str = "") -> list[str]:
    """n random 24-character lowercase base32 strings (each followed by `suffix`) from one
    CSPRNG read."""
    text = secrets.token_bytes(_TOKEN_CHARS * n).translate(_B32_OF_BYTE).decode("ascii")
    return [text[i : i + _TOKEN_CHARS] + suffix for i in range(0, _TOKEN_CHARS * n, _TOKEN_CHARS)]


def _uniform_below(n: int, bound: int) -> list[int]:
    """n integers uniformly distributed in [0, bound) (bound ≤ 2**64), from CSPRNG reads of
    8 bytes each: a draw at or above the largest multiple of `bound` is redrawn (rejection
    sampling, so no value is likelier than another), which for the bounds here happens
    about once in 10**7 draws. One read per batch: `secrets.randbelow` per value cost a
    microsecond or more a token."""
    limit = (1 << 64) // bound * bound
    out: list[int] = []
    while len(out) < n:
        draws = memoryview(secrets.token_bytes(8 * (n - len(out)))).cast("Q")
        out += [x % bound for x in draws if x < limit]
    return out


def _random_digits(n: int, width: int) -> list[str]:
    """n random strings of `width` decimal digits, uniformly distributed."""
    fmt = f"{{:0{width}d}}"
    return list(map(fmt.format, _uniform_below(n, 10**width)))


def _email_tokens(n: int, _canonicals: list[str]) -> list[str]:
    return _base32_bodies(n, "@deid.invalid")


def _phone_tokens(n: int, _canonicals: list[str]) -> list[str]:
    return ["+999" + d for d in _random_digits(n, 12)]


def _ssn_tokens(n: int, _canonicals: list[str]) -> list[str]:
    # area 950-999, group 00-49, serial 0000-9999: one uniform draw over the 25 M of them.
    out = []
    for draw in _uniform_below(n, 50 * 50 * 10_000):
        area, rest = divmod(draw, 50 * 10_000)
        group, serial = divmod(rest, 10_000)
        out.append(f"{950 + area:03d}-{group:02d}-{serial:04d}")
    return out


def _luhn_sum(digits: str, doubled: int) -> int:
    """Luhn's digit sum, doubling the digits at positions (from the right) of parity `doubled`."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == doubled:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total


def luhn_valid(digits: str) -> bool:
    """Whether the last digit of `digits` is its Luhn check digit (card numbers, NPIs)."""
    return _luhn_sum(digits, 1) % 10 == 0


def luhn_check_digit(body: str) -> str:
    """The Luhn check digit to append to `body` (the synthetic data makes valid numbers)."""
    return str((10 - _luhn_sum(body, 0) % 10) % 10)


def _card_tokens(n: int, canonicals: list[str]) -> list[str]:
    out = []
    for canonical, middle in zip(canonicals, _random_digits(n, 11), strict=True):
        token = "9" + middle + canonical[-4:]
        if luhn_valid(token):
            # Any single-digit change breaks Luhn: the token can never pass as a card number.
            bumped = (int(token[11]) + 1) % 10
            token = token[:11] + str(bumped) + token[12:]
        out.append(token)
    return out


# ---------------------------------------------------------------------------------------
# normalization


_WS = re.compile(r"\s+")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_PHONE_SEPARATORS = re.compile(r"[\s().\-/]")
_DIGITS = re.compile(r"[0-9]+")
_SSN = re.compile(r"([0-9]{3})-?([0-9]{2})-?([0-9]{4})")
_CARD_SEPARATORS = re.compile(r"[\s\-]")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")


# C0/C1 control characters other than tab and newlines: corruption, not a spelling. Refuse
# rather than silently mint a token for garbage.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _nfkc(value: str) -> str:
    # ASCII is its own NFKC form; isascii() is a flag CPython keeps, so this skips the call.
    return value if value.isascii() else unicodedata.normalize("NFKC", value)


def _check_text(value: str) -> None:
    if _CONTROL.search(value):
        raise _Invalid("contains a control character")


# Invisible format characters (Unicode category Cf): bidi embeddings, overrides and isolates,
# marks (LRM, RLM, ALM), zero-width space, word joiner, BOM, soft hyphen, invisible operators.
# Rendered, "a\u200b@x.com" and "a@x.com" are the same address, so they must be the same
# person: every kind drops these from what it fingerprints. ZWJ and ZWNJ (U+200C, U+200D)
# change how some scripts and emoji render, so names, addresses and strings keep them in the
# canonical form they store and ignore them only for matching; every other kind drops them.
_INVISIBLE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
                        "\u2066-\u206f\ufeff\ufff9-\ufffb]")
_JOINERS = re.compile("[\u200c\u200d]")
_INVISIBLE_NOT_JOINERS = re.compile("[\u00ad\u061c\u180e\u200b\u200e\u200f\u202a-\u202e"
                                    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]")


def _visible(value: str) -> str:
    """The value without invisible format characters (fast path: most values have none)."""
    if value.isascii():  # every invisible format character is outside ASCII
        return value
    return _INVISIBLE.sub("", value) if _INVISIBLE.search(value) else value


def _norm_email(value: str) -> tuple[str, str]:
    v = _visible(_nfkc(value)).strip().lower()
    if not _EMAIL.fullmatch(v):
        raise _Invalid("is not an email address (expected exactly one '@' and a dotted domain)")
    return v, v


def _norm_phone(value: str) -> tuple[str, str]:
    v = _PHONE_SEPARATORS.sub("", _visible(_nfkc(value)))
    plus = v.startswith("+")
    digits = v[1:] if plus else v
    if not _DIGITS.fullmatch(digits or "x"):
        raise _Invalid("is not a phone number (only digits, spaces, + ( ) . - / are allowed)")
    if not plus:
        # North American numbers arrive without a country code; treat them as +1.
        if len(digits) == 10:
            digits = "1" + digits
        elif not (len(digits) == 11 and digits[0] == "1"):
            raise _Invalid("is not a phone number (10 digits, 1 + 10 digits, or +<country code>)")
    if not 8 <= len(digits) <= 15:
        raise _Invalid("is not a phone number (E.164 allows 8 to 15 digits)")
    e164 = "+" + digits
    return e164, e164


def _norm_ssn(value: str) -> tuple[str, str]:
    m = _SSN.fullmatch(_visible(value).strip())
    if not m:
        raise _Invalid("is not an SSN (expected 9 digits, optionally as AAA-GG-SSSS)")
    v = f"{m[1]}-{m[2]}-{m[3]}"
    return v, v


def _norm_card(value: str) -> tuple[str, str]:
    v = _CARD_SEPARATORS.sub("", _visible(value))
    if not _DIGITS.fullmatch(v or "x") or not 12 <= len(v) <= 19:
        raise _Invalid("is not a card number (12 to 19 digits, spaces or dashes allowed)")
    # No Luhn check: a mistyped number in landing data is still cardholder data to protect.
    return v, v


def _norm_words(value: str) -> tuple[str, str]:
    v = _nfkc(value)
    if _INVISIBLE.search(v):
        v = _INVISIBLE_NOT_JOINERS.sub("", v)
        v = _WS.sub(" ", v).strip()
        return v, _JOINERS.sub("", v).casefold()
    v = _WS.sub(" ", v).strip()
    return v, v.casefold()


def _norm_date(value: str) -> tuple[str, str]:
    m = _DATE.fullmatch(_visible(value).strip())
    try:
        if not m:
            raise ValueError
        d = _dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        raise _Invalid("is not a date (expected YYYY-MM-DD)") from None
    v = d.isoformat()
    return v, v


def _norm_string(value: str) -> tuple[str, str]:
    v = value if value.isascii() else unicodedata.normalize("NFC", value)
    if _INVISIBLE.search(v):
        v = _INVISIBLE_NOT_JOINERS.sub("", v)
        return v, _JOINERS.sub("", v)
    return v, v


_NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_MAX_NUMBER_DIGITS = 64
# Exact: the default context (28 digits) would round NUMERIC(38,x) values into collisions.
_EXACT = decimal.Context(prec=2 * _MAX_NUMBER_DIGITS + 2, traps=[decimal.Inexact])


def _norm_number(value: str) -> tuple[str, str]:
    """Canonical decimal: ``12.50``, ``12.5`` and ``1.25e1`` are one number, ``12.5``.

    Text, not a float: a float cannot hold every decimal a warehouse stores (NUMERIC(38,10)),
    and two engines print one float differently. No thousands separators (``1,000`` reads as
    1 or 1000 depending on the locale), no NaN or infinities (not a person's data)."""
    v = _visible(value).strip()
    if not _NUMBER.fullmatch(v):
        raise _Invalid("is not a number (expected digits with an optional sign, decimal point "
                       "and exponent; no thousands separators)")
    try:
        d = decimal.Decimal(v)
        if d.adjusted() > _MAX_NUMBER_DIGITS or d.adjusted() < -_MAX_NUMBER_DIGITS:
            raise _Invalid(f"is not a number deid keeps (more than {_MAX_NUMBER_DIGITS} "
                           "digits before or after the decimal point)")
        if d.is_zero():
            return "0", "0"  # -0, 0.000 and 0e5 are all zero
        text = format(d.normalize(_EXACT), "f")
    except decimal.DecimalException:
        raise _Invalid("is not a number") from None
    return text, text


def _norm_timestamp(value: str) -> tuple[str, str]:
    """UTC ISO 8601 with a ``Z``: one instant, one token, whatever TimeZone printed it.

    ``2024-01-02 03:04:05+02`` and ``2024-01-02T01:04:05Z`` are one instant. A value without
    an offset is taken as UTC (Redshift's TIMESTAMP and DuckDB's TIMESTAMP have no zone);
    cast a ``timestamptz`` to text with its offset, never to a zoneless timestamp first."""
    v = _visible(value).strip()
    try:
        ts = _dt.datetime.fromisoformat(v)
    except ValueError:
        raise _Invalid("is not a timestamp (expected ISO 8601, e.g. 2024-01-02 03:04:05+02)") \
            from None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=_dt.UTC)
    ts = ts.astimezone(_dt.UTC)
    spec = "microseconds" if ts.microsecond else "seconds"
    text = ts.replace(tzinfo=None).isoformat(timespec=spec) + "Z"
    return text, text


_B32 = "[a-z2-7]{24}"


def _prefixed(name: str, max_length: int, normalize: Callable[[str], tuple[str, str]],
              prefix: str) -> Kind:
    """A kind whose tokens are `prefix` and 24 random base32 characters: its generator, its
    pattern and its claim of RANDOM_TOKEN_BITS come from the one prefix."""
    def make(n: int, _canonicals: list[str]) -> list[str]:
        return [prefix + body for body in _base32_bodies(n)]

    return Kind(name, max_length, normalize, make, re.compile(prefix + _B32), RANDOM_TOKEN_BITS)


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("email", 254, _norm_email, _email_tokens, re.compile(_B32 + r"@deid\.invalid"),
             RANDOM_TOKEN_BITS),
        Kind("phone", 32, _norm_phone, _phone_tokens, re.compile(r"\+999[0-9]{12}")),
        Kind("ssn", 16, _norm_ssn, _ssn_tokens, re.compile(r"9[5-9][0-9]-[0-4][0-9]-[0-9]{4}")),
        Kind("card", 32, _norm_card, _card_tokens, re.compile(r"9[0-9]{15}")),
        _prefixed("name", 256, _norm_words, "name_"),
        _prefixed("address", 512, _norm_words, "addr_"),
        _prefixed("date", 32, _norm_date, "date_"),
        _prefixed("number", 128, _norm_number, "num_"),
        _prefixed("timestamp", 64, _norm_timestamp, "ts_"),
        _prefixed("string", 4096, _norm_string, "str_"),
    )
}

_DOMAIN = re.compile(r"[a-z][a-z0-9_]{0,62}")


@lru_cache(maxsize=256)
def parse_kind(spec: str) -> KindSpec:
    """Parse ``"kind"`` or ``"kind:domain"``; raises InvalidKindError naming what is wrong."""
    if not isinstance(spec, str):
        raise InvalidKindError("deid.tokenize: the kind argument must be text, e.g. 'email'")
    name, sep, domain = spec.strip().lower().partition(":")
    kind = KINDS.get(name)
    if kind is None:
        raise InvalidKindError(
            # Not echoed: a kind taken from a column by mistake could be a sensitive value.
            f"deid.tokenize: unknown kind (not shown); expected one of {', '.join(KINDS)} "
            "(optionally followed by ':<domain>'); the dbt macro names it at compile time"
        )
    if not sep:
        domain = name
    elif not _DOMAIN.fullmatch(domain):
        raise InvalidKindError(
            f"deid.tokenize: kind {name!r} has an invalid domain; a domain is 1-63 characters "
            "of a-z, 0-9 and _, starting with a letter"
        )
    return KindSpec(kind, domain)


def normalize(kind: Kind, value: str) -> tuple[str, str]:
    """(canonical, match_key) for a value of `kind`; raises _Invalid with a value-free reason."""
    if len(value) > kind.max_length:
        raise _Invalid(f"is longer than the {kind.name} limit of {kind.max_length} characters")
    _check_text(value)
    return kind.normalize(value)


# Batch paths (hot: a vector of new values) for batches of printable ASCII, which needs no
# Unicode normalization and holds no invisible or control character and no whitespace but
# the space. Each gives exactly what the kind's value-by-value function gives, or None when
# some value needs that function (which then finds the row and the reason).

def _plain_ascii(values: list[str], limit: int) -> bool:
    joined = "".join(values)
    return joined.isascii() and joined.isprintable() and max(map(len, values), default=0) <= limit


def _emails_fast(values: list[str]) -> list[tuple[str, str]] | None:
    out = list(map(str.lower, map(str.strip, values)))
    if not all(map(_EMAIL.fullmatch, out)):
        return None
    return list(zip(out, out, strict=True))


_PHONE_DROP = str.maketrans("", "", " ().-/")  # _PHONE_SEPARATORS, in printable ASCII
# +<8 to 15 digits>, 10 digits (North American: +1 goes first), or 1 and 10 digits
_PHONE_FAST = re.compile(r"\+[0-9]{8,15}|[0-9]{10}|1[0-9]{10}")


def _phones_fast(values: list[str]) -> list[tuple[str, str]] | None:
    bare = list(map(str.translate, values, repeat(_PHONE_DROP)))
    if not all(map(_PHONE_FAST.fullmatch, bare)):
        return None
    out = [d if d[0] == "+" else ("+1" + d if len(d) == 10 else "+" + d) for d in bare]
    return list(zip(out, out, strict=True))


_SSN_FAST = re.compile(r"[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{9}")


def _ssns_fast(values: list[str]) -> list[tuple[str, str]] | None:
    bare = list(map(str.strip, values))
    if not all(map(_SSN_FAST.fullmatch, bare)):
        return None
    out = [v if len(v) == 11 else f"{v[:3]}-{v[3:5]}-{v[5:]}" for v in bare]
    return list(zip(out, out, strict=True))


_BATCH_PATHS: dict[str, Callable[[list[str]], list[tuple[str, str]] | None]] = {
    "email": _emails_fast, "phone": _phones_fast, "ssn": _ssns_fast}


def normalize_many(kind: Kind, values: list[str]) -> list[tuple[str, str]]:
    """`normalize` over a batch; on failure raises _Invalid with `.index` set (hot path)."""
    batch = _BATCH_PATHS.get(kind.name)
    if batch is not None and _plain_ascii(values, kind.max_length):
        out = batch(values)
        if out is not None:
            return out
    limit, check, norm = kind.max_length, _CONTROL.search, kind.normalize
    out = []
    for i, value in enumerate(values):
        try:
            if len(value) > limit:
                raise _Invalid(f"is longer than the {kind.name} limit of {limit} characters")
            # A printable string has no control character: skip the regex for almost all.
            if not value.isprintable() and check(value):
                raise _Invalid("contains a control character")
            out.append(norm(value))
        except _Invalid as exc:
            exc.index = i
            raise
    return out


def kind_of_token(token: str, *, validate: bool = True) -> Kind | None:
    """The kind whose token format `token` has, or None. Cheap checks first; `validate=False`
    classifies a token already known to be valid without the full pattern match."""
    if token.endswith("@deid.invalid"):
        k = KINDS["email"]
    elif token.startswith("+999"):
        k = KINDS["phone"]
    elif token.startswith("name_"):
        k = KINDS["name"]
    elif token.startswith("addr_"):
        k = KINDS["address"]
    elif token.startswith("date_"):
        k = KINDS["date"]
    elif token.startswith("str_"):
        k = KINDS["string"]
    elif token.startswith("num_"):
        k = KINDS["number"]
    elif token.startswith("ts_"):
        k = KINDS["timestamp"]
    elif len(token) == 11:
        k = KINDS["ssn"]
    elif len(token) == 16:
        k = KINDS["card"]
    else:
        return None
    return k if not validate or k.token_pattern.fullmatch(token) else None


# What sets each kind's valid tokens apart from every other kind's: (prefix, suffix).
_SIGNATURES = {"email": ("", "@deid.invalid"), "phone": ("+999", ""), "name": ("name_", ""),
               "address": ("addr_", ""), "date": ("date_", ""), "number": ("num_", ""),
               "timestamp": ("ts_", ""), "string": ("str_", "")}


def common_kind(tokens: list[str]) -> Kind | None:
    """The kind of every token in `tokens`, which must all be valid tokens already, or None
    when they are not all of one kind that a prefix or suffix tells. One C-level pass: a
    DuckDB vector of one column's tokens is classified without a Python call per token."""
    first = kind_of_token(tokens[0], validate=False) if tokens else None
    signature = _SIGNATURES.get(first.name) if first is not None else None
    if signature is None:
        return None
    prefix, suffix = signature
    test, mark = (str.startswith, prefix) if prefix else (str.endswith, suffix)
    return first if all(map(test, tokens, repeat(mark))) else None


def is_token(token: str, kind: str | None = None) -> bool:
    """True when `token` has the shape of a deid token (of `kind`, when given)."""
    k = kind_of_token(token)
    if k is None:
        return False
    if k.name == "card" and luhn_valid(token):
        return False
    return kind is None or k.name == kind
