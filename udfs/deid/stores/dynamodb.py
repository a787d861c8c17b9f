"""deid's vault in DynamoDB, with keys wrapped by AWS KMS: ``dynamodb://<table>?region=…&kms_key=…``.

Optional URL parameters: ``endpoint_url`` (DynamoDB Local, moto), ``workers`` (parallel
DynamoDB requests per batch, default 8).

One table, partition key ``pk`` (string), no sort key:

====================================  ==========================================================
``fp#<domain>#<hex fingerprint>``     → ``token``: the convergent index
``tok#<token>``                       → ``domain``, ``fp``, ``kind``, ``v`` (key version), ``ct``;
                                      erased: ``domain``, ``kind``, ``erased_at`` only
``meta#erasure_epoch``                → ``n``: bumped by every erasure
``key#<version>``                     → ``wrapped``: a data key encrypted by KMS
``meta#fingerprint_key``              → ``wrapped``: the HMAC fingerprint key, KMS-encrypted
``meta#audit_key``                    → ``wrapped``: the audit-chain key, KMS-encrypted
``meta#key_counter``                  → ``n``: the last key version handed out
``principal#<name>``                  → the detokenize policy
``tokenize#<domain>#<name>``          → ``mode``: the tokenize policy (domain ``*``: all)
``audit#head``, ``audit#<seq>``       → the hash-chained audit log
====================================  ==========================================================

Convergence: a new value's ``fp#`` and ``tok#`` items are written in one transaction, each
conditional on not existing. Two Lambdas minting the same value race on the ``fp#`` item;
the loser's transaction is cancelled and it reads the winner's token, so both return one
token. A cancelled ``tok#`` condition means a random token collided: the caller retries
with a fresh one.

Keys and KMS (why the tokenize role cannot decrypt): every KMS call carries the encryption
context ``{"deid:vault": <table>, "deid:purpose": fingerprint | audit | values}``, which the
IAM policies in ``udfs/template.yaml`` condition on.

- tokenize needs the fingerprint key (``kms:Decrypt`` with purpose ``fingerprint``) and
  encrypts new values under a data key of its own: at its first new value a container takes
  the next key version from ``meta#key_counter``, calls ``kms:GenerateDataKey`` (purpose
  ``values``) and stores the wrapped key as ``key#<version>``. It never decrypts a data key,
  so it cannot read values other containers stored. It unwraps the audit key (purpose
  ``audit``) to append its aggregate tokenize records.
- detokenize unwraps data keys by version (``kms:Decrypt``, purpose ``values``) and the
  audit key (purpose ``audit``); it never sees the fingerprint key.

The trade-off: one key version per tokenize container (cold start), so versions grow with
container churn; detokenize unwraps each version it meets once per container.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import _audit
from .. import keys as _keys
from .._policy import strongest
from .._url import parse_vault_url
from ..errors import ConfigError, VaultKeyError, VaultUnavailableError
from .base import GENESIS, Erasure, NewRecord, Sealer, StoredValue, VaultStore

# DynamoDB limits: BatchGetItem 100 keys, TransactWriteItems 100 items (two per new token).
_GET_CHUNK = 100
_TX_RECORDS = 50
_MAX_ATTEMPTS = 8
# AES-GCM with random 96-bit nonces: stay far below 2**32 encryptions under one key.
_MAX_ENCRYPTIONS_PER_KEY = 2**30


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _backoff(attempt: int) -> None:
    time.sleep(min(2.0, 0.025 * 2**attempt) * random.uniform(0.5, 1.0))  # noqa: S311 - jitter


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code") or type(exc).__name__)


# Error code (or botocore exception class) → what to do. AWS's own message is never shown:
# a ValidationException can quote an attribute value.
_FIXES = {
    "ResourceNotFoundException": "the table does not exist in this region; deploy it "
                                 "(udfs/template.yaml) or fix the URL's table and region",
    "AccessDeniedException": "the role lacks this DynamoDB permission; compare its policy with "
                             "udfs/template.yaml",
    "UnrecognizedClientException": "the AWS credentials are invalid for this region",
    "ProvisionedThroughputExceededException": "raise the table's capacity or use on-demand",
    "ThrottlingException": "raise the table's capacity or use on-demand",
    "RequestLimitExceeded": "raise the account's DynamoDB limits or lower the concurrency",
    "EndpointConnectionError": "DynamoDB could not be reached; check the network, region "
                               "and endpoint_url",
    "ConnectTimeoutError": "DynamoDB could not be reached; check the network, region and "
                           "endpoint_url",
    "ReadTimeoutError": "DynamoDB did not answer in time; retry",
    "NoCredentialsError": "no AWS credentials found; give the function a role or set the "
                          "AWS_* variables",
}


def _ddb_error(op: str, table: str, exc: Exception, detail: str = "") -> VaultUnavailableError:
    code = _code(exc)
    fix = _FIXES.get(code)
    return VaultUnavailableError(
        f"deid vault: DynamoDB {op} on table {table!r} failed ({code}{detail})"
        + (f"; {fix}" if fix else ""))


class DynamoDBStore(VaultStore):
    """A `VaultStore` over one DynamoDB table and one KMS key. Thread-safe."""

    def __init__(self, table: str, *, region: str | None, kms_key: str,
                 endpoint_url: str | None = None, workers: int = 8,
                 session: Any = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ConfigError("deid vault: dynamodb:// needs boto3; install deid with the "
                              "redshift extra (or add boto3 to the Lambda bundle)") from None

        if not table:
            raise ConfigError("deid vault: a DynamoDB URL names the table: dynamodb://<table>?…")
        if not kms_key:
            raise ConfigError("deid vault: a DynamoDB vault needs kms_key=<key id, ARN or "
                              "alias> in its URL")
        self.table = table
        self.kms_key = kms_key
        self.url = f"dynamodb://{table}?region={region or ''}&kms_key={kms_key}"
        self._workers = max(1, workers)
        config = Config(retries={"max_attempts": _MAX_ATTEMPTS, "mode": "standard"},
                        connect_timeout=3, read_timeout=15,
                        max_pool_connections=max(10, self._workers * 2))
        session = session or boto3.session.Session()
        self.ddb = session.client("dynamodb", region_name=region, endpoint_url=endpoint_url,
                                  config=config)
        self.kms = session.client("kms", region_name=region, endpoint_url=endpoint_url,
                                  config=config)
        self._pool = ThreadPoolExecutor(max_workers=self._workers,
                                        thread_name_prefix="deid-ddb")

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """One client call; botocore retries throttling. Errors carry only the code."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result: dict[str, Any] = getattr(self.ddb, op)(**kwargs)
            return result
        except (ClientError, BotoCoreError) as exc:
            raise _ddb_error(op, self.table, exc) from None

    def _kms(self, op: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result: dict[str, Any] = getattr(self.kms, op)(**kwargs)
            return result
        except (ClientError, BotoCoreError) as exc:
            raise VaultKeyError(
                f"deid keys: KMS {op} failed ({_code(exc)}); check the function role's KMS "
                f"permissions and that kms_key is the vault's key") from None

    def _map(self, fn: Callable[[Any], Any], chunks: list[Any]) -> list[Any]:
        if len(chunks) <= 1:
            return [fn(c) for c in chunks]
        return list(self._pool.map(fn, chunks))

    def _batch_get(self, keys: Sequence[str], projection: str | None,
                   consistent: bool = False,
                   names: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """BatchGetItem in chunks of 100, in parallel, retrying UnprocessedKeys.
        `projection` None reads whole items."""
        chunks = [list(keys[i : i + _GET_CHUNK]) for i in range(0, len(keys), _GET_CHUNK)]

        def get(chunk: list[str]) -> list[dict[str, Any]]:
            spec: dict[str, Any] = {"Keys": [{"pk": {"S": k}} for k in chunk],
                                    "ConsistentRead": consistent}
            if projection is not None:
                spec["ProjectionExpression"] = projection
                spec["ExpressionAttributeNames"] = {"#pk": "pk", **(names or {})}
            request: dict[str, Any] = {self.table: spec}
            items: list[dict[str, Any]] = []
            for attempt in range(_MAX_ATTEMPTS + 1):
                out = self._call("batch_get_item", RequestItems=request)
                items.extend(out.get("Responses", {}).get(self.table, []))
                request = out.get("UnprocessedKeys") or {}
                if not request:
                    return items
                if attempt < _MAX_ATTEMPTS:
                    _backoff(attempt)
            raise VaultUnavailableError(
                f"deid vault: DynamoDB kept throttling reads on table {self.table!r} after "
                f"{_MAX_ATTEMPTS} retries; raise the table's read capacity or use on-demand")

        return [item for part in self._map(get, chunks) for item in part]

    def _get(self, pk: str, consistent: bool = True) -> dict[str, Any] | None:
        item: dict[str, Any] | None = self._call(
            "get_item", TableName=self.table, Key={"pk": {"S": pk}},
            ConsistentRead=consistent).get("Item")
        return item

    def _put_if_absent(self, item: dict[str, Any]) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.ddb.put_item(TableName=self.table, Item=item,
                              ConditionExpression="attribute_not_exists(pk)")
            return True
        except ClientError as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                return False
            raise _ddb_error("PutItem", self.table, exc) from None
        except BotoCoreError as exc:
            raise _ddb_error("PutItem", self.table, exc) from None

    def _transact(self, items: list[dict[str, Any]]) -> list[str] | None:
        """Run a transaction; None on success, else the per-item cancellation codes.
        Conflicts and throttling are retried here; condition failures are the caller's."""
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(_MAX_ATTEMPTS + 1):
            try:
                self.ddb.transact_write_items(TransactItems=items)
                return None
            except BotoCoreError as exc:
                raise _ddb_error("TransactWriteItems", self.table, exc) from None
            except ClientError as exc:
                code = _code(exc)
                reasons = [r.get("Code", "None") for r in
                           exc.response.get("CancellationReasons") or []]
                if code == "TransactionCanceledException" and "ConditionalCheckFailed" in reasons:
                    return reasons
                retryable = code in ("TransactionCanceledException", "TransactionConflict",
                                     "TransactionInProgressException",
                                     "ProvisionedThroughputExceededException",
                                     "ThrottlingException", "RequestLimitExceeded",
                                     "InternalServerError")
                if not retryable or attempt == _MAX_ATTEMPTS:
                    detail = f": {','.join(sorted(set(reasons)))}" if reasons else ""
                    raise _ddb_error("TransactWriteItems", self.table, exc, detail) from None
                _backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # -- keys -------------------------------------------------------------------------------

    def _load_keyring(self) -> KmsKeyring:
        return KmsKeyring(self)

    def reload_keyring(self) -> _keys.Keyring:
        return self.keyring()  # versions are resolved on demand; nothing to reload

    def retire_key_version(self, version: int) -> _keys.Keyring:
        raise ConfigError(
            "deid keys: a DynamoDB vault's key versions belong to tokenize containers (one "
            "each, from an atomic counter); a live container may still encrypt under any of "
            "them, so deid does not delete key#<version> items. After deid keys rewrap, "
            "delete the wrapped key of a version no record uses once its container is gone "
            "(see docs/redshift.md)")

    def context(self, purpose: str, version: int | None = None) -> dict[str, str]:
        ctx = {"deid:vault": self.table, "deid:purpose": purpose}
        if version is not None:
            ctx["deid:key_version"] = str(version)
        return ctx

    def _has_items(self, prefix: str) -> bool:
        kwargs: dict[str, Any] = {
            "TableName": self.table, "ProjectionExpression": "#pk",
            "FilterExpression": "begins_with(#pk, :p)",
            "ExpressionAttributeNames": {"#pk": "pk"},
            "ExpressionAttributeValues": {":p": {"S": prefix}},
        }
        while True:
            out = self._call("scan", **kwargs)
            if out.get("Items"):
                return True
            if "LastEvaluatedKey" not in out:
                return False
            kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]

    def secret_key(self, name: str, *, may_create: Callable[[], bool]) -> bytes:
        """A 32-byte vault secret stored KMS-wrapped under ``meta#<name>``; created (by
        GenerateDataKey) only when absent and `may_create()` says the vault allows it."""
        pk = f"meta#{name}"
        purpose = name.removesuffix("_key")
        item = self._get(pk)
        # A concurrent first writer stores the key before its first record: if records exist
        # now, the key may have appeared since the read above, so read it once more.
        if item is None and not may_create() and (item := self._get(pk)) is None:
            raise VaultKeyError(
                f"deid keys: {pk} is missing from table {self.table!r} although the vault "
                "holds records; restore it from a backup (refusing to create a new key, "
                "which would break the vault)")
        if item is None:
            out = self._kms("generate_data_key", KeyId=self.kms_key, KeySpec="AES_256",
                            EncryptionContext=self.context(purpose))
            if self._put_if_absent({"pk": {"S": pk}, "wrapped": {"B": out["CiphertextBlob"]},
                                    "created_at": {"S": _now()}}):
                return bytes(out["Plaintext"])
            item = self._get(pk)  # a concurrent container created it first: use theirs
            if item is None:  # pragma: no cover - DynamoDB guarantees the winner is readable
                raise VaultUnavailableError(f"deid keys: {pk} vanished while being created")
        out = self._kms("decrypt", KeyId=self.kms_key, CiphertextBlob=item["wrapped"]["B"],
                        EncryptionContext=self.context(purpose))
        return bytes(out["Plaintext"])

    def new_data_key(self) -> tuple[int, bytes]:
        out = self._call("update_item", TableName=self.table, Key={"pk": {"S": "meta#key_counter"}},
                         UpdateExpression="ADD #n :one", ExpressionAttributeNames={"#n": "n"},
                         ExpressionAttributeValues={":one": {"N": "1"}},
                         ReturnValues="UPDATED_NEW")
        version = int(out["Attributes"]["n"]["N"])
        dk = self._kms("generate_data_key", KeyId=self.kms_key, KeySpec="AES_256",
                       EncryptionContext=self.context("values", version))
        if not self._put_if_absent({"pk": {"S": f"key#{version}"},
                                    "wrapped": {"B": dk["CiphertextBlob"]},
                                    "created_at": {"S": _now()}}):
            raise VaultKeyError(f"deid keys: key version {version} already exists in table "
                                f"{self.table!r}; meta#key_counter was reset")
        return version, bytes(dk["Plaintext"])

    def data_key(self, version: int) -> bytes:
        item = self._get(f"key#{version}")
        if item is None:
            raise VaultKeyError(f"deid keys: key version {version} is missing from table "
                                f"{self.table!r}; restore the key#{version} item")
        out = self._kms("decrypt", KeyId=self.kms_key, CiphertextBlob=item["wrapped"]["B"],
                        EncryptionContext=self.context("values", version))
        return bytes(out["Plaintext"])

    # -- tokens -----------------------------------------------------------------------------

    @staticmethod
    def _fp_pk(domain: str, fingerprint: bytes) -> str:
        return f"fp#{domain}#{fingerprint.hex()}"

    def find_tokens(self, domain: str, fingerprints: Sequence[bytes]) -> dict[bytes, str]:
        by_pk = {self._fp_pk(domain, fp): fp for fp in fingerprints}
        items = self._batch_get(list(by_pk), "#pk, tok")
        return {by_pk[i["pk"]["S"]]: i["tok"]["S"] for i in items}

    def insert_tokens(self, records: Sequence[NewRecord], *,
                      random_tokens: bool = False) -> dict[bytes, str]:
        if not records:
            return {}
        domain = records[0].domain
        chunks = [list(records[i : i + _TX_RECORDS])
                  for i in range(0, len(records), _TX_RECORDS)]
        parts = self._map(self._insert_chunk, chunks)
        winners: dict[bytes, str] = {}
        lost: list[bytes] = []
        for won, taken in parts:
            winners.update(won)
            lost.extend(taken)
        if lost:
            # Another writer holds these fingerprints: read its tokens (strongly consistent,
            # so a write that just won is visible).
            by_pk = {self._fp_pk(domain, fp): fp for fp in lost}
            for item in self._batch_get(list(by_pk), "#pk, tok", consistent=True):
                winners[by_pk[item["pk"]["S"]]] = item["tok"]["S"]
        return winners

    def _insert_chunk(self, records: list[NewRecord]) -> tuple[dict[bytes, str], list[bytes]]:
        """(fingerprint → token won here, fingerprints another writer holds). A record in
        neither collided on its token and is left for the caller to retry."""
        won: dict[bytes, str] = {}
        taken: list[bytes] = []
        pending = records
        while pending:
            items = []
            for r in pending:
                cond = {"TableName": self.table, "ConditionExpression": "attribute_not_exists(pk)"}
                items.append({"Put": {**cond, "Item": {
                    "pk": {"S": f"tok#{r.token}"}, "domain": {"S": r.domain},
                    "fp": {"B": r.fingerprint}, "kind": {"S": r.kind},
                    "v": {"N": str(r.key_version)}, "ct": {"B": r.ciphertext}}}})
                items.append({"Put": {**cond, "Item": {
                    "pk": {"S": self._fp_pk(r.domain, r.fingerprint)},
                    "tok": {"S": r.token}, "kind": {"S": r.kind}}}})
            reasons = self._transact(items)
            if reasons is None:
                won.update((r.fingerprint, r.token) for r in pending)
                return won, taken
            retry = []
            for i, r in enumerate(pending):
                tok_failed = reasons[2 * i] == "ConditionalCheckFailed"
                fp_failed = reasons[2 * i + 1] == "ConditionalCheckFailed"
                if fp_failed:
                    taken.append(r.fingerprint)
                elif not tok_failed:
                    retry.append(r)  # innocent bystander of a cancelled transaction
            pending = retry
        return won, taken

    def fetch_values(self, tokens: Sequence[str]) -> dict[str, StoredValue]:
        # Strongly consistent: a token minted a moment ago by another Lambda must be found.
        items = self._batch_get([f"tok#{t}" for t in dict.fromkeys(tokens)], "#pk, v, ct",
                                consistent=True)
        return {i["pk"]["S"][4:]: StoredValue(int(i["v"]["N"]), bytes(i["ct"]["B"]))
                for i in items if "ct" in i}  # an erased token's tombstone has no value

    def _scan(self, prefix: str, projection: str) -> Iterator[list[dict[str, Any]]]:
        kwargs: dict[str, Any] = {
            "TableName": self.table, "ProjectionExpression": projection,
            "FilterExpression": "begins_with(#pk, :p)",
            # domain is a DynamoDB reserved word
            "ExpressionAttributeNames": {"#pk": "pk",
                                         **({"#d": "domain"} if "#d" in projection else {}),
                                         **({"#m": "mode"} if "#m" in projection else {})},
            "ExpressionAttributeValues": {":p": {"S": prefix}},
        }
        while True:
            out = self._call("scan", **kwargs)
            if out.get("Items"):
                yield out["Items"]
            if "LastEvaluatedKey" not in out:
                return
            kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]

    def iter_values(self, batch_size: int = 10_000) -> Iterator[list[tuple[str, StoredValue]]]:
        batch: list[tuple[str, StoredValue]] = []
        for items in self._scan("tok#", "#pk, v, ct"):
            for i in items:
                if "ct" not in i:
                    continue  # erased
                batch.append((i["pk"]["S"][4:], StoredValue(int(i["v"]["N"]), bytes(i["ct"]["B"]))))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def update_values(self, rows: Sequence[tuple[str, StoredValue, StoredValue]]) -> int:
        def update(row: tuple[str, StoredValue, StoredValue]) -> int:
            token, old, new = row
            try:
                self._call("update_item", TableName=self.table,
                           Key={"pk": {"S": f"tok#{token}"}},
                           UpdateExpression="SET v = :v, ct = :ct",
                           # Compare-and-swap: a record erased or rewrapped meanwhile stays.
                           ConditionExpression="v = :ov AND ct = :oc",
                           ExpressionAttributeValues={
                               ":v": {"N": str(new.key_version)}, ":ct": {"B": new.ciphertext},
                               ":ov": {"N": str(old.key_version)}, ":oc": {"B": old.ciphertext}})
            except VaultUnavailableError as exc:
                if "ConditionalCheckFailed" in str(exc):
                    return 0
                raise
            return 1

        return sum(self._map(update, list(rows)))

    # -- erasure ----------------------------------------------------------------------------
    #
    # The tok# item stays as the tombstone (its value and fingerprint attributes removed), so
    # the insert's attribute_not_exists(pk) condition never issues an erased token again; the
    # fp# item is deleted, so the value's next tokenize mints a new token. Both in one
    # transaction, conditional on the record still holding its value.

    def _erase_items(self, domain: str, live: list[dict[str, Any]]) -> list[Erasure]:
        """Erase tok# items (whole, as read); return the tombstones this call wrote."""
        at = _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")
        out: list[Erasure] = []
        for item in live:
            token = item["pk"]["S"][4:]
            reasons = self._transact([
                {"Update": {"TableName": self.table, "Key": {"pk": {"S": f"tok#{token}"}},
                            "UpdateExpression": "REMOVE ct, v, fp SET erased_at = :at",
                            "ConditionExpression": "attribute_exists(ct)",
                            "ExpressionAttributeValues": {":at": {"S": at}}}},
                {"Delete": {"TableName": self.table,
                            "Key": {"pk": {"S": self._fp_pk(domain, bytes(item["fp"]["B"]))}},
                            "ConditionExpression": "tok = :t",
                            "ExpressionAttributeValues": {":t": {"S": token}}}},
                {"Update": {"TableName": self.table, "Key": {"pk": {"S": "meta#erasure_epoch"}},
                            "UpdateExpression": "ADD #n :one",
                            "ExpressionAttributeNames": {"#n": "n"},
                            "ExpressionAttributeValues": {":one": {"N": "1"}}}},
            ])
            if reasons is None:
                out.append(Erasure(token, domain, item["kind"]["S"], at))
            # else: a concurrent forget erased it first; its tombstone counts, not ours
        return out

    def _live_records(self, domain: str, tokens: Sequence[str]) -> list[dict[str, Any]]:
        items = self._batch_get([f"tok#{t}" for t in dict.fromkeys(tokens)], None,
                                consistent=True)
        return [i for i in items if "ct" in i and i.get("domain", {}).get("S") == domain]

    def erase(self, domain: str, fingerprints: Sequence[bytes]) -> list[Erasure]:
        found = self._batch_get([self._fp_pk(domain, fp) for fp in fingerprints], "#pk, tok",
                                consistent=True)
        return self._erase_items(domain, self._live_records(
            domain, [i["tok"]["S"] for i in found]))

    def erase_tokens(self, domain: str, tokens: Sequence[str]) -> list[Erasure]:
        return self._erase_items(domain, self._live_records(domain, tokens))

    def record_erasures(self, erasures: Sequence[Erasure]) -> None:
        for e in erasures:
            self._put_if_absent({"pk": {"S": f"tok#{e.token}"}, "domain": {"S": e.domain},
                                 "kind": {"S": e.kind}, "erased_at": {"S": e.erased_at}})
        if erasures:
            self._call("update_item", TableName=self.table,
                       Key={"pk": {"S": "meta#erasure_epoch"}}, UpdateExpression="ADD #n :one",
                       ExpressionAttributeNames={"#n": "n"},
                       ExpressionAttributeValues={":one": {"N": "1"}})

    def erased(self, tokens: Sequence[str]) -> dict[str, Erasure]:
        items = self._batch_get([f"tok#{t}" for t in dict.fromkeys(tokens)], None,
                                consistent=True)
        return {i["pk"]["S"][4:]: Erasure(i["pk"]["S"][4:], i["domain"]["S"], i["kind"]["S"],
                                          i["erased_at"]["S"])
                for i in items if "erased_at" in i}

    def erasures(self, since: str | None = None) -> Iterator[Erasure]:
        """A filtered Scan of the table, sorted here: an administrator's report, not a hot
        path (a vault erasing at scale would add an index on erased_at)."""
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "ProjectionExpression": "#pk, #d, kind, erased_at",
            "FilterExpression": "begins_with(#pk, :p) AND erased_at >= :since",
            "ExpressionAttributeNames": {"#pk": "pk", "#d": "domain"},
            "ExpressionAttributeValues": {":p": {"S": "tok#"}, ":since": {"S": since or ""}},
        }
        found: list[Erasure] = []
        while True:
            out = self._call("scan", **kwargs)
            found.extend(Erasure(i["pk"]["S"][4:], i["domain"]["S"], i["kind"]["S"],
                                 i["erased_at"]["S"]) for i in out.get("Items", []))
            if "LastEvaluatedKey" not in out:
                break
            kwargs["ExclusiveStartKey"] = out["LastEvaluatedKey"]
        return iter(sorted(found, key=lambda e: (e.erased_at, e.token)))

    def erasure_epoch(self) -> int:
        item = self._get("meta#erasure_epoch")
        return int(item["n"]["N"]) if item else 0

    # -- policy -----------------------------------------------------------------------------

    def grant(self, principal: str, granted_by: str) -> bool:
        return self._put_if_absent({"pk": {"S": f"principal#{principal}"},
                                    "granted_at": {"S": _now()}, "granted_by": {"S": granted_by}})

    def revoke(self, principal: str) -> bool:
        out = self._call("delete_item", TableName=self.table,
                         Key={"pk": {"S": f"principal#{principal}"}}, ReturnValues="ALL_OLD")
        return bool(out.get("Attributes"))

    def principals(self) -> list[dict[str, str]]:
        rows = [{"principal": i["pk"]["S"].removeprefix("principal#"),
                 "granted_at": i["granted_at"]["S"], "granted_by": i["granted_by"]["S"]}
                for items in self._scan("principal#", "#pk, granted_at, granted_by")
                for i in items]
        return sorted(rows, key=lambda r: r["principal"])

    def is_allowed(self, principal: str) -> bool:
        return self._get(f"principal#{principal}") is not None

    # Domains match [a-z][a-z0-9_]* or are "*": the first "#" after the prefix ends them.
    def grant_tokenize(self, principal: str, domain: str, mode: str, granted_by: str) -> bool:
        from botocore.exceptions import ClientError

        try:  # unchanged grants keep who first granted them and when
            self.ddb.put_item(
                TableName=self.table, Item={
                    "pk": {"S": f"tokenize#{domain}#{principal}"}, "mode": {"S": mode},
                    "granted_at": {"S": _now()}, "granted_by": {"S": granted_by}},
                ConditionExpression="attribute_not_exists(pk) OR #m <> :m",
                ExpressionAttributeNames={"#m": "mode"},
                ExpressionAttributeValues={":m": {"S": mode}})
            return True
        except ClientError as exc:
            if _code(exc) == "ConditionalCheckFailedException":
                return False
            raise VaultUnavailableError(
                f"deid vault: DynamoDB PutItem on table {self.table!r} failed ({_code(exc)})"
            ) from None

    def revoke_tokenize(self, principal: str, domain: str) -> bool:
        out = self._call("delete_item", TableName=self.table,
                         Key={"pk": {"S": f"tokenize#{domain}#{principal}"}},
                         ReturnValues="ALL_OLD")
        return bool(out.get("Attributes"))

    def tokenize_grants(self) -> list[dict[str, str]]:
        rows = []
        for items in self._scan("tokenize#", "#pk, #m, granted_at, granted_by"):
            for i in items:
                domain, _, principal = i["pk"]["S"].removeprefix("tokenize#").partition("#")
                rows.append({"principal": principal, "domain": domain, "mode": i["mode"]["S"],
                             "granted_at": i["granted_at"]["S"],
                             "granted_by": i["granted_by"]["S"]})
        return sorted(rows, key=lambda r: (r["principal"], r["domain"]))

    def tokenize_mode(self, principal: str, domain: str) -> str | None:
        items = self._batch_get([f"tokenize#{domain}#{principal}", f"tokenize#*#{principal}"],
                                "#pk, #m", consistent=True, names={"#m": "mode"})
        return strongest([i["mode"]["S"] for i in items])

    # -- audit ------------------------------------------------------------------------------

    def append_audit(self, record: dict[str, Any], seal: Sealer) -> dict[str, Any]:
        for attempt in range(4 * _MAX_ATTEMPTS):
            head = self._get("audit#head")
            seq, prev = (int(head["seq"]["N"]), head["hash"]["S"]) if head else (0, GENESIS)
            stored = {**record, "seq": seq + 1}
            digest = seal(prev, stored)
            new_head = {"pk": {"S": "audit#head"}, "seq": {"N": str(seq + 1)},
                        "hash": {"S": digest}}
            head_write: dict[str, Any] = {"Put": {
                "TableName": self.table, "Item": new_head,
                **({"ConditionExpression": "#seq = :seq",
                    "ExpressionAttributeNames": {"#seq": "seq"},
                    "ExpressionAttributeValues": {":seq": {"N": str(seq)}}} if head else
                   {"ConditionExpression": "attribute_not_exists(pk)"})}}
            reasons = self._transact([
                {"Put": {"TableName": self.table,
                         "ConditionExpression": "attribute_not_exists(pk)",
                         "Item": {"pk": {"S": f"audit#{seq + 1:012d}"},
                                  "record": {"S": _audit.encode(stored)},
                                  "prev": {"S": prev}, "hash": {"S": digest}}}},
                head_write,
            ])
            if reasons is None:
                return {**stored, "prev": prev, "hash": digest}
            _backoff(min(attempt, 5))  # another detokenize appended first: chain after it
        raise VaultUnavailableError("deid vault: could not append to the audit log (too many "
                                    "concurrent detokenize calls); the batch was not revealed")

    def audit_records(self) -> Iterator[dict[str, Any]]:
        head = self._get("audit#head")
        last = int(head["seq"]["N"]) if head else 0
        for start in range(1, last + 1, 1000):
            keys = [f"audit#{s:012d}" for s in range(start, min(start + 1000, last + 1))]
            for item in sorted(self._batch_get(keys, None, consistent=True),
                               key=lambda i: i["pk"]["S"]):
                seq = int(item["pk"]["S"][6:])
                yield {**_audit.decode(item["record"]["S"], f"record {seq}"), "seq": seq,
                       "prev": item["prev"]["S"], "hash": item["hash"]["S"]}

    # -- stats ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        tokens: dict[str, int] = {}
        versions: dict[str, int] = {}
        erased = 0
        for items in self._scan("tok#", "#pk, #d, kind, v"):
            for i in items:
                if "v" not in i:
                    erased += 1
                    continue
                key = f"{i['domain']['S']} ({i['kind']['S']})"
                tokens[key] = tokens.get(key, 0) + 1
                versions[i["v"]["N"]] = versions.get(i["v"]["N"], 0) + 1
        head = self._get("audit#head")
        return {
            "vault": self.url,
            "tokens": dict(sorted(tokens.items())),
            "key_versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0]))),
            "erased": erased,
            "principals": len(self.principals()),
            "tokenize_grants": len(self.tokenize_grants()),
            "audit_records": int(head["seq"]["N"]) if head else 0,
        }


