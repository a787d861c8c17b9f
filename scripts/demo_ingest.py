"""`make demo-ingest`, after the marts are built: replay a recorded change stream through
the ingest handler into files, load them into DuckDB next to the dbt-built mart, and show
tokens that join, an updated token, and an erased person refusing to detokenize.

Usage: python scripts/demo_ingest.py [PROJECT_DIR]  (the vault: DEID_VAULT, as dbt uses it)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import duckdb

from deid.duckdb_plugin import register
from deid.ingest import stream
from deid.vault import VaultConfig, open_service

SOURCE = "pharmacy.customers"
# A deleted customer's identifiers are erased from the vault. The customer key is not: the
# order facts (an incremental model) keep joining to it, and re-running the demo rebuilds the
# marts without orphaning them. City, state and region are not PII.
ERASE = ("full_name", "email", "phone", "ssn", "date_of_birth", "street_address")
RECORDED = Path(__file__).parent / "demo_ingest" / "customers_stream.json"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    con.sql(sql).show(max_width=200)


def refusal(con: duckdb.DuckDBPyConnection, sql: str) -> str:
    """The error a query fails with, from the deid error class on (DuckDB wraps it)."""
    try:
        con.sql(sql).fetchall()
    except duckdb.Error as exc:
        text = str(exc)
        start = min((text.find(n) for n in ("ErasedTokenError", "UnknownTokenError",
                                            "PermissionDeniedError") if n in text),
                    default=0)
        return text[start:].splitlines()[0]
    return "UNEXPECTED: the query succeeded"


def replay(project: Path, out: Path) -> list[dict[str, object]]:
    config = stream.IngestConfig(
        vault=VaultConfig.from_env(), column_map=str(project / "target" / "manifest.json"),
        source=SOURCE, output=f"file://{out}", erase_on_remove=ERASE, principal="ingest-demo")
    handler = stream.build(config)
    results = []
    for n, event in enumerate(json.loads(RECORDED.read_text())["batches"], 1):
        ops = ", ".join(r["eventName"] for r in event["Records"])
        result = handler.dynamodb(event)  # exactly what Lambda passes and gets back
        print(f"batch {n}: {ops} -> {json.dumps(result)}")
        results.append(result)
    return results


def main(project: Path) -> int:
    out = project / "ingest_out"
    shutil.rmtree(out, ignore_errors=True)

    say("1/5  Replay the recorded DynamoDB stream through deid.ingest.stream.dynamodb_handler")
    print(f"(column map: the dbt sources' pii meta in target/manifest.json; erase on REMOVE: "
          f"{', '.join(ERASE)})")
    replay(project, out)
    for path in sorted(out.rglob("*.jsonl")):
        print(f"wrote {path.relative_to(project)}")

    warehouse = os.environ.get("DEID_WAREHOUSE", str(project / "warehouse.duckdb"))
    con = duckdb.connect(warehouse)
    con.execute("create schema if not exists ingest")
    con.execute(f"""create or replace table ingest.customer_changes as
                    select * from read_json('{out}/*/*.jsonl', format = 'newline_delimited')
                    order by cast(_seq as hugeint)""")
    # The current state: each customer's latest change, unless it was a REMOVE.
    con.execute("""create or replace view ingest.customers as
                   select * exclude (_rank) from (
                       select *, row_number() over (partition by customer_id
                                                    order by cast(_seq as hugeint) desc) as _rank
                       from ingest.customer_changes)
                   where _rank = 1 and _op != 'REMOVE'""")

    say("2/5  Landed: tokens only, next to the dbt-built mart; they join on tokens")
    show(con, """select _op, customer_id, email, city, _changed
                 from ingest.customer_changes order by cast(_seq as hugeint)""")
    show(con, """select c.customer_id as customer_key, d.age_band, d.zip3, d.region,
                        c.email = d.email_token as same_email_token,
                        c.phone = d.phone_token as same_phone_token,
                        c.ssn = d.ssn_token as same_ssn_token
                 from ingest.customers c
                 left join main.dim_customers d on c.customer_id = d.customer_key
                 order by d.customer_key nulls last""")

    say("3/5  Customer 2 changed their email: the MODIFY carries a new token")
    show(con, """select _op, _changed, email
                 from ingest.customer_changes i
                 where customer_id = (select customer_id from ingest.customer_changes
                                      where _op = 'MODIFY')
                 order by cast(_seq as hugeint)""")

    say("4/5  Customer 3 was deleted and erased: their tokens no longer detokenize")
    service = open_service(VaultConfig.from_env())
    register(con, service, "pii_reader")
    print("customer 1's email, re-identified by pii_reader:")
    show(con, """select deid.detokenize(email) as email from ingest.customers
                 where customer_id = (select customer_id from ingest.customer_changes
                                      where _op = 'INSERT' order by cast(_seq as hugeint)
                                      limit 1)""")
    print("customer 3's email token, from the stream and from the mart:")
    erased = """(select customer_id from ingest.customer_changes where _op = 'REMOVE')"""
    print("  stream:", refusal(con, f"""select deid.detokenize(email)
                                        from ingest.customer_changes
                                        where customer_id = {erased} and _op = 'INSERT'"""))
    print("  mart:  ", refusal(con, f"""select deid.detokenize(email_token)
                                        from main.dim_customers
                                        where customer_key = {erased}"""))

    say("5/5  The mart still holds the erased tokens: `deid erased` lists them to clean up")
    erased = [e.token for e in service.erasures(None)]  # tokens only: the values are gone
    con.execute("create or replace temp table erased as select unnest($tokens) as token",
                {"tokens": erased})
    columns = ["customer_key", "full_name_token", "email_token", "phone_token", "ssn_token",
               "street_address_token"]
    show(con, f"""select {", ".join(f"{c} in (select token from erased) as {c}_erased"
                                    for c in columns)}
                  from main.dim_customers
                  where {" or ".join(f"{c} in (select token from erased)" for c in columns)}""")
    con.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()))
