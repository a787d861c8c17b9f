"""End to end on a real PostgreSQL with real roles: an admin installs the UDFs with dbt, a
transformer runs `dbt seed` + `dbt build`, and the warehouse's grants plus the vault's policy
decide who may detokenize. One throwaway cluster for the module (about 30 s in all)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

import pg_cluster
from deid import kinds as _kinds
from deid.lineage import check
from deid.stores import postgres as postgres_store
from deid.vault import open_store

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
ROLES = {  # login -> password (a throwaway cluster on 127.0.0.1)
    "transformer": "transformer-pw",
    "analyst": "analyst-pw",
    "pii_reader": "pii-reader-pw",
    "ex_reader": "ex-reader-pw",  # granted EXECUTE, but not in the vault's policy
}



def python_path() -> list[str]:
    """Where plpython3u finds deid and its dependency (rendered into the function bodies)."""
    import cryptography

    return [str(ROOT / "udfs"), str(Path(cryptography.__file__).parents[1])]


def dbt_vars(**extra: object) -> str:
    return json.dumps({
        **extra,
        "deid_python_path": python_path(),
        "deid_transformer_roles": ["transformer"],
        "deid_pii_reader_roles": ["pii_reader", "ex_reader"],
        "deid_analyst_roles": ["analyst", "pii_reader", "ex_reader"],
    })


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    reason = pg_cluster.missing_reason()
    if reason:  # `make test` installs it where it can: a missing server is a failure here
        pytest.fail(reason)
    work = tmp_path_factory.mktemp("pg_e2e")
    # the committed example's `postgres` target, as a user would copy it
    shutil.copy(ROOT / "profiles.yml.example", work / "profiles.yml")
    cluster = pg_cluster.start()
    try:
        setup_roles(cluster)
        yield {"cluster": cluster, "work": work}
    finally:
        pg_cluster.destroy(cluster)


def setup_roles(cluster: pg_cluster.Cluster) -> None:
    """What a DBA does once: logins, a schema for the marts, the right to create `raw`."""
    sql = [f"create role {r} login password '{pw}'" for r, pw in ROLES.items()]
    sql += [
        "grant create on database deid to transformer",
        "create schema analytics authorization transformer",
        "grant usage on schema analytics to analyst, pii_reader, ex_reader",
    ]
    pg_cluster.admin_sql(cluster, ";\n".join(sql))


@dataclass
class DbtRun:
    ok: bool
    output: str  # errors and failure messages, for assertions on refusals


def dbt(env, user: str, *args: str, check: bool = True,
        extra_vars: dict | None = None, project: Path = ROOT) -> DbtRun:
    """Run dbt in-process (dbtRunner): a dbt start-up costs 3-10 s, and this module needs 7."""
    from dbt.cli.main import dbtRunner

    cluster, work = env["cluster"], env["work"]
    password = pg_cluster.ADMIN_PASSWORD if user == pg_cluster.ADMIN else ROLES[user]
    saved = {k: os.environ.get(k) for k in (*cluster.env(), "DBT_SEND_ANONYMOUS_USAGE_STATS")}
    os.environ.update({**cluster.env(user, password), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"})
    errors: list[str] = []

    def collect(event) -> None:
        if event.info.level in ("error", "warn"):
            errors.append(event.info.msg)

    started = time.monotonic()
    try:
        res = dbtRunner(callbacks=[collect]).invoke([
            *args, "--project-dir", str(project), "--profiles-dir", str(work),
            "--target-path", str(work / "target"), "--log-path", str(work / "logs"),
            "--target", "postgres", "--vars", dbt_vars(**(extra_vars or {})), "--quiet"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    messages = [*errors, str(res.exception)] if res.exception else list(errors)
    for r in getattr(res.result, "results", None) or []:
        if getattr(r, "status", None) in ("error", "fail"):
            name = getattr(r, "unique_id", None) or r.node.unique_id
            messages.append(f"{name}: {r.message}")
    run = DbtRun(bool(res.success), "\n".join(messages))
    print(f"dbt {args[0]} as {user}: {time.monotonic() - started:.1f} s")
    if check and not run.ok:
        pytest.fail(f"dbt {' '.join(args)} as {user} failed:\n{run.output[-4000:]}")
    return run


def query(env, user: str, sql: str, args=None) -> list[tuple]:
    password = pg_cluster.ADMIN_PASSWORD if user == pg_cluster.ADMIN else ROLES[user]
    conn = psycopg2.connect(env["cluster"].dsn(user, password))
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            rows = cur.fetchall() if cur.description else []
        conn.commit()  # like psql's autocommit: the vault's audit records commit with the query
        return rows
    finally:
        conn.close()


def refused(env, user: str, sql: str) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as info:
        query(env, user, sql)
    return info.value


ACL_SQL = """
select 'function ' || p.oid::regprocedure::text, coalesce(p.proacl::text, '')
from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = 'deid'
union all
select 'schema ' || nspname, coalesce(nspacl::text, '') from pg_namespace
where nspname in ('deid', 'deid_vault', 'raw', 'analytics')
union all
select 'table ' || n.nspname || '.' || c.relname, coalesce(c.relacl::text, '')
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname in ('raw', 'analytics', 'deid_vault') and c.relkind = 'r'
order by 1
"""


@pytest.fixture(scope="module")
def built(env):
    """Install (twice: idempotent), set the vault policy, build (seeds, models, tests)."""
    dbt(env, pg_cluster.ADMIN, "run-operation", "postgres_install_udfs")
    acl_first = query(env, pg_cluster.ADMIN, ACL_SQL)
    # A grant made by hand to a role not in the vars is drift: the re-install removes it.
    pg_cluster.admin_sql(env["cluster"], "grant execute on function deid.detokenize(text) "
                                         "to analyst")
    assert query(env, pg_cluster.ADMIN, ACL_SQL) != acl_first
    dbt(env, pg_cluster.ADMIN, "run-operation", "postgres_install_udfs")
    assert query(env, pg_cluster.ADMIN, ACL_SQL) == acl_first, "re-install changed grants"
    store = open_store(env["cluster"].url() + "?schema=deid_vault")
    store.grant("pii_reader", "e2e test")
    store.grant("ex_reader", "e2e test")
    store.grant_tokenize("transformer", "*", "tokenize", "e2e test")
    store.revoke("ex_reader")  # removed from the vault policy; still holds EXECUTE
    store.close()
    dbt(env, "transformer", "seed")
    # build = models + their tests; the seeds were just loaded, reloading them costs ~10 s.
    dbt(env, "transformer", "build", "--exclude", "resource_type:seed")
    # The build's manifest holds the SQL it ran; later commands rewrite target/manifest.json.
    shutil.copy(env["work"] / "target" / "manifest.json", env["work"] / "manifest_built.json")
    return env


def test_deid_check_passes_the_sql_built_on_postgres(built):
    """Column lineage in sqlglot's postgres dialect over the SQL the marts were built with."""
    assert [str(f) for f in check(built["work"] / "manifest_built.json", ROOT)] == []


