#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, postgres) are installed: from Debian's
# packages when they are missing. Sourced or run by demo.sh and test-all.sh.
set -euo pipefail
have_pg() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; }
if ! have_pg; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL server binaries are missing: install PostgreSQL 15 or newer (Debian: apt-get install postgresql)" >&2
    exit 1
  fi
  echo "installing PostgreSQL from Debian's packages ..."
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# initdb refuses to run as root: zcache runs the server as the postgres OS user.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
