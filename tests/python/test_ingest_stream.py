"""Change-stream handlers (deid.ingest.stream), called directly with AWS's documented event
shapes: rows leave with tokens only, failures are reported per record, never with a value."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

import ingest_events as ev
from deid.errors import ConfigError, ErasedTokenError, PermissionDeniedError
from deid.ingest import columns as cols
from deid.ingest import stream
from deid.ingest.sinks import FileSink, FirehoseSink, S3Sink, open_sink
from deid.ingest.stream import ChangeStreamHandler, IngestBatchError
from deid.service import VaultTokenService
from deid.vault import VaultConfig, open_store
from ingest_events import Collect

CUSTOMERS = cols.SourceColumns("crm.customers", {
    "customer_id": "string:customer", "email": "email", "phone": "phone", "ssn": "ssn",
    "full_name": "name", "city": None})

ROWS = [
    {"customer_id": 1, "full_name": "Ada Lovelace", "email": "ada@example.com",
     "phone": "(881) 555-0126", "ssn": "913-16-5146", "city": "London"},
    {"customer_id": 2, "full_name": "Alan Turing", "email": "alan@example.com",
     "phone": None, "ssn": "927-23-0810", "city": "Wilmslow"},
    {"customer_id": 3, "full_name": "Grace Hopper", "email": "grace@example.com",
     "phone": "931-555-0113", "ssn": "902-11-0001", "city": "Arlington"},
]
RAW = {v for r in ROWS for k, v in r.items() if isinstance(v, str) and k != "city"}


@pytest.fixture
def sink() -> Collect:
    return Collect()


@pytest.fixture(autouse=True)
def ingest_may_tokenize(service: VaultTokenService) -> None:
    """The vault denies tokenize by default: these functions are granted, as deployed."""
    for principal in ("deid-ingest", "ingest-fn"):
        service.store.grant_tokenize(principal, "*", "tokenize", "test")


@pytest.fixture
def handler(service: VaultTokenService, sink: Collect) -> ChangeStreamHandler:
    return ChangeStreamHandler(service, CUSTOMERS, sink)


def token(service: VaultTokenService, kind: str, value: str) -> str:
    [t] = service.tokenize(kind, [value])
    assert t is not None
    return t


def no_raw(text: str) -> None:
    leaked = [v for v in RAW if v in text]
    assert not leaked, f"{len(leaked)} raw values leaked"


# -- the documented samples themselves ---------------------------------------------------------


def test_documented_kinesis_sample_is_not_json_and_fails_its_first_record(
        handler: ChangeStreamHandler, sink: Collect) -> None:
    event = ev.sample("kinesis_event.json")  # data: "Hello, this is a test."
    out = handler.kinesis(event)
    first = event["Records"][0]["kinesis"]["sequenceNumber"]
    assert out == {"batchItemFailures": [{"itemIdentifier": first}]}
    assert sink.records == []


def test_documented_dynamodb_sample_insert_modify_remove(service: VaultTokenService,
                                                         sink: Collect) -> None:
    columns = cols.SourceColumns("app.items", {"id": "string", "message": "string"})
    out = ChangeStreamHandler(service, columns, sink).dynamodb(
        ev.sample("dynamodb_stream_event.json"))
    assert out == {"batchItemFailures": []}
    ins, mod, rem = sink.records
    assert [r["_op"] for r in sink.records] == ["INSERT", "MODIFY", "REMOVE"]
    assert [r["_seq"] for r in sink.records] == ["111", "222", "333"]
    assert ins["Id"] == mod["Id"] == rem["Id"] == token(service, "string", "101")
    assert ins["Message"] == token(service, "string", "New item!")
    assert mod["Message"] == token(service, "string", "This item has changed")
    assert mod["_changed"] == "Message"
    assert set(rem) == {"Id", "_op", "_seq"}  # a tombstone: the key's token only


def test_documented_kafka_samples_fail_the_batch_naming_the_record(
        handler: ChangeStreamHandler, sink: Collect) -> None:
    for name in ("msk_event.json", "self_managed_kafka_event.json"):
        with pytest.raises(IngestBatchError,
                           match=r"mytopic-0@15 .*: the record is not a JSON object"):
            handler.kafka(ev.sample(name))
    assert sink.batches == []


# -- Kinesis ----------------------------------------------------------------------------------


def test_kinesis_rows_leave_with_tokens_only(handler: ChangeStreamHandler, sink: Collect,
                                             service: VaultTokenService) -> None:
    event = ev.kinesis(list(ROWS))
    assert handler.kinesis(event) == {"batchItemFailures": []}
    [(source, batch_id, records)] = sink.batches
    assert source == "crm.customers"
    seqs = [r["kinesis"]["sequenceNumber"] for r in event["Records"]]
    assert batch_id == f"shardId-000000000006-{seqs[0]}-{seqs[-1]}"
    no_raw(json.dumps(records))
    first = records[0]
    assert first["email"] == token(service, "email", "ada@example.com")
    assert first["customer_id"] == token(service, "string:customer", "1")
    assert first["city"] == "London"  # declared, not sensitive
    assert records[1]["phone"] is None  # NULL stays NULL
    assert [r["_seq"] for r in records] == seqs
    assert {r["_op"] for r in records} == {"INSERT"}


def test_kinesis_bad_record_reports_its_sequence_number_and_writes_only_those_before(
        handler: ChangeStreamHandler, sink: Collect, caplog: pytest.LogCaptureFixture) -> None:
    bad = {**ROWS[1], "email": "not-an-email-alan"}
    event = ev.kinesis([ROWS[0], bad, ROWS[2]])
    with caplog.at_level(logging.DEBUG):
        out = handler.kinesis(event)
    assert out == {"batchItemFailures": [
        {"itemIdentifier": event["Records"][1]["kinesis"]["sequenceNumber"]}]}
    # Lambda retries from the failed record: writing the third now would write it twice.
    assert [r["_seq"] for r in sink.records] == [event["Records"][0]["kinesis"]["sequenceNumber"]]
    assert "column 'email', kind 'email'" in caplog.text
    no_raw(caplog.text)
    assert "not-an-email-alan" not in caplog.text


def test_an_undeclared_column_fails_its_record(handler: ChangeStreamHandler,
                                               sink: Collect) -> None:
    event = ev.kinesis([ROWS[0], {**ROWS[1], "notes": "allergic to penicillin"}])
    out = handler.kinesis(event)
    assert out["batchItemFailures"] == [
        {"itemIdentifier": event["Records"][1]["kinesis"]["sequenceNumber"]}]
    assert len(sink.records) == 1


def test_a_column_spelled_in_another_case_is_still_tokenized(
        handler: ChangeStreamHandler, sink: Collect, service: VaultTokenService) -> None:
    row = {("EMAIL" if k == "email" else k): v for k, v in ROWS[0].items()}
    handler.kinesis(ev.kinesis([row]))
    assert sink.records[0]["EMAIL"] == token(service, "email", "ada@example.com")


def test_values_that_could_slip_past_tokenize_fail_their_record(
        handler: ChangeStreamHandler, sink: Collect) -> None:
    """A nested value in a sensitive column, or a column given twice in two cases (one
    spelling would go untokenized), fails the record instead of passing through."""
    nested = {**ROWS[0], "email": {"primary": "ada@example.com"}}
    twice = {**ROWS[0], "Email": "ada@example.com"}
    for bad in (nested, twice):
        event = ev.kinesis([bad])
        assert handler.kinesis(event) == {"batchItemFailures": [
            {"itemIdentifier": event["Records"][0]["kinesis"]["sequenceNumber"]}]}
    assert sink.records == []


def test_a_dms_envelope_carries_the_operation(handler: ChangeStreamHandler, sink: Collect,
                                              service: VaultTokenService) -> None:
    event = ev.kinesis([
        {"data": ROWS[0], "metadata": {"operation": "insert", "table-name": "customers"}},
        {"data": {**ROWS[0], "email": "ada@new.example.com"},
         "metadata": {"operation": "update"}},
        {"data": ROWS[0], "metadata": {"operation": "delete"}},
    ])
    assert handler.kinesis(event) == {"batchItemFailures": []}
    assert [r["_op"] for r in sink.records] == ["INSERT", "MODIFY", "REMOVE"]
    assert sink.records[1]["email"] == token(service, "email", "ada@new.example.com")


def test_a_vault_outage_fails_the_whole_batch(handler: ChangeStreamHandler, sink: Collect,
                                              service: VaultTokenService,
                                              vault_path: Path) -> None:
    service.store.close()
    vault_path.write_bytes(b"not a database")  # the next connection finds a broken vault
    with pytest.raises(Exception):  # noqa: B017 - any error: Lambda retries the batch
        handler.kinesis(ev.kinesis(list(ROWS)))
    assert sink.batches == []


# -- DynamoDB Streams -------------------------------------------------------------------------


def test_dynamodb_modify_retokenizes_the_changed_email(handler: ChangeStreamHandler,
                                                        sink: Collect,
                                                        service: VaultTokenService) -> None:
    new = {**ROWS[0], "email": "ada.king@example.com"}
    event = ev.dynamodb([("INSERT", ROWS[0], None), ("MODIFY", new, ROWS[0])])
    assert handler.dynamodb(event) == {"batchItemFailures": []}
    ins, mod = sink.records
    assert mod["_changed"] == "email"
    assert mod["email"] == token(service, "email", "ada.king@example.com") != ins["email"]
    assert mod["ssn"] == ins["ssn"] and mod["customer_id"] == ins["customer_id"]
    # An update is not an erasure: the old token still resolves.
    service.store.grant("reader", "test")
    assert service.detokenize([ins["email"]], principal="reader") == ["ada@example.com"]


def test_dynamodb_remove_is_a_tombstone_of_the_key_token(handler: ChangeStreamHandler,
                                                          sink: Collect,
                                                          service: VaultTokenService) -> None:
    handler.dynamodb(ev.dynamodb([("REMOVE", None, ROWS[2])]))
    [rec] = sink.records
    assert rec == {"customer_id": token(service, "string:customer", "3"), "_op": "REMOVE",
                   "_seq": "111"}


def test_dynamodb_bad_record_reports_its_sequence_number(handler: ChangeStreamHandler,
                                                         sink: Collect) -> None:
    event = ev.dynamodb([("INSERT", ROWS[0], None),
                         ("INSERT", {**ROWS[1], "ssn": "12"}, None),
                         ("INSERT", ROWS[2], None)])
    assert handler.dynamodb(event) == {"batchItemFailures": [{"itemIdentifier": "112"}]}
    assert [r["_seq"] for r in sink.records] == ["111"]


def test_dynamodb_insert_without_new_image_fails_closed(handler: ChangeStreamHandler,
                                                        sink: Collect) -> None:
    event = ev.dynamodb([("INSERT", ROWS[0], None)])
    del event["Records"][0]["dynamodb"]["NewImage"]
    assert handler.dynamodb(event) == {"batchItemFailures": [{"itemIdentifier": "111"}]}
    assert sink.records == []


def test_erase_on_remove_must_name_sensitive_columns(service: VaultTokenService,
                                                     sink: Collect) -> None:
    with pytest.raises(ConfigError, match="city"):
        ChangeStreamHandler(service, CUSTOMERS, sink, erase_on_remove=["city"])


def eraser(service: VaultTokenService, sink: Collect) -> ChangeStreamHandler:
    return ChangeStreamHandler(service, CUSTOMERS, sink, principal="ingest-fn",
                               erase_on_remove=["email", "ssn", "full_name"])


def test_remove_erases_the_person_and_their_next_token_is_new(service: VaultTokenService,
                                                              sink: Collect) -> None:
    handler = eraser(service, sink)
    handler.dynamodb(ev.dynamodb([("INSERT", ROWS[0], None)]))
    old = sink.records[0]
    handler.dynamodb(ev.dynamodb([("REMOVE", None, ROWS[0])], first_seq=200))
    assert sink.records[1]["_op"] == "REMOVE"
    service.store.grant("reader", "test")
    for column in ("email", "ssn", "full_name"):
        with pytest.raises(ErasedTokenError):
            service.detokenize([old[column]], principal="reader")
    # Not erased: the key and the phone still resolve (erasure is per column, configured).
    assert service.detokenize([old["phone"]], principal="reader") == ["+18815550126"]
    handler.dynamodb(ev.dynamodb([("INSERT", ROWS[0], None)], first_seq=300))
    assert sink.records[2]["email"] != old["email"]  # unlinkable to the erased token
    [audit] = [r for r in service.store.audit_records() if r["action"] == "forget"
               and r["kinds"].get("email:email")]
    assert audit["principal"] == "ingest-fn" and audit["count"] == 1


def test_an_insert_after_a_remove_in_the_same_batch_gets_a_new_token(
        service: VaultTokenService, sink: Collect) -> None:
    eraser(service, sink).dynamodb(ev.dynamodb([
        ("INSERT", ROWS[0], None), ("REMOVE", None, ROWS[0]), ("INSERT", ROWS[0], None)]))
    first, tombstone, again = sink.records
    assert tombstone["_op"] == "REMOVE"
    assert again["email"] != first["email"]
    service.store.grant("reader", "test")
    assert service.detokenize([again["email"]], principal="reader") == ["ada@example.com"]


def test_remove_without_old_image_cannot_erase_and_is_reported(service: VaultTokenService,
                                                                sink: Collect) -> None:
    event = ev.dynamodb([("INSERT", ROWS[1], None), ("REMOVE", None, ROWS[0])])
    del event["Records"][1]["dynamodb"]["OldImage"]  # a KEYS_ONLY stream
    out = eraser(service, sink).dynamodb(event)
    assert out == {"batchItemFailures": [{"itemIdentifier": "112"}]}
    assert [r["_op"] for r in sink.records] == ["INSERT"]  # no tombstone without its erasure


# -- Kafka ------------------------------------------------------------------------------------


def test_kafka_partitions_are_written_separately(handler: ChangeStreamHandler, sink: Collect,
                                                 service: VaultTokenService) -> None:
    event = ev.kafka({0: [ROWS[0], ROWS[1]], 3: [ROWS[2]]})
    assert handler.kafka(event) == {"records": 3}
    assert [b[1] for b in sink.batches] == ["mytopic-0-15-16", "mytopic-3-15-15"]
    no_raw(json.dumps(sink.records))
    assert sink.records[2]["email"] == token(service, "email", "grace@example.com")


def test_kafka_bad_record_fails_the_batch_and_writes_nothing(
        handler: ChangeStreamHandler, sink: Collect) -> None:
    event = ev.kafka({0: [ROWS[0]], 1: [ROWS[1], {**ROWS[2], "phone": "12"}]})
    with pytest.raises(IngestBatchError) as err:
        handler.kafka(event)
    assert "mytopic-1@16" in str(err.value) and "column 'phone', kind 'phone'" in str(err.value)
    no_raw(str(err.value))
    assert sink.batches == []


def test_kafka_tombstone_removes_the_row_named_by_its_key(handler: ChangeStreamHandler,
                                                          sink: Collect,
                                                          service: VaultTokenService) -> None:
    event = ev.kafka({0: [ROWS[0], None]}, keys={(0, 1): {"customer_id": 1}},
                     name="self_managed_kafka_event.json")
    handler.kafka(event)
    assert sink.records[1] == {"customer_id": token(service, "string:customer", "1"),
                               "_op": "REMOVE", "_seq": "mytopic-0@16"}


# -- column map -------------------------------------------------------------------------------


def test_column_map_from_a_dbt_manifest_reads_pii_and_pii_domain() -> None:
    manifest = {"nodes": {}, "sources": {"source.p.crm.customers": {
        "source_name": "crm", "name": "customers", "identifier": "raw_customers",
        "columns": {
            "customer_id": {"meta": {}, "config": {"meta": {"pii": "string",
                                                            "pii_domain": "customer"}}},
            "email": {"meta": {"pii": "email"}},
            "city": {"meta": {}},
        }}}}
    found = cols.from_manifest(manifest)
    assert found["crm.customers"].columns == {"customer_id": "string:customer",
                                              "email": "email", "city": None}
    assert found["crm.raw_customers"] is found["crm.customers"]


def test_column_map_refuses_an_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "map.yml"
    path.write_text("sources:\n  crm.customers:\n    columns:\n      email: emial\n")
    with pytest.raises(ConfigError, match="unknown kind"):
        cols.load(path)


# -- module-level entry points and sinks ------------------------------------------------------


def test_entry_point_builds_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, vault_path: Path) -> None:
    cmap = tmp_path / "map.yml"
    cmap.write_text("sources:\n  crm.customers:\n    columns:\n"
                    + "".join(f"      {c}: {k or 'null'}\n" for c, k in CUSTOMERS.columns.items()))
    monkeypatch.setenv("DEID_VAULT", f"sqlite:///{vault_path}")
    monkeypatch.setenv("DEID_COLUMN_MAP", str(cmap))
    monkeypatch.setenv("DEID_INGEST_SOURCE", "crm.customers")
    monkeypatch.setenv("DEID_INGEST_OUTPUT", f"file://{tmp_path / 'out'}")
    monkeypatch.setenv("DEID_ALLOW_UNDECLARED", "true")  # an explicit choice, per function
    stream.reset()
    try:
        event = ev.kinesis([*ROWS[:2], {**ROWS[2], "loyalty_tier": "gold"}])
        assert stream.kinesis_handler(event) == {"batchItemFailures": []}
    finally:
        stream.reset()
    [written] = (tmp_path / "out" / "crm.customers").glob("*.jsonl")
    lines = [json.loads(x) for x in written.read_text().splitlines()]
    assert len(lines) == 3 and lines[2]["loyalty_tier"] == "gold"
    no_raw(written.read_text())


def test_file_sink_rewrites_a_redelivered_batch_in_place(tmp_path: Path) -> None:
    sink = FileSink(tmp_path)
    sink.write("crm.customers", "shard-1-5", [{"a": 1}])
    sink.write("crm.customers", "shard-1-5", [{"a": 1}])
    assert [p.name for p in (tmp_path / "crm.customers").iterdir()] == ["shard-1-5.jsonl"]


@mock_aws
def test_s3_sink_writes_json_lines_and_parquet() -> None:
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="landing")
    records = [{"email": "x@deid.invalid", "_op": "INSERT", "_seq": "1"}]
    open_sink("s3://landing/tokenized", s3=s3).write("crm.customers", "b1", records)
    S3Sink(s3, "landing", "pq/", "parquet").write("crm.customers", "b1", records)
    body = s3.get_object(Bucket="landing", Key="tokenized/crm.customers/b1.jsonl")["Body"]
    assert [json.loads(x) for x in body.read().splitlines()] == records
    head = s3.get_object(Bucket="landing", Key="pq/crm.customers/b1.parquet")["Body"].read(4)
    assert head == b"PAR1"


@mock_aws
def test_firehose_sink_delivers_every_record() -> None:
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="firehose-dest")
    iam = boto3.client("iam", region_name="us-east-1")
    role = iam.create_role(RoleName="fh", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    fh = boto3.client("firehose", region_name="us-east-1")
    fh.create_delivery_stream(
        DeliveryStreamName="tokens",
        ExtendedS3DestinationConfiguration={"RoleARN": role,
                                            "BucketARN": "arn:aws:s3:::firehose-dest"})
    records = [{"n": i, "_seq": str(i)} for i in range(1203)]  # three PutRecordBatch calls
    FirehoseSink(fh, "tokens").write("crm.customers", "b", records)
    got = []
    for obj in s3.list_objects_v2(Bucket="firehose-dest").get("Contents", []):
        body = s3.get_object(Bucket="firehose-dest", Key=obj["Key"])["Body"].read()
        got += [json.loads(x) for x in body.splitlines()]
    assert sorted(r["n"] for r in got) == list(range(1203))


@pytest.mark.slow
@mock_aws
def test_on_aws_shape_dynamodb_kms_vault_to_s3_with_erasure(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The production shape, on moto: the vault in DynamoDB + KMS, records to S3, a REMOVE
    erasing the person's email."""
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(var, value)
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    ddb.create_table(TableName="vault", BillingMode="PAY_PER_REQUEST",
                     AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                     KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
    key = boto3.client("kms", region_name="us-east-1").create_key()["KeyMetadata"]["Arn"]
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="landing")
    cmap = tmp_path / "map.yml"
    cmap.write_text("sources:\n  crm.customers:\n    columns:\n"
                    + "".join(f"      {c}: {k or 'null'}\n" for c, k in CUSTOMERS.columns.items()))
    url = f"dynamodb://vault?region=us-east-1&kms_key={key}"
    reader = VaultTokenService(open_store(url))
    reader.store.grant_tokenize("ingest-fn", "*", "tokenize", "test")
    handler = stream.build(stream.IngestConfig(
        vault=VaultConfig(url), column_map=str(cmap), source="crm.customers",
        output="s3://landing/tokenized", erase_on_remove=("email",), principal="ingest-fn"))
    out = handler.dynamodb(ev.dynamodb([("INSERT", ROWS[0], None), ("REMOVE", None, ROWS[0])]))
    assert out == {"batchItemFailures": []}
    [obj] = s3.list_objects_v2(Bucket="landing")["Contents"]
    assert obj["Key"] == "tokenized/crm.customers/111-112.jsonl"
    body = s3.get_object(Bucket="landing", Key=obj["Key"])["Body"].read().decode()
    no_raw(body)
    inserted, removed = (json.loads(x) for x in body.splitlines())
    assert removed == {"customer_id": inserted["customer_id"], "_op": "REMOVE", "_seq": "112"}
    reader.store.grant("reader", "test")
    with pytest.raises(ErasedTokenError):
        reader.detokenize([inserted["email"]], principal="reader")
    assert reader.detokenize([inserted["ssn"]], principal="reader") == ["913-16-5146"]


