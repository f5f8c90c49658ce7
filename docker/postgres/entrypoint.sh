#!/bin/sh
# First start: a cluster in $PGDATA (the volume) with one role and database for ctseg, password from
# POSTGRES_PASSWORD (scram-sha-256 over the network, nothing trusted but the local socket). Then postgres itself.
set -eu
: "${POSTGRES_USER:=ctseg}" "${POSTGRES_DB:=ctseg}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then echo "ctseg-postgres: set POSTGRES_PASSWORD" >&2; exit 2; fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  cat >>"$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
max_connections = 200
CONF
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  psql -v ON_ERROR_STOP=1 -q -d postgres -v user="$POSTGRES_USER" -v pw="$POSTGRES_PASSWORD" -v db="$POSTGRES_DB" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"user";
SQL
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "ctseg-postgres: initialised $PGDATA (role $POSTGRES_USER, database $POSTGRES_DB)"
fi
exec postgres -D "$PGDATA"
