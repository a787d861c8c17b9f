"""Erasure (crypto-shredding) on every deid store: SQLite, PostgreSQL (psycopg2 and the
in-database SPI store), DynamoDB + KMS (moto server), and Skyflow (the local fake with its
bulk-delete endpoint), plus the ``deid forget`` and ``deid erased`` commands.

One contract, run against each store: `forget` destroys the value and its fingerprint entry,
detokenize then fails with ErasedTokenError (not "unknown"), the value's next token is new,
an erased token is never issued again, other processes' caches stop serving it, and the
erasure is audited without the value or the token.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pg_cluster
from deid import kinds
from deid.errors import DeidError, ErasedTokenError, UnknownTokenError
from deid.service import VaultTokenService
from deid.stores import VaultStore
from deid.stores import postgres as postgres_store
from deid.stores.sqlite import SQLiteStore
from deid.vault import open_store
from test_dynamodb_store import endpoint  # noqa: F401 - the moto server fixture, by name

BACKENDS = ["sqlite", "postgres", "dynamodb"]

Opener = Callable[[], VaultStore]


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


def _dynamodb_url(moto: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import boto3

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    table = f"deid-forget-{uuid.uuid4().hex[:8]}"
    ddb = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=moto)
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
    kms = boto3.client("kms", region_name="us-east-1", endpoint_url=moto)
    key = kms.create_key(Description="deid forget test")["KeyMetadata"]["Arn"]
    return f"dynamodb://{table}?region=us-east-1&kms_key={key}&endpoint_url={moto}"


def _pg_schema(cluster: Any) -> str:
    schema = f"forget_{uuid.uuid4().hex[:8]}"
    pg_cluster.admin_sql(cluster, postgres_store.vault_ddl(schema))
    return schema


@pytest.fixture(params=BACKENDS)
def open_vault(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Opener]:
    """Opens independent stores over one fresh vault (as separate processes would)."""
    opened: list[VaultStore] = []
    if request.param == "sqlite":
        path = tmp_path / "vault.db"

        def make() -> VaultStore:
            return SQLiteStore(path)
    elif request.param == "postgres":
        c = request.getfixturevalue("cluster")
        url = c.url() + f"?schema={_pg_schema(c)}"

        def make() -> VaultStore:
            return open_store(url)
    else:
        url = _dynamodb_url(request.getfixturevalue("endpoint"), monkeypatch)

        def make() -> VaultStore:
            return open_store(url)

    def opener() -> VaultStore:
        store = make()
        opened.append(store)
        return store

    yield opener
    for s in opened:
        s.close()


def svc(open_vault: Opener, **kw: float) -> VaultTokenService:
    return VaultTokenService(open_vault(), **kw)  # type: ignore[arg-type]


def test_forget_by_value_destroys_the_record_and_detokenize_says_erased(
        open_vault: Opener) -> None:
    s = svc(open_vault)
    s.store.grant("reader", "test")
    ana, bo = s.tokenize("email", ["ana@example.com", "bo@example.com"])
    assert s.detokenize([ana], principal="reader") == ["ana@example.com"]  # now cached
    # Any spelling tokenize would match finds the record.
    assert s.forget("email", values=["ANA@Example.com"], principal="dpo") == 1
    with pytest.raises(ErasedTokenError) as info:
        s.detokenize([bo, ana], principal="reader")
    assert isinstance(info.value, UnknownTokenError)  # callers that fail closed still do
    assert "row 2" in str(info.value) and "erased" in str(info.value)
    assert ana not in str(info.value) and "ana@" not in str(info.value)
    assert s.detokenize([bo], principal="reader") == ["bo@example.com"]
    # A token this vault never issued is still "unknown", not "erased".
    forged = kinds.KINDS["email"].new_tokens(1, ["x@example.com"])[0]
    with pytest.raises(UnknownTokenError) as unknown:
        s.detokenize([forged], principal="reader")
    assert not isinstance(unknown.value, ErasedTokenError)
    ring = s.store.keyring()
    assert s.store.find_tokens("email", [ring.fingerprint("email", "ana@example.com")]) == {}
    assert s.store.fetch_values([ana]) == {}


def test_the_value_tokenized_again_gets_a_new_token(open_vault: Opener) -> None:
    s = svc(open_vault)
    s.store.grant("reader", "test")
    old = s.tokenize("email", ["cy@example.com"])[0]
    s.forget("email", values=["cy@example.com"], principal="dpo")
    new = svc(open_vault).tokenize("email", ["cy@example.com"])[0]
    assert new != old and kinds.is_token(new, "email")
    assert s.tokenize("email", ["cy@example.com"]) == [new]  # converges again
    assert s.detokenize([new], principal="reader") == ["cy@example.com"]
    with pytest.raises(ErasedTokenError):
        s.detokenize([old], principal="reader")


def test_forget_by_token_stays_in_the_kind_domain(open_vault: Opener) -> None:
    s = svc(open_vault)
    shared, = s.tokenize("email", ["di@example.com"])
    private, = s.tokenize("email:marketing", ["di@example.com"])
    assert s.forget("email", tokens=[private], principal="dpo") == 0  # other domain: kept
    assert s.forget("email:marketing", tokens=[private, private, "junk"], principal="dpo") == 1
    assert s.forget("email:marketing", tokens=[private], principal="dpo") == 0  # already gone
    assert s.forget("email", values=["nobody@example.com"], principal="dpo") == 0
    s.store.grant("reader", "test")
    assert s.detokenize([shared], principal="reader") == ["di@example.com"]
    assert [e.token for e in s.store.erasures()] == [private]
    e = s.store.erased([private, shared])
    assert list(e) == [private] and (e[private].domain, e[private].kind) == ("marketing", "email")


def test_forget_is_audited_without_the_value_or_the_token(open_vault: Opener) -> None:
    s = svc(open_vault)
    tok, = s.tokenize("ssn", ["123-45-6789"])
    s.forget("ssn", values=["123456789"], principal="dpo@corp")
    rec = list(s.store.audit_records())[-1]
    assert (rec["action"], rec["principal"], rec["outcome"], rec["count"]) == (
        "forget", "dpo@corp", "erased", 1)
    assert rec["kinds"] == {"ssn:ssn": 1}  # kind:domain
    assert rec["at"]
    text = json.dumps(list(s.store.audit_records()))
    assert tok not in text and "6789" not in text
    assert s.verify_audit()["records"] == 1


def test_forget_needs_values_or_tokens_and_rejects_a_malformed_value(
        open_vault: Opener) -> None:
    s = svc(open_vault)
    with pytest.raises(DeidError, match="exactly one"):
        s.forget("email", principal="dpo")
    with pytest.raises(DeidError, match="exactly one"):
        s.forget("email", values=["a@b.co"], tokens=["x"], principal="dpo")
    with pytest.raises(DeidError) as info:
        s.forget("email", values=["a@b.co", "not-an-email-secret"], principal="dpo")
    assert "row 2" in str(info.value) and "secret" not in str(info.value)


def test_an_erased_token_is_never_issued_again(open_vault: Opener,
                                               monkeypatch: pytest.MonkeyPatch,
                                               request: pytest.FixtureRequest) -> None:
    """Attack: random tokens of one format can collide. If an erased token could be minted
    again for another value, every old mart row holding it would detokenize to a different
    person. The vault must treat the tombstone as taken."""
    s = svc(open_vault, cache_size=0)
    old, = s.tokenize("email", ["eve@example.com"])
    s.forget("email", tokens=[old], principal="dpo")
    email = kinds.KINDS["email"]
    proposals = iter([[old]])

    def collide_once(n: int, canonicals: list[str]) -> list[str]:
        return next(proposals, None) or email.new_tokens(n, canonicals)

    monkeypatch.setitem(kinds.KINDS, "email", dataclasses.replace(email,
                                                                  new_tokens=collide_once))
    kinds.parse_kind.cache_clear()  # parsed kind specs are cached; so is the patched one
    request.addfinalizer(kinds.parse_kind.cache_clear)
    fresh, = s.tokenize("email", ["frank@example.com"])
    assert next(proposals, None) is None  # the erased token was proposed
    assert fresh != old
    s.store.grant("reader", "test")
    with pytest.raises(ErasedTokenError):
        s.detokenize([old], principal="reader")
    assert s.detokenize([fresh], principal="reader") == ["frank@example.com"]


def test_other_processes_stop_serving_erased_values_and_tokens(open_vault: Opener) -> None:
    """A long-lived host (DuckDB plugin, warm Lambda) cached both directions before another
    process erased the value."""
    host = svc(open_vault, erasure_check_s=0.0)
    stale = svc(open_vault, erasure_check_s=3600.0)
    host.store.grant("reader", "test")
    old, = host.tokenize("email", ["gus@example.com"])
    assert stale.tokenize("email", ["gus@example.com"]) == [old]
    for h in (host, stale):
        assert h.detokenize([old], principal="reader") == ["gus@example.com"]
    svc(open_vault).forget("email", values=["gus@example.com"], principal="dpo")
    for h in (host, stale):  # a cached value is served only after an epoch check
        with pytest.raises(ErasedTokenError):
            h.detokenize([old], principal="reader")
    new, = host.tokenize("email", ["gus@example.com"])
    assert new != old
    # The documented bound: tokenize looks at the epoch every erasure_check_s seconds; the
    # detokenize above already refreshed `stale`, so it too mints the new token now.
    assert stale.tokenize("email", ["gus@example.com"]) == [new]


def test_a_reader_that_only_detokenizes_stops_serving_an_erased_value(
        open_vault: Opener) -> None:
    """A detokenize-only process (a warm detokenize Lambda) caches a value before it ever
    looked at the erasure epoch; the epoch it compares with must predate that cache entry."""
    writer = svc(open_vault)
    writer.store.grant("reader", "test")
    tok, = writer.tokenize("email", ["rae@example.com"])
    reader = svc(open_vault)
    assert reader.detokenize([tok], principal="reader") == ["rae@example.com"]
    writer.forget("email", tokens=[tok], principal="dpo")
    with pytest.raises(ErasedTokenError):
        reader.detokenize([tok], principal="reader")


def test_tokenize_cache_staleness_is_bounded_by_erasure_check_s(open_vault: Opener) -> None:
    stale = svc(open_vault, erasure_check_s=3600.0)
    old, = stale.tokenize("email", ["hal@example.com"])
    svc(open_vault).forget("email", values=["hal@example.com"], principal="dpo")
    assert stale.tokenize("email", ["hal@example.com"]) == [old]  # within the bound
    stale._epoch_checked = float("-inf")  # the interval has passed
    assert stale.tokenize("email", ["hal@example.com"]) != [old]


def test_erasures_since_lists_tombstones_in_order(open_vault: Opener) -> None:
    s = svc(open_vault)
    a, b = s.tokenize("phone", ["+1 415 555 0100", "+1 415 555 0101"])
    s.forget("phone", tokens=[a], principal="dpo")
    first = list(s.store.erasures())
    s.forget("phone", tokens=[b], principal="dpo")
    both = list(s.store.erasures())
    assert [e.token for e in both] == [a, b]
    assert [e.token for e in s.store.erasures(since=both[1].erased_at)] == [b]
    assert first[0].kind == "phone" and first[0].domain == "phone"
    assert s.store.stats()["erased"] == 2


# -- SQLite: nothing of the record is left in the vault's files -----------------------------


def test_sqlite_files_keep_no_copy_of_the_erased_ciphertext(tmp_path: Path) -> None:
    """Attack: whoever holds the key file reads the vault file (and its write-ahead log)
    directly; a deleted row's bytes stay in free pages and old WAL frames unless overwritten."""
    path = tmp_path / "vault.db"
    s = VaultTokenService(SQLiteStore(path))
    # Enough records that the page holding the erased one stays in use.
    tokens = s.tokenize("string", [f"value-{i:04d}" for i in range(200)])
    victim = tokens[7]
    blob = s.store.fetch_values([victim])[victim].ciphertext
    fp = s.store.keyring().fingerprint("string", "value-0007")
    s.forget("string", values=["value-0007"], principal="dpo")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("vault.db")
                   and not p.name.endswith(".keys"))
    assert blob not in raw
    assert fp not in raw
    s.store.close()


