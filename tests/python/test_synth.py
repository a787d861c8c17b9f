"""Tests for the synthetic data generator ``deid_synth`` and the committed seeds."""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import re
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

import deid_synth as synth
from deid.kinds import luhn_valid
from deid_synth import ALL_TABLES, COLUMNS, write_tables

REPO = Path(__file__).resolve().parents[2]
SMALL = 300

SSN_RE = re.compile(r"^9(\d\d)-?(\d\d)-?(\d{4})$")
PHONE_RES = (
    re.compile(r"^\(([2-9]\d\d)\) 555-(\d{4})$"),
    re.compile(r"^([2-9]\d\d)-555-(\d{4})$"),
    re.compile(r"^\+1 ([2-9]\d\d) 555 (\d{4})$"),
)
TS_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
MONEY_RE = re.compile(r"^\d+\.\d\d$")


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows




def norm_email(email: str) -> str:
    return email.strip().lower()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("small")
    return out, write_tables(out, SMALL, seed=7)


@pytest.fixture(scope="module")
def tables(small: tuple[Path, dict[str, int]]) -> dict[str, list[dict[str, str]]]:
    out, _ = small
    return {t: read(out / f"{t}.csv")[1] for t in ALL_TABLES}


def test_headers_and_counts_match_files(small: tuple[Path, dict[str, int]]) -> None:
    out, counts = small
    assert list(counts) == list(ALL_TABLES)
    for table in ALL_TABLES:
        raw = (out / f"{table}.csv").read_bytes()
        assert b"\r" not in raw
        header, rows = read(out / f"{table}.csv")
        assert header == list(COLUMNS[table])
        assert len(rows) == counts[table], table
    assert counts["customers"] == SMALL
    assert counts["stores"] == 6  # max(5, 300 // 50)


def test_deterministic_bytes(tmp_path: Path, small: tuple[Path, dict[str, int]]) -> None:
    out, counts = small
    assert write_tables(tmp_path, SMALL, seed=7) == counts
    for table in ALL_TABLES:
        assert (tmp_path / f"{table}.csv").read_bytes() == (out / f"{table}.csv").read_bytes()


def test_seed_changes_output(tmp_path: Path, small: tuple[Path, dict[str, int]]) -> None:
    out, _ = small
    write_tables(tmp_path, SMALL, seed=8, tables=["customers"])
    assert (tmp_path / "customers.csv").read_bytes() != (out / "customers.csv").read_bytes()


