"""`make bench`: the customer mart from generated raw rows, deid tokens vs DuckDB's sha256().

Prints one table: build times (median of --repeat runs, each in a fresh process unless noted),
the ratio to the sha256 mart, vault throughput, and peak memory. Every number comes from this
run on this machine; ratios compare runs made minutes apart on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
TOKENIZED = {"email": "email", "phone": "phone", "ssn": "ssn"}


def mart_sql(hashing: str) -> str:
    """The customer mart: three tokenized (or hashed) columns plus the generalized ones.

    The deid variant has the shape `deid.token_map` renders (distinct values → tokenize →
    join back), as models/marts/dim_customers.sql does; the sha256 variant hashes per row,
    as one would write it.
    """
    generalized = """
               case when date_diff('year', c.date_of_birth, date '2026-01-01') >= 90 then '90+'
                    else (date_diff('year', c.date_of_birth, date '2026-01-01') // 10 * 10)::varchar
                         || '-' || (date_diff('year', c.date_of_birth, date '2026-01-01') // 10
                         * 10 + 9)::varchar end as age_band,
               substr(c.zip, 1, 3) as zip3, c.state, c.region"""
    if hashing == "sha256":
        cols = ", ".join(f"sha256(c.{col}) as {col}_token" for col in TOKENIZED)
        return f"create or replace table mart as select c.customer_id, {cols}, {generalized} " \
               "from raw_customers c"
    maps = ", ".join(
        f"{col}_map as (select v, deid.tokenize(v, '{kind}') as t from "
        f"(select distinct {col} as v from raw_customers where {col} is not null))"
        for col, kind in TOKENIZED.items())
    cols = ", ".join(f"{col}_map.t as {col}_token" for col in TOKENIZED)
    joins = " ".join(f"left join {col}_map on c.{col} = {col}_map.v" for col in TOKENIZED)
    return (f"create or replace table mart as with {maps} "
            f"select c.customer_id, {cols}, {generalized} from raw_customers c {joins}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Current resident set (Linux), for growth that an earlier peak would mask."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mib()


def child(args: list[str]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench phase {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- phases (each runs in its own process) ------------------------------------------------


def phase_load(rows: int, distinct: float) -> dict[str, float]:
    import duckdb

    from deid_synth import write_tables

    csv_dir = OUT / f"raw_{rows}_{distinct}"
    if not (csv_dir / "customers.csv").exists():
        write_tables(csv_dir, rows, seed=7, distinct_ratio=distinct, tables=["customers"])
    db = OUT / f"warehouse_{rows}_{distinct}.duckdb"
    db.unlink(missing_ok=True)
    con = duckdb.connect(str(db))
    con.execute(f"""create table raw_customers as select * from read_csv(
        '{csv_dir / "customers.csv"}', header = true, all_varchar = true)""")
    con.execute("alter table raw_customers alter date_of_birth type date")
    con.close()
    return {"rows": rows}


def phase_build(rows: int, distinct: float, hashing: str, vault: str, cache_size: int,
                repeat_in_process: int) -> dict[str, float]:
    import duckdb

    from deid.duckdb_plugin import register
    from deid.vault import VaultConfig, open_service

    con = duckdb.connect(str(OUT / f"warehouse_{rows}_{distinct}.duckdb"))
    if hashing == "deid":
        register(con, open_service(VaultConfig(url=vault, cache_size=cache_size)), "bench")
    times = []
    for _ in range(repeat_in_process):
        t0 = time.perf_counter()
        con.execute(mart_sql(hashing))
        times.append(time.perf_counter() - t0)
    con.close()
    return {"first": times[0], "last": times[-1], "peak_rss_mib": peak_rss_mib()}


def phase_vault(vault: str, n: int, batch: int) -> dict[str, float]:
    from deid.vault import VaultConfig, open_service

    svc = open_service(VaultConfig(url=vault, cache_size=0, detokenize_cache_size=0))
    values = [f"new.person{i}@example.org" for i in range(n)]
    t0 = time.perf_counter()
    tokens: list[str | None] = []
    for i in range(0, n, batch):
        tokens += svc.tokenize("email", values[i : i + batch])
    new_s = time.perf_counter() - t0
    svc.store.grant("bench", "bench")  # type: ignore[attr-defined]
    # detokenize: distinct tokens, no value cache: every token is read and decrypted
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        svc.detokenize(tokens[i : i + batch], principal="bench")
    detok_s = time.perf_counter() - t0
    return {"new_per_s": n / new_s, "detok_distinct_per_s": n / detok_s,
            "peak_rss_mib": peak_rss_mib()}


def phase_stream(rows: int, distinct: float, vault: str, n: int,
                 cache_size: int) -> dict[str, float]:
    """Tokenize a stream of `n` rows (values already in the vault) in 2048-row batches,
    generated batch by batch: peak memory is the service's, not the stream's."""
    import random

    import duckdb

    from deid.vault import VaultConfig, open_service

    con = duckdb.connect(str(OUT / f"warehouse_{rows}_{distinct}.duckdb"), read_only=True)
    emails = [r[0] for r in con.sql("select distinct email from raw_customers").fetchall()]
    con.close()
    base = rss_mib()
    svc = open_service(VaultConfig(url=vault, cache_size=cache_size))
    rng = random.Random(1)  # noqa: S311 - picks benchmark rows, not secrets
    t0 = time.perf_counter()
    for _ in range(n // 2048):
        svc.tokenize("email", rng.choices(emails, k=2048))
    return {"per_s": n / (time.perf_counter() - t0), "peak_rss_mib": peak_rss_mib(),
            "growth_mib": rss_mib() - base}


def phase_detok_mart(rows: int, distinct: float, vault: str) -> dict[str, float]:
    """detokenize a whole mart column (10 % distinct tokens) through DuckDB, default caches."""
    import duckdb

    from deid.duckdb_plugin import register
    from deid.vault import VaultConfig, open_service

    svc = open_service(VaultConfig(url=vault))
    svc.store.grant("bench", "bench")  # type: ignore[attr-defined]
    con = duckdb.connect(str(OUT / f"warehouse_{rows}_{distinct}.duckdb"))
    register(con, svc, "bench")
    t0 = time.perf_counter()
    n = con.sql("select count(deid.detokenize(email_token)) from mart").fetchall()[0][0]
    elapsed = time.perf_counter() - t0
    return {"detok_mart_per_s": n / elapsed, "peak_rss_mib": peak_rss_mib()}


# -- driver -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--distinct", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-size", type=int, default=1_000_000)
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--arg", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.phase:
        kw = json.loads(a.arg[0]) if a.arg else {}
        result = globals()[f"phase_{a.phase}"](**kw)
        print(json.dumps(result))
        return

    OUT.mkdir(exist_ok=True)
    rows, distinct = a.rows, a.distinct
    vault_dir = OUT / "vault"
    shutil.rmtree(vault_dir, ignore_errors=True)
    vault = f"sqlite:///{vault_dir / 'vault.db'}"
    os.environ.pop("DEID_KEYS", None)

    def run(phase: str, **kw: object) -> dict[str, float]:
        return child(["--phase", phase, "--arg", json.dumps(kw)])

    print(f"generating and loading {rows:,} raw customer rows ({distinct:.0%} distinct)...",
          file=sys.stderr)
    run("load", rows=rows, distinct=distinct)
    build = {"rows": rows, "distinct": distinct, "vault": vault,
             "cache_size": a.cache_size, "repeat_in_process": 1}
    sha = [run("build", hashing="sha256", **build) for _ in range(a.repeat)]
    cold = run("build", hashing="deid", **build)  # empty vault: every distinct value is new
    steady = [run("build", hashing="deid", **build) for _ in range(a.repeat)]
    warm = run("build", hashing="deid", **{**build, "repeat_in_process": 2})
    small = max(rows // 20, 1000)
    small_rows = run("build", hashing="deid", **{**build, "cache_size": small})
    vault2 = f"sqlite:///{OUT / 'vault_tp' / 'vault.db'}"
    shutil.rmtree(OUT / "vault_tp", ignore_errors=True)
    tp_2048 = run("vault", vault=vault2, n=300_000, batch=2048)
    shutil.rmtree(OUT / "vault_tp", ignore_errors=True)
    tp_big = run("vault", vault=vault2, n=300_000, batch=100_000)
    detok = run("detok_mart", rows=rows, distinct=distinct, vault=vault)
    stream = {(n, c): run("stream", rows=rows, distinct=distinct, vault=vault, n=n,
                          cache_size=c)
              for n in (1_000_000, 4_000_000) for c in (10_000, 1_000_000)}

    t_sha = statistics.median(r["first"] for r in sha)
    t_steady = statistics.median(r["first"] for r in steady)
    lines = [
        ("customer mart, sha256() in place of tokenize (median)", f"{t_sha:.2f} s", "1.00x"),
        ("customer mart, deid, empty vault (first build)", f"{cold['first']:.2f} s",
         f"{cold['first'] / t_sha:.2f}x"),
        ("customer mart, deid, values in vault, new process (median)", f"{t_steady:.2f} s",
         f"{t_steady / t_sha:.2f}x"),
        ("customer mart, deid, values in vault and in cache", f"{warm['last']:.2f} s",
         f"{warm['last'] / t_sha:.2f}x"),
        ("new values into an empty vault, batches of 2048 (DuckDB)",
         f"{tp_2048['new_per_s']:,.0f} /s", ""),
        ("new values into an empty vault, batches of 100k (Lambda)",
         f"{tp_big['new_per_s']:,.0f} /s", ""),
        ("detokenize, distinct tokens, no cache (2048 batches)",
         f"{tp_2048['detok_distinct_per_s']:,.0f} /s", ""),
        ("detokenize a mart column through DuckDB (10% distinct)",
         f"{detok['detok_mart_per_s']:,.0f} /s", ""),
        (f"peak RSS, steady build, cache {a.cache_size:,}",
         f"{statistics.median(r['peak_rss_mib'] for r in steady):.0f} MiB", ""),
        (f"peak RSS, steady build, cache {small:,}", f"{small_rows['peak_rss_mib']:.0f} MiB",
         f"({small_rows['first']:.2f} s)"),
        ("peak RSS, sha256 build", f"{statistics.median(r['peak_rss_mib'] for r in sha):.0f} MiB",
         ""),
        *[(f"tokenize stream of {n:,} rows, cache {c:,}: memory growth",
           f"{r['growth_mib']:.0f} MiB", f"({r['per_s']:,.0f} rows/s)")
          for (n, c), r in stream.items()],
    ]
    print(f"\ndeid bench: {rows:,} rows, {distinct:.0%} distinct, 3 tokenized columns, "
          f"{os.cpu_count()} cores, repeat {a.repeat}\n")
    width = max(len(n) for n, _, _ in lines)
    for name, value, ratio in lines:
        print(f"  {name:<{width}}  {value:>14}  {ratio}")


if __name__ == "__main__":
    main()
