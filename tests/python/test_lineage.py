"""`deid check` on small hand-written manifests: what the lineage checker accepts, what it
refuses, and that it fails closed. (The battery, test_pii_battery.py, runs it on dbt's own.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deid.cli import main
from deid.lineage import Checker, Settings

GUARD = [{"sql": "{{ deid.pii_guard() }}", "transaction": True}]
PEOPLE = '"wh"."raw"."people"'


def _source() -> dict[str, Any]:
    return {"unique_id": "source.p.crm.people", "resource_type": "source",
            "source_name": "crm", "name": "people", "relation_name": PEOPLE,
            "columns": {"email": {"config": {"meta": {"pii": "email"}}},
                        "ssn": {"meta": {"pii": "ssn"}}, "region": {}}}


def _model(name: str, sql: str | None, schema: str = "main", materialized: str = "table",
           hooks: list[dict[str, Any]] | None = None,
           parents: tuple[str, ...] = ("source.p.crm.people",)) -> dict[str, Any]:
    return {"unique_id": f"model.p.{name}", "resource_type": "model", "name": name,
            "schema": schema, "database": "wh",
            "relation_name": None if materialized == "ephemeral"
            else f'"wh"."{schema}"."{name}"',
            "config": {"materialized": materialized,
                       "post-hook": GUARD if hooks is None else hooks},
            "compiled_code": sql, "columns": {}, "depends_on": {"nodes": list(parents)}}


def run(*models: dict[str, Any], adapter: str = "duckdb",
        settings: Settings | None = None) -> dict[str, list[str]]:
    manifest = {"metadata": {"adapter_type": adapter},
                "sources": {"source.p.crm.people": _source()},
                "nodes": {m["unique_id"]: m for m in models}}
    found: dict[str, list[str]] = {}
    for f in Checker(manifest, settings or Settings()).run():
        found.setdefault(f.name, []).append(f"{f.column}: {f.message}")
    return found


@pytest.mark.parametrize("adapter", ["duckdb", "postgres", "redshift"])
def test_tokenized_passes_and_a_pass_through_fails_on_every_engine(adapter: str) -> None:
    width = "varchar(65535)" if adapter == "redshift" else "varchar"
    ok = _model("ok", f"select deid.tokenize(cast(email as {width}), 'email') as email_token,"
                      f" region from {PEOPLE}")
    bad = _model("bad", f"select lower(email) as contact from {PEOPLE}")
    found = run(ok, bad, adapter=adapter)
    assert "ok" not in found
    assert found["bad"] == [
        "contact: declared PII (email) reaches it untreated: crm.people.email -> "
        "bad.contact; tokenize it (deid.tokenize, deid.token_map) or generalize it "
        "(deid.generalized)"]


def test_only_registered_generalizers_clear_pii() -> None:
    sql = ("select /* deid.generalized:{g} */ (split_part(email, '@', 2)) as domain"
           f" from {PEOPLE}")
    assert "m" in run(_model("m", sql.format(g="email_domain")))
    registered = Settings(generalizers=("email_domain",))
    assert run(_model("m", sql.format(g="email_domain")), settings=registered) == {}
    # A marker only clears what it wraps.
    wrapped = ("select /* deid.generalized:year */ (extract(year from ssn)) || email as x"
               f" from {PEOPLE}")
    assert run(_model("m", wrapped))["m"][0].startswith("x: declared PII (email)")


def test_detokenize_in_a_materialized_relation_is_re_identification() -> None:
    sql = f"select deid.detokenize(deid.tokenize(email, 'email')) as contact from {PEOPLE}"
    assert "re-identified" in run(_model("m", sql))["m"][0]


def test_a_model_in_the_restricted_zone_may_hold_pii_and_passes_it_downstream() -> None:
    staged = _model("staged", f"select email as e from {PEOPLE}", schema="raw")
    mart = _model("mart", 'select upper(e) as shout from "wh"."raw"."staged"',
                  parents=("model.p.staged",))
    found = run(staged, mart)
    assert "staged" not in found
    assert found["mart"][0].startswith(
        "shout: declared PII (email) reaches it untreated: crm.people.email -> staged.e")


def test_reading_the_zone_behind_dbts_back_fails_even_when_nothing_is_declared() -> None:
    found = run(_model("m", 'select 1 as n from "wh"."raw"."unknown_table"', parents=()))
    assert found["m"] == ["None: reads the restricted zone without source() or ref(): "
                          "wh.raw.unknown_table; declare it as a source (its PII in meta) and "
                          "select from source()"]


def test_a_restricted_zone_in_its_own_database_is_told_apart_by_database() -> None:
    """DuckDB can attach the landing data as its own database: `landing.main.people` and the
    marts' `wh.main.people` share schema and name."""
    landing = Settings(restricted_zone=("landing",))
    source = _source()
    source["relation_name"] = '"landing"."main"."people"'
    same_name = _model("people", "select 1 as n", parents=())
    reader = _model("reader", 'select p.email as e from "wh"."main"."people" as p',
                    parents=("model.p.people",))
    leak = _model("leak", 'select email as e from "landing"."main"."people"')
    hidden = _model("hidden", 'select email as e from "landing"."main"."people"', parents=())
    manifest = {"metadata": {"adapter_type": "duckdb"},
                "sources": {"source.p.crm.people": source},
                "nodes": {m["unique_id"]: m for m in (same_name, reader, leak, hidden)}}
    found = {(f.name, f.column) for f in Checker(manifest, landing).run()}
    assert found == {("leak", "e"), ("hidden", "e"), ("hidden", None)}