def test_table_subsets_are_consistent(tmp_path: Path, small: tuple[Path, dict[str, int]]) -> None:
    out, counts = small
    got = write_tables(tmp_path, SMALL, seed=7, tables=["payments"])
    assert got == {"payments": counts["payments"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["payments.csv"]
    assert (tmp_path / "payments.csv").read_bytes() == (out / "payments.csv").read_bytes()


def test_referential_integrity(tables: dict[str, list[dict[str, str]]]) -> None:
    customers = {int(r["customer_id"]) for r in tables["customers"]}
    assert customers == set(range(1, SMALL + 1))
    stores = {int(r["store_id"]) for r in tables["stores"]}
    orders = {int(r["order_id"]): r for r in tables["orders"]}
    assert len(orders) == len(tables["orders"])
    for o in tables["orders"]:
        assert int(o["customer_id"]) in customers
        assert int(o["store_id"]) in stores
    for rx in tables["prescriptions"]:
        order = orders[int(rx["order_id"])]
        assert rx["customer_id"] == order["customer_id"]
        assert rx["filled_at"] >= order["ordered_at"][:10]
    paid = Counter(int(p["order_id"]) for p in tables["payments"])
    for oid, order in orders.items():
        assert paid[oid] == (0 if order["status"] == "cancelled" else 1)
    for p in tables["payments"]:
        order = orders[int(p["order_id"])]
        assert p["amount"] == order["order_total"]
        assert order["ordered_at"] < p["paid_at"]


def test_customer_values(tables: dict[str, list[dict[str, str]]]) -> None:
    for r in tables["customers"]:
        m = SSN_RE.match(r["ssn"])
        assert m, r["ssn"]
        assert int(m.group(1)) < 50  # area 900-949: 950-999 belong to deid's SSN tokens
        assert 1 <= int(m.group(2)) <= 49  # area 9xx, never-issued groups (not ITIN)
        assert m.group(3) != "0000"
        assert norm_email(r["email"]).rsplit("@", 1)[1] in synth.RESERVED_EMAIL_DOMAINS
        if r["phone"]:
            m = next((rx.match(r["phone"]) for rx in PHONE_RES if rx.match(r["phone"])), None)
            assert m, r["phone"]
            assert 100 <= int(m.group(2)) <= 199  # fictional 555-01XX at this scale
        dob = dt.date.fromisoformat(r["date_of_birth"])
        assert dt.date(1935, 1, 2) <= dob <= dt.date(2008, 1, 1)  # 18-90 on 2026-01-01
        assert re.fullmatch(r"\d{5}", r["zip"])
        assert r["region"] == synth.REGION_BY_STATE[r["state"]]
        assert TS_RE.match(r["created_at"])
        assert "2020-01-01" <= r["created_at"] < "2026-01-01"


def test_order_values(tables: dict[str, list[dict[str, str]]]) -> None:
    for o in tables["orders"]:
        assert "2024-01-01" <= o["ordered_at"] < "2026-01-01"
        assert TS_RE.match(o["ordered_at"])
        assert o["channel"] in {"in_store", "online", "drive_thru"}
        assert o["status"] in {"completed", "refunded", "cancelled"}
        assert MONEY_RE.match(o["order_total"])
    statuses = Counter(o["status"] for o in tables["orders"])
    assert statuses.most_common(1)[0][0] == "completed"
    for rx in tables["prescriptions"]:
        assert re.fullmatch(r"\d{5}-\d{4}-\d{2}", rx["ndc_code"])
        assert rx["prescriber_name"].startswith("Dr. ")
        assert re.fullmatch(r"[12]\d{9}", rx["prescriber_npi"])
        # the check digit is deliberately wrong, so no synthetic NPI can be a real one
        assert not luhn_valid("80840" + rx["prescriber_npi"])
        assert rx["days_supply"] in {"30", "60", "90"}
        assert int(rx["quantity"]) > 0
        assert MONEY_RE.match(rx["copay"])


def test_card_numbers_are_test_numbers(tables: dict[str, list[dict[str, str]]]) -> None:
    brands = set()
    for p in tables["payments"]:
        digits = re.sub(r"[ -]", "", p["card_number"])
        assert digits.isdigit()
        assert luhn_valid(digits), p["card_number"]
        assert digits.startswith(synth.CARD_TEST_PREFIXES), digits
        assert digits.startswith(synth._CARD_PREFIXES[p["card_brand"]])
        assert len(digits) == (15 if p["card_brand"] == "amex" else 16)
        assert re.fullmatch(r"(0[1-9]|1[0-2])/(2[6-9]|3[01])", p["card_expiry"])
        brands.add(p["card_brand"])
    assert brands == {"visa", "mastercard", "amex"}
    # customers reuse one or two cards across their orders
    orders = {o["order_id"]: o["customer_id"] for o in tables["orders"]}
    cards_per_customer: dict[str, set[str]] = {}
    for p in tables["payments"]:
        cards_per_customer.setdefault(orders[p["order_id"]], set()).add(p["card_number"])
    assert {len(c) for c in cards_per_customer.values()} <= {1, 2}


@pytest.mark.parametrize(
    ("customers", "ratio", "persons"),
    [(1000, 0.1, 100), (999, 0.25, 250), (500, 1.0, 500), (10, 0.01, 1)],
)
def test_distinct_ratio(tmp_path: Path, customers: int, ratio: float, persons: int) -> None:
    counts = write_tables(tmp_path, customers, seed=3, distinct_ratio=ratio, tables=["customers"])
    assert counts == {"customers": customers}
    _, rows = read(tmp_path / "customers.csv")
    assert [int(r["customer_id"]) for r in rows] == list(range(1, customers + 1))
    assert len({r["email"] for r in rows}) == persons
    assert len({norm_email(r["email"]) for r in rows}) == persons
    assert len({r["ssn"] for r in rows}) == persons
    assert len({r["ssn"].replace("-", "") for r in rows}) == persons
    pii = ("full_name", "email", "phone", "ssn", "date_of_birth", "street_address", "zip")
    assert len({tuple(r[c] for c in pii) for r in rows}) == persons
    # every person's copies are identical: one email always means one SSN
    assert len({(r["email"], r["ssn"]) for r in rows}) == persons


def test_phones_distinct_beyond_fictional_range() -> None:
    people = synth._People(42)
    fictional = synth._PHONE_FICTIONAL
    phones = [people.phone_parts(pid) for pid in range(fictional - 50, fictional + 50)]
    assert len(set(phones)) == 100
    for pid, (_area, line) in zip(range(fictional - 50, fictional + 50), phones, strict=True):
        assert (100 <= int(line) <= 199) == (pid < fictional)


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tables"):
        write_tables(tmp_path, 10, tables=["patients"])
    with pytest.raises(ValueError, match="distinct_ratio"):
        write_tables(tmp_path, 10, distinct_ratio=0)
    with pytest.raises(ValueError, match="customers"):
        write_tables(tmp_path, 0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth.main(["--out", str(tmp_path), "--customers", "40", "--tables", "customers,stores"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["customers.csv", "stores.csv"]
    assert "customers: 40 rows" in capsys.readouterr().out


def load_generate_seeds() -> ModuleType:
    path = REPO / "scripts" / "generate_seeds.py"
    spec = importlib.util.spec_from_file_location("generate_seeds", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_seeds_are_reproducible(tmp_path: Path) -> None:
    counts = load_generate_seeds().generate(tmp_path)
    assert counts["customers"] == 2000
    for table in ALL_TABLES:
        name = f"raw_{table}.csv"
        committed = REPO / "seeds" / "raw" / name
        assert committed.exists(), f"{committed} is missing: run scripts/generate_seeds.py"
        assert (tmp_path / name).read_bytes() == committed.read_bytes(), (
            f"{name} differs from a fresh generation: run scripts/generate_seeds.py"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"raw_{t}.csv" for t in ALL_TABLES)
