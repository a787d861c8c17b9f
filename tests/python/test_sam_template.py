"""udfs/template.yaml: valid under cfn-lint, and least privilege where it matters."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cfnlint.decode as cfnlint_decode
import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "udfs" / "template.yaml"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    doc, matches = cfnlint_decode.decode(str(TEMPLATE))
    assert not matches, matches
    return dict(doc)


def resources(template: dict[str, Any], kind: str) -> dict[str, Any]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statement a role can hold; a conditional one (Fn::If) counts as present."""
    out = []
    for p in role["Properties"]["Policies"]:
        for s in p["PolicyDocument"]["Statement"]:
            if "Fn::If" in s:
                _cond, s, absent = s["Fn::If"]
                assert absent == {"Ref": "AWS::NoValue"}
            out.append(s)
    return out


def as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else [x]


@pytest.mark.slow  # cfn-lint loads its whole resource-spec database
def test_cfn_lint_passes() -> None:
    exe = Path(sys.executable).with_name("cfn-lint")
    cmd = [str(exe)] if exe.exists() else [shutil.which("cfn-lint") or "cfn-lint"]
    run = subprocess.run([*cmd, str(TEMPLATE)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_functions_run_our_handlers_on_python_312(template: dict[str, Any]) -> None:
    functions = resources(template, "AWS::Serverless::Function")
    assert template["Globals"]["Function"]["Runtime"] == "python3.12"
    handlers = {f["Properties"]["Handler"] for f in functions.values()}
    assert handlers == {"deid.lambda_handler.tokenize_handler",
                        "deid.lambda_handler.detokenize_handler",
                        "deid.ingest.stream.kinesis_handler",
                        "deid.ingest.stream.dynamodb_handler"}
    for handler in handlers:
        module, _, name = handler.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))
    code_dir = TEMPLATE.parent / template["Globals"]["Function"]["CodeUri"]
    assert (code_dir / "deid" / "lambda_handler.py").exists()
    assert (code_dir / "requirements.txt").exists()


def test_tokenize_is_sized_for_a_5_mb_batch(template: dict[str, Any]) -> None:
    props = template["Resources"]["TokenizeFunction"]["Properties"]
    assert props["MemorySize"] >= 1769  # one full vCPU
    assert 60 <= props["Timeout"] <= 900


def test_vault_url_names_the_stack_table_and_key(template: dict[str, Any]) -> None:
    url = template["Globals"]["Function"]["Environment"]["Variables"]["DEID_VAULT"]["Fn::Sub"]
    assert url.startswith("dynamodb://${VaultTable}?")
    assert "kms_key=${VaultKey.Arn}" in url
    table = template["Resources"]["VaultTable"]["Properties"]
    assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    assert table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert template["Resources"]["VaultTable"]["DeletionPolicy"] == "Retain"


def test_redshift_role_may_only_invoke_the_two_functions(template: dict[str, Any]) -> None:
    role = template["Resources"]["RedshiftInvokeRole"]
    trust = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert {s for t in trust for s in as_list(t["Principal"]["Service"])} <= {
        "redshift.amazonaws.com", "redshift-serverless.amazonaws.com"}
    [stmt] = statements(role)
    assert stmt["Effect"] == "Allow" and as_list(stmt["Action"]) == ["lambda:InvokeFunction"]
    assert sorted(r["Fn::GetAtt"][0] for r in stmt["Resource"]) == [
        "DetokenizeFunction", "TokenizeFunction"]


