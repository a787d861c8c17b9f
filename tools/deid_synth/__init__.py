"""Synthetic landing data for a fictional nationwide retail pharmacy chain.

Every value written by this module is synthetic, and every identifier is drawn from a range
that can never belong to a real person:

* **SSNs** use area numbers 900-949 with group numbers 01-49 (950-999 are left to deid's
  SSN tokens, so a synthetic value can never equal a token). The SSA has never issued an
  area number of 900 or above, and the IRS uses 9xx only for ITINs/ATINs, whose group
  numbers are 50-65, 70-88, 90-92 and 94-99: 9xx-01..49 is neither an SSN nor an ITIN.
  Each person gets a distinct number from a counter scrambled over the
  50 x 49 x 9,999 = 24,497,550 available values.
* **Card numbers** start with well-known test prefixes (Visa 411111/424242, Mastercard
  555555/510510, Amex 378282/371449, i.e. the BINs of the published test numbers
  4111 1111 1111 1111, 5555 5555 5555 4444, 3782 822463 10005 ...), with random middle
  digits and a correct Luhn check digit: 16 digits for Visa/Mastercard, 15 for Amex.
* **Phone numbers** use exchange 555. North American Numbering Plan lines 555-0100 through
  555-0199 are reserved for fiction in every area code; area codes are NXX codes in a real
  format (no N11, N9X, 37X, 96X or easily-recognisable NXX codes). Person *p* gets a
  distinct 555-01XX number while *p* < 63,000 (630 area codes x 100 lines). Because
  benchmarks at 10^5-10^6 distinct people need more distinct phones than that, persons
  beyond the first 63,000 get exchange 555 with any other 4-digit line (555-0000..9999
  except 01XX), which are not assigned to subscribers (the 555 exchange is set aside for
  directory assistance and information services); this gives about 6.2 million more
  distinct numbers, after which phones repeat.
* **Emails** are at ``example.com``, ``example.net`` and ``example.org``, reserved by RFC 2606
  and never deliverable. The local part ends with the person's number, so emails are
  distinct per person.
* **Prescriber NPIs** are 10 digits starting with 1 or 2 whose check digit is deliberately
  wrong (an NPI's last digit is a Luhn check over ``80840`` + the first nine digits), so
  none can be a real, issued NPI. **NDC codes** are random digits in the 5-4-2 layout.
* **Names, streets and cities** are combined from Faker's en_US data tables (first names,
  last names, street suffixes, city prefixes/suffixes, zip ranges per state); any
  resemblance to a real person is a coincidence. Drug names and ICD-10 codes are real
  vocabulary (they are not identifiers).

Output is deterministic: the same arguments give the same bytes. Pools are sampled from
Faker's static data tables with ``random.Random`` (Faker's own seeded generator is not
used, because Faker does not promise identical seeded output across versions; the
tables change rarely). Customer rows are pure functions of ``(seed, person number, row
number)`` computed with a 64-bit mixing hash, so rows are streamed in chunks and memory
stays flat at any scale; the order stream (orders, prescriptions, payments) comes from
one ``random.Random`` consumed identically whatever subset of tables is written.

``distinct_ratio`` r makes ``round(customers * r)`` distinct persons; every customer row
is an exact copy of one person's PII (name, email, phone, SSN, date of birth, address),
every person appears at least once, and every row keeps its own ``customer_id`` and
``created_at``.

Usage::

    python -m deid_synth --out DIR --customers N [--seed S] [--distinct-ratio R]
                         [--tables customers,orders]
"""

from __future__ import annotations

import argparse
import bisect
import csv
import datetime as dt
import functools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deid.kinds import luhn_check_digit

ALL_TABLES: tuple[str, ...] = ("customers", "stores", "orders", "prescriptions", "payments")

COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": (
        "customer_id",
        "full_name",
        "email",
        "phone",
        "ssn",
        "date_of_birth",
        "street_address",
        "city",
        "state",
        "zip",
        "region",
        "created_at",
    ),
    "stores": ("store_id", "store_name", "city", "state", "region"),
    "orders": (
        "order_id",
        "customer_id",
        "store_id",
        "ordered_at",
        "channel",
        "status",
        "order_total",
    ),
    "prescriptions": (
        "prescription_id",
        "order_id",
        "customer_id",
        "drug_name",
        "ndc_code",
        "diagnosis_code",
        "prescriber_name",
        "prescriber_npi",
        "filled_at",
        "days_supply",
        "quantity",
        "copay",
    ),
    "payments": (
        "payment_id",
        "order_id",
        "card_number",
        "card_expiry",
        "card_brand",
        "amount",
        "paid_at",
    ),
}

