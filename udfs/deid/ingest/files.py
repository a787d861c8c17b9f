"""``deid tokenize-file``: tokenize CSV, Parquet or JSON Lines before it lands anywhere.

For bulk loads where raw must never reach the warehouse (S3 → tokenize → ``COPY``). The file
is read and written in record batches, so memory follows the batch size and the token
cache, not the file. Columns map to kinds through the same declarations as the change-stream
handlers (``columns.py``), so a file, a stream and a dbt model give one value one token.

Spelling: CSV (UTF-8, a header row) is read as text, exactly as written (``007`` stays
``007``; an empty field is NULL, as ``dbt seed`` and ``COPY … EMPTYASNULL`` read it).
Parquet and JSON values of sensitive columns are turned into text as a warehouse's
``cast(x as varchar)`` does.

A bad value fails the file: the output is written under a temporary name and removed, the
input is untouched, and the error names the column, kind and data row — never the value.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv  # writing only
import pyarrow.parquet as pq

from ..errors import DeidError, InvalidValueError
from ..service import TokenService
from . import FILE_FORMATS as FORMATS
from .columns import SourceColumns
from .records import as_text

DEFAULT_BATCH_ROWS = 50_000
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
             ".ndjson": "jsonl", ".json": "jsonl"}


class FileTokenizeError(DeidError):
    """The file could not be tokenized; no output was left behind."""


@dataclass
class FileStats:
    rows: int = 0
    tokenized: dict[str, int] | None = None


def format_of(path: Path, given: str | None) -> str:
    if given:
        return given
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise FileTokenizeError(f"deid tokenize-file: cannot tell the format of {path.name} "
                                f"from its suffix; pass --format ({', '.join(FORMATS)})")
    return fmt


def _check_columns(names: list[str], columns: SourceColumns) -> None:
    if not columns.strict:
        return
    undeclared = [n for n in names if n.lower() not in columns.columns]
    if undeclared:
        raise FileTokenizeError(
            f"deid tokenize-file: columns {undeclared[:20]} are not declared in the column map "
            f"of {columns.source}; declare them (with a kind if sensitive, or "
            "--column NAME=clear) or pass --allow-undeclared")


# -- readers: each yields (batch, bytes or rows consumed so far) ----------------------------


def _csv_batches(fh: BinaryIO, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Rows parsed by Python's csv module, batch_rows at a time. Not pyarrow's streaming CSV
    reader: while tokenizing lagged behind, it read and decoded the whole file ahead (a
    158 MB file sat in its memory pool after the first batch)."""
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None:
            return
        columns: list[list[str | None]] = [[] for _ in header]
        for row_no, row in enumerate(reader, 1):
            if len(row) != len(header):
                raise FileTokenizeError(f"deid tokenize-file: data row {row_no} has {len(row)} "
                                        f"fields, the header {len(header)}; nothing was written")
            # Text exactly as written; an empty field is NULL, as dbt seed and COPY read it.
            for col, value in zip(columns, row, strict=True):
                col.append(value or None)
            if len(columns[0]) == batch_rows:
                yield pa.RecordBatch.from_arrays([pa.array(c, pa.string()) for c in columns],
                                                 names=header)
                columns = [[] for _ in header]
        if columns and columns[0]:
            yield pa.RecordBatch.from_arrays([pa.array(c, pa.string()) for c in columns],
                                             names=header)
    except UnicodeDecodeError:
        raise FileTokenizeError("deid tokenize-file: the CSV is not UTF-8 text; nothing was "
                                "written") from None
    finally:
        if not fh.closed:
            text.detach()  # the caller closes the file (and asks it for progress)


def _parquet_batches(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)


def _jsonl_batches(fh: BinaryIO, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    line_no = 0
    for line in fh:
        line_no += 1
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise FileTokenizeError(f"deid tokenize-file: line {line_no} is not a JSON object")
        rows.append(doc)
        if len(rows) == batch_rows:
            yield rows
            rows = []
    if rows:
        yield rows


# -- tokenizing one batch ---------------------------------------------------------------------


def _tokenize(service: TokenService, kind: str, column: str, values: list[str | None],
              first_row: int) -> list[str | None]:
    try:
        return service.tokenize(kind, values, column=column)
    except InvalidValueError as exc:
        row = f"data row {first_row + exc.row - 1}" if exc.row else "a row"
        raise FileTokenizeError(f"deid tokenize-file: column {column!r}, kind {exc.kind!r}, "
                                f"{row}: {exc.reason} (the value is not shown; nothing was "
                                "written)") from None


def _timestamp_text(v: Any) -> str:
    text: str = v.strftime("%Y-%m-%d %H:%M:%S")
    return text + f".{v.microsecond:06d}".rstrip("0") if v.microsecond else text


def _as_texts(array: pa.Array) -> list[str | None]:
    """A column as text, spelled as DuckDB's ``cast(x as varchar)`` spells it."""
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.to_pylist()
    if pa.types.is_timestamp(array.type) and array.type.tz is None:
        # pyarrow's cast always writes six fractional digits; the warehouse writes only the
        # significant ones ('…:27', '…:27.12').
        return [None if v is None else _timestamp_text(v) for v in array.to_pylist()]
    return pc.cast(array, pa.string()).to_pylist()


def _arrow_batch(service: TokenService, batch: pa.RecordBatch, columns: SourceColumns,
                 first_row: int, stats: FileStats) -> pa.RecordBatch:
    sensitive = columns.sensitive
    arrays = []
    for name, array in zip(batch.schema.names, batch.columns, strict=True):
        kind = sensitive.get(name.lower())
        if kind is None:
            arrays.append(array)
            continue
        tokens = _tokenize(service, kind, name, _as_texts(array), first_row)
        assert stats.tokenized is not None
        stats.tokenized[name] = stats.tokenized.get(name, 0) + len(tokens) - array.null_count
        arrays.append(pa.array(tokens, type=pa.string()))
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _json_batch(service: TokenService, rows: list[dict[str, Any]], columns: SourceColumns,
                first_row: int, stats: FileStats) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(k for r in rows for k in r))
    _check_columns(names, columns)
    assert stats.tokenized is not None
    for name in names:
        kind = columns.sensitive.get(name.lower())
        if kind is None:
            continue
        texts = []
        for i, r in enumerate(rows):
            try:
                texts.append(as_text(r.get(name)))
            except TypeError:
                raise FileTokenizeError(
                    f"deid tokenize-file: column {name!r}, kind {kind!r}, data row "
                    f"{first_row + i}: is not a scalar value (the value is not shown; nothing "
                    "was written)") from None
        tokens = _tokenize(service, kind, name, texts, first_row)
        for r, t in zip(rows, tokens, strict=True):
            if name in r:
                r[name] = t
        stats.tokenized[name] = stats.tokenized.get(name, 0) + sum(t is not None for t in tokens)
    return rows


