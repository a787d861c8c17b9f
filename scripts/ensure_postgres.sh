#!/usr/bin/env bash
# The PostgreSQL tests (a throwaway cluster with real roles, plpython3u UDFs) are part of
# `make test`: when the server or plpython3u is missing, install it if this machine can
# (root with apt, as CI is), otherwise stop with the command to run. Never a quiet skip.
set -euo pipefail

have_postgres() {
  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 \
    && ls /usr/lib/postgresql/*/lib/plpython3.so >/dev/null 2>&1
}

have_postgres && exit 0

PACKAGES="postgresql postgresql-plpython3-15"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing the PostgreSQL server and plpython3u for the PostgreSQL tests: $PACKAGES" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086 # word splitting is the point
  apt-get install -y -qq $PACKAGES >/dev/null
  have_postgres && exit 0
fi

cat >&2 <<MSG
error: the PostgreSQL tests need the PostgreSQL server with plpython3u, and this machine has
neither them nor root with apt-get to install them. Install them, then run make test again:

    sudo apt-get install $PACKAGES

(make test-fast runs the unit tier without PostgreSQL.)
MSG
exit 1
