"""The Redshift Lambda UDF handlers, driven with payloads shaped like AWS's documented examples."""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from deid import kinds
from deid import lambda_handler as lh
from deid.lambda_handler import LAMBDA_PAYLOAD_LIMIT, HandlerConfig, RedshiftUDF
from deid.service import VaultTokenService
from deid.stores.sqlite import SQLiteStore

PAYLOADS = Path(__file__).parent / "payloads"


def payload(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((PAYLOADS / name).read_text())
    return doc


class CountingStore(SQLiteStore):
    """Counts vault round trips per batch."""

    calls: dict[str, int]

    def __init__(self, path: Path) -> None:
        super().__init__(path, create=True)
        self.calls = {"find_tokens": 0, "insert_tokens": 0, "fetch_values": 0}

    def find_tokens(self, domain: str, fingerprints: Any) -> dict[bytes, str]:
        self.calls["find_tokens"] += 1
        return super().find_tokens(domain, fingerprints)

    def insert_tokens(self, records: Any, **kw: Any) -> dict[bytes, str]:
        self.calls["insert_tokens"] += 1
        return super().insert_tokens(records, **kw)

    def fetch_values(self, tokens: Any) -> Any:
        self.calls["fetch_values"] += 1
        return super().fetch_values(tokens)


# The Lambda serves the database the documented payloads come from.
SERVES_DEV = HandlerConfig(databases=frozenset({"dev"}))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CountingStore:
    monkeypatch.delenv("DEID_KEYS", raising=False)
    s = CountingStore(tmp_path / "vault.db")
    s.grant_tokenize("dbt_transformer", "*", "tokenize", "test")  # the payload's user
    return s


@pytest.fixture
def udf(store: CountingStore) -> RedshiftUDF:
    # No caches: every batch must reach the vault, as in a cold container.
    return RedshiftUDF(VaultTokenService(store, cache_size=0, detokenize_cache_size=0),
                       SERVES_DEV)


def ok(response: str) -> list[Any]:
    assert isinstance(response, str), "Redshift's Python examples return json.dumps(...)"
    doc = json.loads(response)
    assert doc["success"] is True, doc.get("error_msg")
    assert set(doc) == {"success", "num_records", "results"}
    assert doc["num_records"] == len(doc["results"])
    results: list[Any] = doc["results"]
    return results


def failed(response: str) -> str:
    doc = json.loads(response)
    assert doc["success"] is False
    assert set(doc) == {"success", "error_msg"}, "a failure carries no results"
    message: str = doc["error_msg"]
    return message


# -- tokenize -------------------------------------------------------------------------------


def test_tokenize_documented_shape(udf: RedshiftUDF, store: CountingStore) -> None:
    """Null rows and null values give NULL, duplicates and spellings of one email converge,
    unicode is fine, and the batch costs one lookup and one insert in the vault."""
    event = payload("tokenize_request.json")
    results = ok(udf.tokenize(event))
    assert len(results) == event["num_records"] == 7
    assert results[1] is None and results[2] is None
    assert results[0] == results[3] == results[5]
    assert kinds.is_token(results[0], "email") and kinds.is_token(results[4], "email")
    assert results[4] != results[0]
    assert kinds.is_token(results[6], "phone")
    # one round trip per kind present in the batch (email, phone)
    assert store.calls == {"find_tokens": 2, "insert_tokens": 2, "fetch_values": 0}


def test_tokenize_is_idempotent_when_redshift_retries_a_batch(udf: RedshiftUDF) -> None:
    event = payload("tokenize_request.json")
    assert ok(udf.tokenize(event)) == ok(udf.tokenize(copy.deepcopy(event)))


def test_tokenize_deduplicates_before_the_vault(udf: RedshiftUDF, store: CountingStore) -> None:
    rows = [[f"user{i % 5}@example.com", "email"] for i in range(1000)]
    event = {**payload("tokenize_request.json"), "num_records": 1000, "arguments": rows}
    seen: list[int] = []
    original = store.insert_tokens

    def spy(records: Any, **kw: Any) -> Any:
        seen.append(len(records))
        return original(records, **kw)

    store.insert_tokens = spy  # type: ignore[method-assign]
    results = ok(udf.tokenize(event))
    assert seen == [5] and len(set(results)) == 5
    assert results[0] == results[5] == results[995]


def test_an_invalid_value_fails_the_whole_batch_naming_its_row_not_its_value(
        udf: RedshiftUDF) -> None:
    rows = [["ok@example.com", "email"]] * 3 + [["not-an-email-4711", "email"]]
    event = {**payload("tokenize_request.json"), "num_records": 4, "arguments": rows}
    message = failed(udf.tokenize(event))
    assert "row 4" in message and "email" in message
    assert "4711" not in message and "not-an-email" not in message


@pytest.mark.parametrize("case", list(json.loads(
    (PAYLOADS / "malformed_requests.json").read_text())))
def test_malformed_events_fail_closed(udf: RedshiftUDF, case: str) -> None:
    event = json.loads((PAYLOADS / "malformed_requests.json").read_text())[case]
    message = failed(udf.tokenize(event))
    assert message.startswith("deid.tokenize")
    assert "a@b.co" not in message and "12345" not in message


def test_wrong_function_name_is_refused(udf: RedshiftUDF) -> None:
    event = {**payload("tokenize_request.json"), "external_function": "public.tokenize_copy"}
    assert "this Lambda serves deid.tokenize" in failed(udf.tokenize(event))
    # and the tokenize Lambda does not answer as detokenize, nor the reverse
    assert "serves deid.detokenize" in failed(udf.detokenize(payload("tokenize_request.json")))


def test_a_vault_failure_fails_the_batch_without_values(udf: RedshiftUDF) -> None:
    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("disk I/O error near 'ana.garcia@example.com'")

    udf.service.store.find_tokens = broken  # type: ignore[attr-defined]
    message = failed(udf.tokenize(payload("tokenize_request.json")))
    assert "RuntimeError" in message and "ana.garcia" not in message


def test_maximal_batch_stays_under_the_lambda_limit(udf: RedshiftUDF) -> None:
    """About 5 MB of arguments, 100,000 rows, 10 % distinct: the response fits in 6 MB."""
    rows = [[f"customer.{i % 10_000:05d}.{'x' * 10}@example.com", "email"]
            for i in range(100_000)]
    event = {**payload("tokenize_request.json"), "num_records": len(rows), "arguments": rows}
    assert 4_500_000 < len(json.dumps(event)) <= 5 * 1024 * 1024
    started = time.process_time()
    response = udf.tokenize(event)
    cpu = time.process_time() - started
    results = ok(response)
    assert len(results) == 100_000 and len(set(results)) == 10_000
    assert results[0] == results[10_000] == results[90_000]
    assert len(json.dumps(response)) < LAMBDA_PAYLOAD_LIMIT
    assert cpu < 30, f"{cpu:.1f}s of CPU for one batch"  # a sanity bound; bench/ measures


def test_a_response_over_the_limit_is_an_error_not_a_truncation(store: CountingStore) -> None:
    udf = RedshiftUDF(VaultTokenService(store),
                      HandlerConfig(databases=frozenset({"dev"}), payload_limit=200))
    rows = [[f"u{i}@example.com", "email"] for i in range(10)]
    event = {**payload("tokenize_request.json"), "num_records": 10, "arguments": rows}
    assert "MAX_BATCH_ROWS" in failed(udf.tokenize(event))


# -- detokenize -----------------------------------------------------------------------------


def _tokens(udf: RedshiftUDF, values: list[str], kind: str = "email") -> list[str]:
    event = {**payload("tokenize_request.json"), "num_records": len(values),
             "arguments": [[v, kind] for v in values]}
    return ok(udf.tokenize(event))


def _detokenize_event(tokens: list[Any]) -> dict[str, Any]:
    return {**payload("detokenize_request.json"), "num_records": len(tokens),
            "arguments": [None if t is None else [t] for t in tokens]}


def test_detokenize_documented_shape(udf: RedshiftUDF, store: CountingStore) -> None:
    token = _tokens(udf, ["zoë.ünïcødé@例え.jp"])[0]
    store.grant("pii_reader", "test")
    event = payload("detokenize_request.json")
    event["arguments"] = [[token] if row and row[0] == "TOKEN_0" else row
                          for row in event["arguments"]]
    response = udf.detokenize(event)
    assert ok(response) == ["zoë.ünïcødé@例え.jp", None, None, "zoë.ünïcødé@例え.jp"]
    assert store.calls["fetch_values"] == 1
    audit = [a for a in store.audit_records() if a["action"] == "detokenize"]
    assert [(a["principal"], a["outcome"], a["query_id"], a["count"], a["kinds"])
            for a in audit] == [("pii_reader", "allowed", "5678299", 2, {"email": 2})]
    assert audit[0]["host"].startswith("redshift:arn:aws:redshift:")


def test_unauthorized_user_is_denied_and_audited(udf: RedshiftUDF,
                                                 store: CountingStore) -> None:
    """Redshift grants can be bypassed (superusers, a new external function on the same
    role): the vault's own policy on the payload's user still refuses."""
    tokens = _tokens(udf, ["ana@example.com"])
    event = {**_detokenize_event(tokens), "user": "superuser_adhoc", "query_id": 991}
    message = failed(udf.detokenize(event))
    assert "permission denied" in message and "ana@" not in message
    assert tokens[0] not in message
    [record] = [a for a in store.audit_records() if a["action"] == "detokenize"]
    assert (record["principal"], record["outcome"], record["query_id"]) == (
        "superuser_adhoc", "denied", "991")


def test_forged_token_fails_the_batch(udf: RedshiftUDF, store: CountingStore) -> None:
    real = _tokens(udf, ["ana@example.com"])[0]
    forged = "a" * 24 + "@deid.invalid"
    store.grant("pii_reader", "test")
    message = failed(udf.detokenize(_detokenize_event([real, forged])))
    assert "row 2" in message and forged not in message and "ana@" not in message


def test_non_token_input_fails_the_batch(udf: RedshiftUDF, store: CountingStore) -> None:
    store.grant("pii_reader", "test")
    message = failed(udf.detokenize(_detokenize_event([None, "ana@example.com"])))
    assert "row 2" in message and "ana@" not in message


def test_all_null_batch_reveals_nothing_and_needs_no_policy(udf: RedshiftUDF,
                                                           store: CountingStore) -> None:
    assert ok(udf.detokenize(_detokenize_event([None, None]))) == [None, None]
    assert list(store.audit_records()) == []


# -- module-level entry points --------------------------------------------------------------


def test_entry_points_build_the_service_once_from_env(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEID_KEYS", raising=False)
    monkeypatch.setenv("DEID_VAULT", f"sqlite:///{tmp_path}/env-vault.db")
    monkeypatch.setenv("DEID_DATABASES", "dev, analytics")
    SQLiteStore(tmp_path / "env-vault.db", create=True).grant_tokenize(
        "dbt_transformer", "*", "tokenize", "test")
    lh.reset()
    try:
        first = ok(lh.tokenize_handler(payload("tokenize_request.json"), None))
        udf = lh._get_udf()
        assert ok(lh.tokenize_handler(payload("tokenize_request.json"), None)) == first
        assert lh._get_udf() is udf, "one service per container"
        assert (tmp_path / "env-vault.db").exists()
    finally:
        lh.reset()


def test_a_bad_vault_configuration_fails_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_VAULT", "nosuch://vault")
    lh.reset()
    try:
        message = failed(lh.detokenize_handler(payload("detokenize_request.json"), None))
        assert "unknown vault scheme" in message
    finally:
        lh.reset()


def test_function_names_come_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEID_TOKENIZE_FUNCTION", "pii.tokenize, PII.Tokenize2")
    config = HandlerConfig.from_env()
    assert config.tokenize_functions == {"pii.tokenize", "pii.tokenize2"}
    assert config.detokenize_functions == {"deid.detokenize"}


def test_no_argument_value_reaches_a_log_line(udf: RedshiftUDF, store: CountingStore,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sentinel.value.9931@example.com"
    tokens = _tokens(udf, [secret])
    store.grant("pii_reader", "test")
    ok(udf.detokenize(_detokenize_event(tokens)))
    failed(udf.detokenize({**_detokenize_event(tokens), "user": "nobody"}))
    failed(udf.tokenize({**payload("tokenize_request.json"), "num_records": 1,
                         "arguments": [["sentinel-not-an-email", "email"]]}))
    assert caplog.records, "the handlers log counts and timings"
    assert "sentinel" not in caplog.text and tokens[0] not in caplog.text


# -- the tokenize policy (attacks) -----------------------------------------------------------


def test_attack_an_ungranted_user_in_another_database_cannot_tokenize(
        udf: RedshiftUDF, store: CountingStore) -> None:
    """Attack: any user of any database whose query reaches the Lambda used it as a guess
    checker, and its wrong guesses were minted into the vault."""
    event = {**payload("tokenize_request.json"), "user": "analyst", "database": "scratch_db"}
    message = failed(udf.tokenize(event))
    assert "analyst" in message and "ana.garcia" not in message
    assert store.stats()["tokens"] == {}, "no token minted for a refused request"


@pytest.mark.parametrize("user, database, needle", [
    ("analyst", "dev", "not in the vault's tokenize policy"),   # the database is served
    ("dbt_transformer", "scratch_db", "does not serve"),         # the user is granted
])
def test_tokenize_needs_a_granted_user_and_a_served_database(
        udf: RedshiftUDF, store: CountingStore, user: str, database: str, needle: str) -> None:
    event = {**payload("tokenize_request.json"), "user": user, "database": database}
    message = failed(udf.tokenize(event))
    assert needle in message
    assert store.stats()["tokens"] == {}
    assert ok(udf.tokenize(payload("tokenize_request.json")))[0] is not None


def test_tokenize_is_audited_per_invocation_in_aggregate(udf: RedshiftUDF,
                                                         store: CountingStore) -> None:
    """One record per kind and invocation: who, which database and query, how many values
    were new and how many existed; never a value or a token."""
    event = payload("tokenize_request.json")
    first = ok(udf.tokenize(event))
    ok(udf.tokenize({**event, "query_id": 5678235}))
    records = [r for r in store.audit_records() if r["action"] == "tokenize"]
    assert [(r["query_id"], r["domain"], r["new"], r["existing"]) for r in records] == [
        ("5678234", "email", 3, 0), ("5678234", "phone", 1, 0),
        ("5678235", "email", 0, 3), ("5678235", "phone", 0, 1)]
    assert {r["principal"] for r in records} == {"dbt_transformer"}
    assert all(r["host"].endswith("/dev") for r in records)
    text = json.dumps(records)
    assert "ana.garcia" not in text and not any(t and t in text for t in first)


def test_an_empty_database_list_serves_nothing(store: CountingStore) -> None:
    udf = RedshiftUDF(VaultTokenService(store))
    assert "does not serve" in failed(udf.tokenize(payload("tokenize_request.json")))
    assert "does not serve" in failed(udf.detokenize(payload("detokenize_request.json")))
