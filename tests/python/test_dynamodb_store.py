"""The DynamoDB + KMS vault backend against moto in server mode (real HTTP, real botocore)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest

from deid import kinds
from deid.errors import (
    ConfigError,
    DeidError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultKeyError,
    VaultUnavailableError,
)
from deid.service import VaultTokenService
from deid.stores import StoredValue
from deid.stores.dynamodb import DynamoDBStore, open_store

pytestmark = pytest.mark.slow  # a moto server in a subprocess, real HTTP

REGION = "us-east-1"


# moto's server as `moto_server` runs it, but serving one request at a time. Threaded, moto
# applies a transaction by copying the table and, when a condition fails, putting the copy
# back, erasing writes another transaction committed meanwhile: ten writers racing for 60
# values then ended with a second token for a value in one round of twelve. DynamoDB's
# transactions are atomic and isolated; one request at a time gives moto the same semantics
# (the clients still race, through real HTTP).
_MOTO_ONE_AT_A_TIME = (
    "import sys\n"
    "from werkzeug.serving import run_simple\n"
    "from moto.server import DomainDispatcherApplication, MotoRequestHandler, "
    "create_backend_app\n"
    "run_simple(sys.argv[1], int(sys.argv[2]), DomainDispatcherApplication(create_backend_app), "
    "threaded=False, request_handler=MotoRequestHandler)\n")


def _moto_server() -> list[str]:
    return [sys.executable, "-c", _MOTO_ONE_AT_A_TIME]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*_moto_server(), "127.0.0.1", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        yield url
    finally:
        proc.kill()  # a throwaway in-memory server: nothing to flush
        proc.wait(timeout=10)


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


@pytest.fixture
def vault_url(endpoint: str) -> str:
    """A fresh table and KMS key per test, created the way template.yaml does."""
    table = f"deid-vault-{uuid.uuid4().hex[:8]}"
    ddb = boto3.client("dynamodb", region_name=REGION, endpoint_url=endpoint)
    ddb.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
    kms = boto3.client("kms", region_name=REGION, endpoint_url=endpoint)
    key = kms.create_key(Description="deid vault test")["KeyMetadata"]["Arn"]
    return f"dynamodb://{table}?region={REGION}&kms_key={key}&endpoint_url={endpoint}"


def service(url: str) -> VaultTokenService:
    """A new container: fresh clients, fresh keyring, empty caches."""
    return VaultTokenService(open_store(url), cache_size=0, detokenize_cache_size=0)


def test_tokens_converge_across_containers_and_round_trip(vault_url: str) -> None:
    a, b = service(vault_url), service(vault_url)
    values = ["ana@example.com", "Ana@Example.com", "bo@example.org", None]
    ta = a.tokenize("email", values)
    tb = b.tokenize("email", values)
    assert ta == tb
    assert ta[0] == ta[1] and ta[0] != ta[2] and ta[3] is None
    assert all(kinds.is_token(t, "email") for t in ta[:3])
    a.store.grant("analyst_pii", "test")
    c = service(vault_url)  # a detokenize container: unwraps the data key by version
    assert c.detokenize(ta, principal="analyst_pii", query_id="42") == [
        "ana@example.com", "ana@example.com", "bo@example.org", None]
    assert c.verify_audit()["records"] == 1


def test_domains_are_separate_token_spaces(vault_url: str) -> None:
    s = service(vault_url)
    assert s.tokenize("email", ["x@y.com"]) != s.tokenize("email:marketing", ["x@y.com"])


def test_batches_larger_than_dynamodb_limits(vault_url: str) -> None:
    """150 new values: 2 BatchGetItem chunks and 3 transactions of 50 records."""
    s = service(vault_url)
    values = [f"user{i}@example.com" for i in range(150)]
    first = s.tokenize("email", values)
    assert len(set(first)) == 150
    assert service(vault_url).tokenize("email", values) == first
    s.store.grant("reader", "test")
    assert service(vault_url).detokenize(first, principal="reader") == values


def test_concurrent_writers_converge_on_one_token(vault_url: str) -> None:
    """Six containers mint the same 40 new values at once; each value ends with one token
    and the vault holds exactly one index entry per value."""
    values = [f"person{i}@example.com" for i in range(40)]
    services = [service(vault_url) for _ in range(6)]
    results: list[list[str | None]] = [[] for _ in services]
    barrier = threading.Barrier(len(services))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = services[i].tokenize("email", values)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(services))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == results[0] for r in results)
    assert len(set(results[0])) == 40
    stats = services[0].store.stats()
    assert stats["tokens"] == {"email (email)": 40}


class _RecordingKms:
    """Wraps the KMS client to record (operation, purpose) of every call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.real, name)

        def call(**kwargs: Any) -> Any:
            self.calls.append((name, kwargs["EncryptionContext"]["deid:purpose"]))
            return fn(**kwargs)

        return call


