"""The PII guard's value scan on a 1,000,000-row mart: dim_customers built by dbt with the
scan (the default) and with `deid_guard_scan: false`, each run a fresh `dbt run` process.

    .venv/bin/python bench/bench_scan.py [--rows 1000000] [--repeat 3]

Prints the model's execution time (dbt's run_results.json: the build and its post-hooks)
with and without the scan and their ratio, then the scan's query alone (rendered by dbt for
the built mart, run in DuckDB), which shared-machine noise in the builds cannot hide. The
first, untimed run fills the vault (kept in bench/out/scan/ for the next run), so every timed
run reads tokens from it as a rebuild does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out" / "scan"
PARTS = ("dbt_project.yml", "models", "macros", "analyses", "tests/generic")


def project(rows: int, distinct: float) -> tuple[Path, dict[str, str]]:
    """A copy of the project whose raw file holds `rows` generated customers."""
    from deid_synth import write_tables

    csv_dir = OUT.parent / f"raw_{rows}_{distinct}"
    if not (csv_dir / "customers.csv").exists():
        write_tables(csv_dir, rows, seed=7, distinct_ratio=distinct, tables=["customers"])
    # the raw file and the vault are kept between runs: filling the vault takes minutes
    raw_db, vault = OUT / f"raw_{rows}_{distinct}.duckdb", OUT / "vault" / "vault.db"
    proj = OUT / "project"
    shutil.rmtree(proj, ignore_errors=True)
    for part in PARTS:
        src, dst = ROOT / part, proj / part
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    (proj / "profiles.yml").write_text((ROOT / "profiles.yml.example").read_text())
    if not raw_db.exists():
        load_raw(raw_db, csv_dir)
    env = {**os.environ, "DBT_PROFILES_DIR": str(proj), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
           "DEID_WAREHOUSE": str(proj / "warehouse.duckdb"), "DEID_RAW": str(raw_db),
           "DEID_VAULT": f"sqlite:///{vault}"}
    env.pop("DEID_KEYS", None)
    # the vault denies tokenize by default: the dev target's principal builds the marts
    subprocess.run([str(Path(sys.executable).with_name("deid")), "init", "--transformer",
                    "dbt_transformer"], cwd=proj, env=env, check=True, capture_output=True)
    return proj, env


def load_raw(raw_db: Path, csv_dir: Path) -> None:
    con = duckdb.connect(str(raw_db))
    con.execute("create schema raw")
    con.execute(f"""create table raw.raw_customers as select * replace (
            cast(customer_id as integer) as customer_id,
            cast(date_of_birth as date) as date_of_birth,
            cast(created_at as timestamp) as created_at)
        from read_csv('{csv_dir / "customers.csv"}', header = true, all_varchar = true)""")
    con.close()


def build(proj: Path, env: dict[str, str], scan: bool) -> float:
    dbt = Path(sys.executable).with_name("dbt")
    args = [str(dbt), "run", "--select", "dim_customers",
            "--vars", json.dumps({"deid_guard_scan": scan, "deid_as_of": "2026-01-01"})]
    proc = subprocess.run(args, cwd=proj, env=env, text=True, capture_output=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"dbt run failed:\n{proc.stdout[-3000:]}")
    results = json.loads((proj / "target" / "run_results.json").read_text())["results"]
    return next(r["execution_time"] for r in results if r["unique_id"].endswith("dim_customers"))


def scan_alone(proj: Path, env: dict[str, str], repeat: int) -> list[float]:
    """The guard's scan query for the built mart, rendered by dbt, timed in DuckDB alone."""
    dbt = Path(sys.executable).with_name("dbt")
    macro = ("{{ deid.pii_value_scan_sql(adapter.get_columns_in_relation(ref('dim_customers')),"
             " deid.upstream_pii(graph.nodes['model.deid.dim_customers']),"
             " ref('dim_customers')) }}")
    proc = subprocess.run([str(dbt), "--no-use-colors", "compile", "--inline", macro],
                          cwd=proj, env=env, text=True, capture_output=True, check=False)
    marker = "Compiled inline node is:"
    if proc.returncode != 0 or marker not in proc.stdout:
        raise SystemExit(f"dbt compile failed:\n{proc.stdout[-3000:]}")
    sql = proc.stdout.split(marker, 1)[1]
    con = duckdb.connect(env["DEID_WAREHOUSE"], read_only=True)
    con.execute(f"attach '{env['DEID_RAW']}' as raw (read_only)")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = con.execute(sql).fetchall()
        times.append(time.perf_counter() - t0)
        assert rows == [], "the example mart must pass its own scan"
    con.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--distinct", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    t0 = time.perf_counter()
    proj, env = project(a.rows, a.distinct)
    print(f"raw data ready in {time.perf_counter() - t0:.0f} s; filling the vault...",
          file=sys.stderr)
    build(proj, env, scan=False)
    off, on = [], []
    for _ in range(a.repeat):  # interleaved: both see the same machine load
        off.append(build(proj, env, scan=False))
        on.append(build(proj, env, scan=True))
    alone = scan_alone(proj, env, a.repeat)
    t_off, t_on = statistics.median(off), statistics.median(on)
    print(f"\ndim_customers, {a.rows:,} rows ({a.distinct:.0%} distinct), "
          f"{os.cpu_count()} cores, median of {a.repeat}:")
    print(f"  without the value scan  {t_off:7.2f} s  1.00x   (runs: "
          f"{', '.join(f'{t:.2f}' for t in off)})")
    print(f"  with the value scan     {t_on:7.2f} s  {t_on / t_off:.2f}x   (runs: "
          f"{', '.join(f'{t:.2f}' for t in on)})")
    print(f"  difference              {t_on - t_off:7.2f} s")
    t_alone = statistics.median(alone)
    print(f"  the scan query alone    {t_alone:7.2f} s  = {t_alone / t_off:.2f}x of the build "
          f"without it (runs: {', '.join(f'{t:.2f}' for t in alone)})")


if __name__ == "__main__":
    main()