def test_an_ingest_principal_without_a_tokenize_grant_is_refused(
        service: VaultTokenService, sink: Collect) -> None:
    """Tokenize is an oracle: the ingest function is a principal the vault must allow."""
    handler = ChangeStreamHandler(service, CUSTOMERS, sink, principal="unlisted-fn")
    with pytest.raises(PermissionDeniedError):
        handler.kinesis(ev.kinesis([ROWS[0]]))
    assert sink.batches == []


def test_an_invalid_value_in_the_removed_image_does_not_stop_the_erasure(
        service: VaultTokenService, sink: Collect, caplog: pytest.LogCaptureFixture) -> None:
    """A value tokenize refuses cannot be in the vault: the rest is erased, the stream goes
    on, and the log names the column and kind, not the value."""
    handler = eraser(service, sink)
    handler.dynamodb(ev.dynamodb([("INSERT", ROWS[0], None)]))
    with caplog.at_level(logging.INFO):
        out = handler.dynamodb(ev.dynamodb([("REMOVE", None, {**ROWS[0], "ssn": "12-34"})],
                                           first_seq=200))
    assert out == {"batchItemFailures": []}
    service.store.grant("reader", "test")
    with pytest.raises(ErasedTokenError):
        service.detokenize([sink.records[0]["email"]], principal="reader")
    assert "column 'ssn', kind 'ssn'" in caplog.text and "12-34" not in caplog.text
