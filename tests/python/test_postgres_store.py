"""The PostgreSQL vault: psycopg2 store out of the database, SPI store inside plpython3u,
both on one throwaway cluster, sharing one vault schema."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import pg_cluster
from deid import keys as _keys
from deid.errors import ConfigError, PermissionDeniedError, UnknownTokenError, VaultKeyError
from deid.service import VaultTokenService
from deid.stores import postgres as postgres_store
from deid.vault import open_store

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "vault_t"

pytestmark = pytest.mark.postgres


def _python_path() -> list[str]:
    import cryptography

    return [str(ROOT / "udfs"), str(Path(cryptography.__file__).parents[1])]


@pytest.fixture(scope="module")
def cluster():
    reason = pg_cluster.missing_reason()
    if reason:  # `make test` installs it where it can: a missing server is a failure here
        pytest.fail(reason)
    c = pg_cluster.start()
    try:
        paths = json.dumps(_python_path())
        pg_cluster.admin_sql(c, "create extension plpython3u;" + postgres_store.vault_ddl(SCHEMA))
        # The UDFs below run as the admin login (session_user): it mints tokens.
        pg_cluster.admin_sql(c, f"insert into {SCHEMA}.tokenize_grants values "
                                f"('{pg_cluster.ADMIN}', '*', 'tokenize', 'now', 'pytest')")
        for name, params, args, returns in (
                ("t_tokenize", "value text, kind text", "value, kind", "text"),
                ("t_tokenize_batch", "vals text[], kind text", "vals, kind", "text[]"),
                ("t_detokenize", "token text", "token", "text")):
            fn = name[2:]
            pg_cluster.admin_sql(c, f"""
create function {name}({params}) returns {returns} language plpython3u volatile
set plan_cache_mode = force_custom_plan as $f$
import sys
for p in reversed({paths}):
    if p not in sys.path:
        sys.path.insert(0, p)