def test_transformer_builds_marts_with_tokens_only(built):
    rows = query(built, "transformer", "select email_token, ssn_token from analytics.dim_customers")
    assert rows
    assert all(_kinds.is_token(e, "email") and _kinds.is_token(s, "ssn") for e, s in rows
               if e is not None and s is not None)
    raw = {r[0] for r in query(built, "transformer", "select email from raw.raw_customers")}
    assert not raw & {e for e, _ in rows}


def test_transformer_cannot_read_the_vault_or_its_keys(built):
    err = refused(built, "transformer", "select keys from deid_vault.keyring")
    assert "permission denied for schema deid_vault" in str(err)
    err = refused(built, "transformer",
                  "select deid.detokenize(email_token) from analytics.dim_customers")
    assert "permission denied for function detokenize" in str(err)


def test_analyst_reads_marts_but_not_raw_nor_detokenize(built):
    assert query(built, "analyst", "select count(*) from analytics.dim_customers")[0][0] > 0
    assert query(built, "analyst", "select count(*) from analytics.fct_orders")[0][0] > 0
    err = refused(built, "analyst", "select * from raw.raw_customers")
    assert "permission denied" in str(err)
    err = refused(built, "analyst",
                  "select deid.detokenize(email_token) from analytics.dim_customers")
    assert "permission denied for function detokenize" in str(err)
    err = refused(built, "analyst", "select deid.tokenize('probe@example.com', 'email')")
    assert "permission denied for function tokenize" in str(err)
    assert "permission denied for schema deid_vault" in str(
        refused(built, "analyst", "select * from deid_vault.tokens"))


