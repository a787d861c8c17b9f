"""`deid tokenize-file`: CSV, Parquet and JSON Lines in, tokens out, in record batches; a bad
value fails the file with its column, kind and row, never the value, and leaves no output."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from deid.cli import main
from deid.errors import DeidError
from deid.ingest import files
from deid.ingest.columns import SourceColumns
from deid.service import VaultTokenService
from deid.vault import open_store

ROOT = Path(__file__).resolve().parents[2]
HEADER = ["customer_id", "email", "ssn", "zip", "city"]
ROWS = [
    ["1", "ada@example.com", "913-16-5146", "02139", "Boston"],
    ["2", "alan@example.com", "", "10001", "New York"],
    ["3", "grace@example.com", "902-11-0001", "60601", "Chicago"],
] * 40  # repeated values: one token each
DECLARE = ["-c", "customer_id=string:customer", "-c", "email=email", "-c", "ssn=ssn",
           "-c", "zip=string", "-c", "city=clear"]
COLUMNS = SourceColumns("t", {"customer_id": "string:customer", "email": "email",
                              "ssn": "ssn", "zip": "string", "city": None})
RAW = {v for row in ROWS for v in row[1:4] if v}


def write_csv(path: Path, rows: list[list[str]] = ROWS) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def run(vault_path: Path, *args: str) -> Result:
    if not vault_path.exists():  # deid init
        open_store(f"sqlite:///{vault_path}", create=True).close()
    return CliRunner().invoke(main, ["tokenize-file", "--vault", f"sqlite:///{vault_path}",
                                     "--quiet", *args])


def read_rows(path: Path) -> list[dict[str, str | None]]:
    if path.suffix == ".parquet":
        return [{k: (None if v is None else str(v)) for k, v in r.items()}
                for r in pq.read_table(path).to_pylist()]
    if path.suffix == ".jsonl":
        return [json.loads(x) for x in path.read_text().splitlines()]
    with path.open() as fh:
        return [{k: (v or None) for k, v in r.items()} for r in csv.DictReader(fh)]


def expected(service: VaultTokenService) -> list[dict[str, str | None]]:
    def tok(kind: str, v: str) -> str | None:
        return service.tokenize(kind, [v])[0] if v else None

    return [{"customer_id": tok("string:customer", r[0]), "email": tok("email", r[1]),
             "ssn": tok("ssn", r[2]), "zip": tok("string", r[3]), "city": r[4]} for r in ROWS]


@pytest.mark.parametrize("out_suffix", [".csv", ".parquet", ".jsonl"])
def test_csv_becomes_tokens_in_every_output_format(tmp_path: Path, vault_path: Path,
                                                   service: VaultTokenService,
                                                   out_suffix: str) -> None:
    src = write_csv(tmp_path / "customers.csv")
    dst = tmp_path / f"out{out_suffix}"
    result = run(vault_path, str(src), str(dst), *DECLARE, "--batch-rows", "7")
    assert result.exit_code == 0, result.output
    assert read_rows(dst) == expected(service)  # same vault, same tokens
    assert not [v for v in RAW if v in dst.read_bytes().decode("latin-1")]
    assert "120 rows" in result.output


def test_parquet_and_json_lines_inputs(tmp_path: Path, vault_path: Path,
                                       service: VaultTokenService) -> None:
    table = pa.table({"customer_id": pa.array([int(r[0]) for r in ROWS]),  # typed: cast as text
                      "email": [r[1] for r in ROWS], "ssn": [r[2] or None for r in ROWS],
                      "zip": [r[3] for r in ROWS], "city": [r[4] for r in ROWS]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=50)
    assert run(vault_path, str(tmp_path / "in.parquet"), str(tmp_path / "a.csv"),
               *DECLARE).exit_code == 0
    assert read_rows(tmp_path / "a.csv") == expected(service)

    with (tmp_path / "in.jsonl").open("w") as fh:
        for row in table.to_pylist():
            fh.write(json.dumps(row) + "\n")
    assert run(vault_path, str(tmp_path / "in.jsonl"), str(tmp_path / "b.jsonl"),
               *DECLARE, "--batch-rows", "16").exit_code == 0
    assert read_rows(tmp_path / "b.jsonl") == expected(service)


def test_csv_keeps_text_as_written(tmp_path: Path, vault_path: Path,
                                   service: VaultTokenService) -> None:
    """A ZIP code keeps its leading zero: CSV is read as text, and an empty field is NULL."""
    src = write_csv(tmp_path / "c.csv")
    run(vault_path, str(src), str(tmp_path / "o.csv"), *DECLARE)
    out = read_rows(tmp_path / "o.csv")
    assert out[0]["zip"] == service.tokenize("string", ["02139"])[0]
    assert out[0]["zip"] != service.tokenize("string", ["2139"])[0]
    assert out[1]["ssn"] is None


def test_a_bad_value_fails_the_file_naming_column_kind_and_row(tmp_path: Path,
                                                               vault_path: Path) -> None:
    rows = [*ROWS[:10], ["11", "bob-at-example.com", "913-16-5146", "02139", "X"], *ROWS[10:]]
    src = write_csv(tmp_path / "bad.csv", rows)
    dst = tmp_path / "out.csv"
    result = run(vault_path, str(src), str(dst), *DECLARE, "--batch-rows", "4")
    assert isinstance(result.exception, DeidError)
    message = str(result.exception)
    assert "column 'email', kind 'email', data row 11" in message
    assert "bob" not in message and "example.com" not in message
    assert not dst.exists() and not list(tmp_path.glob("*.partial"))  # nothing half-written


def test_an_undeclared_column_fails_unless_allowed(tmp_path: Path, vault_path: Path) -> None:
    src = write_csv(tmp_path / "c.csv")
    declared = DECLARE[:-2]  # city not declared
    result = run(vault_path, str(src), str(tmp_path / "o.csv"), *declared)
    assert isinstance(result.exception, DeidError) and "['city']" in str(result.exception)
    assert not (tmp_path / "o.csv").exists()
    ok = run(vault_path, str(src), str(tmp_path / "o.csv"), *declared, "--allow-undeclared")
    assert ok.exit_code == 0


def test_reads_in_batches_and_reports_progress(tmp_path: Path,
                                               service: VaultTokenService) -> None:
    """Streaming: many batches, progress rising to the file size (what the bar shows)."""
    src = write_csv(tmp_path / "c.csv", ROWS * 200)
    seen: list[int] = []
    stats = files.tokenize_file(service, src, tmp_path / "o.csv", COLUMNS, batch_rows=1000,
                                progress=seen.append)
    assert stats.rows == len(ROWS) * 200
    assert len(seen) > 3 and seen == sorted(seen)
    assert seen[-1] == files.progress_total(src)
    # Read as it is tokenized, not ahead: pyarrow's CSV reader had the whole file read
    # (and held) by the time the first batch was done.
    assert seen[0] < seen[-1] / 4


def test_column_map_from_yaml(tmp_path: Path, vault_path: Path,
                              service: VaultTokenService) -> None:
    cmap = tmp_path / "sources.yml"
    cmap.write_text("sources:\n  crm.customers:\n    columns:\n"
                    "      customer_id: string:customer\n      email: email\n      ssn: ssn\n"
                    "      zip: string\n      city: null\n")
    src = write_csv(tmp_path / "c.csv")
    result = run(vault_path, str(src), str(tmp_path / "o.csv"), "--map", str(cmap),
                 "--source", "crm.customers")
    assert result.exit_code == 0, result.output
    assert read_rows(tmp_path / "o.csv") == expected(service)


def _readme_block(start: str) -> str:
    """The fenced block of README.md whose first line starts with `start`."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    [block] = [b for b in blocks if b.startswith(start)]
    return block


