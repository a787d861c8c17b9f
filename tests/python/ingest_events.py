"""Change-stream events for tests, built from AWS's documented sample events
(tests/python/payloads/*_event.json): only the record payloads and positions change."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

PAYLOADS = Path(__file__).parent / "payloads"


def sample(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((PAYLOADS / name).read_text())
    return doc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kinesis(payloads: list[dict[str, Any] | bytes]) -> dict[str, Any]:
    """One documented Kinesis record per payload (a row, or raw bytes), consecutive
    sequence numbers on the sample's shard."""
    template = sample("kinesis_event.json")["Records"][0]
    first = int(template["kinesis"]["sequenceNumber"])
    records = []
    for i, p in enumerate(payloads):
        rec = copy.deepcopy(template)
        seq = str(first + i)
        rec["kinesis"]["sequenceNumber"] = seq
        rec["eventID"] = f"{template['eventID'].split(':')[0]}:{seq}"
        rec["kinesis"]["data"] = _b64(p if isinstance(p, bytes) else json.dumps(p).encode())
        records.append(rec)
    return {"Records": records}


def attr(value: Any) -> dict[str, Any]:
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int | float):
        return {"N": str(value)}
    return {"S": value}


def image(row: dict[str, Any]) -> dict[str, Any]:
    return {k: attr(v) for k, v in row.items()}


def dynamodb(changes: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]],
             key: str = "customer_id", first_seq: int = 111) -> dict[str, Any]:
    """(eventName, new row, old row) per record, in the documented sample's record shape."""
    template = sample("dynamodb_stream_event.json")["Records"][1]  # MODIFY: every field
    records = []
    for i, (op, new, old) in enumerate(changes):
        rec = copy.deepcopy(template)
        rec["eventID"] = str(i + 1)
        rec["eventName"] = op
        body = rec["dynamodb"]
        body["SequenceNumber"] = str(first_seq + i)
        either = new if new is not None else old
        assert either is not None
        body["Keys"] = image({key: either[key]})
        body.pop("NewImage")
        body.pop("OldImage")
        if new is not None:
            body["NewImage"] = image(new)
        if old is not None:
            body["OldImage"] = image(old)
        records.append(rec)
    return {"Records": records}


def kafka(partitions: dict[int, list[dict[str, Any] | bytes | None]], *,
          keys: dict[tuple[int, int], dict[str, Any]] | None = None,
          name: str = "msk_event.json") -> dict[str, Any]:
    """Per partition of the sample's topic, one documented record per payload (None: a
    tombstone, whose key is `keys[(partition, index)]`)."""
    doc = sample(name)
    [(_, [template])] = doc["records"].items()
    doc["records"] = {}
    for partition, payloads in partitions.items():
        records = []
        for i, p in enumerate(payloads):
            rec = copy.deepcopy(template)
            rec["partition"] = partition
            rec["offset"] = template["offset"] + i
            if p is None:
                rec["value"] = None
                rec["key"] = _b64(json.dumps((keys or {})[(partition, i)]).encode())
            else:
                rec["value"] = _b64(p if isinstance(p, bytes) else json.dumps(p).encode())
            records.append(rec)
        doc["records"][f"{template['topic']}-{partition}"] = records
    return doc


class Collect:
    """A sink that keeps what it is given (the file/S3/Firehose sinks are tested below)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, str, list[dict[str, Any]]]] = []

    def write(self, source: str, batch_id: str, records: Any) -> None:
        self.batches.append((source, batch_id, list(records)))

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for _, _, recs in self.batches for r in recs]