def test_pii_reader_gets_the_original_values(built):
    got = query(built, "pii_reader",
                "select deid.detokenize(customer_key), deid.detokenize(email_token), "
                "deid.detokenize(ssn_token) from analytics.dim_customers")
    raw = {str(cid): (email, ssn) for cid, email, ssn in query(
        built, pg_cluster.ADMIN, "select customer_id, email, ssn from raw.raw_customers")}
    assert len(got) == len(raw)
    for cid, email, ssn in got:
        raw_email, raw_ssn = raw[cid]
        expect_email = None if raw_email is None else _kinds.normalize(
            _kinds.parse_kind("email").kind, raw_email)[0]
        expect_ssn = None if raw_ssn is None else _kinds.normalize(
            _kinds.parse_kind("ssn").kind, raw_ssn)[0]
        assert (email, ssn) == (expect_email, expect_ssn)
    store = open_store(built["cluster"].url() + "?schema=deid_vault")
    try:
        last = list(store.audit_records())[-1]
    finally:
        store.close()
    assert (last["principal"], last["outcome"], last["host"]) == (
        "pii_reader", "allowed", "postgresql")


def test_execute_without_vault_policy_is_still_refused(built):
    err = refused(built, "ex_reader",
                  "select deid.detokenize(email_token) from analytics.dim_customers")
    assert err.pgcode == "42501"
    assert "not in the vault's detokenize policy" in str(err)
    assert "ex_reader" in str(err)


def test_rebuild_keeps_grants_and_tokens(built):
    tables = ["dim_customers", "fct_orders", "fct_prescriptions", "fct_payments"]
    before = {t: sorted(map(repr, query(built, pg_cluster.ADMIN,
                                          f"select * from analytics.{t}"))) for t in tables}
    acl = query(built, pg_cluster.ADMIN, ACL_SQL)
    dbt(built, "transformer", "build", "--exclude", "resource_type:seed", "resource_type:test")
    assert query(built, pg_cluster.ADMIN, ACL_SQL) == acl
    for t in tables:
        after = sorted(map(repr, query(built, pg_cluster.ADMIN, f"select * from analytics.{t}")))
        assert after == before[t], f"{t} changed on a rebuild"


def test_functions_are_security_definer_owned_by_the_vault_role_with_pinned_path(built):
    rows = query(built, pg_cluster.ADMIN, """
        select p.proname, pg_get_userbyid(p.proowner), p.prosecdef, p.provolatile,
               p.proconfig
        from pg_proc p where p.pronamespace = 'deid'::regnamespace order by 1""")
    assert [r[0] for r in rows] == ["detokenize", "tokenize", "tokenize_batch"]
    for _name, owner, secdef, volatile, config in rows:
        assert (owner, secdef, volatile) == ("deid_vault", True, "v")
        assert "search_path=pg_catalog, pg_temp" in config


def test_vault_ddl_in_dbt_matches_the_store(built):
    pg_cluster.admin_sql(built["cluster"], postgres_store.vault_ddl("ddl_check"))
    cols = """select table_name, column_name, data_type, is_nullable
              from information_schema.columns where table_schema = %s order by 1, 2"""
    assert query(built, pg_cluster.ADMIN, cols, ("deid_vault",)) == query(
        built, pg_cluster.ADMIN, cols, ("ddl_check",))
    # The erasure guards: the same triggers, running the same functions.
    triggers = """select t.tgname, t.tgtype, p.proname, replace(p.prosrc, %s, '')
                  from pg_trigger t join pg_proc p on p.oid = t.tgfoid
                  where t.tgrelid = (%s || '.tokens')::regclass and not t.tgisinternal
                  order by 1"""
    dbt_side = query(built, pg_cluster.ADMIN, triggers, ("deid_vault", "deid_vault"))
    assert [r[0] for r in dbt_side] == ["erase_guard", "never_reissue_erased"]
    assert dbt_side == query(built, pg_cluster.ADMIN, triggers, ("ddl_check", "ddl_check"))


def test_no_raw_value_in_compiled_sql_or_logs(built):
    emails = [r[0] for r in query(built, pg_cluster.ADMIN,
                                  "select email from raw.raw_customers where email is not null "
                                  "limit 20")]
    texts = [p.read_text(errors="replace") for d in ("target", "logs")
             for p in (built["work"] / d).rglob("*") if p.is_file()
             and p.suffix in (".sql", ".log", ".json") and "seeds" not in p.parts]
    assert texts
    leaked = [e for e in emails if any(e in t for t in texts)]
    assert not leaked, f"{len(leaked)} raw emails found in target/ or logs/"


