"""Redshift SQL without a cluster: compile every model and the UDF/grant DDL for a redshift
target (``dbt compile --no-populate-cache`` makes no connection) and parse each statement with
sqlfluff's redshift dialect. What sqlfluff cannot parse (MAX_BATCH_ROWS / MAX_BATCH_SIZE,
masking policies) is checked against the documented grammar and re-derived from deid's own
token formats and the handler's response encoding."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deid import kinds
from deid.lambda_handler import LAMBDA_PAYLOAD_LIMIT, _dumps, _wire_size
from deid.lineage import check

ROOT = Path(__file__).resolve().parents[2]
DBT = Path(sys.executable).with_name("dbt")
ROLE_ARN = "arn:aws:iam::123456789012:role/deid-redshift"
VARS = {
    "deid_redshift_iam_role": ROLE_ARN,
    "deid_transformer_roles": ["dbt_transformer"],
    "deid_pii_reader_roles": ["pii_reader", "user auditor"],
    # dbt-redshift's grants syntax for roles (with flags: redshift_grants_extended)
    "deid_analyst_roles": ["role:analyst"],
}
PROFILES = """\
deid:
  target: redshift
  outputs:
    redshift:
      type: redshift
      host: redshift.example.invalid
      port: 5439
      user: dbt_transformer
      password: not-a-real-password
      dbname: analytics
      schema: marts
      threads: 2
"""
# Compile both branches of incremental models: is_incremental() asks the warehouse whether
# the table exists, which needs a connection; this copy answers from a var instead.
OFFLINE_IS_INCREMENTAL = (
    "{% macro is_incremental() %}{{ return(var('offline_incremental', false)) }}{% endmacro %}\n")

# One set of vars for every later invocation, so dbt's partial parsing is reused.
SECOND_PASS = {"offline_incremental": True, "deid_redshift_masking": True}

pytestmark = pytest.mark.e2e  # dbt compiles the project (no warehouse connection)


def dbt(project: Path, *args: str, vars: dict[str, Any] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(DBT), "--no-use-colors", "--log-format", "text", *args,
           "--no-populate-cache", "--target", "redshift",
           "--profiles-dir", str(project), "--project-dir", str(project),
           "--vars", json.dumps({**VARS, **(vars or {})})]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=project)
    if check and run.returncode != 0:
        pytest.fail(f"dbt {' '.join(args[:1])} failed:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}")
    return run


def inline(project: Path, sql: str, vars: dict[str, Any] | None = None) -> str:
    out = dbt(project, "compile", "--inline", sql, vars=vars).stdout
    marker = "Compiled inline node is:"
    assert marker in out, out[-2000:]
    return out.split(marker, 1)[1].strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("redshift_project")
    for name in ("dbt_project.yml", "packages.yml"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dest / name)
    for name in ("macros", "models", "seeds", "tests", "analyses", "snapshots"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name,
                            ignore=shutil.ignore_patterns("python", "__pycache__"))
    (dest / "profiles.yml").write_text(PROFILES)
    (dest / "macros" / "zz_offline_is_incremental.sql").write_text(OFFLINE_IS_INCREMENTAL)
    # Roles in dbt's grants config on Redshift need this behavior flag (docs/redshift.md).
    config = yaml.safe_load((dest / "dbt_project.yml").read_text())
    config.setdefault("flags", {})["redshift_grants_extended"] = True
    (dest / "dbt_project.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


@pytest.fixture(scope="module")
def compiled(project: Path) -> dict[str, str]:
    dbt(project, "compile")
    # Kept for `deid check`: later compiles of a selection rewrite target/manifest.json.
    shutil.copy(project / "target" / "manifest.json", project / "manifest_all.json")
    out = {}
    for kind in ("models", "analyses"):
        for path in sorted((project / "target" / "compiled" / "deid" / kind).rglob("*.sql")):
            out[f"{kind}/{path.stem}"] = path.read_text()
    return out


@pytest.fixture(scope="module")
def incremental_branch(project: Path, compiled: dict[str, str]) -> dict[str, str]:
    """Incremental models compiled as if their table existed, in masking mode."""
    incremental = [n["name"] for n in json.loads(
        (project / "target" / "manifest.json").read_text())["nodes"].values()
        if n["resource_type"] == "model" and n["config"]["materialized"] == "incremental"]
    assert incremental, "fct_orders is incremental"
    dbt(project, "compile", "--select", *incremental, "dim_customers", vars=SECOND_PASS)
    base = project / "target" / "compiled" / "deid" / "models"
    return {name: next(base.rglob(f"{name}.sql")).read_text()
            for name in [*incremental, "dim_customers"]}


@pytest.fixture(scope="module")
def ddl(project: Path, compiled: dict[str, str]) -> list[str]:
    """Every statement deid runs on Redshift: the UDF DDL and grants (masking mode on),
    the masking attachments of dim_customers, and dbt's grant on a mart."""
    text = inline(project, (
        "{{ deid.redshift_udf_ddl() }}\n"
        "{{ deid.redshift_masking_attach_statements(ref('dim_customers'), "
        "graph.nodes['model.deid.dim_customers'].columns) | join(';\\n') }};\n"
        "{{ get_grant_sql(ref('dim_customers'), 'select', var('deid_analyst_roles')) }};"),
        vars=SECOND_PASS)
    return [s.strip().rstrip(";").strip() for s in text.split(";\n")
            if s.strip().rstrip(";").strip()]


