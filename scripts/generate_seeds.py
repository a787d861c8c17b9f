"""Regenerate the committed dbt seeds ``seeds/raw/raw_<table>.csv``.

The seeds are ``deid_synth.write_tables`` output for 2,000 customers, seed 42 and
distinct ratio 1.0. Generation is deterministic, so

    python scripts/generate_seeds.py && git diff --exit-code seeds/

proves the committed seeds are reproducible.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS_DIR = REPO / "seeds" / "raw"
CUSTOMERS = 2_000
SEED = 42
DISTINCT_RATIO = 1.0

try:
    from deid_synth import ALL_TABLES, write_tables
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(REPO / "udfs"))
    from deid_synth import ALL_TABLES, write_tables


def generate(dest: Path = SEEDS_DIR) -> dict[str, int]:
    """Write ``raw_<table>.csv`` for every table into ``dest``; return row counts."""
    dest.mkdir(parents=True, exist_ok=True)
    # Generate next to the destination so the renames stay on one file system.
    with tempfile.TemporaryDirectory(dir=dest, prefix=".generate-") as tmp:
        counts = write_tables(
            Path(tmp), CUSTOMERS, seed=SEED, distinct_ratio=DISTINCT_RATIO, tables=ALL_TABLES
        )
        for table in ALL_TABLES:
            os.replace(Path(tmp) / f"{table}.csv", dest / f"raw_{table}.csv")
    return counts


def main() -> None:
    for table, rows in generate().items():
        print(f"{SEEDS_DIR.relative_to(REPO) / f'raw_{table}.csv'}: {rows} rows")


if __name__ == "__main__":
    main()