def test_tokenize_never_decrypts_values_and_detokenize_never_sees_the_fingerprint_key(
        vault_url: str) -> None:
    """The IAM split in template.yaml relies on these exact KMS operations per function."""
    tok = service(vault_url)
    tok.store.kms = _RecordingKms(tok.store.kms)
    tokens = tok.tokenize("ssn", ["123-45-6789", "987-65-4321"])
    assert set(tok.store.kms.calls) == {("generate_data_key", "fingerprint"),
                                        ("generate_data_key", "values")}
    tok2 = service(vault_url)  # a second tokenize container finds the fingerprint key
    tok2.store.kms = _RecordingKms(tok2.store.kms)
    assert tok2.tokenize("ssn", ["123-45-6789"]) == tokens[:1]
    assert set(tok2.store.kms.calls) == {("decrypt", "fingerprint")}
    # A host's tokenize (with the caller's principal) is audited: the audit key too.
    tok2.store.grant_tokenize("etl", "*", "tokenize", "test")
    assert tok2.tokenize("ssn", ["123-45-6789"], principal="etl") == tokens[:1]
    tok2.flush_audit()
    audit_ops = set(tok2.store.kms.calls) - {("decrypt", "fingerprint")}
    # the audit key is created by the first appender, unwrapped by the others
    assert audit_ops in ({("generate_data_key", "audit")}, {("decrypt", "audit")})

    tok.store.grant("reader", "test")
    det = service(vault_url)
    det.store.kms = _RecordingKms(det.store.kms)
    assert det.detokenize(tokens, principal="reader") == ["123-45-6789", "987-65-4321"]
    # (the tokenize container above created the audit key; detokenize unwraps it)
    assert set(det.store.kms.calls) == {("decrypt", "values"), ("decrypt", "audit")}


def test_each_tokenize_container_gets_its_own_key_version(vault_url: str) -> None:
    a, b = service(vault_url), service(vault_url)
    a.tokenize("name", ["Ada Lovelace"])
    b.tokenize("name", ["Grace Hopper"])
    assert a.store.stats()["key_versions"] == {"1": 1, "2": 1}


def test_policy_denies_and_audits(vault_url: str) -> None:
    s = service(vault_url)
    tokens = s.tokenize("phone", ["+1 415 555 0100"])
    with pytest.raises(PermissionDeniedError) as err:
        s.detokenize(tokens, principal="intruder", query_id="7")
    assert "+1 415" not in str(err.value)
    assert s.store.grant("reader", "admin") is True
    assert s.store.grant("reader", "admin") is False
    assert [p["principal"] for p in s.store.principals()] == ["reader"]
    assert s.store.is_allowed("reader") and not s.store.is_allowed("intruder")
    assert s.store.revoke("reader") is True and s.store.revoke("reader") is False
    records = list(s.store.audit_records())
    assert [(r["principal"], r["outcome"], r["query_id"]) for r in records] == [
        ("intruder", "denied", "7")]
    assert s.verify_audit() == {"records": 1, "head": records[0]["hash"], "checkpoints": 0,
                                "forward_secure": False}