# -- parsing ---------------------------------------------------------------------------------


def parse_errors(sql: str) -> list[str]:
    from sqlfluff.core import FluffConfig, Linter

    linter = Linter(config=FluffConfig(overrides={"dialect": "redshift"}))
    parsed = linter.parse_string(sql.rstrip().rstrip(";") + ";\n")
    errors = [v.desc() for v in parsed.violations]
    if parsed.tree is None:
        errors.append("no parse tree")
    else:
        errors += [f"unparsable: {seg.raw[:80]!r}"
                   for seg in parsed.tree.recursive_crawl("unparsable")]
    return errors


def test_every_model_compiles_and_parses_as_redshift(compiled: dict[str, str]) -> None:
    models = [k for k in compiled if k.startswith("models/")]
    expected = {f"models/{p.stem}" for p in (ROOT / "models").rglob("*.sql")
                if "staging" not in p.parts}  # staging is ephemeral: inlined as CTEs
    assert expected <= set(models)
    failures = {name: errs for name, sql in compiled.items() if (errs := parse_errors(sql))}
    assert not failures, failures


def test_incremental_branch_and_masking_mode_parse(incremental_branch: dict[str, str],
                                                    compiled: dict[str, str]) -> None:
    assert incremental_branch["fct_orders"] != compiled["models/fct_orders"]
    failures = {n: errs for n, sql in incremental_branch.items() if (errs := parse_errors(sql))}
    assert not failures, failures
    assert "as varchar(256))" in incremental_branch["dim_customers"]


def test_tokenize_widens_its_argument_before_the_call(compiled: dict[str, str]) -> None:
    """Redshift's bare varchar/text is varchar(256): a longer address would be cut, and two
    different values could share a token."""
    sql = compiled["models/dim_customers"]
    calls = re.findall(r"deid\.tokenize\((.*?)\)\s+as", sql)
    assert calls
    for call in calls:
        assert re.fullmatch(r"cast\([\w.]+ as varchar\(65535\)\), '[a-z]+(:[a-z_]+)?'", call), call


def test_card_last4_uses_redshift_regexp_replace(compiled: dict[str, str]) -> None:
    sql = compiled["models/fct_payments"]
    assert "regexp_replace(" in sql
    assert ", 'g')" not in sql  # Redshift's fourth argument is a position


def test_pii_guard_value_scan_parses_as_redshift(project: Path) -> None:
    """The guard's runtime scan, rendered for dim_customers, is Redshift SQL: no 'g' flag
    (a position there), no set-returning regex functions (Redshift has none)."""
    sql = inline(project, (
        "{{ deid.pii_value_scan_sql([api.Column('email_token', 'varchar'), "
        "api.Column('customer_since_year', 'integer')], "
        "deid.upstream_pii(graph.nodes['model.deid.dim_customers']), ref('dim_customers')) }}"),
        vars=SECOND_PASS)
    assert "raw_customers" in sql and "regexp_substr(" in sql
    assert ", 'g')" not in sql and "unnest(" not in sql and "regexp_split_to_table" not in sql
    assert not parse_errors(sql), parse_errors(sql)


