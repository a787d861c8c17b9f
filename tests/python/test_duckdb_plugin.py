"""The DuckDB host: vectorized UDFs, NULL handling, errors, principal, plugin config."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import duckdb
import pytest

from deid import duckdb_plugin
from deid.duckdb_plugin import Plugin, register
from deid.service import VaultTokenService
from deid.stores.sqlite import SQLiteStore
from deid.vault import open_store


@pytest.fixture
def con(service: VaultTokenService, tmp_path: Path) -> duckdb.DuckDBPyConnection:
    service.store.grant_tokenize("dbt_transformer", "*", "tokenize", "test")
    c = duckdb.connect(str(tmp_path / "w.duckdb"))
    register(c, service, "dbt_transformer")
    return c


def test_tokenize_many_vectors_with_nulls_and_repeats(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.sql("""
        select i, deid.tokenize(case when i % 7 = 0 then null
                                     else 'user' || (i % 1000) || '@example.com' end, 'email') t
        from range(10000) r(i) order by i""").fetchall()
    assert len(rows) == 10000  # > 2048: several vectors
    assert all((t is None) == (i % 7 == 0) for i, t in rows)
    by_value: dict[int, set[str]] = {}
    for i, t in rows:
        if t is not None:
            by_value.setdefault(i % 1000, set()).add(t)
    assert all(len(ts) == 1 for ts in by_value.values())
    assert len({next(iter(ts)) for ts in by_value.values()}) == 1000


def test_kind_per_row_from_a_column(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.sql("""select deid.tokenize(v, k) from (values ('a@example.com', 'email'),
                      ('212-555-0100', 'phone'), (null, null)) t(v, k)""").fetchall()
    assert rows[0][0].endswith("@deid.invalid") and rows[1][0].startswith("+999")
    assert rows[2][0] is None


def test_tokens_join_across_queries(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("create table a as select deid.tokenize('x@example.com', 'email') t")
    con.execute("create table b as select deid.tokenize(' X@EXAMPLE.COM', 'email') t")
    assert con.sql("select count(*) from a join b using (t)").fetchall() == [(1,)]


def test_bad_value_fails_the_query_without_the_value(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(duckdb.Error) as exc:
        con.sql("select deid.tokenize(v, 'ssn') from (values ('901-23-4567'), "
                "('SECRET-9999')) t(v)").fetchall()
    assert "not an SSN" in str(exc.value) and "SECRET-9999" not in str(exc.value)


def test_create_table_with_a_bad_row_leaves_no_table(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(duckdb.Error):
        con.execute("create table m as select deid.tokenize(v, 'email') e "
                    "from (values ('a@example.com'), ('broken')) t(v)")
    assert not con.sql("select * from duckdb_tables() where table_name = 'm'").fetchall()


def test_detokenize_follows_the_principal(service: VaultTokenService, tmp_path: Path) -> None:
    token = service.tokenize("email", ["a@example.com"])[0]
    analyst = duckdb.connect()
    register(analyst, service, "analyst")
    with pytest.raises(duckdb.Error, match="permission denied: principal 'analyst'"):
        analyst.sql(f"select deid.detokenize('{token}')").fetchall()
    service.store.grant("reader", "test")
    reader = duckdb.connect()
    register(reader, service, "reader")
    assert reader.sql(f"select deid.detokenize('{token}'), deid.detokenize(null)").fetchall() \
        == [("a@example.com", None)]
    outcomes = [r["outcome"] for r in service.store.audit_records()
                if r["action"] == "detokenize"]
    assert outcomes == ["denied", "allowed"]


def test_detokenize_through_arrow_keeps_nulls_repeats_and_row_numbers(
        service: VaultTokenService) -> None:
    """The host hands each distinct token to the vault once and maps the answers back in
    Arrow: NULL stays NULL, repeats get their value, the audit counts rows, and a bad token
    fails the query naming its row within the vector, never the token."""
    a, b = service.tokenize("email", ["a@example.com", "b@example.com"])
    service.store.grant("reader", "test")
    reader = duckdb.connect(config={"threads": 1})
    register(reader, service, "reader")
    rows = [a, None, b, a, a, None, b]
    reader.execute("create table m as select * from (select unnest(?) t, "
                   "generate_subscripts(?, 1) i) order by i", [rows, rows])
    assert [r[0] for r in reader.sql("select deid.detokenize(t) from m order by i").fetchall()] \
        == [None if t is None else ("a@example.com" if t == a else "b@example.com")
            for t in rows]
    (record,) = [r for r in service.store.audit_records() if r["action"] == "detokenize"]
    assert record["count"] == 5 and record["kinds"] == {"email": 5}
    for bad, row, what in (("q" * 24 + "@deid.invalid", 4, "never issued"),
                           ("hello", 4, "not a deid token"), (b, 3, "erased")):
        if bad == b:
            reader.execute("update m set t = ? where i = 4", [a])
            service.forget("email", values=["b@example.com"], principal="admin")
        else:
            reader.execute("update m set t = ? where i = 4", [bad])
        with pytest.raises(duckdb.Error, match=f"row {row} of the batch .*{what}") as exc:
            reader.sql("select deid.detokenize(t) from m order by i").fetchall()
        assert bad not in str(exc.value)


def test_tokenize_follows_the_profile_principal(service: VaultTokenService) -> None:
    """Deny by default; a look-up-only principal gets existing tokens and fails (audited) on
    a value the vault has never seen, so it cannot mint its guesses."""
    service.store.grant_tokenize("dbt_transformer", "*", "tokenize", "test")
    minter, analyst, looker = duckdb.connect(), duckdb.connect(), duckdb.connect()
    register(minter, service, "dbt_transformer")
    register(analyst, service, "analyst")
    register(looker, service, "matcher")
    [(token,)] = minter.sql("select deid.tokenize('known@example.com', 'email')").fetchall()
    with pytest.raises(duckdb.Error, match="principal 'analyst' is not in the vault's tokenize"):
        analyst.sql("select deid.tokenize('known@example.com', 'email')").fetchall()
    service.store.grant_tokenize("matcher", "email", "lookup", "test")
    assert looker.sql("select deid.tokenize('KNOWN@example.com', 'email')").fetchall() == [
        (token,)]
    before = service.store.stats()["tokens"]
    with pytest.raises(duckdb.Error, match="may only look up") as exc:
        looker.sql("select deid.tokenize(v, 'email') from (values ('known@example.com'), "
                   "('guess@example.com')) t(v)").fetchall()
    assert "guess@" not in str(exc.value)
    assert service.store.stats()["tokens"] == before, "a look-up never mints"
    with pytest.raises(duckdb.Error, match="'matcher' is not in the vault's tokenize policy"):
        looker.sql("select deid.tokenize('x', 'string')").fetchall()  # other domain


def test_each_cursor_sees_the_udfs(con: duckdb.DuckDBPyConnection) -> None:
    cur = con.cursor()
    assert cur.sql("select deid.tokenize('1990-01-02', 'date')").fetchall()[0][0].startswith(
        "date_")


def test_plugin_reads_vault_and_principal_from_config(tmp_path: Path) -> None:
    url = "sqlite:////" + str(tmp_path / "pv" / "vault.db").lstrip("/")
    SQLiteStore(tmp_path / "pv" / "vault.db", create=True).grant_tokenize("dbt_transformer", "*",
                                                             "tokenize", "test")
    plugin = Plugin.__new__(Plugin)
    plugin.initialize({"vault": url, "principal": "dbt_transformer", "cache_size": 10})
    assert plugin.config.cache_size == 10 and plugin.principal == "dbt_transformer"
    c = duckdb.connect()
    plugin.configure_connection(c)
    assert c.sql("select deid.tokenize('a', 'string')").fetchall()[0][0].startswith("str_")
    assert (tmp_path / "pv" / "vault.db").exists()


class _LeakyService:
    """A service whose library fails with the value in its message (as a UnicodeError or a
    driver's constraint message can)."""

    def tokenize(self, kind: str, values: list[str | None], **_: object) -> list[str | None]:
        raise RuntimeError(f"could not store {values[0]!r}")

    def detokenize(self, tokens: list[str | None], **_: object) -> list[str | None]:
        raise RuntimeError(f"could not read {tokens[0]!r}")

    def flush_audit(self) -> None:
        pass


def test_a_library_error_reaches_duckdb_without_the_value(tmp_path: Path) -> None:
    c = duckdb.connect(str(tmp_path / "w.duckdb"))
    register(c, _LeakyService(), "analyst")
    for sql in ("select deid.tokenize('leaky.secret@example.com', 'email')",
                "select deid.detokenize('leaky.secret@example.com')"):
        with pytest.raises(duckdb.Error) as exc:
            c.sql(sql).fetchall()
        assert "leaky.secret" not in str(exc.value)
        assert "internal error (RuntimeError)" in str(exc.value)


def test_detokenize_audits_every_vector_and_syncs_each_querys_first_record(
        service: VaultTokenService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every vector leaves a record under its query's id; the first record of each query on
    a vault connection is committed with an fsync (synchronous FULL), later ones of the same
    query without, and the connection is left in FULL."""
    tokens = service.tokenize("email", [f"v{i}@example.com" for i in range(50)])
    service.store.grant("reader", "test")
    reader = duckdb.connect(config={"threads": 1})  # one call at a time: inserts in log order
    register(reader, service, "reader")
    reader.execute("create table m as select t from (select unnest(?) t) cross join range(100)",
                   [tokens])
    before = len(list(service.store.audit_records()))
    inserts: list[tuple[int, str]] = []  # (connection, synchronous mode) at each audit insert
    final: dict[int, str] = {}  # connection -> the synchronous mode it was left in
    connect = service.store._db  # type: ignore[attr-defined]

    def traced() -> sqlite3.Connection:
        db = connect()
        key = id(db)
        if key not in final:
            final[key] = "full"

            def trace(sql: str) -> None:
                if sql.startswith("pragma main.synchronous="):
                    final[key] = sql.split("=")[1]
                elif sql.startswith("insert into audit"):
                    inserts.append((key, final[key]))

            db.set_trace_callback(trace)
        return db

    monkeypatch.setattr(service.store, "_db", traced)
    for _ in range(2):
        assert reader.sql("select count(deid.detokenize(t)) from m").fetchall() == [(5000,)]
    records = list(service.store.audit_records())[before:]
    assert sum(r["count"] for r in records) == 10000 and len(records) >= 4
    assert len({r["query_id"] for r in records}) == 2
    assert len(inserts) == len(records)
    firsts = {}
    for i, ((db, _mode), r) in enumerate(zip(inserts, records, strict=True)):
        firsts.setdefault((db, r["query_id"]), i)
    assert [m for _db, m in inserts] == ["full" if i in firsts.values() else "normal"
                                         for i in range(len(inserts))]
    assert len(firsts) < len(records)  # later vectors of a query were not synced
    assert set(final.values()) == {"full"}


def test_duckdb_worker_threads_keep_their_vault_connections(
        service: VaultTokenService, monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB runs a UDF on threads Python did not start, whose thread-local state lasts one
    call: the vault's connection per thread must not be reopened for every vector."""
    tokens = service.tokenize("email", [f"v{i}@example.com" for i in range(50)])
    service.store.grant("reader", "test")
    reader = duckdb.connect(config={"threads": 4})
    register(reader, service, "reader")
    reader.execute("create table m as select t from (select unnest(?) t) "
                   "cross join range(2000)", [tokens])  # 100,000 rows: ~50 vectors
    opened = []
    connect = sqlite3.connect

    def counting(*args: object, **kwargs: object) -> sqlite3.Connection:
        opened.append(1)
        return connect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite3, "connect", counting)
    for _ in range(2):
        assert reader.sql("select count(deid.detokenize(t)) from m").fetchall() == [(100000,)]
    assert len(opened) == 1  # the one thread the calls of a SQLite vault run on


def test_a_forked_child_runs_the_udfs_on_threads_of_its_own(
        service: VaultTokenService) -> None:
    """The pool's threads do not survive fork: a child that inherited it would wait forever
    for its first UDF call."""
    service.store.grant("reader", "test")
    token = service.tokenize("email", ["a@example.com"])[0]
    reader = duckdb.connect()
    register(reader, service, "reader")
    query = f"select deid.detokenize('{token}')"
    assert reader.sql(query).fetchall() == [("a@example.com",)]  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = False
        try:
            child = duckdb.connect()
            register(child, service, "reader")
            ok = child.sql(query).fetchall() == [("a@example.com",)]
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's UDF call never ran")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_udf_threads_follow_the_vault() -> None:
    cores = os.cpu_count() or 2
    assert duckdb_plugin.udf_threads("sqlite:///v.db") == min(2, cores)
    assert duckdb_plugin.udf_threads("sqlite:///v.db", "detokenize") == 1
    assert duckdb_plugin.udf_threads("postgresql://h/db") == cores
    assert duckdb_plugin.udf_threads("postgresql://h/db", "detokenize") == cores


def test_tokenize_on_two_threads_gives_each_value_one_token(
        service: VaultTokenService, tmp_path: Path) -> None:
    """Two pool threads tokenize vectors that share new values at the same time: each value
    must still get one token, the one the vault holds."""
    import threading

    service.store.grant_tokenize("p", "*", "tokenize", "test")
    seen: set[str] = set()
    tokenize = service.tokenize

    def slow(*args: object, **kwargs: object) -> list[str | None]:
        seen.add(threading.current_thread().name)
        time.sleep(0.005)  # calls overlap
        return tokenize(*args, **kwargs)  # type: ignore[arg-type]

    service.tokenize = slow  # type: ignore[method-assign]
    c = duckdb.connect(str(tmp_path / "w.duckdb"), config={"threads": 4})
    register(c, service, "p", threads=2, detokenize_threads=1)
    # Row groups of 122,880 rows: DuckDB's threads scan several at once.
    c.execute("create table raw as select i % 3000 v, 'u' || (i % 3000) || '@example.com' e "
              "from range(500000) r(i)")
    rows = c.sql("select distinct v, t from (select v, deid.tokenize(e, 'email') t from raw)"
                 ).fetchall()
    by_value: dict[int, set[str]] = {}
    for v, t in rows:
        by_value.setdefault(v, set()).add(t)
    assert len(by_value) == 3000 and all(len(ts) == 1 for ts in by_value.values())
    service.tokenize = tokenize  # type: ignore[method-assign]
    fresh = VaultTokenService(SQLiteStore(service.store.path), cache_size=0)  # type: ignore[attr-defined]
    values = [f"u{v}@example.com" for v in range(3000)]
    assert fresh.tokenize("email", values) == [by_value[v].pop() for v in range(3000)]
    assert len({name for name in seen if name.startswith("deid-udf")}) == 2


def _plugin(config: dict[str, object]) -> duckdb.DuckDBPyConnection:
    plugin = Plugin.__new__(Plugin)
    plugin.initialize(config)
    c = duckdb.connect()
    plugin.configure_connection(c)
    return c


def test_a_missing_vault_fails_the_query_with_its_path_and_creates_nothing(
        tmp_path: Path) -> None:
    """The attack: a vault URL that points at nothing used to start a second, empty vault (new
    keys, new tokens) and exit 0."""
    missing = tmp_path / "elsewhere" / ".deid" / "vault.db"
    c = _plugin({"vault": f"sqlite:///{missing}", "principal": "builder"})
    with pytest.raises(duckdb.Error) as exc:
        c.sql("select deid.tokenize('a@example.com', 'email')").fetchall()
    assert f"no vault at {missing}" in str(exc.value) and "deid init" in str(exc.value)
    assert not (tmp_path / "elsewhere").exists()


def test_a_relative_vault_path_is_relative_to_the_dbt_project(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, other = tmp_path / "project", tmp_path / "other"
    other.mkdir()
    SQLiteStore(project / ".deid" / "vault.db", create=True).grant_tokenize(
        "builder", "*", "tokenize", "test")
    monkeypatch.chdir(other)  # dbt started from another directory (--project-dir)
    monkeypatch.setattr(duckdb_plugin, "get_flags", lambda: None)  # no dbt run in this process
    monkeypatch.setenv("DBT_PROJECT_DIR", str(project))
    c = _plugin({"vault": "sqlite:///.deid/vault.db", "principal": "builder"})
    token = c.sql("select deid.tokenize('a@example.com', 'email')").fetchall()[0][0]
    again = open_store(f"sqlite:///{project / '.deid' / 'vault.db'}")
    assert VaultTokenService(again).tokenize("email", ["a@example.com"]) == [token]
    assert list(other.iterdir()) == []


def test_a_relative_vault_path_without_a_project_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(duckdb_plugin, "get_flags", lambda: None)  # no dbt run in this process
    monkeypatch.delenv("DBT_PROJECT_DIR", raising=False)
    c = _plugin({"vault": "sqlite:///.deid/vault.db", "principal": "builder"})
    with pytest.raises(duckdb.Error, match="relative and no dbt project directory"):
        c.sql("select deid.tokenize('a@example.com', 'email')").fetchall()
    assert list(tmp_path.iterdir()) == []
