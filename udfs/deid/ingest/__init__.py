"""Tokenize at ingest: change-stream Lambda handlers (``deid.ingest.stream``) and the file
tokenizer (``deid tokenize-file``), over the same column declarations and token service as
the warehouse path, so a value gets one token whichever path it takes."""

FILE_FORMATS = ("csv", "parquet", "jsonl")
