"""deid works as a `local:` package of another dbt project: macros, plugin, guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dbt_project_copy import ROOT, copy_project

pytestmark = pytest.mark.e2e


def readme_project_config() -> str:
    """The dbt_project.yml snippet of the README's "Using deid in your dbt project"."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml\n# dbt_project.yml:") + len("```yaml\n")
    return readme[start:readme.index("```", start)]


# The README's snippet as a consumer copies it, with tables (the test reads them back).
CONSUMER_PROJECT = """
name: clinic
version: "1.0.0"
config-version: 2
profile: clinic
""" + readme_project_config().replace("your_project", "clinic").replace(
    "models:\n  clinic:\n", "models:\n  clinic:\n    +materialized: table\n")

PROFILE = """
clinic:
  target: dev
  outputs:
    dev:
      type: duckdb
      path: "{path}/clinic.duckdb"
      plugins:
        - module: deid.duckdb_plugin
          config: {{vault: "sqlite:///{path}/vault/vault.db", principal: builder}}
"""

SOURCES = """
version: 2
sources:
  - name: intake
    schema: main
    tables:
      - name: patients
        columns:
          - name: email
            config: {meta: {pii: email}}
models:
  - name: patients_clean
    columns:
      - name: email_token
        config: {meta: {deid: {tokenized: email}}}
      - name: visits
"""


def test_consumer_project_tokenizes_through_the_local_package(tmp_path: Path) -> None:
    package = copy_project(tmp_path / "deid")
    consumer = tmp_path / "clinic"
    (consumer / "models").mkdir(parents=True)
    (consumer / "dbt_project.yml").write_text(CONSUMER_PROJECT)
    (consumer / "packages.yml").write_text(f"packages:\n  - local: {package.path}\n")
    (consumer / "profiles.yml").write_text(PROFILE.format(path=consumer))
    (consumer / "models" / "_models.yml").write_text(SOURCES)
    (consumer / "models" / "patients_clean.sql").write_text(
        "select {{ deid.tokenize('email', 'email') }} as email_token, visits "
        "from {{ source('intake', 'patients') }}")
    import duckdb

    con = duckdb.connect(str(consumer / "clinic.duckdb"))
    con.execute("create table main.patients as select * from (values "
                "('Ann@Example.com', 3), ('ann@example.com ', 1), (null, 2)) t(email, visits)")
    con.close()
    env = {**os.environ, "DBT_PROFILES_DIR": str(consumer),
           "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    env.pop("DEID_VAULT", None)
    # What the consumer's vault admin does once: the builder may mint tokens.
    init = subprocess.run([str(Path(sys.executable).with_name("deid")), "init", "--transformer",
                           "builder", "--vault", f"sqlite:///{consumer}/vault/vault.db"],
                          env=env, text=True, capture_output=True, timeout=120)
    assert init.returncode == 0, init.stdout + init.stderr
    dbt = str(Path(sys.executable).with_name("dbt"))
    # The README's build: dbt compile && deid check && dbt build (run: no tests here).
    for cmd in ([dbt, "deps"], [dbt, "compile"], [str(Path(dbt).with_name("deid")), "check"],
                [dbt, "run"]):
        proc = subprocess.run(cmd, cwd=consumer, env=env, text=True,
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    con = duckdb.connect(str(consumer / "clinic.duckdb"), read_only=True)
    rows = con.sql("select email_token from main.patients_clean order by visits").fetchall()
    con.close()
    assert rows[0][0] == rows[2][0] and rows[0][0].endswith("@deid.invalid")  # one person
    assert rows[1] == (None,)
