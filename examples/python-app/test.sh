#!/usr/bin/env bash
# Runs the tests against a PostgreSQL 15 server that has pg_billing installed.
#   PG_BILLING_TEST_DSN="host=127.0.0.1 port=28841 user=postgres" ./test.sh [pytest args]
# The DSN's role must be able to create databases and roles (a superuser): each
# run creates its own database and application role and drops them at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
: "${PG_BILLING_TEST_DSN:?set PG_BILLING_TEST_DSN, e.g. \"host=127.0.0.1 port=28841 user=postgres\"}"
./setup.sh   # a no-op (no network) when the venv already matches requirements.txt
exec .venv/bin/python -m pytest "$@"