def test_no_clear_value_or_secret_in_compiled_sql(project: Path, compiled: dict[str, str]) -> None:
    seeds = (ROOT / "seeds" / "raw" / "raw_customers.csv").read_text().splitlines()
    header = seeds[0].split(",")
    email_at = header.index("email")
    emails = [line.split(",")[email_at] for line in seeds[1:6]]
    text = "\n".join(compiled.values())
    for path in (project / "target").rglob("*"):
        if path.is_file() and path.suffix in (".sql", ".json"):
            text += path.read_text(errors="replace")
    assert not any(e and e in text for e in emails)
    assert "not-a-real-password" not in text


# -- the UDF DDL -----------------------------------------------------------------------------

# CREATE EXTERNAL FUNCTION's optional tail, from the Redshift reference (sqlfluff lacks it).
_BATCH_TAIL = re.compile(
    r"\s+max_batch_rows (?P<rows>[0-9]+)\s+max_batch_size (?P<size>[0-9]+) (?P<unit>kb|mb)$")
_CREATE_MASKING = re.compile(
    r"create masking policy (?P<name>[a-z_][a-z0-9_]*) if not exists\s+"
    r"with \((?P<arg>[a-z_]+) varchar\((?P<w1>[0-9]+)\)\)\s+using \((?P<expr>.+)\)$", re.S)
_ATTACH_MASKING = re.compile(
    r'attach masking policy (?P<name>[a-z_][a-z0-9_]*) on "[a-z_]+"\."[a-z_]+"\."[a-z_]+" '
    r'\("[a-z_0-9]+"\) to (?:role [a-z_][a-z0-9_$]*|[a-z_][a-z0-9_$]*) priority [0-9]+$')