def test_tokenize_policy_grants_replace_and_revoke(vault_url: str) -> None:
    store = service(vault_url).store
    assert store.tokenize_mode("matcher", "email") is None
    assert store.grant_tokenize("matcher", "email", "lookup", "admin") is True
    assert store.grant_tokenize("matcher", "email", "lookup", "admin") is False
    assert store.tokenize_mode("matcher", "email") == "lookup"
    assert store.tokenize_mode("matcher", "phone") is None
    assert store.grant_tokenize("matcher", "*", "tokenize", "admin") is True
    assert store.tokenize_mode("matcher", "phone") == "tokenize"  # rights add up
    assert store.revoke_tokenize("matcher", "*") is True
    assert store.revoke_tokenize("matcher", "*") is False
    assert [(g["principal"], g["domain"], g["mode"]) for g in store.tokenize_grants()] == [
        ("matcher", "email", "lookup")]


def test_concurrent_audit_appends_stay_one_chain(vault_url: str) -> None:
    s = service(vault_url)
    tokens = s.tokenize("email", ["a@b.co"])
    s.store.grant("reader", "test")
    readers = [service(vault_url) for _ in range(5)]
    # Through futures, so a reader that fails fails the test with its own error (a thread's
    # exception would only show up as a missing record).
    with ThreadPoolExecutor(max_workers=len(readers)) as pool:
        done = [pool.submit(r.detokenize, tokens, principal="reader") for r in readers]
        assert [f.result() for f in done] == [["a@b.co"]] * len(readers)
    assert s.verify_audit()["records"] == 5


def test_tampered_audit_record_is_detected(vault_url: str) -> None:
    s = service(vault_url)
    s.store.grant("reader", "test")
    tokens = s.tokenize("email", ["a@b.co"])
    s.detokenize(tokens, principal="reader")
    s.detokenize(tokens, principal="reader")
    s.store.ddb.update_item(TableName=s.store.table, Key={"pk": {"S": "audit#000000000001"}},
                            UpdateExpression="SET #r = :r",
                            ExpressionAttributeNames={"#r": "record"},
                            ExpressionAttributeValues={":r": {"S": '{"principal": "someone"}'}})
    with pytest.raises(DeidError, match="record 1 was altered"):
        s.verify_audit()


def test_forged_token_fails_the_batch(vault_url: str) -> None:
    s = service(vault_url)
    real = s.tokenize("email", ["a@b.co"])[0]
    forged = "a" * 24 + "@deid.invalid"
    assert forged != real
    s.store.grant("reader", "test")
    with pytest.raises(UnknownTokenError) as err:
        s.detokenize([real, forged], principal="reader")
    assert "row 2" in str(err.value) and forged not in str(err.value)


def test_swapped_ciphertext_fails_authentication(vault_url: str) -> None:
    s = service(vault_url)
    t1, t2 = s.tokenize("name", ["Ada", "Grace"])
    item = s.store.ddb.get_item(TableName=s.store.table, Key={"pk": {"S": f"tok#{t2}"}})["Item"]
    s.store.ddb.update_item(TableName=s.store.table, Key={"pk": {"S": f"tok#{t1}"}},
                            UpdateExpression="SET ct = :c",
                            ExpressionAttributeValues={":c": item["ct"]})
    s.store.grant("reader", "test")
    with pytest.raises(VaultKeyError):
        service(vault_url).detokenize([t1], principal="reader")


def test_lost_fingerprint_key_is_not_silently_recreated(vault_url: str) -> None:
    s = service(vault_url)
    s.tokenize("email", ["a@b.co"])
    s.store.ddb.delete_item(TableName=s.store.table, Key={"pk": {"S": "meta#fingerprint_key"}})
    with pytest.raises(VaultKeyError, match="missing"):
        service(vault_url).tokenize("email", ["c@d.co"])