_ORDER_TABLES = frozenset({"orders", "prescriptions", "payments"})
_CHUNK = 10_000

# --------------------------------------------------------------------------- geography

# fmt: off
_REGION_STATES: dict[str, tuple[str, ...]] = {
    "Northeast": ("CT", "ME", "MA", "NH", "RI", "VT", "NJ", "NY", "PA"),
    "Southeast": (
        "DE", "DC", "MD", "VA", "WV", "NC", "SC", "GA", "FL", "KY", "TN", "AL", "MS", "AR", "LA",
    ),
    "Midwest": ("OH", "IN", "IL", "MI", "WI", "MN", "IA", "MO", "ND", "SD", "NE", "KS"),
    "Southwest": ("AZ", "NM", "TX", "OK"),
    "West": ("CO", "WY", "MT", "ID", "WA", "OR", "UT", "NV", "CA", "AK", "HI"),
}
REGION_BY_STATE: dict[str, str] = {
    state: region for region, states in _REGION_STATES.items() for state in states
}

# Approximate 2020 census population in units of 100,000 (weights for picking a state).
_STATE_WEIGHTS: dict[str, int] = {
    "AL": 50, "AK": 7, "AZ": 72, "AR": 30, "CA": 395, "CO": 58, "CT": 36, "DE": 10, "DC": 7,
    "FL": 215, "GA": 107, "HI": 15, "ID": 18, "IL": 128, "IN": 68, "IA": 32, "KS": 29,
    "KY": 45, "LA": 47, "ME": 14, "MD": 62, "MA": 70, "MI": 101, "MN": 57, "MS": 30, "MO": 62,
    "MT": 11, "NE": 20, "NV": 31, "NH": 14, "NJ": 93, "NM": 21, "NY": 202, "NC": 104, "ND": 8,
    "OH": 118, "OK": 40, "OR": 42, "PA": 130, "RI": 11, "SC": 51, "SD": 9, "TN": 69, "TX": 291,
    "UT": 33, "VT": 6, "VA": 86, "WA": 77, "WV": 18, "WI": 59, "WY": 6,
}
# fmt: on
_STATES: tuple[str, ...] = tuple(_STATE_WEIGHTS)


def _area_codes() -> tuple[str, ...]:
    """NANP-format area codes: NXX with N in 2-9, no N11, N9X, 37X, 96X or NXX with X == X."""
    codes = []
    for n in range(2, 10):
        for x1 in range(9):
            for x2 in range(10):
                if x1 == x2 or (x1 == 1 and x2 == 1):
                    continue  # easily-recognisable codes (N00, N22, 800, 888 ...) and N11
                if (n, x1) in ((3, 7), (9, 6)):
                    continue  # 37X and 96X are reserved
                codes.append(f"{n}{x1}{x2}")
    return tuple(codes)


_AREA_CODES = _area_codes()
_PHONE_FICTIONAL = len(_AREA_CODES) * 100  # 555-0100 .. 555-0199 in every area code
_PHONE_OTHER = len(_AREA_CODES) * 9_900  # 555-0000 .. 555-9999 except 01XX

_SSN_SERIALS = 9_999
_SSN_CAPACITY = 50 * 49 * _SSN_SERIALS  # areas 900-949, groups 01-49, serials 0001-9999

# --------------------------------------------------------------------------- pharmacy vocab