# -- long-lived hosts: the DuckDB plugin and a warm Lambda container -------------------------


def test_duckdb_host_refuses_an_erased_token_it_had_cached(tmp_path: Path) -> None:
    import duckdb

    from deid.duckdb_plugin import register

    host = VaultTokenService(SQLiteStore(tmp_path / "vault.db"))  # caches on, as in a build
    host.store.grant("reader", "test")
    host.store.grant_tokenize("reader", "*", "tokenize", "test")
    con = duckdb.connect()
    register(con, host, "reader")
    old = con.sql("select deid.tokenize('pat@example.com', 'email')").fetchall()[0][0]
    assert con.sql(f"select deid.detokenize('{old}')").fetchall() == [("pat@example.com",)]
    VaultTokenService(SQLiteStore(tmp_path / "vault.db")).forget(
        "email", tokens=[old], principal="dpo")
    with pytest.raises(duckdb.Error, match="erased") as info:
        con.sql(f"select deid.detokenize('{old}')").fetchall()
    assert "pat@" not in str(info.value)


def test_warm_lambda_container_refuses_an_erased_token(tmp_path: Path) -> None:
    from deid.lambda_handler import HandlerConfig, RedshiftUDF

    warm = VaultTokenService(SQLiteStore(tmp_path / "vault.db"))  # caches on
    warm.store.grant("pii_reader", "test")
    warm.store.grant_tokenize("dbt_transformer", "*", "tokenize", "test")  # the payload's user
    udf = RedshiftUDF(warm, HandlerConfig(databases=frozenset({"dev"})))  # the payloads' db
    base = json.loads((Path(__file__).parent / "payloads" / "tokenize_request.json").read_text())
    minted = json.loads(udf.tokenize({**base, "num_records": 1,
                                      "arguments": [["quinn@example.com", "email"]]}))
    token = minted["results"][0]
    detok = json.loads((Path(__file__).parent / "payloads" / "detokenize_request.json")
                       .read_text())
    event = {**detok, "num_records": 1, "arguments": [[token]]}
    assert json.loads(udf.detokenize(event))["results"] == ["quinn@example.com"]
    VaultTokenService(SQLiteStore(tmp_path / "vault.db")).forget(
        "email", values=["quinn@example.com"], principal="dpo")
    answer = json.loads(udf.detokenize(event))
    assert answer["success"] is False and "erased" in answer["error_msg"]
    assert token not in answer["error_msg"] and "quinn" not in answer["error_msg"]


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