class _ThrottlingDdb:
    """Delegates to the real client; the first BatchGetItem answers with every key
    unprocessed and the first transaction is throttled, as DynamoDB does under load."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.throttled = {"batch_get_item": 0, "transact_write_items": 0}

    def batch_get_item(self, **kwargs: Any) -> Any:
        if self.throttled["batch_get_item"] == 0:
            self.throttled["batch_get_item"] += 1
            return {"Responses": {}, "UnprocessedKeys": kwargs["RequestItems"]}
        return self.real.batch_get_item(**kwargs)

    def transact_write_items(self, **kwargs: Any) -> Any:
        from botocore.exceptions import ClientError

        if self.throttled["transact_write_items"] == 0:
            self.throttled["transact_write_items"] += 1
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow"}},
                              "TransactWriteItems")
        return self.real.transact_write_items(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_throttled_reads_and_writes_are_retried(vault_url: str) -> None:
    s = service(vault_url)
    s.store.ddb = _ThrottlingDdb(s.store.ddb)
    tokens = s.tokenize("email", ["a@b.co", "c@d.co"])
    assert s.store.ddb.throttled == {"batch_get_item": 1, "transact_write_items": 1}
    assert service(vault_url).tokenize("email", ["a@b.co", "c@d.co"]) == tokens


def test_unreachable_vault_fails_closed_without_values(endpoint: str) -> None:
    s = VaultTokenService(open_store(
        f"dynamodb://no-such-table?region={REGION}&kms_key=alias/none&endpoint_url={endpoint}"),
        cache_size=0)
    with pytest.raises((VaultUnavailableError, VaultKeyError)) as err:
        s.tokenize("email", ["secret@example.com"])
    assert "secret" not in str(err.value)


def test_url_is_validated() -> None:
    with pytest.raises(ConfigError, match="kms_key"):
        open_store("dynamodb://t?region=us-east-1")
    with pytest.raises(ConfigError, match="unknown"):
        open_store("dynamodb://t?region=us-east-1&kms_key=k&colour=red")
    store = open_store("dynamodb://vault?region=eu-west-1&kms_key=alias/deid")
    assert isinstance(store, DynamoDBStore)
    assert (store.table, store.kms_key) == ("vault", "alias/deid")
    assert os.environ["AWS_DEFAULT_REGION"] == REGION


def test_rewrap_moves_values_to_this_container_version_with_compare_and_swap(
        vault_url: str) -> None:
    """Versions come from an atomic counter, so concurrent containers never share one; a
    rewrap re-encrypts under the rewrapping container's version, and replaces a record only
    where it is still what was read (an erased or already rewrapped record stays)."""
    first = service(vault_url)
    tokens = first.tokenize("email", [f"r{i}@example.com" for i in range(5)])
    later = service(vault_url)
    later.tokenize("email", ["new@example.com"])  # takes its own, newer key version
    ring, store = later.keyring, later.store
    rows = [(t, v, StoredValue(*ring.encrypt(t, ring.decrypt(t, v.key_version, v.ciphertext))))
            for batch in store.iter_values() for t, v in batch if v.key_version != ring.current]
    assert len(rows) == 5
    stale = rows[0]
    assert store.update_values(rows) == 5
    assert store.update_values([stale]) == 0  # its old value is gone: nothing replaced
    assert set(store.key_version_counts()) == {ring.current}
    later.store.grant("reader", "test")
    assert later.detokenize(tokens, principal="reader") == \
        [f"r{i}@example.com" for i in range(5)]


class _LostNetworkDdb:
    """Delegates reads to the real client; every write dies on the network, as botocore
    reports a dropped connection (a BotoCoreError, not a ClientError)."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def _lost(self, **kwargs: Any) -> Any:
        from botocore.exceptions import EndpointConnectionError

        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    put_item = transact_write_items = update_item = delete_item = _lost

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_network_errors_on_writes_are_deid_errors_without_values(vault_url: str) -> None:
    s = service(vault_url)
    s.tokenize("email", ["known@example.com"])  # keys loaded while the network was up
    s.store.ddb = _LostNetworkDdb(s.store.ddb)
    secret = "secret.value@example.com"
    for attempt in (lambda: s.tokenize("email", [secret]),
                    lambda: s.store.grant(secret, "test")):
        with pytest.raises(VaultUnavailableError) as err:
            attempt()
        assert "EndpointConnectionError" in str(err.value)
        assert secret not in str(err.value)


# -- the template's DynamoDB permissions cover exactly what each function writes ------------

