"""Erasure (crypto-shredding) on SQLite and DynamoDB + KMS (moto server), on Skyflow (the
local fake with its bulk-delete endpoint), in the long-lived hosts, and the ``deid forget`` and
``deid erased`` commands. The store contract is in forget_contract.py; PostgreSQL runs it in
test_forget_postgres.py, the dbt test in test_forget_e2e.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deid.errors import DeidError, ErasedTokenError, UnknownTokenError
from deid.service import VaultTokenService
from deid.stores import VaultStore
from deid.stores.sqlite import SQLiteStore
from deid.vault import open_store
from forget_contract import *  # noqa: F403 - the store contract, collected here
from forget_contract import Opener
from test_dynamodb_store import endpoint  # noqa: F401 - the moto server fixture, by name


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



@pytest.fixture(params=["sqlite", pytest.param("dynamodb", marks=pytest.mark.slow)])
def open_vault(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Opener]:
    """Opens independent stores over one fresh vault (as separate processes would)."""
    opened: list[VaultStore] = []
    if request.param == "sqlite":
        path = tmp_path / "vault.db"

        def make() -> VaultStore:
            return SQLiteStore(path, create=True)
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


# -- SQLite: nothing of the record is left in the vault's files -----------------------------


@pytest.mark.parametrize("merged", [None, "recent", "tokens"])
def test_sqlite_files_keep_no_copy_of_the_erased_ciphertext(tmp_path: Path,
                                                            merged: str | None) -> None:
    """Attack: whoever holds the key file reads the vault file (and its write-ahead log)
    directly; a deleted row's bytes stay in free pages and old WAL frames unless overwritten.
    A merge deletes every row of the level it empties, so it too must leave no copy behind."""
    path = tmp_path / "vault.db"
    s = VaultTokenService(SQLiteStore(path, create=True))
    # Enough records that the page holding the erased one stays in use.
    tokens = s.tokenize("string", [f"value-{i:04d}" for i in range(200)])
    if merged:
        s.store.merge_journal(down=merged == "tokens")  # type: ignore[attr-defined]
    victim = tokens[7]
    blob = s.store.fetch_values([victim])[victim].ciphertext
    fp = s.store.keyring().fingerprints("string", ["value-0007"])[0]
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

    host = VaultTokenService(SQLiteStore(tmp_path / "vault.db", create=True))  # caches on
    host.store.grant("reader", "test")
    host.store.grant_tokenize("reader", "*", "tokenize", "test")
    con = duckdb.connect()
    register(con, host, "reader")
    old = con.sql("select deid.tokenize('pat@example.com', 'email')").fetchall()[0][0]
    assert con.sql(f"select deid.detokenize('{old}')").fetchall() == [("pat@example.com",)]
    VaultTokenService(SQLiteStore(tmp_path / "vault.db", create=True)).forget(
        "email", tokens=[old], principal="dpo")
    with pytest.raises(duckdb.Error, match="erased") as info:
        con.sql(f"select deid.detokenize('{old}')").fetchall()
    assert "pat@" not in str(info.value)


def test_warm_lambda_container_refuses_an_erased_token(tmp_path: Path) -> None:
    from deid.lambda_handler import HandlerConfig, RedshiftUDF

    warm = VaultTokenService(SQLiteStore(tmp_path / "vault.db", create=True))  # caches on
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
    VaultTokenService(SQLiteStore(tmp_path / "vault.db", create=True)).forget(
        "email", values=["quinn@example.com"], principal="dpo")
    answer = json.loads(udf.detokenize(event))
    assert answer["success"] is False and "erased" in answer["error_msg"]
    assert token not in answer["error_msg"] and "quinn" not in answer["error_msg"]


@pytest.mark.slow
def test_dynamodb_keeps_only_a_tombstone(endpoint: str,  # noqa: F811 - the fixture
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: read the table directly (a backup, an over-broad IAM role). After forget the
    token's item holds no ciphertext and no fingerprint, and the index item is gone."""
    import boto3

    url = _dynamodb_url(endpoint, monkeypatch)
    s = VaultTokenService(open_store(url))
    tok, = s.tokenize("email", ["jo@example.com"])
    fp = s.keyring.fingerprints("email", ["jo@example.com"])[0]
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
        if not policy:  # deid init of the policy vault
            SQLiteStore(tmp_path / "policy.db", create=True).close()
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

    SQLiteStore(vault, create=True).close()  # deid init
    result = CliRunner().invoke(main, [*args, "--vault", f"sqlite:///{vault}"], input=stdin)
    assert result.exit_code == 0, result.output
    return result


def test_cli_forget_reads_values_from_stdin_and_never_echoes_them(tmp_path: Path) -> None:
    vault = tmp_path / "vault.db"
    s = VaultTokenService(SQLiteStore(vault, create=True))
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
    SQLiteStore(tmp_path / "vault.db", create=True).close()  # deid init
    both = CliRunner().invoke(main, ["forget", "email", "--values-from", "-", "--token", "t",
                                     "--vault", vault], input="a@b.co\n")
    assert both.exit_code != 0 and "not both" in both.output
    neither = CliRunner().invoke(main, ["forget", "email", "--vault", vault])
    assert neither.exit_code != 0 and "nothing to erase" in neither.output


