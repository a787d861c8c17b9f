"""One maximal Redshift batch through the tokenize Lambda handler, on the local (SQLite) vault.

The batch is what MAX_BATCH_SIZE 5 MB lets Redshift send: about 100,000 email values, 10 %
distinct, ~5 MB of arguments. The handler runs in-process, as the Lambda runtime calls it
(the runtime parses the event JSON first; that cost is shown on its own line). Three cases:

- cold vault: every distinct value is new (normalize, fingerprint, mint, encrypt, insert);
- warm vault, cold container: values exist, the container's cache is empty (a cold start);
- warm container: the container has seen the values (cache hits only).

Prints wall time, handler CPU time (the target: under 1 s for the batch), values per second
of handler CPU, and the response size on the wire against Lambda's 6 MB limit. Medians of
--repeat runs; each cold-vault run uses a fresh vault.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "udfs"))

from deid.lambda_handler import (  # noqa: E402
    LAMBDA_PAYLOAD_LIMIT,
    HandlerConfig,
    RedshiftUDF,
    _wire_size,
)
from deid.service import VaultTokenService  # noqa: E402
from deid.stores.sqlite import SQLiteStore  # noqa: E402

MAX_BATCH_SIZE = 5 * 1024 * 1024


def make_request(rows: int, distinct: int) -> str:
    """A Redshift request of `rows` rows, `distinct` distinct emails, just under 5 MB."""
    per_row = (MAX_BATCH_SIZE - 400) // rows  # bytes per argument row, envelope aside
    # a row is ["<value>", "email"], plus ", " between rows: 15 bytes around the value
    width = per_row - 15
    values = []
    for i in range(distinct):
        local = f"customer.{i:06d}."
        values.append(local + "x" * (width - len(local) - len("@example.com")) + "@example.com")
    doc = {
        "request_id": "bench", "cluster": "arn:aws:redshift:us-east-1:123456789012:cluster:bench",
        "user": "dbt_transformer", "database": "dev", "external_function": "deid.tokenize",
        "query_id": 1, "num_records": rows,
        "arguments": [[values[i % distinct], "email"] for i in range(rows)],
    }
    return json.dumps(doc)


def timed(fn: Callable[[], str]) -> tuple[float, float, str]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def measure(rows: int = 100_000, distinct_fraction: float = 0.10,
            repeat: int = 3) -> dict[str, object]:
    """Medians of `repeat` runs of each case: {case: (wall s, CPU s)}, plus sizes."""
    os.environ.pop("DEID_KEYS", None)
    distinct = max(1, int(rows * distinct_fraction))
    request = make_request(rows, distinct)
    results: dict[str, list[tuple[float, float]]] = {
        "runtime: parse the request JSON": [], "cold vault (mint all)": [],
        "warm vault, cold container": [], "warm container": []}
    response_size = 0

    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="deid-bench-") as tmp:
            wall, cpu, _ = timed(lambda: json.loads(request))  # type: ignore[arg-type,return-value]
            results["runtime: parse the request JSON"].append((wall, cpu))
            event = json.loads(request)
            store = SQLiteStore(Path(tmp) / "vault.db", create=True)
            store.grant_tokenize("dbt_transformer", "*", "tokenize", "bench")
            serves = HandlerConfig(databases=frozenset({"dev"}))

            udf = RedshiftUDF(VaultTokenService(store), serves)
            wall, cpu, out = timed(lambda: udf.tokenize(event))  # noqa: B023
            doc = json.loads(out)
            if not doc.get("success"):
                raise SystemExit(f"tokenize failed: {doc.get('error_msg')}")
            assert len(doc["results"]) == rows and len(set(doc["results"])) == distinct
            results["cold vault (mint all)"].append((wall, cpu))
            response_size = _wire_size(out)

            cold = RedshiftUDF(VaultTokenService(store), serves)
            wall, cpu, again = timed(lambda: cold.tokenize(event))  # noqa: B023
            assert json.loads(again)["results"] == doc["results"]
            results["warm vault, cold container"].append((wall, cpu))

            wall, cpu, again = timed(lambda: cold.tokenize(event))  # noqa: B023
            assert json.loads(again)["results"] == doc["results"]
            results["warm container"].append((wall, cpu))
            store.close()
    return {
        "rows": rows, "distinct": distinct, "request_bytes": len(request.encode()),
        "response_bytes": response_size,
        "cases": {case: (statistics.median(r[0] for r in runs),
                         statistics.median(r[1] for r in runs))
                  for case, runs in results.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--distinct", type=float, default=0.10, help="fraction of distinct values")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    m = measure(args.rows, args.distinct, args.repeat)
    rows, cases = args.rows, m["cases"]
    assert isinstance(cases, dict)
    print(f"deid.tokenize Lambda handler, one batch: {rows:,} values, {m['distinct']:,} distinct, "
          f"{m['request_bytes']:,} bytes of request (MAX_BATCH_SIZE {MAX_BATCH_SIZE:,}); "
          f"SQLite vault; median of {args.repeat}")
    print()
    print(f"{'case':<34} {'wall ms':>9} {'CPU ms':>9} {'values/s (CPU)':>15}")
    print(f"{'-' * 34} {'-' * 9} {'-' * 9} {'-' * 15}")
    for case, (wall, cpu) in cases.items():
        rate = f"{rows / cpu:,.0f}" if cpu > 0 else "-"
        print(f"{case:<34} {wall * 1000:>9.0f} {cpu * 1000:>9.0f} {rate:>15}")
    print()
    size = int(m["response_bytes"])  # type: ignore[call-overload]
    verdict = "under" if size < LAMBDA_PAYLOAD_LIMIT else "OVER"
    print(f"response on the wire: {size:,} bytes, {verdict} Lambda's "
          f"{LAMBDA_PAYLOAD_LIMIT:,}-byte limit")
    cold_cpu = cases["cold vault (mint all)"][1]
    print(f"target, under 1 s of handler CPU for the batch: "
          f"{'met' if cold_cpu < 1 else 'NOT met'} ({cold_cpu:.2f} s on a cold vault)")


if __name__ == "__main__":
    main()
