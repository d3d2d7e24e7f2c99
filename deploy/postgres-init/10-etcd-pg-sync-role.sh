#!/bin/sh
# Run once by the postgres image on an empty data directory: the service's
# own role, which may create its schema (it then owns it) and nothing more.
# See SECURITY.md for the roles and rights.
set -eu
psql -v ON_ERROR_STOP=1 -v password="$ETCD_PG_SYNC_PASSWORD" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE etcd_pg_sync LOGIN PASSWORD :'password';
GRANT CREATE ON DATABASE app TO etcd_pg_sync;
SQL