# (drug, units dispensed per 30 days, ICD-10-CM codes it is commonly prescribed for)
_DRUGS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("atorvastatin 20 mg tablet", 30, ("E78.5", "E78.00", "E78.2")),
    ("lisinopril 10 mg tablet", 30, ("I10",)),
    ("metformin 500 mg tablet", 60, ("E11.9", "E11.65", "R73.03")),
    ("levothyroxine 50 mcg tablet", 30, ("E03.9", "E89.0")),
    ("amlodipine 5 mg tablet", 30, ("I10",)),
    ("metoprolol succinate ER 50 mg tablet", 30, ("I10", "I25.10", "I48.91")),
    ("albuterol HFA 90 mcg inhaler", 1, ("J45.909", "J44.1")),
    ("omeprazole 20 mg capsule", 30, ("K21.9",)),
    ("losartan 50 mg tablet", 30, ("I10", "E11.22")),
    ("gabapentin 300 mg capsule", 90, ("G62.9", "M54.50")),
    ("hydrochlorothiazide 25 mg tablet", 30, ("I10",)),
    ("sertraline 50 mg tablet", 30, ("F32.9", "F41.1", "F43.10")),
    ("simvastatin 20 mg tablet", 30, ("E78.5", "E78.00")),
    ("montelukast 10 mg tablet", 30, ("J45.909", "J30.9")),
    ("escitalopram 10 mg tablet", 30, ("F41.1", "F32.9")),
    ("rosuvastatin 10 mg tablet", 30, ("E78.00", "E78.5")),
    ("bupropion XL 150 mg tablet", 30, ("F32.9",)),
    ("furosemide 40 mg tablet", 30, ("I50.9",)),
    ("pantoprazole 40 mg tablet", 30, ("K21.9",)),
    ("fluticasone 50 mcg nasal spray", 1, ("J30.9",)),
    ("tamsulosin 0.4 mg capsule", 30, ("N40.0",)),
    ("trazodone 50 mg tablet", 30, ("G47.00", "F32.9")),
    ("meloxicam 15 mg tablet", 30, ("M19.90", "M54.50")),
    ("clopidogrel 75 mg tablet", 30, ("I25.10",)),
    ("prednisone 10 mg tablet", 30, ("M06.9", "J44.1")),
    ("citalopram 20 mg tablet", 30, ("F32.9", "F41.1")),
    ("glipizide 5 mg tablet", 60, ("E11.9", "E11.65")),
    ("carvedilol 12.5 mg tablet", 60, ("I50.9", "I10")),
    ("warfarin 5 mg tablet", 30, ("I48.91",)),
    ("apixaban 5 mg tablet", 60, ("I48.91",)),
    ("amoxicillin 500 mg capsule", 90, ("J02.9", "J01.90")),
    ("azithromycin 250 mg tablet", 6, ("J20.9", "J01.90")),
    ("cephalexin 500 mg capsule", 120, ("L03.90",)),
    ("ciprofloxacin 500 mg tablet", 60, ("N39.0",)),
    ("insulin glargine 100 units/mL pen", 5, ("E11.65", "E11.9")),
    ("pravastatin 40 mg tablet", 30, ("E78.5",)),
    ("cyclobenzaprine 10 mg tablet", 90, ("M62.830",)),
    ("allopurinol 100 mg tablet", 30, ("M10.9",)),
    ("venlafaxine ER 75 mg capsule", 30, ("F41.1", "F32.9")),
    ("spironolactone 25 mg tablet", 30, ("I50.9", "I10")),
    ("sumatriptan 50 mg tablet", 9, ("G43.909",)),
    ("hydroxyzine HCl 25 mg tablet", 90, ("L29.9", "F41.1")),
    ("ondansetron 4 mg tablet", 30, ("R11.2",)),
    ("ergocalciferol 50,000 unit capsule", 4, ("E55.9",)),
    ("latanoprost 0.005% eye drops", 1, ("H40.9",)),
    ("ferrous sulfate 325 mg tablet", 30, ("D50.9",)),
    ("potassium chloride ER 20 mEq tablet", 30, ("E87.6",)),
)

_CARD_PREFIXES: dict[str, tuple[str, ...]] = {
    "visa": ("411111", "424242"),
    "mastercard": ("555555", "510510"),
    "amex": ("378282", "371449"),
}
CARD_TEST_PREFIXES: tuple[str, ...] = tuple(p for ps in _CARD_PREFIXES.values() for p in ps)
RESERVED_EMAIL_DOMAINS: tuple[str, ...] = ("example.com", "example.net", "example.org")

# --------------------------------------------------------------------------- time

