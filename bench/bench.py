"""`make bench`: the customer mart from generated raw rows, deid tokens vs DuckDB's sha256().

Prints one table: build times (median of --repeat runs, each in a fresh process unless
noted) with the ratio to the sha256 builds that bracket each of them in the same run, vault
throughput against its target, the PostgreSQL rows (per-row function vs deid.token_map's
batch, audit records per statement, on a throwaway cluster), the Redshift Lambda batch, and
peak memory; then plots throughput against row count (--sizes) to docs/bench.png. Every
number comes from this run on this machine: on a shared machine read the ratios, not the
seconds.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
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
    if (OUT / f"warehouse_{rows}_{distinct}.duckdb").exists():
        return {"rows": rows}
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


def init_vault(url: str) -> None:
    """`deid init`: builds never create a vault."""
    from deid.vault import open_store

    open_store(url, create=True).close()


def phase_build(rows: int, distinct: float, hashing: str, vault: str, cache_size: int,
                repeat_in_process: int) -> dict[str, float]:
    import duckdb

    from deid.duckdb_plugin import register, udf_threads
    from deid.vault import VaultConfig, open_service

    con = duckdb.connect(str(OUT / f"warehouse_{rows}_{distinct}.duckdb"))
    if hashing == "deid":
        svc = open_service(VaultConfig(url=vault, cache_size=cache_size))
        svc.store.grant_tokenize("bench", "*", "tokenize", "bench")  # type: ignore[attr-defined]
        # The threads the dbt plugin gives this vault's UDFs.
        register(con, svc, "bench", threads=udf_threads(vault),
                 detokenize_threads=udf_threads(vault, "detokenize"))
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

    from deid.duckdb_plugin import register, udf_threads
    from deid.vault import VaultConfig, open_service

    svc = open_service(VaultConfig(url=vault))
    svc.store.grant("bench", "bench")  # type: ignore[attr-defined]
    con = duckdb.connect(str(OUT / f"warehouse_{rows}_{distinct}.duckdb"))
    register(con, svc, "bench", threads=udf_threads(vault),
             detokenize_threads=udf_threads(vault, "detokenize"))
    t0 = time.perf_counter()
    n = con.sql("select count(deid.detokenize(email_token)) from mart").fetchall()[0][0]
    elapsed = time.perf_counter() - t0
    return {"detok_mart_per_s": n / elapsed, "peak_rss_mib": peak_rss_mib()}


def phase_lambda() -> dict[str, object]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_lambda import measure

    return measure(100_000, 0.10, 3)


def phase_postgres(n: int) -> dict[str, float]:
    """On a throwaway cluster: tokenize `n` distinct values already in the vault through the
    per-row function and through deid.token_map's batch function; detokenize 2,000 rows in
    one statement and count the audit records it leaves."""
    import cryptography
    import psycopg2

    sys.path.insert(0, str(ROOT / "tests" / "python"))
    import pg_cluster
    from deid.stores import postgres as pg_store

    reason = pg_cluster.missing_reason()
    if reason:
        return {"skipped": 1.0}
    cluster = pg_cluster.start()
    try:
        paths = json.dumps([str(ROOT / "udfs"), str(Path(cryptography.__file__).parents[1])])
        ddl = ["create extension plpython3u;" + pg_store.vault_ddl("deid_vault")]
        for name, params, args, returns in (
                ("tokenize", "value text, kind text", "value, kind", "text"),
                ("tokenize_batch", "vals text[], kind text", "vals, kind", "text[]"),
                ("detokenize", "token text", "token", "text")):
            ddl.append(f"""create function b_{name}({params}) returns {returns}
language plpython3u volatile set plan_cache_mode = force_custom_plan as $f$
import sys
for p in reversed({paths}):
    if p not in sys.path:
        sys.path.insert(0, p)