def test_a_relation_without_the_guard_hook_is_reported() -> None:
    found = run(_model("m", "select 1 as n", hooks=[]))
    assert "has no deid.pii_guard() post-hook" in found["m"][0]


def test_the_check_fails_closed_on_sql_it_cannot_read() -> None:
    unparsable = _model("m", "select '123-45-6789' as x from from where")
    message = run(unparsable)["m"][0]
    assert "could not be parsed" in message and "123-45-6789" not in message
    assert "run `dbt compile` first" in run(_model("n", None))["n"][0]
    python = {**_model("p", "def model(dbt, session): ..."), "language": "python"}
    assert "traces SQL only" in run(python)["p"][0]


def test_correlated_subqueries_and_lateral_aliases_are_followed() -> None:
    correlated = (f"select p.region, (select max(q.ssn) from {PEOPLE} as q"
                  f" where q.region = p.region) as top from {PEOPLE} as p")
    assert run(_model("m", correlated))["m"][0].startswith("top: declared PII (ssn)")
    lateral = f"select email as e, e || '!' as shout from {PEOPLE}"
    assert {m.split(":")[0] for m in run(_model("m", lateral))["m"]} == {"e", "shout"}


def test_settings_come_from_the_projects_vars(tmp_path: Path) -> None:
    assert Settings.from_project(tmp_path) == Settings()
    (tmp_path / "dbt_project.yml").write_text(
        "name: x\nvars:\n  deid_restricted_zone: Landing\n"
        "  deid_generalizers: [Email_Domain]\n")
    settings = Settings.from_project(tmp_path)
    assert settings.restricted_zone == ("landing",)
    assert settings.generalizers[-1] == "email_domain"


@pytest.mark.parametrize("from_", [
    "read_csv('seeds/raw/people.csv')", "read_csv_auto('people.csv', header = true)",
    "'landing/people.parquet'", "read_parquet('s3://bucket/people/*.parquet') as p"])
def test_reading_files_from_a_model_outside_the_zone_is_refused(from_: str) -> None:
    found = run(_model("m", f"select email as contact from {from_}", parents=()))
    assert "reads data outside any relation" in found["m"][0]


def test_generated_rows_are_not_file_reads() -> None:
    assert run(_model("m", "select range as n from range(3)", parents=())) == {}


def test_the_cli_finds_the_manifest_where_dbt_wrote_it(tmp_path: Path) -> None:
    """`deid check` reads DBT_TARGET_PATH as dbt does (make demo-postgres sets it)."""
    leak = _model("leak", f"select email as contact from {PEOPLE}")
    manifest = {"metadata": {"adapter_type": "duckdb"},
                "sources": {"source.p.crm.people": _source()},
                "nodes": {leak["unique_id"]: leak}}
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "manifest.json").write_text(json.dumps(manifest))
    runner = CliRunner()
    missing = runner.invoke(main, ["check", "--project-dir", str(tmp_path)])
    assert missing.exit_code == 1 and "run `dbt compile` first" in missing.output
    found = runner.invoke(main, ["check", "--project-dir", str(tmp_path)],
                          env={"DBT_TARGET_PATH": "elsewhere"})
    assert found.exit_code == 1
    assert "deid check: leak.contact: declared PII (email)" in found.output
    leak["compiled_code"] = f"select deid.tokenize(email, 'email') as contact from {PEOPLE}"
    (tmp_path / "elsewhere" / "manifest.json").write_text(json.dumps(manifest))
    clean = runner.invoke(main, ["check", "--project-dir", str(tmp_path),
                                 "--target-path", str(tmp_path / "elsewhere")])
    assert clean.exit_code == 0, clean.output