_EPOCH = dt.date(2020, 1, 1)  # day 0 of every timestamp below
_DAY = 86_400
_CREATED_DAYS = (dt.date(2026, 1, 1) - _EPOCH).days  # created_at in 2020-01-01 .. 2025-12-31
_ORDER_START = (dt.date(2024, 1, 1) - _EPOCH).days * _DAY
_ORDER_END = _CREATED_DAYS * _DAY  # exclusive: ordered_at < 2026-01-01 00:00:00
_DOB_FIRST = dt.date(1935, 1, 2)  # 90 years old on 2026-01-01 (turns 91 on 2026-01-02)
_DOB_LAST = dt.date(2008, 1, 1)  # 18 years old on 2026-01-01


@functools.cache
def _calendar() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """ISO day strings from 2020-01-01, "HH:MM:SS" for each second of a day, ISO birth dates."""
    days = tuple((_EPOCH + dt.timedelta(days=d)).isoformat() for d in range(_CREATED_DAYS + 30))
    times = tuple(f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(_DAY))
    first = _DOB_FIRST.toordinal()
    dobs = tuple(
        dt.date.fromordinal(o).isoformat() for o in range(first, _DOB_LAST.toordinal() + 1)
    )
    return days, times, dobs


# --------------------------------------------------------------------------- hashing

_M64 = (1 << 64) - 1


