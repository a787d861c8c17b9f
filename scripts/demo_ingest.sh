#!/usr/bin/env bash
# Tokenize at ingest on DuckDB: build the mart with dbt, replay a recorded change stream
# through the ingest handler, load the tokenized files next to the mart, and query both.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "0/5  Build the customer mart with dbt (the in-warehouse path), the vault in .deid/"
# The vault denies tokenize by default: the mart builder and the ingest function may mint.
deid init --transformer dbt_transformer
deid grant --tokenize ingest-demo
dbt seed --quiet
dbt build --quiet --exclude resource_type:seed
deid grant pii_reader
python scripts/demo_ingest.py "$PWD"
say "The erasures are in the audit log (who, when, kind and domain; never values)"
deid audit show --limit 100 | grep ' forget '
deid audit verify