class KmsKeyring:
    """The `Keyring` of a DynamoDB vault: its keys live KMS-wrapped in the table and are
    unwrapped on first use, each with its own encryption context, so a role holds only the
    KMS rights it uses (tokenize never unwraps a data key, detokenize never the fingerprint
    key)."""

    def __init__(self, store: DynamoDBStore) -> None:
        self._store = store
        self._lock = threading.RLock()
        self.source = f"kms:{store.kms_key}"
        self.current = 0  # no data key until this container encrypts its first value
        self._fingerprint_key = b""
        self._audit_key = b""
        self._aead: dict[int, AESGCM] = {}
        self._encryptions = 0

    def __repr__(self) -> str:
        return f"KmsKeyring(loaded_versions={self.versions}, source={self.source!r})"

    @property
    def versions(self) -> list[int]:
        """The data-key versions this container has unwrapped or made."""
        return sorted(self._aead)

    def _fingerprint(self) -> bytes:
        if not self._fingerprint_key:
            with self._lock:
                if not self._fingerprint_key:
                    self._fingerprint_key = self._store.secret_key(
                        "fingerprint_key",
                        may_create=lambda: not self._store._has_items("fp#"))
        return self._fingerprint_key

    def _audit(self) -> bytes:
        if not self._audit_key:
            with self._lock:
                if not self._audit_key:
                    self._audit_key = self._store.secret_key(
                        "audit_key", may_create=lambda: self._store._get("audit#head") is None)
        return self._audit_key

    # -- the Keyring protocol -----------------------------------------------------------------

    def check_value(self) -> str:
        return _keys.check_value_of(self._fingerprint())

    def fingerprints(self, domain: str, match_keys: list[str]) -> list[bytes]:
        return _keys.fingerprints_under(self._fingerprint(), domain, match_keys)

    def encrypt(self, token: str, canonical: str) -> tuple[int, bytes]:
        with self._lock:
            if not self.current or self._encryptions >= _MAX_ENCRYPTIONS_PER_KEY:
                version, key = self._store.new_data_key()
                self._aead[version] = AESGCM(key)
                self.current, self._encryptions = version, 0
            self._encryptions += 1
            version, aead = self.current, self._aead[self.current]
        return _keys.encrypt_under(aead, version, token, canonical)

    def decrypt(self, token: str, version: int, blob: bytes) -> str:
        aead = self._aead.get(version)
        if aead is None:
            with self._lock:
                aead = self._aead.get(version)
                if aead is None:
                    aead = self._aead[version] = AESGCM(self._store.data_key(version))
        return _keys.decrypt_under(aead, version, token, blob, self.source)

    def chain(self, prev_hash: str, record: dict[str, Any]) -> str:
        return _keys.chain_under(self._audit(), prev_hash, record)


def open_store(url: str, *, keys: str | None = None) -> DynamoDBStore:
    """``dynamodb://<table>?region=…&kms_key=…[&endpoint_url=…&workers=8]``."""
    if keys:
        raise ConfigError("deid keys: DEID_KEYS does not apply to a DynamoDB vault (its keys "
                          "stay KMS-wrapped in the table); unset it")
    parsed = parse_vault_url(url, "DynamoDB",
                             known=("region", "kms_key", "endpoint_url", "workers"))
    if parsed.parts.scheme.lower() != "dynamodb":
        raise ConfigError("deid vault: a DynamoDB URL starts with dynamodb://")
    return DynamoDBStore(
        parsed.parts.netloc,
        # boto3's own fallbacks, read here so the URL's region wins over them
        region=parsed.text("region") or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION"),
        kms_key=parsed.text("kms_key") or "",
        endpoint_url=parsed.text("endpoint_url"),
        workers=parsed.integer("workers", 8, lo=1, hi=64),
    )
