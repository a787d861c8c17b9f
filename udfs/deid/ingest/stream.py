"""Change-stream Lambda handlers: tokenize at ingest, so raw PII never lands downstream.

Event sources, in the shapes AWS documents (samples under tests/python/payloads/):

* Kinesis Data Streams — ``Records[].kinesis.data``: base64 of one JSON object per record,
  either a row or an AWS DMS envelope ``{"data": {...}, "metadata": {"operation": ...}}``.
* DynamoDB Streams — ``Records[].eventName`` INSERT / MODIFY / REMOVE with ``dynamodb.Keys``,
  ``NewImage``, ``OldImage`` in attribute-value JSON (``{"S": "…"}``, ``{"N": "…"}``, …).
* Amazon MSK and self-managed Kafka — ``records["<topic>-<partition>"][]`` with base64
  ``value`` (and ``key``); a record with a null value (a tombstone) removes the row named
  by its JSON key.

Every record becomes one output record: the row with each declared-sensitive column
replaced by its token, plus ``_op`` (INSERT, MODIFY, REMOVE), ``_seq`` (its position in the
stream) and, for MODIFY, ``_changed`` (the names of the columns whose values changed). A
REMOVE is a tombstone holding the key columns' tokens. With ``DEID_ERASE_ON_REMOVE`` naming
columns, a REMOVE also erases those values from the vault (crypto-shredding).

Failures. Kinesis and DynamoDB Streams: the records before the first bad one are written and
the bad record's sequence number is returned in ``batchItemFailures`` (enable
``ReportBatchItemFailures`` on the event source mapping); Lambda retries from it, so nothing
after it is written twice and nothing is skipped silently. Kafka: all or nothing — one bad
record fails the invocation with an error naming its topic, partition, offset, column and
kind, and nothing of the batch is written. A vault or sink outage fails the whole batch
everywhere. No value is ever logged or put in an error.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

from ..errors import ConfigError, DeidError, InvalidValueError
from ..service import Eraser, TokenService
from ..vault import VaultConfig, open_service
from . import columns as _columns
from .records import RECORD, RowError, as_text, tokenize_rows
from .sinks import Sink, open_sink

log = logging.getLogger("deid.ingest")

INSERT, MODIFY, REMOVE = "INSERT", "MODIFY", "REMOVE"
_DMS_OPS = {"load": INSERT, "insert": INSERT, "update": MODIFY, "delete": REMOVE}


class IngestBatchError(DeidError):
    """A Kafka batch held a record that could not be tokenized; nothing was written."""


@dataclass(frozen=True)
class IngestConfig:
    """Read once from the environment at container start."""

    vault: VaultConfig = field(default_factory=VaultConfig)
    column_map: str = "manifest.json"
    source: str = ""
    output: str = ""
    output_format: str = "jsonl"
    erase_on_remove: tuple[str, ...] = ()
    principal: str = "deid-ingest"
    allow_undeclared: bool = False

    @classmethod
    def from_env(cls) -> IngestConfig:
        env = os.environ
        return cls(
            vault=VaultConfig.from_env(),
            column_map=env.get("DEID_COLUMN_MAP", "manifest.json"),
            source=env.get("DEID_INGEST_SOURCE", ""),
            output=env.get("DEID_INGEST_OUTPUT", ""),
            output_format=env.get("DEID_INGEST_FORMAT", "jsonl"),
            erase_on_remove=tuple(c.strip().lower() for c in
                                  env.get("DEID_ERASE_ON_REMOVE", "").split(",") if c.strip()),
            principal=env.get("DEID_PRINCIPAL") or env.get("AWS_LAMBDA_FUNCTION_NAME")
            or "deid-ingest",
            allow_undeclared=env.get("DEID_ALLOW_UNDECLARED", "").lower() in ("1", "true"),
        )


@dataclass
class Change:
    """One stream record, decoded. `row` is the new image (or, for REMOVE, the key)."""

    op: str
    position: str
    row: dict[str, Any] | None = None
    old: dict[str, Any] | None = None
    error: str | None = None  # why it could not be decoded (never a value)


# ---------------------------------------------------------------------------------------
# decoding the documented event shapes


def _json_object(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError
    return doc


def _from_payload(payload: bytes, position: str) -> Change:
    """A row, or an AWS DMS envelope around one."""
    try:
        doc = _json_object(payload)
    except ValueError:
        return Change(INSERT, position, error="is not a JSON object")
    meta = doc.get("metadata")
    if isinstance(doc.get("data"), dict) and isinstance(meta, dict) and "operation" in meta:
        op = _DMS_OPS.get(str(meta["operation"]).lower())
        if op is None:
            return Change(INSERT, position, error="has a DMS operation deid does not handle")
        return Change(op, position, row=doc["data"],
                      old=doc.get("before-image") if isinstance(doc.get("before-image"), dict)
                      else None)
    return Change(INSERT, position, row=doc)


def _b64(text: Any) -> bytes:
    return base64.b64decode(text, validate=True)


def kinesis_changes(event: dict[str, Any]) -> list[Change]:
    out = []
    for rec in event.get("Records") or []:
        k = rec.get("kinesis") or {}
        position = str(k.get("sequenceNumber", ""))
        try:
            payload = _b64(k.get("data", ""))
        except (binascii.Error, ValueError, TypeError):
            out.append(Change(INSERT, position, error="data is not base64"))
            continue
        out.append(_from_payload(payload, position))
    return out


def _attr(value: dict[str, Any]) -> Any:
    """One DynamoDB attribute value (``{"S": "x"}``) as plain JSON."""
    [(tag, v)] = value.items()
    if tag == "S":
        return v
    if tag == "N":
        d = Decimal(v)
        return int(d) if d == d.to_integral_value() else float(d)
    if tag == "BOOL":
        return bool(v)
    if tag == "NULL":
        return None
    if tag in ("SS", "BS"):
        return list(v)
    if tag == "NS":
        return [_attr({"N": n}) for n in v]
    if tag == "L":
        return [_attr(x) for x in v]
    if tag == "M":
        return {k: _attr(x) for k, x in v.items()}
    if tag == "B":
        return v  # base64 text, as the stream carries it
    raise ValueError(tag)


def _image(image: Any) -> dict[str, Any] | None:
    if image is None:
        return None
    return {k: _attr(v) for k, v in image.items()}


def dynamodb_changes(event: dict[str, Any]) -> list[Change]:
    out = []
    for rec in event.get("Records") or []:
        d = rec.get("dynamodb") or {}
        op = rec.get("eventName")
        position = str(d.get("SequenceNumber", ""))
        try:
            keys, new, old = _image(d.get("Keys")), _image(d.get("NewImage")), \
                _image(d.get("OldImage"))
        except (ValueError, AttributeError, TypeError):
            out.append(Change(INSERT, position, error="holds an attribute value deid cannot read"))
            continue
        if op in (INSERT, MODIFY):
            if new is None:
                out.append(Change(op, position, error="has no NewImage (set the stream's view "
                                                      "type to NEW_IMAGE or NEW_AND_OLD_IMAGES)"))
            else:
                out.append(Change(op, position, row=new, old=old))
        elif op == REMOVE:
            out.append(Change(op, position, row=keys or {}, old=old))
        else:
            out.append(Change(INSERT, position, error="has an unknown eventName"))
    return out


def kafka_changes(event: dict[str, Any]) -> dict[str, list[Change]]:
    """Per ``topic-partition`` key, in offset order, as the event lists them."""
    out: dict[str, list[Change]] = {}
    for key, records in (event.get("records") or {}).items():
        changes = out.setdefault(key, [])
        for rec in records:
            position = f"{rec.get('topic')}-{rec.get('partition')}@{rec.get('offset')}"
            try:
                if rec.get("value") is None:
                    row = _json_object(_b64(rec.get("key") or ""))
                    changes.append(Change(REMOVE, position, row=row))
                else:
                    changes.append(_from_payload(_b64(rec["value"]), position))
            except (binascii.Error, ValueError, TypeError):
                changes.append(Change(INSERT, position,
                                      error="value (or, for a tombstone, key) is not a base64 "
                                            "JSON object"))
    return out


# ---------------------------------------------------------------------------------------
# the handler


@dataclass
class Outcome:
    written: list[dict[str, Any]]
    failed_at: int | None = None  # index of the first change that could not be handled
    error: RowError | None = None


class ChangeStreamHandler:
    """Thin: decode the event, tokenize through the service, write, report failures."""

    def __init__(self, service: TokenService, columns: _columns.SourceColumns, sink: Sink, *,
                 erase_on_remove: Sequence[str] = (), principal: str = "deid-ingest") -> None:
        undeclared = [c for c in erase_on_remove if c not in columns.sensitive]
        if undeclared:
            raise ConfigError(f"deid ingest: DEID_ERASE_ON_REMOVE names {undeclared} which the "
                              f"column map does not declare sensitive for {columns.source}")
        self.service = service
        self.columns = columns
        self.sink = sink
        self.erase_on_remove = tuple(erase_on_remove)
        self.eraser: Eraser | None = None
        if self.erase_on_remove:
            if not callable(getattr(service, "forget", None)):
                raise ConfigError("deid ingest: DEID_ERASE_ON_REMOVE is set but this vault "
                                  "cannot erase")
            self.eraser = cast(Eraser, service)
        # Who the vault's tokenize policy checks (deny by default: `deid grant --tokenize`)
        # and its audit names, for minting and for erasing.
        self.principal = principal

    # -- entry points -----------------------------------------------------------------------

    def kinesis(self, event: dict[str, Any]) -> dict[str, Any]:
        return self._stream("kinesis", event, kinesis_changes(event))

    def dynamodb(self, event: dict[str, Any]) -> dict[str, Any]:
        return self._stream("dynamodb", event, dynamodb_changes(event))

    def kafka(self, event: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        by_partition = kafka_changes(event)
        outcomes = {key: self._handle(changes) for key, changes in by_partition.items()}
        for key, outcome in outcomes.items():
            if outcome.failed_at is not None:
                bad = by_partition[key][outcome.failed_at]
                assert outcome.error is not None
                log.warning("deid.ingest kafka: %s failed: %s; nothing written", bad.position,
                            outcome.error.describe())
                raise IngestBatchError(
                    f"deid ingest: record {bad.position} of source {self.columns.source}: "
                    f"{outcome.error.describe()} (the value is not shown); the batch was not "
                    "written and will be delivered again")
        total = 0
        for key, outcome in outcomes.items():
            changes = by_partition[key]
            if changes:
                self.sink.write(self.columns.source,
                                f"{key}-{_offset(changes[0])}-{_offset(changes[-1])}",
                                outcome.written)
                total += len(outcome.written)
        log.info("deid.ingest kafka: source=%s records=%d ms=%.1f", self.columns.source, total,
                 (time.perf_counter() - started) * 1000)
        return {"records": total}

    def _stream(self, name: str, event: dict[str, Any], changes: list[Change]) -> dict[str, Any]:
        started = time.perf_counter()
        outcome = self._handle(changes)
        if outcome.written:
            first = changes[0].position
            last = changes[len(outcome.written) - 1].position
            self.sink.write(self.columns.source, f"{_shard(event)}{first}-{last}",
                            outcome.written)
        failures = []
        if outcome.failed_at is not None:
            bad = changes[outcome.failed_at]
            assert outcome.error is not None
            log.warning("deid.ingest %s: record %s failed: %s; %d records before it written, "
                        "the rest will be delivered again", name, bad.position,
                        outcome.error.describe(), len(outcome.written))
            failures.append({"itemIdentifier": bad.position})
        log.info("deid.ingest %s: source=%s records=%d written=%d ms=%.1f", name,
                 self.columns.source, len(changes), len(outcome.written),
                 (time.perf_counter() - started) * 1000)
        return {"batchItemFailures": failures}

    # -- the work ---------------------------------------------------------------------------

    def _handle(self, changes: list[Change]) -> Outcome:
        """Tokenize changes in order up to the first failure; erase after each REMOVE that
        asks for it, so a later record of the same value gets the new token."""
        written: list[dict[str, Any]] = []
        start = 0
        for end, change in enumerate(changes):
            erasing = change.op == REMOVE and self.erase_on_remove
            if not erasing and end < len(changes) - 1:
                continue
            segment = changes[start:end + 1]
            outcome = self._tokenize(segment)
            written.extend(outcome.written)
            if outcome.failed_at is not None:
                return Outcome(written, start + outcome.failed_at, outcome.error)
            if erasing:
                error = self._erase(change, end)
                if error is not None:
                    written.pop()  # the tombstone goes out only once its erasure happened
                    return Outcome(written, end, error)
            start = end + 1
        return Outcome(written)

    def _tokenize(self, segment: list[Change]) -> Outcome:
        decode_error = next((i for i, c in enumerate(segment) if c.error), None)
        limit = len(segment) if decode_error is None else decode_error
        rows = [c.row or {} for c in segment[:limit]]
        tokenized, errors = tokenize_rows(self.service, self.columns, rows,
                                          principal=self.principal, host="ingest")
        failed_at, error = (errors[0].index, errors[0]) if errors else (None, None)
        if decode_error is not None and (failed_at is None or decode_error < failed_at):
            failed_at = decode_error
            error = RowError(decode_error, RECORD, None, segment[decode_error].error or "")
        written = []
        for i, row in enumerate(tokenized[: failed_at if failed_at is not None else limit]):
            c = segment[i]
            record = {**row, "_op": c.op, "_seq": c.position}
            if c.op == MODIFY:
                record["_changed"] = ",".join(_changed(c.old, c.row or {}))
            written.append(record)
        return Outcome(written, failed_at, error)

    def _erase(self, change: Change, index: int) -> RowError | None:
        image = change.old
        if image is None:
            return RowError(index, self.erase_on_remove[0], None,
                            "REMOVE carries no old image to erase (set the stream's view type "
                            "to NEW_AND_OLD_IMAGES)")
        lowered = {k.lower(): v for k, v in image.items()}
        erased, kinds = 0, set()
        for column in self.erase_on_remove:
            kind = self.columns.sensitive[column]
            try:
                text = as_text(lowered.get(column))
                if text is None:
                    continue
                assert self.eraser is not None  # set whenever erase_on_remove is
                erased += self.eraser.forget(kind, values=[text], principal=self.principal)
            except (TypeError, InvalidValueError) as exc:
                # tokenize refuses such a value, so the vault cannot hold it: nothing to erase
                # (and a record that can never succeed must not hold up the stream).
                reason = exc.reason if isinstance(exc, InvalidValueError) else "not a scalar"
                log.warning("deid.ingest: REMOVE %s: column %r, kind %r: %s; nothing to erase",
                            change.position, column, kind, reason)
                continue
            kinds.add(kind)
        log.info("deid.ingest: REMOVE %s erased %d vault records (kinds %s)", change.position,
                 erased, ",".join(sorted(kinds)))
        return None


def _changed(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    if old is None:
        return sorted(new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _shard(event: dict[str, Any]) -> str:
    records = event.get("Records") or [{}]
    event_id = str(records[0].get("eventID", ""))
    return event_id.split(":", 1)[0] + "-" if ":" in event_id else ""


def _offset(change: Change) -> str:
    return change.position.rsplit("@", 1)[-1]


# ---------------------------------------------------------------------------------------
# module-level state: one handler per container


_handler: ChangeStreamHandler | None = None
_lock = threading.Lock()


def build(config: IngestConfig) -> ChangeStreamHandler:
    if not config.source or not config.output:
        raise ConfigError("deid ingest: set DEID_INGEST_SOURCE (a source in the column map) "
                          "and DEID_INGEST_OUTPUT (file:///dir, s3://bucket/prefix or "
                          "firehose://stream)")
    columns = _columns.source_columns(config.column_map, config.source)
    if config.allow_undeclared:
        columns = _columns.SourceColumns(columns.source, columns.columns, strict=False)
    return ChangeStreamHandler(open_service(config.vault), columns,
                               open_sink(config.output, config.output_format),
                               erase_on_remove=config.erase_on_remove,
                               principal=config.principal)


def _get() -> ChangeStreamHandler:
    global _handler
    if _handler is None:
        with _lock:
            if _handler is None:
                _handler = build(IngestConfig.from_env())
    return _handler


def reset(handler: ChangeStreamHandler | None = None) -> None:
    """Replace (or drop) the container's handler: for tests and local replays."""
    global _handler
    with _lock:
        _handler = handler


def kinesis_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda entry point for a Kinesis Data Streams event source mapping."""
    return _get().kinesis(event)


def dynamodb_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda entry point for a DynamoDB Streams event source mapping."""
    return _get().dynamodb(event)


def kafka_handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """Lambda entry point for an Amazon MSK or self-managed Kafka event source mapping."""
    return _get().kafka(event)


if os.environ.get("AWS_LAMBDA_FUNCTION_NAME") and os.environ.get("DEID_INGEST_SOURCE"):
    # Inside Lambda: open the vault, the map and the sink during init so the first batch is
    # warm. A failure is retried (and raised) by the first invocation.
    logging.getLogger().setLevel(os.environ.get("DEID_LOG_LEVEL", "INFO"))
    try:
        _get()
    except Exception as _exc:
        log.error("deid.ingest: init failed: %s", type(_exc).__name__)