@pytest.mark.slow
def test_readme_column_map_and_command(tmp_path: Path, vault_path: Path,
                                       service: VaultTokenService) -> None:
    """The README's YAML map and tokenize-file command, as a user copies them."""
    (tmp_path / "ingest_columns.yml").write_text(_readme_block("# ingest_columns.yml"))
    with (tmp_path / "contacts.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["contact_id", "email", "phone", "country"])
        w.writerows([["7", "ada@example.com", "(881) 555-0126", "UK"],
                     *[[str(i), f"c{i}@example.com", "", "FR"] for i in range(8, 20)],
                     ["20", "bob-at-example.com", "", "DE"]])  # data row 14
    [command] = [ln for ln in _readme_block("deid tokenize-file").splitlines() if ln]
    args = shlex.split(command)
    assert args[0] == "deid"
    env = {**os.environ, "DEID_VAULT": f"sqlite:///{vault_path}"}
    deid = str(Path(sys.executable).with_name("deid"))
    proc = subprocess.run([deid, *args[1:]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    # The last row is bad: the README's error line, word for word around the reason.
    shown = next(ln for ln in _readme_block("error: deid tokenize-file").splitlines() if ln)
    before, _, after = shown.partition(" … ")
    got = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1
    assert got.startswith(before.replace("data row 11", "data row 14"))
    assert got.endswith(after) and "bob" not in got
    assert not (tmp_path / "contacts_tokenized.csv").exists()

    (tmp_path / "contacts.csv").write_text(
        (tmp_path / "contacts.csv").read_text().replace("bob-at-example.com", "bob@example.com"))
    proc = subprocess.run([deid, *args[1:]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [first, *_] = read_rows(tmp_path / "contacts_tokenized.csv")
    assert first == {"contact_id": service.tokenize("string:customer", ["7"])[0],
                     "email": service.tokenize("email", ["ada@example.com"])[0],
                     "phone": service.tokenize("phone", ["(881) 555-0126"])[0],
                     "country": "UK"}


def test_json_lines_to_parquet_with_a_column_empty_in_the_first_batch(
        tmp_path: Path, service: VaultTokenService) -> None:
    """One output file, one schema: a column with no value in the first batch is text."""
    with (tmp_path / "in.jsonl").open("w") as fh:
        fh.write(json.dumps({"email": "a@example.com", "note": None}) + "\n")
        fh.write(json.dumps({"email": "c@example.com", "note": "x"}) + "\n")
    columns = SourceColumns("t", {"email": "email", "note": None})
    files.tokenize_file(service, tmp_path / "in.jsonl", tmp_path / "out.parquet", columns,
                        batch_rows=1)
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == [
        {"email": service.tokenize("email", ["a@example.com"])[0], "note": None},
        {"email": service.tokenize("email", ["c@example.com"])[0], "note": "x"}]


def test_typed_parquet_values_are_spelled_as_the_warehouse_casts_them(
        tmp_path: Path, service: VaultTokenService) -> None:
    """One token space for typed columns too: the text tokenized is DuckDB's cast as varchar."""
    table = pa.table({
        "ts": [dt.datetime(2024, 4, 28, 14, 50, 27), dt.datetime(2024, 4, 28, 14, 50, 27, 120000)],
        "day": [dt.date(1996, 12, 2), dt.date(2000, 1, 1)],
        "n": [7, 1234567890123],
        "amount": pa.array([Decimal("12.50"), Decimal("0.05")], pa.decimal128(10, 2)),
        "flag": [True, False]})
    pq.write_table(table, tmp_path / "typed.parquet")
    columns = SourceColumns("t", dict.fromkeys(table.column_names, "string"))
    files.tokenize_file(service, tmp_path / "typed.parquet", tmp_path / "out.jsonl", columns)
    got = read_rows(tmp_path / "out.jsonl")
    con = duckdb.connect()
    con.register("typed", table)
    for name in table.column_names:
        texts = [r[0] for r in con.sql(f"select cast({name} as varchar) from typed").fetchall()]
        assert [r[name] for r in got] == service.tokenize("string", texts), name
