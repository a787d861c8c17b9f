#!/usr/bin/env bash
# The whole story on DuckDB: land raw PII, build tokenized marts, query them, re-identify
# with a granted principal, and watch the default principal get refused.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# dbt writes `dbt show` results into logs/dbt.log: re-identified values must not land there.
show() { dbt show --quiet --log-level-file none --output json --limit 50 "$@" | python scripts/show.py; }

say "1/6  Land the raw data (seeds -> schema raw: names, emails, SSNs, card numbers in the clear)"
# The vault denies tokenize by default: the dev target's principal builds the marts.
deid init --transformer dbt_transformer
dbt seed --quiet
say "2/6  Check column lineage, then build and test the marts (tokens and generalized values only)"
# The documented build: `deid check` reads the compiled SQL and fails before any data moves.
dbt compile --quiet
deid check
dbt build --quiet --exclude resource_type:seed
deid stats

say "3/6  An analyst's query over tokens: revenue by age band and region"
show --select revenue_by_age_band_region

say "4/6  A granted principal (target pii_reader) re-identifies emails: aged 30-39, one ZIP3"
deid grant pii_reader
show --select reidentify_emails_by_age_and_zip3 --target pii_reader

say "5/6  The same query as the default principal (target dev) is refused"
if out=$(dbt show --quiet --log-level-file none --select reidentify_emails_by_age_and_zip3 2>&1); then
  echo "UNEXPECTED: the default principal could detokenize" >&2
  exit 1
fi
grep -o 'PermissionDeniedError: .*policy[^)]*)' <<<"$out" | head -n 1

say "6/6  The audit log: grants, tokenize counts, every detokenize attempt (never values)"
deid audit show --limit 6
deid audit verify