def _mix(z: int) -> int:
    """SplitMix64: a fast, well-distributed 64-bit hash of an integer."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _coprime_step(n: int, hint: int) -> int:
    """A multiplier near ``hint`` that is coprime with ``n`` (so ``i * a mod n`` is a bijection)."""
    a = max(1, hint % n) if n > 1 else 1
    while math.gcd(a, n) != 1:
        a += 1
    return a


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True)
class _Pools:
    first: tuple[str, ...]  # 4096 display first names (frequency weighted)
    first_key: tuple[str, ...]  # same, lower-case letters only (for emails)
    last: tuple[str, ...]  # 4096
    last_key: tuple[str, ...]
    streets: tuple[str, ...]  # 4096 street names
    state_slots: tuple[int, ...]  # 1024 state indexes, population weighted
    cities: tuple[tuple[str, ...], ...]  # 32 city names per state index
    zips: tuple[tuple[tuple[str, ...], ...], ...]  # 4 zips per city per state index
    prescribers: tuple[tuple[str, str], ...]  # (name, npi)
    ndcs: tuple[tuple[str, ...], ...]  # 2 NDC codes per drug


def _letters(s: str) -> str:
    return "".join(c for c in s.lower() if "a" <= c <= "z")


@functools.lru_cache(maxsize=8)
def _pools(seed: int) -> _Pools:
    from faker.providers.address.en_US import Provider as Address
    from faker.providers.person.en_US import Provider as Person

    rng = random.Random(_mix(seed ^ 0x504F4F4C))  # noqa: S311 - synthetic data, not crypto

    def weighted(table: Any, k: int) -> list[str]:
        names = list(table)
        return rng.choices(names, weights=[float(table[n]) for n in names], k=k)

    first = weighted(Person.first_names_female, 2048) + weighted(Person.first_names_male, 2048)
    rng.shuffle(first)
    last = weighted(Person.last_names, 4096)
    suffixes = list(Address.street_suffixes)
    streets = [
        f"{rng.choice(first) if rng.random() < 0.5 else rng.choice(last)} {rng.choice(suffixes)}"
        for _ in range(4096)
    ]

    total = sum(_STATE_WEIGHTS.values())
    cum: list[float] = []
    acc = 0
    for state in _STATES:
        acc += _STATE_WEIGHTS[state]
        cum.append(acc / total)
    slots = tuple(bisect.bisect_right(cum, (k + 0.5) / 1024) for k in range(1024))
    assert set(slots) == set(range(len(_STATES)))

    prefixes = list(Address.city_prefixes)
    city_suffixes = list(Address.city_suffixes)

    def city() -> str:
        fmt = rng.randrange(4)  # the four en_US city formats
        if fmt == 0:
            return f"{rng.choice(prefixes)} {rng.choice(first)}{rng.choice(city_suffixes)}"
        if fmt == 1:
            return f"{rng.choice(prefixes)} {rng.choice(first)}"
        if fmt == 2:
            return f"{rng.choice(first)}{rng.choice(city_suffixes)}"
        return f"{rng.choice(last)}{rng.choice(city_suffixes)}"

    cities = []
    zips = []
    for state in _STATES:
        lo, hi = Address.states_postcode[state]
        cities.append(tuple(city() for _ in range(32)))
        zips.append(tuple(tuple(f"{rng.randint(lo, hi):05d}" for _ in range(4)) for _ in range(32)))

    prescribers = []
    for _ in range(512):
        body = str(rng.randint(1, 2)) + "".join(str(rng.randrange(10)) for _ in range(8))
        valid = int(luhn_check_digit("80840" + body))
        wrong = (valid + rng.randint(1, 9)) % 10  # never the real check digit
        name = f"Dr. {rng.choice(first)} {rng.choice(last)}"
        prescribers.append((name, f"{body}{wrong}"))

    ndcs = tuple(
        tuple(
            f"{rng.randrange(100_000):05d}-{rng.randrange(10_000):04d}-{rng.randrange(100):02d}"
            for _ in range(2)
        )
        for _ in _DRUGS
    )
    return _Pools(
        first=tuple(first),
        first_key=tuple(_letters(n) or "x" for n in first),
        last=tuple(last),
        last_key=tuple(_letters(n) or "x" for n in last),
        streets=tuple(streets),
        state_slots=slots,
        cities=tuple(cities),
        zips=tuple(zips),
        prescribers=tuple(prescribers),
        ndcs=ndcs,
    )


# --------------------------------------------------------------------------- persons


class _People:
    """Person number -> PII tuple, as a pure function of (seed, person number)."""

    def __init__(self, seed: int) -> None:
        self.pools = _pools(seed)
        self.k1 = _mix(seed ^ 0x0001)
        self.k2 = _mix(seed ^ 0x0002)
        self.k3 = _mix(seed ^ 0x0003)
        base = _mix(seed ^ 0x0004)
        self.ssn_a = _coprime_step(_SSN_CAPACITY, 0x5DEECE66D)
        self.ssn_b = base % _SSN_CAPACITY
        self.fic_a = _coprime_step(_PHONE_FICTIONAL, 0x2545F491)
        self.fic_b = (base >> 20) % _PHONE_FICTIONAL
        self.oth_a = _coprime_step(_PHONE_OTHER, 0x9E3779B1)
        self.oth_b = (base >> 40) % _PHONE_OTHER
        _days, _times, self.dobs = _calendar()

    def state_index(self, pid: int) -> int:
        return self.pools.state_slots[(_mix(self.k1 + pid) >> 24) & 1023]

    def ssn(self, pid: int, dashed: bool) -> str:
        if pid >= _SSN_CAPACITY:
            raise ValueError(f"more than {_SSN_CAPACITY} distinct persons: SSN range exhausted")
        x = (pid * self.ssn_a + self.ssn_b) % _SSN_CAPACITY
        area = 900 + x // (49 * _SSN_SERIALS)
        group = 1 + x // _SSN_SERIALS % 49
        serial = 1 + x % _SSN_SERIALS
        return f"{area}-{group:02d}-{serial:04d}" if dashed else f"{area}{group:02d}{serial:04d}"

    def phone_parts(self, pid: int) -> tuple[str, str]:
        if pid < _PHONE_FICTIONAL:
            x = (pid * self.fic_a + self.fic_b) % _PHONE_FICTIONAL
            return _AREA_CODES[x // 100], f"{100 + x % 100:04d}"
        x = ((pid - _PHONE_FICTIONAL) * self.oth_a + self.oth_b) % _PHONE_OTHER
        line = x % 9_900
        return _AREA_CODES[x // 9_900], f"{line if line < 100 else line + 100:04d}"

    def person(self, pid: int) -> tuple[str, ...]:
        p = self.pools
        h1 = _mix(self.k1 + pid)
        h2 = _mix(self.k2 + pid)
        h3 = _mix(self.k3 + pid)

        fi = h1 & 4095
        li = (h1 >> 12) & 4095
        si = p.state_slots[(h1 >> 24) & 1023]
        ci = (h1 >> 34) & 31
        street = p.streets[(h1 >> 41) & 4095]
        state = _STATES[si]

        first = p.first[fi]
        last = p.last[li]
        if (h3 >> 19) & 255 < 20:  # ~8 % carry a middle initial
            full_name = f"{first} {chr(65 + ((h3 >> 27) & 31) % 26)}. {last}"
        else:
            full_name = f"{first} {last}"

        fk = p.first_key[fi]
        lk = p.last_key[li]
        n = pid + 1
        fmt = (h2 >> 50) & 3
        if fmt == 0:
            local = f"{fk}.{lk}{n}"
        elif fmt == 1:
            local = f"{fk[0]}{lk}{n}"
        elif fmt == 2:
            local = f"{fk}_{lk}{n}"
        else:
            local = f"{lk}.{fk}{n}"
        dom = (h2 >> 52) & 3
        domain = RESERVED_EMAIL_DOMAINS[dom - 1 if dom else 0]
        messy = (h2 >> 42) & 255  # ~2 % need normalising
        if messy < 3:
            email = f"{local[0].upper()}{local[1:]}@{domain.capitalize()}"
        elif messy < 5:
            email = f" {local}@{domain} "
        else:
            email = f"{local}@{domain}"

        pf = (h2 >> 34) & 255
        if pf < 3:  # ~1 % missing
            phone = ""
        else:
            area, line = self.phone_parts(pid)
            if pf < 34:
                phone = f"{area}-555-{line}"
            elif pf < 52:
                phone = f"+1 {area} 555 {line}"
            else:
                phone = f"({area}) 555-{line}"

        ssn = self.ssn(pid, ((h2 >> 54) & 255) >= 8)  # ~3 % without dashes
        dob = self.dobs[(h2 & 0xFFFFF) % len(self.dobs)]
        house = ((h2 >> 20) & 16383) + 1
        if h3 & 255 < 20:
            unit = "Apt." if (h3 >> 18) & 1 else "Suite"
            address = f"{house} {street} {unit} {((h3 >> 8) & 1023) % 999 + 1}"
        else:
            address = f"{house} {street}"
        return (
            full_name,
            email,
            phone,
            ssn,
            dob,
            address,
            p.cities[si][ci],
            state,
            p.zips[si][ci][(h1 >> 39) & 3],
            REGION_BY_STATE[state],
        )


# --------------------------------------------------------------------------- generation


def _person_count(customers: int, distinct_ratio: float) -> int:
    return max(1, min(customers, round(customers * distinct_ratio)))


def _cents(c: int) -> str:
    return f"{c // 100}.{c % 100:02d}"


class _Rows:
    """Buffer rows for one CSV file and flush them in chunks."""

    def __init__(self, path: Path | None, table: str) -> None:
        self.count = 0
        self.buf: list[Sequence[object]] = []
        self.file = None if path is None else path.open("w", newline="", encoding="utf-8")
        self.writer = None
        if self.file is not None:
            self.writer = csv.writer(self.file, lineterminator="\n")
            self.writer.writerow(COLUMNS[table])

    def add(self, row: Sequence[object]) -> None:
        self.count += 1
        if self.writer is not None:
            self.buf.append(row)
            if len(self.buf) >= _CHUNK:
                self.flush()

    def flush(self) -> None:
        if self.writer is not None and self.buf:
            self.writer.writerows(self.buf)
        self.buf = []

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()


def _created_at_seconds(key: int, customer_id: int) -> int:
    return _mix(key + customer_id) % (_CREATED_DAYS * _DAY)


def _row_to_person(customers: int, persons: int, seed: int) -> tuple[int, int]:
    """(a, b) so that row i (0-based) is person ``(a * i + b) % customers % persons``."""
    if persons == customers:
        return 1, 0
    a = _coprime_step(customers, int(customers * 0.6180339887) + 1)
    return a, _mix(seed ^ 0x0005) % customers


def _write_customers(out: _Rows, customers: int, persons: int, seed: int, people: _People) -> None:
    days, times, _dobs = _calendar()
    a, b = _row_to_person(customers, persons, seed)
    key = _mix(seed ^ 0x0006)
    span = _CREATED_DAYS * _DAY
    person = people.person
    writer = out.writer
    for start in range(0, customers, _CHUNK):
        rows = []
        for i in range(start, min(start + _CHUNK, customers)):
            cid = i + 1
            created = _mix(key + cid) % span
            rows.append(
                (
                    cid,
                    *person((a * i + b) % customers % persons),
                    f"{days[created // _DAY]} {times[created % _DAY]}",
                )
            )
        if writer is not None:
            writer.writerows(rows)
        out.count += len(rows)


def _stores(
    customers: int, seed: int, pools: _Pools
) -> tuple[list[tuple[int, str, str, str, str]], list[tuple[int, ...]]]:
    """Store rows, and for each state index the store ids a resident shops at."""
    n = min(500, max(5, customers // 50))
    rng = random.Random(_mix(seed ^ 0x5702E5))  # noqa: S311 - synthetic data, not crypto
    weights = [_STATE_WEIGHTS[s] for s in _STATES]
    rows = []
    by_state: dict[int, list[int]] = {}
    by_region: dict[str, list[int]] = {}
    for sid in range(1, n + 1):
        si = rng.choices(range(len(_STATES)), weights=weights)[0]
        state = _STATES[si]
        city = rng.choice(pools.cities[si])
        rows.append((sid, f"Pharmacy #{sid:04d} {city}", city, state, REGION_BY_STATE[state]))
        by_state.setdefault(si, []).append(sid)
        by_region.setdefault(REGION_BY_STATE[state], []).append(sid)
    everything = list(range(1, n + 1))
    local = [
        tuple(by_state.get(si) or by_region.get(REGION_BY_STATE[s]) or everything)
        for si, s in enumerate(_STATES)
    ]
    return rows, local


def _card(rng: random.Random) -> tuple[str, str, str]:
    """(number, MM/YY expiry, brand) for a test-range card."""
    r = rng.random()
    brand = "visa" if r < 0.55 else "mastercard" if r < 0.85 else "amex"
    prefix = rng.choice(_CARD_PREFIXES[brand])
    length = 15 if brand == "amex" else 16
    k = length - len(prefix) - 1
    body = f"{prefix}{rng.randrange(10**k):0{k}d}"
    number = body + luhn_check_digit(body)
    r = rng.random()
    if r < 0.03:
        sep = " "
    elif r < 0.05:
        sep = "-"
    else:
        sep = ""
    if sep:
        if brand == "amex":
            number = sep.join((number[:4], number[4:10], number[10:]))
        else:
            number = sep.join(number[i : i + 4] for i in range(0, 16, 4))
    expiry = f"{rng.randint(1, 12):02d}/{rng.randint(26, 31):02d}"
    return number, expiry, brand


def _write_order_stream(
    outs: dict[str, _Rows],
    customers: int,
    persons: int,
    seed: int,
    people: _People,
    store_local: list[tuple[int, ...]],
    n_stores: int,
) -> None:
    days, times, _dobs = _calendar()
    pools = people.pools
    rng = random.Random(_mix(seed ^ 0x0D3E5))  # noqa: S311 - synthetic data, not crypto
    rand = rng.random
    a, b = _row_to_person(customers, persons, seed)
    created_key = _mix(seed ^ 0x0006)
    orders, rxs, pays = outs["orders"], outs["prescriptions"], outs["payments"]
    n_drugs = len(_DRUGS)
    n_prescribers = len(pools.prescribers)
    order_id = rx_id = pay_id = 0

    def ts(s: int) -> str:
        return f"{days[s // _DAY]} {times[s % _DAY]}"

    for i in range(customers):
        cid = i + 1
        n_orders = int(rand() * 7)  # 0..6, three on average
        if n_orders == 0:
            continue
        home_stores = store_local[people.state_index((a * i + b) % customers % persons)]
        home = home_stores[int(rand() * len(home_stores))]
        lo = max(_ORDER_START, _created_at_seconds(created_key, cid))
        when = sorted(lo + int(rand() * (_ORDER_END - lo)) for _ in range(n_orders))
        cards = [_card(rng)]
        if rand() < 0.3:
            cards.append(_card(rng))
        doctor = pools.prescribers[int(rand() * n_prescribers)]
        for at in when:
            order_id += 1
            store = home if rand() < 0.8 else 1 + int(rand() * n_stores)
            r = rand()
            channel = "in_store" if r < 0.6 else "online" if r < 0.85 else "drive_thru"
            r = rand()
            status = "completed" if r < 0.9 else "refunded" if r < 0.94 else "cancelled"
            total = 0
            r = rand()
            n_rx = 0 if r >= 0.4 else (1 if r < 0.28 else 2)
            for _ in range(n_rx):
                rx_id += 1
                d = int(rand() * n_drugs)
                drug, per_30, codes = _DRUGS[d]
                r = rand()
                supply = 30 if r < 0.6 else 60 if r < 0.75 else 90
                copay = rng.choice((0, 0, 400, 500, 1000, 1000, 1500, 2000, 2500, 3500, 4750))
                if rand() < 0.1:
                    copay += int(rand() * 2000)
                total += copay
                prescriber = (
                    doctor if rand() < 0.7 else pools.prescribers[int(rand() * n_prescribers)]
                )
                rxs.add(
                    (
                        rx_id,
                        order_id,
                        cid,
                        drug,
                        pools.ndcs[d][int(rand() * 2)],
                        codes[int(rand() * len(codes))],
                        prescriber[0],
                        prescriber[1],
                        days[at // _DAY + int(rand() * 4)],
                        supply,
                        per_30 * supply // 30,
                        _cents(copay),
                    )
                )
            if n_rx == 0 or rand() < 0.5:
                total += int(rng.lognormvariate(7.6, 0.8))  # front-store basket, cents
            total = max(total, 199)
            orders.add((order_id, cid, store, ts(at), channel, status, _cents(total)))
            if status != "cancelled":
                pay_id += 1
                number, expiry, brand = cards[0] if rand() < 0.8 else cards[-1]
                paid = at + 30 + int(rand() * 900)
                pays.add((pay_id, order_id, number, expiry, brand, _cents(total), ts(paid)))


def write_tables(
    out_dir: Path,
    customers: int,
    *,
    seed: int = 42,
    distinct_ratio: float = 1.0,
    tables: Iterable[str] = ALL_TABLES,
) -> dict[str, int]:
    """Write ``<table>.csv`` for each requested table into ``out_dir``; return row counts.

    ``distinct_ratio`` is the fraction of distinct persons among customer rows
    (``round(customers * distinct_ratio)`` persons, at least one).
    """
    if isinstance(tables, str):
        tables = (tables,)
    wanted = set(tables)
    unknown = wanted - set(ALL_TABLES)
    if unknown:
        raise ValueError(f"unknown tables: {sorted(unknown)}; choose from {ALL_TABLES}")
    if customers < 1:
        raise ValueError("customers must be at least 1")
    if not 0 < distinct_ratio <= 1:
        raise ValueError("distinct_ratio must be in (0, 1]")
    persons = _person_count(customers, distinct_ratio)
    if persons > _SSN_CAPACITY:
        raise ValueError(f"at most {_SSN_CAPACITY} distinct persons (never-issued SSN range)")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    people = _People(seed)
    counts: dict[str, int] = {}

    if "customers" in wanted:
        out = _Rows(out_dir / "customers.csv", "customers")
        try:
            _write_customers(out, customers, persons, seed, people)
        finally:
            out.close()
        counts["customers"] = out.count

    store_rows, store_local = _stores(customers, seed, people.pools)
    if "stores" in wanted:
        out = _Rows(out_dir / "stores.csv", "stores")
        try:
            for row in store_rows:
                out.add(row)
        finally:
            out.close()
        counts["stores"] = out.count

    if wanted & _ORDER_TABLES:
        outs = {t: _Rows(out_dir / f"{t}.csv" if t in wanted else None, t) for t in _ORDER_TABLES}
        try:
            _write_order_stream(
                outs, customers, persons, seed, people, store_local, len(store_rows)
            )
        finally:
            for out in outs.values():
                out.close()
        for t in ("orders", "prescriptions", "payments"):
            if t in wanted:
                counts[t] = outs[t].count

    return {t: counts[t] for t in ALL_TABLES if t in counts}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deid_synth",
        description="Write synthetic pharmacy-chain CSVs (customers, stores, orders, "
        "prescriptions, payments).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--customers", type=int, required=True, help="number of customer rows")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--distinct-ratio",
        type=float,
        default=1.0,
        help="fraction of distinct persons among customer rows, in (0, 1]",
    )
    parser.add_argument(
        "--tables",
        default=",".join(ALL_TABLES),
        help=f"comma-separated subset of {','.join(ALL_TABLES)}",
    )
    args = parser.parse_args(argv)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    try:
        counts = write_tables(
            args.out,
            args.customers,
            seed=args.seed,
            distinct_ratio=args.distinct_ratio,
            tables=tables,
        )
    except ValueError as exc:
        parser.error(str(exc))
    for table, n in counts.items():
        print(f"{table}: {n} rows -> {args.out / (table + '.csv')}")


if __name__ == "__main__":
    main()