def test_server_log_records_detokenize_without_values(built):
    # Its own read and refusal: tests run in random order.
    assert query(built, "pii_reader",
                 "select deid.detokenize(email_token) from analytics.dim_customers limit 5")
    refused(built, "ex_reader", "select deid.detokenize(email_token) from analytics.dim_customers")
    log = (built["cluster"].root / "server.log").read_text(errors="replace")
    assert "deid audit: detokenize by principal 'pii_reader'" in log
    assert "deid audit: detokenize denied by the vault policy for principal 'ex_reader'" in log
    emails = [r[0] for r in query(built, pg_cluster.ADMIN,
                                  "select email from raw.raw_customers where email is not null")]
    assert not [e for e in emails if e in log]


def test_hook_install_refuses_a_non_superuser_with_the_fix(built):
    proc = dbt(built, "transformer", "run-operation", "create_udfs", check=False,
               extra_vars={"deid_manage_udfs": True})
    assert not proc.ok
    assert "needs a PostgreSQL superuser" in proc.output


def test_vault_failure_fails_the_model_and_keeps_the_previous_mart(built):
    before = sorted(map(repr, query(built, pg_cluster.ADMIN,
                                    "select * from analytics.dim_customers")))
    pg_cluster.admin_sql(built["cluster"], "alter table deid_vault.tokens rename to tokens_away")
    try:
        proc = dbt(built, "transformer", "run", "--select", "dim_customers", check=False)
    finally:
        pg_cluster.admin_sql(built["cluster"],
                             "alter table deid_vault.tokens_away rename to tokens")
    out = proc.output
    assert not proc.ok
    assert "deid vault: statement 'find' on schema deid_vault failed" in out
    assert sorted(map(repr, query(built, pg_cluster.ADMIN,
                                  "select * from analytics.dim_customers"))) == before


# -- attacks on the trust boundary -----------------------------------------------------------


def _server_log(env) -> str:
    return (env["cluster"].root / "server.log").read_text(errors="replace")


def test_attack_a_guess_loop_in_a_rolled_back_transaction_leaves_a_trail(built):
    """Attack: as the transformer, confirm a guess against a mart token inside a transaction
    that rolls back: the vault's token and audit counts did not move and no log line said so."""
    (token,) = query(built, "transformer", "select email_token from analytics.dim_customers "
                     "where email_token is not null limit 1")[0]
    conn = psycopg2.connect(built["cluster"].dsn("transformer", ROLES["transformer"]))
    try:
        with conn.cursor() as cur:
            cur.execute("select pg_backend_pid()")
            (pid,) = cur.fetchone()
            cur.execute("select r.email from raw.raw_customers r "
                        "where deid.tokenize(r.email, 'email') = %s", (token,))
            assert cur.fetchall(), "the oracle answers the transformer (by design)"
            conn.rollback()
            # The session's next tokenizing statement logs the previous one's counts.
            cur.execute("select deid.tokenize('next.statement@example.com', 'email')")
        conn.rollback()
    finally:
        conn.close()
    log = _server_log(built)
    assert f"deid audit: tokenize by principal 'transformer' in statement {pid}@" in log, \
        "the guess loop left no trail"
    assert re.search(rf"tokenize by principal 'transformer' in statement {pid}@[^\n]*?: "
                     r"domain 'email', 0 new, [1-9]\d* existing", log)


def test_attack_a_security_definer_wrapper_does_not_hand_tokenize_to_an_analyst(built):
    """Attack: the transformer wraps deid.tokenize in a SECURITY DEFINER function and grants
    it to an analyst, who then mints and checks guesses."""
    query(built, "transformer", """
        create or replace function analytics.probe(guess text) returns text
        language sql security definer set search_path = pg_catalog
        as $$ select deid.tokenize(guess, 'email') $$;
        grant execute on function analytics.probe(text) to analyst""")
    admin = open_store(built["cluster"].url() + "?schema=deid_vault")
    try:
        before = admin.stats()["tokens"]
        err = refused(built, "analyst", "select analytics.probe('a.guess@example.com')")
        assert err.pgcode == "42501"
        assert "analyst" in str(err) and "a.guess" not in str(err)
        assert admin.stats()["tokens"] == before, "the guess was minted"
        assert "deid audit: tokenize refused by the vault policy for principal 'analyst'" in \
            _server_log(built)
    finally:
        admin.close()
        query(built, "transformer", "drop function analytics.probe(text)")


