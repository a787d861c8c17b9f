"""The dbt side of erasure: ``deid erased`` as a seed and the ``deid.no_erased_tokens`` test,
with the README's snippet, in a consumer project that installs deid as a local package."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_forget import _cli

pytestmark = pytest.mark.e2e


CONSUMER = """
name: clinic
version: "1.0.0"
config-version: 2
profile: clinic
models:
  clinic:
    +materialized: table
  deid:
    +enabled: false
seeds:
  deid:
    +enabled: false
"""

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
"""


def readme_erasure_yaml() -> str:
    """The dbt test snippet of the README's Erasure section, as a user copies it."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text[text.index("## Erasure"):]
    section = section[:section.index("\n## ", 1)]
    start = section.index("```yaml\n") + len("```yaml\n")
    return section[start:section.index("```", start)]


def test_dbt_test_finds_mart_rows_whose_tokens_were_erased(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import duckdb

    from dbt_project_copy import copy_project

    package = copy_project(tmp_path / "deid")
    consumer = tmp_path / "clinic"
    (consumer / "models").mkdir(parents=True)
    (consumer / "seeds").mkdir()
    (consumer / "dbt_project.yml").write_text(CONSUMER)
    (consumer / "packages.yml").write_text(f"packages:\n  - local: {package.path}\n")
    (consumer / "profiles.yml").write_text(PROFILE.format(path=consumer))
    (consumer / "models" / "_sources.yml").write_text(SOURCES)
    (consumer / "models" / "_models.yml").write_text("version: 2\n" + readme_erasure_yaml())
    (consumer / "models" / "crm_contacts.sql").write_text(
        "select {{ deid.tokenize('email', 'email') }} as email_token, visits "
        "from {{ source('intake', 'patients') }}")
    con = duckdb.connect(str(consumer / "clinic.duckdb"))
    con.execute("create table main.patients as select * from (values "
                "('ann@example.com', 1), ('bo@example.com', 2), ('Ann@Example.com', 3)) "
                "t(email, visits)")
    con.close()
    env = {**os.environ, "DBT_PROFILES_DIR": str(consumer),
           "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    env.pop("DEID_VAULT", None)
    dbt = str(Path(sys.executable).with_name("dbt"))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([dbt, *args], cwd=consumer, env=env, text=True,
                              capture_output=True, timeout=300)

    vault = consumer / "vault" / "vault.db"
    seed = consumer / "seeds" / "deid_erased_tokens.csv"
    _cli(vault, "init", "--transformer", "builder")  # the builder may mint tokens
    _cli(vault, "erased", "--out", str(seed))  # the empty list: the test passes
    for args in (["deps"], ["build", "--select", "package:clinic"]):
        proc = run(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    _cli(vault, "forget", "email", "--values-from", "-", stdin="ann@example.com\n")
    _cli(vault, "erased", "--out", str(seed))
    # The mart is a downstream copy built before the erasure: only the seed is refreshed
    # (--full-refresh: the first, empty list was typed differently).
    assert run("seed", "--select", "package:clinic", "--full-refresh").returncode == 0
    proc = run("test", "--select", "package:clinic")
    assert proc.returncode != 0
    assert "no_erased_tokens" in proc.stdout and "Got 2 results" in proc.stdout
    assert "ann@" not in proc.stdout.lower()

