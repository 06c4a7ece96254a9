#!/usr/bin/env bash
# One database and one login role per Falaj component (falaj_<component>), run once by the
# postgres image on an empty data volume (/docker-entrypoint-initdb.d). Each role owns only
# its own database, and PUBLIC may not connect to any of them: a service cannot open
# another service's store even with its own credentials.
#
# Needs: FALAJ_DB_PASSWORD (the password of every falaj_* role); POSTGRES_USER and
# POSTGRES_DB as the postgres image sets them. FALAJ_COMPONENTS overrides the list.
set -euo pipefail

: "${FALAJ_DB_PASSWORD:?set FALAJ_DB_PASSWORD, the password of the falaj_* roles}"
components="${FALAJ_COMPONENTS:-ingest features training serving experiments monitoring gateway}"

for component in ${components}; do
    # psql variables (:"role", :'password') quote the identifier and the literal.
    psql --no-psqlrc -v ON_ERROR_STOP=1 \
        --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
        -v role="falaj_${component}" -v password="${FALAJ_DB_PASSWORD}" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"role" OWNER :"role";
REVOKE ALL ON DATABASE :"role" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"role" TO :"role";
SQL
    echo "falaj: created database and role falaj_${component}"
done
