"""Erasure on PostgreSQL: the store contract (forget_contract.py) over the psycopg2 store, and
the SPI store behind the plpython3u UDFs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pg_cluster
from deid.stores import VaultStore
from deid.stores import postgres as postgres_store
from deid.vault import open_store
from forget_contract import *  # noqa: F403 - the store contract, collected here
from forget_contract import Opener

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One throwaway PostgreSQL cluster for the module; each test gets its own schema."""
    reason = pg_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    c = pg_cluster.start()
    try:
        pg_cluster.admin_sql(c, "create extension plpython3u;")
        yield c
    finally:
        pg_cluster.destroy(c)


def _pg_schema(cluster: Any) -> str:
    schema = f"forget_{uuid.uuid4().hex[:8]}"
    pg_cluster.admin_sql(cluster, postgres_store.vault_ddl(schema))
    return schema



@pytest.fixture
def open_vault(cluster: Any) -> Iterator[Opener]:
    """Opens independent psycopg2 stores over one fresh vault schema."""
    opened: list[VaultStore] = []
    url = cluster.url() + f"?schema={_pg_schema(cluster)}"

    def opener() -> VaultStore:
        store = open_store(url)
        opened.append(store)
        return store

    yield opener
    for s in opened:
        s.close()


# -- PostgreSQL inside the database: the SPI store behind the plpython3u UDFs ---------------


def test_postgres_udfs_refuse_an_erased_token_and_mint_a_new_one(cluster: Any) -> None:
    import cryptography
    import psycopg2

    schema = _pg_schema(cluster)
    paths = json.dumps([str(Path(__file__).parents[2] / "udfs"),
                        str(Path(cryptography.__file__).parents[1])])
    prelude = f"""import sys
for p in reversed({paths}):
    if p not in sys.path:
        sys.path.insert(0, p)
"""
    pg_cluster.admin_sql(cluster, f"""
create function {schema}.tok(value text) returns text language plpython3u volatile as $f$
{prelude}
from deid import plpython_host
return plpython_host.tokenize(plpy, value, 'email', vault_schema="{schema}")
$f$;
create function {schema}.detok(token text) returns text language plpython3u volatile as $f$
{prelude}
from deid import plpython_host
return plpython_host.detokenize(plpy, token, vault_schema="{schema}")
$f$;
create function {schema}.forget(value text) returns int language plpython3u volatile as $f$
{prelude}
from deid.service import VaultTokenService
from deid.stores.postgres import SpiStore
return VaultTokenService(SpiStore(plpy, "{schema}")).forget(
    "email", values=[value], principal="dpo")
$f$;
insert into {schema}.principals values ('{pg_cluster.ADMIN}', 'now', 'test');
""")
    admin = open_store(cluster.url() + f"?schema={schema}")
    try:
        admin.grant_tokenize(pg_cluster.ADMIN, "*", "tokenize", "test")
    finally:
        admin.close()
    conn = psycopg2.connect(cluster.dsn())
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute(f"select {schema}.tok('ivy@example.com')")
        old = cur.fetchone()[0]
        cur.execute(f"select {schema}.detok(%s)", (old,))
        assert cur.fetchone()[0] == "ivy@example.com"
        cur.execute(f"select {schema}.forget('IVY@example.com')")  # through SPI
        assert cur.fetchone()[0] == 1
        with pytest.raises(psycopg2.Error) as info:
            cur.execute(f"select {schema}.detok(%s)", (old,))
        assert info.value.pgcode == "22023"
        assert "erased" in str(info.value) and old not in str(info.value)
        cur.execute(f"select {schema}.tok('ivy@example.com')")
        new = cur.fetchone()[0]
        assert new != old
        cur.execute(f"select {schema}.detok(%s)", (new,))
        assert cur.fetchone()[0] == "ivy@example.com"
    finally:
        conn.close()
    store = open_store(cluster.url() + f"?schema={schema}")
    try:
        assert [e.token for e in store.erasures()] == [old]
        assert list(store.audit_records())[-2]["action"] == "forget"
    finally:
        store.close()