# -- the whole file ---------------------------------------------------------------------------


def tokenize_file(service: TokenService, src: Path, dst: Path, columns: SourceColumns, *,
                  in_format: str | None = None, out_format: str | None = None,
                  batch_rows: int = DEFAULT_BATCH_ROWS,
                  progress: Callable[[int], None] | None = None) -> FileStats:
    """Tokenize `src` into `dst`. `progress` gets the bytes (CSV, JSON Lines) or rows
    (Parquet) consumed so far — see `progress_total`."""
    fin, fout = format_of(src, in_format), format_of(dst, out_format)
    if src.resolve() == dst.resolve():
        raise FileTokenizeError("deid tokenize-file: the output would overwrite the input")
    partial = dst.with_name(dst.name + ".partial")
    stats = FileStats(tokenized={})
    try:
        with _Writer(partial, fout) as writer, contextlib.ExitStack() as stack:
            if fin == "jsonl":
                fh = stack.enter_context(src.open("rb"))
                for rows in _jsonl_batches(fh, batch_rows):
                    writer.write_rows(_json_batch(service, rows, columns, stats.rows + 1,
                                                  stats))
                    stats.rows += len(rows)
                    if progress:
                        progress(fh.tell())
            else:
                raw: BinaryIO | None = None
                if fin == "csv":
                    raw = stack.enter_context(src.open("rb"))
                    batches: Iterator[pa.RecordBatch] = _csv_batches(raw, batch_rows)
                else:
                    batches = _parquet_batches(src, batch_rows)
                checked = False
                for batch in batches:
                    if not checked:
                        _check_columns(batch.schema.names, columns)
                        checked = True
                    writer.write_batch(_arrow_batch(service, batch, columns, stats.rows + 1,
                                                    stats))
                    stats.rows += batch.num_rows
                    if progress:
                        # bytes read so far (a buffer ahead of the rows done), or rows
                        progress(raw.tell() if raw is not None else stats.rows)
        os.replace(partial, dst)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return stats


def progress_total(src: Path, in_format: str | None = None) -> int:
    """What `progress` counts up to: the file's size, or a Parquet file's row count."""
    if format_of(src, in_format) == "parquet":
        return int(pq.ParquetFile(src).metadata.num_rows)
    return src.stat().st_size


class _Writer:
    """One output file in one format; opened lazily by the first batch (its schema)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        self._arrow: Any = None
        self._schema: pa.Schema | None = None
        self._fh: BinaryIO | None = None

    def __enter__(self) -> _Writer:
        if self.fmt == "jsonl":
            self._fh = self.path.open("wb")
        return self

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if self.fmt == "jsonl":
            self.write_rows(batch.to_pylist())
            return
        if self._arrow is None:
            # A column with no value in the first batch has no type yet: make it text.
            schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                                for f in batch.schema])
            batch = batch.cast(schema)
            self._schema = schema
            self._arrow = (pcsv.CSVWriter(str(self.path), schema) if self.fmt == "csv"
                           else pq.ParquetWriter(str(self.path), schema))
        elif self._schema is not None and batch.schema != self._schema:
            # JSON Lines infer types per batch (a column all NULL in one batch has no type):
            # one file has one schema, so later batches take the first one's.
            try:
                batch = pa.Table.from_batches([batch]).select(self._schema.names) \
                    .cast(self._schema).to_batches()[0]
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError):
                raise FileTokenizeError(
                    f"deid tokenize-file: a batch's columns or types differ from the first "
                    f"batch's ({', '.join(batch.schema.names)[:200]}); write JSON Lines, or "
                    "make every row carry the same columns") from None
        self._arrow.write_batch(batch)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if self.fmt != "jsonl":
            self.write_batch(pa.RecordBatch.from_pylist(rows))
            return
        assert self._fh is not None
        self._fh.write(b"".join(json.dumps(r, ensure_ascii=False, default=str).encode() + b"\n"
                                for r in rows))

    def __exit__(self, *exc: object) -> None:
        if self._arrow is not None:
            self._arrow.close()
        if self._fh is not None:
            self._fh.close()
        if self._arrow is None and self._fh is None and exc[0] is None:
            self.path.write_bytes(b"")  # an empty input gives an empty output
