#!/usr/bin/env bash
# deid on PostgreSQL: a private cluster, real roles, real grants. An admin installs the UDFs,
# a transformer builds the marts, then an analyst, a PII reader and a role the vault policy
# dropped each query them. The cluster is stopped and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if ! reason=$("$PY" -c 'import sys; sys.path.insert(0, "tests/python"); import pg_cluster; r = pg_cluster.missing_reason(); print(r or ""); sys.exit(1 if r else 0)'); then
  echo "demo-postgres needs a local PostgreSQL server: $reason" >&2
  exit 1
fi

WORK=$(mktemp -d -t deid-pg-demo.XXXXXX)
chmod 711 "$WORK"  # the server runs as the postgres OS user when this runs as root
cleanup() {
  "$PY" tests/python/pg_cluster.py stop "$WORK/cluster" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

say "1/7  Start a private PostgreSQL cluster (initdb + pg_ctl on a free port)"
eval "$("$PY" tests/python/pg_cluster.py start "$WORK/cluster")"
export PGHOST PGPORT PGDATABASE
ADMIN_USER=$PGUSER ADMIN_PASSWORD=$PGPASSWORD
PSQL=$(ls /usr/lib/postgresql/*/bin/psql | sort -r | head -n 1)
echo "cluster on $PGHOST:$PGPORT, database $PGDATABASE"

# Demo passwords for a cluster that listens on 127.0.0.1 only and is deleted at the end.
declare -A PASSWORD=([transformer]=transformer-demo [analyst]=analyst-demo
                     [pii_reader]=pii-reader-demo [ex_reader]=ex-reader-demo)
as() {  # as ROLE psql-args...: run psql as a login role
  local role=$1; shift
  PGUSER=$role PGPASSWORD=${PASSWORD[$role]:-$ADMIN_PASSWORD} "$PSQL" -X -q -v ON_ERROR_STOP=1 "$@"
}

say "2/7  A DBA creates the logins and the schema the marts land in"
PGUSER=$ADMIN_USER PGPASSWORD=$ADMIN_PASSWORD "$PSQL" -X -q -v ON_ERROR_STOP=1 <<SQL
create role transformer login password '${PASSWORD[transformer]}';
create role analyst login password '${PASSWORD[analyst]}';
create role pii_reader login password '${PASSWORD[pii_reader]}';
create role ex_reader login password '${PASSWORD[ex_reader]}';
grant create on database $PGDATABASE to transformer;
create schema analytics authorization transformer;
grant usage on schema analytics to analyst, pii_reader, ex_reader;
SQL
# the committed example's `postgres` target, as a user would copy it
cp "$ROOT/profiles.yml.example" "$WORK/profiles.yml"
SITE=$("$PY" -c 'import cryptography, pathlib; print(pathlib.Path(cryptography.__file__).parents[1])')
VARS="{deid_python_path: ['$ROOT/udfs', '$SITE'], deid_transformer_roles: [transformer],
       deid_pii_reader_roles: [pii_reader, ex_reader],
       deid_analyst_roles: [analyst, pii_reader, ex_reader]}"
export DBT_PROFILES_DIR=$WORK DBT_TARGET=postgres DBT_TARGET_PATH=$WORK/target DBT_LOG_PATH=$WORK/logs

say "3/7  The admin installs deid.tokenize / deid.detokenize (plpython3u), the vault schema and the grants"
PGUSER=$ADMIN_USER PGPASSWORD=$ADMIN_PASSWORD dbt run-operation postgres_install_udfs --quiet --vars "$VARS"
as transformer -c "select p.oid::regprocedure as function, pg_get_userbyid(p.proowner) as owner,
                         p.prosecdef as security_definer, array_to_string(p.proconfig, ',') as settings,
                         array_to_string(p.proacl, ', ') as grants
                  from pg_proc p where p.pronamespace = 'deid'::regnamespace order by 1"
export DEID_VAULT="postgresql://$ADMIN_USER:$ADMIN_PASSWORD@$PGHOST:$PGPORT/$PGDATABASE?schema=deid_vault"
deid grant --tokenize transformer   # the vault's tokenize policy: deny by default
deid grant pii_reader
deid grant ex_reader
deid revoke ex_reader   # still holds EXECUTE on deid.detokenize: the vault refuses it anyway
unset DEID_VAULT

say "4/7  The transformer lands the raw data and builds the marts (tokens only)"
PGUSER=transformer PGPASSWORD=${PASSWORD[transformer]} dbt seed --quiet --vars "$VARS"
PGUSER=transformer PGPASSWORD=${PASSWORD[transformer]} dbt compile --quiet --vars "$VARS"
deid check
PGUSER=transformer PGPASSWORD=${PASSWORD[transformer]} dbt build --quiet --exclude resource_type:seed --vars "$VARS"

say "5/7  analyst: the marts yes; raw tables and detokenize no"
as analyst -c "select age_band, zip3, count(*) as customers, min(email_token) as one_email_token
               from analytics.dim_customers group by 1, 2 order by 3 desc limit 5"
as analyst -c "select email from raw.raw_customers limit 1" 2>&1 | grep ERROR || true
as analyst -c "select deid.detokenize(email_token) from analytics.dim_customers limit 1" 2>&1 | grep ERROR || true

say "6/7  pii_reader: EXECUTE granted and in the vault policy -> original values (synthetic data)"
as pii_reader -c "select deid.detokenize(email_token) as email, age_band, zip3
                  from analytics.dim_customers where age_band = '30-39' order by zip3 limit 5"

say "7/7  ex_reader: EXECUTE granted, removed from the vault policy -> refused by the vault"
as ex_reader -c "select deid.detokenize(email_token) from analytics.dim_customers limit 1" 2>&1 | grep ERROR || true
DEID_VAULT="postgresql://$ADMIN_USER:$ADMIN_PASSWORD@$PGHOST:$PGPORT/$PGDATABASE?schema=deid_vault" \
  deid audit verify

say "Done: stopping the cluster"