_WRITE_ACTIONS = {"PutItem": "PutItem", "UpdateItem": "UpdateItem", "DeleteItem": "DeleteItem",
                  "Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                  "ConditionCheck": "ConditionCheckItem"}


def _record_writes(store: DynamoDBStore) -> list[tuple[str, str]]:
    """(IAM action, partition key) of every item write the store's client sends, transaction
    items one by one (IAM authorizes each by its own action)."""
    writes: list[tuple[str, str]] = []

    def before_call(model: Any, params: dict[str, Any], **_: Any) -> None:
        if model.name == "TransactWriteItems":
            for item in params["TransactItems"]:
                (op, body), = item.items()
                key = body.get("Item") or body["Key"]
                writes.append((_WRITE_ACTIONS[op], key["pk"]["S"]))
        elif model.name in _WRITE_ACTIONS:
            key = params.get("Item") or params["Key"]
            writes.append((_WRITE_ACTIONS[model.name], key["pk"]["S"]))

    store.ddb.meta.events.register("before-parameter-build.dynamodb", before_call)
    return writes


def _role_allows(role: str, action: str, pk: str) -> bool:
    """Whether template.yaml's `role` lets `action` write the item `pk` (Allow statements with
    their dynamodb:LeadingKeys patterns; the roles hold no Deny). Statements present only
    under a template condition (the ingest role's erasure on REMOVE) are left out."""
    import fnmatch

    import cfnlint.decode as cfnlint_decode

    doc, _ = cfnlint_decode.decode(str(Path(__file__).resolve().parents[2] / "udfs"
                                       / "template.yaml"))
    for policy in doc["Resources"][role]["Properties"]["Policies"]:
        for stmt in policy["PolicyDocument"]["Statement"]:
            if "Fn::If" in stmt:
                continue
            actions = stmt["Action"] if isinstance(stmt["Action"], list) else [stmt["Action"]]
            if f"dynamodb:{action}" not in actions:
                continue
            keys = stmt.get("Condition", {}).get("ForAllValues:StringLike", {}).get(
                "dynamodb:LeadingKeys")
            if keys is None or any(fnmatch.fnmatchcase(pk, k) for k in keys):
                return True
    return False


@pytest.mark.parametrize("role", ["TokenizeRole", "IngestRole"])
def test_the_minting_roles_allow_every_write_of_a_first_tokenize_and_no_rewrite_of_a_token(
        vault_url: str, role: str) -> None:
    """A tokenize function's first call on a new vault creates the fingerprint key and a data
    key, mints, converges with a concurrent container and audits: each write must be allowed
    by its role, and nothing beyond: an UpdateItem on a token item (what could turn an erased
    token's tombstone back into a value) or on a fingerprint item must not be. (The ingest
    role's erasure on REMOVE, a template option, does update token items: to tombstone them.)"""
    admin = service(vault_url)
    admin.store.grant_tokenize("etl", "*", "tokenize", "test")
    first = service(vault_url)
    assert isinstance(first.store, DynamoDBStore)
    writes = _record_writes(first.store)
    tokens = first.tokenize("email", ["a@example.com", "b@example.com"], principal="etl")
    first.flush_audit()
    rival = service(vault_url)  # a second container minting the same values
    assert isinstance(rival.store, DynamoDBStore)
    writes += _record_writes(rival.store)
    rival.store.insert_tokens([_new_record(rival, "a@example.com", "email")])
    assert rival.tokenize("email", ["a@example.com"], principal="etl") == tokens[:1]
    rival.flush_audit()
    prefixes = {pk.split("#")[0] for _a, pk in writes}
    assert {"fp", "tok", "key", "meta", "audit"} <= prefixes, writes
    denied = [(a, pk) for a, pk in writes if not _role_allows(role, a, pk)]
    assert not denied, denied
    assert not _role_allows(role, "UpdateItem", f"tok#{tokens[0]}")
    assert not _role_allows(role, "UpdateItem", "fp#email#x")
    assert not _role_allows(role, "DeleteItem", f"tok#{tokens[0]}")


def _new_record(svc: VaultTokenService, value: str, kind: str) -> Any:
    """The record a container that missed the value would try to insert (a fresh token)."""
    from deid.stores import NewRecord

    spec = kinds.parse_kind(kind)
    fp = svc.keyring.fingerprints(spec.domain, [value])[0]
    token = spec.kind.new_tokens(1, [value])[0]
    return NewRecord(spec.domain, fp, token, spec.name, *svc.keyring.encrypt(token, value))
