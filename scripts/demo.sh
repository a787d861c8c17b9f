#!/usr/bin/env bash
# The whole story on DuckDB: land raw PII, build tokenized marts, query them, re-identify
# with a granted principal, and watch the default principal get refused.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything this run creates (logs/ can quote a value in an engine's error) is owner-only.
umask 077

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# dbt writes `dbt show` results into logs/dbt.log: re-identified values must not land there.
show() { dbt show --quiet --log-level-file none --output json --limit 50 "$@" | python scripts/show.py; }

say "1/7  Create the vault (once; a build never creates one), land the raw data in its own file (seeds -> raw.duckdb: names, emails, SSNs, card numbers)"
# The vault denies tokenize by default: the dev target's principal builds the marts.
deid init --transformer dbt_transformer
dbt seed --quiet
say "2/7  Check column lineage, then build and test the marts (tokens and generalized values only)"
# The documented build: `deid check` reads the compiled SQL and fails before any data moves.
dbt compile --quiet
deid check
dbt build --quiet --exclude resource_type:seed
deid stats

say "3/7  What analysts get: warehouse.duckdb holds the marts, no raw value (searched byte for byte)"
ls -l warehouse.duckdb raw.duckdb
deid scan-artifacts --raw-db raw.duckdb warehouse.duckdb logs target

say "4/7  An analyst's query over tokens: revenue by age band and region"
show --select revenue_by_age_band_region

say "5/7  A granted principal (target pii_reader) re-identifies emails: aged 30-39, one ZIP3"
deid grant pii_reader
show --select reidentify_emails_by_age_and_zip3 --target pii_reader

say "6/7  The same query as the default principal (target dev) is refused"
if out=$(dbt show --quiet --log-level-file none --select reidentify_emails_by_age_and_zip3 2>&1); then
  echo "UNEXPECTED: the default principal could detokenize" >&2
  exit 1
fi
grep -o 'PermissionDeniedError: .*policy[^)]*)' <<<"$out" | head -n 1

say "7/7  The audit log: grants, tokenize counts, every detokenize attempt (never values)"
deid audit show --limit 6
deid audit verify
