"""Where tokenized records go: the places Redshift loads from.

``file:///dir`` (local runs and the demo), ``s3://bucket/prefix`` (one object per batch, for
``COPY … FORMAT JSON 'auto'`` or ``FORMAT PARQUET``) and ``firehose://delivery-stream``
(Firehose delivers to S3 or straight into Redshift). Object names come from the batch's
first and last position in the stream, so a batch delivered again overwrites its own object
instead of duplicating it. Firehose has no such key: a redelivered batch is sent twice, and
each record carries ``_seq`` so a load can drop duplicates.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from ..errors import ConfigError, DeidError

FIREHOSE_BATCH = 500  # PutRecordBatch: at most 500 records and 4 MiB per call
FIREHOSE_BYTES = 4 * 1024 * 1024
FIREHOSE_ATTEMPTS = 5


class SinkError(DeidError):
    """Tokenized records could not be delivered; the batch fails and is delivered again."""


class Sink(Protocol):
    def write(self, source: str, batch_id: str, records: Sequence[dict[str, Any]]) -> None: ...


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", part)[:200]


def encode(records: Sequence[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return b"".join(json.dumps(r, ensure_ascii=False, separators=(",", ":"),
                                   default=str).encode() + b"\n" for r in records)
    if fmt == "parquet":
        import pyarrow as pa  # optional in the Lambda bundle: only Parquet output needs it
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(list(records)), buf)
        return buf.getvalue()
    raise ConfigError(f"deid ingest: unknown output format {fmt!r} (jsonl or parquet)")


class FileSink:
    def __init__(self, root: Path, fmt: str = "jsonl") -> None:
        self.root, self.fmt = root, fmt

    def write(self, source: str, batch_id: str, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        path = self.root / _safe(source) / f"{_safe(batch_id)}.{self.fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(encode(records, self.fmt))
        os.replace(tmp, path)  # a reader never sees half a batch


class S3Sink:
    def __init__(self, client: Any, bucket: str, prefix: str, fmt: str = "jsonl") -> None:
        self.client, self.bucket, self.prefix, self.fmt = client, bucket, prefix, fmt

    def write(self, source: str, batch_id: str, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        key = f"{self.prefix}{_safe(source)}/{_safe(batch_id)}.{self.fmt}"
        try:
            # Encrypted by the bucket's default encryption (udfs/template.yaml sets it).
            self.client.put_object(Bucket=self.bucket, Key=key, Body=encode(records, self.fmt))
        except Exception as exc:
            raise SinkError(f"deid ingest: writing s3://{self.bucket}/{key} failed "
                            f"({type(exc).__name__})") from None


class FirehoseSink:
    def __init__(self, client: Any, stream: str, sleep: Any = time.sleep) -> None:
        self.client, self.stream, self.sleep = client, stream, sleep

    def write(self, source: str, batch_id: str, records: Sequence[dict[str, Any]]) -> None:
        # One JSON object per line: Firehose concatenates records into its S3 objects.
        blobs = [json.dumps(r, ensure_ascii=False, separators=(",", ":"),
                            default=str).encode() + b"\n" for r in records]
        chunk: list[bytes] = []
        size = 0
        for blob in blobs:
            if chunk and (len(chunk) == FIREHOSE_BATCH or size + len(blob) > FIREHOSE_BYTES):
                self._put(chunk)
                chunk, size = [], 0
            chunk.append(blob)
            size += len(blob)
        if chunk:
            self._put(chunk)

    def _put(self, blobs: list[bytes]) -> None:
        pending = blobs
        for attempt in range(FIREHOSE_ATTEMPTS):
            try:
                resp = self.client.put_record_batch(
                    DeliveryStreamName=self.stream, Records=[{"Data": b} for b in pending])
            except Exception as exc:
                raise SinkError(f"deid ingest: Firehose {self.stream} refused a batch "
                                f"({type(exc).__name__})") from None
            if not resp.get("FailedPutCount"):
                return
            # Throttled records come back one by one: resend only those, with backoff.
            pending = [b for b, r in zip(pending, resp["RequestResponses"], strict=True)
                       if r.get("ErrorCode")]
            self.sleep(min(2.0, 0.1 * 2**attempt))
        raise SinkError(f"deid ingest: Firehose {self.stream} kept refusing {len(pending)} "
                        f"records after {FIREHOSE_ATTEMPTS} attempts")


def open_sink(url: str, fmt: str = "jsonl", *, s3: Any = None, firehose: Any = None) -> Sink:
    """A sink from its URL; boto3 clients are created here once (module level in Lambda)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileSink(Path(parsed.path), fmt)
    if parsed.scheme == "s3":
        if s3 is None:
            import boto3  # present in every Lambda Python runtime; optional elsewhere

            s3 = boto3.client("s3")
        prefix = parsed.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return S3Sink(s3, parsed.netloc, prefix, fmt)
    if parsed.scheme == "firehose":
        if fmt != "jsonl":
            raise ConfigError("deid ingest: Firehose takes JSON Lines; let Firehose convert "
                              "to Parquet (record format conversion) if you need Parquet")
        if firehose is None:
            import boto3

            firehose = boto3.client("firehose")
        return FirehoseSink(firehose, parsed.netloc)
    raise ConfigError(f"deid ingest: unknown output {url[:100]!r}; expected file:///dir, "
                      "s3://bucket/prefix or firehose://delivery-stream")
