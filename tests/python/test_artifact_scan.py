"""`deid scan-artifacts`' shape detector: raw-looking values are counted, deid's tokens never."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from deid import artifact_scan
from deid.cli import main
from deid.service import VaultTokenService

ROOT = Path(__file__).resolve().parents[2]
RAW = {"email": "karen_johnson1@example.com", "ssn": "913-16-5146",
       "phone": "(881) 555-0126", "card": "4111 1111 1111 1111"}


def test_raw_shapes_are_counted_by_kind() -> None:
    data = " | ".join(f"Could not convert string '{v}'" for v in RAW.values()).encode()
    assert artifact_scan.shapes(data) == {"email": 1, "ssn": 1, "phone": 1, "card": 1}


def test_tokens_of_every_kind_are_not_reported(service: VaultTokenService) -> None:
    tokens = [t for kind in ("email", "ssn", "phone", "card")
              for t in service.tokenize(kind, [RAW[kind], *(f"{RAW[kind][:-1]}{d}"
                                                             for d in "0123456789")])]
    assert len(tokens) == 44
    assert artifact_scan.shapes(" ".join(tokens).encode()) == {}


def test_cli_reports_files_and_counts_never_values(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "target").mkdir()
    (tmp_path / "logs" / "dbt.log").write_text(f"error: bad value '{RAW['ssn']}'\n")
    (tmp_path / "target" / "clean.json").write_text("nothing here\n")
    # the command as README.md gives it
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("deid scan-artifacts --shapes"))
    args = shlex.split(line.split("#")[0])[1:]
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1
    assert "logs/dbt.log: 1 ssn" in out.output and "clean.json" not in out.output
    assert RAW["ssn"] not in out.output


def test_values_that_recur_by_chance_are_not_searched(tmp_path: Path) -> None:
    """A run of SSN tokens in a database file holds date-shaped substrings: dates, timestamps
    and numbers are left out of the value search."""
    columns = {name: {"config": {"meta": {"pii": kind}}} for name, kind in
               [("email", "email"), ("dob", "date"), ("seen", "timestamp"), ("n", "number")]}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"sources": {"s": {
        "schema": "raw", "identifier": "people", "columns": columns}}}))
    assert artifact_scan.declared_columns(manifest) == [("raw", "people", "email")]
