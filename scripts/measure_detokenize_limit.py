"""How many values each query shape detokenizes on DuckDB (README "Re-identify only what is
shown"). Run after `make demo` (which builds the marts and grants pii_reader):

    .venv/bin/python scripts/measure_detokenize_limit.py [PROJECT_DIR]

Counts come from the vault's audit log (every detokenize call records how many values it
decrypted), with the detokenize cache off so nothing is served without a record.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb

from deid.duckdb_plugin import register
from deid.vault import VaultConfig, open_service, open_store

RANKING = """select c.full_name_token, sum(o.order_total) as revenue
    from {customers} as c inner join {orders} as o on c.customer_key = o.customer_key
    group by c.full_name_token"""


def main() -> None:
    project = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    vault = f"sqlite:///{project / '.deid' / 'vault.db'}"

    def audited() -> int:
        store = open_store(vault)
        try:
            return sum(r.get("count", 0) for r in store.audit_records()
                       if r["action"] == "detokenize")
        finally:
            store.close()

    ranking = RANKING.format(customers="main.dim_customers", orders="main.fct_orders")
    shapes = {
        "select deid.detokenize(name) ... limit 5":
            "select deid.detokenize(full_name_token) from main.dim_customers limit 5",
        "select deid.detokenize(name), revenue ... order by revenue desc limit 5":
            f"select deid.detokenize(full_name_token), revenue from ({ranking}) as ranked "
            "order by revenue desc limit 5",
        "with top as (... order by revenue desc limit 5) select deid.detokenize(name) ...":
            f"with top as ({ranking} order by revenue desc limit 5) "
            "select deid.detokenize(full_name_token), revenue from top order by revenue desc",
    }
    con = duckdb.connect(str(project / os.environ.get("DEID_WAREHOUSE", "warehouse.duckdb")))
    register(con, open_service(VaultConfig(url=vault, detokenize_cache_size=0)), "pii_reader")
    for label, sql in shapes.items():
        before = audited()
        rows = con.sql(sql).fetchall()
        print(f"{label:80} rows {len(rows)}  detokenized {audited() - before}")
    con.close()

    ranking = RANKING.format(customers="{{ ref('dim_customers') }}",
                             orders="{{ ref('fct_orders') }}")
    shows = {
        "dbt show --limit 5: ranking query, no limit of its own":
            f"select {{{{ deid.detokenize('full_name_token') }}}}, revenue from ({ranking}) "
            "as ranked order by revenue desc",
        "dbt show --limit 5: with top as (... limit 5) shape":
            f"with top as ({ranking} order by revenue desc limit 5) select "
            "{{ deid.detokenize('full_name_token') }}, revenue from top order by revenue desc",
        "dbt show --limit 5: select deid.detokenize(name) from dim_customers":
            "select {{ deid.detokenize('full_name_token') }} from {{ ref('dim_customers') }}",
    }
    dbt = str(Path(sys.executable).with_name("dbt"))
    env = {**os.environ, "DEID_VAULT": vault, "DEID_DETOKENIZE_CACHE_SIZE": "0"}
    for label, sql in shows.items():
        before = audited()
        subprocess.run([dbt, "show", "--quiet", "--log-level-file", "none", "--target",
                        "pii_reader", "--limit", "5", "--inline", sql], cwd=project, env=env,
                       check=True, capture_output=True)
        print(f"{label:80} rows 5  detokenized {audited() - before}")


if __name__ == "__main__":
    main()