def _kms_grants(role: dict[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for s in statements(role):
        for action in as_list(s["Action"]):
            if action.startswith("kms:"):
                assert s["Resource"] == {"Fn::GetAtt": ["VaultKey", "Arn"]}
                purposes = s["Condition"]["StringEquals"]["kms:EncryptionContext:deid:purpose"]
                out |= {(action, p) for p in as_list(purposes)}
    return out


def test_tokenize_role_cannot_decrypt_values(template: dict[str, Any]) -> None:
    """The KMS operations dynamodb_store uses per function (pinned in test_dynamodb_store)
    are exactly what each role may do, each bound to an encryption-context purpose."""
    assert _kms_grants(template["Resources"]["TokenizeRole"]) == {
        ("kms:Decrypt", "fingerprint"), ("kms:GenerateDataKey", "fingerprint"),
        ("kms:GenerateDataKey", "values"),
        # tokenize calls are audited in the same chain (counts, never values)
        ("kms:Decrypt", "audit"), ("kms:GenerateDataKey", "audit")}
    assert _kms_grants(template["Resources"]["DetokenizeRole"]) == {
        ("kms:Decrypt", "values"), ("kms:Decrypt", "audit"), ("kms:GenerateDataKey", "audit")}


def test_no_wildcard_permissions_in_function_roles(template: dict[str, Any]) -> None:
    for name in ("TokenizeRole", "DetokenizeRole", "RedshiftInvokeRole", "IngestRole"):
        for s in statements(template["Resources"][name]):
            assert "*" not in as_list(s["Resource"]), name
            assert not any(a.endswith("*") for a in as_list(s["Action"])), name


def test_detokenize_role_writes_only_audit_items(template: dict[str, Any]) -> None:
    writes = [s for s in statements(template["Resources"]["DetokenizeRole"])
              if "dynamodb:PutItem" in as_list(s["Action"])]
    [stmt] = writes
    keys = stmt["Condition"]["ForAllValues:StringLike"]["dynamodb:LeadingKeys"]
    assert sorted(keys) == ["audit#*", "meta#audit_key"]


def test_ingest_role_mints_tokens_but_cannot_decrypt_values(template: dict[str, Any]) -> None:
    """Ingest has deid.tokenize's KMS grants, no more: erasing on REMOVE needs no key."""
    assert _kms_grants(template["Resources"]["IngestRole"]) == _kms_grants(
        template["Resources"]["TokenizeRole"])
    assert ("kms:Decrypt", "values") not in _kms_grants(template["Resources"]["IngestRole"])
    by_sid = {s["Sid"]: s for s in statements(template["Resources"]["IngestRole"])}
    assert by_sid["WriteTokenizedRecords"]["Action"] == "s3:PutObject"
    assert by_sid["WriteTokenizedRecords"]["Resource"] == {
        "Fn::Sub": "${IngestBucket.Arn}/tokenized/*"}
    assert by_sid["ReadTheKinesisStream"]["Resource"] == {"Ref": "IngestKinesisStreamArn"}
    assert by_sid["ReadTheDynamoDBStream"]["Resource"] == {"Ref": "IngestDynamoDBStreamArn"}
    erase_keys = by_sid["EraseOnRemove"]["Condition"]["ForAllValues:StringLike"][
        "dynamodb:LeadingKeys"]
    assert not any(k.startswith(("principal#", "key#", "meta#fingerprint")) for k in erase_keys)


def test_ingest_resources_exist_only_when_asked_for(template: dict[str, Any]) -> None:
    ingest = {k: v for k, v in template["Resources"].items() if k.startswith("Ingest")}
    assert len(ingest) == 6
    assert all(v.get("Condition", "").startswith("Ingest") for v in ingest.values())
    assert template["Parameters"]["IngestSource"]["Default"] == ""


def test_stream_mappings_report_failed_records_and_keep_failed_batches(
        template: dict[str, Any]) -> None:
    for name in ("IngestKinesisFunction", "IngestDynamoDBFunction"):
        fn = template["Resources"][name]["Properties"]
        [event] = fn["Events"].values()
        props = event["Properties"]
        assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert props["MaximumRetryAttempts"] >= 1  # never the infinite default
        assert props["DestinationConfig"]["OnFailure"]["Destination"] == {
            "Fn::GetAtt": ["IngestFailureQueue", "Arn"]}
        assert fn["Environment"]["Variables"]["DEID_INGEST_OUTPUT"] == {
            "Fn::Sub": "s3://${IngestBucket}/tokenized"}
