"""The Skyflow backend (`deid.skyflow`) against a local server with Skyflow's API shapes."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

import jwt
import pytest

from deid import skyflow
from deid.errors import (
    ConfigError,
    InvalidValueError,
    PermissionDeniedError,
    UnknownTokenError,
    VaultUnavailableError,
)
from deid.service import VaultTokenService
from deid.skyflow import settings as _sf_settings
from deid.stores.sqlite import SQLiteStore
from deid.vault import VaultConfig, open_service
from fake_skyflow import VAULT_ID, FakeSkyflow

EMAILS = [f"patient{i}@example.com" for i in range(10)]


@pytest.fixture
def fake():
    server = FakeSkyflow().start()
    yield server
    server.stop()


@pytest.fixture
def creds(fake, tmp_path) -> Path:
    return fake.write_credentials(tmp_path / "credentials.json")


@pytest.fixture
def make(fake, creds, tmp_path):
    """Build a service from URL parameters; closes every service it made."""
    made = []

    def build(clock=time.time, **params):
        params.setdefault("credentials", str(creds))
        params.setdefault("policy", "skyflow")
        params.setdefault("backoff", "0")
        settings = skyflow.parse_url(fake.vault_url(**{k: str(v) for k, v in params.items()}))
        svc = skyflow.SkyflowTokenService(settings, clock=clock)
        made.append(svc)
        return svc

    yield build
    for svc in made:
        svc.close()


# -- URL and configuration ------------------------------------------------------------------


def test_url_grammar_builds_the_vault_url_and_defaults(creds):
    s = skyflow.parse_url(f"skyflow://ab12cd.vault.skyflowapis.com/{VAULT_ID}"
                          f"?credentials={creds}&policy=sqlite:///.deid/policy.db")
    assert s.vault_url == f"https://ab12cd.vault.skyflowapis.com/v1/vaults/{VAULT_ID}"
    assert s.policy == "sqlite:///.deid/policy.db"
    assert (s.batch_size, s.detokenize_batch_size, s.concurrency) == (25, 25, 4)
    assert s.mapping["email"] == skyflow.Target("persons", "email")
    assert s.mapping["card"] == skyflow.Target("credit_cards", "card_number")


@pytest.mark.parametrize("url, needle", [
    ("skyflow://h.vault.skyflowapis.com/v?policy=skyflow", "credentials="),
    ("skyflow://h.vault.skyflowapis.com/?credentials=c", "vault ID"),
    ("skyflow://10.0.0.5:80/v?credentials=c&scheme=http", "only for a test server"),
    ("skyflow://h.vault.skyflowapis.com/v?credentials=c&batch_size=0", "batch_size"),
    ("skyflow://h.vault.skyflowapis.com/v?credentials=c&bogus=1", "bogus"),
    ("skyflow://h.vault.skyflowapis.com/v?credentials=c&ctx=everything", "ctx"),
    ("skyflow://h.vault.skyflowapis.com/v?credentials=c&mode=lookup", "column_group"),
])
def test_bad_urls_fail_with_an_actionable_config_error(url, needle):
    with pytest.raises(ConfigError, match=needle):
        skyflow.parse_url(url)


def test_vault_open_service_dispatches_the_skyflow_scheme(fake, creds):
    svc = open_service(VaultConfig(url=fake.vault_url(credentials=str(creds), policy="skyflow")))
    try:
        assert isinstance(svc, skyflow.SkyflowTokenService)
        assert svc.tokenize("email", ["a@example.com"])[0]
    finally:
        svc.close()


def test_mapping_file_adds_a_domain_and_an_unmapped_domain_fails(make, tmp_path, fake):
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"email:marketing": "persons.email_marketing"}))
    svc = make(mapping=mapping)
    a = svc.tokenize("email", ["x@example.com"])[0]
    b = svc.tokenize("email:marketing", ["x@example.com"])[0]
    assert a != b, "a separate domain must give an unlinkable token"
    assert fake.token_for("persons", "email_marketing", "x@example.com") == b
    with pytest.raises(ConfigError, match="email:billing"):
        svc.tokenize("email:billing", ["x@example.com"])


def test_yaml_mapping_with_column_groups_is_read(tmp_path):
    path = tmp_path / "m.yml"
    path.write_text("phone:\n  table: contacts\n  column: mobile\n  column_group: mobile_g\n")
    m = skyflow.load_mapping(str(path))
    assert m["phone"] == skyflow.Target("contacts", "mobile", "mobile_g")
    assert m["email"] == skyflow.Target("persons", "email")  # defaults stay


def test_mapping_rejects_names_that_would_change_the_request_path(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"email": {"table": "persons/../x", "column": "email"}}))
    with pytest.raises(ConfigError, match="table"):
        skyflow.load_mapping(str(path))


# -- auth -------------------------------------------------------------------------------------


def test_jwt_assertion_has_the_documented_claims_and_is_exchanged_once(make, fake):
    svc = make()
    svc.tokenize("email", EMAILS[:3])
    svc.tokenize("phone", ["555-201-0000"])
    assert len(fake.exchanges) == 1, "the bearer token must be cached, not fetched per call"
    claims = fake.exchanges[0]
    sa = next(iter(fake.accounts.values()))
    assert claims["iss"] == claims["sub"] == sa.client_id
    assert claims["key"] == sa.key_id
    assert claims["aud"] == fake.url + "/v1/auth/sa/oauth/token"
    assert 3000 < claims["exp"] - time.time() <= 3600
    assert "ctx" not in claims, "tokenize carries no warehouse user"


def test_bearer_token_is_refreshed_before_it_expires(make, fake):
    now = [time.time()]
    fake.clock = lambda: now[0]  # the vault issues tokens by the same clock
    svc = make(clock=lambda: now[0], refresh_margin=300)
    svc.tokenize("email", EMAILS[:1])
    now[0] += 3600 - 299  # inside the refresh margin of the 1 h token
    svc.tokenize("email", EMAILS[1:2])
    assert len(fake.exchanges) == 2
    now[0] += 10
    svc.tokenize("email", EMAILS[2:3])
    assert len(fake.exchanges) == 2, "the fresh token is reused"


def test_a_revoked_bearer_token_is_replaced_once_then_the_call_succeeds(make, fake):
    svc = make()
    svc.tokenize("email", EMAILS[:1])
    fake.revoke_tokens()
    assert svc.tokenize("email", EMAILS[1:2])[0]
    assert len(fake.exchanges) == 2
    statuses = [e.status for e in fake.requests("insert")]
    assert statuses == [200, 401, 200]


def test_a_refused_service_account_key_fails_with_the_status(make, fake, tmp_path):
    other = FakeSkyflow()  # a key the server never registered
    sa = other.add_service_account()
    doc = json.loads(fake.credentials_json(sa))
    path = tmp_path / "stranger.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    svc = make(credentials=path)
    with pytest.raises(VaultUnavailableError, match="token exchange failed: HTTP 401") as e:
        svc.tokenize("email", ["a@example.com"])
    assert "a@example.com" not in str(e.value)


def test_detokenize_ctx_carries_the_warehouse_user_and_query(make, fake):
    svc = make(ctx="user+query")
    tokens = svc.tokenize("email", EMAILS[:2])
    svc.detokenize(tokens, principal="analyst_a", query_id="q-17")
    svc.detokenize(tokens, principal="analyst_b", query_id="q-18")
    logged = fake.requests("detokenize")
    assert [e.ctx for e in logged] == [{"user": "analyst_a", "query_id": "q-17"},
                                      {"user": "analyst_b", "query_id": "q-18"}]
    assert [x.get("ctx") for x in fake.exchanges] == [None, logged[0].ctx, logged[1].ctx]


def test_roles_scope_tokens_to_least_privilege(fake, tmp_path, make):
    sa = fake.add_service_account(roles={"r_tok": {"insert", "tokenize"},
                                         "r_detok": {"detokenize"}})
    path = tmp_path / "roles.json"
    path.write_text(fake.credentials_json(sa))
    path.chmod(0o600)
    svc = make(credentials=path, tokenize_role="r_tok", detokenize_role="r_detok")
    tokens = svc.tokenize("email", EMAILS[:2])
    assert svc.detokenize(tokens, principal="p") == EMAILS[:2]
    assert fake.requests("insert")[0].scope == "role:r_tok"
    assert fake.requests("detokenize")[0].scope == "role:r_detok"
    # A service built with only the tokenize role cannot re-identify.
    wrong = make(credentials=path, tokenize_role="r_tok", detokenize_role="r_tok")
    with pytest.raises(PermissionDeniedError, match="HTTP 403"):
        wrong.detokenize(tokens, principal="p")


def test_credentials_from_aws_secrets_manager(fake, monkeypatch):
    import boto3
    import moto  # a dev dependency; imported here because only this test uses it

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    sa = fake.add_service_account()
    with moto.mock_aws():
        arn = boto3.client("secretsmanager", region_name="us-east-1").create_secret(
            Name="deid/skyflow", SecretString=fake.credentials_json(sa))["ARN"]
        creds = skyflow.load_credentials(f"secretsmanager:{arn}")
    assert creds.client_id == sa.client_id and creds.key_id == sa.key_id
    assert sa.private_pem not in repr(creds)


def test_a_credentials_file_others_can_read_is_refused(fake, creds):
    creds.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        skyflow.load_credentials(str(creds))


def test_credentials_file_errors_name_the_file_not_its_content(tmp_path):
    bad = tmp_path / "c.json"
    bad.touch(mode=0o600)
    bad.write_text('{"clientID": "x", "privateKey": "-----BEGIN PRIVATE KEY-----secret"}')
    with pytest.raises(ConfigError, match="clientID, keyID, tokenURI") as e:
        skyflow.load_credentials(str(bad))
    assert "secret" not in str(e.value)
    plain = tmp_path / "p.json"
    plain.touch(mode=0o600)
    plain.write_text(json.dumps({"clientID": "a", "keyID": "b", "privateKey": "k",
                                 "tokenURI": "http://manage.skyflowapis.com/v1/auth"}))
    with pytest.raises(ConfigError, match="https"):
        skyflow.load_credentials(str(plain))


# -- tokenize -------------------------------------------------------------------------------


def test_tokenize_batches_keeps_order_nulls_and_duplicates(make, fake):
    svc = make(batch_size=3)
    values = [EMAILS[0], None, EMAILS[1], EMAILS[0], *EMAILS[2:], None, " PATIENT1@Example.com"]
    out = svc.tokenize("email", values)
    assert len(out) == len(values)
    assert out[1] is None and out[-2] is None, "NULL in, NULL out"
    assert out[0] == out[3], "a repeated value gets one token"
    assert out[-1] == out[2], "spellings of one address converge (deid normalization)"
    assert len(set(filter(None, out))) == 10
    inserts = fake.requests("insert")
    assert len(inserts) == math.ceil(10 / 3)
    sent = [r["fields"]["email"] for e in inserts for r in e.body["records"]]
    assert sorted(sent) == sorted(EMAILS), "each distinct value sent once, NULLs never"
    for e in inserts:
        assert e.body["tokenization"] is True and e.body["upsert"] == "email"
    for v, t in zip(values, out, strict=True):
        if v is not None:
            assert fake.token_for("persons", "email", v.strip().lower()) == t


def test_upsert_is_idempotent_across_runs(make, fake):
    first = make().tokenize("email", EMAILS)
    second = make().tokenize("email", EMAILS)  # a new process: no local cache
    assert first == second
    assert fake.record_count("persons") == len(EMAILS), "a re-run adds no record"


def test_a_retried_batch_whose_reply_was_lost_creates_no_duplicate(make, fake):
    fake.inject("insert", status=503, apply_first=True)
    out = make(retries=2).tokenize("email", EMAILS[:5])
    assert fake.record_count("persons") == 5
    assert out == [fake.token_for("persons", "email", v) for v in EMAILS[:5]]
    assert [e.status for e in fake.requests("insert")] == [503, 200]


def test_the_local_cache_skips_the_vault_for_values_seen(make, fake):
    svc = make()
    svc.tokenize("email", EMAILS)
    svc.tokenize("email", list(reversed(EMAILS)))
    assert len(fake.requests("insert")) == 1


def test_invalid_value_fails_the_batch_naming_row_and_kind_not_value(make, fake):
    with pytest.raises(InvalidValueError, match=r"kind 'email', row 2") as e:
        make().tokenize("email", ["ok@example.com", "not-an-address"], column="email")
    assert "not-an-address" not in str(e.value)
    assert fake.requests("insert") == [], "nothing is sent when a row is invalid"


def test_lookup_mode_uses_tokenize_for_values_already_in_the_vault(make, fake, tmp_path):
    make().tokenize("email", EMAILS[:3])
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"email": {"table": "persons", "column": "email",
                                             "column_group": "email_group"}}))
    svc = make(mode="lookup", mapping=mapping)
    out = svc.tokenize("email", EMAILS[:3])
    assert out == [fake.token_for("persons", "email", v) for v in EMAILS[:3]]
    body = fake.requests("tokenize")[0].body
    assert body["tokenizationParameters"][0] == {"value": EMAILS[0],
                                                 "columnGroup": "email_group"}
    with pytest.raises(VaultUnavailableError, match="HTTP 404") as e:
        svc.tokenize("email", ["new@example.com"])
    assert "new@example.com" not in str(e.value)
    assert fake.record_count("persons") == 3, "lookup mode never inserts"


# -- detokenize -----------------------------------------------------------------------------


def test_detokenize_round_trip_batches_and_order(make, fake):
    svc = make(detokenize_batch_size=4)
    tokens = svc.tokenize("email", EMAILS)
    asked = [tokens[3], None, *tokens, tokens[0]]
    out = svc.detokenize(asked, principal="analyst")
    assert out == [EMAILS[3], None, *EMAILS, EMAILS[0]]
    calls = fake.requests("detokenize")
    assert len(calls) == math.ceil(10 / 4), "distinct tokens only, in batches"
    for c in calls:
        assert c.body["continueOnError"] is False
        assert {p["redaction"] for p in c.body["detokenizationParameters"]} == {"PLAIN_TEXT"}


def test_unknown_token_fails_the_whole_batch(make):
    svc = make()
    tokens = svc.tokenize("email", EMAILS[:2])
    forged = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(UnknownTokenError, match="HTTP 404") as e:
        svc.detokenize([tokens[0], forged, tokens[1]], principal="p")
    assert forged not in str(e.value) and EMAILS[0] not in str(e.value)


def test_detokenize_never_sends_malformed_input(make, fake):
    with pytest.raises(UnknownTokenError, match="row 2"):
        make().detokenize(["abc", "bad\x00token"], principal="p")
    assert fake.requests("detokenize") == []


def test_only_nulls_need_no_request(make, fake):
    assert make().detokenize([None, None], principal="p") == [None, None]
    assert fake.requests("detokenize") == []


# -- fail closed ----------------------------------------------------------------------------


def test_429_with_retry_after_is_honoured(make, fake):
    fake.inject("insert", status=429, retry_after="1")
    start = time.monotonic()
    assert make(retries=3).tokenize("email", EMAILS[:2])[0]
    assert time.monotonic() - start >= 0.9, "Retry-After: 1 must be waited"
    assert [e.status for e in fake.requests("insert")] == [429, 200]


def test_retry_after_is_capped(make, fake):
    fake.inject("insert", status=429, retry_after="3600")
    start = time.monotonic()
    make(retries=3, max_retry_after=0.2).tokenize("email", EMAILS[:1])
    assert time.monotonic() - start < 5


def test_a_concurrent_writer_conflict_409_is_retried(make, fake):
    fake.inject("insert", status=409)
    assert make(retries=2).tokenize("email", EMAILS[:2])[0]
    assert [e.status for e in fake.requests("insert")] == [409, 200]


def test_5xx_then_success(make, fake):
    fake.inject("detokenize", status=503, times=2)
    svc = make(retries=3)
    tokens = svc.tokenize("email", EMAILS[:2])
    assert svc.detokenize(tokens, principal="p") == EMAILS[:2]
    assert [e.status for e in fake.requests("detokenize")] == [503, 503, 200]


def test_persistent_5xx_fails_after_retries_naming_kind_and_status(make, fake):
    fake.inject("insert", status=500, times=10)
    with pytest.raises(VaultUnavailableError,
                       match=r"kind 'email', column 'contact'.*HTTP 500.*after retries") as e:
        make(retries=2).tokenize("email", EMAILS[:1], column="contact")
    assert EMAILS[0] not in str(e.value)
    assert len(fake.requests("insert")) == 3


def test_timeout_fails_the_batch(make, fake):
    fake.inject("insert", delay=1.0, times=5)
    start = time.monotonic()
    with pytest.raises(VaultUnavailableError, match="timed out"):
        make(timeout=0.2, retries=1).tokenize("email", EMAILS[:1])
    assert time.monotonic() - start < 3


def test_a_redirect_is_not_followed_with_the_bearer_token(make, fake):
    fake.inject("insert", status=307, location=fake.url + "/v1/vaults/elsewhere/persons")
    with pytest.raises(VaultUnavailableError, match="HTTP 307"):
        make().tokenize("email", EMAILS[:1])
    assert [e.op for e in fake.log] == ["token", "insert"], "the redirect was not followed"


def test_a_per_record_error_with_http_200_fails_the_batch(make, fake):
    fake.inject("insert", record_error=1)
    with pytest.raises(VaultUnavailableError, match="record 2") as e:
        make().tokenize("email", EMAILS[:3])
    assert all(v not in str(e.value) for v in EMAILS[:3])

    svc = make()
    tokens = svc.tokenize("email", EMAILS[:3])
    fake.inject("detokenize", record_error=0)
    with pytest.raises(UnknownTokenError, match="record 1"):
        svc.detokenize(tokens, principal="p")


@pytest.mark.parametrize("op, fault, needle", [
    ("insert", {"raw": b"<html>gateway</html>"}, "not JSON"),
    ("insert", {"raw": b'{"records": [{"skyflow_id": "x"}]}'}, "expected 2 records"),
    ("insert", {"raw": b'{"records": [{"skyflow_id": "x"}, {"skyflow_id": "y"}]}'},
     "no tokens"),
    ("insert", {"drop_records": 1}, "expected 2 records"),
    ("detokenize", {"raw": b'{"records": "nope"}'}, "expected 2 records"),
    ("detokenize", {"raw": b'[]'}, "not a JSON object"),
])
def test_malformed_responses_fail_closed(make, fake, op, fault, needle):
    svc = make()
    tokens = svc.tokenize("email", EMAILS[:2]) if op == "detokenize" else None
    fake.inject(op, **fault)
    with pytest.raises(VaultUnavailableError, match=needle):
        if op == "insert":
            svc.tokenize("email", EMAILS[5:7])
        else:
            svc.detokenize(tokens, principal="p")


def test_a_token_equal_to_the_value_is_refused(make, fake):
    fake.inject("insert", raw=json.dumps({"records": [
        {"skyflow_id": "x", "tokens": {"email": EMAILS[0]}}]}).encode())
    with pytest.raises(VaultUnavailableError, match="value itself") as e:
        make().tokenize("email", EMAILS[:1])
    assert EMAILS[0] not in str(e.value)


def test_detokenize_answers_for_other_tokens_are_refused(make, fake):
    svc = make()
    tokens = svc.tokenize("email", EMAILS[:2])
    swapped = {"records": [{"token": tokens[1], "valueType": "STRING", "value": EMAILS[1]},
                           {"token": tokens[0], "valueType": "STRING", "value": EMAILS[0]}]}
    fake.inject("detokenize", raw=json.dumps(swapped).encode())
    with pytest.raises(VaultUnavailableError, match="different token"):
        svc.detokenize(tokens, principal="p")


def test_server_error_messages_are_never_repeated(make, fake, tmp_path):
    # The fake quotes the refused value in its error message, as real services may.
    mapping = tmp_path / "m.json"
    mapping.write_text(json.dumps({"string": "deid_strings.missing_column"}))
    with pytest.raises(VaultUnavailableError, match=r"HTTP 400 \(Bad Request, gRPC code 3") as e:
        make(mapping=mapping).tokenize("string", ["secret-diagnosis-code"])
    assert "secret-diagnosis-code" not in str(e.value)
    assert "missing_column" not in str(e.value)


def test_nothing_sensitive_reaches_the_logs(make, fake, creds, caplog):
    caplog.set_level(logging.DEBUG)
    svc = make()
    tokens = svc.tokenize("email", EMAILS[:3])
    svc.detokenize(tokens, principal="p")
    text = caplog.text
    sa = next(iter(fake.accounts.values()))
    private_body = sa.private_pem.splitlines()[1]
    assert private_body not in text
    assert all(v not in text for v in EMAILS[:3])
    assert all(t not in text for t in tokens)
    assert "Bearer" not in text and "eyJ" not in text


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_callers_share_one_token_exchange_and_converge(make, fake):
    svc = make(batch_size=4, concurrency=4)
    results: list[list[str | None]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            vals = EMAILS[i % 3 :] + EMAILS[: i % 3]
            out = svc.tokenize("email", vals)
            results.append(dict(zip(vals, out, strict=True)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == results[0] for r in results), "every caller sees the same tokens"
    assert len(fake.exchanges) == 1, "one bearer token for all threads"
    assert fake.record_count("persons") == len(EMAILS), "no duplicate records under races"


# -- deid-side policy and audit -------------------------------------------------------------


def test_policy_store_gates_and_audits_detokenize(make, tmp_path, fake):
    policy_db = tmp_path / "policy.db"
    SQLiteStore(policy_db, create=True).close()  # `deid init --vault sqlite:///…policy.db`
    svc = make(policy=f"sqlite:///{policy_db}")
    tokens = svc.tokenize("email", EMAILS[:2])
    with pytest.raises(PermissionDeniedError, match="'intruder'"):
        svc.detokenize(tokens, principal="intruder", query_id="q1")
    assert fake.requests("detokenize") == [], "a denied principal never reaches Skyflow"

    store = SQLiteStore(policy_db)
    store.grant("analyst", granted_by="admin")
    assert svc.detokenize(tokens, principal="analyst", query_id="q2", host="duckdb") == EMAILS[:2]
    records = list(store.audit_records())
    assert [(r["principal"], r["outcome"], r["count"], r["query_id"]) for r in records] == [
        ("intruder", "denied", 2, "q1"), ("analyst", "allowed", 2, "q2")]
    assert all(r["vault"].endswith(f"/v1/vaults/{VAULT_ID}") for r in records)
    assert VaultTokenService(store).verify_audit()["records"] == 2, "hash chain verifies"
    dump = policy_db.read_bytes()
    assert all(v.encode() not in dump for v in EMAILS[:2])
    assert all(t.encode() not in dump for t in tokens)


def test_detokenize_without_a_policy_setting_refuses(make, fake):
    svc = make(policy="")
    tokens = svc.tokenize("email", EMAILS[:1])
    with pytest.raises(ConfigError, match="policy="):  # a host's caller: no policy, no tokens
        svc.tokenize("email", EMAILS[1:2], principal="dbt_transformer")
    with pytest.raises(ConfigError, match="policy="):
        svc.detokenize(tokens, principal="p")
    assert fake.requests("detokenize") == []


def test_access_token_expiry_is_read_from_the_jwt():
    exp = int(time.time()) + 120
    token = jwt.encode({"exp": exp}, "k" * 32, algorithm="HS256")
    assert skyflow.TokenProvider._expiry(token, 0) == exp
    assert skyflow.TokenProvider._expiry("opaque", 100) == 100 + _sf_settings.ASSERTION_LIFETIME


# -- engines --------------------------------------------------------------------------------


def test_redshift_lambda_handlers_work_over_skyflow(make, fake, tmp_path):
    """The Lambda host needs nothing Skyflow-specific: same payloads, same answers."""
    from deid.lambda_handler import HandlerConfig, RedshiftUDF

    policy_db = tmp_path / "policy.db"
    SQLiteStore(policy_db, create=True).grant("pii_reader", granted_by="admin")
    SQLiteStore(policy_db).grant_tokenize("dbt_transformer", "*", "tokenize", "admin")
    udf = RedshiftUDF(make(policy=f"sqlite:///{policy_db}", ctx="user+query"),
                      HandlerConfig(databases=frozenset({"dev"})))
    payloads = Path(__file__).with_name("payloads")
    event = json.loads((payloads / "tokenize_request.json").read_text())
    answer = json.loads(udf.tokenize(event))
    assert answer["success"] is True and answer["num_records"] == event["num_records"]
    results = answer["results"]
    for row, token in zip(event["arguments"], results, strict=True):
        if row is None or row[0] is None:
            assert token is None
        else:
            assert token and token != row[0]
    assert results[0] == results[3] == results[5], "spellings of one address, one token"
    assert results[0] == fake.token_for("persons", "email", "ana.garcia@example.com")

    detok = {"request_id": "r2", "cluster": event["cluster"], "user": "pii_reader",
             "database": "dev", "external_function": "deid.detokenize", "query_id": 77,
             "num_records": 3, "arguments": [[results[0]], [None], [results[6]]]}
    answer = json.loads(udf.detokenize(detok))
    assert answer == {"success": True, "num_records": 3,
                      "results": ["ana.garcia@example.com", None, "+14155550100"]}
    assert fake.requests("detokenize")[-1].ctx == {"user": "pii_reader", "query_id": "77"}

    fake.inject("detokenize", status=503, times=10)
    failed = udf.detokenize({**detok, "query_id": 78})
    doc = json.loads(failed)
    assert doc["success"] is False and "HTTP 503" in doc["error_msg"]
    assert "ana.garcia" not in failed and results[0] not in failed

    # A role without plain-text access: Skyflow answers a placeholder with HTTP 200. Through
    # the handler that must be success: false, not success: true with wrong data.
    fake.faults.clear()
    fake.role_redaction = "REDACTED"
    fresh = RedshiftUDF(make(policy=f"sqlite:///{policy_db}"),  # nothing cached
                        HandlerConfig(databases=frozenset({"dev"})))
    doc = json.loads(fresh.detokenize({**detok, "query_id": 79}))
    assert doc["success"] is False and "plain-text access" in doc["error_msg"]
    assert "results" not in doc


@pytest.mark.parametrize("redaction", ["REDACTED", "MASKED"])
def test_a_redacted_or_masked_answer_is_never_returned_as_the_value(make, fake, redaction):
    """A role without plain-text access gets Skyflow's placeholder or a masked form with
    HTTP 200. Returned as the value, the warehouse (and a Lambda's success: true) would carry
    wrong data; deid asked for PLAIN_TEXT, so anything else fails the batch."""
    svc = make()
    tokens = svc.tokenize("ssn", ["901-23-4567", "902-34-5678"])
    fake.role_redaction = redaction
    with pytest.raises(PermissionDeniedError, match="plain-text access") as e:
        svc.detokenize(tokens, principal="p")
    assert "4567" not in str(e.value)
    fake.role_redaction = None
    assert svc.detokenize(tokens, principal="p") == ["901-23-4567", "902-34-5678"]

def test_attack_an_ungranted_warehouse_user_cannot_tokenize_through_skyflow(make, fake, tmp_path):
    """Attack: through the Lambda host, any Redshift user minted its guesses into Skyflow."""
    from deid.lambda_handler import HandlerConfig, RedshiftUDF

    policy_db = tmp_path / "policy.db"
    SQLiteStore(policy_db, create=True).grant_tokenize("dbt_transformer", "*", "tokenize", "admin")
    # Both databases served: the vault's tokenize policy is what refuses the analyst.
    udf = RedshiftUDF(make(policy=f"sqlite:///{policy_db}", ctx="user+query"),
                      HandlerConfig(databases=frozenset({"dev", "scratch_db"})))
    event = json.loads((Path(__file__).with_name("payloads") / "tokenize_request.json")
                       .read_text())
    answer = json.loads(udf.tokenize({**event, "user": "analyst", "database": "scratch_db"}))
    assert answer["success"] is False
    assert "not in the vault's tokenize policy" in answer["error_msg"]
    assert fake.record_count("persons") == 0, "nothing reached Skyflow"
    assert json.loads(udf.tokenize(event))["success"] is True
    assert fake.requests("insert")[-1].ctx == {"user": "dbt_transformer", "query_id": "5678234"}
    audit = [(r["principal"], r["outcome"]) for r in SQLiteStore(policy_db).audit_records()
             if r["action"] == "tokenize"]
    assert audit[0] == ("analyst", "denied") and ("dbt_transformer", "allowed") in audit