from deid import plpython_host
return plpython_host.{name}(plpy, {args}, vault_schema="deid_vault")
$f$""")
        # The functions run as the admin login (session_user): it may mint and detokenize.
        ddl.append(f"insert into deid_vault.tokenize_grants values ('{pg_cluster.ADMIN}', '*', "
                   "'tokenize', 'now', 'bench')")
        pg_cluster.admin_sql(cluster, ";\n".join(ddl))
        conn = psycopg2.connect(cluster.dsn())
        conn.autocommit = True
        cur = conn.cursor()
        values = f"select 'pg' || i || '@example.org' as v from generate_series(1, {n}) as i"
        batch = (f"select count(t) from (select array_agg(v) vs from ({values}) d) a, "
                 "unnest(b_tokenize_batch(a.vs, 'email')) t")

        def rate(sql: str) -> float:
            t0 = time.perf_counter()
            cur.execute(sql)
            assert cur.fetchone()[0] == n
            return n / (time.perf_counter() - t0)

        mint = rate(batch)  # the values enter the vault (and the session imports deid)
        per_row = statistics.median(
            rate(f"select count(b_tokenize(v, 'email')) from ({values}) d") for _ in range(3))
        batched = statistics.median(rate(batch) for _ in range(3))
        cur.execute(f"insert into deid_vault.principals values ('{pg_cluster.ADMIN}', "
                    "'now', 'bench')")
        cur.execute("select count(*) from deid_vault.audit")
        before = cur.fetchone()[0]
        cur.execute("select count(b_detokenize(b_tokenize('pg' || (i % 200 + 1) || "
                    "'@example.org', 'email'))) from generate_series(1, 2000) as i")
        cur.execute("select count(*) from deid_vault.audit")
        records = cur.fetchone()[0] - before
        conn.close()
    finally:
        pg_cluster.destroy(cluster)
    return {"mint_per_s": mint, "per_row_per_s": per_row, "batch_per_s": batched,
            "detok_rows": 2000, "detok_records": records}


# -- driver -------------------------------------------------------------------------------


def plot(points: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(points)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label in (("sha256", "sha256() mart (reference)"),
                       ("steady", "tokenize: rebuild, values in vault (new process)"),
                       ("first", "tokenize: first build (empty vault)"),
                       ("detok", "detokenize a mart column")):
        ax.plot(sizes, [points[n][key] for n in sizes], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.set_xlabel("customer rows (10 % distinct, 3 tokenized columns)")
    ax.set_ylabel("rows per second")
    ax.set_title(f"deid on DuckDB + SQLite vault, {os.cpu_count()} cores (shared machine)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--distinct", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache-size", type=int, default=1_000_000)
    ap.add_argument("--sizes", default="100000,1000000,4000000",
                    help="row counts for the plot (comma-separated; empty: no plot)")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench.png")
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
    sizes = sorted({int(x) for x in a.sizes.split(",") if x.strip()} - {rows})
    os.environ.pop("DEID_KEYS", None)

    def vault_at(name: str) -> str:
        shutil.rmtree(OUT / name, ignore_errors=True)
        url = f"sqlite:///{OUT / name / 'vault.db'}"
        init_vault(url)  # deid init: builds never create a vault
        return url

    # Every phase runs in its own process; the steps are listed first for the progress bar.
    results: dict[str, object] = {}
    steps: list[tuple[str, Callable[[], object]]] = []

    def step(key: str, phase: str, **kw: object) -> None:
        steps.append((key, lambda: child(["--phase", phase, "--arg", json.dumps(kw)])))

    def local(key: str, fn: Callable[[], object]) -> None:
        steps.append((key, fn))

    def build(n: int, vault: str, **kw: object) -> dict[str, object]:
        return {"rows": n, "distinct": distinct, "vault": vault, "cache_size": a.cache_size,
                "repeat_in_process": 1, **kw}

    vault = f"sqlite:///{OUT / 'vault' / 'vault.db'}"
    local("reset", lambda: vault_at("vault"))
    step("load", "load", rows=rows, distinct=distinct)
    # A sha256 build before and after each deid build: on a shared machine the load changes
    # within minutes, so each deid build is compared with the peers that bracket it.
    deid_builds = ["cold", *(f"steady.{i}" for i in range(a.repeat)), "warm"]
    step("sha.0", "build", hashing="sha256", **build(rows, vault))
    for j, key in enumerate(deid_builds, start=1):
        step(key, "build", hashing="deid",
             **build(rows, vault, repeat_in_process=2 if key == "warm" else 1))
        step(f"sha.{j}", "build", hashing="sha256", **build(rows, vault))
    small = max(rows // 20, 1000)
    step("small", "build", hashing="deid", **build(rows, vault, cache_size=small))
    tp = f"sqlite:///{OUT / 'vault_tp' / 'vault.db'}"
    tp_n = 300_000 if rows >= 1_000_000 else max(rows // 10 * 3, 6_000)
    streams = ((rows, 10_000), (rows, 1_000_000), (4 * rows, 1_000_000))
    local("reset_tp", lambda: vault_at("vault_tp"))
    step("tp_2048", "vault", vault=tp, n=tp_n, batch=2048)
    local("reset_tp2", lambda: vault_at("vault_tp"))
    step("tp_big", "vault", vault=tp, n=tp_n, batch=100_000)
    # Four times as many: the journal merges into a growing `recent` several times, beside
    # the writer (the shorter runs end before their one merge does).
    local("reset_tp3", lambda: vault_at("vault_tp"))
    step("tp_long", "vault", vault=tp, n=4 * tp_n, batch=2048)
    step("detok", "detok_mart", rows=rows, distinct=distinct, vault=vault)
    for n, c in streams:
        step(f"stream.{n}.{c}", "stream", rows=rows, distinct=distinct, vault=vault, n=n,
             cache_size=c)
    step("lambda", "lambda")
    step("postgres", "postgres", n=50_000)
    for n in sizes:
        sv = f"sqlite:///{OUT / f'vault_{n}' / 'vault.db'}"
        local(f"reset.{n}", lambda n=n: vault_at(f"vault_{n}"))
        step(f"load.{n}", "load", rows=n, distinct=distinct)
        step(f"sha.{n}", "build", hashing="sha256", **build(n, sv))
        step(f"cold.{n}", "build", hashing="deid", **build(n, sv))
        step(f"steady.{n}", "build", hashing="deid", **build(n, sv))
        step(f"detok.{n}", "detok_mart", rows=n, distinct=distinct, vault=sv)

    print(f"deid bench: {rows:,} rows ({distinct:.0%} distinct), plot at "
          f"{', '.join(f'{n:,}' for n in sorted({*sizes, rows}))} rows; the first run "
          "generates the raw data (cached in bench/out)", file=sys.stderr)
    with tqdm(steps, desc="bench", unit="phase", file=sys.stderr) as bar:
        for key, fn in bar:
            bar.set_postfix_str(key)
            results[key] = fn()
    r: dict[str, Any] = results

    shas = [r[f"sha.{j}"]["first"] for j in range(len(deid_builds) + 1)]
    t_sha = statistics.median(shas)
    t_steady = statistics.median(r[f"steady.{i}"]["first"] for i in range(a.repeat))
    cold, warm, detok, pg, lam = r["cold"], r["warm"], r["detok"], r["postgres"], r["lambda"]

    def bracketed(key: str, field: str = "first") -> float:
        """A deid build's time over the mean of the sha256 builds just before and after it."""
        j = deid_builds.index(key)
        return float(r[key][field]) / ((shas[j] + shas[j + 1]) / 2)

    x_cold = bracketed("cold")
    x_steady = statistics.median(bracketed(f"steady.{i}") for i in range(a.repeat))
    x_warm = bracketed("warm", "last")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def per_s(x: float) -> str:
        return f"{x:,.0f} /s"

    lines = [
        (f"customer mart, sha256() in place of tokenize (median of {len(shas)}) — the peer",
         f"{t_sha:.2f} s", "1.00x", f"(range {min(shas):.2f} to {max(shas):.2f} s)"),
        ("first build (empty vault) ÷ sha256 mart", f"{cold['first']:.2f} s",
         f"{x_cold:.2f}x", f"≤ 2.5x: {verdict(x_cold <= 2.5)}"),
        ("steady-state rebuild in a new process ÷ sha256 (median)", f"{t_steady:.2f} s",
         f"{x_steady:.2f}x", f"≤ 1.5x: {verdict(x_steady <= 1.5)}"),
        ("rebuild, values in vault and in the process's cache ÷ sha256", f"{warm['last']:.2f} s",
         f"{x_warm:.2f}x", ""),
        ("new values into the vault, DuckDB's 2,048-row vectors",
         per_s(r["tp_2048"]["new_per_s"]), f"{r['tp_2048']['new_per_s'] / 150_000:.2f}x target",
         f"≥ 150,000 /s: {verdict(r['tp_2048']['new_per_s'] >= 150_000)}"),
        ("new values, 100k-value batches (a Redshift batch)", per_s(r["tp_big"]["new_per_s"]),
         f"{r['tp_big']['new_per_s'] / 300_000:.2f}x target",
         f"≥ 300,000 /s: {verdict(r['tp_big']['new_per_s'] >= 300_000)}"),
        (f"new values, {4 * tp_n:,} in 2,048-row vectors (merges beside the writer)",
         per_s(r["tp_long"]["new_per_s"]),
         f"{r['tp_long']['new_per_s'] / r['tp_2048']['new_per_s']:.2f}x the 2,048 row", ""),
        ("detokenize a mart column through DuckDB (10 % distinct)",
         per_s(detok["detok_mart_per_s"]), f"{detok['detok_mart_per_s'] / 1e6:.2f}x target",
         f"≥ 1,000,000 /s: {verdict(detok['detok_mart_per_s'] >= 1e6)}"),
        ("detokenize distinct tokens, no cache (2,048 batches)",
         per_s(r["tp_2048"]["detok_distinct_per_s"]), "", ""),
    ]
    if "skipped" in pg:
        lines.append(("PostgreSQL rows", "skipped", "", "no PostgreSQL with plpython3u"))
    else:
        lines += [
            ("PostgreSQL tokenize, values in vault, per-row function — the peer",
             f"{pg['per_row_per_s']:,.0f} rows/s", "1.00x", ""),
            ("PostgreSQL tokenize, values in vault, deid.token_map (batches)",
             f"{pg['batch_per_s']:,.0f} rows/s", f"{pg['batch_per_s'] / pg['per_row_per_s']:.2f}x",
             f"≥ 100,000 rows/s: {verdict(pg['batch_per_s'] >= 100_000)}"),
            ("PostgreSQL new values, deid.token_map (batches)", f"{pg['mint_per_s']:,.0f} rows/s",
             "", ""),
            ("PostgreSQL detokenize audit: records for one 2,000-row statement",
             f"{pg['detok_records']:,}", "", f"one per statement: "
             f"{verdict(pg['detok_records'] == 1)}"),
        ]
    cases = lam["cases"]
    cold_cpu = cases["cold vault (mint all)"][1]
    lines += [
        ("Redshift Lambda, one 100,000-value batch (10 % distinct), cold vault, CPU",
         f"{cold_cpu:.2f} s", f"{lam['rows'] / cold_cpu:,.0f} values/s",
         f"< 1 s: {verdict(cold_cpu < 1)}"),
        ("Redshift Lambda, same batch, warm vault, cold container, CPU",
         f"{cases['warm vault, cold container'][1]:.2f} s", "", ""),
        ("Redshift Lambda response on the wire (limit 6 MiB)",
         f"{lam['response_bytes'] / 2**20:.2f} MiB", "", ""),
        (f"peak RSS, steady build, cache {a.cache_size:,}",
         f"{statistics.median(r[f'steady.{i}']['peak_rss_mib'] for i in range(a.repeat)):.0f} MiB",
         "", ""),
        (f"peak RSS, steady build, cache {small:,}", f"{r['small']['peak_rss_mib']:.0f} MiB",
         f"({r['small']['first']:.2f} s)", ""),
        ("peak RSS, sha256 build",
         f"{statistics.median(r[f'sha.{j}']['peak_rss_mib'] for j in range(len(shas))):.0f} MiB",
         "", ""),
        *[(f"tokenize stream of {n:,} rows, cache {c:,}: memory growth",
           f"{r[f'stream.{n}.{c}']['growth_mib']:.0f} MiB",
           f"({r[f'stream.{n}.{c}']['per_s']:,.0f} rows/s)", "")
          for n, c in streams],
    ]
    print(f"\ndeid bench: {rows:,} rows, {distinct:.0%} distinct, 3 tokenized columns, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, repeat {a.repeat}\n")
    width = max(len(n) for n, _, _, _ in lines)
    for name, value, ratio, target in lines:
        print(f"  {name:<{width}}  {value:>16}  {ratio:<18} {target}")

    if sizes:
        points = {rows: {"sha256": rows / t_sha, "first": rows / cold["first"],
                         "steady": rows / t_steady, "detok": detok["detok_mart_per_s"]}}
        for n in sizes:
            points[n] = {"sha256": n / r[f"sha.{n}"]["first"], "first": n / r[f"cold.{n}"]["first"],
                         "steady": n / r[f"steady.{n}"]["first"],
                         "detok": r[f"detok.{n}"]["detok_mart_per_s"]}
        print("\n  rows/s by size: " + "; ".join(
            f"{n:,}: " + ", ".join(f"{k} {v:,.0f}" for k, v in points[n].items())
            for n in sorted(points)))
        plot(points, a.plot)
        print(f"  plot: {a.plot.relative_to(ROOT) if a.plot.is_relative_to(ROOT) else a.plot}")


if __name__ == "__main__":
    main()