def test_attack_an_analyst_holding_locks_does_not_stop_the_vault(built):
    """Attack: advisory locks need no privilege and deid's keys were public strings; an
    analyst holding them stalled every detokenize and every new token."""
    conn = psycopg2.connect(built["cluster"].dsn("analyst", ROLES["analyst"]))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for key in ("deid audit deid_vault", "deid mint deid_vault",
                        "deid erase deid_vault"):
                cur.execute("select pg_advisory_lock(hashtext(%s))", (key,))
            for sql in ("lock table deid_vault.locks", "select * from deid_vault.locks for update"):
                cur.execute("begin")
                with pytest.raises(psycopg2.Error, match="permission denied"):
                    cur.execute(sql)
                cur.execute("rollback")
        # Served while the analyst holds whatever it could take (timeouts only bound a hang).
        rows = query(built, "pii_reader", "set statement_timeout = '20s'; "
                     "select deid.detokenize(email_token) from analytics.dim_customers "
                     "where email_token is not null limit 3")
        assert len(rows) == 3
        (token,) = query(built, "transformer", "set statement_timeout = '20s'; "
                         "select deid.tokenize('brand.new.value@example.com', 'email')")[0]
        assert _kinds.is_token(token, "email")
    finally:
        conn.close()


def test_an_erased_customer_refuses_detokenize_and_a_rebuild_mints_a_new_token(built):
    """deid forget against the dbt-built vault: the PII reader's detokenize says "erased",
    and the next build (SECURITY DEFINER UDF, erasure triggers) gives the email a new token."""
    from deid.service import VaultTokenService

    cid, old = query(built, pg_cluster.ADMIN, "select customer_key, email_token from "
                     "analytics.dim_customers where email_token is not null "
                     "order by customer_key limit 1")[0]
    store = open_store(built["cluster"].url() + "?schema=deid_vault")
    try:
        assert VaultTokenService(store).forget("email", tokens=[old], principal="dpo") == 1
    finally:
        store.close()
    err = refused(built, "pii_reader", "select deid.detokenize(email_token) from "
                  f"analytics.dim_customers where email_token = '{old}'")
    assert err.pgcode == "22023" and "erased" in str(err) and old not in str(err)
    dbt(built, "transformer", "run", "--select", "dim_customers")
    new, email, raw_id = query(
        built, "pii_reader", "select email_token, deid.detokenize(email_token), "
        f"deid.detokenize(customer_key) from analytics.dim_customers where customer_key = '{cid}'"
    )[0]
    raw_email = query(built, pg_cluster.ADMIN, "select email from raw.raw_customers "
                      f"where customer_id::text = '{raw_id}'")[0][0]
    assert new != old
    assert email == _kinds.normalize(_kinds.parse_kind("email").kind, raw_email)[0]


# PostgreSQL spellings of leak shapes (yml declares them tokenized: only the value scan sees)
PG_LEAKS = {
    "leak_name_angle_email": "full_name || ' <' || email || '>'",
    "leak_jsonb": "jsonb_build_object('e', email, 's', ssn)",
    "leak_array": "array[upper(full_name)]",
    "leak_row": "row(phone, 1)::text",
    "leak_dob": "date_of_birth",
    "leak_ssn_integer": "replace(ssn, '-', '')::bigint",
}


def test_value_scan_fails_leaks_on_postgres(built, tmp_path):
    from dbt_project_copy import copy_project
    from test_dbt_duckdb_e2e import raw_values

    project = copy_project(tmp_path / "leaks").path
    folder = project / "models" / "marts" / "scan"
    folder.mkdir()
    lie = "config: {meta: {deid: {tokenized: string}}}"
    yml = ["version: 2", "models:"]
    for name, expr in {**PG_LEAKS, "ok_tokens": "deid.tokenize(email, 'email')"}.items():
        (folder / f"{name}.sql").write_text(
            f"select {expr} as contact from {{{{ source('pharmacy', 'customers') }}}}\n")
        yml += [f"  - name: {name}", "    columns:", f"      - {{name: contact, {lie}}}"]
    (folder / "_scan__models.yml").write_text("\n".join(yml) + "\n")
    run = dbt(built, "transformer", "run", "--select", "path:models/marts/scan", check=False,
              project=project)
    assert not run.ok
    for name in PG_LEAKS:
        assert f"model {name} exposes raw PII values: contact holds" in run.output, name
    assert "ok_tokens" not in run.output
    assert query(built, "transformer", "select count(*) from analytics.ok_tokens") == [(2000,)]
    assert not [v for v in raw_values() if len(v) >= 6 and v in run.output]