def test_dynamodb_keeps_only_a_tombstone(endpoint: str,  # noqa: F811 - the fixture
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: read the table directly (a backup, an over-broad IAM role). After forget the
    token's item holds no ciphertext and no fingerprint, and the index item is gone."""
    import boto3

    url = _dynamodb_url(endpoint, monkeypatch)
    s = VaultTokenService(open_store(url))
    tok, = s.tokenize("email", ["jo@example.com"])
    fp = s.keyring.fingerprint("email", "jo@example.com")
    s.forget("email", values=["jo@example.com"], principal="dpo")
    table = url.split("://", 1)[1].split("?", 1)[0]
    ddb = boto3.client("dynamodb", region_name="us-east-1", endpoint_url=endpoint)
    item = ddb.get_item(TableName=table, Key={"pk": {"S": f"tok#{tok}"}})["Item"]
    assert sorted(item) == ["domain", "erased_at", "kind", "pk"]
    assert "Item" not in ddb.get_item(TableName=table,
                                      Key={"pk": {"S": f"fp#email#{fp.hex()}"}})
    assert s.store.stats()["erased"] == 1


# -- Skyflow: bulk delete by record id, tombstones in the deid policy store -----------------


@pytest.fixture
def skyflow_vault(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    from deid import skyflow
    from fake_skyflow import FakeSkyflow

    servers: list[Any] = []
    services: list[Any] = []

    def build(policy: str | None = None, **fake_options: Any) -> Any:
        if not servers:
            servers.append(FakeSkyflow(**fake_options).start())
        fake = servers[0]
        creds = fake.write_credentials(tmp_path / "credentials.json")
        url = fake.vault_url(credentials=str(creds), backoff="0",
                             policy=policy or f"sqlite:///{tmp_path / 'policy.db'}")
        svc = skyflow.SkyflowTokenService(skyflow.parse_url(url))
        services.append(svc)
        return fake, svc

    yield build
    for svc in services:
        svc.close()
    for server in servers:
        server.stop()


def test_skyflow_forget_deletes_the_record_and_detokenize_says_erased(
        skyflow_vault: Callable[..., Any]) -> None:
    fake, s = skyflow_vault()
    s._policy.grant("reader", "test")
    old, bo = s.tokenize("email", ["kim@example.com", "bo@example.com"])
    assert s.forget("email", values=["KIM@example.com"], principal="dpo") == 1
    assert fake.values("persons", "email") == ["bo@example.com"]
    assert [r.op for r in fake.log].count("delete") == 1
    with pytest.raises(ErasedTokenError) as info:
        s.detokenize([bo, old], principal="reader")
    assert "row 2" in str(info.value) and old not in str(info.value)
    assert s.detokenize([bo], principal="reader") == ["bo@example.com"]
    new, = s.tokenize("email", ["kim@example.com"])
    assert new != old
    assert [e.token for e in s.erasures()] == [old]
    rec = [r for r in s._policy.audit_records() if r["action"] == "forget"]
    assert len(rec) == 1 and (rec[0]["count"], rec[0]["kinds"]) == (1, {"email:email": 1})
    assert "kim@" not in json.dumps(rec) and old not in json.dumps(rec)
    # No value ever travelled in a URL (access logs, proxies): only request bodies.
    assert all(r.op != "delete" or set(r.body) == {"skyflow_ids"} for r in fake.log)


def test_skyflow_forget_by_token_deletes_only_the_given_tokens(
        skyflow_vault: Callable[..., Any]) -> None:
    fake, s = skyflow_vault()
    a, b = s.tokenize("email", ["lu@example.com", "mo@example.com"])
    assert s.forget("email", tokens=[a, "00000000-0000-0000-0000-000000000000"],
                    principal="dpo") == 1
    assert fake.values("persons", "email") == ["mo@example.com"]
    s._policy.grant("reader", "test")
    assert s.detokenize([b], principal="reader") == ["mo@example.com"]


def test_skyflow_reissuing_an_erased_token_fails_closed(
        skyflow_vault: Callable[..., Any]) -> None:
    """Attack: a column whose tokens are derived from the value gives the deleted value its
    old token back, silently relinking the person's new rows to the erased ones."""
    _fake, s = skyflow_vault(reissue_tokens_after_delete=True)
    old, = s.tokenize("email", ["nia@example.com"])
    s.forget("email", values=["nia@example.com"], principal="dpo")
    with pytest.raises(DeidError) as info:
        s.tokenize("email", ["nia@example.com"])
    assert "erased" in str(info.value) and old not in str(info.value)


def test_skyflow_with_delegated_policy_forgets_but_cannot_say_erased(
        skyflow_vault: Callable[..., Any]) -> None:
    _fake, s = skyflow_vault(policy="skyflow")
    old, = s.tokenize("email", ["oz@example.com"])
    assert s.forget("email", values=["oz@example.com"], principal="dpo") == 1
    with pytest.raises(UnknownTokenError) as info:
        s.detokenize([old], principal="anyone")
    assert not isinstance(info.value, ErasedTokenError)  # no deid store keeps tombstones
    with pytest.raises(DeidError, match="policy=skyflow"):
        list(s.erasures())


# -- the commands: deid forget, deid erased, and the dbt test that finds erased tokens ------


def _cli(vault: Path, *args: str, stdin: str | None = None) -> Any:
    from click.testing import CliRunner

    from deid.cli import main

    result = CliRunner().invoke(main, [*args, "--vault", f"sqlite:///{vault}"], input=stdin)
    assert result.exit_code == 0, result.output
    return result


def test_cli_forget_reads_values_from_stdin_and_never_echoes_them(tmp_path: Path) -> None:
    vault = tmp_path / "vault.db"
    s = VaultTokenService(SQLiteStore(vault))
    ann, bo, cy = s.tokenize("email", ["ann@example.com", "bo@example.com", "cy@example.com"])
    out = _cli(vault, "forget", "email", "--values-from", "-",
               stdin="ANN@example.com\n\nnobody@example.com\n").output
    assert "erased 1 vault record(s) of kind email (1 of 2 given were not" in out
    assert "ann@" not in out.lower() and "nobody" not in out and ann not in out
    out = _cli(vault, "forget", "email", "--token", bo, "--token", bo).output
    assert "erased 1 vault record(s)" in out and bo not in out
    csv_text = _cli(vault, "erased").output.splitlines()
    assert csv_text[0] == "token,kind,domain,erased_at"
    assert [line.split(",")[0] for line in csv_text[1:]] == [ann, bo]
    jsonl = [json.loads(line) for line in _cli(vault, "erased", "--format", "jsonl",
                                                "--since", "2000-01-01").output.splitlines()]
    assert [r["token"] for r in jsonl] == [ann, bo] and jsonl[0]["kind"] == "email"
    assert _cli(vault, "erased", "--since", "2999-01-01").output.splitlines() == [
        "token,kind,domain,erased_at"]
    shown = _cli(vault, "audit", "show", "--json").output
    audit = [json.loads(line) for line in shown.splitlines()]
    assert [(r["action"], r["count"]) for r in audit] == [("forget", 1), ("forget", 1)]
    s.store.grant("reader", "test")
    assert s.detokenize([cy], principal="reader") == ["cy@example.com"]


def test_cli_forget_refuses_values_and_tokens_together(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deid.cli import main

    vault = f"sqlite:///{tmp_path / 'vault.db'}"
    both = CliRunner().invoke(main, ["forget", "email", "--values-from", "-", "--token", "t",
                                     "--vault", vault], input="a@b.co\n")
    assert both.exit_code != 0 and "not both" in both.output
    neither = CliRunner().invoke(main, ["forget", "email", "--vault", vault])
    assert neither.exit_code != 0 and "nothing to erase" in neither.output


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


@pytest.mark.e2e
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