def _external_functions(ddl: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for s in ddl:
        m = re.match(r"create or replace external function deid\.(\w+)\(", s)
        if m:
            tail = _BATCH_TAIL.search(s)
            assert tail, f"no MAX_BATCH_ROWS / MAX_BATCH_SIZE tail in {s!r}"
            size = int(tail["size"]) * (1024 if tail["unit"] == "kb" else 1024 * 1024)
            out[m[1]] = {"sql": s, "head": s[: tail.start()], "rows": int(tail["rows"]),
                         "size": size}
    return out


def test_every_ddl_statement_parses(ddl: list[str]) -> None:
    failures = {}
    for s in ddl:
        if s.startswith("create or replace external function"):
            tail = _BATCH_TAIL.search(s)
            assert tail, s
            head = s[: tail.start()]
            assert re.search(r"\sretry_timeout [0-9]+$", head), s
            errors = parse_errors(head)
        elif s.startswith("create masking policy"):
            m = _CREATE_MASKING.fullmatch(s)
            assert m, s
            errors = parse_errors(f"select {m['expr']} from t")
        elif s.startswith("attach masking policy"):
            assert _ATTACH_MASKING.fullmatch(s), s
            errors = []
        else:
            errors = parse_errors(s)
        if errors:
            failures[s[:70]] = errors
    assert not failures, failures


def test_functions_are_volatile_lambdas_on_the_stack_role(ddl: list[str]) -> None:
    functions = _external_functions(ddl)
    assert set(functions) == {"tokenize", "detokenize"}
    for name, f in functions.items():
        assert "\nvolatile\n" in f["sql"]
        assert f"\nlambda 'deid-{name}'\n" in f["sql"]
        assert f"\niam_role '{ROLE_ARN}'\n" in f["sql"]
        assert 1024 <= f["size"] <= 5 * 1024 * 1024  # documented MAX_BATCH_SIZE range
        assert 1 <= f["rows"] <= 2**31 - 1
    assert "deid.tokenize(varchar, varchar)\nreturns varchar(64)" in functions["tokenize"]["sql"]
    assert "deid.detokenize(varchar)\nreturns varchar(65535)" in functions["detokenize"]["sql"]


def test_grants_follow_the_vars_and_public_loses_execute(ddl: list[str]) -> None:
    def at(prefix: str) -> int:
        return next(i for i, s in enumerate(ddl) if s.startswith(prefix))

    create = max(at("create or replace external function deid.tokenize"),
                 at("create or replace external function deid.detokenize"))
    revokes = [i for i, s in enumerate(ddl) if s.startswith("revoke execute on function")]
    grants = [s for s in ddl if s.startswith("grant execute")]
    assert len(revokes) == 2 and all(i > create for i in revokes)
    assert all(s.endswith("from public") for s in (ddl[i] for i in revokes))
    assert sorted(grants) == sorted([
        "grant execute on function deid.detokenize(varchar) to auditor",
        "grant execute on function deid.detokenize(varchar) to role pii_reader",
        "grant execute on function deid.tokenize(varchar, varchar) to role dbt_transformer",
    ])
    assert not any(s.startswith("grant") and s.endswith(" public") for s in ddl)
    assert min(ddl.index(s) for s in grants) > max(revokes)


def test_mart_grants_go_to_analyst_roles_and_raw_is_not_granted(project: Path,
                                                                 ddl: list[str]) -> None:
    assert 'grant select on "analytics"."marts"."dim_customers" to ROLE analyst' in ddl
    manifest = json.loads((project / "target" / "manifest.json").read_text())
    for node in manifest["nodes"].values():
        grants = node["config"].get("grants") or {}
        if node["resource_type"] == "model" and node["fqn"][1] == "marts":
            assert grants.get("select") == ["role:analyst"], node["name"]
        if node["resource_type"] == "seed" or node.get("schema") == "raw":
            assert not grants, f"{node['name']} lands in raw and must not be granted"


def test_masking_policy_reveals_to_readers_only(ddl: list[str]) -> None:
    [create] = [s for s in ddl if s.startswith("create masking policy")]
    m = _CREATE_MASKING.fullmatch(create)
    assert m and m["expr"] == f"cast(deid.detokenize({m['arg']}) as varchar({m['w1']}))"
    attaches = [s for s in ddl if s.startswith("attach masking policy")]
    assert attaches and all(re.search(r" to (role pii_reader|auditor) priority 10$", s)
                            for s in attaches)
    assert not any("public" in s for s in attaches)  # everyone else sees the token


# -- batch sizing --------------------------------------------------------------------------

_SAMPLES = {"email": "a@b.co", "phone": "+14155550100", "ssn": "123-45-6789",
            "card": "4111111111111111", "name": "A", "address": "A", "date": "2000-01-01",
            "number": "12.5", "timestamp": "2024-01-02T03:04:05Z", "string": "A"}


def test_batch_limits_keep_every_response_under_lambdas_6_mb(ddl: list[str]) -> None:
    """Worst cases through the handler's own encoding: the longest token of any kind for
    tokenize; the longest value of any kind, all astral-plane characters (12 bytes each on
    the wire once escaped) for detokenize."""
    functions = _external_functions(ddl)
    longest_token = max(
        (kind.new_tokens(1, [kinds.normalize(kind, _SAMPLES[name])[0]])[0]
         for name, kind in kinds.KINDS.items()), key=len)
    worst_tokens = _dumps({"success": True, "num_records": functions["tokenize"]["rows"],
                           "results": [longest_token] * functions["tokenize"]["rows"]})
    assert _wire_size(worst_tokens) < LAMBDA_PAYLOAD_LIMIT

    longest_value = "\U0001f600" * max(k.max_length for k in kinds.KINDS.values())
    worst_values = _dumps({"success": True, "num_records": functions["detokenize"]["rows"],
                           "results": [longest_value] * functions["detokenize"]["rows"]})
    assert _wire_size(worst_values) < LAMBDA_PAYLOAD_LIMIT
    # and the requests Redshift builds stay within Lambda's limit too
    assert all(f["size"] <= LAMBDA_PAYLOAD_LIMIT - 512 * 1024 for f in functions.values())


def test_a_grantee_that_is_not_an_identifier_fails_at_compile_time(
        project: Path, ddl: list[str]) -> None:
    run = dbt(project, "compile", "--inline", "{{ deid.redshift_grantee('pii; drop table x') }}",
              vars=SECOND_PASS, check=False)
    assert run.returncode != 0 and "is not a Redshift grantee" in run.stdout


def test_deid_check_passes_every_model_compiled_for_redshift(
        project: Path, compiled: dict[str, str]) -> None:
    """Column lineage in sqlglot's redshift dialect: the marts' PII is tokenized or
    generalized (the varchar(65535) casts and Redshift's SQL parse)."""
    manifest = project / "manifest_all.json"
    assert [str(f) for f in check(manifest, project)] == []