from deid import plpython_host
return plpython_host.{fn}(plpy, {args}, vault_schema="{SCHEMA}")
$f$""")
        yield c
    finally:
        pg_cluster.destroy(c)


@pytest.fixture
def store(cluster):
    s = open_store(cluster.url() + f"?schema={SCHEMA}")
    yield s
    s.close()


def _sql(cluster, sql, args=None, *, conn=None):
    own = conn is None
    conn = conn or psycopg2.connect(cluster.dsn())
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            rows = cur.fetchall() if cur.description else []
        if own:
            conn.commit()
        return rows
    finally:
        if own:
            conn.close()


def test_url_options_are_ours_and_the_password_is_redacted(cluster):
    s = open_store(cluster.url() + "?schema=vault_t&connect_timeout=3")
    assert s.schema == "vault_t"
    assert pg_cluster.ADMIN_PASSWORD not in s.url and "***" in s.url
    assert s.is_allowed("nobody") is False  # connected: connect_timeout reached libpq
    s.close()
    with pytest.raises(ConfigError):
        open_store(cluster.url() + "?schema=Bad-Name")


def test_tokens_converge_across_stores_and_decrypt(cluster, store):
    a = VaultTokenService(store)
    other = open_store(cluster.url() + f"?schema={SCHEMA}")
    b = VaultTokenService(other, cache_size=0)
    t1 = a.tokenize("email", ["Ann@Example.com", None, "bob@example.com"])
    t2 = b.tokenize("email", ["ann@example.com", "bob@example.com"])
    assert t1[1] is None
    assert t1[0] == t2[0] and t1[2] == t2[1] and t1[0] != t1[2]
    store.grant("tester", "pytest")
    assert a.detokenize(t1, principal="tester") == ["ann@example.com", None, "bob@example.com"]
    other.close()


def test_insert_returns_the_winner_and_reports_a_colliding_token(store):
    ring = store.keyring()
    fp1, fp2 = ring.fingerprints("string", ["one", "two"])
    v, blob = ring.encrypt("str_aaaaaaaaaaaaaaaaaaaaaaa1", "one")
    rec = postgres_store.NewRecord("string", fp1, "str_aaaaaaaaaaaaaaaaaaaaaaa1", "string", v, blob)
    assert store.insert_tokens([rec]) == {fp1: rec.token}
    again = postgres_store.NewRecord("string", fp1, "str_bbbbbbbbbbbbbbbbbbbbbbb2", "string",
                                     v, blob)
    assert store.insert_tokens([again]) == {fp1: rec.token}  # first writer wins
    clash = postgres_store.NewRecord("string", fp2, rec.token, "string", v, blob)
    assert store.insert_tokens([clash]) == {}  # token taken by another value: retry


def test_keys_live_in_the_keyring_table_and_a_foreign_key_set_is_refused(cluster, store,
                                                                         monkeypatch):
    ring = store.keyring()
    stored = _sql(cluster, f"select keys from {SCHEMA}.keyring")
    assert len(stored) == 1
    assert _keys.FileKeyring.from_json(stored[0][0], "t").check_value() == ring.check_value()
    fresh = open_store(cluster.url() + f"?schema={SCHEMA}",
                       keys=_keys.FileKeyring.generate().to_json())
    with pytest.raises(VaultKeyError, match="does not belong"):
        fresh.keyring()
    fresh.close()


def test_rotation_keeps_tokens_and_rewrap_moves_values(store):
    svc = VaultTokenService(store, cache_size=0, detokenize_cache_size=0)
    token = svc.tokenize("name", ["Rotating Person"])[0]
    store.rotate_keyring(seen_current=store.keyring().current)
    svc2 = VaultTokenService(store, cache_size=0, detokenize_cache_size=0)
    assert svc2.tokenize("name", ["rotating person"])[0] == token
    current = store.keyring().current
    for batch in store.iter_values(batch_size=3):
        store.update_values([(t, v, postgres_store.StoredValue(
            *store.keyring().encrypt(t, store.keyring().decrypt(t, v.key_version, v.ciphertext))))
            for t, v in batch])
    assert set(store.stats()["key_versions"]) == {str(current)}
    store.grant("tester", "pytest")
    assert svc2.detokenize([token], principal="tester") == ["Rotating Person"]


def test_policy_and_audit_chain(store):
    svc = VaultTokenService(store)
    token = svc.tokenize("ssn", ["123-45-6789"])[0]
    assert store.grant("auditor", "pytest") is True
    assert store.grant("auditor", "pytest") is False
    assert "auditor" in [p["principal"] for p in store.principals()]
    svc.detokenize([token], principal="auditor", query_id="q1")
    assert store.revoke("auditor") is True and store.revoke("auditor") is False
    with pytest.raises(PermissionDeniedError):
        svc.detokenize([token], principal="auditor")
    records = list(store.audit_records())
    assert [r["outcome"] for r in records[-2:]] == ["allowed", "denied"]
    assert all("123-45-6789" not in json.dumps(r) for r in records)
    assert svc.verify_audit()["records"] == len(records)


def test_tokenize_policy_grants_replace_and_revoke(store):
    assert store.tokenize_mode("matcher", "email") is None
    assert store.grant_tokenize("matcher", "email", "lookup", "pytest") is True
    assert store.grant_tokenize("matcher", "email", "lookup", "pytest") is False
    assert store.tokenize_mode("matcher", "email") == "lookup"
    assert store.tokenize_mode("matcher", "phone") is None
    assert store.grant_tokenize("matcher", "*", "tokenize", "pytest") is True
    assert store.tokenize_mode("matcher", "phone") == "tokenize"  # rights add up
    assert store.revoke_tokenize("matcher", "*") is True
    assert store.revoke_tokenize("matcher", "*") is False
    assert [(g["principal"], g["domain"], g["mode"]) for g in store.tokenize_grants()
            if g["principal"] == "matcher"] == [("matcher", "email", "lookup")]


def test_concurrent_appends_keep_one_chain(cluster, store):
    svc = VaultTokenService(store)
    store.grant("writer", "pytest")
    token = svc.tokenize("phone", ["+1 415 555 0100"])[0]
    errors: list[BaseException] = []

    def work():
        s = open_store(cluster.url() + f"?schema={SCHEMA}")
        try:
            v = VaultTokenService(s, detokenize_cache_size=0)
            for _ in range(10):
                v.detokenize([token], principal="writer")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            s.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert svc.verify_audit()["records"] >= 40


# -- inside the database (SPI) -------------------------------------------------------------


def test_udf_null_in_null_out_and_same_token_as_outside(cluster, store):
    rows = _sql(cluster, "select t_tokenize(null, 'email'), t_tokenize('carol@example.com', "
                         "'email'), t_detokenize(null)")
    assert rows[0][0] is None and rows[0][2] is None
    outside = VaultTokenService(store).tokenize("email", ["CAROL@example.com"])[0]
    assert rows[0][1] == outside


def test_udf_failed_statement_rolls_back_its_vault_writes(cluster, store):
    with pytest.raises(psycopg2.Error) as info:
        _sql(cluster, "select t_tokenize(v, 'email') from (values ('dave@example.com'), "
                      "('not-an-email-secret')) as t (v)")
    text = str(info.value) + str(info.value.diag.message_detail or "")
    assert "not-an-email-secret" not in text
    assert "kind 'email'" in str(info.value)
    assert info.value.pgcode == "22023"
    svc = VaultTokenService(store, cache_size=0)
    ring = store.keyring()
    assert store.find_tokens("email", ring.fingerprints("email", ["dave@example.com"])) == {}
    assert svc.tokenize("email", ["dave@example.com"])[0]


def test_udf_cache_does_not_outlive_a_rolled_back_savepoint(cluster, store):
    conn = psycopg2.connect(cluster.dsn())
    try:
        cur = conn.cursor()
        cur.execute("savepoint s")
        cur.execute("select t_tokenize('erin@example.com', 'email')")
        first = cur.fetchone()[0]
        cur.execute("rollback to savepoint s")
        cur.execute("select t_tokenize('erin@example.com', 'email')")
        second = cur.fetchone()[0]
        conn.commit()
    finally:
        conn.close()
    store.grant("tester", "pytest")
    # Whatever token was handed out last has a vault record behind it.
    assert VaultTokenService(store).detokenize([second], principal="tester") == [
        "erin@example.com"]
    # The rolled-back token never existed: not served again from a cache, not in the vault.
    assert first != second
    with pytest.raises(UnknownTokenError):
        VaultTokenService(store).detokenize([first], principal="tester")


def _wait_for_lock_wait(cluster, timeout: float = 10.0) -> None:
    """Until some session waits on a lock (the other session reached its conflict)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _sql(cluster, "select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                )[0][0]:
            return
        time.sleep(0.05)
    raise AssertionError("no session ever waited on a lock")


def test_udf_concurrent_sessions_converge_on_one_token(cluster):
    a = psycopg2.connect(cluster.dsn())
    results: dict[str, str] = {}
    try:
        with a.cursor() as cur:
            cur.execute("select t_tokenize('frank@example.com', 'email')")
            results["a"] = cur.fetchone()[0]

        def other():
            b = psycopg2.connect(cluster.dsn())
            try:
                with b.cursor() as cur2:
                    cur2.execute("select t_tokenize('Frank@Example.com', 'email')")
                    results["b"] = cur2.fetchone()[0]
                b.commit()
            finally:
                b.close()

        t = threading.Thread(target=other)
        t.start()
        _wait_for_lock_wait(cluster)
        assert t.is_alive(), "the second session should wait for the first one's row"
        a.commit()
        t.join(10)
    finally:
        a.close()
    assert results["a"] == results["b"]


def test_udf_detokenize_checks_session_user_against_the_policy(cluster, store):
    token = _sql(cluster, "select t_tokenize('grace@example.com', 'email')")[0][0]
    store.revoke(pg_cluster.ADMIN)
    with pytest.raises(psycopg2.Error) as info:
        _sql(cluster, "select t_detokenize(%s)", (token,))
    assert info.value.pgcode == "42501"
    assert pg_cluster.ADMIN in str(info.value) and token not in str(info.value)
    store.grant(pg_cluster.ADMIN, "pytest")
    assert _sql(cluster, "select t_detokenize(%s)", (token,))[0][0] == "grace@example.com"
    last = list(store.audit_records())[-1]
    assert (last["principal"], last["outcome"], last["host"]) == (
        pg_cluster.ADMIN, "allowed", "postgresql")
    with pytest.raises(psycopg2.Error) as info:
        _sql(cluster, "select t_detokenize('not-a-token-secret')")
    assert "not-a-token-secret" not in str(info.value)


def test_udf_detokenize_audits_one_record_per_statement(cluster, store):
    """2,000 rows, one statement: one record counting 2,000, the chain intact. A second
    statement, and a statement rolled back to a savepoint, each keep their own truth."""
    tokens = [r[0] for r in _sql(cluster, "select t_tokenize('stmt' || i || '@example.com', "
                                          "'email') from generate_series(1, 20) as i")]
    store.grant(pg_cluster.ADMIN, "pytest")
    before = len(list(store.audit_records()))
    per_row = ("select count(t_detokenize(t)) from unnest(%s::text[]) as t, "
               "generate_series(1, 100)")
    conn = psycopg2.connect(cluster.dsn())
    try:
        with conn.cursor() as cur:
            cur.execute(per_row, (tokens,))
            assert cur.fetchone()[0] == 2000
            cur.execute("select t_detokenize(%s), t_detokenize(%s)", (tokens[0], tokens[1]))
            cur.execute("savepoint s")
            cur.execute(per_row, (tokens,))
            cur.execute("rollback to savepoint s")
            cur.execute("select t_detokenize(%s)", (tokens[2],))
        conn.commit()
    finally:
        conn.close()
    records = list(store.audit_records())[before:]
    assert [(r["count"], r["kinds"]) for r in records] == [
        (2000, {"email": 2000}), (2, {"email": 2}), (1, {"email": 1})]
    assert len({r["query_id"] for r in records}) == 3
    assert VaultTokenService(store).verify_audit()["records"] == before + 3


def test_udf_tokenize_batch_agrees_with_tokenize_row_by_row(cluster):
    """The batch function token_map uses gives each value the token the per-row function
    gives it, keeps the order and NULLs, and fails whole on one bad value."""
    vals = ["Batch.One@Example.com", None, "batch.two@example.com", "batch.one@example.com"]
    batch = _sql(cluster, "select t_tokenize_batch(%s::text[], 'email')", (vals,))[0][0]
    rows = [_sql(cluster, "select t_tokenize(%s, 'email')", (v,))[0][0] for v in vals]
    assert batch == rows and batch[1] is None and batch[0] == batch[3] != batch[2]
    with pytest.raises(psycopg2.Error) as info:
        _sql(cluster, "select t_tokenize_batch(array['ok.batch@example.com', 'secret-no-at'], "
                      "'email')")
    assert info.value.pgcode == "22023" and "secret-no-at" not in str(info.value)


def test_udf_statements_over_many_rows_give_one_token_per_value(cluster):
    """Thousands of rows in one statement (the per-row UDF and its per-scope cache): one
    token per distinct value, new values minted once, vaulted ones found again."""
    n = 5000
    conn = psycopg2.connect(cluster.dsn())
    try:
        conn.autocommit = True
        cur = conn.cursor()

        def tokens(expr: str) -> list[tuple[str, str]]:
            cur.execute(f"select v, t_tokenize(v, 'email') from (select {expr} as v "
                        f"from generate_series(1, {n}) as i) as s order by v")
            return cur.fetchall()

        repeated = tokens("'user' || (i % 500) || '@example.com'")
        assert len(repeated) == n and len({t for _, t in repeated}) == 500
        assert len({(v, t) for v, t in repeated}) == 500  # one value, one token
        fresh = tokens("'new' || i || '@example.com'")
        assert len({t for _, t in fresh}) == n
        assert tokens("'new' || i || '@example.com'") == fresh  # now vaulted: found again
    finally:
        conn.close()


def test_udf_sessions_minting_in_opposite_orders_do_not_deadlock(cluster):
    """Without the mint lock: A holds x and waits for y, B holds y and waits for x."""
    a = psycopg2.connect(cluster.dsn())
    results: dict[str, object] = {}
    try:
        with a.cursor() as cur:
            cur.execute("select t_tokenize('x-order@example.com', 'email')")
            results["a_x"] = cur.fetchone()[0]

        def other():
            b = psycopg2.connect(cluster.dsn())
            try:
                with b.cursor() as cur2:
                    cur2.execute("select t_tokenize('y-order@example.com', 'email'), "
                                 "t_tokenize('x-order@example.com', 'email')")
                    results["b"] = cur2.fetchone()
                b.commit()
            except psycopg2.Error as exc:
                results["b_error"] = exc.pgcode
            finally:
                b.close()

        t = threading.Thread(target=other)
        t.start()
        _wait_for_lock_wait(cluster)
        with a.cursor() as cur:
            cur.execute("select t_tokenize('y-order@example.com', 'email')")
            results["a_y"] = cur.fetchone()[0]
        a.commit()
        t.join(10)
    finally:
        a.close()
    assert "b_error" not in results, f"second session failed: SQLSTATE {results.get('b_error')}"
    assert results["b"] == (results["a_y"], results["a_x"])


def _vaulted(store, email: str) -> bool:
    ring = store.keyring()
    return bool(store.find_tokens("email", ring.fingerprints("email", [email])))


def test_udf_cache_does_not_outlive_a_rolled_back_exception_block(cluster, store):
    """Within one statement: a PL/pgSQL block that fails rolls back the token it minted."""
    conn = psycopg2.connect(cluster.dsn())
    try:
        cur = conn.cursor()
        cur.execute("create temp table handed_out (token text)")
        cur.execute("""
do $$
begin
    begin
        insert into handed_out select t_tokenize('heidi@example.com', 'email');
        raise exception 'model failed';
    exception when others then
        null;
    end;
    insert into handed_out select t_tokenize('heidi@example.com', 'email');
end
$$""")
        cur.execute("select token from handed_out")
        handed = [r[0] for r in cur.fetchall()]
        conn.commit()
    finally:
        conn.close()
    assert len(handed) == 1
    store.grant("tester", "pytest")
    assert VaultTokenService(store).detokenize(handed, principal="tester") == [
        "heidi@example.com"]


def test_udf_cache_does_not_outlive_a_rollback_inside_a_procedure(cluster, store):
    """A procedure's ROLLBACK ends a transaction within one CALL statement."""
    _sql(cluster, """
create or replace procedure t_proc() language plpgsql as $$
begin
    perform t_tokenize('ivan@example.com', 'email');
    rollback;
    create temp table if not exists proc_out (token text);
    insert into proc_out select t_tokenize('ivan@example.com', 'email');
    commit;
end
$$""")
    conn = psycopg2.connect(cluster.dsn())
    try:
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("call t_proc()")
        cur.execute("select token from proc_out")
        handed = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    assert _vaulted(store, "ivan@example.com")
    store.grant("tester", "pytest")
    assert VaultTokenService(store).detokenize(handed, principal="tester") == [
        "ivan@example.com"]


def test_udf_lookups_work_in_a_read_only_transaction_and_detokenize_fails_closed(cluster,
                                                                                 store):
    token = _sql(cluster, "select t_tokenize('judy@example.com', 'email')")[0][0]
    store.grant(pg_cluster.ADMIN, "pytest")
    conn = psycopg2.connect(cluster.dsn())
    try:
        conn.set_session(readonly=True)
        cur = conn.cursor()
        cur.execute("select t_tokenize('Judy@Example.com', 'email')")
        assert cur.fetchone()[0] == token
        conn.rollback()
        # The audit record cannot be written: no clear text without it.
        with pytest.raises(psycopg2.Error) as info:
            cur.execute("select t_detokenize(%s)", (token,))
        assert "read-only transaction" in str(info.value)
        assert "need the primary" in str(info.value)  # the fix, not only the failure
        assert "judy" not in str(info.value).lower()
    finally:
        conn.close()


def test_concurrent_rotations_make_one_version_and_old_writers_reload(cluster):
    """Two rotations that both saw version N make one N+1 (the keyring row is locked for
    update); a writer that loaded N before is refused N inside its insert and reloads."""
    url = cluster.url() + f"?schema={SCHEMA}"
    a, b = open_store(url), open_store(url)
    try:
        writer = VaultTokenService(a, cache_size=0)
        writer.tokenize("name", ["Before Rotation"])
        seen = a.keyring().current
        assert b.keyring().current == seen
        (ring_b, made_b), (ring_a, made_a) = (b.rotate_keyring(seen_current=seen),
                                              a.rotate_keyring(seen_current=seen))
        assert (made_b, made_a) == (True, False) and ring_a.keys == ring_b.keys
        assert ring_a.current == seen + 1
        stale = VaultTokenService(open_store(url), cache_size=0)
        stale.keyring = _keys.FileKeyring.from_json(
            _keys.FileKeyring(ring_a.fingerprint_key, ring_a.audit_key,
                          {v: k for v, k in ring_a.keys.items() if v <= seen}, seen,
                          "stale copy").to_json(), "stale copy")
        stale.tokenize("name", ["After Rotation"])
        assert stale.keyring.current == seen + 1
        assert a.key_version_counts().get(seen + 1, 0) >= 1
        with pytest.raises(VaultKeyError, match="rewrap first"):
            a.retire_key_version(seen)
    finally:
        a.close()
        b.close()
